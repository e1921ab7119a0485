//! The command-line parser on what QEMU and users write, and on what they
//! should not.

use super::*;
use wisp_abi::boot::Device;

/// The arguments `split_args` gives for `line`, with a roomy buffer.
fn args(line: &[u8]) -> Vec<Vec<u8>> {
    let mut out = [0xaau8; 4096];
    let (used, argc) = split_args(line, &mut out);
    let list: Vec<Vec<u8>> = if used == 0 {
        Vec::new()
    } else {
        assert_eq!(out[used - 1], 0, "every argument ends in a NUL");
        out[..used - 1]
            .split(|&b| b == 0)
            .map(<[u8]>::to_vec)
            .collect()
    };
    assert_eq!(list.len(), argc as usize, "argc counts the arguments");
    list
}

fn strs(line: &str) -> Vec<String> {
    args(line.as_bytes())
        .into_iter()
        .map(|a| String::from_utf8(a).unwrap())
        .collect()
}

#[test]
fn without_a_separator_loader_options_are_left_out() {
    assert_eq!(
        strs(
            "virtio_mmio.device=512@0xfeb00e00:12 alpha ip=10.0.0.2/8 beta gw=10.0.0.1 dns=1.1.1.1"
        ),
        ["alpha", "beta"]
    );
    assert!(strs("").is_empty());
    assert!(strs("   \t\n ").is_empty());
    assert_eq!(strs("  one\ttwo\n three  "), ["one", "two", "three"]);
}

#[test]
fn after_a_separator_every_token_is_an_argument() {
    assert_eq!(
        strs("console=ttyS0 ip=dhcp -- ip=1.2.3.4 virtio_mmio.x -- last"),
        ["ip=1.2.3.4", "virtio_mmio.x", "--", "last"]
    );
    assert!(strs("quiet --").is_empty());
    // A `--` inside a token is no separator.
    assert_eq!(strs("a--b --c"), ["a--b", "--c"]);
}

#[test]
fn a_token_that_is_not_utf8_costs_only_itself() {
    let got = args(b"good \xff\xfe also-good");
    assert_eq!(got, [&b"good"[..], b"\xff\xfe", b"also-good"]);
}

#[test]
fn arguments_that_do_not_fit_are_dropped_from_the_first_that_does_not() {
    let mut out = [0u8; 10];
    // "abc\0" (4) + "defgh\0" (6) = 10: both fit exactly.
    assert_eq!(split_args(b"abc defgh", &mut out), (10, 2));
    assert_eq!(&out, b"abc\0defgh\0");
    // The third does not, nor any after it even if it would.
    let mut out = [0u8; 10];
    assert_eq!(split_args(b"abc defgh i", &mut out), (10, 2));
    let mut out = [0u8; 10];
    assert_eq!(split_args(b"abcdefghijk x", &mut out), (0, 0));
    assert_eq!(split_args(b"a", &mut []), (0, 0));
}

fn net(line: &str) -> ([u8; 4], u32, [u8; 4], [u8; 4]) {
    let mut d = Device::new(0);
    NetOptions::parse(line).apply(&mut d);
    (d.ipv4, d.prefix_len, d.gateway, d.dns)
}

#[test]
fn network_defaults_are_qemus_user_network() {
    assert_eq!(net(""), ([10, 0, 2, 15], 24, [10, 0, 2, 2], [10, 0, 2, 3]));
}

#[test]
fn network_options_are_read_before_the_separator_only() {
    assert_eq!(
        net("ip=192.168.1.20/16 gw=192.168.0.1 dns=9.9.9.9"),
        ([192, 168, 1, 20], 16, [192, 168, 0, 1], [9, 9, 9, 9])
    );
    assert_eq!(net("ip=172.16.0.5").1, 24, "prefix defaults to 24");
    assert_eq!(net("ip=172.16.0.5/40").1, 32, "prefix capped at 32");
    assert_eq!(
        net("ip=dhcp"),
        ([0; 4], 24, [0; 4], [0; 4]),
        "DHCP: all unset"
    );
    assert_eq!(
        net("-- ip=1.2.3.4").0,
        [10, 0, 2, 15],
        "an application argument"
    );
    // The last of repeated options wins.
    assert_eq!(net("gw=1.1.1.1 gw=2.2.2.2").2, [2, 2, 2, 2]);
}

