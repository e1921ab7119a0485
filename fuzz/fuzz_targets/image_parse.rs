//! Any byte string as an image file: `Image::parse` and the layout of a
//! parsed image must return errors, never panic or overflow.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wisp_monitor::layout::Layout;
use wisp_monitor::{paging, Image};

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = Image::parse(data.to_vec()) {
        for mem in [2u64 << 20, 64 << 20] {
            if let Ok(layout) = Layout::new(&image, mem, 64) {
                let _ = paging::build(&layout, &image);
            }
        }
    }
});
