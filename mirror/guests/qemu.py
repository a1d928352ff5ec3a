"""QEMU guests: RAM on a shared file, QMP for stop/cont/device state, the NIC through mirror.

docs/QEMU-NOTES.md has the verified mechanics.  A checkpoint is QMP ``stop``,
a scan of the RAM file, ``xen-save-devices-state`` (CPU, timers, devices; no
RAM) and ``cont``.  On the standby, a QEMU started with the same machine
configuration on the standby image, with ``-S -incoming defer``, waits ready;
promotion is ``migrate-incoming`` of the committed device state, ``cont`` and
``announce-self``.

The guest's NIC is a ``-netdev stream`` whose other end is this host's role
(:class:`NetRelay`): frames the guest sends are outputs, held per epoch and
released on ack into the host's network through a TAP device (on a bridge);
frames from the network go straight to the guest.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from mirror.config import QemuConfig
from mirror.guests import uffd
from mirror.guests.base import Guest, GuestError, GuestOutput, LogSource, OutputHandler
from mirror.guests.cpulimit import CpuLimit, CpuLimitError
from mirror.guests.disk import DiskServer
from mirror.guests.qmp import QmpSocket, StateFd
from mirror.guests.synthetic import create_ram_file
from mirror.hoststate import PRIVATE_UMASK, open_private, private_dir


@functools.lru_cache(maxsize=8)
def qemu_version(binary: str) -> str:
    """``7.2.22`` etc.; GuestError naming the fix when QEMU is missing."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=20
        ).stdout
    except FileNotFoundError:
        raise GuestError(
            f"QEMU not found: `{binary}` is not on PATH (Debian: apt-get install "
            f"qemu-system-x86), or set qemu.binary"
        ) from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GuestError(f"cannot run `{binary} --version`: {e}") from None
    first = out.splitlines()[0] if out else ""
    parts = first.split("version")
    if len(parts) < 2:
        raise GuestError(f"`{binary} --version` printed no version: {first!r}")
    return parts[1].split()[0]


def fingerprint(s: QemuConfig, ram_mib: int, disk_mib: int = 0) -> str:
    """What both hosts of a pair must agree on: the same QEMU and machine (device
    state and ROMs only load into the same version and configuration)."""
    disk = f" disk=virtio-blk-pci:{disk_mib}M" if disk_mib else ""
    return (
        f"qemu {qemu_version(s.binary)} machine={s.machine} accel={s.accel} smp={s.vcpus} "
        f"ram={ram_mib}M nic=virtio-net-pci mac={s.mac}{disk}"
    )


# ---- the NIC: frames between QEMU's stream netdev and a TAP device -----------------

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


