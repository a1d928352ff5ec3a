"""Namespaces for the NIC gate's tests and bench (mirror/replication/nicgate.py).

    guest G [10.0.0.10] ── eth0 ═veth═ vnet ──┐
                                              ├── br0    host H (where the gate runs)
    client C [10.0.0.2] ── eth0 ═veth═ pc ────┘
    a guest driven by a socket: the tap ``vtap`` (its fd held here) on br0 too

``vnet`` stands for the tap libvirt makes for a guest: a guest with a real IP stack
behind it (``veth_guest=False``: none, for a guest of libvirt's own on br0).  ``vtap``
is a real tap, as QEMU holds one: frames written to its fd are what the guest sends.
:meth:`GateLab.inside` runs code in a namespace (the calling thread only; sockets, taps
and threads made there stay there).  Needs root.
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import os
import struct
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from mirror.lab.netlab import NetLabUnavailable, check_capable

GUEST_IP, CLIENT_IP, QGUEST_IP = "10.0.0.10", "10.0.0.2", "10.0.0.11"
GUEST_MAC, CLIENT_MAC, VTAP_MAC = "52:54:00:6e:67:0a", "52:54:00:6e:67:02", "52:54:00:6e:67:0b"
QGUEST_MAC = "52:54:00:6e:67:0c"
_CLONE_NEWNET = 0x40000000
_labs = itertools.count()


def _ip(*args: str) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


@contextmanager
def netns(name: str) -> Iterator[None]:
    """The calling thread in network namespace ``name`` for the block."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            libc.setns(home, _CLONE_NEWNET)
    finally:
        os.close(home)
        os.close(target)


class GateLab:
    def __init__(
        self, *, vtap: bool = False, veth_guest: bool = True, qemu_guest: bool = False
    ) -> None:
        check_capable()
        tag = f"{os.getpid() % 100000}x{next(_labs)}"
        # Q (qemu_guest): an empty namespace for a guest stack behind a QEMU netdev
        # (bench/nicgate.py moves QEMU's tap there)
        self.ns = {k: f"ng{k.lower()}{tag}" for k in ("H", "G", "C", "Q")[: 4 if qemu_guest else 3]}
        self._made: list[str] = []
        self.vtap_fd = -1
        try:
            for ns in self.ns.values():
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                # IPv4 only: no IPv6 start-up (MLD reports, router solicitations) sent at
                # random times after a link comes up, before or after a gate is on
                subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                                "net.ipv6.conf.all.disable_ipv6=1",
                                "net.ipv6.conf.default.disable_ipv6=1"],
                               capture_output=True, check=True)  # fmt: skip
            h = self.ns["H"]
            _ip("-n", h, "link", "add", "br0", "type", "bridge")
            _ip("-n", h, "link", "set", "br0", "up")
            sides = [("G", "vnet", GUEST_MAC)] if veth_guest else []
            for side, port, mac in [*sides, ("C", "pc", CLIENT_MAC)]:
                _ip("link", "add", port, "netns", h, "type", "veth", "peer", "name", "eth0",
                    "netns", self.ns[side])  # fmt: skip
                _ip("-n", h, "link", "set", port, "master", "br0", "up")
                ip = GUEST_IP if side == "G" else CLIENT_IP
                _ip("-n", self.ns[side], "link", "set", "eth0", "address", mac)
                _ip("-n", self.ns[side], "addr", "add", f"{ip}/24", "dev", "eth0")
                _ip("-n", self.ns[side], "link", "set", "eth0", "up")
            if vtap:
                self.vtap_fd = self._make_vtap()
        except (RuntimeError, OSError) as e:
            self.close()
            raise NetLabUnavailable(f"cannot build the gate's test network: {e}") from e

    def _make_vtap(self) -> int:
        with netns(self.ns["H"]):
            fd = os.open("/dev/net/tun", os.O_RDWR)
            flags = 0x0002 | 0x1000 | 0x4000  # IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
            fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"vtap", flags))
        _ip("-n", self.ns["H"], "link", "set", "vtap", "master", "br0", "up")
        return fd

    def inside(self, host: str) -> AbstractContextManager[None]:
        return netns(self.ns[host])

    def run(self, host: str, *cmd: str) -> str:
        r = subprocess.run(["ip", "netns", "exec", self.ns[host], *cmd], capture_output=True,
                           text=True)  # fmt: skip
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} in {host}: {r.stderr.strip()}")
        return r.stdout

    def static_neighbours(self) -> None:
        """Guest and client know each other's MAC: no ARP needed (ARP out of the guest
        is held too; a test of inbound frames must not wait for it)."""
        self.run("G", "ip", "neigh", "replace", CLIENT_IP, "lladdr", CLIENT_MAC, "dev", "eth0")
        self.run("C", "ip", "neigh", "replace", GUEST_IP, "lladdr", GUEST_MAC, "dev", "eth0")

    def close(self) -> None:
        if self.vtap_fd >= 0:
            os.close(self.vtap_fd)
            self.vtap_fd = -1
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    def __enter__(self) -> GateLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

