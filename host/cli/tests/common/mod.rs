//! Helpers shared by the integration tests: the `wisp` binary, the test
//! images (built once per test process with `wisp build`), and running
//! guests on the Wisp monitor and on QEMU with a time limit.
#![allow(dead_code)]

pub mod daemon;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `wisp` binary under test.
pub fn wisp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wisp"))
}

/// Root of the repository.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// Fails (never skips) when KVM is missing: these tests exist to boot VMs.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the Wisp boot tests need KVM and do not skip without it"
    );
}

/// Scratch directory for this test binary.
pub fn scratch() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("wisp-tests");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn build_image(app: &str, name: &str) -> PathBuf {
    let out = scratch().join(format!("{name}.wisp"));
    let o = wisp()
        .arg("build")
        .arg(repo().join(app))
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run wisp build");
    assert!(
        o.status.success(),
        "wisp build {app} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// The hello example image.
pub fn hello() -> &'static Path {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| build_image("examples/hello", "hello"))
}

/// The probe test image (first argument picks a behaviour).
pub fn probe() -> &'static Path {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| build_image("guest/testapps/probe", "probe"))
}

/// Runs `cmd` for at most `limit` (killing it after), reading its output
/// while it runs so a chatty command never blocks on a full pipe.
pub fn output_within(mut cmd: Command, limit: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let (o, e) = (
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default(),
            );
            panic!(
                "command did not finish within {limit:?}: {cmd:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&o[..o.len().min(4096)]),
                String::from_utf8_lossy(&e[..e.len().min(4096)])
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// `wisp run IMAGE FLAGS -- ARGS`, bounded to 60 s.
pub fn run(image: &Path, flags: &[&str], args: &[&str]) -> Output {
    require_kvm();
    let mut cmd = wisp();
    cmd.arg("run").arg(image).args(flags).arg("--").args(args);
    output_within(cmd, Duration::from_secs(60))
}

/// QEMU microvm with the README's command line (ACPI off, which saves
/// QEMU's emulated firmware time) for `image`, with `extra` arguments
/// before `-kernel`.
pub fn qemu_command(image: &Path, extra: &[&str]) -> Command {
    wisp_qemu::command(image, wisp_qemu::Acpi::Off, extra)
}

/// Boots `image` under QEMU microvm with the README's command line plus
/// `append`, bounded to 60 s.
pub fn qemu(image: &Path, append: &str) -> Output {
    require_kvm();
    let mut cmd = qemu_command(image, &[]);
    cmd.args(["-append", append]);
    output_within(cmd, Duration::from_secs(60))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn status(o: &Output) -> i32 {
    o.status.code().expect("exited normally, not by a signal")
}

/// Asserts `o` is a clean monitor error: status 125, one line on stderr,
/// no Rust panic or backtrace, mentioning `needle`.
pub fn assert_clean_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(status(o), 125, "stderr: {err}");
    assert!(err.starts_with("wisp: error: "), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "no panic: {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    // The port is free once the probe socket closes, so the kernel may
    // hand it out again to a test running beside this one before the
    // server meant for it binds it: then one test's client reaches the
    // other's server (and is refused once that one ends). A port is
    // therefore handed out at most once per test binary.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A running guest, killed when dropped.
pub struct Guest {
    pub child: std::process::Child,
    pub port: u16,
}

impl Guest {
    /// Kills the monitor with SIGKILL, as a crash would.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds an example image once per test process.
pub fn example(name: &'static str) -> PathBuf {
    static IMAGES: std::sync::Mutex<Vec<(&'static str, PathBuf)>> =
        std::sync::Mutex::new(Vec::new());
    let mut images = IMAGES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = images.iter().find(|(n, _)| *n == name) {
        return p.clone();
    }
    let p = build_image(&format!("examples/{name}"), name);
    images.push((name, p.clone()));
    p
}

/// Starts `wisp run FLAGS -p PORT:GUEST_PORT IMAGE -- ARGS` and waits
/// until `ready(port)` holds.
pub fn start_guest(
    image: &Path,
    guest_port: u16,
    flags: &[&str],
    args: &[&str],
    ready: impl Fn(u16) -> bool,
) -> Guest {
    require_kvm();
    let port = free_port();
    let child = wisp()
        .arg("run")
        .args(flags)
        .args(["-p", &format!("{port}:{guest_port}")])
        .arg(image)
        .arg("--")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn wisp run");
    // Owned by the guard from here on, so every path reaps the process.
    let mut guest = Guest { child, port };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if ready(port) {
            return guest;
        }
        if let Some(st) = guest.child.try_wait().unwrap() {
            panic!("guest exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("guest on port {port} never became ready");
}

/// A guest console that a test can read (for guests run in the test's own
/// process through the monitor library).
#[derive(Clone, Default)]
pub struct Console(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
