//! Devices follow the guest's own memory map: a hostile driver (the probe's
//! `dma` action) aims block reads and writes, receive and transmit buffers
//! and every ring at its code, read-only data, boot page, page tables, GDT,
//! IDT and TSS. Each access the guest's CPU could not make is refused: the
//! device shows NEEDS_RESET, one line goes to stderr, the guest keeps
//! running, and the target is unchanged (checked by the guest where it may
//! read it, and from the host, in the monitor's memory, where it may not).
//! Also: a guest that never takes its frames costs the host bounded memory
//! and little CPU, however hard its NIC is flooded.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use wisp_monitor::layout::Layout;

const MEMORY: u64 = 64 << 20;
const DISK_BYTE: u8 = 0xa5;
const SECTOR: usize = 512;

/// The accesses `probe dma` makes, in order, and what stderr says when the
/// device refuses each.
const ACCESSES: [(&str, &str); 10] = [
    (
        "blk-desc",
        "virtio-blk stopped: request queue refused: descriptor table",
    ),
    (
        "blk-avail",
        "virtio-blk stopped: request queue refused: available ring",
    ),
    (
        "blk-used",
        "virtio-blk stopped: request queue refused: used ring",
    ),
    (
        "net-desc",
        "virtio-net stopped: queue 0 refused: descriptor table",
    ),
    (
        "net-avail",
        "virtio-net stopped: queue 0 refused: available ring",
    ),
    ("net-used", "virtio-net stopped: queue 0 refused: used ring"),
    (
        "blk-read",
        "virtio-blk stopped: request buffer refused: TARGET+0x200 is not writable",
    ),
    (
        "blk-write",
        "virtio-blk stopped: request buffer refused: TARGET+0x200 is not readable",
    ),
    (
        "rx-buffer",
        "virtio-net stopped: receive buffer refused: TARGET+0x800 is not writable",
    ),
    (
        "tx-buffer",
        "virtio-net stopped: transmit buffer refused: TARGET+0x40 is not readable",
    ),
];

/// A disk of 16 sectors of `DISK_BYTE`, for one run.
fn disk(tag: &str) -> PathBuf {
    let path = scratch().join(format!("dma-{}-{tag}.img", std::process::id()));
    std::fs::write(&path, vec![DISK_BYTE; 16 * SECTOR]).expect("write disk");
    path
}

/// A finished `probe dma` run: its output, and the monitor's copy of the
/// guest's system area (page tables, GDT, IDT, TSS) read while the guest
/// was still up after the accesses.
struct DmaRun {
    stdout: String,
    stderr: String,
    system_area: Vec<u8>,
    disk: Vec<u8>,
}

/// The addresses the monitor gives the probe's boot structures.
fn layout() -> &'static Layout {
    static LAYOUT: OnceLock<Layout> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let image = wisp_monitor::Image::from_file(probe()).expect("probe image");
        Layout::with_devices(&image, MEMORY, 64, true).expect("layout")
    })
}

/// Runs `probe dma TARGET` until it says `ready`, reads the system area out
/// of the monitor, then kills it.
fn dma(target: &str) -> DmaRun {
    require_kvm();
    let disk = disk(target);
    let mut child = wisp()
        .args(["run", "--net", "user", "--disk"])
        .arg(&disk)
        .arg(probe())
        .args(["--", "dma", target])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wisp run");
    let mut err = child.stderr.take().expect("stderr");
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stdout = String::new();
    let mut marker = None;
    loop {
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "dma {target}: no 'ready' from the guest\nstdout:\n{stdout}\nstderr:\n{}",
                    stderr.join().unwrap_or_default()
                );
            }
        };
        stdout.push_str(&line);
        stdout.push('\n');
        if let Some(m) = line.strip_prefix("marker ") {
            let v: Vec<u64> = m
                .split(' ')
                .map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).expect("hex"))
                .collect();
            marker = Some((v[0], [v[1], v[2]]));
        }
        if line == "ready" {
            break;
        }
    }
    let (addr, value) = marker.expect("the guest printed its marker");
    let l = layout();
    let system_area = read_guest(&child, addr, value, l.pml4, l.system_end - l.pml4);
    let _ = child.kill();
    let _ = child.wait();
    let disk_bytes = std::fs::read(&disk).expect("read disk");
    let _ = std::fs::remove_file(&disk);
    DmaRun {
        stdout,
        stderr: stderr.join().unwrap_or_default(),
        system_area,
        disk: disk_bytes,
    }
}

