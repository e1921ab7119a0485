//! The monitor process of one guest, as the daemon runs it (`wisp shell`).
//!
//! It starts before any request: it creates its KVM VM, vCPU and guest
//! memory (the expensive, image-independent part of a boot), says it is
//! ready, and waits. When the daemon hands it a guest (image, log, exit
//! record and control socket as open files), it loads and starts it, puts
//! its own thread under the Control seccomp filter, and from then on only
//! answers control requests and waits for the guest's end, which it writes
//! to the exit record before exiting with the guest's status. It never
//! opens a path after the hand-off: everything it reaches was handed over.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use wisp_monitor::control::monotonic_ns;
use wisp_monitor::devices::virtio::block::Block;
use wisp_monitor::net::user::{PortForward, UserNet};
use wisp_monitor::net::NetBackend;
use wisp_monitor::seccomp::{self, ThreadKind};
use wisp_monitor::{Controller, Image, Outcome, RunningVm, Shell, StartOptions, StopReason};

use std::cell::Cell;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use wisp_monitor::snapshot::{self, RestoreOptions, SaveOptions, Snapshot};
use wisp_monitor::worker::Worker;
use wisp_monitor::VmConfig;

use crate::proto::{
    self, ControlReply, ControlRequest, DiskMode, ExitRecord, GuestStats, Handoff, Hello,
    Published, SaveFigures, Started,
};

/// How long the hand-off reply waits for the guest to reach `main` (the
/// reply then carries `main_ns`; a slower guest is still running).
const MAIN_WAIT: Duration = Duration::from_secs(2);
/// Guest ranges a waiting shell faults in (see `run`): 32 KiB of boot
/// area from 4 KiB and the page after it, where the free memory below
/// 1 MiB starts; the last page below 1 MiB, where it ends; 48 KiB of
/// image from 1 MiB (the smallest Wisp images are about that size). The
/// guest's allocator writes a tag at both ends of each free region when it
/// claims it, so every guest touches these pages before `main`.
const PREFAULT: [(u64, u64); 3] = [(0x1000, 0x9000), (0xF_F000, 0x1000), (0x10_0000, 0xC000)];
/// Bytes of image buffer a waiting shell allocates and touches, so that
/// reading the image after the request takes no page faults (a larger
/// image grows the buffer then).
const IMAGE_BUFFER: usize = 128 << 10;
/// How long a control connection may take to send its request.
const REQUEST_WAIT_MS: i32 = 1000;

/// The files of a hand-off, in protocol order.
struct Files {
    image: OwnedFd,
    log: OwnedFd,
    exit: OwnedFd,
    control: OwnedFd,
    disk: Option<OwnedFd>,
}

impl Files {
    fn take(fds: Vec<OwnedFd>, disk: bool) -> Result<Files, String> {
        let want = 4 + disk as usize;
        if fds.len() != want {
            return Err(format!("hand-off carried {} files, not {want}", fds.len()));
        }
        let mut it = fds.into_iter();
        let mut next = || it.next().ok_or("missing file");
        Ok(Files {
            image: next()?,
            log: next()?,
            exit: next()?,
            control: next()?,
            disk: if disk { Some(next()?) } else { None },
        })
    }
}