#[test]
fn malformed_network_options_are_ignored() {
    let defaults = net("");
    for bad in [
        "ip=10.0.0",
        "ip=10.0.0.1.2",
        "ip=10.0.0.256",
        "ip=10.0.0.1/x",
        "ip=10.0.0.1/-1",
        "ip=",
        "ip=/24",
        "gw=1.2.3",
        "dns=a.b.c.d",
        "ip=+1.2.3.4",
        "ip= 1.2.3.4",
        "ip=1.2.3.4/+8",
        "gw=1.2.3.+4",
    ] {
        assert_eq!(net(bad), defaults, "{bad}");
    }
}

fn mmio(token: &str) -> Option<(u64, u64, u32)> {
    parse_virtio_mmio(token).map(|d| (d.mmio_len, d.mmio_base, d.irq))
}

#[test]
fn virtio_mmio_devices_as_qemu_lists_them() {
    // QEMU microvm's own form.
    assert_eq!(
        mmio("virtio_mmio.device=512@0xfeb00e00:12"),
        Some((512, 0xfeb0_0e00, 12))
    );
    assert_eq!(
        mmio("virtio_mmio.device=4K@0xd0000000:5"),
        Some((4096, 0xd000_0000, 5))
    );
    assert_eq!(
        mmio("virtio_mmio.device=1m@0xc0000000"),
        Some((1 << 20, 0xc000_0000, 0)),
        "no IRQ given"
    );
    assert_eq!(
        mmio("virtio_mmio.device=0x200@0xffffff00:1"),
        None,
        "runs past 4 GiB"
    );
    assert_eq!(
        mmio("virtio_mmio.device=0x100@0xffffff00:1"),
        Some((0x100, 0xffff_ff00, 1)),
        "ends exactly at 4 GiB"
    );
    let d = parse_virtio_mmio("virtio_mmio.device=512@0xfeb00e00:12").unwrap();
    assert_eq!(d.kind, wisp_abi::manifest::DEVICE_VIRTIO_PROBE);
}

#[test]
fn virtio_mmio_devices_outside_the_device_window_or_malformed_are_refused() {
    for bad in [
        "virtio_mmio.device=512@0xbffffe00:1",  // below 3 GiB
        "virtio_mmio.device=512@0x100000000:1", // above 4 GiB
        "virtio_mmio.device=255@0xd0000000:1",  // smaller than a register file
        "virtio_mmio.device=512@0xd0000000:x",  // IRQ not a number
        "virtio_mmio.device=512@0xd0000000:-1",
        "virtio_mmio.device=512@d0000000:1", // base without 0x is decimal
        "virtio_mmio.device=@0xd0000000:1",
        "virtio_mmio.device=512",
        "virtio_mmio.device=",
        "virtio_mmio.device=K@0xd0000000:1",
        "virtio_mmio.device=18446744073709551615M@0xd0000000:1", // overflow
        "virtio_mmio.device=512@0xffffffffffffffff:1",
        "virtio_mmio.dev=512@0xd0000000:1",
        "virtio_mmio.device=512@0xd0000000:99999999999",
        "512@0xd0000000:1",
        "virtio_mmio.device=+512@0xd0000000:1",
        "virtio_mmio.device=512@0x+d0000000:1",
        "virtio_mmio.device=512@0xd0000000:+1",
    ] {
        assert_eq!(mmio(bad), None, "{bad}");
    }
}

#[test]
fn nothing_panics_on_arbitrary_bytes() {
    // A cheap sweep in addition to the fuzz target: every short line over
    // an alphabet of the characters the parsers look at.
    let alphabet = b" -=@:./0xKM9ipgwdnsvrtuo_\xff";
    let mut out = [0u8; 8];
    for a in alphabet {
        for b in alphabet {
            for c in alphabet {
                for d in alphabet {
                    let line = [*a, *b, *c, *d, b'.', *a];
                    let (used, argc) = split_args(&line, &mut out);
                    assert!(used <= out.len() && argc as usize <= used);
                    if let Ok(text) = core::str::from_utf8(&line) {
                        let _ = NetOptions::parse(text);
                        let _ = parse_virtio_mmio(&alloc_token(text));
                    }
                }
            }
        }
    }
}

fn alloc_token(tail: &str) -> String {
    format!("virtio_mmio.device={tail}")
}
