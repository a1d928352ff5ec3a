"""What the role needs of a kind of guest, in one place: boot it, keep a ready standby,
promote the standby from a checkpoint, and where its released outputs go.

- synthetic: outputs go to the observer (TCP, `output.observer`), which can say
  where it is (``at <seq>``);
- qemu: outputs are Ethernet frames, released into this host's network through
  the guest's TAP device; after a failover the resumed guest's TCP peers resend
  what they lack, and committed frames the dead primary may not have released
  are sent again (Ethernet may duplicate; TCP drops what it has);
- libvirt: a domain libvirt runs (mirror/guests/libvirt.py): the primary attaches to the
  running domain, the secondary keeps a paused standby domain; outputs are the frames of
  its NICs as defined, held and released by a gate on each tap
  (mirror/replication/nicgate.py), or the NIC relay of a ``type='server'`` NIC.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mirror.config import (
    Config,
    DiskConfig,
    GuestConfig,
    LibvirtConfig,
    LinkConfig,
    NodeConfig,
    OutputConfig,
    PairConfig,
    QemuConfig,
)
from mirror.guests.base import Guest, GuestError, GuestOutput, OutputHandler
from mirror.guests.synthetic import SHM_DIR, GuestProcess, SyntheticGuest, SyntheticParams
from mirror.replication.disk import DiskError, DiskSpec, ReplicatedDisk

log = logging.getLogger("mirror.ha.backend")


class OutputSink(Protocol):
    """Where released outputs go."""

    position: int | None  # the receiver's last seq, if it told (None: unknown)

    def __call__(self, outputs: list[GuestOutput]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class GuestSettings:
    """The sections of the configuration a guest backend reads (never [checkpoint],
    [arbiter], [keys] or [metrics]): the guest, its kind's section, its disk, where its
    outputs go; the pair's and node's names and state directory for its files; and
    ``link.host``, where a replica's disk stream listens."""

    pair: PairConfig
    node: NodeConfig
    link: LinkConfig
    guest: GuestConfig
    output: OutputConfig
    qemu: QemuConfig
    libvirt: LibvirtConfig
    disk: DiskConfig
    state_dir: Path
    disk_image: Path


class Backend(ABC):
    def __init__(self, cfg: GuestSettings) -> None:
        self.cfg = cfg
        # the pair's generation (the arbiter's) a disk server starts in; the role sets it
        # before boot/ready, and each pairing hands the disk server the current one
        self.generation = cfg.pair.generation

    def ram_path(self) -> Path:
        cfg = self.cfg
        return SHM_DIR / f"mirror-{cfg.pair.name}-{cfg.node.name}-{os.getpid()}.ram"

    @abstractmethod
    def fingerprint(self) -> str:
        """What the two hosts of a pair must agree on (checked at pairing)."""

    @abstractmethod
    def boot(self, on_output: OutputHandler) -> Guest:
        """A new guest, paused until resume()."""

    @abstractmethod
    def sink(self, guest: Any) -> OutputSink:
        """Where released outputs of ``guest`` (or of a ready standby) go."""

    @abstractmethod
    def ready(self, image: Path) -> Any:
        """The ready standby of a secondary whose RAM image is ``image``."""

    @abstractmethod
    def launch(self, ready: Any, image: Path, state: Path, on_output: OutputHandler) -> Guest:
        """Promotion: the ready standby goes on from the image and the device state."""

    @abstractmethod
    def discard(self, ready: Any) -> None:
        """A ready standby that was not promoted."""


class SyntheticBackend(Backend):
    def fingerprint(self) -> str:
        return "synthetic"

    def boot(self, on_output: OutputHandler) -> Guest:
        params = SyntheticParams.from_config(self.cfg.guest)
        return SyntheticGuest.boot(params, self.ram_path(), on_output)

    def sink(self, guest: Any) -> OutputSink:
        from mirror.replication.outputs import ObserverSink

        return ObserverSink(*self.cfg.output.address())

    def ready(self, image: Path) -> Any:
        return GuestProcess.spawn()

    def launch(self, ready: Any, image: Path, state: Path, on_output: OutputHandler) -> Guest:
        return SyntheticGuest.launch_from(
            image, state.read_bytes(), on_output, owns_ram=True, process=ready
        )

    def discard(self, ready: Any) -> None:
        ready.close()


class _RelaySink:
    """The NIC relay as an output sink (the guest owns and closes the relay)."""

    def __init__(self, guest: Any) -> None:
        self.relay = guest.relay
        self.position: int | None = None  # a network does not say where it is

    def __call__(self, outputs: list[GuestOutput]) -> None:
        self.relay.release(outputs)

    def close(self) -> None:
        pass


