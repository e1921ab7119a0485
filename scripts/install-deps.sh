#!/usr/bin/env bash
# Installs what Wisp needs on a Debian bookworm machine, only what is missing:
# a C compiler (linking images; the static spawn peer in the benchmark),
# QEMU 10 from bookworm-backports (the second monitor the tests boot images
# on), the clients the tests use (curl, redis-cli, ping, ip), and the Rust
# toolchain check. Extra packages can be requested: `install-deps.sh wrk
# nginx` (the benchmarks do). Safe to run repeatedly.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_apt=()
command -v gcc >/dev/null || need_apt+=(gcc)
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
command -v curl >/dev/null || need_apt+=(curl)
command -v redis-cli >/dev/null || need_apt+=(redis-tools)
# kv is tested side by side with redis-server, and its flushes under strace.
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v strace >/dev/null || need_apt+=(strace)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v ping >/dev/null || need_apt+=(iputils-ping)
command -v tar >/dev/null || need_apt+=(tar)
command -v nsenter >/dev/null || need_apt+=(util-linux)
command -v python3 >/dev/null || need_apt+=(python3)
# DHCP and DNS server for the namespace tests.
command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || need_apt+=(dnsmasq-base)
# Extra packages named on the command line (binary name = package name,
# except where mapped here).
for extra in "$@"; do
    case "$extra" in
        redis-server) command -v redis-server >/dev/null || need_apt+=(redis-server) ;;
        *) command -v "$extra" >/dev/null || need_apt+=("$extra") ;;
    esac
done

if [ "${#need_apt[@]}" -gt 0 ]; then
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" |
            $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
    fi
    $SUDO apt-get update -qq
    for pkg in "${need_apt[@]}"; do
        if [ "$pkg" = qemu-system-x86 ]; then
            $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends -t bookworm-backports qemu-system-x86
        else
            $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends "$pkg"
        fi
    done
fi

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found; install Rust (stable) with rustup first" >&2
    exit 1
fi
if [ ! -e /dev/kvm ]; then
    echo "error: /dev/kvm is missing: Wisp needs KVM (enable virtualization or load kvm)" >&2
    exit 1
fi
