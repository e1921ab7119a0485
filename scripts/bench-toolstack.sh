#!/usr/bin/env bash
# Warm-start benchmark: run requests served from the daemon's shell pool
# (request -> guest main) vs a static process spawn and a cold wisp run.
# Usage: bash scripts/bench-toolstack.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh bench
cargo build --release -q
exec target/release/bench-toolstack "$@"
