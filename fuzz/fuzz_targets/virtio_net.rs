//! A hostile driver: arbitrary register writes to the virtio-mmio net
//! transport, arbitrary guest memory (rings, descriptors), notifications.
//! The device may stop itself; it must never panic or touch memory
//! outside the guest.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wisp_monitor::devices::guest_access::GuestAccess;
use wisp_monitor::devices::virtio::mmio::VirtioMmio;
use wisp_monitor::devices::virtio::net::Net;
use wisp_monitor::devices::MmioDevice;
use wisp_monitor::net::NetBackend;

/// A backend that echoes frames back and keeps a few queued.
struct Loop(Vec<Vec<u8>>);

impl NetBackend for Loop {
    fn send(&mut self, frame: &[u8]) {
        if self.0.len() < 16 {
            self.0.push(frame.to_vec());
        }
    }
    fn recv(&mut self) -> Option<Vec<u8>> {
        self.0.pop()
    }
    fn poll(&mut self) {}
    fn fds(&self) -> Vec<std::os::fd::RawFd> {
        vec![]
    }
    fn next_timeout(&mut self) -> Option<Duration> {
        None
    }
}

const MEM: usize = 64 << 10;

/// What the driver may touch: the first 48 KiB read-write, 8 KiB read-only
/// (code, boot page), the last 8 KiB not at all (page tables), so refused
/// accesses are exercised too.
fn access() -> GuestAccess {
    GuestAccess::from_ranges([(0, 48 << 10, true), (48 << 10, 56 << 10, false)])
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    // First half: guest memory; second half: (offset, value) register writes.
    let (memory, ops) = data.split_at(data.len() / 2);
    let _ = mem.write_slice(&memory[..memory.len().min(MEM)], GuestAddress(0));
    let mut dev = VirtioMmio::new(Net::new(
        [2, 0, 0, 0, 0, 1],
        mem.clone(),
        access(),
        Box::new(Loop(vec![vec![0xab; 60]])),
    ));
    for op in ops.chunks_exact(5) {
        let offset = (op[0] as u64) * 4;
        let value = u32::from_le_bytes([op[1], op[2], op[3], op[4]]);
        if op[0] & 0x80 != 0 {
            let mut out = [0u8; 4];
            dev.read(offset & 0x1ff, &mut out);
        } else {
            dev.write(offset, &value.to_le_bytes());
        }
    }
    dev.device.process_rx();
});
