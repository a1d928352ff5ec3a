#!/usr/bin/env bash
# The host-kill failover demo (README.md, "What the demo prints"): a QEMU guest keeps
# its client's TCP connection while its host is killed.  Same as `scripts/demo`.
# Arguments go to `mirror demo --guest qemu`, e.g. --kill-after 10 --run-on 10 --keep
set -euo pipefail
cd "$(dirname "$0")/../.."
exec scripts/demo --guest qemu "$@"
