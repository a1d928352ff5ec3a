"""Send while the guest runs (checkpoint.early_send): the pages written early in an epoch
go to the standby as uncommitted early parts, and the pause carries only what was written
since.  Real `mirror primary` and `mirror secondary` processes, the synthetic guest its
own process; and a real standby process fed by the test driver of test_standby_rejects
(the protocol's rules: early parts commit only with their final part, all or none)."""

from __future__ import annotations

import json
import mmap
from array import array
from dataclasses import replace
from pathlib import Path

import pytest

from mirror.config import CheckpointConfig, Config, GuestConfig
from mirror.guests.synthetic import (
    Cpu,
    SyntheticParams,
    initial_regs,
    reference_outputs,
    unpack_state,
)
from mirror.replication import pagediff as pd
from mirror.replication import wire
from tests.integration.conftest import Pair
from tests.integration.test_standby_rejects import Driver, committed_state, image_of

PS = pd.PAGE_SIZE

# 64 MiB, about 1,500 pages written per 50 ms epoch, 90% of them in a hot tenth of RAM
# (so that pages sent early are often written again before the pause); early send at
# 70% of the epoch
EARLY = replace(
    Config(),
    guest=replace(GuestConfig(), ram_mib=64, dirty_pages_per_s=30_000, outputs_per_s=200,
                  shape="hot"),
    checkpoint=replace(CheckpointConfig(), epoch_ms=50, scan="log", early_send=True,
                       early_send_at_pct=70),
)  # fmt: skip


def status_of(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())


# -- the protocol, on a real standby process ------------------------------------------


@pytest.fixture
def drv(pair: Pair):  # type: ignore[no-untyped-def]
    pair.start_secondary()
    d = Driver(pair)
    yield d
    d.link.close()


def early_part(d: Driver, epoch: int, part: int, pages: int = 30) -> wire.Pages:
    """Pages written since the driver's last scan, as early part ``part`` of ``epoch``."""
    for p in d.rnd.sample(range(d.npages), pages):
        d.ram[p * PS : p * PS + 8] = d.rnd.randbytes(8)
    dirty = pd.scan_exact(d.ram, d.shadow)
    batch = pd.gather(d.shadow, dirty)
    return wire.Pages.of(epoch, batch, pd.checksums(d.shadow, batch.index), part=part,
                         final=False)  # fmt: skip


def final_part(d: Driver, epoch: int, parts: int, rewrite: list[int]) -> wire.Pages:
    """The final part after ``parts`` early ones: ``rewrite`` (pages sent early) written
    again, and a few pages more."""
    for p in rewrite:
        d.ram[p * PS + 100 : p * PS + 108] = d.rnd.randbytes(8)
    msg = d.build(epoch)
    return replace(msg, part=parts)


