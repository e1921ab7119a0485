//! The console: output buffered and flushed by line, so a `println!` costs
//! one exit on the Wisp monitor, not one per byte.

use core::fmt::{self, Write};
use spinning_top::Spinlock;

const BUF_LEN: usize = 2048;

struct LineBuffer {
    buf: [u8; BUF_LEN],
    len: usize,
}

impl LineBuffer {
    fn flush(&mut self) {
        crate::platform::console_write(&self.buf[..self.len]);
        self.len = 0;
    }

    fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = bytes.len().min(BUF_LEN - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            let newline = bytes[..n].contains(&b'\n');
            bytes = &bytes[n..];
            if newline || self.len == BUF_LEN {
                self.flush();
            }
        }
    }
}

static CONSOLE: Spinlock<LineBuffer> = Spinlock::new(LineBuffer {
    buf: [0; BUF_LEN],
    len: 0,
});

crate::library!("console");

/// Writes bytes to the console; flushed at the next newline.
pub fn write_bytes(bytes: &[u8]) {
    crate::library_linked(&LIB_NAME);
    match CONSOLE.try_lock() {
        Some(mut c) => c.write(bytes),
        // Only reachable by re-entry (a panic while printing): bypass the
        // buffer rather than deadlock.
        None => crate::platform::console_write(bytes),
    }
}

/// Flushes buffered output. Never blocks: if the buffer is in use (a panic
/// in the middle of a print), the partial line is dropped.
pub fn flush() {
    if let Some(mut c) = CONSOLE.try_lock() {
        c.flush();
    }
}

/// A handle implementing [`fmt::Write`] onto the console.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    let _ = Console.write_fmt(args);
}

/// Prints to the console (line-buffered).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
