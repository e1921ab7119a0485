//! An incoming live-migration stream of arbitrary bytes, decoded as the
//! receiving monitor decodes it (header, META, PAGES, SYNC, STATE and its
//! sections), short of building a VM: every failure must be an error.
#![no_main]
use std::io::Write;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use wisp_monitor::migration::read_start;
use wisp_monitor::migration::stream::{decode_pages, decode_state, Conn, Kind};
use wisp_monitor::snapshot::parts::check_state;

fuzz_target!(|data: &[u8]| {
    // A pipe holds 64 KiB: the whole input is written before it is read.
    if data.len() > 60 << 10 {
        return;
    }
    let (rx, mut tx) = std::io::pipe().unwrap();
    tx.write_all(data).unwrap();
    drop(tx);
    let Ok((size, _meta)) = read_start(&rx, Duration::from_secs(1)) else {
        return;
    };
    let mut c = Conn::new(&rx, Duration::from_secs(1));
    while let Ok((kind, payload)) = c.recv() {
        match kind {
            Kind::Pages => {
                if let Ok(pages) = decode_pages(&payload, size / 4096) {
                    assert!(pages
                        .iter()
                        .all(|(n, b)| *n < size / 4096 && b.len() == 4096));
                }
            }
            Kind::State => {
                if let Ok(sections) = decode_state(&payload) {
                    let _ = check_state(&sections, size);
                }
                return;
            }
            _ => {}
        }
    }
});
