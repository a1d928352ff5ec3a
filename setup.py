"""setuptools needs this file only to compile the cffi extension (cffi_modules).

Everything else about the package lives in pyproject.toml.
"""

from setuptools import setup

setup(
    cffi_modules=[
        "native/build_pagediff.py:ffibuilder",
        "native/build_diskserver.py:ffibuilder",
    ]
)
