#!/usr/bin/env bash
# The main job: installs what running needs (not the test toolchain), builds
# Wisp and the example HTTP unikernel, and serves it on
# http://127.0.0.1:8080/ (override with PORT=...). Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

port="${PORT:-8080}"
case "$port" in
    '' | *[!0-9]*) echo "run.sh: PORT=$port is not a port number" >&2; exit 2 ;;
esac

# Taken ports fail early, before a minute of building.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if port_taken "$port"; then
    echo "run.sh: port $port on 127.0.0.1 is already in use; pick another one, e.g. PORT=$((port + 1)) bash scripts/run.sh" >&2
    exit 1
fi

echo "run.sh: checking what Wisp needs to run (scripts/install-deps.sh run)" >&2
bash scripts/install-deps.sh run
echo "run.sh: building the wisp command (cargo build --release; about a minute the first time)" >&2
cargo build --release -q
echo "run.sh: building the examples/httpd unikernel into target/httpd.wisp" >&2
target/release/wisp build examples/httpd -o target/httpd.wisp
echo "run.sh: serving examples/httpd on http://127.0.0.1:${port}/ (Ctrl-C to stop)" >&2
exec target/release/wisp run -p "127.0.0.1:${port}:80" target/httpd.wisp
