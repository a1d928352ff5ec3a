"""The dirty-page log on a real QEMU guest (TCG): QEMU loaded with the preload
library hands its userfaultfd to the agent, which registers QEMU's mapping of
guest RAM and scans /proc/QEMU/pagemap.  Ground truth: an exact compare against a
shadow copy in every pause (test-only); a real `mirror secondary` stores the pages."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from mirror.config import Config
from mirror.guests.base import Guest, OutputHandler
from mirror.guests.qemu import QemuGuest, fingerprint
from mirror.guests.synthetic import SHM_DIR
from mirror.replication import dirtylog
from tests.dirtylog_rig import rig
from tests.qemu.conftest import qemu_base

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(600)]


def qemu(cfg: Config, root: Path, on_output: OutputHandler) -> Guest:
    ram = SHM_DIR / f"mirror-dlqemu-{os.getpid()}-{root.name}.ram"
    return QemuGuest.boot(cfg.qemu, cfg.guest.ram_mib, ram, root / "qemu", on_output)


def test_qemu_log_is_a_superset_of_what_changed(guest_image: Path) -> None:
    """1,000 checkpoints of a booting and running QEMU guest: every page that really
    changed is in its checkpoint (none missing), QEMU's log is lost at checkpoint 500
    (its userfaultfd closed) and set up again, and the standby ends equal to RAM."""
    probe = dirtylog.probe()
    if probe is not None:
        pytest.skip(f"no dirty-page log on this kernel: {probe}")
    base = qemu_base(guest_image, ram_mib=128)
    base = replace(base, checkpoint=replace(base.checkpoint, epoch_ms=10))
    with rig(base, qemu, fingerprint="synthetic") as r:
        assert r.engine.method == "log", r.engine.stats.scan_note
        assert isinstance(r.guest, QemuGuest) and r.guest.log_blockers() == []
        assert fingerprint(base.qemu, 128).startswith("qemu ")

        def drop(i: int) -> None:
            if i == 500:
                assert r.engine.log is not None
                r.engine.log.drop()

        r.run(1000, 2, between=drop)
        st = r.engine.stats
        assert r.missing == {}, f"pages changed but not sent: {r.missing}"
        assert r.changed_total > 1000  # the guest really wrote: not a vacuous pass
        assert st.log_losses == 1 and r.engine.log_state == "ok"
        assert st.log_missed_pages == 0
        assert r.image_differs() == []
