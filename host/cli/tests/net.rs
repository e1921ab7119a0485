//! Networking with real clients: curl and raw sockets against the httpd
//! unikernel through `-p` (the user-mode network), and under QEMU through
//! its user network. Everything stays on 127.0.0.1.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn httpd() -> &'static Path {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let out = scratch().join("httpd.wisp");
        let o = wisp()
            .arg("build")
            .arg(repo().join("examples/httpd"))
            .arg("-o")
            .arg(&out)
            .output()
            .expect("build");
        assert!(o.status.success(), "{}", stderr(&o));
        out
    })
}

fn start_httpd(memory: &str) -> Guest {
    start_guest(httpd(), 80, &["--memory", memory], &[], |port| {
        http_get(port, "/").is_ok()
    })
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if out.is_empty() {
        return Err(std::io::Error::other("empty reply"));
    }
    Ok(out)
}

fn curl(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "20"]).args(args);
    output_within(cmd, Duration::from_secs(30))
}

#[test]
fn curl_gets_the_page_through_a_published_port() {
    let g = start_httpd("64M");
    let o = curl(&[&format!("http://127.0.0.1:{}/", g.port)]);
    assert!(
        stdout(&o).contains("Hello from a Wisp unikernel!"),
        "{}",
        stdout(&o)
    );
    let o = curl(&["-I", &format!("http://127.0.0.1:{}/", g.port)]);
    let head = stdout(&o);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("Content-Length: "), "{head}");
    let o = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://127.0.0.1:{}/missing", g.port),
    ]);
    assert_eq!(stdout(&o), "404");
    let o = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "DELETE",
        &format!("http://127.0.0.1:{}/", g.port),
    ]);
    assert_eq!(stdout(&o), "405");
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let g = start_httpd("64M");
    let url = format!("http://127.0.0.1:{}/", g.port);
    // curl reuses one connection for several URLs on the same host.
    let o = curl(&["-v", &url, &url, &url]);
    let err = stderr(&o);
    assert_eq!(
        stdout(&o).matches("Hello from a Wisp unikernel!").count(),
        3
    );
    assert!(err.contains("Re-using existing connection"), "{err}");
}

#[test]
fn malformed_requests_get_400_and_the_server_survives() {
    let g = start_httpd("64M");
    for garbage in [
        &b"\x00\x01\x02 garbage\r\n\r\n"[..],
        b"GET / HTTP/9.9 nonsense\r\n\r\n",
        b"GET\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", g.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(garbage).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 400"), "{garbage:?}: {out}");
    }
    // An endless header is cut off.
    let mut s = TcpStream::connect(("127.0.0.1", g.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nX-Long: ");
    let _ = s.write_all(&vec![b'a'; 40_000]);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // Still serving.
    assert!(http_get(g.port, "/").unwrap().contains("200 OK"));
}

#[test]
fn a_thousand_concurrent_connections() {
    let g = start_httpd("256M");
    let mut conns = Vec::new();
    for _ in 0..1000 {
        let s = TcpStream::connect(("127.0.0.1", g.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        conns.push(s);
    }
    // Every connection is open at once; now each asks for the page.
    for s in &mut conns {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
    }
    let mut ok = 0;
    let mut failures = Vec::new();
    for (i, s) in conns.iter_mut().enumerate() {
        let mut out = String::new();
        let r = s.read_to_string(&mut out);
        if r.is_ok() && out.starts_with("HTTP/1.1 200 OK") && out.contains("</html>") {
            ok += 1;
        } else {
            failures.push(format!("#{i}: {r:?} {:?}", &out[..out.len().min(80)]));
        }
    }
    assert_eq!(ok, 1000, "{failures:?}");
}

#[test]
fn an_image_that_needs_a_nic_is_refused_without_one() {
    let o = run(httpd(), &[], &[]);
    assert_clean_error(&o, "this image needs a network device");
}

#[test]
fn publishing_a_port_in_use_is_a_clear_error() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let o = run(httpd(), &["-p", &format!("{port}:80")], &[]);
    assert_clean_error(&o, "Address already in use");
}

#[test]
fn httpd_on_qemu_through_its_user_network() {
    require_kvm();
    let port = free_port();
    let fwd = format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80");
    let mut child = qemu_command(
        httpd(),
        &["-netdev", &fwd, "-device", "virtio-net-device,netdev=n0"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("qemu");
    let start = Instant::now();
    while http_get(port, "/").is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "QEMU guest never answered"
        );
        assert!(child.try_wait().unwrap().is_none(), "QEMU exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let page = http_get(port, "/").expect("page");
    let _ = child.kill();
    let _ = child.wait();
    assert!(page.contains("Hello from a Wisp unikernel!"), "{page}");
}

/// A network namespace with a tap device, removed when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("wisp-{}-{tag}", std::process::id());
        let ip = |args: &[&str]| {
            let o = Command::new("ip")
                .args(args)
                .output()
                .expect("run ip (iproute2)");
            assert!(
                o.status.success(),
                "ip {args:?} failed (the network tests create namespaces and need CAP_NET_ADMIN): {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &ns.name, "tuntap", "add", "dev", "tap0", "mode", "tap",
        ]);
        ip(&["-n", &ns.name, "addr", "add", "10.0.3.1/24", "dev", "tap0"]);
        ip(&["-n", &ns.name, "link", "set", "tap0", "up"]);
        ns
    }

    /// A command run inside the namespace. `nsenter` execs the program
    /// itself (no intermediate process), so killing the child kills it.
    fn exec(&self, cmd: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name)).args(cmd);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn curl_and_ping_through_a_tap_in_a_namespace() {
    require_kvm();
    let ns = Netns::new("tap");
    let child = ns
        .exec(&[
            env!("CARGO_BIN_EXE_wisp"),
            "run",
            "--net",
            "tap:tap0,ip=10.0.3.2/24,gw=10.0.3.1",
        ])
        .arg(httpd())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("wisp run in the namespace");
    let mut guest = Guest { child, port: 0 };
    let guest_alive = |g: &mut Guest| g.child.try_wait().unwrap().is_none();
    let start = Instant::now();
    loop {
        let o = output_within(
            ns.exec(&["curl", "-s", "--max-time", "2", "http://10.0.3.2/"]),
            Duration::from_secs(10),
        );
        if stdout(&o).contains("Hello from a Wisp unikernel!") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no answer through the tap"
        );
        assert!(guest_alive(&mut guest), "guest exited early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = output_within(
        ns.exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.3.2"]),
        Duration::from_secs(20),
    );
    assert!(stdout(&o).contains("3 received"), "{}", stdout(&o));
    // A flood of malformed frames (truncated and garbage Ethernet/IPv4)
    // from the namespace: the guest keeps serving.
    let flood = "import socket,os\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\ns.bind(('tap0',0))\nfor i in range(3000):\n    n=(i*7)%1480\n    s.send(b'\\xff'*6+os.urandom(6)+b'\\x08\\x00'+os.urandom(max(n,1)))\n";
    let o = output_within(ns.exec(&["python3", "-c", flood]), Duration::from_secs(30));
    assert!(o.status.success(), "flood: {}", stderr(&o));
    let o = output_within(
        ns.exec(&["curl", "-s", "--max-time", "5", "http://10.0.3.2/"]),
        Duration::from_secs(10),
    );
    assert!(
        stdout(&o).contains("Hello from a Wisp unikernel!"),
        "still serving after the flood"
    );
}

#[test]
fn udp_and_tcp_echo_through_published_ports() {
    let echo = example("echo");
    let port = free_port();
    let tcp = format!("{port}:7");
    let udp = format!("{port}:7/udp");
    let g = start_guest(&echo, 7, &["-p", &udp, "-p", &tcp], &[], |_| true);
    let _ = g.port; // the start helper published TCP on another port too
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 2048];
    let got = loop {
        sock.send_to(b"ping over udp", ("127.0.0.1", port)).unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            break buf[..n].to_vec();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no UDP echo");
    };
    assert_eq!(got, b"ping over udp");
    let big = vec![0x5au8; 1400];
    sock.send_to(&big, ("127.0.0.1", port)).unwrap();
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &big[..]);
    let mut t = TcpStream::connect(("127.0.0.1", port)).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    t.write_all(b"over tcp").unwrap();
    let mut back = [0u8; 8];
    t.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"over tcp");
}

