//! Hello, unikernel: prints a greeting with the arguments given after `--`
//! on the `wisp run` command line and exits with status 0.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

wisp::main!(main);

fn main(args: wisp::Args) -> i32 {
    let args: Vec<&str> = args.collect();
    wisp::println!("Hello from Wisp! args: {:?}", args);
    0
}