/// Runs a shell on `channel` for a guest of `memory` bytes; returns the
/// process's exit status.
pub fn run(memory: u64, background: bool, channel: UnixStream) -> i32 {
    unblock_stop_signals();
    // Made for the pool: the VM is created at idle CPU priority, so that
    // starts (and anything else the host runs) go first; restored below
    // before the shell says it is ready (see `crate::priority`).
    if background {
        let _ = crate::priority::lower();
    }
    let mut shell = match Shell::create(memory) {
        Ok(s) => s,
        Err(e) => {
            let _ = proto::send(
                &channel,
                &Hello::Failed {
                    error: e.to_string(),
                },
                &[],
            );
            return wisp_abi::exit::MONITOR_ERROR as i32;
        }
    };
    // The pages every guest's load writes, faulted in now rather than
    // after the request: the boot area (page tables, GDT, IDT, TSS, boot
    // page, short arguments) and the first pages of the image, which
    // `guest/libos/wisp.ld` places at 1 MiB.
    for (start, len) in PREFAULT {
        let _ = shell.prefault(start, len);
    }
    // The last page of memory: the end of the free region above the image.
    let _ = shell.prefault(memory - 0x1000, 0x1000);
    // Without it, the load sets them (as a cold boot does).
    if shell.preset_sregs().is_ok() {
        shell.preload_mmu();
    }
    let image_buffer = touched_buffer(IMAGE_BUFFER);
    // Compiled while the shell waits in the pool, not on the start path.
    if let Err(e) = seccomp::precompile() {
        wisp_monitor::report(format_args!("wisp shell: {e}"));
        return wisp_abi::exit::MONITOR_ERROR as i32;
    }
    // A shell made for the pool was started at idle CPU priority (see
    // `crate::priority`): back to normal before any guest can run here,
    // and before the vCPU thread is started (it inherits the policy).
    if crate::priority::current() == libc::SCHED_IDLE {
        if let Err(e) = crate::priority::restore() {
            let error = format!("restoring the CPU priority: {e}");
            let _ = proto::send(&channel, &Hello::Failed { error }, &[]);
            return wisp_abi::exit::MONITOR_ERROR as i32;
        }
    }
    // The vCPU thread too, with its filter installed: starting both costs
    // ~0.2 ms on this host. Without it, the start makes its own.
    let worker = shell
        .vcpu_worker("wisp-vcpu")
        .map_err(|e| wisp_monitor::report(format_args!("wisp shell: vCPU thread: {e}")))
        .ok();
    let ready = Hello::Ready {
        pid: std::process::id(),
    };
    if proto::send(&channel, &ready, &[]).is_err() {
        return 0;
    }
    let (handoff, fds) = match proto::recv::<Handoff>(&channel) {
        Ok(h) => h,
        // The daemon is gone or drained its pool: nothing to run.
        Err(_) => return 0,
    };
    let files = match Files::take(fds, handoff.disk.is_some()) {
        Ok(f) => f,
        Err(error) => {
            let _ = proto::send(&channel, &Started::Failed { error }, &[]);
            return wisp_abi::exit::MONITOR_ERROR as i32;
        }
    };
    // From here on the monitor's own messages (and crash reports) go to the
    // guest's log, as the guest's console does.
    redirect_stdio(files.log.as_raw_fd());
    let started = match (handoff.migration, handoff.snapshot) {
        // The pre-created VM is not used: the stream fills a memory of its
        // own, restored as a snapshot's.
        (Some(size), _) => {
            drop(shell);
            crate::migration::receive_in_shell(&handoff, &files.image, files.disk.as_ref(), size)
                .and_then(|cfg| start_received(cfg, &handoff, &files))
        }
        // The pre-created VM takes the snapshot's memory and state.
        (None, Some(clone_id)) => restore(shell, &handoff, &files, clone_id, worker),
        (None, None) => start(shell, &handoff, &files, worker, image_buffer),
    };
    let running = match started {
        Ok(r) => r,
        Err(error) => {
            let _ = proto::send(&channel, &Started::Failed { error }, &[]);
            return wisp_abi::exit::MONITOR_ERROR as i32;
        }
    };
    let (running, published, started_ns) = running;
    // A restored or migrated guest is past `main`: it runs from the
    // moment it started.
    let (main_ns, main_exit_ns) = match (handoff.snapshot, handoff.migration) {
        (None, None) => (wait_for_main(&running), running.controller().main_exit_ns()),
        _ => (Some(started_ns), None),
    };
    let _ = proto::send(
        &channel,
        &Started::Ok {
            published,
            started_ns,
            main_ns,
            main_exit_ns,
        },
        &[],
    );
    drop(channel);
    // Give back what start-up touched and the wait does not need.
    crate::trim::after_start();
    // Everything the guest can reach is set up: from here this thread only
    // answers control requests and waits, under its own filter.
    if let Err(e) = seccomp::install(ThreadKind::Control) {
        wisp_monitor::report(format_args!("wisp: control thread: {e}"));
        running.controller().stop(StopReason::Requested);
    }
    let listener = UnixListener::from(files.control);
    let saved = Cell::new(false);
    serve(&running, &listener, &saved);
    finish(running, files.exit, saved.get())
}

