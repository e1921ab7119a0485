//! `wisp run`: boot an image on the Wisp monitor in this process.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use wisp_monitor::timeout::Deadline;
use wisp_monitor::trace::BootTrace;
use wisp_monitor::{Image, Outcome, Shell, Vm, VmConfig};

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
    pub seccomp_selftest: bool,
    /// `-q`: no informational lines from wisp.
    // Nothing informational is printed yet; the line naming the published
    // ports (issue 8) is the first reader.
    #[allow(dead_code)]
    pub quiet: bool,
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
    // Creating the KVM VM and vCPU on a second thread while the image is
    // read was measured slower here (contention on 2 vCPUs): sequential.
    let shell = Shell::create()?;
    let mut vm = Vm::new(shell, &image, &cfg, trace)?;
    let deadline = match a.timeout {
        Some(t) => Deadline::arm(t).context("arming --timeout")?,
        None => Deadline::none(),
    };
    if let Some(f) = a.cpus {
        vm.limit_cpu(f).context("arming --cpus")?;
    }
    // Everything the guest can reach is set up: from here on the monitor
    // only serves it, under the seccomp filter.
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    if !a.no_seccomp {
        wisp_monitor::seccomp::install()?;
        if a.seccomp_selftest {
            // A monitor never opens sockets while serving a guest: the
            // filter must kill the process here (SIGSYS).
            // SAFETY: a plain syscall with constant arguments.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            anyhow::bail!("seccomp self-test: socket() was allowed (fd {fd})");
        }
    }
    let _ = &stderr;
    let mut out = stdout.lock();
    let outcome = vm.run(&mut out, &deadline)?;
    let _ = out.flush();
    drop(deadline);
    match &outcome {
        Outcome::Exited(_) => {}
        Outcome::Crashed(crash) => wisp_monitor::report(format_args!("wisp: {crash}")),
        Outcome::TimedOut { rip } => wisp_monitor::report(format_args!(
            "wisp: guest stopped: --timeout of {:?} expired (guest was at rip {rip:#x})",
            a.timeout.unwrap_or_default()
        )),
    }
    if let Some(t) = vm.trace() {
        wisp_monitor::report(format_args!(
            "{}  guest exits to the monitor: {}",
            t.report(),
            vm.exits()
        ));
    }
    // The process exits right after this: leave the VM to be torn down by
    // `teardown::exit_now`'s child rather than here, on the caller's time.
    std::mem::forget(vm);
    Ok(outcome.status())
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
