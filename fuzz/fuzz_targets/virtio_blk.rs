//! A hostile driver against the block device (backed by a temporary file).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wisp_monitor::devices::guest_access::GuestAccess;
use wisp_monitor::devices::virtio::block::Block;
use wisp_monitor::devices::virtio::mmio::VirtioMmio;
use wisp_monitor::devices::MmioDevice;

const MEM: usize = 64 << 10;

/// What the driver may touch: the first 48 KiB read-write, 8 KiB read-only
/// (code, boot page), the last 8 KiB not at all (page tables), so refused
/// accesses are exercised too.
fn access() -> GuestAccess {
    GuestAccess::from_ranges([(0, 48 << 10, true), (48 << 10, 56 << 10, false)])
}

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("wisp-fuzz-blk-{}", std::process::id()));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(1 << 20).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let (memory, ops) = data.split_at(data.len() / 2);
    let _ = mem.write_slice(&memory[..memory.len().min(MEM)], GuestAddress(0));
    let block = Block::open(&path, false, mem.clone(), access()).unwrap();
    let mut dev = VirtioMmio::new(block);
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
});
