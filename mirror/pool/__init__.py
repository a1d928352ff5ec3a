"""Pool HA: many hosts, many VMs, failure planning and admission control, state on etcd.

The constants the `mirror pool` command's help shows live here, so that `mirror --help`
imports no more of the pool (mirror.pool.model re-exports them)."""

PRIORITIES = ("mirrored", "restart", "best-effort")
PREFIX = "/mirror/pool/"  # the default pool's etcd key prefix
PAIR_PORTS_FROM = 7600  # where `vm add` starts allocating a pair's interconnect ports
