"""Guest RAM as operators define it, with a real libvirtd per simulated host: a domain on
a shared memfd (no host-wide setting) pairs and goes on on B after host A is killed; a
domain with a virtio balloon pairs, and a change of the balloon's size (`virsh setmem`)
is followed by a compare of all of RAM, with no page missed by the dirty-page log."""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from mirror.guests import image
from mirror.lab import libvirtdemo, qemudemo
from mirror.lab.demo import Host, wait_for
from mirror.lab.netlab import GuestLan
from tests.libvirt.conftest import HostFactory

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(300)]


def test_a_memfd_domain_pairs_and_goes_on_on_b_after_host_a_is_killed(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    """<memoryBacking><source type='memfd'/><access mode='shared'/>: A's primary maps the
    RAM through QEMU's fd of its memfd; B's standby (a memfd too) is filled the same way."""
    base = libvirtdemo.default_base()
    guest = libvirtdemo.LibvirtDemoGuest(backing="memfd")
    r = qemudemo.run(base, guest=guest, image_dir=guest_image, kill_after=2, run_on=2,
                     quiet=True)  # fmt: skip
    assert r["libvirt"]["pair_output"][-1].startswith("web01 is protected by hostB")
    c = r["client"]
    assert r["connection_survived"], c
    assert c["gaps"] == 0 and c["echo_bad"] == 0 and c["echo_ok"] > 0, c
    assert r["primary_summary"]["scan"] == "log", r["primary_summary"]
    assert r["primary_summary"]["log_missed_pages"] == 0
    assert r["promoted_status"]["role"] == "primary"
    assert r["libvirt"]["on_b"]["running"] and r["libvirt"]["on_b"]["persistent"]


@pytest.fixture
def balloon_image(guest_image: Path, tmp_path: Path) -> Path:
    """The demo guest with the kernel's virtio_balloon driver loaded too: a second cpio
    archive appended to its initramfs (the module, and an /init that loads it and leaves
    free memory that is not zero)."""
    import subprocess

    debs = sorted(guest_image.glob("linux-image-*.deb"))
    if not debs:
        pytest.skip("the guest image cache has no kernel package to take virtio_balloon from")
    out = tmp_path / "balloon-image"
    out.mkdir()
    unpacked = tmp_path / "deb"
    unpacked.mkdir()
    subprocess.run(f"dpkg-deb --fsys-tarfile {debs[-1]} | tar -x -C {unpacked} --wildcards "
                   f"'*/virtio_balloon.ko'", shell=True, check=True)  # fmt: skip
    ko = next(unpacked.rglob("virtio_balloon.ko"))
    names = [Path(m).stem for m in image.MODULES] + ["virtio_balloon"]
    # free memory that is not zero (64 MiB of random bytes, freed again): the pages the
    # balloon takes then differ from what a punched hole reads, as on a guest that has run
    init = (image.INIT % {"modules": " ".join(names)}).replace(
        "/bin/guestd ",
        "dd if=/dev/urandom of=/dev/null bs=64M count=1 2>/dev/null\n/bin/guestd ",
        1,
    )
    assert "bs=64M" in init
    extra = image.cpio_newc([("lib/modules/virtio_balloon.ko", 0o100644, ko.read_bytes()),
                             ("init", 0o100755, init.encode())])  # fmt: skip
    initrd = (guest_image / "initramfs.cpio.gz").read_bytes() + gzip.compress(extra, mtime=0)
    (out / "initramfs.cpio.gz").write_bytes(initrd)
    shutil.copyfile(image.kernel(guest_image), out / image.kernel(guest_image).name)
    return out


def test_a_balloon_domain_pairs_and_a_size_change_is_compared_in_full(
    libvirt_host: HostFactory, balloon_image: Path
) -> None:
    """A virtio balloon (what virt-install gives) is accepted.  `virsh setmem` inflates it:
    QEMU punches the pages the guest gave away out of the memfd, which the dirty-page log
    cannot see; mirror notices the size change and compares all of RAM at the next
    checkpoint, so its safety net finds nothing missed, and B goes on after the kill."""
    import libvirt
    import libvirt_qemu

    base = libvirtdemo.default_base()
    root = Path(tempfile.mkdtemp(prefix="mirror-lvtest-"))
    lan = GuestLan()
    # init_on_alloc=0: Debian's kernel zeroes each page it allocates (init_on_alloc=1),
    # the balloon's too, a write the log sees; without it the pages keep their contents
    # until QEMU punches them out, behind the log
    guest = libvirtdemo.LibvirtDemoGuest(backing="memfd", balloon=True,
                                         kernel_args="init_on_alloc=0")  # fmt: skip
    hosts: list[Host] = []
    client = None
    try:
        a, b = guest.start(lan, root, base, balloon_image, "web01", hosts,
                           lambda *_a, **_k: None)  # fmt: skip
        wait_for("protected", lambda: (a.status() or {}).get("phase") == "protected", 120, hosts)
        serial = guest.serial(root)
        wait_for("the service", lambda: "guestd: listening" in serial.read_text(), 120, hosts)
        log = root / "client.jsonl"
        client = qemudemo.start_client(lan, log, connect_for=60)
        connected = lambda: any(e["event"] == "connected" for e in qemudemo.client_events(log))  # noqa: E731
        wait_for("the client", connected, 60, hosts)
        summary = lambda: (a.status() or {}).get("summary", {})  # noqa: E731
        assert summary()["scan"] == "log" and summary()["ram_discards"] == 0, summary()
        dom = guest.hosts["A"].connect().lookupByName(libvirtdemo.DOMAIN)

        def actual() -> int:
            answer = libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-balloon"}', 0)
            return int(json.loads(answer)["return"]["actual"]) >> 20

        assert actual() == 128
        dom.setMemoryFlags(80 << 10, libvirt.VIR_DOMAIN_AFFECT_LIVE)  # KiB
        wait_for("the guest to inflate its balloon", lambda: actual() <= 80, 60, hosts)
        wait_for("a full compare", lambda: summary().get("ram_discards", 0) >= 1, 30, hosts)
        acked = (a.status() or {}).get("acked", 0)
        wait_for("checkpoints after it", lambda: (a.status() or {}).get("acked", 0) > acked + 40,
                 60, hosts)  # fmt: skip
        s = summary()
        # every page the balloon took was sent by the full compare, or found as a hole by
        # the safety net (it went over all of RAM meanwhile) where the balloon moved its
        # pages without a change of size (compaction): none counted as missed by the log
        assert s["log_missed_pages"] == 0 and s["log_losses"] == 0, s
        # and most of the 48 MiB by the compare the size change brought (without it the
        # safety net finds all 12288 pages, a slice per checkpoint)
        assert s["ram_discarded_pages"] < (48 << 8) // 4, s
        assert s["verified_pages"] >= 128 << 8, s
        assert (a.status() or {}).get("phase") == "protected"
        guest.kill_a(a)
        a.proc.wait()
        wait_for("B promoted", lambda: (b.status() or {}).get("role") == "primary", 30, [b])
        n = len(qemudemo.client_events(log))
        wait_for("the client reading from B",
                 lambda: len(qemudemo.client_events(log)) > n + 5, 30, [b])  # fmt: skip
        client.send_signal(signal.SIGTERM)
        client.wait(10)
        done = next(e for e in qemudemo.client_events(log) if e["event"] == "summary")
        assert done.get("error") is None and done["gaps"] == 0, done
    finally:
        qemudemo.stop_all(client, hosts, guest, lan)
        shutil.rmtree(root, ignore_errors=True)

