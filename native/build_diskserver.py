"""cffi build script for mirror's disk server (native/diskserver.c and its parts).

The server is a multi-threaded C program; it lives in an extension module so that
the package install compiles it like the page-diff engine (no compiler at run
time).  ``python -m mirror.guests.diskproc ARGS`` hands the process to its
``main``: no Python runs on the I/O path.  Its parts, one concern each, are listed
in native/diskserver_internal.h.
"""

from __future__ import annotations

import os

from cffi import FFI

SOURCES = [
    "diskserver.c",  # the process: state, command line, control socket, I/O helpers
    "disknbd.c",  # the NBD protocol QEMU speaks
    "diskstorage.c",  # the local image (with a deadline), storage failover onto B
    "diskstream.c",  # the primary's stream to B: records, barrier, copy, resync
    "diskjournal.c",  # the replica: handshake, journal, commit, promotion
    "diskcrypto.c",  # the stream's keys, MACs, AEAD, block hashes
]

ffibuilder = FFI()
ffibuilder.cdef(
    "int mirror_diskserver_main(int argc, char **argv);\n"
    "int mirror_disk_session_key(const unsigned char *secret, const unsigned char *peer,"
    " const unsigned char *ctx, size_t n, unsigned char *out);"
)
ffibuilder.set_source(
    "mirror._diskserver",
    '#include "diskserver.h"',
    # setuptools wants source paths relative to the project root
    sources=[f"native/{name}" for name in SOURCES],
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
