"""The etcd client, the etcd arbiter, the pool store and `mirror pool`, on a real etcd."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mirror.cli import main
from mirror.ha.etcd import Etcd, EtcdError, absent, put_op
from mirror.ha.etcd_arbiter import EtcdArbiter
from mirror.pool import admission
from mirror.pool.store import Conflict, Store
from tests.pool_etcd import etcd_server


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with etcd_server(tmp_path_factory.mktemp("etcd")) as url:
        yield url


@pytest.fixture
def etcd(etcd_url: str) -> Etcd:
    e = Etcd(etcd_url)
    e.delete_prefix("/")  # each test starts from an empty keyspace
    return e


def test_client_keys_transactions_and_leases(etcd: Etcd) -> None:
    etcd.put("/t/a", "1")
    kv = etcd.get("/t/a")
    assert kv is not None and kv.value == b"1" and kv.mod_revision > 0
    ok, _ = etcd.txn([absent("/t/a")], [put_op("/t/a", "2")])
    assert not ok and etcd.get("/t/a").value == b"1"  # type: ignore[union-attr]
    lease = etcd.grant(1)
    etcd.put("/t/leased", "x", lease)
    assert etcd.keepalive(lease) >= 1
    kvs, _ = etcd.get_prefix("/t/")
    assert [k.key for k in kvs] == ["/t/a", "/t/leased"]
    time.sleep(2.5)  # no keepalive: the lease expires and takes its key
    assert etcd.get("/t/leased") is None
    assert etcd.keepalive(lease) == 0
    etcd.revoke(lease)  # revoking a gone lease is not an error
    # etcd3gw found the gateway's path from /version: /v3/ on Debian 12's etcd 3.4
    assert etcd.client.api_path == "/v3/"


def test_unreachable_etcd_names_the_url() -> None:
    e = Etcd(f"http://127.0.0.1:{_closed_port()}", timeout=2)
    with pytest.raises(EtcdError, match=r"etcd at http://127\.0\.0\.1:\d+ is unreachable"):
        e.get("/x")
    with pytest.raises(EtcdError, match="must be http://"):
        Etcd("127.0.0.1:2379")


def _closed_port() -> int:
    from tests.pool_etcd import free_port

    return free_port()


def test_arbiter_slots_and_generation(etcd: Etcd) -> None:
    a = EtcdArbiter(etcd, "p", "A")
    b = EtcdArbiter(etcd, "p", "B")
    assert b.peer_age("A") is None and b.generation() == 0
    a.beat("primary", 3, 17)
    slot = b.peer_slot("A")
    assert slot is not None and (slot.role, slot.generation, slot.epoch) == ("primary", 3, 17)
    age = b.peer_age("A")
    assert age is not None and age < 0.1
    time.sleep(0.2)
    age = b.peer_age("A")
    assert age is not None and age >= 0.2
    a.beat("primary", 3, 18)
    age = b.peer_age("A")
    assert age is not None and age < 0.1
    a.set_generation(4)
    assert b.generation() == 4


def _claimer(url: str, generation: int, node: str, start: float, q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    arb = EtcdArbiter(Etcd(url), "p", node)
    time.sleep(max(0.0, start - time.time()))  # everyone claims at the same moment
    q.put((node, arb.claim(generation, node, "promote").won))


def test_exactly_one_concurrent_claimer_wins_each_generation(etcd: Etcd) -> None:
    ctx = multiprocessing.get_context("fork")
    trials = 30
    for generation in range(1, trials + 1):
        q: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
        start = time.time() + 0.15
        procs = [ctx.Process(target=_claimer, args=(etcd.url, generation, n, start, q))
                 for n in ("A", "B", "C", "D", "E")]
        for p in procs:
            p.start()
        for p in procs:
            p.join(20)
        wins = [node for node, won in (q.get(timeout=5) for _ in procs) if won]
        assert len(wins) == 1, f"generation {generation}: winners {wins}"
        holder = EtcdArbiter(etcd, "p", "X").claim(generation, "X", "late")
        assert not holder.won and holder.holder == wins[0] and holder.action == "promote"
    a = EtcdArbiter(etcd, "p", "A")
    assert a.claim(trials + 1, "A", "promote").won
    again = a.claim(trials + 1, "A", "promote")
    assert again.won and again.holder == "A"  # asking again tells the same answer


def test_concurrent_changes_never_commit_over_each_other(etcd: Etcd) -> None:
    store = Store(etcd)
    store.mutate(lambda s: (admission.add_host(
        admission.configure(s.pool, 0, None).pool, "a", 65536, 64).pool, None, None))
    s1, s2 = store.load(), store.load()
    after1 = admission.add_vm(s1.pool, "v1", 1024, 1, "restart", keep="none").pool
    after2 = admission.add_vm(s2.pool, "v2", 1024, 1, "restart", keep="none").pool
    store.commit(s1, after1, None)
    with pytest.raises(Conflict):
        store.commit(s2, after2, None)  # computed from the state before v1: refused
    assert sorted(store.load().pool.vms) == ["v1"]

    errors: list[BaseException] = []

    def adder(i: int) -> None:
        try:
            Store(Etcd(etcd.url)).mutate(
                lambda s: (admission.add_vm(s.pool, f"w{i}", 512, 1, "best-effort",
                                            keep="none").pool, None, None), tries=50)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=adder, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    snap = store.load()
    assert sorted(snap.pool.vms) == ["v1"] + [f"w{i}" for i in range(8)]
    assert snap.version == 2 + 8
    snap.pool.check()


def _cli(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> tuple[int, str, str]:
    rc = main(["pool", *args[:2], *args[2:], "--etcd", url] if args[0] in ("host", "vm")
              else ["pool", *args, "--etcd", url])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_changes_status_plan_and_refusals(
    etcd: Etcd, capsys: pytest.CaptureFixture[str]
) -> None:
    url = etcd.url
    for h in ("a", "b", "c"):
        assert _cli(capsys, url, "host", "add", h, "--mem", "16384", "--vcpus", "8")[0] == 0
    rc, out, _ = _cli(capsys, url, "vm", "add", "web", "--mem", "4096", "--vcpus", "2",
                      "--priority", "mirrored")
    assert rc == 0 and "start VM web" in out and "tolerates 1 host failure" in out
    assert _cli(capsys, url, "vm", "add", "db", "--mem", "8192", "--priority", "restart",
                "--host", "c")[0] == 0
    assert _cli(capsys, url, "vm", "add", "batch", "--mem", "2048", "--priority", "best-effort",
                "--host", "a")[0] == 0
    before = json.dumps(Store(etcd).load().pool.to_json())
    rc, _, err = _cli(capsys, url, "vm", "add", "big", "--mem", "12288", "--priority",
                      "restart")
    assert rc == 1 and "refused" in err and "short by" in err and "big" in err
    rc, _, err = _cli(capsys, url, "vm", "add", "x", "--mem", "1024", "--priority", "gold")
    assert rc == 2 and "bad priority 'gold'" in err
    rc, _, err = _cli(capsys, url, "vm", "add", "x", "--mem", "1024", "--priority", "restart",
                      "--host", "zz")
    assert rc == 2 and "unknown host 'zz'" in err
    rc, _, err = _cli(capsys, url, "vm", "add", "x", "--mem", "99999", "--priority", "restart")
    assert rc == 2 and "larger than every host" in err
    assert json.dumps(Store(etcd).load().pool.to_json()) == before  # nothing committed
    dead = f"http://127.0.0.1:{_closed_port()}"
    rc, _, err = _cli(capsys, dead, "status")
    assert rc == 2 and f"etcd at {dead} is unreachable: Connection refused" in err

    rc, out, _ = _cli(capsys, url, "status", "--json")
    st = json.loads(out)
    assert rc == 0 and st["tolerated"] == 1 and not st["overcommitted"]
    assert {h["name"]: h["runs"] for h in st["hosts"]}["c"] == ["db"]
    rc, out, _ = _cli(capsys, url, "status")
    assert rc == 0 and "tolerates 1 host failure(s) (failures_to_tolerate 1: OK)" in out
    rc, out, _ = _cli(capsys, url, "plan", "--failures", "2", "--json")
    plan = json.loads(out)
    assert rc == 0 and not plan["survives"] and plan["breaking"]["unplaced"]
    rc, out, _ = _cli(capsys, url, "plan")
    assert rc == 0 and "if c fails:" in out and "db" in out

    assert _cli(capsys, url, "config", "--allow-overcommit", "yes")[0] == 0
    rc, out, err = _cli(capsys, url, "vm", "add", "big", "--mem", "12288", "--priority",
                        "restart")
    assert rc == 0 and "WARNING: overcommitted" in err and "big" in err
    rc, out, _ = _cli(capsys, url, "status")
    assert "OVERCOMMITTED" in out
    assert _cli(capsys, url, "vm", "remove", "big")[0] == 0
    rc, out, _ = _cli(capsys, url, "vm", "resize", "db", "--mem", "9000")
    assert rc == 0 and "resize VM db" in out
    stored = json.loads(etcd.get("/mirror/pool/plan").value)  # type: ignore[union-attr]
    assert stored["version"] == Store(etcd).load().version  # recomputed on every change
    assert set(stored["single_failure_plans"]) == {"a", "b", "c"}


def test_cli_pair_settings_ports_and_names(etcd: Etcd, capsys: pytest.CaptureFixture[str]) -> None:
    from mirror.pool.model import PAIR_PORTS_FROM, pair_name

    url = etcd.url

    def cli(*args: str) -> int:
        return main(["pool", *args, "--etcd", url])

    for h in ("a", "b", "c"):
        assert cli("host", "add", h, "--mem", "4096", "--vcpus", "4") == 0
    assert cli("vm", "add", "p1", "--mem", "512", "--priority", "mirrored",
               "--observer", "127.0.0.1:9000") == 0
    assert cli("vm", "add", "p2", "--mem", "512", "--priority", "mirrored",
               "--observer", "127.0.0.1:9001", "--guest-ram-mib", "32") == 0
    assert cli("vm", "add", "s1", "--mem", "512", "--priority", "mirrored") == 0  # stand-in
    capsys.readouterr()
    assert cli("vm", "add", "x", "--mem", "512", "--priority", "restart",
               "--observer", "127.0.0.1:9002") == 2
    assert "--observer is only for mirrored VMs" in capsys.readouterr().err
    assert cli("vm", "add", "x", "--mem", "512", "--priority", "mirrored",
               "--observer", "nowhere") == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
    assert cli("vm", "add", "x", "--mem", "512", "--priority", "mirrored",
               "--observer", "127.0.0.1:9", "--link-ports", f"{PAIR_PORTS_FROM},5") == 2
    assert "pair of VM p1 uses them" in capsys.readouterr().err
    pool = Store(etcd).load().pool
    assert set(pool.pairs) == {"p1", "p2"}  # the refused adds committed nothing
    p1, p2 = pool.pairs["p1"], pool.pairs["p2"]
    assert (p1.pair, p1.data_port, p1.heartbeat_port, p1.observer, p1.ram_mib) == (
        "vm-p1", PAIR_PORTS_FROM, PAIR_PORTS_FROM + 1, "127.0.0.1:9000", 16)
    assert (p2.data_port, p2.heartbeat_port, p2.ram_mib) == (
        PAIR_PORTS_FROM + 2, PAIR_PORTS_FROM + 3, 32)
    pool.check()
    capsys.readouterr()
    assert cli("status") == 0
    assert f"pair vm-p1, link ports {PAIR_PORTS_FROM},{PAIR_PORTS_FROM + 1}, observer " \
        "127.0.0.1:9000" in capsys.readouterr().out
    assert cli("status", "--json") == 0
    vms = {v["name"]: v for v in json.loads(capsys.readouterr().out)["vms"]}
    assert vms["p2"]["pair"]["ram_mib"] == 32 and vms["s1"]["pair"] is None
    assert cli("vm", "remove", "p1") == 0
    pool = Store(etcd).load().pool
    assert set(pool.pairs) == {"p2"}
    assert pool.free_pair_ports() == (PAIR_PORTS_FROM, PAIR_PORTS_FROM + 1)  # reused
    long = "v" * 64
    assert len(pair_name(long)) == 64 and pair_name(long) != pair_name("v" * 63 + "w")
    assert pair_name("web") == "vm-web"


def _j(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    """`mirror pool ARGV --json`: exit status, the one JSON object on stdout, stderr."""
    capsys.readouterr()
    rc = main(["pool", *argv, "--json"])
    out = capsys.readouterr()
    return rc, json.loads(out.out), out.err


def test_cli_exit_codes_json_for_every_outcome_and_definitions(
    etcd: Etcd, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ["--etcd", etcd.url]
    # nothing under the prefix (a mistyped --prefix): no pool there, an error
    rc, st, err = _j(capsys, "status", *url)
    assert rc == 2 and st["ok"] is False and "no pool under prefix /mirror/pool/" in st["error"]
    assert "is --prefix (or $MIRROR_POOL_PREFIX) right?" in err
    rc, st, _ = _j(capsys, "plan", "--prefix", "/mirror/pol/", *url)
    assert rc == 2 and "no pool under prefix /mirror/pol/" in st["error"]
    # a pool with no host tolerates any number of failures: nothing needs a host
    assert main(["pool", "config", "--failures", "1", *url]) == 0
    rc, st, _ = _j(capsys, "status", *url)
    assert rc == 0 and not st["overcommitted"] and st["survives"] and st["breaking"] is None
    assert st["tolerates_any_number"]
    assert main(["pool", "status", *url]) == 0
    assert "OVERCOMMITTED" not in capsys.readouterr().out
    for h in ("a", "b", "c"):
        assert main(["pool", "host", "add", h, "--mem", "8192", "--vcpus", "4", *url]) == 0
    assert main(["pool", "vm", "add", "be", "--mem", "1024", "--priority", "best-effort",
                 *url]) == 0
    # k larger than the hosts: every set of them, all included, survives (nothing guaranteed)
    rc, out, _ = _j(capsys, "config", "--failures", "4", *url)
    assert rc == 0 and out["analysis"]["survives"] and out["warning"] is None
    # ... but not with a guaranteed VM: the refusal names the set that breaks
    rc, out, err = _j(capsys, "vm", "add", "r", "--mem", "1024", "--priority", "restart",
                      *url)
    assert rc == 1 and out["exit"] == 1 and "if a, b, c fail" in out["refused"], out
    assert "r (does not run: needs 1024 MiB)" in err
    assert out["analysis"]["breaking"]["failed"] == ["a", "b", "c"]
    assert main(["pool", "config", "--failures", "1", *url]) == 0
    assert main(["pool", "vm", "add", "db", "--mem", "4096", "--vcpus", "2", "--priority",
                 "restart", "--host", "a", *url]) == 0
    assert main(["pool", "vm", "add", "web", "--mem", "2048", "--priority", "mirrored",
                 "--host", "b", "--standby", "c", *url]) == 0
    capsys.readouterr()
    before = json.dumps(Store(etcd).load().pool.to_json())
    # refusals exit 1, with JSON on stdout: no room on its host, maintenance, a busy host
    rc, out, err = _j(capsys, "vm", "resize", "db", "--mem", "4096", "--vcpus", "5", *url)
    assert rc == 1 and out["exit"] == 1 and "vCPUs over)" in out["refused"], out
    assert "-" not in out["refused"].split("capacity")[1], out  # no negative overage
    assert "MiB" not in out["refused"].split("capacity")[1], out  # the memory is not over
    rc, out, _ = _j(capsys, "host", "maintenance", "a", "on", *url)
    assert rc == 1 and "refused" in out["refused"], out
    rc, out, _ = _j(capsys, "host", "remove", "a", *url)
    assert rc == 1 and "still holds" in out["refused"], out
    # a best-effort VM is admission-checked, and the refusal says why
    rc, out, _ = _j(capsys, "vm", "add", "be2", "--mem", "3000", "--priority", "best-effort",
                    "--host", "a", *url)
    assert rc == 1 and "failed-over VMs never preempt it" in out["refused"], out
    # errors exit 2, with JSON on stdout too: bad input, unknown names, argparse's own
    rc, out, _ = _j(capsys, "vm", "resize", "nope", "--mem", "1", *url)
    assert rc == 2 and out == {"ok": False, "error": "unknown VM 'nope'", "exit": 2}
    with pytest.raises(SystemExit) as e:
        main(["pool", "vm", "add", "x", "--mem", "lots", "--priority", "restart", "--json",
              *url])
    out = json.loads(capsys.readouterr().out)
    assert e.value.code == 2 and out["exit"] == 2 and "not an integer: 'lots'" in out["error"]
    rc, out, _ = _j(capsys, "status", "--prefix", "no-slash", *url)
    assert rc == 2 and "bad etcd key prefix 'no-slash'" in out["error"]
    assert json.dumps(Store(etcd).load().pool.to_json()) == before  # nothing committed
    # status and plan say the same thing, with the same fields
    rc, st, _ = _j(capsys, "status", *url)
    rc2, pl, _ = _j(capsys, "plan", *url)
    assert rc == rc2 == 0
    for key in ("failures", "survives", "overcommitted", "tolerated", "tolerated_exact",
                "breaking", "failures_to_tolerate"):
        assert st[key] == pl[key], key
    assert st["survives"] and st["breaking"] is None and not st["overcommitted"]
    assert st["breaks_beyond"] is not None and len(st["breaks_beyond"]["failed"]) == 2
    assert st["breaks_beyond"]["proof_only"] and "not a plan" in st["breaks_beyond"]["note"]
    rc, pl2, _ = _j(capsys, "plan", "--failures", "2", *url)
    assert not pl2["survives"] and pl2["breaking"] is not None and not pl2["overcommitted"]
    # beyond what it tolerates: a and b fail: web's standby on c survived: it runs there
    p = next(p for p in pl2["plans"] if p["failed"] == ["a", "b"])
    assert {"vm": "web", "kind": "promote", "to": "c", "mem_mb": 2048} in p["moves"]
    assert {"vm": "db", "kind": "restart", "to": "c", "mem_mb": 4096} in p["moves"]
    assert p["down"] == [] and p["unprotected"] == ["web"] and p["needs_mb"] == {"web": 2048}
    assert {"vm": "be", "kind": "best-effort", "to": "c", "mem_mb": 1024} in p["moves"]
    assert p["lost_best_effort"] == [] and p["optimal"]
    # the text plan: no empty "if X fails:" header
    assert main(["pool", "plan", "--failures", "2", *url]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("if ", "no failure")):
            assert i + 1 < len(lines) and lines[i + 1].startswith("  "), text
    assert "web            promote      -> c" in text, text
    assert "running without a standby: web (needs 2048 MiB)" in text, text


def test_two_pools_share_one_etcd_under_their_prefixes(
    etcd: Etcd, capsys: pytest.CaptureFixture[str]
) -> None:
    from mirror.pool.model import PairSpec
    from mirror.pool.poolagent import pair_config

    a = ["--etcd", etcd.url]
    b = ["--etcd", etcd.url, "--prefix", "/mirror/pool-b"]
    assert main(["pool", "host", "add", "h1", "--mem", "4096", "--vcpus", "4", *a]) == 0
    assert main(["pool", "host", "add", "h1", "--mem", "8192", "--vcpus", "8", *b]) == 0
    assert main(["pool", "host", "add", "h2", "--mem", "8192", "--vcpus", "8", *b]) == 0
    assert main(["pool", "config", "--failures", "0", *a]) == 0  # one host: it cannot fail
    assert main(["pool", "vm", "add", "web", "--mem", "1024", "--priority", "restart", *a]) == 0
    assert main(["pool", "config", "--failures", "0", *b]) == 0
    assert main(["pool", "vm", "add", "web", "--mem", "2048", "--priority", "mirrored",
                 "--observer", "127.0.0.1:9000", *b]) == 0
    capsys.readouterr()
    rc, sa, _ = _j(capsys, "status", *a)
    rc2, sb, _ = _j(capsys, "status", *b)
    assert rc == rc2 == 0 and sb["prefix"] == "/mirror/pool-b/"
    assert [h["name"] for h in sa["hosts"]] == ["h1"] and len(sb["hosts"]) == 2
    assert sa["vms"][0]["mem_mb"] == 1024 and sb["vms"][0]["mem_mb"] == 2048
    kvs, _ = etcd.get_prefix("/mirror/pool/")
    assert all(not kv.key.startswith("/mirror/pool-b") for kv in kvs)
    # the default pool's keys are where they always were
    assert etcd.get("/mirror/pool/vms/web") is not None
    # their pairs (both named vm-web) keep arbiter keys apart: the default pool's where a
    # pair's always were, pool b's under its own prefix
    store_a, store_b = Store(etcd), Store(etcd, "/mirror/pool-b/")
    assert store_a.arbiter == "/mirror/arbiter"
    assert store_b.arbiter == "/mirror/pool-b/arbiter"
    spec = PairSpec("vm-web", 7600, 7601, "127.0.0.1:9000")
    cfg = pair_config(spec, "h1", etcd.url, Path("/tmp/x"), store_b.arbiter)
    arb = EtcdArbiter(etcd, spec.pair, "h1", prefix=cfg.arbiter.etcd_prefix)
    arb.set_generation(5)
    assert etcd.get("/mirror/pool-b/arbiter/vm-web/generation") is not None
    assert etcd.get("/mirror/arbiter/vm-web/generation") is None
    # the pool's own load skips its pairs' arbiter keys
    assert sorted(store_b.load().pool.vms) == ["web"]
    # prefixes that would nest with the default pool's or the pairs' keys are refused
    for bad in ("/mirror/", "/mirror/pool/sub/", "/mirror/arbiter/x/", "/"):
        rc, out, _ = _j(capsys, "status", "--prefix", bad, "--etcd", etcd.url)
        assert rc == 2 and ("nests with" in out["error"] or "bad etcd key prefix"
                            in out["error"]), (bad, out)
