"""Demos, and the rigs that tests and demos share.

demo (a pair of host processes with an observer), qemudemo (the host-kill demo
with QEMU in network namespaces), netlab (namespaces, bridges, TAP devices),
tcpclient (the client that holds one TCP connection), observer (receives the
synthetic guest's outputs and checks them).
"""
