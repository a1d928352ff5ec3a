"""A coverage-guided fuzzer (atheris, libFuzzer) of the wire decoder and the standby's
handling of what it decodes.

Run: ``python -m tests.security.fuzz_wire [libFuzzer options] [CORPUS_DIR ...]``, e.g.
``-max_total_time=3600`` for a long run (tests/security/test_fuzz.py runs it bounded,
MIRROR_FUZZ_SECONDS for longer).  An input is frames joined by ``SEP``; the standby has
a session open (SESSION) so that mutated messages of that session reach its page
handling.  Anything but a WireError out of the decoder, or any exception out of the
standby's handling, is a crash; so is a standby whose committed checkpoint moved
backwards or that lost its session.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from array import array
from dataclasses import replace
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["mirror"]):
    from mirror.config import Config, GuestConfig, KeysConfig, NodeConfig, PairConfig
    from mirror.replication import pagediff as pd
    from mirror.replication import wire
    from mirror.replication.standby import Standby

SEP = b"\xfe\xed\xfa\xce"
SESSION = 4242
RAM_MIB = 1
PS = pd.PAGE_SIZE


def seeds() -> list[bytes]:
    """Valid messages of the session: a pre-copy part, a checkpoint, the rest."""
    npages = (RAM_MIB << 20) // PS
    ram = pd.alloc_pages(npages)
    ram[: 3 * PS] = os.urandom(3 * PS)
    batch = pd.gather(ram, range(4))
    sums = pd.checksums(ram, batch.index)
    pages0 = wire.Pages.of(0, batch, sums, state=b"", outputs=[])
    pages1 = wire.Pages.of(1, batch, sums, state=b"state", outputs=[(1, b"out")])
    empty = wire.Pages(1, 0, True, array("I"), b"", array("I"), array("Q"), [], [], b"", 0, [])
    msgs: list[wire.Message] = [
        replace(pages0, session=SESSION, seq=1),
        replace(pages1, session=SESSION, seq=2),
        replace(empty, session=SESSION, seq=3),
        replace(empty, epoch=0, session=SESSION, seq=4),
        wire.Hello("fuzz", 1, "primary", RAM_MIB << 20, SESSION + 1),
        wire.Bye(SESSION, "primary", "x"),
        wire.Handover(SESSION, "primary", 1),
        wire.Ack(SESSION, 1, 0),
        wire.Heartbeat("primary", 1, 1, SESSION),
    ]
    return [SEP.join(bytes(f) for f in wire.encode(m)) for m in msgs]


def make_standby(image_dir: Path) -> Standby:
    cfg = Config(
        pair=PairConfig(name="fuzz"),
        node=NodeConfig(name="standby", state_dir=str(image_dir / "state")),
        guest=GuestConfig(ram_mib=RAM_MIB),
        keys=KeysConfig(insecure=True),
    )
    sb = Standby(
        cfg.link, cfg.keys, pair=cfg.pair.name, node=cfg.node.name,
        generation=cfg.pair.generation, ram_mib=cfg.guest.ram_mib, state_dir=cfg.state_dir,
        silent_after_ms=cfg.arbiter.silent_after_ms, image_dir=image_dir,
    )  # fmt: skip
    reply = sb.handle(wire.Hello("fuzz", 1, "primary", RAM_MIB << 20, SESSION))
    assert isinstance(reply, wire.Welcome), reply
    return sb


STATE: dict[str, Standby] = {}


def one_input(data: bytes) -> None:
    sb = STATE["standby"]
    frames = data.split(SEP)
    try:
        msg = wire.decode(frames, sb.ram_bytes // PS)
    except wire.WireError:
        return
    before = sb.committed
    sb.handle(msg)
    if sb.committed < before and not (isinstance(msg, wire.Pages) and msg.epoch == 0):
        raise AssertionError(f"committed went back from {before} to {sb.committed}")
    if sb.session is None or sb.session.session != SESSION:
        if isinstance(msg, wire.Bye | wire.Hello):  # a BYE of the session ends it, rightly
            sb.session = None
            sb.handle(wire.Hello("fuzz", 1, "primary", RAM_MIB << 20, SESSION))
            sb.committed_generation = 0  # let pre-copies in again
            return
        raise AssertionError(f"{type(msg).__name__} changed the session")
    sb.committed_generation = 0  # pre-copies stay possible, so mutations reach staging


def main(argv: list[str]) -> None:
    logging.disable(logging.CRITICAL)  # the standby logs every refusal
    with tempfile.TemporaryDirectory(prefix="mirror-fuzz-") as tmp:
        STATE["standby"] = make_standby(Path(tmp))
        corpus = [a for a in argv[1:] if not a.startswith("-")]
        for d in corpus:
            for i, s in enumerate(seeds()):
                (Path(d) / f"seed-{i}").write_bytes(s)
        try:
            atheris.Setup(argv, one_input)
            atheris.Fuzz()
        finally:
            STATE["standby"].close()


if __name__ == "__main__":
    main(sys.argv)