/// Restores the guest from the snapshot handed over in the image's place;
/// returns it as [`start`] does. Published ports and the disk (handed
/// over, reopened through /proc) are configured.
fn restore(
    shell: Shell,
    h: &Handoff,
    files: &Files,
    clone_id: u32,
    worker: Option<Arc<Worker>>,
) -> Result<(RunningVm, Vec<Published>, u64), String> {
    // Opened through /proc: the snapshot module checks it from a path.
    let path = format!("/proc/self/fd/{}", files.image.as_raw_fd());
    let snap = Snapshot::open_checked(std::path::Path::new(&path), !h.snapshot_checked)
        .map_err(|e| e.to_string())?;
    let (publish, nics) = user_nics(&h.publish)?;
    let cfg = VmConfig {
        memory: snap.memory(),
        args: vec![],
        trace_boot: false,
        nics,
        publish,
        net_limits: (0, 0),
        disk_limits: (0, 0),
        disk: match (h.disk, &files.disk) {
            (Some(mode), Some(fd)) => Some(wisp_monitor::DiskConfig {
                path: format!("/proc/self/fd/{}", fd.as_raw_fd()).into(),
                read_only: mode == DiskMode::ReadOnly,
            }),
            _ => None,
        },
    };
    let vm = snap
        .restore_into(shell, &cfg, RestoreOptions { clone_id })
        .map_err(|e| e.to_string())?;
    let published = published_of(&vm);
    let running = launch(vm, h, files, worker)?;
    Ok((running, published, monotonic_ns()))
}

/// Starts a guest received from a migration (see
/// [`crate::migration::receive_in_shell`]) and confirms it to the source.
fn start_received(
    vm: wisp_monitor::Vm,
    h: &Handoff,
    files: &Files,
) -> Result<(RunningVm, Vec<Published>, u64), String> {
    let published = published_of(&vm);
    let running = launch(vm, h, files, None).inspect_err(|e| {
        crate::migration::refuse(&files.image, e);
    })?;
    let started_ns = monotonic_ns();
    crate::migration::confirm_in_shell(&running, &files.image)?;
    Ok((running, published, started_ns))
}

/// Loads and starts the guest; returns it, its published addresses and
/// when it started.
fn start(
    shell: Shell,
    h: &Handoff,
    files: &Files,
    worker: Option<Arc<Worker>>,
    buffer: Vec<u8>,
) -> Result<(RunningVm, Vec<Published>, u64), String> {
    // The daemon's sealed copy, shared with other shells: read by offset.
    let bytes = read_image(&files.image, buffer).map_err(|e| format!("reading the image: {e}"))?;
    let image = Image::parse(bytes).map_err(|e| format!("not a bootable Wisp image: {e}"))?;
    let publish = h
        .publish
        .iter()
        .map(|p| p.parse::<PortForward>())
        .collect::<Result<Vec<_>, _>>()?;
    let devices = !publish.is_empty() || h.disk.is_some();
    let mut loaded = shell
        .load(&image, &h.args, devices, None)
        .map_err(|e| e.to_string())?;
    let mut published = Vec::new();
    if !publish.is_empty() {
        let user = UserNet::new(&publish).map_err(|e| e.to_string())?;
        let tcp = publish.iter().filter(|p| !p.udp);
        for (addr, p) in user.local_addrs().into_iter().zip(tcp) {
            published.push(Published {
                host: addr.to_string(),
                guest_port: p.guest_port,
                udp: false,
            });
        }
        for p in publish.iter().filter(|p| p.udp) {
            published.push(Published {
                host: p.host.to_string(),
                guest_port: p.guest_port,
                udp: true,
            });
        }
        let nic = "user".parse().map_err(|e: String| e)?;
        let backend: Box<dyn NetBackend + Send> = Box::new(user);
        loaded
            .attach_net(backend, &nic, (0, 0))
            .map_err(|e| e.to_string())?;
    }
    if let (Some(mode), Some(disk)) = (h.disk, &files.disk) {
        let file = std::fs::File::from(disk.try_clone().map_err(|e| e.to_string())?);
        let block = Block::from_file(
            file,
            mode == DiskMode::ReadOnly,
            loaded.memory().clone(),
            loaded.access().clone(),
        )
        .map_err(|e| format!("disk: {e}"))?;
        loaded.attach_block(block).map_err(|e| e.to_string())?;
    }
    // The boot trace flag makes the guest report `main` (one exit): that
    // is how the daemon measures start latency.
    let vm = loaded.finish(true).map_err(|e| e.to_string())?;
    let running = launch(vm, h, files, worker)?;
    Ok((running, published, monotonic_ns()))
}

