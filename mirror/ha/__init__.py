"""Who runs the guest.

controller (failover rules as a pure state machine), arbiter (storage
heartbeats and claims on a shared directory), etcd and etcd_arbiter (the same
on etcd), agent (what both roles share), primary and secondary (the roles),
backend (the agent's view of a guest: synthetic or QEMU, and its output sink).
"""
