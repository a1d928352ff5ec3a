"""Pool HA: many hosts, many VMs, failure planning and admission control, state on etcd."""
