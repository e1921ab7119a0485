//! Plain-old-data views of the ABI structures.
//!
//! Every structure that crosses the guest/monitor boundary is `#[repr(C)]`,
//! has explicit padding fields and contains only integers, so any byte
//! pattern is a valid value. [`Pod`] captures that promise once, so neither
//! side needs its own `unsafe` to read or write these structures.

/// A type made only of integers, with no implicit padding, for which every
/// bit pattern is valid.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, contain only integer fields (or arrays
/// of them) and have no padding bytes.
pub unsafe trait Pod: Copy + Sized {
    /// The value as bytes, e.g. to write it into guest memory.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Pod` guarantees no padding, so every byte of `self` is
        // initialised; the slice covers exactly `self` and borrows it.
        unsafe {
            core::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                core::mem::size_of::<Self>(),
            )
        }
    }

    /// Reads a value from the start of `bytes`, or `None` if it is too short.
    fn read_from(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: the length was checked above; `Pod` guarantees any bit
        // pattern is a valid `Self`; `read_unaligned` has no alignment need.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}