class _GuestSink:
    """The guest's own release (a libvirt domain: its NICs' gates, or its relay)."""

    def __init__(self, guest: Any) -> None:
        self.guest = guest
        self.position: int | None = None  # a network does not say where it is

    def __call__(self, outputs: list[GuestOutput]) -> None:
        self.guest.release(outputs)

    def close(self) -> None:
        pass


def _gates(nics: list[tuple[str, str, str]], on_output: OutputHandler) -> Any:
    """Output commit on a libvirt domain's own taps, installed (all NICs or none)."""
    from mirror.replication.nicgate import GateSet, Nic, NicGateError

    try:
        return GateSet([Nic(*n) for n in nics], on_output).install()
    except NicGateError as e:
        raise GuestError(f"cannot hold the guest's frames on its NICs: {e}") from None


def _disk_server(
    cfg: GuestSettings, generation: int, image: Path, size: int, *, replica: bool,
    meta: Path | None = None,
) -> ReplicatedDisk:  # fmt: skip
    """A disk server on ``image`` (``size`` bytes): the primary's, or (``replica``) the
    secondary's, receiving the stream on ``link.host:disk.port``."""
    # tests: copies of the disk at each barrier (primary) and at promotion (replica)
    snapshots = os.environ.get("MIRROR_DISK_TEST_SNAPSHOTS")
    host = cfg.link.host
    spec = DiskSpec(
        image,
        size,
        cfg.state_dir / "disk",
        cfg.pair.name,
        generation=max(1, generation),
        workers=cfg.disk.workers,
        stall_ms=cfg.disk.stall_ms,
        probe_ms=cfg.disk.probe_ms,
        hang_ms=cfg.disk.hang_ms,
        listen=f"{f'[{host}]' if ':' in host else host}:{cfg.disk.port}" if replica else "",
        journal=cfg.state_dir / "disk" / "journal" if replica else None,
        journal_bytes=cfg.disk.journal_mib << 20,
        meta=meta,
        snapshots=Path(snapshots) if snapshots else None,
        keep=16,
    )
    try:
        return ReplicatedDisk(spec)
    except DiskError as e:
        raise GuestError(f"the guest's disk {image}: {e}") from e


class QemuBackend(Backend):
    def __init__(self, cfg: GuestSettings) -> None:
        super().__init__(cfg)
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        from mirror.guests import qemu

        if self._fingerprint is None:
            self._fingerprint = qemu.fingerprint(
                self.cfg.qemu, self.cfg.guest.ram_mib, self.cfg.disk.size_mib
            )
        return self._fingerprint

    def disk_server(self, *, replica: bool) -> ReplicatedDisk | None:
        """This host's disk server: the primary's on its image, or the secondary's replica
        receiving the stream on ``link.host:disk.port``.  None: the guest has no disk."""
        cfg = self.cfg
        if not cfg.disk.size_mib:
            return None
        return _disk_server(cfg, self.generation, cfg.disk_image, cfg.disk.size_mib << 20,
                            replica=replica)  # fmt: skip

    def boot(self, on_output: OutputHandler) -> Guest:
        from mirror.guests.qemu import QemuGuest

        cfg = self.cfg
        disk = self.disk_server(replica=False)
        try:
            return QemuGuest.boot(
                cfg.qemu, cfg.guest.ram_mib, self.ram_path(), cfg.state_dir / "qemu", on_output,
                disk,
            )  # fmt: skip
        except BaseException:
            if disk is not None:
                disk.close()
            raise

    def sink(self, guest: Any) -> OutputSink:
        return _RelaySink(guest)

    def ready(self, image: Path) -> Any:
        from mirror.guests.qemu import QemuGuest

        cfg = self.cfg
        disk = self.disk_server(replica=True)
        try:
            return QemuGuest.ready(cfg.qemu, cfg.guest.ram_mib, image, cfg.state_dir / "qemu", disk)
        except BaseException:
            if disk is not None:
                disk.close()
            raise

    def launch(self, ready: Any, image: Path, state: Path, on_output: OutputHandler) -> Guest:
        _promote_disk(ready)
        ready.go_on_from(state, on_output)
        return ready  # type: ignore[no-any-return]

    def discard(self, ready: Any) -> None:
        ready.stop()