/// Reads `len` bytes at guest-physical `at` out of the running monitor
/// `child`: finds its mapping of guest memory by the marker the guest wrote
/// at `marker_addr`, then reads through /proc/PID/mem.
fn read_guest(child: &Child, marker_addr: u64, marker: [u64; 2], at: u64, len: u64) -> Vec<u8> {
    let pid = child.id();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let want: Vec<u8> = marker.iter().flat_map(|v| v.to_le_bytes()).collect();
    let page_offset = marker_addr % 4096;
    let mut base = None;
    'maps: for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let (start, end) = range.split_once('-').expect("range");
        let start = u64::from_str_radix(start, 16).expect("hex");
        let end = u64::from_str_radix(end, 16).expect("hex");
        let mut chunk = vec![0u8; 1 << 20];
        let mut off = start;
        while off < end {
            let n = chunk.len().min((end - off) as usize);
            if mem.read_exact_at(&mut chunk[..n], off).is_err() {
                break;
            }
            for page in (0..n).step_by(4096) {
                let p = page + page_offset as usize;
                if p + 16 <= n && chunk[p..p + 16] == want[..] {
                    base = Some(off + p as u64 - marker_addr);
                    break 'maps;
                }
            }
            off += n as u64;
        }
    }
    let base = base.expect("guest memory (the marker) found in the monitor");
    let mut buf = vec![0u8; len as usize];
    mem.read_exact_at(&mut buf, base + at)
        .expect("read the guest's system area");
    buf
}

/// The system area with the bits the CPU itself sets while the guest runs
/// cleared: accessed and dirty in page-table entries, accessed in segment
/// descriptors. Whatever a device wrote shows in the other bits.
fn masked(area: &[u8]) -> Vec<u64> {
    const CPU_SET: u64 = (1 << 5) | (1 << 6) | (1 << 40);
    area.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()) & !CPU_SET)
        .collect()
}

/// The control run: every access aimed at the probe's own buffers works.
fn control() -> &'static DmaRun {
    static RUN: OnceLock<DmaRun> = OnceLock::new();
    RUN.get_or_init(|| dma("data"))
}

/// Asserts that `run` left the system area as the control run did.
fn assert_system_area_unchanged(run: &DmaRun, what: &str) {
    let (got, want) = (masked(&run.system_area), masked(&control().system_area));
    assert_eq!(got.len(), want.len());
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: the system area differs from the control run's at {:#x}: {:#018x}, not {:#018x}",
            layout().pml4 + 8 * i as u64,
            got[i],
            want[i]
        );
    }
}

fn outcome<'a>(run: &'a DmaRun, access: &str) -> &'a str {
    run.stdout
        .lines()
        .find_map(|l| l.strip_prefix(access).and_then(|r| r.strip_prefix(": ")))
        .unwrap_or_else(|| panic!("no line for {access}:\n{}", run.stdout))
}

/// Checks one run at `target` (at `addr`): the accesses in `refused` were
/// refused with NEEDS_RESET and one stderr line each, in order; the rest
/// were done; the device works again after a reset; the guest still runs.
fn check(run: &DmaRun, target: &str, addr: u64, refused: &[&str]) {
    let ctx = format!(
        "target {target}\nstdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    let mut lines = run.stderr.lines().filter(|l| l.contains(" stopped: "));
    for (access, report) in ACCESSES {
        if refused.contains(&access) {
            assert_eq!(outcome(run, access), "refused", "{access}: {ctx}");
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("no report for {access}: {ctx}"));
            let report = report.replace("TARGET", &format!("{addr:#x}"));
            assert!(
                line.starts_with("wisp: ") && line.contains(&report),
                "{access}: expected '{report}' in '{line}': {ctx}"
            );
        } else {
            assert_eq!(outcome(run, access), "done", "{access}: {ctx}");
        }
    }
    assert_eq!(lines.next(), None, "one report per refused access: {ctx}");
    assert_eq!(outcome(run, "blk-after"), "done", "{ctx}");
    assert!(run.stdout.contains("reset clears it: true\n"), "{ctx}");
    assert!(
        run.stdout
            .contains("canary returns 0x51573e4f0ca2a7e1 (before 0x51573e4f0ca2a7e1)\n"),
        "{ctx}"
    );
    assert!(run.stdout.contains("still running\n"), "{ctx}");
}

