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
        "clock" => println!("unix {}", wisp::time::unix_time().as_secs()),
        "text-end" => println!("{:#x}", &raw const __text_end as usize),
        other => {
            println!("probe: unknown action '{other}'");
            return 2;
        }
    }
    0
}
