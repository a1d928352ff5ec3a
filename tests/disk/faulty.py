"""A disk image with a real I/O error path (mirror/lab/faultdisk.py); skips a test on a
machine without nbdkit, nbdfuse or /dev/fuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror.lab.faultdisk import FaultyImage as _FaultyImage
from mirror.lab.faultdisk import missing_tools


def FaultyImage(root: Path, size: int, content: bytes = b"") -> _FaultyImage:
    why = missing_tools()
    if why:
        pytest.skip(why)
    return _FaultyImage(root, size, content)
