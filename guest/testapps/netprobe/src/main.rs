//! `netprobe [NAME...]`: waits until the network is configured (statically
//! or by DHCP), prints the address, gateway and DNS servers, then resolves
//! each NAME and prints the answers; exits 0, or 1 if a name failed.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

wisp::main!(main);

fn main(args: wisp::Args) -> i32 {
    let names: Vec<&'static str> = args.collect();
    wisp::exec::block_on(async move {
        let c = match wisp_net::stack::configured().await {
            Ok(c) => c,
            Err(e) => {
                wisp::println!("netprobe: {e}");
                return 1;
            }
        };
        wisp::println!(
            "address {}/{} gateway {} dns {:?}",
            c.address,
            c.prefix_len,
            c.gateway,
            c.dns_servers
        );
        let mut status = 0;
        for name in names {
            match wisp_net::dns::resolve(name).await {
                Ok(addrs) => wisp::println!("{name} -> {addrs:?}"),
                Err(e) => {
                    wisp::println!("{name}: {e}");
                    status = 1;
                }
            }
        }
        status
    })
}
