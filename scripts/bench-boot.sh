#!/usr/bin/env bash
# Cold-boot benchmark: wisp run hello vs a static process spawn vs QEMU
# microvm, interleaved. Usage: bash scripts/bench-boot.sh [ROUNDS] [QEMU_ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh bench
cargo build --release -q
exec target/release/bench-boot "$@"