/// The whole image file, read with `pread` (the descriptor's offset may be
/// shared with other shells) into `bytes` (see [`touched_buffer`]).
fn read_image(fd: &OwnedFd, mut bytes: Vec<u8>) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::from(fd.try_clone()?);
    let len = f.metadata()?.len();
    if len > wisp_monitor::image::MAX_IMAGE_FILE {
        return Err(std::io::Error::other("the image is too large"));
    }
    bytes.clear();
    bytes.resize(len as usize, 0);
    f.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// An empty buffer of `capacity` bytes whose pages are already faulted in.
fn touched_buffer(capacity: usize) -> Vec<u8> {
    let mut b = vec![0u8; capacity];
    // `vec!` of zeros may come from untouched `calloc`/`mmap` pages: write
    // one byte per page so that they are really there.
    for i in (0..capacity).step_by(4096) {
        // SAFETY: `i` is inside the buffer; a volatile write keeps the
        // compiler from dropping the touch.
        unsafe { std::ptr::write_volatile(b.as_mut_ptr().add(i), 0) };
    }
    b.clear();
    b
}

fn redirect_stdio(log: RawFd) {
    // SAFETY: dup2 onto the standard descriptors; `log` is open.
    unsafe {
        libc::dup2(log, 1);
        libc::dup2(log, 2);
    }
}

/// Waits (at most [`MAIN_WAIT`]) until the guest reaches `main` or ends;
/// the vCPU thread wakes this thread when it does.
fn wait_for_main(running: &RunningVm) -> Option<u64> {
    running.controller().wait_for_main(MAIN_WAIT)
}

/// Answers control connections until the guest ends.
fn serve(running: &RunningVm, listener: &UnixListener, saved: &Cell<bool>) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: running.done_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds that outlive the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            return;
        }
        if fds[1].revents != 0 {
            if let Ok((conn, _)) = listener.accept() {
                answer(running, conn, saved);
            }
        }
    }
}

