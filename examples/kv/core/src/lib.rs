//! kv's logic, free of the Wisp runtime.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod float;
pub mod resp;
