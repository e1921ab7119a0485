//! Panics print their message and location, as a Rust process does, and
//! end the guest with status 101.

use core::fmt::Write;
use core::panic::PanicInfo;

/// Formats into a fixed stack buffer: no heap, so a panic from the
/// allocator (or with the heap corrupted) is still reported.
struct StackBuf {
    buf: [u8; 512],
    len: usize,
}

impl Write for StackBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    crate::console::flush();
    let mut out = StackBuf {
        buf: [0; 512],
        len: 0,
    };
    let _ = match info.location() {
        Some(l) => write!(
            out,
            "panicked at {}:{}:{}:\n{}\n",
            l.file(),
            l.line(),
            l.column(),
            info.message()
        ),
        None => write!(out, "panicked:\n{}\n", info.message()),
    };
    crate::platform::console_write(&out.buf[..out.len]);
    crate::platform::exit(wisp_abi::exit::PANIC)
}
