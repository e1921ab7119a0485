//! Idle: prints one line and then waits forever, an hour at a time, in
//! the monitor (each sleep is one wait exit, no spinning), so that a
//! thousand of them cost the host memory but no CPU. The guest of the
//! density benchmark (`scripts/bench-density.sh`).
#![no_std]
#![no_main]

use core::time::Duration;

wisp::main!(main);

fn main(_args: wisp::Args) -> i32 {
    wisp::println!("idle: waiting");
    loop {
        wisp::time::sleep(Duration::from_secs(3600));
    }
}
