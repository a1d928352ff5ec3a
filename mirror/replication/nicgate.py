"""Output commit on a tap that libvirt made: every frame the guest sends is held by mirror.

The guest's NIC stays as its domain defines it (``<interface type='bridge'>`` or
``type='network'``, any model, vhost-net or not): its tap ``vnetN`` stays on its
bridge and the XML does not change.  :class:`NicGate` puts a gate on the host side
of that tap (docs/ARCHITECTURE.md, "Output commit on a libvirt tap"):

    guest ─► vnetN ingress ─► tc: hold program ──redirect──► mgateI (mirror's own tap)
                                                                 │ read by mirror: on_output
                                                                 ▼ (held per epoch)
    bridge ◄── vnetN ingress ◄── mirred ingress redirect ◄── mgateI ingress ◄── release()
    bridge ──────────────────────────────────────────────────► vnetN ──► guest (untouched)

- ``mgateI`` (``I`` = the tap's ifindex) is a tap device mirror creates and owns
  (IFF_VNET_HDR, offloads on, no qdisc): the kernel hands each frame over whole, with
  its virtio-net header (GSO, partial checksum), so a frame is released exactly as the
  guest sent it.  It is not on any bridge.
- On ``vnetN``'s ingress (a ``clsact`` qdisc), one eBPF program (tcprog.py): a frame marked as
  released (``RELEASE_MARK``) has its mark cleared and goes on into the bridge; any
  other frame is redirected to ``mgateI`` (a synchronous transmit: when the guest's
  write returns, the frame is in mirror's queue, so :meth:`NicGate.drain` after a
  pause takes the whole epoch).
- :meth:`NicGate.release` writes a frame into ``mgateI``; on its ingress a second
  program marks it, and ``mirred ingress redirect`` hands it to ``vnetN``'s ingress
  (through the writing CPU's backlog, run when the write leaves its softirq-off
  section, so before it returns), and the bridge sees it arrive from the guest's
  port: it learns the guest's MAC there, floods it to every port but the guest's, and
  libvirt's nwfilter rules for ``vnetN`` still apply.  Frames reach the bridge in
  release order (see docs/ARCHITECTURE.md for the one exception).
- Frames towards the guest never meet a filter.

Fail closed: ``mgateI`` lives only as long as mirror's file descriptor; if mirror dies
the device goes, and the hold program's redirect to a missing device drops every frame
of the guest (nothing leaves unacknowledged).  :func:`stale_gates` finds those (a hold
filter on a tap whose ``mgateI`` is gone) and :func:`remove_stale` removes them.  A
gate that breaks while mirror runs (its tap deleted, a filter deleted by another tool)
is found by :meth:`GateSet.faults`, which a role reports (status, metrics, an event):
a deleted hold filter lets the guest's frames pass unheld, the rest drop them.

Needs root (CAP_NET_ADMIN, CAP_BPF/CAP_SYS_ADMIN), ``tc`` (iproute2), and a kernel
with clsact, cls_bpf, act_mirred and tun (no gact or skbedit needed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mirror.guests.base import GuestOutput, OutputHandler
from mirror.replication import tcprog

GATE_PREFIX = "mgate"
HOLD_PREF = 0xC1A0  # the hold filter's priority on the tap's ingress (ours: clsact is ours)
HOLD_HANDLE = 0x6E67
HOLD_NAME = "mirror_hold"
REL_NAME = "mirror_release"
VNET_HDR_LEN = 10  # struct virtio_net_hdr (tun's default vnet_hdr_sz)
READ_SIZE = 1 << 18  # a GSO frame is at most 64 KiB here; more shows as truncated
GATE_TXQUEUELEN = 20000  # frames mirror's tap queues before it must drop (counted)
WATCH_S = 1.0  # how often a GateSet looks whether its gates still hold (GateSet.faults)

_TUNSETIFF = 0x400454CA
_TUNSETOFFLOAD = 0x400454D0
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUN_F = {"csum": 0x01, "tso4": 0x02, "tso6": 0x04, "tso_ecn": 0x08, "ufo": 0x10,
          "uso4": 0x20, "uso6": 0x40}  # fmt: skip


class NicGateError(RuntimeError):
    """The gate cannot be installed, or was found in a state it cannot handle."""


# ---- tc and ip ------------------------------------------------------------------------


def _run(*cmd: str) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        raise NicGateError(f"`{cmd[0]}` not found (Debian package iproute2)") from None
    if r.returncode:
        raise NicGateError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def _ifindex(name: str) -> int:
    """0 when there is no such device.  (Not from /sys/class/net, which shows the
    namespace sysfs was mounted in, not the caller's.)"""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


def _links() -> list[dict[str, object]]:
    return list(json.loads(_run("ip", "-j", "-s", "link", "show") or "[]"))


def _link(name: str) -> dict[str, object]:
    for link in _links():
        if link.get("ifname") == name:
            return link
    return {}


def _master(name: str) -> str:
    return str(_link(name).get("master", ""))


def _ingress_qdisc(dev: str) -> str:
    """'' (none), 'clsact' or 'ingress' (e.g. libvirt's <bandwidth><outbound> police)."""
    for q in json.loads(_run("tc", "-j", "qdisc", "show", "dev", dev) or "[]"):
        if q.get("handle") == "ffff:" and q.get("kind") in ("clsact", "ingress"):
            return str(q["kind"])
    return ""


def _hold_filter(dev: str) -> dict[str, object] | None:
    """Our hold filter on ``dev``'s ingress, as ``tc -j`` shows it, or None."""
    try:
        out = _run("tc", "-j", "filter", "show", "dev", dev, "ingress")
    except NicGateError:
        return None  # no clsact (or the device went)
    for f in json.loads(out or "[]"):
        if f.get("pref") == HOLD_PREF and f.get("kind") == "bpf" and "options" in f:
            return dict(f)
    return None


def _release_filter(gate: str) -> bool:
    """Whether mirror's tap ``gate`` still has the release filter on its ingress."""
    try:
        out = _run("tc", "-j", "filter", "show", "dev", gate, "ingress")
    except NicGateError:
        return False
    return any(f.get("kind") == "bpf" and "options" in f for f in json.loads(out or "[]"))


def gate_name(tap_ifindex: int) -> str:
    return f"{GATE_PREFIX}{tap_ifindex}"


# ---- the gate -------------------------------------------------------------------------


@dataclass
class GateStats:
    held: int = 0  # frames read from the guest
    released: int = 0
    release_errors: int = 0  # writes the kernel refused (counted, never silent)
    truncated: int = 0  # frames longer than READ_SIZE (cannot happen below 256 KiB GSO)


class NicGate:
    """The gate on one libvirt tap.  ``install()`` starts holding; frames go to
    ``on_output`` as :class:`GuestOutput` (payload: the 10-byte virtio-net header, then
    the Ethernet frame), and :meth:`release` sends held ones on, in order.  ``remove()``
    puts the tap back exactly as it was."""

    def __init__(self, tap: str, bridge: str, mac: str, on_output: OutputHandler | None = None):
        self.tap, self.bridge, self.mac = tap, bridge, mac.lower()
        self.on_output: OutputHandler = on_output or (lambda out: None)
        self.stats = GateStats()
        self.error = ""  # why the gate stopped reading ('' while it works): fail closed
        self.gate = ""
        self._fd = -1
        self._made_clsact = False
        self._tap_index = 0
        self._dropped = 0
        self._seq = 0
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._halt = threading.Event()
        self._reader: threading.Thread | None = None
        self._buf = bytearray(READ_SIZE)

    # -- install / remove --

    def install(self) -> NicGate:
        tap = self.tap
        index = _ifindex(tap)
        if not index:
            raise NicGateError(f"no network device {tap!r} on this host: is the guest running?")
        if self.bridge and _master(tap) != self.bridge:
            raise NicGateError(
                f"tap {tap} is not on bridge {self.bridge!r} (its master is "
                f"{_master(tap) or 'none'}): mirror holds the frames of a tap on its bridge"
            )
        gate = gate_name(index)
        self._tap_index = index
        adopt = _hold_filter(tap) is not None
        if adopt and _ifindex(gate):
            raise NicGateError(
                f"tap {tap} is already under mirror's output commit (by the run that owns "
                f"{gate}): remove that gate first"
            )
        # a dead run's gate (its tap is gone): taken over in one step, with no moment
        # in which the guest's frames pass unheld
        kind = "" if adopt else _ingress_qdisc(tap)
        if kind:
            raise NicGateError(
                f"tap {tap} already has an {kind} qdisc (libvirt <bandwidth><outbound>, or "
                f"another tool): mirror needs the tap's ingress hook for output commit; "
                f"remove the outbound limit from the domain"
            )
        self._open_gate(gate)
        try:
            self._attach(index, adopt=adopt)
        except BaseException:
            self._teardown()
            raise
        self._halt.clear()
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name=f"nicgate-{tap}")
        self._reader.start()
        return self

    def _open_gate(self, gate: str) -> None:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise NicGateError(f"cannot open /dev/net/tun for {gate}: {e.strerror}") from e
        try:
            flags = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", gate.encode(), flags))
            offloads = sum(_TUN_F.values())
            try:
                fcntl.ioctl(fd, _TUNSETOFFLOAD, offloads)
            except OSError:  # an older kernel: no USO; the rest still passes GSO through
                fcntl.ioctl(fd, _TUNSETOFFLOAD, offloads & ~(_TUN_F["uso4"] | _TUN_F["uso6"]))
        except OSError as e:
            os.close(fd)
            raise NicGateError(
                f"cannot create mirror's tap {gate}: {e.strerror} (needs CAP_NET_ADMIN; "
                f"an existing {gate} belongs to another run)"
            ) from e
        self._fd, self.gate = fd, gate
        try:
            # no address, no IPv6 (not even MLD reports): the kernel sends nothing of
            # its own out of mirror's tap, so everything read there is the guest's
            sysctl = f"/proc/sys/net/ipv6/conf/{gate}/disable_ipv6"
            if os.path.exists(sysctl):  # (absent when IPv6 is off on the host)
                Path(sysctl).write_text("1")
            mtu = str(_link(self.tap).get("mtu", 1500))  # the guest's frames fit as they are
            _run("ip", "link", "set", "dev", gate, "mtu", mtu, "txqueuelen", str(GATE_TXQUEUELEN),
                 "up")  # fmt: skip
            _run("tc", "qdisc", "replace", "dev", gate, "root", "noqueue")
        except NicGateError:
            self._teardown()
            raise

    def _attach(self, tap_index: int, *, adopt: bool) -> None:
        fds: list[int] = []
        try:
            fds.append(tcprog.load_program(HOLD_NAME, tcprog.hold_program(_ifindex(self.gate))))
            fds.append(tcprog.load_program(REL_NAME, tcprog.release_program()))
            with tcprog.pin_dir() as where:
                self._attach_pinned(tap_index, adopt, fds[0], fds[1], where)
        except tcprog.BpfError as e:
            raise NicGateError(str(e)) from e
        finally:
            for fd in fds:
                os.close(fd)

    def _attach_pinned(self, tap_index: int, adopt: bool, hold: int, rel: int, where: Path) -> None:
        pins = [where / f"mirror-{n}-{os.getpid()}-{tap_index}" for n in ("hold", "rel")]
        try:
            for fd, pin in zip((hold, rel), pins, strict=True):
                pin.unlink(missing_ok=True)
                tcprog.pin(fd, pin)
            _run("tc", "qdisc", "add", "dev", self.gate, "clsact")
            _run("tc", "filter", "add", "dev", self.gate, "ingress", "pref", "1",
                 "protocol", "all", "bpf", "object-pinned", str(pins[1]),
                 "action", "mirred", "ingress", "redirect", "dev", self.tap)  # fmt: skip
            # last: from here on, the guest's frames are held
            if not adopt:
                _run("tc", "qdisc", "add", "dev", self.tap, "clsact")
            self._made_clsact = True
            verb = "replace" if adopt else "add"
            _run("tc", "filter", verb, "dev", self.tap, "ingress", "pref", str(HOLD_PREF),
                 "handle", hex(HOLD_HANDLE), "protocol", "all", "bpf", "direct-action",
                 "object-pinned", str(pins[0]))  # fmt: skip
        except OSError as e:
            raise NicGateError(f"cannot pin mirror's tc programs in {where}: {e.strerror}") from e
        finally:
            for pin in pins:
                pin.unlink(missing_ok=True)

    def remove(self) -> None:
        """The tap as it was before install (its clsact removed: it had none), mirror's
        tap deleted.  From here on the guest's frames go straight to the bridge.

        The frames the guest sent before that are handed to ``on_output`` first, and
        :meth:`release` still works while that runs: call it with the output buffer
        unprotected (everything held released), so those last frames go out too."""
        try:
            self._unhook()
            self.drain()
        finally:
            self._halt.set()
            if self._reader is not None:
                self._reader.join(2)
                self._reader = None
            self._teardown()

    def _unhook(self) -> None:
        # (a tap of the same name but another ifindex is a new one: ours went with
        # its guest, and our filters with it)
        if self._made_clsact and _ifindex(self.tap) == self._tap_index:
            # deleting the qdisc deletes our filter with it, in one step
            _run("tc", "qdisc", "del", "dev", self.tap, "clsact")
        self._made_clsact = False

    def _teardown(self) -> None:
        try:
            self._unhook()
        finally:
            if self._fd >= 0:
                with contextlib.suppress(NicGateError):
                    self._dropped = self.dropped
                with self._rx_lock, self._tx_lock:
                    os.close(self._fd)  # the non-persistent tap goes with its last fd
                    self._fd = -1

    # -- frames --

    def _take(self) -> None:
        """Read every frame queued on mirror's tap and hand each over (lock held)."""
        while True:
            try:
                n = os.readv(self._fd, [self._buf])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # mirror's tap deleted under it (EBADFD), or closed
                self._fail(f"reading {self.gate}: {e.strerror}")
                return
            if n == 0:
                return
            if n <= VNET_HDR_LEN:
                continue
            if n >= READ_SIZE:
                self.stats.truncated += 1
                continue
            self._seq += 1
            self.stats.held += 1
            self.on_output(GuestOutput(self._seq, bytes(self._buf[:n]), time.monotonic()))

    def _fail(self, why: str) -> None:
        """The gate cannot go on; the guest's frames stay held (dropped at its tap)."""
        if not self.error:
            self.error = why
        self._halt.set()

    def _read_loop(self) -> None:
        os.set_blocking(self._fd, False)
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._halt.is_set():
            for _, ev in poller.poll(100):
                if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    self._fail(f"{self.gate} is gone (poll events {ev:#x})")
                with self._rx_lock:
                    if self._fd >= 0:
                        self._take()

    def drain(self) -> None:
        """Hand over every frame the guest has sent so far (call it with the guest
        paused: its sends are synchronous up to mirror's queue, so nothing is in flight)."""
        with self._rx_lock:
            if self._fd >= 0:
                self._take()

    def release(self, outputs: list[GuestOutput]) -> None:
        """Send held frames on into the bridge, as if the guest had just sent them."""
        with self._tx_lock:
            for out in outputs:
                if self._fd < 0:  # removed: nowhere to send it (counted, not silent)
                    self.stats.release_errors += 1
                    continue
                try:
                    os.write(self._fd, out.payload)
                    self.stats.released += 1
                except OSError:
                    self.stats.release_errors += 1

    def fault(self) -> str:
        """Why this installed gate no longer holds the guest's frames as it should ('' while
        it does, and once removed).  Broken, it either drops them (fail closed: mirror's
        tap, its reader or the release filter gone) or, worse, lets them pass unheld (the
        hold filter on the guest's tap gone).  Runs ``tc``: not for the pause."""
        if self._fd < 0:
            return ""
        tap, gate = self.tap, self.gate
        if self.error:
            return f"{self.error}: the guest's frames on {tap} are dropped (fail closed)"
        if _ifindex(tap) != self._tap_index:
            return ""  # the guest's tap is gone (the guest ended): nothing to hold
        if not _ifindex(gate):
            return f"mirror's tap {gate} is gone: the guest's frames on {tap} are dropped " \
                "(fail closed)"  # fmt: skip
        if _hold_filter(tap) is None:
            return (f"the hold filter on {tap}'s ingress is gone: the guest's frames leave "
                    f"unheld, before their checkpoint is acknowledged")  # fmt: skip
        if not _release_filter(gate):
            return (f"the release filter on {gate}'s ingress is gone: released frames are "
                    f"dropped (fail closed)")  # fmt: skip
        return ""

    @property
    def dropped(self) -> int:
        """Frames the kernel dropped because mirror's queue was full (tx_dropped of
        mirror's tap): a non-zero value means mirror read too slowly."""
        if self._fd < 0:
            return self._dropped  # as counted when the gate was removed
        stats = _link(self.gate).get("stats64", {})
        tx = stats.get("tx", {}) if isinstance(stats, dict) else {}
        return int(tx.get("dropped", 0)) if isinstance(tx, dict) else 0

    def __enter__(self) -> NicGate:
        return self.install() if self._fd < 0 else self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# ---- every NIC of a domain ------------------------------------------------------------


