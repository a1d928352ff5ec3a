"""A stand-in VM: a real process the host agent runs for each VM placed on its host.

    python -m mirror.pool.vmproc VM HOST [LOG]

It appends ``start VM HOST PID TIME`` to LOG (one write, O_APPEND), then
sleeps until SIGTERM, when it appends ``stop ...``.  It dies with the host
the pool agent's process group.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _note(path: str | None, what: str, vm: str, host: str) -> None:
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{what} {vm} {host} {os.getpid()} {time.time():.3f}\n".encode())
        finally:
            os.close(fd)


def main(argv: list[str]) -> int:
    vm, host = argv[0], argv[1]
    path = argv[2] if len(argv) > 2 else None
    done = False

    def term(signum: int, frame: object) -> None:
        nonlocal done
        done = True

    signal.signal(signal.SIGTERM, term)
    _note(path, "start", vm, host)
    while not done:
        time.sleep(0.2)
    _note(path, "stop", vm, host)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