#[test]
fn device_accesses_to_the_guests_own_buffers_work() {
    let run = control();
    check(run, "data", 0, &[]);
    assert!(
        run.stdout.contains("data got sector 0: true\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("data got the ARP reply: true\n"),
        "{}",
        run.stdout
    );
    let area = masked(&run.system_area);
    assert!(area[0] != 0, "the PML4 was read from the monitor");
}

fn target_addr(run: &DmaRun) -> u64 {
    let line = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("target "))
        .expect("target line");
    let hex = line.split(' ').nth(1).expect("address");
    u64::from_str_radix(hex.trim_start_matches("0x"), 16).expect("hex")
}

#[test]
fn devices_may_not_write_code_rodata_or_the_boot_page() {
    let writes = [
        "blk-desc",
        "blk-avail",
        "blk-used",
        "net-desc",
        "net-avail",
        "net-used",
        "blk-read",
        "rx-buffer",
    ];
    for target in ["text", "rodata", "boot-page"] {
        let run = dma(target);
        check(&run, target, target_addr(&run), &writes);
        // For text, `canary` (checked above) is the function aimed at.
        assert!(
            target == "text" || run.stdout.contains("target unchanged: true\n"),
            "{target}: {}",
            run.stdout
        );
        assert_system_area_unchanged(&run, target);
    }
}

#[test]
fn devices_may_not_touch_page_tables_gdt_idt_or_tss() {
    let l = layout();
    // The PML4, the table mapping the image with 4 KiB pages, GDT, IDT, TSS.
    for (name, addr) in [
        ("PML4", l.pml4),
        ("page table", l.pt_base),
        ("GDT", l.gdt),
        ("IDT", l.idt),
        ("TSS", l.tss),
    ] {
        let run = dma(&format!("{addr:#x}"));
        let all: Vec<&str> = ACCESSES.iter().map(|a| a.0).collect();
        check(&run, name, addr, &all);
        assert_system_area_unchanged(&run, name);
        assert_eq!(
            &run.disk[SECTOR..2 * SECTOR],
            &[DISK_BYTE; SECTOR][..],
            "{name}: nothing of it reached the disk"
        );
    }
}

// ---- Bounded host memory and CPU, whatever the guest does ----

/// CPU time the process has used (user + system, from /proc/PID/stat,
/// in clock ticks turned into a duration) and its resident memory.
fn usage(pid: u32) -> (Duration, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces) start at 3.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    (Duration::from_millis(ticks * 1000 / hz), rss_kib * 1024)
}

/// Most CPU a monitor whose guest takes no frames may spend over a flood,
/// and most memory it may gain (its queues are bounded well below this).
const FLOOD_CPU: Duration = Duration::from_millis(300);
const FLOOD_RSS: u64 = 16 << 20;
/// How long each flood lasts (the sender's own loop; nothing is asserted
/// about time, only about the monitor's CPU ticks and memory).
const FLOOD_FOR: Duration = Duration::from_secs(3);

/// Starts `cmd` (a `wisp run … probe -- idle …`) and waits for "idle".
fn start_idle(mut cmd: Command) -> Guest {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn wisp run");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let _ = out.read_line(&mut line);
    let guest = Guest { child, port: 0 };
    assert_eq!(line, "idle\n", "the probe did not start");
    // Keep reading (and dropping) whatever it prints later.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    guest
}

/// Measures the monitor while `flood` runs, and checks it stayed within
/// the bounds and alive.
fn assert_bounded_under(guest: &mut Guest, what: &str, flood: impl FnOnce() -> u64) {
    let pid = guest.child.id();
    std::thread::sleep(Duration::from_millis(300)); // let boot settle
    let (cpu0, rss0) = usage(pid);
    let sent = flood();
    let (cpu1, rss1) = usage(pid);
    assert!(
        guest.child.try_wait().expect("wait").is_none(),
        "{what}: the monitor died"
    );
    let (cpu, rss) = (cpu1 - cpu0, rss1.saturating_sub(rss0));
    eprintln!(
        "{what}: {sent} sent; monitor used {cpu:?} of CPU, gained {} KiB",
        rss >> 10
    );
    assert!(sent > 10_000, "{what}: the flood sent only {sent}");
    assert!(
        rss < FLOOD_RSS,
        "{what}: the monitor grew by {} KiB over {sent} frames its guest never took",
        rss >> 10
    );
    assert!(
        cpu < FLOOD_CPU,
        "{what}: the monitor used {cpu:?} of CPU serving a guest that takes no frames"
    );
}

