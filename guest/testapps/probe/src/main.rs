//! A unikernel for the integration tests: `probe ACTION [ARG]` performs one
//! action, so a single image covers exit codes, panics, every CPU
//! exception the crash report must handle, the memory protections the
//! monitor promises, timeouts, sleeping and the heap.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::time::Duration;
use wisp::println;

mod dma;
mod regs;

wisp::main!(main);

extern "C" {
    static __text_end: u8;
    static __stack_bottom: u8;
}

/// Reads through a pointer the compiler cannot reason about.
fn read(addr: usize) -> u64 {
    // SAFETY: deliberately unsound: the tests expect this access to fault.
    unsafe { core::ptr::read_volatile(core::hint::black_box(addr) as *const u64) }
}

fn write(addr: usize, v: u64) {
    // SAFETY: deliberately unsound: the tests expect this access to fault.
    unsafe { core::ptr::write_volatile(core::hint::black_box(addr) as *mut u64, v) }
}

#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(n: u64) -> u64 {
    let buf = core::hint::black_box([n; 64]);
    recurse(buf[3] + 1) + buf[5]
}

/// One raw hypercall.
fn hypercall(port: u16, value: u32) {
    // SAFETY: `out` to a hypercall port; the monitor validates `value`.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") value) }
}

/// A page-aligned ring area for [`virtio_attack`].
#[repr(C, align(4096))]
struct Rings([u8; 6 * 4096]);
static mut RINGS: Rings = Rings([0; 6 * 4096]);

/// Programs the NIC's transmit queue by hand with a malicious descriptor
/// chain and notifies the device.
fn virtio_attack(kind: &str) {
    let boot = wisp::boot::boot_page();
    let Some(nic) = boot.devices().iter().find(|d| d.kind == 1) else {
        println!("no NIC: run with --net user");
        return;
    };
    let base = nic.mmio_base as usize;
    let w = |off: usize, v: u32| {
        // SAFETY: the NIC's register window, mapped by the monitor.
        unsafe { core::ptr::write_volatile((base + off) as *mut u32, v) }
    };
    let rings = (&raw mut RINGS) as usize;
    let (desc, avail, used) = (rings, rings + 4096, rings + 8192);
    let rx = rings + 3 * 4096; // a valid, empty receive queue
    w(0x070, 1); // ACKNOWLEDGE
    w(0x070, 3); // DRIVER
    w(0x024, 1);
    w(0x020, 1); // VERSION_1
    w(0x024, 0);
    w(0x020, 0);
    w(0x070, 11); // FEATURES_OK
    w(0x030, 0); // receive queue: valid and empty
    w(0x038, 8);
    w(0x080, rx as u32);
    w(0x084, 0);
    w(0x090, (rx + 4096) as u32);
    w(0x094, 0);
    w(0x0a0, (rx + 8192) as u32);
    w(0x0a4, 0);
    w(0x044, 1);
    w(0x030, 1); // transmit queue
    w(0x038, 8);
    w(0x080, desc as u32);
    w(0x084, 0);
    w(0x090, avail as u32);
    w(0x094, 0);
    w(0x0a0, used as u32);
    w(0x0a4, 0);
    w(0x044, 1);
    w(0x070, 15); // DRIVER_OK
    let put = |addr: usize, v: u64, size: usize| {
        // SAFETY: inside RINGS, which only this function uses.
        unsafe {
            match size {
                2 => core::ptr::write_volatile(addr as *mut u16, v as u16),
                4 => core::ptr::write_volatile(addr as *mut u32, v as u32),
                _ => core::ptr::write_volatile(addr as *mut u64, v),
            }
        }
    };
    // Descriptor 0: addr, len, flags, next.
    let (addr, len, flags, next, idx) = match kind {
        "ring-outside" => (0xffff_ff00_0000u64, 4096u64, 0u64, 0u64, 1u64),
        "ring-loop" => (rings as u64 + 9000, 64, 1, 0, 1), // NEXT to itself
        "ring-huge" => (0x10_0000, 0xffff_ffff, 0, 0, 1),
        _ => (0x10_0000, 64, 0, 0, 1000), // avail index far past the ring
    };
    put(desc, addr, 8);
    put(desc + 8, len, 4);
    put(desc + 12, flags, 2);
    put(desc + 14, next, 2);
    put(avail + 4, 0, 2); // ring[0] = descriptor 0
    put(avail + 2, idx, 2);
    w(0x050, 1); // notify the transmit queue
}

