//! `wisp run`: boot an image on the Wisp monitor in this process.

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use wisp_monitor::seccomp::{self, ThreadKind};
use wisp_monitor::trace::BootTrace;
use wisp_monitor::{Image, Outcome, Shell, StartOptions, StopReason, VmConfig};

pub struct RunArgs {
    pub image: PathBuf,
    pub memory: u64,
    pub timeout: Option<Duration>,
    pub trace_boot: bool,
    pub args: Vec<String>,
    pub publish: Vec<wisp_monitor::net::user::PortForward>,
    pub net: Vec<wisp_monitor::net::NicConfig>,
    pub disk: Option<wisp_monitor::DiskConfig>,
    pub no_seccomp: bool,
    pub cpus: Option<f64>,
    pub net_limits: (u64, u64),
    pub disk_limits: (u64, u64),
    pub seccomp_selftest: Option<ThreadKind>,
    pub quiet: bool,
    pub stats: bool,
    /// How long a guest asked to stop (SIGINT, SIGTERM) may take before it
    /// is stopped by force.
    pub stop_timeout: Duration,
}

/// What ended a wait for the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Woken {
    /// The guest ended.
    Ended,
    /// SIGINT or SIGTERM arrived (and was read).
    Signal,
    /// The deadline passed.
    Deadline,
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it creates)
/// and returns a signalfd that reads them.
fn stop_signals() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: sigset manipulation on a local set; the mask change affects
    // this thread only; signalfd returns a new descriptor we then own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(std::os::fd::OwnedFd::from_raw_fd(fd))
    }
}

/// Waits until the guest ends, `deadline` passes, or a stop signal comes.
fn wait_for_end(
    running: &wisp_monitor::RunningVm,
    signals: RawFd,
    deadline: Option<Instant>,
) -> Woken {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: running.done_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = deadline.map_or(-1, |d| {
            d.saturating_duration_since(Instant::now())
                .as_millis()
                .min(i32::MAX as u128) as i32
        });
        // SAFETY: two valid pollfd structs that outlive the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n > 0 && fds[0].revents != 0 {
            return Woken::Ended;
        }
        if n > 0 && fds[1].revents != 0 {
            // Consumed, so that the next wait sees only a new signal.
            let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
            // SAFETY: reads at most `info.len()` bytes into `info`, which we
            // own, from the signalfd.
            unsafe { libc::read(signals, info.as_mut_ptr().cast(), info.len()) };
            return Woken::Signal;
        }
        return Woken::Deadline;
    }
}

/// How a stop by signal went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SignalStop {
    /// No signal came.
    None,
    /// The guest was asked to stop (and ended, by itself or by `--timeout`).
    Asked,
    /// Forced: a second signal, the stop timeout, or a guest that cannot be
    /// asked.
    Forced(&'static str),
}

/// Waits for the guest's end, `--timeout` (`deadline`) or a stop signal.
/// The first SIGINT/SIGTERM asks the guest to stop and gives it
/// `stop_timeout`; a second signal, or the end of that time, stops it by
/// force (as `docker stop`, and as a second Ctrl-C does elsewhere).
fn supervise(
    running: &wisp_monitor::RunningVm,
    signals: RawFd,
    deadline: Option<Instant>,
    stop_timeout: Duration,
    quiet: bool,
) -> SignalStop {
    let c = running.controller();
    let mut asked: Option<Instant> = None;
    loop {
        let until = match (deadline, asked) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match wait_for_end(running, signals, until) {
            Woken::Ended => break,
            Woken::Signal if asked.is_none() && !stop_timeout.is_zero() => {
                match c.request_shutdown() {
                    Ok(true) => {
                        if !quiet {
                            wisp_monitor::report(format_args!(
                                "wisp: asked the guest to stop; waiting up to {:?} \
                                 (signal again to stop it now)",
                                stop_timeout
                            ));
                        }
                        asked = Some(Instant::now() + stop_timeout);
                    }
                    Ok(false) => {
                        c.stop(StopReason::Requested);
                        return SignalStop::Forced("the guest cannot be asked to stop");
                    }
                    // Ended meanwhile.
                    Err(_) => break,
                }
            }
            Woken::Signal => {
                c.stop(StopReason::Requested);
                return SignalStop::Forced(if asked.is_some() {
                    "second signal"
                } else {
                    "stop timeout 0"
                });
            }
            Woken::Deadline => {
                // Whichever came first (poll's millisecond rounding may wake
                // this a little early: decide by the deadlines, not now).
                let timed_out = match (deadline, asked) {
                    (Some(d), Some(a)) => d <= a,
                    (d, _) => d.is_some(),
                };
                if timed_out {
                    // `--timeout`: `RunningVm::wait` stops it as timed out.
                    break;
                }
                c.stop(StopReason::Requested);
                return SignalStop::Forced("stop timeout expired");
            }
        }
    }
    if asked.is_some() {
        SignalStop::Asked
    } else {
        SignalStop::None
    }
}

