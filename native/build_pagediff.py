"""cffi build script for mirror's native page-diff engine (API mode).

Compiled when the package is installed (setup.py names it in cffi_modules),
so nothing needs a compiler at run time.  The declarations come straight
from pagediff.h, between its cdef markers, so header and binding can't drift.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = [
    "pagediff.c",
    "simd_sse2.c",
    "simd_avx2.c",
    "synthguest.c",
    "tablehash.c",
    "dirtylog.c",
    "pagecrypt.c",  # the checkpoint stream's page sealing (AES-256-GCM, OpenSSL)
]
HEADERS = ["pagediff.h", "dirtylog.h", "pagecrypt.h"]


def read_cdef() -> str:
    parts = []
    for name in HEADERS:
        text = (HERE / name).read_text()
        match = re.search(r"/\* cdef-begin \*/(.*)/\* cdef-end \*/", text, re.S)
        if match is None:
            raise RuntimeError(f"{name} lost its cdef-begin/cdef-end markers")
        parts.append(match.group(1))
    return "\n".join(parts)


def compile_args() -> list[str]:
    args = ["-O3", "-std=gnu11", "-Wall", "-Wextra", "-fno-strict-aliasing"]
    extra = os.environ.get("MIRROR_NATIVE_CFLAGS", "")
    return args + extra.split()


ffibuilder = FFI()
ffibuilder.cdef(read_cdef())
ffibuilder.set_source(
    "mirror._pagediff",
    '#include "pagediff.h"\n#include "dirtylog.h"\n#include "pagecrypt.h"',
    # setuptools wants source paths relative to the project root
    sources=[f"native/{name}" for name in SOURCES],
    include_dirs=["native"],
    extra_compile_args=compile_args(),
    libraries=["pthread", "crypto"],  # OpenSSL: the pages' AES-256-GCM
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
