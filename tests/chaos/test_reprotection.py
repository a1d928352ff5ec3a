"""Re-protection: after a failover the old primary's host comes back as a secondary,
the promoted host pairs with it under a new generation, and survives a second kill.
A node of the old generation is refused."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import replace

from mirror import config as config_mod
from mirror.config import MetricsConfig
from mirror.lab.demo import Host
from tests.chaos.test_host_kills import CHAOS, check_observer
from tests.integration.conftest import Pair


def promoted(host: Host):  # type: ignore[no-untyped-def]
    return (
        (s := host.status())
        and s.get("role") == "primary"
        and s.get("failover_ms") is not None
        and s
    )


def test_back_as_secondary_reprotected_then_survives_a_second_kill(pair_factory) -> None:
    pair: Pair = pair_factory(CHAOS)
    b = pair.start_secondary()
    a = pair.start_primary()
    pair.wait("checkpoints", lambda: (s := a.status()) and s["acked"] >= 5)
    a.signal(signal.SIGKILL)
    a.proc.wait()
    st = pair.wait("hostB to promote", lambda: promoted(b), alive=[b])
    assert st["generation"] == 2, st

    # host A comes back, as the secondary (same ports: on loopback its address is B's)
    a2 = Host(
        "hostA2",
        "secondary",
        replace(
            pair.cfg_a,
            node=replace(pair.cfg_a.node, name="hostA", state_dir=str(pair.root / "hostA2")),
        ),
        pair.root,
    )
    pair.hosts.append(a2)
    pair.wait(
        "hostB to re-protect",
        lambda: (s := b.status()) and s.get("phase") == "protected" and s.get("acked", 0) >= 5,
        alive=[b, a2],
    )
    assert (a2.status() or {}).get("generation") == 2

    # A primary of the old generation (its view of storage stale) is refused by the new
    # standby, and so is another node of the current generation: the standby stays paired.
    # Both hold the live primary's key (hostB's): without it they would not get as far.
    def intruder(name: str, arbiter_dir: str) -> subprocess.CompletedProcess[str]:
        cfg = pair.root / f"{name}.toml"
        node = replace(pair.cfg_a.node, name=name, state_dir=str(pair.root / name))
        arbiter = replace(pair.cfg_a.arbiter, dir=arbiter_dir)
        cfg.write_text(config_mod.to_toml(replace(
            pair.cfg_a, node=node, arbiter=arbiter, keys=pair.cfg_b.keys,
            metrics=MetricsConfig(listen=""),
        )))  # fmt: skip
        return subprocess.run(
            [sys.executable, "-m", "mirror", "primary", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    (pair.root / "stale-storage").mkdir()
    run = intruder("stale", str(pair.root / "stale-storage"))
    assert run.returncode == 2, run.stderr
    assert "generation 1" in run.stderr and "not the current generation" in run.stderr
    run = intruder("ghost", pair.cfg_a.arbiter.dir)
    assert run.returncode == 2, run.stderr
    assert "refused: paired with another primary" in run.stderr
    acked = (b.status() or {})["acked"]
    pair.wait(
        "hostB still protected", lambda: (b.status() or {})["acked"] > acked + 5, alive=[b, a2]
    )

    b.signal(signal.SIGKILL)  # the second failover
    b.proc.wait()
    st = pair.wait("hostA to promote again", lambda: promoted(a2), alive=[a2])
    assert st["generation"] == 3
    count = pair.observer.count()
    pair.wait(
        "outputs after the second failover", lambda: pair.observer.count() > count + 30, alive=[a2]
    )
    a2.stop()
    check_observer(pair)
    senders = sorted(set(pair.observer.seen.sources))
    assert len(senders) == 3, senders  # A, then B, then A again (refused nodes sent nothing)
