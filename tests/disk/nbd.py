"""The NBD client the disk tests use (mirror/lab/nbdclient.py)."""

from mirror.lab.nbdclient import CMD_READ, CMD_WRITE, FLAG_FUA, NbdClient, NbdError

__all__ = ["CMD_READ", "CMD_WRITE", "FLAG_FUA", "NbdClient", "NbdError"]
