#!/usr/bin/env bash
# Density benchmark: N idle 2 MiB unikernels started through the daemon in
# batches (start latency percentiles, host memory per VM, teardown time),
# beside a cold wisp run.
# Usage: bash scripts/bench-density.sh [N] [BATCH]   (default 1000 100)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh bench
cargo build --release -q
exec target/release/bench-density "$@"
