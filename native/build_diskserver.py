"""cffi build script for mirror's disk server (native/diskserver.c).

The server is a multi-threaded C program; it lives in an extension module so that
the package install compiles it like the page-diff engine (no compiler at run
time).  ``python -m mirror.guests.diskproc ARGS`` hands the process to its
``main``: no Python runs on the I/O path.
"""

from __future__ import annotations

import os

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    "int mirror_diskserver_main(int argc, char **argv);\n"
    "int mirror_disk_session_key(const unsigned char *secret, const unsigned char *peer,"
    " const unsigned char *ctx, size_t n, unsigned char *out);"
)
ffibuilder.set_source(
    "mirror._diskserver",
    '#include "diskserver.h"',
    sources=["native/diskserver.c"],
    include_dirs=["native"],
    extra_compile_args=[
        "-O2",
        "-std=gnu11",
        "-Wall",
        "-Wextra",
        "-pthread",
        *os.environ.get("MIRROR_NATIVE_CFLAGS", "").split(),
    ],
    libraries=["pthread", "crypto"],  # OpenSSL: the stream's AES-256-GCM and HMAC
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
