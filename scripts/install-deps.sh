#!/usr/bin/env bash
# Installs what Wisp needs on a Debian bookworm machine, only what is missing,
# and checks what it cannot install. Safe to run repeatedly.
#
#   install-deps.sh run    building and running images: Rust (stable) with
#                          cargo, gcc and glibc's development files (the
#                          linker cargo uses), /dev/kvm
#   install-deps.sh bench  run + QEMU 10 (bookworm-backports; the boot
#                          benchmark's second monitor) and python3
#   install-deps.sh test   (the default) bench + the clients the tests use
#                          (curl, redis-cli, ping, ip, nsenter, dnsmasq, nginx as
#                          the httpd test's reference), the
#                          rustfmt and clippy components, the nightly
#                          toolchain and cargo-fuzz (scripts/fuzz.sh)
#
# Extra Debian packages may follow the mode (`install-deps.sh bench wrk
# nginx`); a first argument that is not a mode counts as an extra package
# of the default mode.
set -euo pipefail

mode=test
case "${1:-}" in
    run | bench | test) mode="$1"; shift ;;
esac

say() { echo "install-deps: $*" >&2; }
die() { echo "install-deps: error: $*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_apt=()
# gcc links every image and, with glibc's development files, the host
# binaries (and the benchmark's static C process).
command -v gcc >/dev/null || need_apt+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/crt1.o ] || need_apt+=(libc6-dev)
if [ "$mode" != run ]; then
    command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
    command -v python3 >/dev/null || need_apt+=(python3)
fi
if [ "$mode" = test ]; then
    command -v curl >/dev/null || need_apt+=(curl)
    command -v redis-cli >/dev/null || need_apt+=(redis-tools)
    # kv is tested side by side with redis-server, and its flushes under strace.
    command -v redis-server >/dev/null || need_apt+=(redis-server)
    command -v strace >/dev/null || need_apt+=(strace)
    command -v ip >/dev/null || need_apt+=(iproute2)
    command -v ping >/dev/null || need_apt+=(iputils-ping)
    command -v tar >/dev/null || need_apt+=(tar)
    command -v nsenter >/dev/null || need_apt+=(util-linux)
    # DHCP and DNS server for the namespace tests.
    command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || need_apt+=(dnsmasq-base)
    # The reference web server the httpd test compares its answers with.
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
fi
# Extra packages named on the command line (binary name = package name,
# except where mapped here).
for extra in "$@"; do
    case "$extra" in
        redis-server) command -v redis-server >/dev/null || need_apt+=(redis-server) ;;
        *) command -v "$extra" >/dev/null || need_apt+=("$extra") ;;
    esac
done

# apt's and dpkg's progress goes to a log, shown only if something fails.
apt_log="$(mktemp)"
trap 'rm -f "$apt_log"' EXIT
apt_quiet() {
    if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get "$@" >"$apt_log" 2>&1; then
        tail -n 30 "$apt_log" >&2
        die "apt-get $* failed (its output is above)"
    fi
}

if [ "${#need_apt[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null ||
        die "missing: ${need_apt[*]}; this script installs them on Debian (apt-get), install them by hand here"
    say "installing from Debian: ${need_apt[*]}"
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" |
            $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
    fi
    apt_quiet update -q
    for pkg in "${need_apt[@]}"; do
        if [ "$pkg" = qemu-system-x86 ]; then
            # bookworm's own QEMU is 7.2; the tests need microvm's PVH boot of 10.
            apt_quiet install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86
        else
            apt_quiet install -y -q --no-install-recommends "$pkg"
        fi
    done
fi

# Rust. Toolchains come from rustup; nothing else here can install them.
command -v cargo >/dev/null ||
    die "cargo not found: install Rust (stable) with rustup (https://rustup.rs) first"
have_rustup=false
command -v rustup >/dev/null && have_rustup=true

if [ "$mode" = test ]; then
    # `cargo fmt --check` and `cargo clippy` on both workspaces.
    for comp in rustfmt clippy; do
        sub=$comp; [ $comp = rustfmt ] && sub=fmt
        if ! cargo "$sub" --version >/dev/null 2>&1; then
            $have_rustup || die "cargo $sub is missing and there is no rustup to add it: install the $comp component of your Rust toolchain"
            say "adding the $comp component (rustup component add $comp)"
            rustup component add "$comp" >&2 ||
                die "rustup component add $comp failed: the tests check formatting and lints with it"
        fi
    done
    # The fuzz targets (run briefly by the tests) need nightly's sanitizers.
    if ! cargo +nightly --version >/dev/null 2>&1; then
        $have_rustup || die "the nightly toolchain is missing and there is no rustup to install it: scripts/fuzz.sh (part of the tests) runs cargo +nightly fuzz"
        say "installing the nightly toolchain (rustup toolchain install nightly --profile minimal)"
        rustup toolchain install nightly --profile minimal >&2 ||
            die "could not install the nightly toolchain: the fuzz targets (scripts/fuzz.sh, part of the tests) need it; install it with 'rustup toolchain install nightly' ('cargo test --release --workspace' runs the other tests without it)"
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        say "installing cargo-fuzz from crates.io (cargo install cargo-fuzz --locked; a few minutes)"
        cargo install cargo-fuzz --locked >&2 ||
            die "cargo install cargo-fuzz failed: the fuzz targets (scripts/fuzz.sh, part of the tests) need it"
    fi
fi

if [ ! -e /dev/kvm ]; then
    die "/dev/kvm is missing: Wisp needs KVM (enable virtualization or load the kvm module)"
fi
