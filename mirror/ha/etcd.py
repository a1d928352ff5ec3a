"""A small etcd v3 client over etcd's JSON gateway (HTTP + urllib; no dependency).

etcd 3.4 (Debian 12's ``etcd-server``) serves the gateway at ``/v3/``; keys and
values travel base64-encoded and int64 fields as strings, and fields equal
to their default (0, false, empty) are left out of answers.

Only what the pool needs: range (one key or a prefix), put, delete,
transactions with compares, and leases.  Every failure is an
:class:`EtcdError` that names the URL.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from mirror.ha.arbiter import ArbiterError


class EtcdError(ArbiterError):
    """etcd could not be reached, or refused a request; the message names the URL."""


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _prefix_end(prefix: str) -> str:
    b = bytearray(prefix.encode())
    b[-1] += 1
    return _b64(bytes(b))


def _kv(d: dict[str, Any]) -> KV:
    return KV(
        base64.b64decode(d["key"]).decode(),
        base64.b64decode(d.get("value", "")),
        int(d.get("create_revision", 0)),
        int(d.get("mod_revision", 0)),
        int(d.get("lease", 0)),
    )


# -- transaction parts -----------------------------------------------------------------------


def put_op(key: str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def delete_op(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


def range_op(key: str) -> dict[str, Any]:
    return {"request_range": {"key": _b64(key)}}


def mod_is(key: str, revision: int) -> dict[str, Any]:
    """Compare: the key was last modified at ``revision`` (0: the key does not exist)."""
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def absent(key: str) -> dict[str, Any]:
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


class Etcd:
    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        if not self.url.startswith("http://"):
            raise EtcdError(f"etcd URL must be http://HOST:PORT, got {url!r}")
        self.timeout = timeout

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{self.url}/v3/{path}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return dict(json.loads(r.read() or b"{}"))
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read()).get("error", "")
            except (ValueError, OSError):
                msg = ""
            raise EtcdError(
                f"etcd at {self.url} refused {path}: HTTP {e.code} {msg or e.reason}"
            ) from None
        except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise EtcdError(f"etcd at {self.url} is unreachable: {reason}") from None
        except ValueError as e:
            raise EtcdError(f"etcd at {self.url} answered {path} with bad JSON: {e}") from None

    def health(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=self.timeout) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    # -- keys ----------------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        kvs = self.call("kv/range", {"key": _b64(key)}).get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under ``prefix`` at one revision, and that revision."""
        r = self.call("kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return [_kv(d) for d in r.get("kvs", [])], int(r.get("header", {}).get("revision", 0))

    def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        body = put_op(key, value, lease)["request_put"]
        return int(self.call("kv/put", body).get("header", {}).get("revision", 0))

    def delete_prefix(self, prefix: str) -> int:
        r = self.call("kv/deleterange", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return int(r.get("deleted", 0))

    def txn(
        self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> tuple[bool, list[dict[str, Any]]]:
        """(succeeded, responses): responses of ``success`` or of ``failure``."""
        r = self.call("kv/txn", {"compare": compare, "success": success,
                                 "failure": failure or []})
        return bool(r.get("succeeded", False)), list(r.get("responses", []))

    @staticmethod
    def range_kvs(response: dict[str, Any]) -> list[KV]:
        return [_kv(d) for d in response.get("response_range", {}).get("kvs", [])]

    # -- leases --------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        return int(self.call("lease/grant", {"TTL": str(ttl)})["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's renewed TTL in seconds; 0 if it has expired (or never existed)."""
        r = self.call("lease/keepalive", {"ID": str(lease)})
        return int(r.get("result", {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        try:
            self.call("lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if "HTTP 404" not in str(e):
                raise
