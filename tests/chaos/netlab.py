"""The partition tests' namespaces live in mirror/netlab.py (beside the QEMU demo's)."""

from mirror.netlab import NetLab, NetLabUnavailable

__all__ = ["NetLab", "NetLabUnavailable"]
