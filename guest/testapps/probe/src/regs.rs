//! `probe mmio-order`: register accesses whose order the monitor must keep
//! when it buffers writes (KVM coalesced MMIO) instead of taking an exit
//! for each. Every read below comes right after writes that change its
//! answer; each line printed is checked by `host/cli/tests/device_memory.rs`.
//!
//! Run with `--net user`.

use core::ptr::{read_volatile, write_volatile};

use wisp::println;

/// `DEVICE_NET` in the boot page (the probe does not link the network
/// library, so it names the kind itself, as dma.rs does).
const DEVICE_NET: u32 = 1;
const STATUS: usize = 0x070;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 0x40;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;

#[repr(C, align(4096))]
struct Rings([u8; 2 * 3 * 4096]);
static mut RINGS: Rings = Rings([0; 2 * 3 * 4096]);

struct Dev(usize);

impl Dev {
    fn r(&self, off: usize) -> u32 {
        // SAFETY: the device's register window, mapped by the monitor.
        unsafe { read_volatile((self.0 + off) as *const u32) }
    }

    fn w(&self, off: usize, v: u32) {
        // SAFETY: as above.
        unsafe { write_volatile((self.0 + off) as *mut u32, v) }
    }

    /// Reset, then ACKNOWLEDGE and DRIVER.
    fn begin(&self) {
        self.w(STATUS, 0);
        self.w(STATUS, 1);
        self.w(STATUS, 3);
    }

    /// Acks `features` and asks for FEATURES_OK; whether the device took it.
    fn features_ok(&self, features: u64) -> bool {
        self.w(DRIVER_FEATURES_SEL, 1);
        self.w(DRIVER_FEATURES, (features >> 32) as u32);
        self.w(DRIVER_FEATURES_SEL, 0);
        self.w(DRIVER_FEATURES, features as u32);
        self.w(STATUS, 11);
        self.r(STATUS) & FEATURES_OK != 0
    }

    /// Configures queue `index` with 8 entries at `desc`, `avail`, `used`.
    fn queue(&self, index: u32, desc: u64, avail: u64, used: u64) {
        self.w(QUEUE_SEL, index);
        self.w(QUEUE_NUM, 8);
        for (off, addr) in [(0x080, desc), (0x090, avail), (0x0a0, used)] {
            self.w(off, addr as u32);
            self.w(off + 4, (addr >> 32) as u32);
        }
        self.w(QUEUE_READY, 1);
    }
}

fn rings(i: usize) -> (u64, u64, u64) {
    let base = &raw mut RINGS as usize + i * 3 * 4096;
    (base as u64, base as u64 + 4096, base as u64 + 2 * 4096)
}

pub fn run() -> i32 {
    let boot = wisp::boot::boot_page();
    let Some(d) = boot.devices().iter().find(|d| d.kind == DEVICE_NET) else {
        println!("no NIC");
        return 1;
    };
    let dev = Dev(d.mmio_base as usize);

    // The feature word a read returns follows the selector just written.
    dev.begin();
    dev.w(DEVICE_FEATURES_SEL, 1);
    let high = dev.r(DEVICE_FEATURES);
    dev.w(DEVICE_FEATURES_SEL, 0);
    let low = dev.r(DEVICE_FEATURES);
    println!("features high {high:#x} low {low:#x}");
    let offered = (high as u64) << 32 | low as u64;

    // The boot page's copy of the read-only registers (what the library
    // OS reads instead of them) says what the registers say.
    let mut same = d.features == offered;
    for q in 0..d.queue_max.len() {
        dev.w(QUEUE_SEL, q as u32);
        same &= dev.r(QUEUE_NUM_MAX) == d.queue_max[q] as u32;
    }
    for (i, chunk) in d.config.chunks(4).enumerate() {
        let word = dev.r(0x100 + 4 * i);
        same &= chunk == &word.to_le_bytes()[..chunk.len()];
    }
    println!("boot page describes the registers: {same}");

    // FEATURES_OK is judged on the features acked just before it.
    println!(
        "bogus features accepted: {}",
        dev.features_ok(offered | 1 << 63)
    );
    dev.begin();
    println!("offered features accepted: {}", dev.features_ok(offered));

    // A queue's state read back follows the selector and what was written.
    let (d0, a0, u0) = rings(0);
    dev.queue(0, d0, a0, u0);
    dev.w(QUEUE_SEL, 1);
    let ready1 = dev.r(QUEUE_READY);
    let max1 = dev.r(QUEUE_NUM_MAX);
    dev.w(QUEUE_SEL, 0);
    let ready0 = dev.r(QUEUE_READY);
    println!("queue ready: 0={ready0} 1={ready1} (max {max1})");

    // The activation sees every address written before it: a bogus one is
    // refused, then the same set-up with valid rings is accepted.
    dev.queue(1, 0x1000, 0x1000, 0x1000);
    dev.w(STATUS, 15);
    println!("bogus ring refused: {}", dev.r(STATUS) & NEEDS_RESET != 0);
    dev.begin();
    dev.features_ok(offered);
    let (d1, a1, u1) = rings(1);
    dev.queue(0, d0, a0, u0);
    dev.queue(1, 0x1000, 0x1000, 0x1000);
    // Rewritten before activation: the last write counts.
    dev.queue(1, d1, a1, u1);
    dev.w(STATUS, 15);
    println!(
        "valid rings accepted: {}",
        dev.r(STATUS) & NEEDS_RESET == 0 && dev.r(STATUS) & 4 != 0
    );
    dev.w(STATUS, 0);
    0
}
