//! The guest's command-line parsing (arguments, virtio-mmio devices,
//! network options) on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

use wisp_cmdline as cmdline;

fuzz_target!(|data: &[u8]| {
    let mut out = [0u8; 4096];
    let (used, argc) = cmdline::split_args(data, &mut out);
    assert!(used <= out.len());
    assert!(argc as usize <= used);
    if let Ok(text) = core::str::from_utf8(data) {
        let net = cmdline::NetOptions::parse(text);
        for token in text.split_ascii_whitespace() {
            if let Some(mut d) = cmdline::parse_virtio_mmio(token) {
                net.apply(&mut d);
                assert!(d.mmio_base >= 0xc000_0000);
            }
        }
    }
});