/// One request line (a save's file comes with it), one reply line.
fn answer(running: &RunningVm, conn: UnixStream, saved: &Cell<bool>) {
    let c = &running.controller();
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    let mut files: Vec<OwnedFd> = Vec::new();
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        if !crate::process::readable(conn.as_raw_fd(), REQUEST_WAIT_MS) {
            return;
        }
        let mut fds = [-1; 1];
        let mut iov = [libc::iovec {
            iov_base: chunk.as_mut_ptr().cast(),
            iov_len: chunk.len(),
        }];
        // recvmsg(2) (allowed by the Control filter): a save's file
        // arrives with the request's bytes.
        // SAFETY: the iovec points at `chunk`, which we own and may hold
        // any bytes; a received descriptor is wrapped in `OwnedFd` at once.
        let (n, nfds) = match unsafe { conn.recv_with_fds(&mut iov, &mut fds) } {
            Ok(r) => r,
            Err(_) => break,
        };
        // SAFETY: the first `nfds` entries are new descriptors the kernel
        // installed for us.
        files.extend(
            fds[..nfds]
                .iter()
                .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }),
        );
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let reply = match serde_json::from_slice::<ControlRequest>(buf.trim_ascii_end()) {
        Err(e) => ControlReply::Failed {
            error: format!("bad control request: {e}"),
        },
        Ok(req) => {
            let r = match req {
                ControlRequest::Pause => c.pause().map_err(|e| e.to_string()),
                ControlRequest::Resume => c.resume().map_err(|e| e.to_string()),
                ControlRequest::Stop => {
                    c.stop(StopReason::Requested);
                    Ok(())
                }
                ControlRequest::Shutdown => match c.request_shutdown() {
                    Ok(true) => Ok(()),
                    Ok(false) => Err("the guest cannot be asked to stop".into()),
                    Err(e) => Err(e.to_string()),
                },
                ControlRequest::Stats => Ok(()),
                ControlRequest::Migrate { meta, to } => {
                    match crate::migration::send_in_shell(running, files.pop(), meta, to) {
                        Ok(figures) => {
                            return send_reply(&conn, &ControlReply::Migrated(figures));
                        }
                        Err(e) => Err(e),
                    }
                }
                ControlRequest::Save { leave_running } => {
                    match save(running, files.pop(), leave_running) {
                        Ok(figures) => {
                            saved.set(saved.get() || !leave_running);
                            return send_reply(&conn, &ControlReply::Saved(figures));
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            match r {
                Ok(()) => ControlReply::Ok(stats(c)),
                Err(error) => ControlReply::Failed { error },
            }
        }
    };
    send_reply(&conn, &reply)
}

/// Saves the guest into `file` (handed over by the daemon, which renames
/// it into place).
fn save(
    running: &RunningVm,
    file: Option<OwnedFd>,
    leave_running: bool,
) -> Result<SaveFigures, String> {
    let file = std::fs::File::from(file.ok_or("a save request came without its file")?);
    let r = snapshot::save_to(running, &file, SaveOptions { leave_running })
        .map_err(|e| format!("save: {e}"))?;
    Ok(SaveFigures {
        pages_written: r.pages_written,
        bytes_written: r.bytes_written,
        memory: r.memory_size,
        total_us: r.total.as_micros() as u64,
        downtime_us: r.downtime.as_micros() as u64,
    })
}

fn send_reply(conn: &UnixStream, reply: &ControlReply) {
    if let Ok(mut line) = serde_json::to_vec(reply) {
        line.push(b'\n');
        // write(2), not std's send(2): the Control filter allows write.
        let mut rest = &line[..];
        while !rest.is_empty() {
            // SAFETY: writes from `rest`, which we own, to an open socket.
            let n = unsafe { libc::write(conn.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
            if n <= 0 {
                break;
            }
            rest = &rest[n as usize..];
        }
    }
}

fn stats(c: &Controller) -> GuestStats {
    let v = c.counters();
    GuestStats {
        state: match c.state() {
            wisp_monitor::VmState::Running => "running",
            wisp_monitor::VmState::Paused => "paused",
            wisp_monitor::VmState::Ended => "ended",
        }
        .into(),
        exits: v.exits,
        waits: v.waits,
        wakeups: v.wakeups,
        tx_frames: v.tx_frames,
        rx_frames: v.rx_frames,
        main_ns: c.main_reached_ns(),
        tx_bytes: v.tx_bytes,
        rx_bytes: v.rx_bytes,
        disk_read_bytes: v.disk_read_bytes,
        disk_write_bytes: v.disk_write_bytes,
    }
}

/// Records how the guest ended and exits with its status, leaving the VM's
/// teardown to the kernel.
fn finish(running: RunningVm, exit: OwnedFd, saved: bool) -> i32 {
    let asked = running.controller().shutdown_requested();
    let (record, machine) = match running.wait(None) {
        Ok(report) => {
            let (how, detail) = match &report.outcome {
                Outcome::Exited(s) if asked => (
                    "stopped",
                    Some(format!(
                        "the guest exited with status {s} when asked to stop"
                    )),
                ),
                Outcome::Exited(_) => ("exited", None),
                Outcome::Crashed(c) => ("crashed", Some(c.to_string())),
                Outcome::Stopped { .. } if crate::migration::migrated_to().is_some() => (
                    "migrated",
                    crate::migration::migrated_to().map(|to| format!("migrated to {to}")),
                ),
                Outcome::Stopped { rip } if saved => (
                    "saved",
                    Some(format!("saved to a snapshot at rip {rip:#x}")),
                ),
                Outcome::Stopped { rip } if asked => (
                    "killed",
                    Some(format!(
                        "the guest did not stop within the timeout after it was asked: \
                         stopped by force at rip {rip:#x}"
                    )),
                ),
                Outcome::TimedOut { rip } | Outcome::Stopped { rip } => {
                    ("stopped", Some(format!("stopped at rip {rip:#x}")))
                }
            };
            if let Some(d) = &detail {
                wisp_monitor::report(format_args!("wisp: {how}: {d}"));
            }
            let record = ExitRecord {
                status: report.outcome.status(),
                how: how.into(),
                detail,
            };
            (record, Some(report.machine))
        }
        Err(e) => {
            wisp_monitor::report(format_args!("wisp: error: {e}"));
            let record = ExitRecord {
                status: wisp_abi::exit::MONITOR_ERROR,
                how: "error".into(),
                detail: Some(e.to_string()),
            };
            (record, None)
        }
    };
    if let Ok(bytes) = serde_json::to_vec(&record) {
        let _ = std::fs::File::from(exit).write_all(&bytes);
    }
    // The process ends now: the kernel tears the VM down.
    std::mem::forget(machine);
    let _ = std::io::stdout().flush();
    // SAFETY: ends the process; the exit record and output are written.
    unsafe { libc::_exit(record.status as i32) }
}

/// The daemon blocks SIGINT and SIGTERM (a thread of its own waits for
/// them) and a spawned shell inherits that mask: without this, a monitor
/// could only be ended by SIGKILL (`kill PID`, a service manager's stop,
/// or a daemon that died before cleaning up would leave it running).
fn unblock_stop_signals() {
    // SAFETY: sigset manipulation on a local set; changes only this
    // thread's mask, before any other thread of the shell exists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// The published ports of a restored or arriving guest, and the one
/// user-mode NIC they need (none without ports).
pub(crate) fn user_nics(
    publish: &[String],
) -> Result<(Vec<PortForward>, Vec<wisp_monitor::net::NicConfig>), String> {
    let publish = publish
        .iter()
        .map(|p| p.parse::<PortForward>())
        .collect::<Result<Vec<_>, _>>()?;
    let nics = if publish.is_empty() {
        vec![]
    } else {
        vec!["user".parse()?]
    };
    Ok((publish, nics))
}

/// The ports `vm` publishes, as the daemon records them.
fn published_of(vm: &wisp_monitor::Vm) -> Vec<Published> {
    vm.published()
        .iter()
        .map(|(addr, guest_port, udp)| Published {
            host: addr.to_string(),
            guest_port: *guest_port,
            udp: *udp,
        })
        .collect()
}

/// Starts `vm` with its console in the VM's log, under the hand-off's CPU
/// quota and the monitor's filters (on `worker`'s thread when one waits).
fn launch(
    vm: wisp_monitor::Vm,
    h: &Handoff,
    files: &Files,
    worker: Option<Arc<Worker>>,
) -> Result<RunningVm, String> {
    let console = std::fs::File::from(files.log.try_clone().map_err(|e| e.to_string())?);
    vm.start_on(
        Box::new(console),
        StartOptions {
            cpu_quota: h.cpus,
            no_seccomp: false,
            seccomp_selftest: None,
        },
        worker,
    )
    .map_err(|e| e.to_string())
}
