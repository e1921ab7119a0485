//! echo: the Echo Protocol (RFC 862) on UDP and TCP port 7 (or the port
//! given as first argument): every datagram is sent back to its sender,
//! every byte of a TCP connection back down it.
//!
//! `wisp run -p 7007:7/udp -p 7007:7 echo.wisp`, then
//! `echo hi | nc -u -w1 127.0.0.1 7007`.
#![no_std]
#![no_main]

extern crate alloc;

use wisp_net::{TcpListener, TcpStream, UdpSocket};

wisp::main!(main);

fn main(args: wisp::Args) -> i32 {
    let port = args
        .clone()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(7);
    wisp::exec::block_on(async move {
        let mut udp = match UdpSocket::bind(port) {
            Ok(s) => s,
            Err(e) => {
                wisp::println!("echo: cannot bind UDP port {port}: {e}");
                return 1;
            }
        };
        let mut tcp = match TcpListener::bind(port) {
            Ok(l) => l,
            Err(e) => {
                wisp::println!("echo: cannot listen on TCP port {port}: {e}");
                return 1;
            }
        };
        wisp::println!("echo: UDP and TCP port {port}");
        wisp::exec::spawn(async move {
            let mut buf = alloc::vec![0u8; 65536];
            loop {
                if let Ok((n, from)) = udp.recv_from(&mut buf).await {
                    let _ = udp.send_to(&buf[..n], from).await;
                }
            }
        });
        loop {
            if let Ok(stream) = tcp.accept().await {
                wisp::exec::spawn(echo(stream));
            }
        }
    })
}

async fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
