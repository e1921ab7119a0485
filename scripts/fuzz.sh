#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60): the ELF loader, the
# hypercall decoder, the virtio-net and virtio-blk device models driven by
# a hostile driver, the user-mode network's packet handling, the kv RESP
# parser, the guest's command-line parsing and an incoming live-migration
# stream. Needs the nightly toolchain
# (fuzzing only) and cargo-fuzz, which it installs if missing.
# Findings are left in fuzz/artifacts/TARGET/; turn each into a regression
# test before fixing it.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
cd fuzz
targets=$(cargo +nightly fuzz list)
cargo +nightly fuzz build -O
for t in $targets; do
    echo "== fuzz $t for ${secs}s"
    mkdir -p "corpus/$t"
    cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -3
done
