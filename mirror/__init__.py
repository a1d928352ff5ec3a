"""mirror: a fault-tolerant VM mirroring runtime.

A primary streams dirty-page checkpoints of a running guest to a secondary
that keeps a ready standby; see docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
