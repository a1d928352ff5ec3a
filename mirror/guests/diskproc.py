"""``python -m mirror.guests.diskproc ARGS``: this process becomes the disk server.

The server is C (native/diskserver.c and its parts, multi-threaded); this module only hands it
the command line.  cffi releases the GIL for the call, and the server never
returns to Python while it runs.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from mirror._diskserver import ffi, lib  # type: ignore[import-not-found]

    args = [ffi.new("char[]", a.encode()) for a in ["diskserver", *argv]]
    argv_c = ffi.new("char *[]", args)
    return int(lib.mirror_diskserver_main(len(args), argv_c))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
