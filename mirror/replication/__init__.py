"""The epoch engine and what it speaks.

checkpoint (the primary's epochs: pause, scan, resume, send), standby (stage,
verify, commit, ack), outputs (output commit: held until the epoch is acked),
wire (messages and their validation), link (the interconnect on zmq), pagediff
(the native page scan and delta engine).  Nothing here decides who runs the
guest: that is mirror.ha.
"""