class LibvirtBackend(Backend):
    def __init__(self, cfg: GuestSettings) -> None:
        super().__init__(cfg)
        self._fingerprint: str | None = None
        self._xml: str | None = None  # the attached domain's live XML (primary)

    def fingerprint(self) -> str:
        from mirror.guests import libvirt as lv
        from mirror.guests.libvirtxml import fingerprint_of

        if self._fingerprint is None:
            s = self.cfg.libvirt
            conn = lv.open_conn(s.connect)
            try:
                xml = self._xml if self._xml is not None else self._standby_source(conn)
                self._fingerprint = fingerprint_of(xml, conn)
            finally:
                conn.close()
        return self._fingerprint

    def _standby_source(self, conn: Any) -> str:
        s = self.cfg.libvirt
        if s.standby_xml:
            try:
                return Path(s.standby_xml).read_text()
            except OSError as e:
                raise GuestError(f"[libvirt] standby_xml {s.standby_xml}: {e.strerror}") from None
        try:
            return str(conn.lookupByName(s.domain).XMLDesc(2))  # VIR_DOMAIN_XML_INACTIVE
        except Exception:
            raise GuestError(
                f"no domain {s.domain!r} defined at {s.connect} and no [libvirt] standby_xml"
            ) from None

    def _domain_disk(self, xml: str, *, replica: bool) -> ReplicatedDisk | None:
        """The disk server of the domain's one writable disk (None: it has none): on the
        primary on the image itself, on the secondary on its replica at the same path
        (this host's file); the export's size as the host agent set it for both."""
        from mirror.guests import libvirtdisk

        s = self.cfg.libvirt
        d = libvirtdisk.the_disk(xml, s.domain)
        if d is None:
            return None
        size = s.disk_bytes
        if not replica:
            need = libvirtdisk.export_size(d)  # (and refuses what cannot be replicated)
            size = size or need
            if os.stat(d.path).st_size > size:
                raise GuestError(f"the disk {d.target} ({d.path}) is larger than its export "
                                 f"({size} bytes): pair the domain again")  # fmt: skip
            libvirtdisk.grow(d.path, size)
        elif not size:
            raise GuestError(f"the standby of {s.domain!r} has a disk but no [libvirt] "
                             f"disk_bytes: pair it through the host agents")  # fmt: skip
        new = replica and not os.path.exists(d.path)
        if new:  # the replica at the path the XML names, in this host's file system
            try:
                os.makedirs(os.path.dirname(d.path), mode=0o711, exist_ok=True)
            except OSError as e:
                raise GuestError(f"cannot make the directory of the disk's replica {d.path}: "
                                 f"{e.strerror}") from None  # fmt: skip
        if replica and not new:
            libvirtdisk.grow(d.path, size)
        meta = self.cfg.state_dir / "disk-replica-id"
        disk = _disk_server(self.cfg, self.generation, Path(d.path), size, replica=replica,
                            meta=meta)  # fmt: skip
        try:
            if new and d.fmt == "qcow2":  # the standby's QEMU reads a header at its start
                libvirtdisk.placeholder(d.path, str(self.cfg.state_dir),
                                        s.disk_virtual or size)  # fmt: skip
        except BaseException:
            disk.close()
            raise
        return disk

    def boot(self, on_output: OutputHandler) -> Guest:
        from mirror.guests.libvirt import LibvirtGuest

        g = LibvirtGuest.attach(
            self.cfg.libvirt, self.cfg.guest.ram_mib, on_output, _gates,
            disk=lambda xml: self._domain_disk(xml, replica=False),
        )  # fmt: skip
        self._xml = g.xml
        return g

    def sink(self, guest: Any) -> OutputSink:
        return _GuestSink(guest)

    def ready(self, image: Path) -> Any:
        from mirror.guests.libvirt import LibvirtGuest

        return LibvirtGuest.ready(
            self.cfg.libvirt, self.cfg.guest.ram_mib, _gates,
            disk=lambda xml: self._domain_disk(xml, replica=True),
        )  # fmt: skip

    def launch(self, ready: Any, image: Path, state: Path, on_output: OutputHandler) -> Guest:
        _promote_disk(ready)
        ready.go_on_from(image, state.read_bytes(), on_output)
        # the domain runs on its own RAM file now (a copy): the image's memory goes back
        # when the standby unmaps it (the qemu backend's guest runs on the image itself)
        image.unlink(missing_ok=True)
        return ready  # type: ignore[no-any-return]

    def discard(self, ready: Any) -> None:
        ready.stop()


def _promote_disk(ready: Any) -> None:
    """The replica drops every uncommitted epoch and serves writes (before the guest
    runs on it)."""
    if ready.disk is None:
        return
    try:
        committed, dropped = ready.disk.promote()
    except DiskError as e:
        raise GuestError(f"cannot promote the disk replica: {e}") from e
    log.info("disk replica promoted at checkpoint %d (%d dropped)", committed, dropped)


def backend_for(cfg: Config) -> Backend:
    """The backend of ``cfg``'s guest kind, given the sections it reads."""
    kinds: dict[str, type[Backend]] = {
        "synthetic": SyntheticBackend, "qemu": QemuBackend, "libvirt": LibvirtBackend,
    }  # fmt: skip
    settings = GuestSettings(
        cfg.pair, cfg.node, cfg.link, cfg.guest, cfg.output, cfg.qemu, cfg.libvirt, cfg.disk,
        cfg.state_dir, cfg.disk_image,
    )  # fmt: skip
    return kinds[cfg.guest.kind](settings)
