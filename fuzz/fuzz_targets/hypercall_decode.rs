//! Hypercalls with arbitrary ports, widths, values and guest memory.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wisp_monitor::hypercall::decode;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 10)]).unwrap();
    let port = 0x500 + (data[0] % 8) as u16;
    let width = (data[1] % 5) as usize;
    let value = &data[2..2 + width.min(data.len() - 2)];
    let _ = mem.write_slice(&data[2..data.len().min(2 + (64 << 10))], GuestAddress(0));
    let _ = decode(port, value, &mem, 64 << 10);
});
