//! Parsing of the kernel command line a PVH loader (QEMU microvm) passes:
//! the application's arguments, the virtio-mmio devices QEMU lists, and
//! network settings.
//!
//! Pure functions with no platform access and no dependency on the library
//! OS runtime (which `wisp` re-exports as `wisp::cmdline`), so they are
//! unit-tested and fuzzed on the host (`fuzz/fuzz_targets/cmdline.rs`). The
//! command line is untrusted input: nothing here panics on any byte string.
#![cfg_attr(not(test), no_std)]

/// Network settings from the command line, applied to every virtio
/// device entry (only NICs read them): `ip=dhcp` or `ip=A.B.C.D/N`,
/// `gw=A.B.C.D`, `dns=A.B.C.D`. The defaults are QEMU's user network
/// (10.0.2.15/24 via 10.0.2.2, DNS 10.0.2.3).
pub struct NetOptions {
    ip: [u8; 4],
    prefix_len: u32,
    gateway: [u8; 4],
    dns: [u8; 4],
}

/// A number in `radix` made of digits only (`str::parse` would also take
/// a leading `+`).
fn number(s: &str, radix: u32) -> Option<u64> {
    if s.is_empty() || !s.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(s, radix).ok()
}

fn ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut out {
        *b = number(parts.next()?, 10)?.try_into().ok()?;
    }
    parts.next().is_none().then_some(out)
}

impl NetOptions {
    pub fn parse(cmdline: &str) -> NetOptions {
        let mut o = NetOptions {
            ip: [10, 0, 2, 15],
            prefix_len: 24,
            gateway: [10, 0, 2, 2],
            dns: [10, 0, 2, 3],
        };
        for token in cmdline.split_ascii_whitespace() {
            if token == "--" {
                break;
            }
            match token.split_once('=') {
                Some(("ip", "dhcp")) => {
                    o.ip = [0; 4];
                    o.gateway = [0; 4];
                    o.dns = [0; 4];
                }
                Some(("ip", v)) => {
                    let (addr, len) = v.split_once('/').unwrap_or((v, "24"));
                    if let (Some(a), Some(l)) = (ipv4(addr), number(len, 10)) {
                        o.ip = a;
                        o.prefix_len = l.min(32) as u32;
                    }
                }
                Some(("gw", v)) => o.gateway = ipv4(v).unwrap_or(o.gateway),
                Some(("dns", v)) => o.dns = ipv4(v).unwrap_or(o.dns),
                _ => {}
            }
        }
        o
    }

    pub fn apply(&self, d: &mut wisp_abi::boot::Device) {
        d.ipv4 = self.ip;
        d.prefix_len = self.prefix_len;
        d.gateway = self.gateway;
        d.dns = self.dns;
    }
}

/// Whether a command-line token is an option for the loader or the
/// network rather than an argument for the application.
fn is_loader_option(t: &[u8]) -> bool {
    [&b"virtio_mmio."[..], b"ip=", b"gw=", b"dns="]
        .iter()
        .any(|p| t.starts_with(p))
}

/// Parses Linux's `virtio_mmio.device=SIZE@BASE:IRQ` (SIZE decimal or hex,
/// with an optional K/M suffix; BASE hex), as QEMU microvm appends for each
/// virtio-mmio transport with a device.
pub fn parse_virtio_mmio(token: &str) -> Option<wisp_abi::boot::Device> {
    let spec = token.strip_prefix("virtio_mmio.device=")?;
    let (size, rest) = spec.split_once('@')?;
    let (base, irq) = rest.split_once(':').unwrap_or((rest, "0"));
    let num = |s: &str| -> Option<u64> {
        let (digits, mult) = match s.as_bytes().last()? {
            b'K' | b'k' => (&s[..s.len() - 1], 1024),
            b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
            _ => (s, 1),
        };
        let v = match digits.strip_prefix("0x") {
            Some(hex) => number(hex, 16)?,
            None => number(digits, 10)?,
        };
        v.checked_mul(mult)
    };
    let mut d = wisp_abi::boot::Device::new(wisp_abi::manifest::DEVICE_VIRTIO_PROBE);
    d.mmio_len = num(size)?;
    d.mmio_base = num(base)?;
    d.irq = number(irq, 10)?.try_into().ok()?;
    // Only the 3-4 GiB window is mapped for devices.
    let in_window = d.mmio_base >= 0xc000_0000 && d.mmio_base.checked_add(d.mmio_len)? <= 1 << 32;
    (in_window && d.mmio_len >= 0x100).then_some(d)
}

/// Splits a command line into NUL-separated arguments in `out`: the tokens
/// after the first `--` token if there is one, else all tokens except the
/// options meant for the loader or the network (`virtio_mmio.device=`,
/// `ip=`, `gw=`, `dns=`). Tokens are separated by ASCII whitespace and kept
/// as bytes (a token that is not UTF-8 does not cost the others). Arguments
/// that do not fit in `out` are dropped, from the first that does not fit.
/// Returns the bytes used and the count.
pub fn split_args(line: &[u8], out: &mut [u8]) -> (usize, u32) {
    let tokens = || {
        line.split(u8::is_ascii_whitespace)
            .filter(|t| !t.is_empty())
    };
    let has_sep = tokens().any(|t| t == b"--");
    let mut tokens = tokens();
    if has_sep {
        for t in tokens.by_ref() {
            if t == b"--" {
                break;
            }
        }
    }
    let (mut used, mut argc) = (0usize, 0u32);
    for t in tokens {
        if !has_sep && is_loader_option(t) {
            continue;
        }
        if used + t.len() + 1 > out.len() {
            break;
        }
        out[used..used + t.len()].copy_from_slice(t);
        out[used + t.len()] = 0;
        used += t.len() + 1;
        argc += 1;
    }
    (used, argc)
}

#[cfg(test)]
mod tests;
