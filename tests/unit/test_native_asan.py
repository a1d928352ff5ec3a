"""The delta decoder and batch apply under AddressSanitizer and UBSan.

Builds native/tests/fuzz_codec.c together with the engine's C sources with
-fsanitize=address,undefined and runs it: random and mutated inputs, every
buffer a heap block of exactly its stated size, so any read or write outside
it aborts the run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "native"
SOURCES = ["tests/fuzz_codec.c", "pagediff.c", "simd_sse2.c", "simd_avx2.c"]

pytestmark = pytest.mark.native_asan


@pytest.fixture(scope="module")
def fuzz_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler on this machine to build the ASan harness")
    out = tmp_path_factory.mktemp("asan") / "fuzz_codec"
    cmd = [
        cc,
        "-O1",
        "-g",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
        f"-I{NATIVE}",
        *(str(NATIVE / s) for s in SOURCES),
        "-lpthread",
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_codec_fuzz_under_asan(fuzz_binary: Path, seed: int) -> None:
    run = subprocess.run(
        [str(fuzz_binary), "60000", str(seed)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-4000:]
    match = re.search(r"(\d+) damaged deltas accepted, (\d+) rejected", run.stdout)
    assert match, run.stdout
    accepted, rejected = int(match[1]), int(match[2])
    assert accepted > 0 and rejected > 0  # both paths were exercised
