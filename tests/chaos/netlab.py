"""Network namespaces for partition tests: two hosts, their interconnect, the observer.

    root namespace (observer, test)   10.78.1.1 ──veth── 10.78.1.2  [A]
                                      10.78.2.1 ──veth── 10.78.2.2  [B]
    interconnect                      [A] 10.77.0.1 ──veth── 10.77.0.2 [B]

Everything is made with `ip` and undone in close(), also when a test fails:
the namespaces are deleted (their veth ends go with them).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess


class NetLabUnavailable(RuntimeError):
    pass


_labs = itertools.count()


def _ip(*args: str) -> None:
    run = subprocess.run(["ip", *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {run.stderr.strip()}")


class NetLab:
    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise NetLabUnavailable("network namespaces need root")
        if shutil.which("ip") is None:
            raise NetLabUnavailable("no `ip` command (Debian package iproute2)")
        tag = f"{os.getpid() % 10000}x{next(_labs)}"  # unique: teardown is asynchronous
        self.ns = {"A": f"mra{tag}", "B": f"mrb{tag}"}
        self.ic = {"A": f"ica{tag}", "B": f"icb{tag}"}
        self._made: list[str] = []
        self._links: list[str] = []  # root-side veth ends
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

    def prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host]]

    def run(self, host: str, *cmd: str) -> None:
        run = subprocess.run([*self.prefix(host), *cmd], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} in {self.ns[host]}: {run.stderr.strip()}")

    def cut_interconnect(self) -> None:
        self.run("A", "ip", "link", "set", self.ic["A"], "down")

    def close(self) -> None:
        for link in self._links:  # deleting one end of a veth pair deletes both
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._links.clear()
        self._made.clear()
