"""An insider (the primary's key) sends the standby one message far larger than any the
pair sends: zmq bounds each frame, not how many there are, and buffers a message whole
before handing it over.  The standby's memory stays within its bound (two of the largest
messages of the pair, and slack): it drops the connections, says so, and still pairs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import zmq

from mirror.replication import keys
from tests.integration.conftest import Pair

FRAME = 128 << 20
FRAMES = 16  # 2 GiB in one message (the same buffer, sent without copying)


def rss_anon_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_a_huge_multipart_message_cannot_grow_the_standby(pair: Pair) -> None:
    b = pair.start_secondary()
    time.sleep(1.0)
    base = rss_anon_mib(b.proc.pid)
    peak = [base]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_mib(b.proc.pid))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    a_keys = keys.load(pair.cfg_a.keys)
    assert a_keys is not None
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    try:
        s.setsockopt(zmq.LINGER, 0)
        s.curve_secretkey, s.curve_publickey = a_keys.secret, a_keys.public
        s.curve_serverkey = a_keys.peer
        s.connect(f"tcp://127.0.0.1:{pair.cfg_b.link.data_port}")
        big = bytearray(FRAME)
        s.send_multipart([memoryview(big)] * FRAMES, copy=False)
        deadline = time.monotonic() + 30
        log = b.log_path
        while time.monotonic() < deadline and "link-memory-bound" not in log.read_text():
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        s.close(0)
        ctx.term()
        done.set()
        watcher.join()
    grew = peak[0] - base
    print(f"a {FRAMES * FRAME >> 20} MiB message: the standby's anonymous memory "
          f"{base:.0f} -> peak {peak[0]:.0f} MiB (+{grew:.0f})")  # fmt: skip
    text = b.log_path.read_text()
    assert "link-memory-bound" in text, text[-2000:]
    assert grew < 900, f"the standby grew by {grew:.0f} MiB"
    assert "Traceback" not in text
    assert b.proc.poll() is None, "the standby must live on"
    a = pair.start_primary()  # and it still pairs with the real primary
    pair.wait("protected", lambda: (a.status() or {}).get("protection") == "protected")