/// Runs the guest; returns the status `wisp run` exits with.
pub fn run(a: &RunArgs, started: Instant) -> anyhow::Result<u8> {
    let mut trace = a.trace_boot.then(|| BootTrace::new(started));
    let image = Image::from_file(&a.image)
        .with_context(|| format!("{} is not a bootable Wisp image", a.image.display()))?;
    if let Some(t) = trace.as_mut() {
        t.mark("image read and validated");
    }
    let cfg = VmConfig {
        memory: a.memory,
        args: a.args.clone(),
        trace_boot: a.trace_boot,
        nics: nics(&a.net, &a.publish),
        publish: a.publish.clone(),
        net_limits: a.net_limits,
        disk_limits: a.disk_limits,
        disk: a.disk.clone(),
    };
    // Cheap checks before KVM is touched. Creating the KVM VM and vCPU on a
    // second thread while the image is read was measured slower here
    // (contention on 2 vCPUs): sequential.
    wisp_monitor::vm::check(&image, &cfg)?;
    let vm = Shell::create(cfg.memory)?.build(&image, &cfg, trace)?;
    if !a.quiet {
        for (addr, port, udp) in vm.published() {
            let proto = if *udp { "/udp" } else { "" };
            wisp_monitor::report(format_args!(
                "wisp: {addr}{proto} -> guest port {port}{proto}"
            ));
        }
    }
    // SIGINT and SIGTERM ask the guest to stop (then force it: see
    // `supervise`) rather than kill the monitor: blocked here, before the guest's threads exist, so that they
    // inherit the mask and the signals wait for this thread's signalfd.
    let signals = stop_signals().context("setting up SIGINT/SIGTERM")?;
    let running = vm.start(
        // Never blocks the vCPU thread on a reader that does not read.
        Box::new(wisp_monitor::console::ConsoleOut::stdout()),
        StartOptions {
            cpu_quota: a.cpus,
            no_seccomp: a.no_seccomp,
            seccomp_selftest: a.seccomp_selftest,
        },
    )?;
    // Everything the guest can reach is set up: from here on this thread
    // only waits for the guest, under its own filter.
    if !a.no_seccomp {
        seccomp::install(ThreadKind::Control)?;
        if a.seccomp_selftest == Some(ThreadKind::Control) {
            seccomp::forbidden_call();
        }
    }
    let deadline = a.timeout.map(|t| Instant::now() + t);
    let how = supervise(
        &running,
        signals.as_raw_fd(),
        deadline,
        a.stop_timeout,
        a.quiet,
    );
    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
    let report = running.wait(left)?;
    match &report.outcome {
        Outcome::Exited(status) if how == SignalStop::Asked && !a.quiet => wisp_monitor::report(
            format_args!("wisp: guest stopped when asked (exit status {status})"),
        ),
        Outcome::Exited(_) => {}
        Outcome::Crashed(crash) => wisp_monitor::report(format_args!("wisp: {crash}")),
        Outcome::TimedOut { rip } => wisp_monitor::report(format_args!(
            "wisp: guest stopped: --timeout of {:?} expired (guest was at rip {rip:#x})",
            a.timeout.unwrap_or_default()
        )),
        Outcome::Stopped { rip } => match how {
            SignalStop::Forced(why) => wisp_monitor::report(format_args!(
                "wisp: guest stopped by force: {why} (guest was at rip {rip:#x})"
            )),
            _ => wisp_monitor::report(format_args!("wisp: guest stopped (at rip {rip:#x})")),
        },
    }
    if a.stats {
        let c = &report.counters;
        wisp_monitor::report(format_args!(
            "wisp: stats: exits {} kicks {} waits {} blocked-waits {} wakeups {} \
             io-sleeps {} tx-frames {} rx-frames {} interruptions {} \
             tx-bytes {} rx-bytes {} disk-read-bytes {} disk-write-bytes {}",
            c.exits,
            c.kicks,
            c.waits,
            c.blocked_waits,
            c.wakeups,
            c.io_sleeps,
            c.tx_frames,
            c.rx_frames,
            c.interruptions,
            c.tx_bytes,
            c.rx_bytes,
            c.disk_read_bytes,
            c.disk_write_bytes
        ));
    }
    if let Some(t) = &report.trace {
        wisp_monitor::report(format_args!(
            "{}  guest exits to the monitor: {}",
            t.report(),
            report.counters.exits
        ));
    }
    let status = report.outcome.status();
    // The process exits right after this: leave the VM to be torn down by
    // `teardown::exit_now`'s child rather than here, on the caller's time.
    std::mem::forget(report.machine);
    Ok(status)
}

/// The NICs: those given with `--net`, plus a user-mode NIC if ports are
/// published and none of the `--net` NICs is one.
fn nics(
    given: &[wisp_monitor::net::NicConfig],
    publish: &[wisp_monitor::net::user::PortForward],
) -> Vec<wisp_monitor::net::NicConfig> {
    use wisp_monitor::net::BackendKind;
    let mut nics = given.to_vec();
    if !publish.is_empty() && !nics.iter().any(|n| n.backend == BackendKind::User) {
        nics.push("user".parse().expect("'user' is a valid network"));
    }
    nics
}
