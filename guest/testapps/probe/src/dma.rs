//! `probe dma TARGET`: a hand-written, hostile virtio driver that aims each
//! kind of device access at one target (its code, read-only data, boot
//! page, or an address the test gives: page tables, GDT, IDT, TSS), and
//! reports for each whether the device refused it (`NEEDS_RESET`) or did
//! it. `probe dma data` aims everything at the probe's own buffers: the
//! control, where every access must work.
//!
//! Run with `--net user --disk FILE` (a disk of at least two sectors).

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};
use core::time::Duration;

use wisp::println;

const STATUS: usize = 0x070;
const NEEDS_RESET: u32 = 0x40;
const FEATURES_OK: u32 = 8;
/// Entries per queue.
const QSIZE: u32 = 8;
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const BLK_IN: u32 = 0;
const BLK_OUT: u32 = 1;
/// Bytes the device is asked to move at the target.
const SECTOR: u32 = 512;
const RX_LEN: u32 = 2048;
const TX_LEN: u32 = 64;

const PAGE: usize = 4096;
/// Scratch pages: rings of two queues, a request page, a frame page, then
/// the control target.
const RINGS_A: usize = 0;
const RINGS_B: usize = 3 * PAGE;
const REQUEST: usize = 6 * PAGE;
const FRAME: usize = 7 * PAGE;
const DATA: usize = 8 * PAGE;
const PAGES: usize = 16;

#[repr(C, align(4096))]
struct Scratch([u8; PAGES * PAGE]);
static mut SCRATCH: Scratch = Scratch([0; PAGES * PAGE]);

/// Read-only data the test aims at (ends up in `.rodata`).
static RODATA_TARGET: [u8; 4096] = {
    let mut a = [0u8; 4096];
    let mut i = 0;
    while i < a.len() {
        a[i] = (i * 7 + 3) as u8;
        i += 1;
    }
    a
};

/// Code the test aims at: it must still return its own value afterwards.
#[inline(never)]
pub extern "C" fn canary() -> u64 {
    0x5157_3e4f_0ca2_a7e1
}

/// A page-aligned marker with a value chosen at run time, so the test can
/// find guest memory inside the monitor's address space.
#[repr(C, align(4096))]
struct Marker([u64; 2]);
static mut MARKER: Marker = Marker([0; 2]);

fn scratch() -> usize {
    (&raw mut SCRATCH) as usize
}

fn put<T>(addr: usize, v: T) {
    // SAFETY: the callers only pass addresses inside SCRATCH.
    unsafe { write_volatile(addr as *mut T, v) }
}

fn get<T: Copy>(addr: usize) -> T {
    // SAFETY: the callers only pass addresses inside SCRATCH.
    unsafe { read_volatile(addr as *const T) }
}

/// A sum of `len` bytes at `addr`, read so the compiler cannot assume them.
fn checksum(addr: usize, len: usize) -> u64 {
    let mut sum = 0u64;
    for i in 0..len {
        // SAFETY: readable guest memory (code, read-only data, boot page or
        // SCRATCH), as the caller chose.
        let b = unsafe { read_volatile((addr + i) as *const u8) };
        sum = sum.wrapping_mul(31).wrapping_add(b as u64);
    }
    sum
}

/// One virtio-mmio device window.
struct Dev(usize);

impl Dev {
    fn find(kind: u32) -> Option<Dev> {
        let boot = wisp::boot::boot_page();
        let d = boot.devices().iter().find(|d| d.kind == kind)?;
        Some(Dev(d.mmio_base as usize))
    }

    fn r(&self, off: usize) -> u32 {
        // SAFETY: the device's register window, mapped by the monitor.
        unsafe { read_volatile((self.0 + off) as *const u32) }
    }

    fn w(&self, off: usize, v: u32) {
        // SAFETY: as above.
        unsafe { write_volatile((self.0 + off) as *mut u32, v) }
    }

    /// Reset, then negotiate VERSION_1 only.
    fn start(&self) -> bool {
        self.w(STATUS, 0);
        self.w(STATUS, 1);
        self.w(STATUS, 3);
        self.w(0x024, 1);
        self.w(0x020, 1);
        self.w(0x024, 0);
        self.w(0x020, 0);
        self.w(STATUS, 11);
        self.r(STATUS) & FEATURES_OK != 0
    }

