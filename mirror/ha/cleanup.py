"""Clean start: what a dead earlier run of this pair and node left behind, removed.

A host killed whole cannot clean up (docs/failover.md, "What a dead host leaves
behind").  When a role starts, it removes what an earlier run of its own pair and
node left, once it is sure that run is gone:

- guest RAM files ``/dev/shm/mirror-PAIR-NODE-PID.ram`` whose PID is not running and
  which no process has open or mapped;
- the standby image ``/dev/shm/mirror-PAIR-NODE-standby.img`` when no process has it
  open or mapped (a live standby or a promoted guest maps it; a new standby would
  refuse to start while it exists);
- QEMU's sockets in ``STATE_DIR/qemu/`` (``qmp.sock``, ``net.sock``) when the role
  that last reported in STATE_DIR is not running (pid and start time, hoststate.running);
- the throttle's cgroup ``mirror-PAIR-NODE-PID`` (mirror/guests/cpulimit.py) whose PID
  is not running (empty once its QEMU died).

Files of other pairs or nodes are never touched.

NIC gates (mirror/replication/nicgate.py): a gate whose run died holds its guest's
frames (fail closed) until removed.  :func:`ungate` removes the dead gates on a
domain's taps (unpair, a failed or interrupted pairing);
:func:`ungate_unpaired` those on every running domain of this host's libvirt that
is no longer paired (the host agent's start).  A pair's own taps are left to its next run,
which takes the gate over with no unheld moment.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

from mirror.guests import cpulimit
from mirror.guests.base import GuestError
from mirror.guests.libvirt import disk_back as libvirt_disk_back
from mirror.guests.libvirtdom import Domains, LibvirtError
from mirror.hoststate import read_json, running
from mirror.replication import nicgate

log = logging.getLogger("mirror.ha.hostagent")

SHM = Path("/dev/shm")


def _in_use(paths: set[str]) -> set[str]:
    """Which of ``paths`` some process has open (/proc/PID/fd) or mapped (/proc/PID/maps)."""
    used: set[str] = set()
    if not paths:
        return used
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target in paths:
                    used.add(target)
            with open(proc / "maps") as maps:
                for line in maps:
                    name = line.rstrip("\n").split(maxsplit=5)[5:]
                    if name and name[0] in paths:
                        used.add(name[0])
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return used


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(pair: str, node: str, state_dir: Path, shm: Path = SHM) -> list[Path]:
    """What a dead earlier run of ``pair`` on ``node`` left, that is safe to remove now."""
    prefix = f"mirror-{pair}-{node}-"
    candidates: list[Path] = []
    for p in shm.glob(f"{prefix}*"):
        rest = p.name[len(prefix) :]
        if rest == "standby.img":
            candidates.append(p)
        elif rest.endswith(".ram") and rest[:-4].isdigit():
            pid = int(rest[:-4])
            if pid != os.getpid() and not _pid_alive(pid):
                candidates.append(p)
    used = _in_use({str(p) for p in candidates})
    found = [p for p in candidates if str(p) not in used]
    qemu_dir = state_dir / "qemu"
    socks = [qemu_dir / n for n in ("qmp.sock", "net.sock") if (qemu_dir / n).exists()]
    if socks:
        try:
            last = read_json(state_dir / "status.json")
        except (OSError, ValueError):
            last = None
        if not isinstance(last, dict) or not running(last):
            found += socks
    return sorted(found)


def clean_start(pair: str, node: str, state_dir: Path, shm: Path = SHM) -> list[str]:
    """Remove :func:`leftovers` and a dead run's throttle cgroups; returns what was
    removed (for the role's log)."""
    removed = cpulimit.remove_stale(f"mirror-{pair}-{node}-")
    for p in leftovers(pair, node, state_dir, shm):
        try:
            p.unlink()
            removed.append(str(p))
        except FileNotFoundError:
            pass
    return removed


def taps_of(live_xml: str) -> list[str]:
    """The taps libvirt made for a running domain's NICs (its live XML)."""
    root = ET.fromstring(live_xml)
    return [t.get("dev", "") for t in root.findall("./devices/interface/target") if t.get("dev")]


def ungate(uri: str, domain: str) -> list[str]:
    """Remove the gates of dead runs on ``domain``'s taps (it is no longer paired here);
    the taps done.  Nothing if the domain does not run or libvirt cannot say."""
    try:
        with Domains(uri) as lv:
            if not lv.facts(domain)["active"]:
                return []
            taps = taps_of(lv.live_xml(domain))
        return nicgate.remove_stale(taps) if taps else []
    except (LibvirtError, nicgate.NicGateError, ET.ParseError) as e:
        log.warning("domain %s: cannot look for a dead run's gate on its NICs: %s", domain, e)
        return []


def disk_back(uri: str, domain: str) -> bool:
    """A dead role's NBD node under ``domain``'s disk replaced by libvirt's own file node
    (guests.libvirt.disk_back); False if there was none or it could not be done (logged)."""
    try:
        return libvirt_disk_back(uri, domain)
    except (GuestError, LibvirtError) as e:
        log.warning("domain %s: its disk could not be given back to libvirt: %s", domain, e)
        return False


def ungate_unpaired(uri: str, paired: Iterable[str]) -> list[str]:
    """Remove dead runs' gates on the taps of every running domain of the libvirt at
    ``uri`` that is not in ``paired``; the taps done (nothing if libvirt is unreachable)."""
    keep = set(paired)
    try:
        with Domains(uri) as lv:
            taps = [t for d in lv.conn.listAllDomains(lv.lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                    if d.name() not in keep for t in taps_of(d.XMLDesc(0))]  # fmt: skip
        return nicgate.remove_stale(taps) if taps else []
    except (LibvirtError, nicgate.NicGateError, ET.ParseError) as e:
        log.info("no dead gates looked for at %s: %s", uri, e)
        return []
    except Exception as e:  # (libvirtError of a domain that went meanwhile)
        log.info("no dead gates looked for at %s: %s", uri, e)
        return []
