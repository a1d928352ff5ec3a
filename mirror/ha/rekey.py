"""Reloading a running role's interconnect keys: SIGHUP, or `mirror keys reload` (the
control op ``reload-keys``).  The role's configuration file is read again for its
``[keys]`` and the key files it names; the role's loop applies them between two of its
steps (a secondary binds its ports again, so that connections made with the old key end;
a primary connects again).  A bad file changes nothing: the error is logged and
answered, and the keys in use stay."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mirror import config as config_mod
from mirror.config import ConfigError, KeysConfig
from mirror.ha.role import event
from mirror.replication import keys
from mirror.replication.keys import LinkKeys

APPLY_WAIT_S = 10.0  # `mirror keys reload` waits this long for the role to apply them


class Rekey:
    """The role's key reloads: requested by a signal or the control socket, applied by
    the role's loop (:meth:`apply`)."""

    def __init__(self, key_files: KeysConfig, node: str, path: Path | None) -> None:
        self.keys, self.node, self.path = key_files, node, path  # keys: as last reloaded
        self._want = threading.Event()
        self._done = threading.Condition()
        self._seq = 0  # reloads applied (or failed) so far
        self._result: dict[str, Any] = {}

    def request(self) -> None:
        """Signal-safe: only a flag."""
        self._want.set()

    def due(self) -> bool:
        return self._want.is_set()

    def load(self) -> tuple[KeysConfig, LinkKeys | None]:
        """The configuration's ``[keys]`` as it is now on disk and the keys it names;
        ConfigError if either is wrong."""
        key_files = self.keys
        if self.path is not None:
            key_files = config_mod.load(self.path).keys
        new = keys.load(key_files)
        if (new is None) != self.keys.insecure:
            raise ConfigError(
                "a reload cannot switch the interconnect between insecure and keyed: "
                "restart the role for that"
            )
        return key_files, new

    def apply(self, use: Callable[[LinkKeys | None], bool]) -> None:
        """Read the keys and hand them to ``use`` (True: they differed and are in use now).
        Called by the role's own loop."""
        self._want.clear()
        try:
            key_files, new = self.load()
        except ConfigError as e:
            event("keys-reload-failed", logging.ERROR, node=self.node, error=str(e))
            result: dict[str, Any] = {"reloaded": False, "error": str(e)}
        else:
            changed = use(new)
            self.keys = key_files
            fields: dict[str, Any] = {
                "own_key": keys.fingerprint(new.public) if new else None,
                "peer_key": keys.fingerprint(new.peer) if new else None,
                "changed": changed,
            }
            event("keys-reloaded", node=self.node, **fields)
            result = {"reloaded": True, **fields}
        with self._done:
            self._seq += 1
            self._result = result
            self._done.notify_all()

    def control(self) -> dict[str, Any]:
        """The control op: check the files at once (an error is answered as it is), then
        wait for the role's loop to apply them."""
        try:
            self.load()
        except ConfigError as e:
            return {"reloaded": False, "error": str(e)}
        with self._done:
            seq = self._seq
            self.request()
            if not self._done.wait_for(lambda: self._seq > seq, APPLY_WAIT_S):
                return {"reloaded": False, "error": f"the role did not apply the keys within "
                        f"{APPLY_WAIT_S:g} s (they will be, at its next step)"}  # fmt: skip
            return dict(self._result)


_current: list[Rekey] = []


def install(key_files: KeysConfig, node: str, path: Path | None) -> Rekey:
    """The process's reloads of the ``[keys]`` in the configuration file ``path`` (now:
    ``key_files``): SIGHUP asks for one (call from the main thread)."""
    r = Rekey(key_files, node, path)
    _current[:] = [r]
    signal.signal(signal.SIGHUP, lambda signum, frame: r.request())
    return r


def current(key_files: KeysConfig, node: str) -> Rekey:
    """The installed reloads (a role run in-process by a test: one that reads the key
    files ``key_files`` names again, asked only through the control socket)."""
    if not _current:
        _current.append(Rekey(key_files, node, None))
    return _current[0]


def keyed(key_files: KeysConfig, node: str) -> KeysConfig:
    """The ``[keys]`` last reloaded (``key_files`` if never: a role made after a reload, such
    as the next generation's primary or the secondary after a switchover, uses them too)."""
    return current(key_files, node).keys