    fn queue(&self, index: u32, desc: usize, avail: usize, used: usize) {
        self.w(0x030, index);
        self.w(0x038, QSIZE);
        for (off, addr) in [(0x080, desc), (0x090, avail), (0x0a0, used)] {
            self.w(off, addr as u32);
            self.w(off + 4, (addr as u64 >> 32) as u32);
        }
        self.w(0x044, 1);
    }

    /// Writes status 0: the device lets go of its queues.
    fn reset(&self) {
        self.w(STATUS, 0);
    }

    fn driver_ok(&self) {
        self.w(STATUS, 15);
    }

    fn needs_reset(&self) -> bool {
        self.r(STATUS) & NEEDS_RESET != 0
    }

    fn notify(&self, queue: u32) {
        fence(Ordering::SeqCst);
        self.w(0x050, queue);
    }
}

/// Rings of one queue: (descriptor table, available ring, used ring).
#[derive(Clone, Copy)]
struct Rings {
    desc: usize,
    avail: usize,
    used: usize,
}

impl Rings {
    fn at(base: usize) -> Rings {
        Rings {
            desc: base,
            avail: base + PAGE,
            used: base + 2 * PAGE,
        }
    }

    /// Writes descriptor `i`.
    fn desc(&self, i: usize, addr: usize, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * i;
        put(d, addr as u64);
        put(d + 8, len);
        put(d + 12, flags);
        put(d + 14, next);
    }

    /// Offers the chain starting at descriptor `head` as the next entry.
    fn offer(&self, head: u16) {
        let idx: u16 = get(self.avail + 2);
        put(self.avail + 4 + 2 * (idx as usize % QSIZE as usize), head);
        fence(Ordering::SeqCst);
        put(self.avail + 2, idx.wrapping_add(1));
    }

    fn used_idx(&self) -> u16 {
        get(self.used + 2)
    }
}

/// What became of one access.
#[derive(PartialEq)]
enum Outcome {
    Refused,
    Done,
    Nothing,
}

/// Waits (sleeping, so the monitor serves the device) until the device
/// either completed `done()` or asks for a reset.
fn outcome(dev: &Dev, done: impl Fn() -> bool) -> Outcome {
    for _ in 0..2000 {
        if dev.needs_reset() {
            return Outcome::Refused;
        }
        if done() {
            return Outcome::Done;
        }
        wisp::time::sleep(Duration::from_millis(1));
    }
    Outcome::Nothing
}

/// Which ring of a queue goes to the target.
#[derive(Clone, Copy, PartialEq)]
enum RingAt {
    None,
    Desc,
    Avail,
    Used,
}

fn rings(base: usize, at: RingAt, target: usize) -> Rings {
    let mut r = Rings::at(base);
    let aligned = target & !15;
    if at != RingAt::None && (scratch()..scratch() + PAGES * PAGE).contains(&aligned) {
        // The control: a ring in the probe's own memory starts empty.
        for i in (aligned..(aligned + 3 * PAGE).min(scratch() + PAGES * PAGE)).step_by(8) {
            put(i, 0u64);
        }
    }
    match at {
        RingAt::None => {}
        RingAt::Desc => r.desc = aligned,
        RingAt::Avail => r.avail = aligned,
        RingAt::Used => r.used = aligned,
    }
    r
}

/// Resets both devices before the scratch area (which holds the rings of
/// both) is reused: a live device must not see its rings change under it
/// (the monitor's I/O thread polls a NIC's rings while the guest runs).
fn quiesce() {
    for kind in [1, 2] {
        if let Some(d) = Dev::find(kind) {
            d.reset();
        }
    }
}

fn zero_scratch() {
    for i in (0..DATA).step_by(8) {
        put(scratch() + i, 0u64);
    }
}

