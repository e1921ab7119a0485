#!/usr/bin/env bash
# The main job: installs what is missing, builds Wisp and the example HTTP
# unikernel, and serves it on http://127.0.0.1:8080/ (override with
# PORT=...). Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo build --release -q
target/release/wisp build examples/httpd -o target/httpd.wisp
port="${PORT:-8080}"
echo "wisp: serving examples/httpd on http://127.0.0.1:${port}/ (Ctrl-C to stop)" >&2
exec target/release/wisp run -p "127.0.0.1:${port}:80" target/httpd.wisp
