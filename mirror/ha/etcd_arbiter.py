"""The arbiter interface on etcd: heartbeat slots as keys, claims as transactions.

Keys under ``{prefix}/{pair}/``: ``slot/{node}`` (the heartbeat, JSON like the
directory arbiter's), ``generation`` and ``claims/{generation}``.  A claim is
a transaction "create claims/G if it does not exist, else read it": etcd
serialises transactions, so exactly one caller per generation wins, however
many claim at once.  Ages are judged, as in :class:`DirectoryArbiter`, by
when the peer's sequence number last changed on the reader's own clock.
The pool controller claims each VM's restart through the same primitive.
What is read back is validated as in the directory arbiter (a garbage slot is
ignored, a garbage claim is nobody's), and etcd failures are ArbiterErrors.
"""

from __future__ import annotations

import json
import time

from mirror.ha.arbiter import (
    Arbiter,
    ArbiterError,
    ClaimResult,
    Slot,
    parse_claim,
    parse_generation,
    parse_slot,
)
from mirror.ha.etcd import Etcd, EtcdError, absent, put_op, range_op


def claim_key(etcd: Etcd, key: str, node: str, action: str) -> ClaimResult:
    """Create ``key`` for ``node`` unless it exists: exactly one caller ever wins it."""
    body = json.dumps({"node": node, "action": action, "time": time.time()})
    ok, resp = etcd.txn([absent(key)], [put_op(key, body)], [range_op(key)])
    if ok:
        return ClaimResult(True, node, action)
    try:
        kvs = Etcd.range_kvs(resp[0]) if resp else []
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EtcdError(f"etcd at {etcd.url} answered the claim of {key} with garbage") from e
    if not kvs:
        raise EtcdError(f"claim {key} at {etcd.url}: held, but its holder cannot be read")
    held = parse_claim(kvs[0].value)
    if held is None:
        return ClaimResult(False, f"nobody (invalid claim {key}: not written by mirror)", "?")
    return ClaimResult(held[0] == node, held[0], held[1])


class EtcdArbiter(Arbiter):
    def __init__(self, etcd: Etcd, pair: str, node: str, prefix: str = "/mirror/arbiter") -> None:
        self.etcd = etcd
        self.dir = f"{prefix.rstrip('/')}/{pair}/"
        self.node = node
        self._seq = 0
        super().__init__()

    def beat(self, role: str, generation: int, epoch: int) -> None:
        self._seq += 1
        body = json.dumps(
            {
                "node": self.node,
                "seq": self._seq,
                "time": time.time(),
                "role": role,
                "generation": generation,
                "epoch": epoch,
            }
        )
        self.etcd.put(f"{self.dir}slot/{self.node}", body)

    def _load_slot(self, peer: str) -> Slot | None:
        try:
            kv = self.etcd.get(f"{self.dir}slot/{peer}")
            if kv is None:
                return None
        except (ArbiterError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return parse_slot(kv.value, peer)

    def generation(self) -> int:
        try:
            kv = self.etcd.get(f"{self.dir}generation")
        except (ValueError, KeyError, TypeError, AttributeError):
            return 0
        return 0 if kv is None else parse_generation(kv.value)

    def set_generation(self, generation: int) -> None:
        self.etcd.put(f"{self.dir}generation", str(generation))

    def claim(self, generation: int, node: str, action: str) -> ClaimResult:
        return claim_key(self.etcd, f"{self.dir}claims/generation-{generation}", node, action)
