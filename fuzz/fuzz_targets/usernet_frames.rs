//! Arbitrary frames from the guest into the user-mode network's stack.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wisp_monitor::net::user::UserNet;
use wisp_monitor::net::NetBackend;

fuzz_target!(|data: &[u8]| {
    let mut net = UserNet::new(&[]).unwrap();
    for frame in data.split(|&b| b == 0xfe).take(64) {
        net.send(frame);
    }
    net.poll();
    while net.recv().is_some() {}
});
