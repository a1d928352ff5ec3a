"""libvirt guests: mirror protects a domain that libvirt runs (../shared LIBVIRT-NOTES).

The primary ATTACHES to the running domain (it does not boot it):

- RAM: a shared memfd (``<memoryBacking><source type='memfd'/><access mode='shared'/>``,
  mapped through QEMU's fd of it) or a shared file (``<source type='file'/>``), found
  through QMP and /proc, never guessed (mirror/guests/libvirtram.py);
- a virtio balloon: its size is read after each checkpoint (``ram_discarded``): QEMU
  punches the pages it takes out of the RAM behind the dirty-page log, so after a
  change the next checkpoint compares all of RAM;
- QMP: through libvirt (``qemuMonitorCommand``, untainted) or through a monitor socket of
  mirror's own that the domain's XML adds (``<qemu:commandline>`` ``-qmp unix:PATH``):
  ``[libvirt] qmp`` picks (bench/libvirt_pause.py measures both);
- device state: ``xen-save-devices-state`` into a memfd of the role passed with
  ``add-fd`` (libvirt's seccomp forbids ``exec:``; AppArmor would forbid paths);
- the NICs as the domain defines them (``<interface type='bridge'>`` or
  ``type='network'``, any model): every one is held by a gate on the host side of its
  tap (mirror/replication/nicgate.py, made by the backend: ``gates``), the domain's XML
  untouched; a libvirtd restart leaves the gate in place (libvirtd does not touch tc on
  a running domain's tap).  Or, as before, one ``<interface type='server'>``
  (``-netdev socket,listen=``): the role's NetRelay dials it, holds the guest's frames
  and releases them to a TAP device of its own on ``[libvirt] bridge``;
- autostart of the domain is turned off: this host's definition must never boot the
  guest again behind the pair's back.

The secondary runs the standby: a transient domain of the same definition, started
paused with ``-incoming defer``.  Promotion copies the standby image into the domain's
RAM (its file, or its memfd through QEMU's fd), passes a pipe with ``getfd``,
``migrate-incoming fd:``, feeds it the device state, resumes through libvirt,
``announce-self``, and defines the domain persistent on this host.

The dirty-page log needs a userfaultfd made inside QEMU: the standby domains mirror
defines carry the preload library (``<qemu:env>``); a domain attached as it is has the
log only if its XML has it too (``mirror pair --prepare`` writes it), otherwise the primary
scans (hashed scan).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import mmap
import os
import select
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol

from mirror.config import LibvirtConfig
from mirror.guests import libvirtdisk, libvirtram, uffd
from mirror.guests.base import Guest, GuestError, GuestOutput, LogSource, OutputHandler
from mirror.guests.disk import DiskServer
from mirror.guests.libvirtqmp import LibvirtMonitor, Monitor, SocketMonitor
from mirror.guests.libvirtxml import (
    gated_nics,
    persistent_xml,
    server_nic,
    standby_xml,
    uses_server_nic,
)
from mirror.guests.libvirtxml import qmp_socket_in as qmp_socket_in  # (ha/hostagent.py)
from mirror.guests.procram import ProcessRam
from mirror.guests.qemu import NetRelay

log = logging.getLogger("mirror.guests.libvirt")


class Gates(Protocol):
    """Output commit on the domain's own taps (replication/nicgate.py's GateSet): holds
    every frame the guest sends (to ``on_output``) once installed."""

    on_output: OutputHandler

    def drain(self) -> None: ...

    def release(self, outputs: list[GuestOutput]) -> None: ...

    def remove(self) -> None: ...

    def faults(self) -> list[str]: ...


# the gates on (tap, bridge, mac) of each NIC, in order, installed (all or none)
GatesFactory = Callable[[list[tuple[str, str, str]], OutputHandler], Gates]
# the disk server of the domain's one writable disk, from its XML (None: no disk)
DiskFactory = Callable[[str], "DiskServer | None"]


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as e:
        raise GuestError(f"libvirt-python is not installed ({e}): run scripts/setup") from e
    # libvirt prints every error to stderr by default; mirror reports the ones that matter
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    return libvirt


def open_conn(uri: str) -> Any:
    libvirt = _libvirt()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise GuestError(
            f"cannot connect to libvirt at {uri!r}: {e}; is libvirtd running? "
            f"(set [libvirt] connect)"
        ) from None


@contextlib.contextmanager
def _running(uri: str, name: str) -> Iterator[tuple[Any, Monitor] | None]:
    """The running domain ``name`` at ``uri`` and QMP through libvirt to it (None: no
    such domain, or it does not run); the connection closed after."""
    libvirt = _libvirt()
    conn = open_conn(uri)
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            yield None
            return
        yield (dom, LibvirtMonitor(lambda what, fn, *_: fn(dom))) if dom.isActive() else None
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def live_probe(uri: str, name: str) -> list[str]:
    """What stops pairing the running domain ``name`` live (``mirror pair --live --check``),
    tried on it with nothing left behind: its QEMU found, its RAM found (private RAM read
    from QEMU's process: its first and last page), a userfaultfd made inside QEMU and
    closed at once.  Empty: nothing stops it."""
    libvirt = _libvirt()
    with _running(uri, name) as found:
        if found is None:
            return [f"{name} is not running at {uri}"]
        _dom, monitor = found
        try:
            pid = libvirtram.qemu_pid(monitor, name)
            ram = libvirtram.find_ram(monitor, pid, name, private_ok=True)
            if ram.backing == "private":
                ProcessRam(pid, ram.address, ram.size, f"domain {name!r}'s RAM")
            if not libvirtram.has_preload(pid):
                os.close(uffd.inject(pid))
        except (GuestError, libvirt.libvirtError) as e:
            return [str(e)]
        return []


def disk_back(uri: str, name: str) -> bool:
    """The running domain ``name``'s disk given back to libvirt's own file node, off the
    NBD node a role that died left below its format node (its disk server serves on until
    then: it exits once QEMU lets go); what `unpair` does with the role alive.  False if
    there was nothing to give back."""
    with _running(uri, name) as found:
        if found is None:
            return False
        dom, monitor = found
        if not libvirtdisk.ours(monitor):
            return False
        disk = libvirtdisk.the_disk(dom.XMLDesc(0), name)
        if disk is None:
            return False
        pid = libvirtram.qemu_pid(monitor, name)
        libvirtdisk.restore(monitor, libvirtdisk.format_node(monitor, pid, disk, name), disk.path)
        log.warning("domain %s: its disk is on libvirt's own file node again (a role that died "
                    "had it on mirror's disk server)", name)  # fmt: skip
        return True


# ---- the guest ----------------------------------------------------------------------


def _copy(src: int, dst: int, size: int, what: str) -> None:
    """``size`` bytes from the start of ``src`` to the start of ``dst``, in the kernel:
    copy_file_range, or sendfile where the two are on different filesystems (a memfd is
    on the kernel's internal tmpfs, the image on /dev/shm: EXDEV)."""
    n = 0
    while n < size:
        try:
            k = os.copy_file_range(src, dst, size - n, n, n)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP) or n:
                raise GuestError(f"{what}: {e.strerror}") from None
            break
        if k <= 0:
            raise GuestError(f"{what}: short copy")
        n += k
    os.lseek(dst, n, os.SEEK_SET)
    while n < size:
        try:
            k = os.sendfile(dst, src, n, size - n)
        except OSError as e:
            raise GuestError(f"{what}: {e.strerror}") from None
        if k <= 0:
            raise GuestError(f"{what}: short copy")
        n += k


class LibvirtGuest(Guest):
    kind: ClassVar[str] = "libvirt"

    def __init__(
        self, settings: LibvirtConfig, ram_mib: int, conn: Any, dom: Any, *, standby: bool,
        gates: GatesFactory | None = None,
    ) -> None:
        self.settings, self.ram_mib, self.conn, self.dom = settings, ram_mib, conn, dom
        self.name = dom.name()
        self.disk: DiskServer | None = None
        self._disk_opts: dict[str, Any] | None = None  # its format node, while through mirror
        self._disk_path = ""
        self.standby = standby
        self.monitor: Monitor | None = None
        self.relay: NetRelay | None = None
        self.gates: Gates | None = None
        self._early: list[GuestOutput] = []  # frames held before protection (attach)
        self._map: mmap.mmap | None = None
        self._proc: ProcessRam | None = None  # private RAM (paired live): read from QEMU
        self._saving: concurrent.futures.Future[Any] | None = None
        self._state_fd = self._state_wfd = -1
        self._fdset = -1
        self._pidfd = -1
        self._announce = False
        self._resume_via_libvirt = False
        self._stopped = False
        # the throttle: the domain's live (vcpu_period, vcpu_quota) before mirror set one
        self._quota: tuple[int, int] | None = None
        try:
            xml = dom.XMLDesc(0)
            self.xml = xml
            self._has_balloon = any(
                b.get("model") != "none" for b in ET.fromstring(xml).iter("memballoon")
            )
            self._balloon: int | None = None  # its size as last seen (the primary's)
            if settings.qmp == "socket":
                path = settings.qmp_socket or qmp_socket_in(xml)
                if not path:
                    raise GuestError(
                        f'[libvirt] qmp = "socket" but domain {self.name!r} has no '
                        f"<qemu:commandline> -qmp unix:PATH,server=on,wait=off: add one, or "
                        f'set qmp = "libvirt"'
                    )
                self.monitor = SocketMonitor(path)
            else:
                self.monitor = LibvirtMonitor(self.call)
            self.pid = libvirtram.qemu_pid(self.monitor, self.name)
            self._pidfd = os.pidfd_open(self.pid)
            ram = libvirtram.find_ram(self.monitor, self.pid, self.name,
                                      private_ok=settings.private_ram and not standby)
            self._ram_path, self.backing = ram.path, ram.backing
            size = ram_mib << 20
            if ram.size != size:
                raise GuestError(
                    f"domain {self.name!r} has {ram.size >> 20} MiB of RAM but "
                    f"guest.ram_mib = {ram_mib}: make them agree"
                )
            if ram.backing == "private":  # paired live: read from QEMU, never mapped
                self._proc = ProcessRam(self.pid, ram.address, size,
                                        f"domain {self.name!r}'s RAM")  # fmt: skip
            else:
                fd = os.open(self._ram_path, os.O_RDWR)
                try:
                    if os.fstat(fd).st_size != size:
                        raise GuestError(
                            f"domain {self.name!r}: its RAM file is {os.fstat(fd).st_size} "
                            f"bytes, not guest.ram_mib = {ram_mib} MiB"
                        )
                    self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
                finally:
                    os.close(fd)
            if uses_server_nic(xml):
                addr = server_nic(xml, self.name)
                self.relay = NetRelay(
                    Path("/nonexistent"), settings.tap, settings.bridge, active=not standby,
                    connect=addr,
                )  # fmt: skip
                self.relay.dial()
            else:
                nics = gated_nics(xml, self.name)
                if nics:
                    if gates is None:
                        raise GuestError(f"domain {self.name!r}: no gate for its NICs")
                    # from here on every frame the guest sends is held
                    self.gates = gates(nics, self._early.append)
            if not standby:
                self._state_channel()
        except BaseException:
            self.stop(destroy=standby)
            raise

    def _state_channel(self) -> None:
        """Where QEMU saves the device state at each checkpoint: a memfd of this process,
        passed to QEMU once (``add-fd``); a primary's (and a promoted standby's)."""
        assert self.monitor is not None
        self._state_fd = os.memfd_create(f"mirror-devstate-{self.name}")
        # QEMU's copy shares this description's offset: lseek here, write there
        self._state_wfd = os.open(f"/proc/self/fd/{self._state_fd}", os.O_WRONLY)
        self._fdset = self.monitor.execute("add-fd", {}, fd=self._state_wfd)["fdset-id"]

    def call(self, what: str, fn: Any, reconnect_for: float = 60) -> Any:
        """``fn(domain)``; if libvirtd restarted meanwhile (the connection broke), once
        more on a new connection.  GuestError saying ``what`` failed otherwise."""
        libvirt = _libvirt()
        try:
            return fn(self.dom)
        except libvirt.libvirtError as e:
            try:
                self.conn.getVersion()
                raise GuestError(f"{what}: {e}") from None  # libvirt is there: a real error
            except libvirt.libvirtError:
                pass
        deadline = time.monotonic() + reconnect_for
        while True:
            with contextlib.suppress(Exception):
                self.conn.close()
            try:
                self.conn = libvirt.open(self.settings.connect)
                self.dom = self.conn.lookupByName(self.name)
                break
            except libvirt.libvirtError as e:
                if time.monotonic() > deadline:
                    raise GuestError(f"{what}: libvirt at {self.settings.connect}: {e}") from None
                time.sleep(0.1)
        try:
            return fn(self.dom)
        except libvirt.libvirtError as e:
            raise GuestError(f"{what}: {e}") from None

    # -- the two ways in ------------------------------------------------------------

    @classmethod
    def attach(
        cls, settings: LibvirtConfig, ram_mib: int, on_output: OutputHandler,
        gates: GatesFactory | None = None,
        disk: DiskFactory | None = None,
    ) -> LibvirtGuest:
        """The primary: the RUNNING domain ``settings.domain``, paused until resume()."""
        libvirt = _libvirt()
        conn = open_conn(settings.connect)
        try:
            dom = conn.lookupByName(settings.domain)
        except libvirt.libvirtError:
            raise GuestError(
                f"no domain {settings.domain!r} at {settings.connect}: check [libvirt] domain"
            ) from None
        if not dom.isActive():
            raise GuestError(
                f"domain {settings.domain!r} is not running: start it (virsh start "
                f"{settings.domain}); mirror attaches to a running domain"
            )
        g = cls(settings, ram_mib, conn, dom, standby=False, gates=gates)  # refuses first
        try:
            # this host's definition must never boot the guest behind the pair's back
            g.call(
                f"turning autostart of {g.name!r} off",
                lambda d: d.setAutostart(0) if d.isPersistent() and d.autostart() else None,
            )
            if g.relay is not None:
                g.relay.on_output = on_output
            if disk is not None:
                g.disk = disk(g.xml)
                g._disk_through()  # every write of the guest's disk, from here on
            g.command("stop")  # the pre-copy first; resume() lets it run
            if g.relay is not None:
                g.relay.drain()
            if g.gates is not None:
                # what it sent before this pause was never protected: it goes out now
                g.gates.drain()
                g.gates.release(g._early)
                g._early.clear()
                g.gates.on_output = on_output
            g._balloon = g._balloon_now()
        except BaseException:
            g.stop(destroy=False)
            raise
        return g

    @classmethod
    def ready(
        cls,
        settings: LibvirtConfig,
        ram_mib: int,
        gates: GatesFactory | None = None,
        disk: DiskFactory | None = None,
    ) -> LibvirtGuest:
        """The secondary's standby: a transient paused domain waiting for its state, its
        NICs' gates on already (a paused QEMU sends nothing; promotion releases the
        committed frames through them before the guest runs)."""
        libvirt = _libvirt()
        conn = open_conn(settings.connect)
        if settings.standby_xml:
            try:
                xml = Path(settings.standby_xml).read_text()
            except OSError as e:
                raise GuestError(
                    f"[libvirt] standby_xml {settings.standby_xml}: {e.strerror}"
                ) from None
        else:
            try:
                dom = conn.lookupByName(settings.domain)
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            except libvirt.libvirtError:
                raise GuestError(
                    f"no domain {settings.domain!r} defined at {settings.connect} and no "
                    f"[libvirt] standby_xml: define it here, or give its XML"
                ) from None
        # the replica's server first: the standby's QEMU opens the disk's file at its start
        server = disk(xml) if disk is not None else None
        try:
            try:
                dom = conn.createXML(standby_xml(xml), libvirt.VIR_DOMAIN_START_PAUSED)
            except (libvirt.libvirtError, ET.ParseError) as e:
                raise GuestError(
                    f"cannot start the standby domain {settings.domain!r}: {e}"
                ) from None
            g = cls(settings, ram_mib, conn, dom, standby=True, gates=gates)
        except BaseException:
            if server is not None:
                server.close()
            raise
        g.disk = server
        return g

    def _disk_through(self) -> None:
        """The disk's file through this host's disk server, below QEMU's format node
        (mirror/guests/libvirtdisk.py); nothing without a disk server."""
        if self.disk is None:
            return
        assert self.monitor is not None
        d = libvirtdisk.the_disk(self.call("the domain's XML", lambda dom: dom.XMLDesc(0)),
                                 self.name)  # fmt: skip
        if d is None:
            raise GuestError(f"domain {self.name!r} has no disk for its disk server")
        opts = libvirtdisk.format_node(self.monitor, self.pid, d, self.name)
        libvirtdisk.through(self.monitor, opts, self.disk.spec.nbd_path)
        self._disk_opts, self._disk_path = opts, d.path
        log.info("domain %s: its disk %s (%s) goes through mirror's disk server", self.name,
                 d.target, d.path)  # fmt: skip

    def _disk_back(self) -> None:
        """The disk's format node on libvirt's own file node again (the guest runs on)."""
        if self._disk_opts is None or self.monitor is None or not self.alive:
            return
        opts, self._disk_opts = self._disk_opts, None
        try:
            libvirtdisk.restore(self.monitor, opts, self._disk_path)
        except GuestError as e:
            log.error(
                "domain %s: its disk stays on mirror's disk server, which stops: %s "
                "(the guest's disk I/O fails until it is restarted)",
                self.name,
                e,
            )

    def go_on_from(self, image: Path, state: bytes, on_output: OutputHandler) -> None:
        """Promotion: the committed image into the domain's RAM, the device state into
        QEMU through a passed pipe, then (at resume) run."""
        assert self.monitor is not None and self._map is not None
        if self.relay is not None:
            self.relay.on_output = on_output
        if self.gates is not None:
            if self._early:  # a paused standby sends nothing; counted if it did
                log.warning("domain %s: %d frame(s) of the standby dropped", self.name,
                            len(self._early))  # fmt: skip
                self._early.clear()
            self.gates.on_output = on_output
        with open(image, "rb") as f:  # in-kernel copy: tmpfs to tmpfs (or to QEMU's memfd)
            fd = os.open(self._ram_path, os.O_WRONLY)
            try:
                _copy(f.fileno(), fd, len(self._map), f"copying {image} into {self._ram_path}")
            finally:
                os.close(fd)
        r, w = os.pipe()
        try:
            self.monitor.execute("getfd", {"fdname": "mirror-state"}, fd=r)
        finally:
            os.close(r)
        writer = threading.Thread(target=self._feed, args=(w, state), daemon=True)
        writer.start()
        self.monitor.execute("migrate-incoming", {"uri": "fd:mirror-state"})
        deadline = time.monotonic() + 30
        while True:
            st = self.monitor.execute("query-migrate").get("status")
            if st == "completed":
                break
            if st in ("failed", "cancelled") or time.monotonic() > deadline:
                raise GuestError(f"loading the device state into {self.name!r}: migration {st}")
            time.sleep(0.002)
        writer.join(5)
        # the promoted replica's server serves the disk from here on (what the guest writes
        # is what a resync of the old primary sends)
        self._disk_through()
        if self._state_fd < 0:  # checkpoints of its own once its old primary is back
            self._state_channel()
        self._balloon = self._balloon_now()  # as the checkpoint left it, before it runs
        if self.relay is not None:
            self.relay.active = True
        self.standby = False
        self._announce = self._resume_via_libvirt = True
        # this host's definition now (persistent): the definition the operator gave (the
        # one the peer sent), autostart as it was before pairing; none of the standby's
        try:
            given = Path(self.settings.standby_xml).read_text() if self.settings.standby_xml else ""
        except OSError as e:  # (gone meanwhile) the running definition, without the standby's
            log.warning("domain %s: [libvirt] standby_xml: %s", self.name, e.strerror)
            given = ""
        if not given:
            given = persistent_xml(self.call("the domain's XML", lambda dom: dom.XMLDesc(0)))
        defined = self.call(
            f"defining the promoted domain {self.name!r} here",
            lambda dom: dom.connect().defineXML(given),
        )
        if self.settings.autostart:
            self.call(f"turning autostart of {self.name!r} on", lambda dom: defined.setAutostart(1))

    @staticmethod
    def _feed(w: int, state: bytes) -> None:
        try:
            view = memoryview(state)
            while view:
                view = view[os.write(w, view) :]
        except OSError:
            pass
        finally:
            os.close(w)

    # -- the Guest interface --------------------------------------------------------

    def command(self, name: str, **args: Any) -> Any:
        if self.monitor is None:
            raise GuestError(f"QMP {name}: no monitor")
        return self.monitor.execute(name, args or None)

    @property
    def ram(self) -> mmap.mmap | ProcessRam:  # type: ignore[override]
        if self._proc is not None:
            return self._proc
        assert self._map is not None
        return self._map

    @property
    def ram_path(self) -> Path:
        return self._ram_path

    @property
    def alive(self) -> bool:
        if self._pidfd < 0:
            return False
        r, _, _ = select.select([self._pidfd], [], [], 0)
        return not r

    def end_reason(self, wait: float = 5.0) -> str | None:
        """None while QEMU runs; else how the domain ended, as libvirt says it (it learns
        of a killed QEMU a second or two late: waits up to ``wait`` s): "shutdown" (the
        guest powered off, or QEMU was told to quit: NOT a host failure, the standby
        must not bring it back), "destroyed" (someone stopped it through libvirt),
        "crashed", or "unknown" (libvirt cannot say; a transient domain that stopped is
        gone from libvirt with its state)."""
        if self.alive:
            return None
        libvirt = _libvirt()
        reasons = {
            libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown",
            libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
            libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed",
            libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "crashed",
        }
        deadline = time.monotonic() + wait
        while True:
            try:
                state, reason = self.call("the domain's state", lambda d: d.state(), 2)
            except GuestError:
                return "unknown"
            if state == libvirt.VIR_DOMAIN_SHUTOFF:
                return reasons.get(reason, "unknown")
            if state == libvirt.VIR_DOMAIN_CRASHED:
                return "crashed"
            if time.monotonic() > deadline:
                return "unknown"
            time.sleep(0.05)

    def log_source(self) -> LogSource | None:
        try:  # the preload library hands out userfaultfds where QEMU's env says
            env = Path(f"/proc/{self.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return None
        for kv in env:
            if kv.startswith(uffd.ENV_SOCK.encode() + b"="):
                return LogSource(self.pid, kv.split(b"=", 1)[1].decode())
        if self.settings.private_ram:  # paired live, no preload: made inside QEMU
            return LogSource(self.pid, "")
        return None

    def _balloon_size(self) -> int | None:
        """The balloon's size as QEMU has it now (None: the domain has no balloon)."""
        if not self._has_balloon:
            return None
        assert self.monitor is not None
        return int(self.monitor.execute("query-balloon")["actual"])

    def _balloon_now(self) -> int | None:
        """The size to watch from (None if unknown: the first look compares all of RAM);
        never an error on the way to running the guest (attaching, promoting)."""
        try:
            return self._balloon_size()
        except GuestError as e:
            log.warning("domain %s: the balloon's size is unknown (%s)", self.name, e)
            return None

    def ram_discarded(self) -> bool:
        """Pages a balloon takes are discarded by QEMU (a hole punched in the RAM file or
        memfd) without a write the dirty-page log sees.  Its size is watched (QMP
        ``query-balloon`` after each checkpoint; QMP's BALLOON_CHANGE event is rate-limited
        to one a second): a change means a full compare of RAM at the next checkpoint.
        Free page reporting, which discards without a change of size, is refused
        (log_blockers; domaincheck)."""
        if not self._has_balloon:
            return False
        try:
            size = self._balloon_size()
        except GuestError as e:
            log.warning("domain %s: the balloon's size is unknown (%s): RAM compared", self.name, e)
            return True
        if size == self._balloon:
            return False
        log.info("domain %s: its balloon went from %s to %s bytes: RAM compared in full",
                 self.name, self._balloon, size)  # fmt: skip
        self._balloon = size
        return True

    def discards_ram(self) -> bool:
        return self._has_balloon

    def output_faults(self) -> list[str]:
        """Its NICs' gates that no longer hold as they should (GateSet.faults)."""
        return [] if self.gates is None else self.gates.faults()

    def log_blockers(self) -> list[str]:
        root = ET.fromstring(self.xml)
        found = []
        for b in root.findall("./devices/memballoon"):
            if b.get("freePageReporting") == "on":
                found.append(
                    "a balloon with free page reporting (the host discards the pages the "
                    "guest reports free, behind the log, with no change of the balloon's size)"
                )
        if root.find("./devices/memory") is not None:
            found.append("memory devices (virtio-mem/DIMMs plug RAM behind the log)")
        if root.find("./devices/interface[@type='vhostuser']") is not None:
            found.append("a vhost-user NIC (writes RAM through its own mapping)")
        return found

    def throttle_blocker(self) -> str | None:
        """The throttle sets the domain's live vCPU quota (``<cputune>``'s
        ``vcpu_quota``, virDomainSetSchedulerParameters), where libvirt manages its
        CPU cgroup; None once the domain's own values are known."""
        if self._quota is not None:
            return None
        live = _libvirt().VIR_DOMAIN_AFFECT_LIVE
        try:
            params = self.call(
                f"reading {self.name!r}'s scheduler parameters",
                lambda dom: dom.schedulerParametersFlags(live),
            )
        except GuestError as e:
            return f"libvirt cannot give {self.name!r} a vCPU quota: {e}"
        if "vcpu_quota" not in params:
            return (f"libvirt gives {self.name!r} no vcpu_quota (it does not manage the "
                    f"domain's cpu cgroup here)")  # fmt: skip
        self._quota = (int(params.get("vcpu_period") or 0), int(params["vcpu_quota"]))
        return None

    def set_speed(self, speed: float) -> None:
        if self._quota is None:
            raise GuestError(f"the domain {self.name!r} has no vCPU quota to set")
        period, own = self._quota
        if speed >= 1.0:  # the domain's own quota (a negative one: none)
            params = {"vcpu_quota": own if own > 0 else -1}
        else:
            period = period or 100_000
            params = {"vcpu_period": period, "vcpu_quota": max(1000, int(speed * period))}
        live = _libvirt().VIR_DOMAIN_AFFECT_LIVE
        self.call(f"setting {self.name!r}'s vCPU quota",
                  lambda dom: dom.setSchedulerParametersFlags(params, live))  # fmt: skip

    def pause(self) -> None:
        assert self.monitor is not None
        self.monitor.execute("stop")
        if self.gates is not None:
            self.gates.drain()
        elif self.relay is not None:
            self.relay.drain()
        os.lseek(self._state_wfd, 0, os.SEEK_SET)
        self._saving = self.monitor.submit(
            "xen-save-devices-state", {"filename": f"/dev/fdset/{self._fdset}", "live": False}
        )

    def resume(self) -> None:
        assert self.monitor is not None
        if self._saving is not None:
            self._saving.result(60)
            self._saving = None
        if self._resume_via_libvirt:  # the first run after promotion: libvirt's bookkeeping
            self._resume_via_libvirt = False
            self.call(f"resuming the promoted domain {self.name!r}", lambda dom: dom.resume())
        else:
            self.monitor.execute("cont")
        if self._announce:
            self._announce = False
            self.command("announce-self", initial=50, max=550, rounds=5, step=100)

    def save_state(self) -> bytes:
        assert self.monitor is not None
        fut, self._saving = self._saving, None
        if fut is None:
            os.lseek(self._state_wfd, 0, os.SEEK_SET)
            fut = self.monitor.submit(
                "xen-save-devices-state", {"filename": f"/dev/fdset/{self._fdset}", "live": False}
            )
        fut.result(60)
        n = os.lseek(self._state_wfd, 0, os.SEEK_CUR)  # where QEMU's writes ended
        return os.pread(self._state_fd, n, 0)

    def release(self, outputs: list[GuestOutput]) -> None:
        """The output sink: released frames go out through each NIC's gate (or the relay)."""
        if self.gates is not None:
            self.gates.release(outputs)
        elif self.relay is not None:
            self.relay.release(outputs)

    def detach(self) -> None:
        """Let go of the domain and leave it running (``mirror unpair``'s end): its NICs'
        gates go (what it sends from here on goes straight out; a socket NIC reaches no
        one until its XML is put back)."""
        if self.gates is not None:
            gates = self.gates
            gates.on_output = lambda out: gates.release([out])  # unprotected from here
        self._disk_back()
        with contextlib.suppress(GuestError):
            if self.monitor is not None and self.command("query-status").get("status") == "paused":
                self.command("cont")
        self.stop(destroy=False)

    def stop(self, destroy: bool = True) -> None:
        """The guest stops here: its domain is destroyed (``destroy``), mirror lets go of
        it.  The primary's copy stops when the pair ends or hands over, like a QEMU guest."""
        if self._stopped:
            return
        self._stopped = True
        if destroy and getattr(self, "dom", None) is not None:
            with contextlib.suppress(Exception):
                self.call(
                    f"destroying {self.name!r}",
                    lambda dom: dom.destroy() if dom.isActive() else None,
                    reconnect_for=5,
                )
        if not destroy:
            self._disk_back()  # (a guest left running keeps its disk)
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if self.disk is not None:
            self.disk.close()
            self.disk = None
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        if self.gates is not None:
            gates, self.gates = self.gates, None
            try:
                gates.remove()  # the taps as they were
            except Exception as e:  # (a broken gate holds: fail closed, and say so)
                log.error("domain %s: removing the gate on its NICs: %s", self.name, e)
        if self._map is not None:
            self._map.close()
            self._map = None
        for fd in (self._state_fd, self._state_wfd, self._pidfd):
            if fd >= 0:
                os.close(fd)
        self._state_fd = self._state_wfd = self._pidfd = -1
        with contextlib.suppress(Exception):
            self.conn.close()
