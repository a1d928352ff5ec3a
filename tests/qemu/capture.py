"""Records when frames from one MAC address cross a network interface (AF_PACKET).

    python -m tests.qemu.capture IFACE MAC OUT   (run inside the namespace; SIGTERM ends it)

Writes one wall-clock time per captured frame to OUT, one per line, as they come.
"""

from __future__ import annotations

import signal
import socket
import sys
import time


def main() -> int:
    iface, mac, out = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), sys.argv[3]
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
    s.bind((iface, 0))
    s.settimeout(0.1)
    with open(out, "w") as f:
        f.write("ready\n")
        f.flush()
        while not stop:
            try:
                frame, addr = s.recvfrom(65536)
            except TimeoutError:
                continue
            if frame[6:12] == mac and addr[2] != socket.PACKET_OUTGOING:
                f.write(f"{time.time():.6f}\n")
                f.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
