"""The arbiter interface on etcd: heartbeat slots as keys, claims as transactions.

Keys under ``{prefix}/{pair}/``: ``slot/{node}`` (the heartbeat, JSON like the
directory arbiter's), ``generation`` and ``claims/{generation}``.  A claim is
a transaction "create claims/G if it does not exist, else read it": etcd
serialises transactions, so exactly one caller per generation wins, however
many claim at once.  Ages are judged, as in :class:`DirectoryArbiter`, by
when the peer's sequence number last changed on the reader's own clock.
The pool controller claims each VM's restart through the same primitive.
"""

from __future__ import annotations

import json
import time

from mirror.ha.arbiter import Arbiter, ArbiterError, ClaimResult, Slot
from mirror.ha.etcd import Etcd, absent, put_op, range_op


def claim_key(etcd: Etcd, key: str, node: str, action: str) -> ClaimResult:
    """Create ``key`` for ``node`` unless it exists: exactly one caller ever wins it."""
    body = json.dumps({"node": node, "action": action, "time": time.time()})
    ok, resp = etcd.txn([absent(key)], [put_op(key, body)], [range_op(key)])
    if ok:
        return ClaimResult(True, node, action)
    kvs = Etcd.range_kvs(resp[0]) if resp else []
    if not kvs:
        return ClaimResult(False, "?", "?")
    try:
        d = json.loads(kvs[0].value)
        return ClaimResult(d.get("node") == node, str(d.get("node")), str(d.get("action")))
    except ValueError:
        return ClaimResult(False, "?", "?")


class EtcdArbiter(Arbiter):
    def __init__(self, etcd: Etcd, pair: str, node: str, prefix: str = "/mirror/arbiter") -> None:
        self.etcd = etcd
        self.dir = f"{prefix.rstrip('/')}/{pair}/"
        self.node = node
        self._seq = 0
        super().__init__()

    def beat(self, role: str, generation: int, epoch: int) -> None:
        self._seq += 1
        body = json.dumps({"node": self.node, "seq": self._seq, "time": time.time(),
                           "role": role, "generation": generation, "epoch": epoch})
        self.etcd.put(f"{self.dir}slot/{self.node}", body)

    def _load_slot(self, peer: str) -> Slot | None:
        try:
            kv = self.etcd.get(f"{self.dir}slot/{peer}")
            if kv is None:
                return None
            d = json.loads(kv.value)
            return Slot(str(d["node"]), int(d["seq"]), str(d["role"]), int(d["generation"]),
                        int(d["epoch"]))
        except (ArbiterError, ValueError, KeyError, TypeError):
            return None

    def generation(self) -> int:
        kv = self.etcd.get(f"{self.dir}generation")
        try:
            return 0 if kv is None else int(kv.value)
        except ValueError:
            return 0

    def set_generation(self, generation: int) -> None:
        self.etcd.put(f"{self.dir}generation", str(generation))

    def claim(self, generation: int, node: str, action: str) -> ClaimResult:
        return claim_key(self.etcd, f"{self.dir}claims/generation-{generation}", node, action)