/// One block request: `kind` with its data buffer at `data`, the block
/// queue's `ring` at `target` (or none).
fn block(dev: &Dev, kind: u32, data: usize, ring: RingAt, target: usize) -> Outcome {
    quiesce();
    zero_scratch();
    if !dev.start() {
        return Outcome::Nothing;
    }
    let q = rings(scratch() + RINGS_A, ring, target);
    dev.queue(0, q.desc, q.avail, q.used);
    dev.driver_ok();
    if dev.needs_reset() {
        return Outcome::Refused; // refused at activation
    }
    if matches!(ring, RingAt::Desc | RingAt::Avail) {
        // Accepted. (The probe never writes through a ring at the target.)
        return Outcome::Done;
    }
    let req = scratch() + REQUEST;
    put(req, kind);
    put(req + 4, 0u32);
    put(req + 8, u64::from(kind == BLK_OUT)); // read sector 0, write sector 1
    put(req + 16, 0xffu8);
    let data_flags = if kind == BLK_IN { DESC_WRITE } else { 0 };
    q.desc(0, req, 16, DESC_NEXT, 1);
    q.desc(1, data, SECTOR, DESC_NEXT | data_flags, 2);
    q.desc(2, req + 16, 1, DESC_WRITE, 0);
    q.offer(0);
    dev.notify(0);
    // (A used ring at the target is not read: the status byte says it.)
    outcome(dev, || {
        get::<u8>(req + 16) == 0 && (ring == RingAt::Used || q.used_idx() == 1)
    })
}

/// The device's MAC, from the boot page.
fn mac() -> [u8; 6] {
    let boot = wisp::boot::boot_page();
    let mut m = [0u8; 6];
    if let Some(d) = boot.devices().iter().find(|d| d.kind == 1) {
        m.copy_from_slice(&d.mac[..6]);
    }
    m
}

