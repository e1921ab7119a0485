#!/usr/bin/env bash
# Runs every test: installs what is missing, checks formatting and lints on
# both workspaces, builds, then runs the unit tests and the integration
# tests that boot real images under KVM (Wisp monitor and QEMU microvm).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

echo "== format and lints"
cargo fmt --all --check
(cd guest && cargo fmt --all --check)
(cd fuzz && cargo fmt --check)
cargo clippy --release --workspace --all-targets -q -- -D warnings
(cd guest && cargo clippy --release --target x86_64-unknown-linux-gnu --workspace -q -- -D warnings)
# Guest logic that runs on the host too (tar reader, command line, httpd's
# paths): its tests are linted and run there.
(cd guest && cargo clippy --release -p wisp-tar -p wisp-cmdline -p httpd --all-targets -q -- -D warnings)
(cd guest && cargo clippy --release --target x86_64-unknown-linux-gnu -p kv-core --all-targets -q -- -D warnings)

echo "== build"
cargo build --release -q

echo "== tests"
cargo test --release --workspace
(cd guest && cargo test --release -p wisp-tar -p wisp-cmdline -p httpd)
# Guest logic that runs on the host too (kv-core has no Wisp runtime dependency).
(cd guest && cargo test --release --target x86_64-unknown-linux-gnu -p kv-core)

echo "== fuzz targets, briefly (they must keep building and not fail at once)"
bash scripts/fuzz.sh "${FUZZ_SECONDS:-3}"
