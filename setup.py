"""setuptools needs this file only to compile the native parts.

The cffi extension (cffi_modules) is the page-diff engine and the dirty-page
log; ``mirror._uffdpreload`` is not a Python module but the small library that
the agent preloads into a guest process (QEMU, the synthetic guest) so that it
hands out userfaultfds of its mm (native/uffd_preload.c).  Everything else about
the package lives in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    cffi_modules=[
        "native/build_pagediff.py:ffibuilder",
        "native/build_diskserver.py:ffibuilder",
    ],
    ext_modules=[
        Extension(
            "mirror._uffdpreload",
            sources=["native/uffd_preload.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ],
)