#[test]
fn udp_flood_to_a_nic_the_guest_never_activates_costs_little() {
    require_kvm();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = wisp();
    cmd.args(["run", "-p", &format!("{port}:{port}/udp")])
        .arg(probe())
        .args(["--", "idle", "600000"]);
    let mut guest = start_idle(cmd);
    assert_bounded_under(&mut guest, "UDP flood", || {
        let senders: Vec<_> = (0..2)
            .map(|_| {
                std::thread::spawn(move || {
                    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                    let payload = [0x5au8; 1400];
                    let start = Instant::now();
                    let mut sent = 0u64;
                    while start.elapsed() < FLOOD_FOR && sent < 2_000_000 {
                        if s.send_to(&payload, ("127.0.0.1", port)).is_ok() {
                            sent += 1;
                        }
                    }
                    sent
                })
            })
            .collect();
        senders.into_iter().map(|s| s.join().unwrap()).sum()
    });
}

/// A network namespace with a tap device, removed when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("wisp-{}-{tag}", std::process::id());
        let ip = |args: &[&str]| {
            let o = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                o.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
        ip(&["-n", &ns.0, "addr", "add", "10.0.3.1/24", "dev", "tap0"]);
        ip(&["-n", &ns.0, "link", "set", "tap0", "up"]);
        ns
    }

    /// A command run inside the namespace (nsenter execs it: killing the
    /// child kills it).
    fn exec(&self, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.0)).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn tap_flood_to_a_nic_the_guest_never_activates_costs_little() {
    require_kvm();
    let ns = Netns::new("flood");
    let mut cmd = ns.exec(Path::new(env!("CARGO_BIN_EXE_wisp")));
    cmd.args(["run", "--net", "tap:tap0,ip=10.0.3.2/24,gw=10.0.3.1"])
        .arg(probe())
        .args(["--", "idle", "600000"]);
    let mut guest = start_idle(cmd);
    // Frames of 1400 bytes written to the tap from the namespace's side,
    // as fast as Python can, for FLOOD_FOR.
    let flood = format!(
        "import socket,time\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\ns.bind(('tap0',0))\nf=b'\\x52\\x54\\x00\\x12\\x34\\x56'+b'\\x02'*6+b'\\x08\\x00'+b'\\x45'*1386\nn=0\nend=time.time()+{}\nwhile time.time()<end and n<2000000:\n    try:\n        s.send(f); n+=1\n    except OSError:\n        pass\nprint(n)\n",
        FLOOD_FOR.as_secs_f64()
    );
    assert_bounded_under(&mut guest, "tap flood", || {
        let mut py = ns.exec(Path::new("python3"));
        py.args(["-c", &flood]);
        let o = output_within(py, Duration::from_secs(60));
        assert!(o.status.success(), "flood: {}", stderr(&o));
        stdout(&o).trim().parse().expect("count")
    });
}

/// Register writes that KVM buffers (coalesced MMIO) still take effect in
/// the guest's order before anything that depends on them: a read right
/// after a selector write answers for the new selection, FEATURES_OK and
/// DRIVER_OK judge the features and ring addresses written just before
/// (a bogus one is still refused, the last of two writes counts), and the
/// writes are really buffered (fewer exits than the probe's writes). Also:
/// the boot page's copy of the read-only registers, which the library OS
/// reads instead of them, matches them.
#[test]
fn buffered_register_writes_keep_their_order() {
    require_kvm();
    let mut cmd = wisp();
    cmd.args(["run", "--stats", "--net", "user"])
        .arg(probe())
        .args(["--", "mmio-order"]);
    let out = output_within(cmd, Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    // virtio-net offers VERSION_1 (bit 32) in the high word and the MAC
    // (bit 5) in the low one.
    let features = stdout
        .lines()
        .find_map(|l| l.strip_prefix("features high "))
        .expect("features line");
    let (high, low) = features.split_once(" low ").expect("two words");
    let word = |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    assert_eq!(
        word(high) & 1,
        1,
        "high word read after selecting it: {ctx}"
    );
    assert_eq!(word(low) & (1 << 5), 1 << 5, "low word: {ctx}");
    assert_ne!(word(high), word(low), "{ctx}");
    for line in [
        "boot page describes the registers: true",
        "bogus features accepted: false",
        "offered features accepted: true",
        "queue ready: 0=1 1=0 (max 256)",
        "bogus ring refused: true",
        "valid rings accepted: true",
    ] {
        assert!(stdout.lines().any(|l| l == line), "missing '{line}': {ctx}");
    }
    // The probe makes ~100 register writes, ~70 of them to buffered
    // registers; unbuffered, each would be an exit.
    let exits: u64 = stderr
        .split("stats: exits ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("--stats line");
    assert!(exits < 60, "{exits} exits: writes were not buffered: {ctx}");
}
