//! kv's logic, free of the Wisp runtime, so it runs (and is unit-tested)
//! on the host as well as in the unikernel: the RESP protocol, the key
//! space with expiry, Redis's command semantics, and the append-only log
//! over any sector [`Device`](aof::Device). `examples/kv` adds the network,
//! the disk and the timers.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod aof;
pub mod engine;
pub mod float;
pub mod glob;
pub mod resp;
pub mod store;
pub mod table;
mod table_data;