/// Writes a virtio-net header and an ARP request for the gateway
/// (10.0.2.2) from 10.0.2.15 at `at`; returns its length.
fn arp_request(at: usize) -> u32 {
    let mac = mac();
    let mut f = [0u8; 12 + 42];
    let e = &mut f[12..];
    e[..6].fill(0xff);
    e[6..12].copy_from_slice(&mac);
    e[12..14].copy_from_slice(&[0x08, 0x06]);
    e[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    e[22..28].copy_from_slice(&mac);
    e[28..32].copy_from_slice(&[10, 0, 2, 15]);
    e[38..42].copy_from_slice(&[10, 0, 2, 2]);
    for (i, b) in f.iter().enumerate() {
        put(at + i, *b);
    }
    f.len() as u32
}

/// What the network access aims at the target.
#[derive(Clone, Copy, PartialEq)]
enum NetAt {
    /// A receive buffer at `buf`, filled by the gateway's ARP reply.
    Rx(usize),
    /// A transmit buffer at `buf`.
    Tx(usize),
}

/// One exchange on the NIC, with the receive queue's `ring` at `target`.
fn net(dev: &Dev, what: NetAt, ring: RingAt, target: usize) -> Outcome {
    quiesce();
    zero_scratch();
    if !dev.start() {
        return Outcome::Nothing;
    }
    let rx = rings(scratch() + RINGS_A, ring, target);
    let tx = Rings::at(scratch() + RINGS_B);
    dev.queue(0, rx.desc, rx.avail, rx.used);
    dev.queue(1, tx.desc, tx.avail, tx.used);
    dev.driver_ok();
    if dev.needs_reset() {
        return Outcome::Refused;
    }
    if matches!(ring, RingAt::Desc | RingAt::Avail) {
        return Outcome::Done;
    }
    match what {
        NetAt::Rx(buf) => {
            rx.desc(0, buf, RX_LEN, DESC_WRITE, 0);
            rx.offer(0);
            dev.notify(0);
            let len = arp_request(scratch() + FRAME);
            tx.desc(0, scratch() + FRAME, len, 0, 0);
            tx.offer(0);
            dev.notify(1);
            if ring == RingAt::Used {
                // The gateway's ARP reply (sender 10.0.2.2) arrived.
                return outcome(dev, || get::<[u8; 4]>(buf + 12 + 28) == [10, 0, 2, 2]);
            }
            outcome(dev, || rx.used_idx() == 1)
        }
        NetAt::Tx(buf) => {
            tx.desc(0, buf, TX_LEN, 0, 0);
            tx.offer(0);
            dev.notify(1);
            outcome(dev, || tx.used_idx() == 1)
        }
    }
}

extern "C" {
    static __text_end: u8;
}

/// The address the test named (a word, or a number in decimal or 0x-hex),
/// and how many bytes of it the guest can read to see whether it changed
/// (0: the guest may not read it).
fn resolve(target: &str) -> Option<(usize, usize)> {
    Some(match target {
        "data" => (scratch() + DATA, PAGE),
        "text" => {
            let at = canary_fn() as usize;
            // SAFETY: the address of a linker symbol.
            let end = &raw const __text_end as usize;
            (at, end.saturating_sub(at).min(SECTOR as usize))
        }
        "rodata" => (RODATA_TARGET.as_ptr() as usize, RODATA_TARGET.len()),
        "boot-page" => (wisp::boot::boot_page() as *const _ as usize, PAGE),
        _ => match target.strip_prefix("0x") {
            Some(hex) => (usize::from_str_radix(hex, 16).ok()?, 0),
            None => (target.parse().ok()?, 0),
        },
    })
}

/// [`canary`] through a pointer the compiler cannot see through, so a
/// call really runs the code in memory.
fn canary_fn() -> extern "C" fn() -> u64 {
    core::hint::black_box(canary as extern "C" fn() -> u64)
}

/// Puts a fresh marker in guest memory and prints where it is.
fn print_marker() {
    let v = wisp::time::monotonic_ns() ^ 0x9e37_79b9_7f4a_7c15;
    let m = (&raw mut MARKER) as usize;
    put(m, v);
    put(m + 8, !v);
    println!("marker {m:#x} {v:#018x} {:#018x}", !v);
}

pub fn run(target: &str) -> i32 {
    let (Some(blk), Some(nic)) = (Dev::find(2), Dev::find(1)) else {
        println!("dma: run with --net user --disk FILE");
        return 2;
    };
    let Some((t, visible)) = resolve(target) else {
        println!("dma: bad target '{target}'");
        return 2;
    };
    // What the guest itself can see of the target before.
    let before = checksum(t, visible);
    let canary_before = canary_fn()();
    println!("target {target} {t:#x}");
    let accesses: [(&str, &dyn Fn() -> Outcome); 11] = [
        ("blk-desc", &|| {
            block(&blk, BLK_IN, scratch() + FRAME, RingAt::Desc, t)
        }),
        ("blk-avail", &|| {
            block(&blk, BLK_IN, scratch() + FRAME, RingAt::Avail, t)
        }),
        ("blk-used", &|| {
            block(&blk, BLK_IN, scratch() + FRAME, RingAt::Used, t)
        }),
        ("net-desc", &|| {
            net(&nic, NetAt::Rx(scratch() + REQUEST), RingAt::Desc, t)
        }),
        ("net-avail", &|| {
            net(&nic, NetAt::Rx(scratch() + REQUEST), RingAt::Avail, t)
        }),
        ("net-used", &|| {
            net(&nic, NetAt::Rx(scratch() + REQUEST), RingAt::Used, t)
        }),
        ("blk-read", &|| block(&blk, BLK_IN, t, RingAt::None, 0)),
        ("blk-write", &|| block(&blk, BLK_OUT, t, RingAt::None, 0)),
        ("rx-buffer", &|| net(&nic, NetAt::Rx(t), RingAt::None, 0)),
        ("tx-buffer", &|| net(&nic, NetAt::Tx(t), RingAt::None, 0)),
        ("blk-after", &|| {
            block(&blk, BLK_IN, scratch() + FRAME, RingAt::None, 0)
        }),
    ];
    for (name, access) in accesses {
        let what = match access() {
            Outcome::Refused => "refused",
            Outcome::Done => "done",
            Outcome::Nothing => "no answer",
        };
        println!("{name}: {what}");
    }
    blk.w(STATUS, 0);
    nic.w(STATUS, 0);
    println!(
        "reset clears it: {}",
        !blk.needs_reset() && !nic.needs_reset()
    );
    if target == "data" {
        // The control: the block read put sector 0 there (0xa5 bytes) and
        // the receive buffer then took the gateway's ARP reply over its
        // start (sender 10.0.2.2).
        let sector: u8 = get(t + SECTOR as usize - 1);
        let arp_sender: [u8; 4] = get(t + 12 + 28);
        println!("data got sector 0: {}", sector == 0xa5);
        println!("data got the ARP reply: {}", arp_sender == [10, 0, 2, 2]);
    } else if visible > 0 {
        println!("target unchanged: {}", checksum(t, visible) == before);
    }
    println!(
        "canary returns {:#x} (before {canary_before:#x})",
        canary_fn()()
    );
    println!("still running");
    print_marker();
    println!("ready");
    // Stay up, still, while the test reads memory; it then kills us.
    wisp::time::sleep(Duration::from_secs(60));
    0
}
