#!/usr/bin/env bash
# Server time of the web UI's pages with 1,000 nodes and 10,000 instances in
# the store (controller/benches/ui.rs): prints min/median/max ms per page and
# fails if the overview or the service map takes more than 300 ms.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p ironmesh-controller --bench ui "$@"
