"""Network namespaces on one machine: hosts, their interconnect, a LAN, a client.

GuestLan (the QEMU demo and tests):

    client [10.0.0.2] ──┐
                        ├── br0 (the LAN, its own namespace) ──┬── lan0 ─ br0 ─ tap  [host A]
                        │                                      └── lan0 ─ br0 ─ tap  [host B]
    interconnect        [A] 10.77.0.1 ──veth── 10.77.0.2 [B]

Each host has a bridge ``br0`` with its LAN port; the role adds the guest's
TAP device to it.  The guest has the LAN address 10.0.0.10 wherever it runs.
NetLab (the partition tests of the synthetic guest):

    root namespace (observer, test)   10.78.1.1 ──veth── 10.78.1.2  [A]
                                      10.78.2.1 ──veth── 10.78.2.2  [B]
    interconnect                      [A] 10.77.0.1 ──veth── 10.77.0.2 [B]

Everything is made with `ip` and undone by ``close()``, also when what used it
failed: the namespaces are deleted (their veths and bridges go with them).
Needs root.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

CLIENT_IP = "10.0.0.2"
GUEST_IP = "10.0.0.10"
IC_IP = {"A": "10.77.0.1", "B": "10.77.0.2"}


class NetLabUnavailable(RuntimeError):
    """This machine cannot build the namespaces (not root, no `ip`)."""


_labs = itertools.count()


def _ip(*args: str) -> None:
    run = subprocess.run(["ip", *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {run.stderr.strip()}")


def check_capable(*, tap: bool = True) -> None:
    if os.geteuid() != 0:
        raise NetLabUnavailable("network namespaces and TAP devices need root")
    if shutil.which("ip") is None:
        raise NetLabUnavailable("no `ip` command (Debian package iproute2)")
    if tap and not os.path.exists("/dev/net/tun"):
        raise NetLabUnavailable("no /dev/net/tun: TAP devices are not available")


class _Namespaces:
    """Named network namespaces (``self.ns``: host -> namespace), deleted by close()."""

    def __init__(self) -> None:
        self.ns: dict[str, str] = {}
        self._made: list[str] = []  # namespaces made so far
        self._links: list[str] = []  # root-side veth ends

    def prefix(self, host: str) -> list[str]:
        """Run a command in ``host``'s namespace."""
        return ["ip", "netns", "exec", self.ns[host]]

    def run_in(self, ns: str, *cmd: str) -> str:
        run = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} in {ns}: {run.stderr.strip()}")
        return run.stdout

    def run(self, host: str, *cmd: str) -> str:
        return self.run_in(self.ns[host], *cmd)

    def close(self) -> None:
        for link in self._links:  # deleting one end of a veth pair deletes both
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._links.clear()
        self._made.clear()


class GuestLan(_Namespaces):
    def __init__(self) -> None:
        check_capable()
        super().__init__()
        tag = f"{os.getpid() % 100000}x{next(_labs)}"  # unique: teardown is asynchronous
        self.ns = {k: f"mq{k.lower()}{tag}" for k in ("A", "B", "C", "L")}
        try:
            for ns in self.ns.values():
                _ip("netns", "add", ns)
                self._made.append(ns)
                self.run_in(ns, "ip", "link", "set", "lo", "up")
            self.run("L", "ip", "link", "add", "br0", "type", "bridge")
            self.run("L", "ip", "link", "set", "br0", "up")
            for host in ("A", "B", "C"):
                port = f"p{host.lower()}"
                _ip("link", "add", port, "netns", self.ns["L"], "type", "veth", "peer", "name",
                    "lan0", "netns", self.ns[host])  # fmt: skip
                self.run("L", "ip", "link", "set", port, "master", "br0", "up")
                if host == "C":
                    self.run("C", "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "lan0")
                else:
                    self.run(host, "ip", "link", "add", "br0", "type", "bridge")
                    self.run(host, "ip", "link", "set", "lan0", "master", "br0")
                    self.run(host, "ip", "link", "set", "br0", "up")
                self.run(host, "ip", "link", "set", "lan0", "up")
            _ip("link", "add", "ic0", "netns", self.ns["A"], "type", "veth", "peer", "name",
                "ic0", "netns", self.ns["B"])  # fmt: skip
            for host in ("A", "B"):
                self.run(host, "ip", "addr", "add", f"{IC_IP[host]}/30", "dev", "ic0")
                self.run(host, "ip", "link", "set", "ic0", "up")
        except RuntimeError as e:
            self.close()
            raise NetLabUnavailable(f"cannot build the test network: {e}") from e

    def cut_interconnect(self) -> None:
        self.run("A", "ip", "link", "set", "ic0", "down")

    def __enter__(self) -> GuestLan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NetLab(_Namespaces):
    def __init__(self) -> None:
        check_capable(tap=False)
        super().__init__()
        tag = f"{os.getpid() % 10000}x{next(_labs)}"  # unique: teardown is asynchronous
        self.ns = {"A": f"mra{tag}", "B": f"mrb{tag}"}
        self.ic = {"A": f"ica{tag}", "B": f"icb{tag}"}
        try:
            for host, octet in (("A", 1), ("B", 2)):
                ns = self.ns[host]
                _ip("netns", "add", ns)
                self._made.append(ns)
                self.run(host, "ip", "link", "set", "lo", "up")
                outer, inner = f"o{host.lower()}{tag}", f"i{host.lower()}{tag}"
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                self._links.append(outer)
                _ip("link", "set", inner, "netns", ns)
                _ip("addr", "add", f"10.78.{octet}.1/30", "dev", outer)
                _ip("link", "set", outer, "up")
                self.run(host, "ip", "addr", "add", f"10.78.{octet}.2/30", "dev", inner)
                self.run(host, "ip", "link", "set", inner, "up")
            _ip("link", "add", self.ic["A"], "type", "veth", "peer", "name", self.ic["B"])
            for host, octet in (("A", 1), ("B", 2)):
                _ip("link", "set", self.ic[host], "netns", self.ns[host])
                self.run(host, "ip", "addr", "add", f"10.77.0.{octet}/30", "dev", self.ic[host])
                self.run(host, "ip", "link", "set", self.ic[host], "up")
        except RuntimeError as e:
            self.close()
            raise NetLabUnavailable(f"cannot build the test network: {e}") from e

    def cut_interconnect(self) -> None:
        self.run("A", "ip", "link", "set", self.ic["A"], "down")
