"""The files a pair keeps on its hosts are no wider than they need to be: a real pair
runs, then every file and directory under each host's state directory, and the guest's
RAM file and the standby's image, are checked (owner only)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.integration.conftest import SHM, Pair

HARNESS = {"mirror.toml", "agent.log"}  # the test harness's (Host), not mirror's


def too_wide(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            if Path(dirpath) == root and name in HARNESS:
                continue
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            if stat.S_IMODE(st.st_mode) & 0o077:
                out.append(f"{p} {stat.S_IMODE(st.st_mode):04o}")
    mode = stat.S_IMODE(root.stat().st_mode)
    if mode & 0o077:
        out.append(f"{root} {mode:04o}")
    return out


def test_a_pairs_state_files_are_its_owners_only(pair: Pair, pair_name: str) -> None:
    states = [Path(pair.cfg_a.state_dir), Path(pair.cfg_b.state_dir)]
    for state in states:
        state.mkdir(parents=True, exist_ok=True)
        os.chmod(state, 0o755)  # an existing, looser directory
    b = pair.start_secondary()
    a = pair.start_primary()
    pair.wait("protected", lambda: (a.status() or {}).get("protection") == "protected")
    pair.wait("outputs at the observer", lambda: pair.observer.count() > 20)
    shm = sorted(SHM.glob(f"mirror-{pair_name}*"))
    assert shm, "no RAM file or standby image"
    wide = [f"{p} {stat.S_IMODE(p.stat().st_mode):04o}" for p in shm
            if stat.S_IMODE(p.stat().st_mode) & 0o077]  # fmt: skip
    a.stop()
    b.stop()
    for state in states:
        wide += too_wide(state)
    assert not wide, "wider than the owner:\n" + "\n".join(wide)
    for state in states:
        assert (state / "status.json").exists()
    assert "made it 0700" in a.log_path.read_text()
