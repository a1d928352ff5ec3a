"""The partition tests' namespaces live in mirror/lab/netlab.py (beside the QEMU demo's)."""

from mirror.lab.netlab import NetLab, NetLabUnavailable

__all__ = ["NetLab", "NetLabUnavailable"]
