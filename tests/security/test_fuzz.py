"""The coverage-guided fuzzer of the wire decoder and the standby's frame handling
(tests/security/fuzz_wire.py), bounded: MIRROR_FUZZ_SECONDS (default 20) of libFuzzer.
A crash (any exception but a WireError from the decoder, any exception or lost session
from the standby) fails the test with libFuzzer's report and the crashing input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SECONDS = int(os.environ.get("MIRROR_FUZZ_SECONDS", "20"))


def test_the_wire_fuzzer_finds_no_crash(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    run = subprocess.run(
        [
            sys.executable, "-m", "tests.security.fuzz_wire", f"-max_total_time={SECONDS}",
            f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        cwd=Path(__file__).parents[2],
    )
    assert run.returncode == 0, run.stderr[-4000:]
    done = re.search(r"Done (\d+) runs in (\d+) second", run.stderr)
    assert done, run.stderr[-2000:]
    runs = int(done.group(1))
    print(f"fuzz: {runs} inputs in {done.group(2)} s, no crash")
    assert runs > 1000 * SECONDS  # it really ran (about 35,000 inputs a second here)
    assert not list(tmp_path.glob("crash-*"))
