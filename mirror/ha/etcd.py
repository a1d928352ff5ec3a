"""The pool's etcd client: etcd3gw (PyPI) over etcd's v3 JSON gateway.

etcd3gw finds the gateway's path from ``/version`` (``/v3/`` on etcd 3.4, Debian 12's
``etcd-server``; ``/v3beta/`` on 3.3), keeps one HTTP connection alive per client
(requests), and maps HTTP failures to its exceptions.  Keys and values travel
base64-encoded and int64 fields as strings; fields equal to their default (0,
false, empty) are left out of answers.  bench/etcd_client.py times it against the
hand-written urllib client it replaced.

What the pool needs, as this module's small facade: range (one key or a prefix, with
its revision), put, delete, transactions with compares (the operations built by
put_op, delete_op, range_op, mod_is and absent), and leases.  Every failure is an
:class:`EtcdError` that names the URL.
"""

from __future__ import annotations

import base64
import re
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any

import requests
from etcd3gw import exceptions as etcd3gw_errors
from etcd3gw.client import Etcd3Client
from etcd3gw.lease import Lease

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


def _reason(e: Exception, detail: str) -> str:
    """Why a connection failed, in a few words: the system's message (``Connection
    refused``) out of requests' long text, a timeout, or the exception's name."""
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", detail)
    if m:
        return m.group(1).strip()
    if isinstance(e, etcd3gw_errors.ConnectionTimeoutError | requests.Timeout) or \
            "timed out" in detail.lower():
        return "no answer in time (timed out)"
    return detail[:200] or type(e).__name__


class Etcd:
    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        parts = urllib.parse.urlsplit(self.url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "http" or not parts.hostname or port is None or parts.path:
            raise EtcdError(f"etcd URL must be http://HOST:PORT, got {url!r}")
        self.timeout = timeout
        self.client = Etcd3Client(parts.hostname, port, "http", timeout=timeout)
        self._path_lock = threading.Lock()  # the gateway's path is discovered once

    def _fail(self, what: str, e: Exception) -> EtcdError:
        unreachable = (
            etcd3gw_errors.ConnectionFailedError,
            etcd3gw_errors.ConnectionTimeoutError,
            requests.RequestException,
        )
        detail = (getattr(e, "detail_text", None) or str(e)).strip()
        if isinstance(e, unreachable):
            return EtcdError(f"etcd at {self.url} is unreachable: {_reason(e, detail)}")
        return EtcdError(f"etcd at {self.url} refused {what}: {detail[:200]}")

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the gateway's ``path`` (e.g. "kv/range"); its JSON answer."""
        try:
            with self._path_lock:
                url = self.client.get_url(path)
            return dict(self.client.post(url, json=body))
        except (etcd3gw_errors.Etcd3Exception, requests.RequestException) as e:
            raise self._fail(path, e) from None
        except ValueError as e:
            raise EtcdError(f"etcd at {self.url} answered {path} with bad JSON: {e}") from None

    def health(self) -> bool:
        try:
            r = self.client.session.get(f"{self.url}/health", timeout=self.timeout)
            return bool(r.json().get("health") == "true")
        except (requests.RequestException, ValueError):
            return False

    # -- keys ----------------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        kvs = self.call("kv/range", {"key": _b64(key)}).get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under ``prefix`` at one revision, and that revision."""
        r = self.call("kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return [_kv(d) for d in r.get("kvs", [])], int(r.get("header", {}).get("revision", 0))

    def put(self, key: str, value: bytes | str, lease: int = 0) -> None:
        try:
            self.client.put(key, value, Lease(lease, self.client) if lease else None)
        except (etcd3gw_errors.Etcd3Exception, requests.RequestException) as e:
            raise self._fail("kv/put", e) from None

    def delete_prefix(self, prefix: str) -> int:
        r = self.call("kv/deleterange", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return int(r.get("deleted", 0))

    def txn(
        self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> tuple[bool, list[dict[str, Any]]]:
        """(succeeded, responses): responses of ``success`` or of ``failure``."""
        body = {"compare": compare, "success": success, "failure": failure or []}
        try:
            r: dict[str, Any] = dict(self.client.transaction(body))
        except (etcd3gw_errors.Etcd3Exception, requests.RequestException) as e:
            raise self._fail("kv/txn", e) from None
        return bool(r.get("succeeded", False)), list(r.get("responses", []))

    @staticmethod
    def range_kvs(response: dict[str, Any]) -> list[KV]:
        return [_kv(d) for d in response.get("response_range", {}).get("kvs", [])]

    # -- leases --------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        try:
            return int(self.client.lease(ttl).id)
        except (etcd3gw_errors.Etcd3Exception, requests.RequestException) as e:
            raise self._fail("lease/grant", e) from None

    def keepalive(self, lease: int) -> int:
        """The lease's renewed TTL in seconds; 0 if it has expired (or never existed)."""
        try:
            return max(0, Lease(lease, self.client).refresh())
        except (etcd3gw_errors.Etcd3Exception, requests.RequestException) as e:
            raise self._fail("lease/keepalive", e) from None
        except (KeyError, ValueError):
            return 0

    def revoke(self, lease: int) -> None:
        try:
            Lease(lease, self.client).revoke()
        except etcd3gw_errors.Etcd3Exception as e:
            if "not found" not in (e.detail_text or "").lower():
                raise self._fail("lease/revoke", e) from None
        except requests.RequestException as e:
            raise self._fail("lease/revoke", e) from None