fn main(args: wisp::Args) -> i32 {
    let args: Vec<&str> = args.collect();
    let arg = |i: usize| args.get(i).copied().unwrap_or("");
    let num = |i: usize| arg(i).parse::<u64>().unwrap_or(0);
    match arg(0) {
        "exit" => return num(1) as i32,
        "args" => println!("argc={} {:?}", args.len() - 1, &args[1..]),
        "print-lines" => {
            for i in 0..num(1) {
                println!("line {i}");
            }
        }
        "no-newline" => wisp::print!("partial line without newline"),
        "panic" => panic!("probe panicked on purpose"),
        // The exceptions, one each.
        "ud" => {
            // SAFETY: raises #UD on purpose.
            unsafe { core::arch::asm!("ud2") }
        }
        "de" => {
            let zero = core::hint::black_box(0u64);
            // SAFETY: raises #DE on purpose (a plain `/` would panic first).
            unsafe {
                core::arch::asm!("div {0}", in(reg) zero, inout("rax") 1u64 => _, inout("rdx") 0u64 => _)
            }
        }
        "gp" => {
            // SAFETY: `hlt` at CPL3 raises #GP on purpose.
            unsafe { core::arch::asm!("hlt") }
        }
        "bp" => {
            // SAFETY: raises #BP on purpose.
            unsafe { core::arch::asm!("int3") }
        }
        "null" => println!("read {}", read(0)),
        "unmapped" => println!("read {}", read(0x7fff_0000_0000)),
        "write-text" => write(main as *const () as usize, 0),
        "write-rodata" => write("a constant string".as_ptr() as usize & !7, 0),
        "write-boot-page" => {
            let boot = wisp::boot::boot_page() as *const _ as usize;
            write(boot, 0)
        }
        // The page tables live at 0x1000 on the Wisp monitor: supervisor only.
        "read-page-tables" => println!("read {}", read(0x1000)),
        "exec-stack" => {
            let code = [0xc3u8; 16]; // ret
                                     // SAFETY: jumps to the stack on purpose: NX must stop it.
            let f: extern "C" fn() =
                unsafe { core::mem::transmute(core::hint::black_box(code.as_ptr())) };
            f();
        }
        "guard" => {
            // SAFETY: the address of a linker symbol.
            let bottom = &raw const __stack_bottom as usize;
            println!("read {}", read(bottom - 8));
        }
        "stack-overflow" => println!("{}", recurse(0)),
        "spin" => loop {
            core::hint::spin_loop();
        },
        "sleep" => {
            let start = wisp::time::Instant::now();
            wisp::time::sleep(Duration::from_millis(num(1)));
            println!("slept {} ms", start.elapsed().as_millis());
        }
        "async-sleep" => {
            let ms = num(1);
            let total = wisp::exec::block_on(async move {
                let a = wisp::exec::spawn(async move {
                    wisp::exec::sleep(Duration::from_millis(ms)).await;
                    1u32
                });
                let b = wisp::exec::spawn(async move {
                    wisp::exec::sleep(Duration::from_millis(ms / 2)).await;
                    2u32
                });
                a.await + b.await
            });
            println!("tasks done: {total}");
        }
        "alloc" => {
            let mib = num(1) as usize;
            let mut v: Vec<Vec<u8>> = Vec::new();
            for i in 0..mib {
                v.push(alloc::vec![i as u8; 1 << 20]);
            }
            println!(
                "allocated {} MiB, heap {} KiB",
                v.len(),
                wisp::mem::heap_size() / 1024
            );
        }
        // A counter whose state lives in guest memory, for snapshots: one
        // line per tick (every ARG ms) with the clocks and the identity the
        // monitor gives (restores, clone, seed).
        "counter" => {
            let period = Duration::from_millis(num(1).max(1));
            let mut n: u64 = 0;
            loop {
                n += 1;
                let id = wisp::boot::identity();
                println!(
                    "tick {n} mono {} unix_ms {} restores {} clone {} seed {:x}",
                    wisp::time::Instant::now().as_nanos(),
                    wisp::time::unix_time().as_millis(),
                    id.restore_count,
                    id.clone_id,
                    id.seed
                );
                wisp::time::sleep(period);
            }
        }
        // A guest that keeps writing its memory, for live migration: MIB
        // MiB of pages, each pass checks that every page still holds the
        // previous pass's number (a page lost by a migration shows) and
        // writes the next; a line per pass, then ARG2 ms of sleep.
        "dirty" => {
            let pages = num(1).max(1) as usize * 256;
            let period = num(2);
            let mut buf: Vec<u64> = alloc::vec![0; pages * 512];
            let mut pass: u64 = 0;
            loop {
                for p in 0..pages {
                    let v = buf[p * 512];
                    if v != pass {
                        println!("CORRUPT page {p} holds {v}, expected {pass}");
                        return 3;
                    }
                    buf[p * 512] = pass + 1;
                }
                pass += 1;
                println!("pass {pass} pages {pages}");
                if period > 0 {
                    wisp::time::sleep(Duration::from_millis(period));
                }
            }
        }
        // Pages only the disk device writes: each pass first checks that
        // the buffer still holds the region the last pass read, then reads
        // the next region into it (the host wrote each 8-byte word of the
        // disk as its own offset). A migration that lost a device write
        // shows as CORRUPT on the destination.
        "disk-hold" => {
            const REGION: usize = 64 << 10;
            let period = num(1);
            let mut disk = match wisp_blk::Disk::open() {
                Ok(d) => d,
                Err(e) => {
                    println!("no disk: {e:?}");
                    return 2;
                }
            };
            let regions = (disk.capacity() as usize / REGION).max(1) as u64;
            let mut buf = alloc::vec![0u8; REGION];
            let holds = |buf: &[u8], r: u64| {
                buf.chunks_exact(8).enumerate().all(|(i, w)| {
                    u64::from_le_bytes(w.try_into().unwrap_or([0; 8]))
                        == r * REGION as u64 + i as u64 * 8
                })
            };
            let mut pass: u64 = 0;
            loop {
                if pass > 0 && !holds(&buf, (pass - 1) % regions) {
                    println!("CORRUPT buffer lost region {}", (pass - 1) % regions);
                    return 3;
                }
                let r = pass % regions;
                if disk.read_now(r * (REGION as u64 / 512), &mut buf).is_err() || !holds(&buf, r) {
                    println!("CORRUPT read of region {r}");
                    return 3;
                }
                pass += 1;
                println!("pass {pass} region {r}");
                if period > 0 {
                    wisp::time::sleep(Duration::from_millis(period));
                }
            }
        }
        "clock" => println!("unix {}", wisp::time::unix_time().as_secs()),
        "clock-source" => println!(
            "{:?} tsc {} kHz, halts when idle: {}",
            wisp::platform::pvh::clock_source(),
            wisp::time::tsc_khz(),
            wisp::platform::pvh::halts_when_idle()
        ),
        // The same protections on every monitor: below the image (page
        // tables on the Wisp monitor, the loader's data under PVH), past
        // the end of RAM, and (PVH) each system structure and the IOAPIC.
        "write-below-image" => write(0x1000, 0),
        "read-beyond-ram" => println!("read {}", read(wisp::boot::boot_page().mem_size as usize)),
        "read-addr" | "write-addr" => {
            let addr = usize::from_str_radix(arg(1).trim_start_matches("0x"), 16).unwrap_or(0);
            if arg(0) == "read-addr" {
                println!("read {}", read(addr));
            } else {
                write(addr, 0);
            }
        }
        "read-system" | "write-system" => {
            let (name, addr) = wisp::platform::pvh::system_structures()[num(1) as usize % 6];
            println!("{} {name} at {addr:#x}", arg(0));
            wisp::console::flush();
            if arg(0) == "read-system" {
                println!("read {}", read(addr as usize));
            } else {
                write(addr as usize, 0);
            }
        }
        // Hostile hypercalls: argument blocks outside memory, oversized
        // console writes. The monitor must stop the guest cleanly.
        "bad-console-ptr" => hypercall(0x500, 0xffff_f000),
        "bad-wait-ptr" => hypercall(0x501, 0xffff_fff8),
        "huge-console" => {
            let args = [0x10_0000u64, 1 << 40];
            hypercall(0x500, args.as_ptr() as usize as u32);
        }
        "unknown-port-read" => {
            // SAFETY: an `in` from a port the I/O bitmap denies: #GP.
            unsafe { core::arch::asm!("in al, dx", in("dx") 0x3f8u16, out("al") _) }
        }
        "console-flood" => {
            // 64 MiB as fast as the console takes it, in 64 KiB writes
            // (`console-flood forever`: without end).
            let chunk = alloc::vec![b'x'; 64 * 1024];
            let n = if arg(1) == "forever" { u64::MAX } else { 1024 };
            for _ in 0..n {
                wisp::platform::console_write(&chunk);
            }
            wisp::platform::console_write(b"\nflood done\n");
        }
        // Hostile virtio rings on the NIC (run with --net user).
        "ring-outside" | "ring-loop" | "ring-huge" | "ring-avail-idx" => {
            virtio_attack(arg(0));
            println!("survived");
        }
        "text-end" => println!("{:#x}", &raw const __text_end as usize),
        // Device accesses aimed at memory the guest may not write (run with
        // --net user --disk FILE): see dma.rs.
        "dma" => return dma::run(arg(1)),
        // Register reads right after the writes that decide them (run with
        // --net user): see regs.rs.
        "mmio-order" => return regs::run(),
        // Says it is up, then sleeps without touching its devices (a NIC it
        // never activates, for the flood tests).
        "idle" => {
            println!("idle");
            wisp::time::sleep(Duration::from_millis(num(1)));
        }
        // Waits for a stop request, says so, and exits with ARG (its own
        // status: the stop was handled by the application).
        "stop-status" => {
            let status = num(1) as i32;
            return wisp::exec::block_on(async move {
                println!("waiting for a stop request");
                wisp::shutdown::requested().await;
                println!("stop requested: exiting with {status}");
                status
            });
        }
        // Notices a stop request and carries on (must be stopped by force).
        "stop-ignore" => wisp::exec::block_on(async {
            println!("waiting for a stop request");
            wisp::shutdown::requested().await;
            println!("stop requested: ignored");
            loop {
                wisp::exec::sleep(Duration::from_secs(3600)).await;
            }
        }),
        other => {
            println!("probe: unknown action '{other}'");
            return 2;
        }
    }
    0
}