def open_tap(name: str, bridge: str) -> int:
    """Create TAP device ``name`` (attached to ``bridge`` if given, and up); its fd."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as e:
        raise GuestError(f"cannot open /dev/net/tun for TAP {name}: {e.strerror}") from e
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
        for args in (["master", bridge] if bridge else [], ["up"]):
            if args:
                r = subprocess.run(
                    ["ip", "link", "set", "dev", name, *args], capture_output=True, text=True
                )
                if r.returncode:
                    raise GuestError(f"ip link set {name} {' '.join(args)}: {r.stderr.strip()}")
    except OSError as e:
        os.close(fd)
        raise GuestError(
            f"cannot create TAP device {name!r}: {e.strerror} (needs root or CAP_NET_ADMIN)"
        ) from e
    except GuestError:
        os.close(fd)
        raise
    return fd


class NetRelay:
    """This host's end of the guest's NIC.

    QEMU connects to ``path`` (frames: 4-byte big-endian length, then the frame).
    Frames from the guest go to ``on_output`` (the role holds them until their
    checkpoint is acknowledged, then :meth:`release` writes them to the TAP
    device); frames from the TAP device go straight to the guest while the relay
    is active (a standby's relay is not: its guest does not run yet)."""

    def __init__(
        self,
        path: Path,
        tap: str,
        bridge: str,
        *,
        active: bool = True,
        connect: tuple[str, int] | None = None,
    ) -> None:
        self.path = path
        self.connect = connect  # QEMU listens there (``-netdev socket,listen=``): dial it
        self._server: socket.socket | None = None
        if connect is None:
            path.unlink(missing_ok=True)
            self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._server.bind(str(path))
            self._server.listen(1)
        self.tap_fd = open_tap(tap, bridge) if tap else -1
        self.tap = tap
        self.active = active
        self.on_output: OutputHandler = lambda out: None
        self.conn: socket.socket | None = None
        self._rx = bytearray()
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._seq = 0
        self._halt = threading.Event()
        self._threads: list[threading.Thread] = []

    def dial(self, timeout: float = 30.0) -> None:
        """Connect to QEMU's listening NIC socket (``connect`` mode), then start moving
        frames.  Same framing as ``-netdev stream``: 4-byte big-endian length + frame."""
        assert self.connect is not None
        deadline = time.monotonic() + timeout
        while self.conn is None:
            try:
                self.conn = socket.create_connection(self.connect, timeout=1)
            except OSError as e:
                if time.monotonic() > deadline:
                    host, port = self.connect
                    raise GuestError(
                        f"cannot connect to the guest's NIC socket {host}:{port}: {e.strerror}"
                    ) from e
                time.sleep(0.05)
        self._start_moving()

    def accept(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        """Wait for QEMU to connect, then start moving frames."""
        assert self._server is not None
        self._server.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while self.conn is None:
            if proc.poll() is not None:
                raise GuestError(f"QEMU exited (code {proc.returncode}) before its NIC connected")
            if time.monotonic() > deadline:
                raise GuestError(f"QEMU's NIC did not connect to {self.path} in {timeout:g} s")
            try:
                self.conn, _ = self._server.accept()
            except TimeoutError:
                continue
        self._start_moving()

    def _start_moving(self) -> None:
        assert self.conn is not None
        self.conn.setblocking(True)
        for target in (self._from_guest, self._from_network):
            t = threading.Thread(target=target, daemon=True, name=target.__name__)
            t.start()
            self._threads.append(t)

    def _take(self, block: bool) -> None:
        """Read what the guest sent and hand each whole frame over (lock held)."""
        assert self.conn is not None
        while True:
            try:
                chunk = self.conn.recv(1 << 16, 0 if block else socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._halt.set()
                return
            if not chunk:
                self._halt.set()
                return
            self._rx += chunk
            now = time.monotonic()
            while len(self._rx) >= 4:
                n = int.from_bytes(self._rx[:4], "big")
                if len(self._rx) < 4 + n:
                    break
                frame = bytes(self._rx[4 : 4 + n])
                del self._rx[: 4 + n]
                self._seq += 1
                self.on_output(GuestOutput(self._seq, frame, now))
            block = False

    def _from_guest(self) -> None:
        assert self.conn is not None
        while not self._halt.is_set():
            r, _, _ = select.select([self.conn], [], [], 0.1)
            if r:
                with self._rx_lock:
                    self._take(block=False)

    def drain(self) -> None:
        """Hand over every frame the (paused) guest has sent so far."""
        if self.conn is not None:
            with self._rx_lock:
                self._take(block=False)

    def _from_network(self) -> None:
        if self.tap_fd < 0:
            return
        while not self._halt.is_set():
            r, _, _ = select.select([self.tap_fd], [], [], 0.1)
            if not r:
                continue
            try:
                frame = os.read(self.tap_fd, 65536)
            except OSError:
                continue
            if self.active:
                self.to_guest(frame)

    def to_guest(self, frame: bytes) -> None:
        assert self.conn is not None
        with self._tx_lock:
            try:
                self.conn.sendall(len(frame).to_bytes(4, "big") + frame)
            except OSError:
                self._halt.set()

    def release(self, outputs: list[GuestOutput]) -> None:
        """Put released frames on the network (the output sink)."""
        if self.tap_fd < 0:
            return  # no network (qemu.tap = ""): the frames go nowhere
        for out in outputs:
            with contextlib.suppress(OSError):  # the network drops a frame: TCP resends
                os.write(self.tap_fd, out.payload)

    def close(self) -> None:
        self._halt.set()
        for t in self._threads:
            t.join(1)
        if self.conn is not None:
            self.conn.close()
        if self._server is not None:
            self._server.close()
            self.path.unlink(missing_ok=True)
        if self.tap_fd >= 0:
            os.close(self.tap_fd)
            self.tap_fd = -1


# ---- QEMU itself ------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the role dies (a host dies whole)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class QemuGuest(Guest):
    kind: ClassVar[str] = "qemu"

    def __init__(
        self,
        settings: QemuConfig,
        ram_mib: int,
        ram_path: Path,
        run_dir: Path,
        *,
        incoming: bool,
        owns_ram: bool,
        relay_active: bool,
        disk: DiskServer | None = None,
    ) -> None:
        for what, path in (("qemu.kernel", settings.kernel), ("qemu.initrd", settings.initrd)):
            if not path or not Path(path).is_file():
                raise GuestError(
                    f"{what} = {path!r} is not a file: build the guest image with "
                    f"`mirror image build` and point qemu.kernel/qemu.initrd at it"
                )
        self.settings, self.ram_mib = settings, ram_mib
        self.disk = disk  # the guest's disk server (this guest stops it)
        self._cpulimit: CpuLimit | None = None  # the throttle's quota on the vCPU threads
        self._ram_path, self.run_dir, self.owns_ram = ram_path, run_dir, owns_ram
        private_dir(run_dir)
        self.qmp_path = run_dir / "qmp.sock"
        self.serial_path = run_dir / "serial.log"
        self.devstate_path = run_dir / "devstate.bin"
        self.qmp_path.unlink(missing_ok=True)
        qemu_version(settings.binary)  # a clear error now if QEMU is missing
        self.relay = NetRelay(
            run_dir / "net.sock", settings.tap, settings.bridge, active=relay_active
        )
        size = ram_mib << 20
        args = [
            settings.binary, "-accel", settings.accel,
            "-machine", f"{settings.machine},memory-backend=ram0", "-m", f"{ram_mib}M",
            "-smp", str(settings.vcpus),
            "-object",
            f"memory-backend-file,id=ram0,size={ram_mib}M,mem-path={ram_path},share=on",
            "-kernel", settings.kernel, "-initrd", settings.initrd, "-append", settings.append,
            "-display", "none", "-nodefaults", "-no-reboot",
            "-chardev", f"file,id=ser0,path={self.serial_path},append=on",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-pidfile", str(run_dir / "qemu.pid"),
            "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={self.relay.path}",
            "-device", f"virtio-net-pci,netdev=n0,mac={settings.mac},romfile=",
        ]  # fmt: skip
        if disk is not None:  # virtio-blk over NBD from the role's disk server
            args += [
                "-blockdev",
                f"driver=nbd,node-name=d0,server.type=unix,server.path={disk.spec.nbd_path}",
                "-device", "virtio-blk-pci,drive=d0",
            ]  # fmt: skip
        args.append("-S")  # the role lets it run (cont) when it is paired
        if incoming:
            args += [
                "-incoming", "defer",
                "-global", "migration.send-configuration=off",
                "-machine", "suppress-vmdesc=on",
            ]  # fmt: skip
        self.args = args
        self._map: mmap.mmap | None = None
        self.qmp: QmpSocket | None = None
        self._state: StateFd | None = None  # where QEMU saves the device state
        self._saving: int | None = None  # the id of a save whose answer is not taken yet
        self._announce = False
        # The dirty-page log: QEMU hands out userfaultfds of its mm at this abstract
        # socket (the preload library; nothing on its command line changes).
        self.uffd_sock = uffd.unique_name("qemu")
        env = uffd.preload_env(self.uffd_sock)
        if env is None:
            self.uffd_sock = ""
        try:
            if not ram_path.exists():
                create_ram_file(ram_path, size)
            self.proc = subprocess.Popen(
                args,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open_private(run_dir / "qemu.stderr", "wb"),
                start_new_session=True,  # a SIGTERM to the host is for the role alone
                preexec_fn=_die_with_parent,
                umask=PRIVATE_UMASK,  # what QEMU writes (serial log, state) is ours only
            )
            self._connect_qmp()
            self.relay.accept(self.proc)
            fd = os.open(ram_path, os.O_RDWR)
            try:
                self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
        except BaseException:
            self.stop()
            raise

    def _stderr(self) -> str:
        try:
            return (self.run_dir / "qemu.stderr").read_text().strip()[-600:]
        except OSError:
            return ""

    def _connect_qmp(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.qmp_path.exists():
            if self.proc.poll() is not None:
                raise GuestError(
                    f"QEMU exited with code {self.proc.returncode} at start: {self._stderr()}"
                )
            if time.monotonic() > deadline:
                raise GuestError(f"QEMU's QMP socket {self.qmp_path} did not appear")
            time.sleep(0.01)
        while True:
            try:
                # only SHUTDOWN is kept, to tell a guest that powered itself off from a
                # QEMU that was killed or told to go (a STOP and a RESUME at each
                # checkpoint are read and dropped)
                self.qmp = QmpSocket(str(self.qmp_path), keep=frozenset({"SHUTDOWN"}))
                return
            except ConnectionRefusedError:
                # QEMU binds its socket (the file appears) a moment before it listens: a
                # refused connection then is that moment, tried again while QEMU lives
                if self.proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                raise GuestError(f"QMP connect to {self.qmp_path} failed: refused") from None
            except (OSError, GuestError) as e:
                raise GuestError(f"QMP connect to {self.qmp_path} failed: {e}") from e

    def _qmp(self, name: str) -> QmpSocket:
        if self.qmp is None:
            raise GuestError(f"QMP {name}: not connected")
        return self.qmp

    def answer(self, name: str, ident: int, timeout: float = 60) -> Any:
        """The answer to a command sent earlier; GuestError (with QEMU's words) if it failed."""
        try:
            return self._qmp(name).wait(ident, timeout)
        except GuestError as e:
            raise GuestError(f"{e} {self._stderr()}".strip()) from None

    def command(self, name: str, **args: Any) -> Any:
        """One QMP command, waited for; GuestError (with QEMU's words) if it fails."""
        return self.answer(name, self._qmp(name).send((name, args or None))[0])

    # -- the Guest interface ------------------------------------------------------

    @classmethod
    def boot(
        cls,
        settings: QemuConfig,
        ram_mib: int,
        ram_path: Path,
        run_dir: Path,
        on_output: OutputHandler,
        disk: DiskServer | None = None,
    ) -> QemuGuest:
        """Start the guest from its kernel, paused: :meth:`resume` lets it run."""
        g = cls(
            settings, ram_mib, ram_path, run_dir, incoming=False, owns_ram=True,
            relay_active=True, disk=disk,
        )  # fmt: skip
        g.relay.on_output = on_output
        return g

    @classmethod
    def ready(
        cls,
        settings: QemuConfig,
        ram_mib: int,
        image: Path,
        run_dir: Path,
        disk: DiskServer | None = None,
    ) -> QemuGuest:
        """The ready standby: QEMU on the standby image (and the disk replica), waiting
        for a device state."""
        return cls(
            settings, ram_mib, image, run_dir, incoming=True, owns_ram=False,
            relay_active=False, disk=disk,
        )  # fmt: skip

    def go_on_from(self, state_path: Path, on_output: OutputHandler, timeout: float = 30) -> None:
        """Promotion: load the committed device state; :meth:`resume` runs it."""
        self.relay.on_output = on_output
        self.command("migrate-incoming", uri=f"exec:cat {state_path}")
        deadline = time.monotonic() + timeout
        while True:
            st = self.command("query-migrate").get("status")
            if st == "completed":
                break
            if st in ("failed", "cancelled") or time.monotonic() > deadline:
                raise GuestError(f"loading the device state from {state_path}: migration {st}")
            time.sleep(0.002)
        self.relay.active = True
        self.owns_ram = True
        self._announce = True  # once it runs: tell the LAN switches where it is now

    @property
    def ram(self) -> mmap.mmap:
        assert self._map is not None
        return self._map

    @property
    def ram_path(self) -> Path:
        return self._ram_path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def end_reason(self) -> str | None:
        """QEMU exits when the guest powers off (``-no-shutdown`` is not given), after a
        SHUTDOWN event whose reason says it was the guest's own ("guest-shutdown"); a
        signal or ``quit`` is the host's doing, and a killed QEMU says nothing."""
        code = self.proc.poll()
        if code is None:
            return None
        if self.qmp is not None:
            self.qmp.drain()  # its last words are still in the socket
        heard = self.qmp.events if self.qmp is not None else []
        reasons = [d.get("reason") for e in heard if isinstance(d := e.get("data"), dict)]
        if "guest-shutdown" in reasons:
            return "shutdown"
        return "killed" if code < 0 else "ended"

    def log_source(self) -> LogSource | None:
        return LogSource(self.proc.pid, self.uffd_sock) if self.uffd_sock else None

    # What changes guest RAM without a write through QEMU's mapping: the log would
    # not see it (docs/ARCHITECTURE.md, "Tracking changed memory").
    LOG_BLIND: ClassVar[dict[str, str]] = {
        "virtio-balloon": "a memory balloon (frees guest pages behind the log)",
        "virtio-mem": "virtio-mem (plugs and unplugs guest RAM)",
        "discard-data=on": "discard of guest RAM (discard-data=on)",
        "vhost-user": "a vhost-user backend (writes RAM through its own mapping)",
    }

    def log_blockers(self) -> list[str]:
        found = [why for key, why in self.LOG_BLIND.items() if any(key in a for a in self.args)]
        try:  # a balloon added at run time (device_add) shows here
            self.command("query-balloon")
            found.append(self.LOG_BLIND["virtio-balloon"])
        except GuestError:
            pass  # "No balloon device has been activated": what we want
        return sorted(set(found))

    def throttle_blocker(self) -> str | None:
        """The throttle slows the vCPU threads (QMP query-cpus-fast) with a CPU quota on
        a cgroup mirror makes for them (mirror/guests/cpulimit.py); None once it exists."""
        if self._cpulimit is not None:
            return None
        try:
            tids = [int(c["thread-id"]) for c in self.command("query-cpus-fast")]
            # mirror-PAIR-NODE-PID, as the RAM file: a killed role's is found by its PID
            name = self._ram_path.stem.removeprefix("mirror-")
            self._cpulimit = CpuLimit.create(name, self.proc.pid, tids)
        except (GuestError, CpuLimitError, KeyError, TypeError, ValueError) as e:
            return f"QEMU's vCPU threads cannot be given a CPU quota: {e}"
        return None

    def set_speed(self, speed: float) -> None:
        if self._cpulimit is None:
            raise GuestError("QEMU's vCPU threads have no CPU quota (no cgroup was made)")
        try:
            self._cpulimit.set_share(speed)
        except CpuLimitError as e:
            raise GuestError(str(e)) from e

    def _state_file(self) -> StateFd:
        if self._state is None:  # once: the memfd QEMU saves the device state into
            self._state = StateFd(self._qmp("add-fd").execute, self.run_dir.name)
        return self._state

    def pause(self) -> None:
        """Stop the guest and start the device-state save in the same write: QEMU saves
        while the caller scans RAM (:meth:`save_state` collects it)."""
        save = self._state_file().command()
        stop, self._saving = self._qmp("stop").send(("stop", None), save)
        self.answer("stop", stop)
        self.relay.drain()

    def resume(self) -> None:
        if self._saving is not None:  # a pause whose state nobody asked for
            saving, self._saving = self._saving, None
            self.answer("xen-save-devices-state", saving)
        self.command("cont")
        if self._announce:
            self._announce = False
            self.command("announce-self", initial=50, max=550, rounds=5, step=100)

    def save_state(self) -> bytes:
        state = self._state_file()
        saving, self._saving = self._saving, None
        if saving is None:  # not paused by pause(): saved now
            saving = self._qmp("xen-save-devices-state").send(state.command())[0]
        self.answer("xen-save-devices-state", saving)
        return state.read()

    def stop(self) -> None:
        proc = getattr(self, "proc", None)
        if self.qmp is not None:
            with contextlib.suppress(GuestError):  # QEMU may already be gone
                if proc is not None and proc.poll() is None:
                    self.command("quit")
            self.qmp.close()
            self.qmp = None
        if self._state is not None:
            self._state.close()
            self._state = None
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._cpulimit is not None:
            self._cpulimit.close()
            self._cpulimit = None
        self.relay.close()
        if self.disk is not None:
            self.disk.close()
        for p in (self.qmp_path, self.devstate_path):
            p.unlink(missing_ok=True)
        if self.owns_ram:
            self._ram_path.unlink(missing_ok=True)