@dataclass(frozen=True)
class Nic:
    tap: str  # libvirt's tap (``<target dev=...>`` of the live XML)
    bridge: str  # its bridge (``<source bridge=...>``, or the network's bridge)
    mac: str


class GateSet:
    """Gates on every NIC of a domain, one output stream: each output's payload is a
    2-byte big-endian NIC index (the position in ``nics``), then the gate's payload
    (virtio-net header, frame); numbered in the order the frames were read.  The same
    order of NICs on both hosts routes a released frame to the same NIC."""

    def __init__(
        self, nics: list[Nic], on_output: OutputHandler | None = None, watch_s: float = WATCH_S
    ) -> None:
        self.nics = list(nics)
        self.on_output: OutputHandler = on_output or (lambda out: None)
        self.gates: list[NicGate] = []
        self._lock = threading.Lock()
        self._seq = 0
        self.watch_s = watch_s
        self._faults: list[str] = []
        self._halt = threading.Event()
        self._watcher: threading.Thread | None = None

    def _tagged(self, index: int) -> OutputHandler:
        tag = index.to_bytes(2, "big")

        def add(out: GuestOutput) -> None:
            with self._lock:
                self._seq += 1
                tagged = GuestOutput(self._seq, tag + out.payload, out.produced_at)
            self.on_output(tagged)

        return add

    def install(self) -> GateSet:
        """All or none: a NIC that cannot be held removes the gates already on."""
        try:
            for i, nic in enumerate(self.nics):
                self.gates.append(NicGate(nic.tap, nic.bridge, nic.mac, self._tagged(i)).install())
        except BaseException:
            self.remove()
            raise
        # (a thread made here is in the caller's network namespace, as the gates are)
        self._halt.clear()
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="nicgate-watch")
        self._watcher.start()
        return self

    def check(self) -> list[str]:
        """Every gate that no longer holds its NIC's frames as it should, as "TAP: why"
        (:meth:`NicGate.fault`); runs ``tc``."""
        return [f"{g.tap}: {why}" for g in list(self.gates) if (why := g.fault())]

    def faults(self) -> list[str]:
        """What :meth:`check` found last (every ``watch_s`` seconds, on a thread of its
        own): cheap, for a role's status."""
        return list(self._faults)

    def _watch(self) -> None:
        while not self._halt.wait(self.watch_s):
            try:
                self._faults = self.check()
            except Exception as e:  # (tc itself failing is a finding, not the end)
                self._faults = [f"the gates cannot be checked: {e}"]

    def drain(self) -> None:
        for g in self.gates:
            g.drain()

    def release(self, outputs: list[GuestOutput]) -> None:
        """In order, each to its NIC; an output naming no NIC is counted on the first."""
        for out in outputs:
            index = int.from_bytes(out.payload[:2], "big")
            if index < len(self.gates):
                g = self.gates[index]
                g.release([GuestOutput(out.seq, out.payload[2:], out.produced_at)])
            elif self.gates:
                self.gates[0].stats.release_errors += 1

    def remove(self) -> None:
        self._halt.set()
        if self._watcher is not None:
            self._watcher.join(30)
            self._watcher = None
        self._faults = []
        errors: list[NicGateError] = []
        while self.gates:
            try:
                self.gates.pop().remove()
            except NicGateError as e:
                errors.append(e)
        if errors:
            raise errors[0]


