//! The kv example's RESP parser on arbitrary client bytes.
#![no_main]
extern crate alloc;
use libfuzzer_sys::fuzz_target;

#[path = "../../examples/kv/src/resp.rs"]
#[allow(dead_code)]
mod resp;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok((args, used)) = resp::parse(rest) {
        assert!(used > 0 && used <= rest.len());
        let _ = args;
        rest = &rest[used..];
    }
});
