//! The logic of the httpd example that needs no I/O: request targets to
//! site paths ([`path`]) and the answer each request gets ([`site`]). Kept
//! apart from the server (`main.rs`) and free of the library OS, so its
//! unit tests run on the host (`cargo test -p httpd --lib` in `guest/`).
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod path;
pub mod site;
