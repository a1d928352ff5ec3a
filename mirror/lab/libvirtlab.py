"""A simulated host's own libvirtd and virtlogd, private to it, for tests and demos.

API (small on purpose; tests, the demo and the host-agent tests use it)::

    with LibvirtHost(root, "A", netns=lan.ns["A"]) as h:   # netns optional
        conn = h.connect()                 # libvirt.virConnect to this host's libvirtd
        h.uri                              # "qemu+unix:///system?socket=<root>/run/libvirt-sock"
        conn.createXML(domain_xml("web01", img, nic_port=5555), 0)
        h.qemu_pid("web01")                # QEMU's pid (libvirt's pid file), or None
        h.enter()                          # ["nsenter", ...]: run a program in this host's
                                           # mount (and network) namespace
        h.restart_libvirtd()               # stop libvirtd (TERM) and start it again; QEMU stays
        h.kill()                           # the host dies: SIGKILL to every process of it
    # close(): destroys its domains, stops its daemons, unmounts, removes every file

- Each host's daemons run in a mount namespace of their own (``unshare --mount``) in
  which ``<root>/{etc,run,lib,log,cache}`` are bind-mounted over /etc/libvirt,
  /run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt; the
  etc folder is a copy of this machine's /etc/libvirt with a few settings of the rig
  appended to qemu.conf (below).  Outside processes reach the daemon through
  :attr:`LibvirtHost.uri`; the namespace's mounts vanish with its last process.
- ``netns``: the daemons (and so QEMU, its NIC's socket and the interconnect) run in
  that network namespace (mirror/lab/netlab.py).
- Every process of the host is in ONE process group (the namespace's holder, virtlogd,
  libvirtd), except QEMU, which libvirt puts in a session of its own: it is found by
  the pid files libvirt writes (``<root>/run/qemu/<name>.pid``).
- Guest RAM (``memory_backing_dir``) is on tmpfs in /dev/shm/mirror-lvram-<tag>,
  visible from outside the namespace (where mirror maps it), removed by close().
- qemu.conf of the rig: QEMU runs as root (on these machines /dev/kvm is root-only,
  and libvirt then re-probes QEMU about 12 times per domain start: 49 s instead of
  0.3 s), no security driver, no QEMU mount namespace, RAM on tmpfs.
- QEMU's capabilities (the ~11 s probe of a first connection) are cached in
  CAPS_CACHE and copied into each new host; libvirt re-probes by itself if stale.

Needs root, libvirtd, virtlogd, unshare and nsenter (scripts/setup installs them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from mirror.guests import image

CAPS_CACHE = Path("/var/cache/mirror/libvirt-qemu-capabilities")
TARGETS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
}
QEMU_CONF = """
# ---- mirror's test rig (mirror/lab/libvirtlab.py) ----
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
namespaces = [ ]
memory_backing_dir = "{ram}"
"""


class LibvirtUnavailable(RuntimeError):
    """This machine cannot run a private libvirtd (not root, libvirt not installed)."""


def check_capable() -> None:
    if os.geteuid() != 0:
        raise LibvirtUnavailable("a private libvirtd per test host needs root")
    for tool in ("libvirtd", "virtlogd", "unshare", "nsenter"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise LibvirtUnavailable(
                f"no `{tool}`: install libvirt-daemon-system libvirt-daemon-driver-qemu "
                f"(scripts/setup does)"
            )
    try:
        import libvirt  # noqa: F401
    except ImportError as e:
        raise LibvirtUnavailable(f"libvirt-python is missing ({e}): run scripts/setup") from e


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LibvirtHost:
    """One simulated host's libvirtd + virtlogd (see the module docstring)."""

    def __init__(
        self, root: Path, name: str = "host", *, netns: str | None = None, timeout: float = 90
    ) -> None:
        check_capable()
        self.name, self.netns = name, netns
        self.root = Path(tempfile.mkdtemp(prefix=f"lv{name}-", dir=root))
        self.ram_dir = Path(tempfile.mkdtemp(prefix="mirror-lvram-", dir="/dev/shm"))
        self.uri = f"qemu+unix:///system?socket={self.root}/run/libvirt-sock"
        self._conn: Any = None
        self._holder: subprocess.Popen[bytes] | None = None
        self._daemons: dict[str, subprocess.Popen[bytes]] = {}
        try:
            self._prepare()
            self._start_holder()
            self._start("virtlogd")
            self._start("libvirtd")
            self.connect(timeout)
        except BaseException:
            self.close()
            raise

    # -- set-up ---------------------------------------------------------------------

    def _prepare(self) -> None:
        for sub, target in TARGETS.items():
            if sub == "etc":
                shutil.copytree(target, self.root / "etc", symlinks=True)
            else:
                (self.root / sub).mkdir()
            Path(target).mkdir(parents=True, exist_ok=True)  # the mount point
        for auto in (self.root / "etc").glob("qemu/networks/autostart/*"):
            auto.unlink()  # no NAT network (needs dnsmasq; the tests bring their own)
        with open(self.root / "etc" / "qemu.conf", "a") as f:
            f.write(QEMU_CONF.format(ram=self.ram_dir))
        with open(self.root / "etc" / "libvirtd.conf", "a") as f:
            f.write(f'\nlog_outputs = "3:file:{self.root}/log/libvirtd.log"\n')
        if CAPS_CACHE.is_dir():
            shutil.copytree(CAPS_CACHE, self.root / "cache" / "qemu" / "capabilities")

    def _start_holder(self) -> None:
        """A process that holds the mount namespace (and is the group's leader)."""
        mounts = " && ".join(
            f"mount --bind {self.root / sub} {target}" for sub, target in TARGETS.items()
        )
        script = f"{mounts} && touch {self.root}/ready && exec sleep infinity"
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self._holder = subprocess.Popen(
            [*prefix, "unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "holder.stderr", "wb"),  # noqa: SIM115
            process_group=0,  # the daemons join its group (a group lives in one session)
        )
        deadline = time.monotonic() + 10
        while not (self.root / "ready").exists():
            if self._holder.poll() is not None or time.monotonic() > deadline:
                err = (self.root / "holder.stderr").read_text(errors="replace").strip()
                raise LibvirtUnavailable(f"cannot make host {self.name}'s namespace: {err}")
            time.sleep(0.01)

    def enter(self) -> list[str]:
        """The command prefix that runs a program in this host's mount namespace (its own
        /run/libvirt, /var/lib/libvirt, ...) and network namespace (if any)."""
        assert self._holder is not None
        enter = ["nsenter", "--target", str(self._holder.pid), "--mount"]
        return [*enter, "--net"] if self.netns else enter

    def _start(self, daemon: str) -> None:
        assert self._holder is not None
        self._daemons[daemon] = subprocess.Popen(
            [*self.enter(), "--", _tool(daemon), "--pid-file", str(self.root / f"{daemon}.pid")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / f"{daemon}.stderr", "ab"),  # noqa: SIM115
            process_group=self._holder.pid,
        )

    def connect(self, timeout: float = 90) -> Any:
        """This host's libvirt connection (opened once; the first one can take ~11 s)."""
        import libvirt

        if self._conn is not None:
            return self._conn
        deadline = time.monotonic() + timeout
        sock = self.root / "run" / "libvirt-sock"
        last = ""
        while time.monotonic() < deadline:
            proc = self._daemons.get("libvirtd")
            if proc is not None and proc.poll() is not None:
                raise LibvirtUnavailable(f"host {self.name}'s libvirtd exited: {self._log()}")
            if sock.exists():
                try:
                    conn = libvirt.open(self.uri)
                    conn.getCapabilities()  # the capability probe happens here
                    self._conn = conn
                    return conn
                except libvirt.libvirtError as e:
                    last = str(e)
            time.sleep(0.05)
        raise LibvirtUnavailable(f"host {self.name}'s libvirtd did not answer: {last}")

    def _log(self) -> str:
        text = ""
        for f in ("libvirtd.stderr", "log/libvirtd.log"):
            with contextlib.suppress(OSError):
                text += (self.root / f).read_text(errors="replace")
        return text.strip()[-800:]

    # -- what tests do with a host --------------------------------------------------

    def qemu_pid(self, domain: str) -> int | None:
        """The pid of QEMU running ``domain`` (from libvirt's pid file), or None."""
        try:
            pid = int((self.root / "run" / "qemu" / f"{domain}.pid").read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def qemu_pids(self) -> list[int]:
        pids = [self.qemu_pid(p.stem) for p in (self.root / "run" / "qemu").glob("*.pid")]
        return [p for p in pids if p is not None]

    def group(self) -> int | None:
        """The process group of this host's daemons (and its namespace's holder)."""
        return self._holder.pid if self._holder is not None else None

    def restart_libvirtd(self, timeout: float = 60) -> None:
        """libvirtd stops (SIGTERM) and starts again; the domains' QEMUs go on."""
        self._drop_conn()
        proc = self._daemons.pop("libvirtd")
        proc.terminate()
        proc.wait(30)
        (self.root / "run" / "libvirt-sock").unlink(missing_ok=True)
        self._start("libvirtd")
        self.connect(timeout)

    def kill(self) -> None:
        """The host dies at once: SIGKILL to its QEMUs and its daemons' process group."""
        self._drop_conn()
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._holder is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._holder.pid, signal.SIGKILL)
        for proc in [*self._daemons.values(), *([self._holder] if self._holder else [])]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def _drop_conn(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        """Destroy this host's domains, stop its daemons, remove every file it made."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                for dom in self._conn.listAllDomains():
                    with contextlib.suppress(Exception):
                        if dom.isActive():
                            dom.destroy()
        self._save_caps()
        self.kill()  # QEMUs that survived destroy, the daemons and the holder
        self._wait_qemus_gone()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.ram_dir, ignore_errors=True)

    def _wait_qemus_gone(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.qemu_pids() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _save_caps(self) -> None:
        """Keep the probed capabilities for the next host (first writer wins)."""
        caps = self.root / "cache" / "qemu" / "capabilities"
        if CAPS_CACHE.exists() or not any(caps.glob("*.xml")):
            return
        with contextlib.suppress(OSError):
            CAPS_CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=CAPS_CACHE.parent))
            shutil.copytree(caps, tmp / "c")
            (tmp / "c").rename(CAPS_CACHE)
            shutil.rmtree(tmp, ignore_errors=True)

    def __enter__(self) -> LibvirtHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def domain_xml(
    name: str,
    image_dir: Path,
    *,
    ram_mib: int = 128,
    cmdline: str = "console=ttyS0 quiet mirror.ip=10.0.0.10/24",
    serial: Path | None = None,
    nic_port: int | None = None,
    mac: str = "52:54:00:12:34:56",
    machine: str = "q35",
    bridges: tuple[str, ...] = (),
    disk: tuple[str, str, str] | None = None,
) -> str:
    """The demo guest as a libvirt domain that mirror can protect: RAM file-backed and
    shared, no balloon, the NIC (if ``nic_port``) a ``type='server'`` socket on
    127.0.0.1:nic_port that mirror's role connects to; or (``bridges``) a NIC as
    operators define them, ``<interface type='bridge'>``, on each bridge named (the
    first with ``mac``, the others with the last byte of ``mac`` counting up); ``disk``:
    (path, format, bus) of a writable disk as virt-install writes it (vda on virtio)."""
    nic = (
        f"<interface type='server'><mac address='{mac}'/>"
        f"<source address='127.0.0.1' port='{nic_port}'/><model type='virtio'/>"
        f"<rom enabled='no'/></interface>"
        if nic_port
        else ""
    )
    for i, br in enumerate(bridges):
        m = f"{mac[:-2]}{(int(mac[-2:], 16) + i) % 256:02x}"
        nic += (
            f"<interface type='bridge'><mac address='{m}'/><source bridge='{escape(br)}'/>"
            f"<model type='virtio'/><rom enabled='no'/></interface>"
        )
    if disk:
        path, fmt, bus = disk
        dev = "vda" if bus == "virtio" else "sda"
        nic += (
            f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}' "
            f"discard='unmap'/><source file='{escape(path)}'/><target dev='{dev}' "
            f"bus='{bus}'/></disk>"
        )
        if bus == "scsi":
            nic += "<controller type='scsi' model='virtio-scsi'/>"
    ser = (
        f"<serial type='file'><source path='{escape(str(serial))}'/></serial>"
        if serial
        else "<serial type='null'/>"
    )
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{ram_mib}</memory>
  <vcpu>1</vcpu>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
    <kernel>{escape(str(image.kernel(image_dir)))}</kernel>
    <initrd>{escape(str(image_dir / "initramfs.cpio.gz"))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    {ser}
    {nic}
    <memballoon model='none'/>
  </devices>
</domain>
"""
