//! The kv example's RESP parser on arbitrary client bytes, and on log
//! records: a parse never over-reads, and what kv writes to its log parses
//! back to the same arguments.
#![no_main]
extern crate alloc;
use libfuzzer_sys::fuzz_target;

#[path = "../../examples/kv/core/src/resp.rs"]
#[allow(dead_code)]
mod resp;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok((args, used)) = resp::parse(rest) {
        assert!(used > 0 && used <= rest.len());
        // What the log would hold for this command parses back exactly.
        if !args.is_empty() {
            let words: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let mut rec = Vec::new();
            resp::encode_command(&mut rec, &words);
            assert_eq!(resp::parse_record(&rec), Ok((args.clone(), rec.len())));
        }
        rest = &rest[used..];
    }
    let mut rest = data;
    while let Ok((_, used)) = resp::parse_record(rest) {
        assert!(used > 0 && used <= rest.len());
        rest = &rest[used..];
    }
});
