#!/usr/bin/env bash
# The main job: installs what is missing, builds Wisp and the hello
# unikernel, and boots it on the Wisp monitor. Arguments are passed to the
# unikernel: `bash scripts/run.sh alpha beta`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo build --release -q
target/release/wisp build examples/hello -o target/hello.wisp
exec target/release/wisp run target/hello.wisp -- "$@"
