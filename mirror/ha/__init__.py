"""Who runs the guest.

rules (the failover rules: a pure state machine), claims (the generations), arbiter (storage
heartbeats and claims on a shared directory), etcd and etcd_arbiter (the same
on etcd), role (what both roles share), primary and secondary (the roles),
backend (a role's view of a guest: synthetic or QEMU, and its output sink).
"""
