"""A pair whose arbiter is etcd (`arbiter.etcd`), not a shared directory: the primary
killed, the secondary wins the promote claim as an etcd transaction and goes on."""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path

from mirror.ha.etcd import Etcd
from tests.chaos.test_host_kills import CHAOS, check_observer
from tests.chaos.test_reprotection import promoted
from tests.pool_etcd import etcd_server


def test_pair_on_an_etcd_arbiter_fails_over(pair_factory, tmp_path: Path) -> None:
    with etcd_server(tmp_path) as url:
        pair = pair_factory(replace(CHAOS, arbiter=replace(CHAOS.arbiter, etcd=url)))
        b = pair.start_secondary()
        a = pair.start_primary()
        pair.wait("checkpoints", lambda: (s := a.status()) and s["acked"] >= 10)
        etcd = Etcd(url)
        prefix = f"/mirror/arbiter/{pair.cfg_a.pair.name}/"
        slot = etcd.get(prefix + "slot/hostA")
        assert slot is not None and json.loads(slot.value)["role"] == "primary"
        a.signal(signal.SIGKILL)
        a.proc.wait()
        st = pair.wait("hostB to promote", lambda: promoted(b), alive=[b])
        assert st["generation"] == 2
        claim = etcd.get(prefix + "claims/generation-1")
        assert claim is not None and json.loads(claim.value)["node"] == "hostB"
        gen = etcd.get(prefix + "generation")
        assert gen is not None and int(gen.value) == 2
        count = pair.observer.count()
        pair.wait("outputs after the failover", lambda: pair.observer.count() > count + 30,
                  alive=[b])  # fmt: skip
        b.stop()
        check_observer(pair)
        assert not Path(pair.cfg_a.arbiter.dir).exists(), "the shared directory was used"