# ---- a dead run's gates ---------------------------------------------------------------


def stale_gates(taps: Iterable[str] | None = None) -> list[str]:
    """Taps whose frames a dead run of mirror still holds: a hold filter of ours on
    the tap's ingress, and mirror's tap for it gone (it lives only as long as the run).
    ``taps``: look only at these (a pair's own taps); None: every device."""
    with_clsact = {
        str(q.get("dev"))
        for q in json.loads(_run("tc", "-j", "qdisc", "show") or "[]")
        if q.get("kind") == "clsact"
    }
    wanted = with_clsact if taps is None else with_clsact & set(taps)
    stale = []
    for dev in sorted(wanted):
        index = _ifindex(dev)
        if dev.startswith(GATE_PREFIX) or not index or _ifindex(gate_name(index)):
            continue
        if _hold_filter(dev) is not None:
            stale.append(dev)
    return stale


def remove_stale(taps: Iterable[str] | None = None) -> list[str]:
    """Remove the gates of dead runs: their taps forward straight to the bridge again;
    returns the taps.  For ``unpair`` and for a guest that will not be protected again;
    a new run that protects the same guest installs over a stale gate instead
    (:meth:`NicGate.install` takes it over with no unheld moment)."""
    done = []
    for dev in stale_gates(taps):
        with contextlib.suppress(NicGateError):  # gone meanwhile
            _run("tc", "qdisc", "del", "dev", dev, "clsact")
            done.append(dev)
    return done
