"""The `mirror` command, one module per command group:

app      the parser and the dispatch: main() is the console script and `python -m mirror`
roles    primary, secondary (run one); failover, switchover (ask the one running here)
status   status [--watch] of a role run by hand
host     the host agent: agent, pair, unpair, list; status|failover|switchover DOMAIN
keys     keygen, keys reload
demo     demo, image (the demos, mirror/lab, are imported by these only)
pool     pool ... (etcd, the planner: imported by these only)
manual   completion bash, man: generated from the parsers
args     the shared options and the one number check
output   the output contract: exit codes, --json, the one-line errors
"""

from mirror.cli.app import main

__all__ = ["main"]