#[test]
fn dhcp_and_dns_from_a_server_in_the_namespace() {
    require_kvm();
    let ns = Netns::new("dhcp");
    let dnsmasq = if Path::new("/usr/sbin/dnsmasq").exists() {
        "/usr/sbin/dnsmasq"
    } else {
        "dnsmasq"
    };
    let leases = scratch().join(format!("{}.leases", ns.name));
    let server = ns
        .exec(&[
            dnsmasq,
            "--no-daemon",
            "--conf-file=/dev/null",
            "--interface=tap0",
            "--bind-interfaces",
            "--dhcp-range=10.0.3.50,10.0.3.99,255.255.255.0,1h",
            "--dhcp-option=3,10.0.3.1",
            "--dhcp-option=6,10.0.3.1",
            "--address=/wisp.test/10.0.3.77",
            "--no-resolv",
            "--no-hosts",
            &format!("--dhcp-leasefile={}", leases.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq (dnsmasq-base)");
    let _server = Guest {
        child: server,
        port: 0,
    };
    std::thread::sleep(Duration::from_millis(300));
    let probe = repo().join("guest/testapps/netprobe");
    let image = scratch().join("netprobe.wisp");
    let o = wisp()
        .arg("build")
        .arg(&probe)
        .arg("-o")
        .arg(&image)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut cmd = ns.exec(&[
        env!("CARGO_BIN_EXE_wisp"),
        "run",
        "--timeout",
        "30s",
        "--net",
        "tap:tap0,ip=dhcp",
    ]);
    cmd.arg(&image).args(["--", "wisp.test", "nowhere.test"]);
    let o = output_within(cmd, Duration::from_secs(40));
    let out = stdout(&o);
    assert!(out.contains("address 10.0.3."), "{out}");
    assert!(out.contains("gateway 10.0.3.1 dns [10.0.3.1]"), "{out}");
    assert!(out.contains("wisp.test -> [10.0.3.77]"), "{out}");
    assert!(out.contains("nowhere.test: name not found"), "{out}");
    assert_eq!(status(&o), 1, "one name failed");
}

#[test]
fn dhcp_on_qemu_user_network() {
    require_kvm();
    let probe = repo().join("guest/testapps/netprobe");
    let image = scratch().join("netprobe-q.wisp");
    let o = wisp()
        .arg("build")
        .arg(&probe)
        .arg("-o")
        .arg(&image)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut cmd = qemu_command(
        &image,
        &[
            "-netdev",
            "user,id=n0,restrict=on",
            "-device",
            "virtio-net-device,netdev=n0",
        ],
    );
    cmd.args(["-append", "ip=dhcp"]);
    let o = output_within(cmd, Duration::from_secs(60));
    // restrict=on keeps the guest off the outside network; slirp then
    // offers no router, so only the address is checked.
    assert!(
        stdout(&o).contains("address 10.0.2.15/24"),
        "{}",
        stdout(&o)
    );
}
