"""The pool's etcd client: etcd3gw (the library mirror uses) against the hand-written
urllib client it replaced, on a real etcd started for the run (Debian's etcd-server).

usage: python -m bench.etcd_client [--ops N] [--json PATH]

Each operation the pool and the etcd arbiter make (range of one key, put, a
create-if-absent transaction, a range of a prefix, lease keepalive) is timed
N times per client, interleaved round-robin so that both see the same etcd.
Prints the median and p99 latency of each, and the ratio library/baseline.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mirror.ha.etcd import Etcd, absent, put_op
from mirror.hoststate import percentile


class UrllibEtcd:
    """The baseline: the hand-written client (one HTTP connection per request, urllib)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{self.url}/v3/{path}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return dict(json.loads(r.read() or b"{}"))

    def get(self, key: str) -> Any:
        return self.call("kv/range", {"key": base64.b64encode(key.encode()).decode()})

    def put(self, key: str, value: str) -> Any:
        return self.call("kv/put", put_op(key, value)["request_put"])

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> Any:
        return self.call("kv/txn", {"compare": compare, "success": success, "failure": []})

    def get_prefix(self, prefix: str) -> Any:
        end = bytearray(prefix.encode())
        end[-1] += 1
        b64 = base64.b64encode
        return self.call(
            "kv/range", {"key": b64(prefix.encode()).decode(), "range_end": b64(end).decode()}
        )

    def grant(self, ttl: int) -> int:
        return int(self.call("lease/grant", {"TTL": str(ttl)})["ID"])

    def keepalive(self, lease: int) -> Any:
        return self.call("lease/keepalive", {"ID": str(lease)})


def ops(client: Any, tag: str, n: int) -> dict[str, Callable[[int], object]]:
    lease = client.grant(60)
    for i in range(20):
        client.put(f"/bench/{tag}/p/{i}", "x" * 100)
    return {
        "range": lambda i: client.get(f"/bench/{tag}/p/{i % 20}"),
        "put": lambda i: client.put(f"/bench/{tag}/slot", f'{{"seq": {i}}}'),
        "txn": lambda i: client.txn(
            [absent(f"/bench/{tag}/claim/{i}")], [put_op(f"/bench/{tag}/claim/{i}", "me")]
        ),
        "range_prefix": lambda i: client.get_prefix(f"/bench/{tag}/p/"),
        "keepalive": lambda i: client.keepalive(lease),
    }


def run(url: str, n: int) -> list[dict[str, Any]]:
    clients = {"etcd3gw": Etcd(url), "urllib (baseline)": UrllibEtcd(url)}
    table = {name: ops(c, name.split()[0], n) for name, c in clients.items()}
    times: dict[tuple[str, str], list[float]] = {}
    for i in range(n):
        for op in table["etcd3gw"]:
            for name in clients:
                t0 = time.perf_counter()
                table[name][op](i)
                times.setdefault((op, name), []).append((time.perf_counter() - t0) * 1000)
    rows = []
    for op in table["etcd3gw"]:
        lib, base = times[(op, "etcd3gw")], times[(op, "urllib (baseline)")]
        rows.append({
            "op": op, "n": n,
            "etcd3gw_ms_p50": round(percentile(lib, 50), 3),
            "etcd3gw_ms_p99": round(percentile(lib, 99), 3),
            "urllib_ms_p50": round(percentile(base, 50), 3),
            "urllib_ms_p99": round(percentile(base, 99), 3),
            "ratio_p50": round(percentile(lib, 50) / percentile(base, 50), 2),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.etcd_client", description=__doc__)
    ap.add_argument("--ops", type=int, default=500, help="operations per kind and client")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    from tests.pool_etcd import etcd_server  # the tests' real etcd: free ports, own dir

    with (
        tempfile.TemporaryDirectory(prefix="mirror-bench-etcd-") as tmp,
        etcd_server(Path(tmp)) as url,
    ):
        rows = run(url, args.ops)
    print(f"{'op':<14}{'etcd3gw p50':>12}{'p99':>9}{'urllib p50':>12}{'p99':>9}{'ratio':>8}")
    for r in rows:
        lib = f"{r['etcd3gw_ms_p50']:>10.3f}ms{r['etcd3gw_ms_p99']:>7.3f}ms"
        base = f"{r['urllib_ms_p50']:>10.3f}ms{r['urllib_ms_p99']:>7.3f}ms"
        print(f"{r['op']:<14}{lib}{base}{r['ratio_p50']:>7.2f}x")
    print("ratio: etcd3gw p50 / urllib p50 (below 1: the library is faster)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