def test_early_parts_commit_only_with_their_final_part(pair: Pair, drv: Driver) -> None:
    d = drv
    assert isinstance(d.hello(), wire.Welcome)
    d.ram[:] = bytes(len(d.ram))
    assert d.send(d.build(0, range(d.npages))) == d.ack(0)
    assert d.send(d.build(1)) == d.ack(1)
    at_1 = bytes(d.ram)
    assert image_of(pair) == at_1

    # two early parts of checkpoint 2: staged, unanswered, nothing applied
    e0, e1 = early_part(d, 2, 0), early_part(d, 2, 1)
    for m in (e0, e1):
        d.link.send(d.stamp(m))
        d.no_reply()
    st = pair.wait("two parts staged",
                   lambda: (s := status_of(pair.root / "hostB" / "status.json"))
                   and s["early_staged_parts"] == 2 and s)  # fmt: skip
    assert st["committed"] == 1
    assert image_of(pair) == at_1 and committed_state(pair) == b"device-state-1"

    # the final part: pages sent early written again; the last copy wins at the commit
    again = list(e0.index[:10]) + list(e1.index[:10])
    final = final_part(d, 2, 2, again)
    assert set(again) <= set(final.index)
    assert d.send(final) == wire.Ack(d.session, 2, 2)  # the ack names the final part
    assert image_of(pair) == bytes(d.ram)
    assert committed_state(pair) == b"device-state-2"
    at_2 = bytes(d.ram)

    # a final part that announces an early part the standby never got: rejected, all of
    # checkpoint 3 sent again (from part 0) commits
    e0 = early_part(d, 3, 0)
    final = final_part(d, 3, 1, [])
    reply = d.send(final)
    assert isinstance(reply, wire.Reject) and "follows 1 early parts, 0 staged" in reply.reason
    assert image_of(pair) == at_2
    d.link.send(d.stamp(e0))
    d.no_reply()
    assert d.send(final) == wire.Ack(d.session, 3, 1)
    assert image_of(pair) == bytes(d.ram)
    at_3 = bytes(d.ram)

    # an early part that does not verify: rejected, the staged parts dropped
    e0 = early_part(d, 4, 0)
    frames = d.frames(e0)
    bad = bytearray(frames[6])
    bad[len(bad) // 2] ^= 1
    reply = d.send_frames([*frames[:6], bytes(bad), *frames[7:]])
    assert isinstance(reply, wire.Reject) and "does not verify" in reply.reason
    # early parts carry raw pages only, no device state, no outputs; in order
    for wrong, why in (
        (replace(e0, state=b"x", state_sum=pd.checksum_bytes(b"x")), "no device state"),
        (replace(e0, part=1), "out of order"),
        (replace(e0, epoch=5), "out of order"),
    ):
        reply = d.send(wrong)
        assert isinstance(reply, wire.Reject) and why in reply.reason, reply
    assert image_of(pair) == at_3 and committed_state(pair) == b"device-state-3"

    # a new session drops what the old one staged
    d.link.send(d.stamp(e0))
    d.no_reply()
    assert isinstance(d.hello(), wire.Welcome)
    f4 = final_part(d, 4, 1, [])
    reply = d.send(f4)
    assert isinstance(reply, wire.Reject) and "0 staged" in reply.reason
    assert image_of(pair) == at_3
    # sent again in the new session, with an empty early part (nothing written meanwhile)
    # between: committed, all three parts
    empty = wire.Pages(4, 1, False, array("I"), b"", array("I"), array("Q"), [], [], b"", 0, [])
    for m in (e0, empty):
        d.link.send(d.stamp(m))
        d.no_reply()
    assert d.send(replace(f4, part=2)) == wire.Ack(d.session, 4, 2)
    assert image_of(pair) == bytes(d.ram)


# -- a real pair ------------------------------------------------------------------------


@pytest.mark.pair_config(EARLY)
def test_the_pause_carries_only_what_was_written_since_the_early_send(pair: Pair) -> None:
    n = 40
    b = pair.start_secondary()
    a = pair.start_primary("--checkpoints", str(n))
    st_a = pair.wait("A frozen", lambda: (s := a.status()) and s["phase"] == "frozen" and s, 90)
    st_b = pair.wait("B at N", lambda: (s := b.status()) and s["committed"] == n and s)
    # pages written again after their early send carry their last content: the image
    # is the guest's RAM at checkpoint N, byte for byte
    assert Path(st_a["ram"]).read_bytes() == Path(st_b["image"]).read_bytes()
    assert st_a["early_send"]["on"] and st_a["early_send"]["sends"] >= n // 2, st_a["early_send"]
    a.stop()
    recs = json.loads((pair.root / "hostA" / "stats.json").read_text())["checkpoints"][3:]
    early = [r for r in recs if r["early_parts"]]
    assert len(early) >= len(recs) // 2, [(r["pages"], r["early_pages"]) for r in recs]
    # sent at 70% of the epoch: the pause holds what the last 30% wrote, the early part
    # the rest (the hot pages written in both are in both)
    pause = sorted(r["pages"] for r in early)[len(early) // 2]
    sent_early = sorted(r["early_pages"] for r in early)[len(early) // 2]
    assert pause < sent_early, (pause, sent_early)
    assert all(r["bytes_sent"] >= r["early_bytes"] > 0 for r in early)
    assert st_b["early_pages"] >= sum(r["early_pages"] for r in early) // 2
    seqs = pair.observer.seen.seqs
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 20


def reference_ram(params: SyntheticParams, regs: list[int]) -> bytes:
    """The synthetic guest's RAM after the ticks up to ``regs``, computed here."""
    ram = mmap.mmap(-1, params.npages * PS)
    cpu = Cpu(ram, params, initial_regs(params))
    cpu.boot()
    while cpu.regs[0] < regs[0]:
        cpu.tick()
    assert list(cpu.regs) == regs
    return bytes(ram)


# B promotes on its own 8 s after A's silence: time to read its image first
SLOW_FAILOVER = replace(
    EARLY, arbiter=replace(EARLY.arbiter, silent_after_ms=8000, fence_after_ms=16_000)
)


@pytest.mark.pair_config(SLOW_FAILOVER)
def test_a_failover_after_an_early_send_resumes_from_the_last_commit(pair: Pair) -> None:
    """The primary host dies 100 ms after an early part left (the first from checkpoint
    15 on; the guest running, the final part never sent): the standby holds it staged,
    and its image is the previous checkpoint's RAM byte for byte, none of the early
    pages in it; promoted, the guest goes on from there."""
    b = pair.start_secondary()
    a = pair.start_primary(env={"MIRROR_FAULT": "after-early:15:100"})
    a.proc.wait(90)
    st = pair.wait("B with an early part staged",
                   lambda: (s := b.status()) and s["early_staged_parts"] >= 1
                   and s["early_staged_epoch"] >= 15 and s,
                   alive=[b])  # fmt: skip
    # (the checkpoints sent just before the kill may still be in the sockets once A is
    # dead: B passes through states with an earlier early part staged, which a later
    # checkpoint commits; the last thing A sent is an early part from checkpoint 15 on)
    assert st["committed"] >= 5 and st["early_staged_epoch"] == st["committed"] + 1, st
    state = Path(st["state"]).read_bytes()
    params, regs = unpack_state(state)
    image = Path(st["image"]).read_bytes()
    assert image == reference_ram(params, regs), "the image is not the last commit's RAM"

    promoted = pair.wait("B promoted", lambda: (s := b.status()) and s["role"] == "primary"
                         and s, 60, alive=[b])  # fmt: skip
    assert promoted.get("promoted_from") == st["committed"], promoted
    count = pair.observer.count()
    pair.wait("the promoted guest's outputs", lambda: pair.observer.count() > count + 40,
              alive=[b])  # fmt: skip
    outs = [(s, p) for s, p, _ in pair.observer.snapshot()]
    assert [s for s, _ in outs] == list(range(1, len(outs) + 1)), "outputs lost or repeated"
    assert outs == reference_outputs(params, len(outs)), "outputs differ from the guest's own"


TWO_SENDS = replace(EARLY, checkpoint=replace(EARLY.checkpoint, early_sends=2))


@pytest.mark.pair_config(TWO_SENDS)
def test_two_early_sends_an_epoch_commit_in_order(pair: Pair) -> None:
    """``early_sends = 2``: two early parts in most epochs (a page written in both
    intervals goes twice, the later copy wins), and the image is RAM at checkpoint N."""
    n = 30
    b = pair.start_secondary()
    a = pair.start_primary("--checkpoints", str(n))
    st_a = pair.wait("A frozen", lambda: (s := a.status()) and s["phase"] == "frozen" and s, 90)
    st_b = pair.wait("B at N", lambda: (s := b.status()) and s["committed"] == n and s)
    assert Path(st_a["ram"]).read_bytes() == Path(st_b["image"]).read_bytes()
    a.stop()
    recs = json.loads((pair.root / "hostA" / "stats.json").read_text())["checkpoints"][3:]
    assert sum(1 for r in recs if r["early_parts"] == 2) >= len(recs) // 2, [
        r["early_parts"] for r in recs
    ]
