//! `wisp`: build, inspect and run Wisp unikernels.
//!
//! Errors are reported as one line (`wisp: error: ...`) with exit status
//! 125; `wisp run` otherwise exits with the guest's status (see
//! `wisp_abi::exit` for the statuses with a fixed meaning).

mod build;
mod client;
mod daemon;
mod inspect;
mod new;
mod run;
mod teardown;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "wisp",
    version,
    about = "Build, inspect and run Wisp unikernels"
)]
struct Cli {
    /// The daemon's socket (toolstack commands) [default: $WISP_SOCKET, or
    /// /run/wisp/wisp.sock for root, $XDG_RUNTIME_DIR/wisp/wisp.sock].
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Build an application crate into a bootable image.
    Build {
        /// Directory of the application crate (holding Cargo.toml).
        app_dir: PathBuf,
        /// Where to write the image [default: ./<crate name>.wisp].
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Boot an image on the Wisp monitor; exits with the guest's status.
    #[command(after_help = RUN_EXIT_STATUSES)]
    Run {
        /// The image to boot: a file written by `wisp build`.
        image: PathBuf,
        /// Guest memory, e.g. 2M, 64M, 1G (a plain number means MiB).
        #[arg(short, long, default_value = "64M", value_parser = units::parse_memory)]
        memory: u64,
        /// Stop the guest after this long, e.g. 500ms, 10s, 2m (exit status 124).
        #[arg(short, long, value_parser = units::parse_timeout)]
        timeout: Option<std::time::Duration>,
        /// Print a timestamped breakdown of the boot to stderr.
        #[arg(long)]
        trace_boot: bool,
        /// Publish a guest port on the host: [ADDR:]HOST:GUEST for TCP,
        /// [ADDR:]HOST:GUEST/udp for UDP (ADDR defaults to 127.0.0.1).
        /// Gives the guest a NIC on the user-mode network. Repeatable.
        #[arg(short = 'p', long = "publish", value_name = "[ADDR:]HOST:GUEST[/udp]")]
        publish: Vec<wisp_monitor::net::user::PortForward>,
        /// Give the guest a NIC: `user` (the built-in user-mode network,
        /// also implied by -p) or `tap:NAME` (an existing tap interface),
        /// with optional `,ip=A.B.C.D/N` or `,ip=dhcp` (ask a DHCP server on
        /// the link), `,gw=A.B.C.D` and `,dns=A.B.C.D` (default
        /// 10.0.2.15/24 via 10.0.2.2, no DNS server). Repeatable: one NIC
        /// each; the guest's network stack uses the first.
        #[arg(
            long = "net",
            value_name = "user|tap:NAME[,ip=A.B.C.D/N|ip=dhcp][,gw=..][,dns=..]"
        )]
        net: Vec<wisp_monitor::net::NicConfig>,
        /// Hold the guest to this share of one CPU, e.g. 0.25 (a spinning
        /// guest included).
        #[arg(long, value_name = "FRACTION", value_parser = units::parse_cpus)]
        cpus: Option<f64>,
        /// Limit each NIC to BYTES per second in each direction (e.g. 10M).
        #[arg(long, value_name = "BYTES", value_parser = units::parse_memory)]
        net_rate: Option<u64>,
        /// Limit each NIC to N frames per second in each direction.
        #[arg(long, value_name = "N")]
        net_ops: Option<u64>,
        /// Limit the disk to BYTES per second (e.g. 50M).
        #[arg(long, value_name = "BYTES", value_parser = units::parse_memory)]
        disk_rate: Option<u64>,
        /// Limit the disk to N requests per second.
        #[arg(long, value_name = "N")]
        disk_ops: Option<u64>,
        /// Print the monitor's counters when the guest ends (exits to the
        /// monitor, blocking waits, wake-ups, frames, network and disk bytes).
        #[arg(long)]
        stats: bool,
        /// On SIGINT/SIGTERM the guest is asked to stop; after this long
        /// (or at a second signal) it is stopped by force. 0: at once.
        #[arg(long, default_value = "10s", value_parser = units::parse_duration,
              value_name = "DUR")]
        stop_timeout: std::time::Duration,
        /// Run without the seccomp filter (for debugging the monitor).
        #[arg(long)]
        no_seccomp: bool,
        /// Quiet: no informational lines from wisp (the guest's output,
        /// errors and crash reports still appear).
        #[arg(short, long)]
        quiet: bool,
        /// Test hook: after installing the seccomp filters, make a forbidden
        /// system call on this thread: control (default), vcpu or io (the
        /// process must be killed).
        #[arg(long, hide = true, num_args = 0..=1, require_equals = true,
              default_missing_value = "control", value_name = "THREAD")]
        seccomp_selftest: Option<wisp_monitor::seccomp::ThreadKind>,
        /// Give the guest a block device backed by FILE (",ro": read-only).
        #[arg(long, value_name = "FILE[,ro]")]
        disk: Option<wisp_monitor::DiskConfig>,
        /// Run in the background under the daemon (`wisp daemon`); prints
        /// the VM's id.
        #[arg(short, long)]
        detach: bool,
        /// With -d: a name for the VM.
        #[arg(long, requires = "detach")]
        name: Option<String>,
        /// With -d: `no` (default) or `on-failure` (start it again when it
        /// ends with a non-zero status, unless stopped).
        #[arg(long, requires = "detach", value_name = "POLICY")]
        restart: Option<String>,
        /// Arguments for the application (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the toolstack daemon (HTTP/JSON API on a Unix socket).
    Daemon {
        /// Directory for VM records, control sockets and logs
        /// [default: $WISP_STATE_DIR, or the socket's default directory].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Pre-started shells to keep per guest memory size, SIZE:COUNT
        /// (repeatable) [default: 64M:4].
        #[arg(long, value_name = "SIZE:COUNT")]
        pool: Vec<String>,
        /// Bound of each VM's log (it keeps at most twice this).
        #[arg(long, default_value = "1M", value_parser = units::parse_memory)]
        log_size: u64,
        /// Accept live migrations from other daemons on this TCP address
        /// (e.g. 127.0.0.1:7070).
        #[arg(long, value_name = "ADDR:PORT")]
        migration_listen: Option<std::net::SocketAddr>,
        /// Disks of arriving guests must be files under DIR (the source
        /// names the path); without it, a guest with a disk is refused.
        #[arg(long, value_name = "DIR")]
        migration_disks: Option<PathBuf>,
        /// Most memory an arriving guest may have (a bigger one is
        /// refused; at most 4 arrive at once).
        #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = units::parse_memory)]
        migration_max_memory: u64,
        /// Host ports an arriving guest may publish, LO-HI (e.g.
        /// 8000-8999); without it, a guest that publishes ports is refused.
        #[arg(long, value_name = "LO-HI", value_parser = daemon::parse_port_range)]
        migration_ports: Option<std::ops::RangeInclusive<u16>>,
    },
    /// List VMs started with `run -d` (NAME ID STATE IMAGE MEMORY UPTIME PORTS).
    Ps {
        /// Include VMs that have ended (with their exit status).
        #[arg(short, long)]
        all: bool,
        /// `table` (default) or `json` (every field, start_us included).
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
    /// Print a VM's console log.
    Logs {
        name: String,
        /// Keep printing what the guest writes until it ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Pause VMs (their vCPU stops; host connections wait).
    Pause {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Resume paused VMs.
    Resume {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Ask VMs to stop (they may flush and exit with their own status);
    /// stop by force those still running after the timeout.
    Stop {
        /// Seconds a guest has to stop by itself (0: force it at once).
        #[arg(short, long, default_value = "10")]
        time: f64,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Kill VMs' monitor processes (SIGKILL).
    Kill {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove ended VMs (-f: kill running ones first).
    Rm {
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Save a VM to a snapshot file (it then stops, unless --leave-running).
    Save {
        name: String,
        file: PathBuf,
        /// Resume the guest after the save instead of stopping it.
        #[arg(long)]
        leave_running: bool,
    },
    /// Move a running VM live to the daemon listening at HOST:PORT
    /// (`wisp daemon --migration-listen`); it keeps running during the copy.
    Migrate {
        name: String,
        #[arg(value_name = "HOST:PORT")]
        to: String,
        /// Its name on the destination [default: the same].
        #[arg(long)]
        name_there: Option<String>,
        /// Ports it publishes on the destination, as `run -p` [default: the
        /// same as here; on one host they move over at the pause].
        #[arg(short = 'p', long = "publish", value_name = "[ADDR:]HOST:GUEST[/udp]")]
        publish: Vec<String>,
    },
    /// Start a VM from a snapshot under the daemon; prints its id.
    Restore {
        file: PathBuf,
        #[arg(long)]
        name: Option<String>,
        /// The disk of a guest saved with one (the same size), as `run --disk`.
        #[arg(long, value_name = "FILE[,ro]")]
        disk: Option<String>,
        /// Publish a port, as `run -p`.
        #[arg(short = 'p', long = "publish", value_name = "[ADDR:]HOST:GUEST[/udp]")]
        publish: Vec<String>,
    },
    /// Start N clones of a snapshot (clone ids 1..N); prints each id and time.
    Clone {
        file: PathBuf,
        #[arg(long, default_value = "1")]
        count: u32,
        /// Publish a port on each clone, as `run -p` (host port 0: each
        /// gets a free one).
        #[arg(short = 'p', long = "publish", value_name = "[ADDR:]HOST:GUEST[/udp]")]
        publish: Vec<String>,
    },
    /// Per-VM and host figures from the daemon.
    Stats {
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
    /// Internal: a monitor process the daemon starts ahead of need.
    #[command(hide = true)]
    Shell {
        #[arg(long)]
        memory: u64,
        /// Made for the pool: create the VM at idle CPU priority.
        #[arg(long)]
        background: bool,
    },
    /// Print an image's size, entry points, segments, libraries and devices.
    Inspect { image: PathBuf },
    /// Create a new application crate that builds out of the box.
    New {
        /// Name of the crate (and of the directory created).
        name: String,
        /// Create it in this directory instead of ./NAME.
        #[arg(long)]
        path: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let started = Instant::now();
    // One malloc arena for the whole process: a monitor runs a guest on two
    // or three threads that rarely allocate, and a fresh thread arena costs
    // a 64 MiB reservation and its faults on the start path of each guest.
    // SAFETY: a malloc tuning call with constant arguments, made before any
    // other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let cli = Cli::parse();
    let is_run = matches!(cli.command, Command::Run { detach: false, .. });
    let socket = client::socket(cli.socket);
    let result = match cli.command {
        Command::Build { app_dir, output } => build::build(&app_dir, output.as_deref()).map(|_| 0),
        Command::Run {
            image,
            memory,
            timeout,
            trace_boot,
            publish,
            net,
            disk,
            no_seccomp,
            stats,
            seccomp_selftest,
            cpus,
            net_rate,
            net_ops,
            disk_rate,
            disk_ops,
            quiet: _,
            args,
            detach: true,
            name,
            restart,
            stop_timeout: _,
        } => detached(
            &socket,
            DetachedFlags {
                timeout: timeout.is_some(),
                trace_boot,
                net: !net.is_empty(),
                stats,
                no_seccomp,
                limits: net_rate.or(net_ops).or(disk_rate).or(disk_ops).is_some(),
                selftest: seccomp_selftest.is_some(),
            },
            client::DetachedRun {
                image: &image,
                name,
                memory,
                args,
                publish: publish
                    .iter()
                    .map(|p| {
                        let proto = if p.udp { "/udp" } else { "" };
                        format!("{}:{}{proto}", p.host, p.guest_port)
                    })
                    .collect(),
                disk: disk.as_ref(),
                cpus,
                restart,
            },
        ),
        Command::Run {
            image,
            memory,
            timeout,
            trace_boot,
            publish,
            net,
            disk,
            no_seccomp,
            stats,
            seccomp_selftest,
            cpus,
            net_rate,
            net_ops,
            disk_rate,
            disk_ops,
            quiet,
            args,
            stop_timeout,
            ..
        } => run::run(
            &run::RunArgs {
                image,
                memory,
                timeout,
                trace_boot,
                args,
                publish,
                net,
                disk,
                no_seccomp,
                seccomp_selftest,
                quiet,
                cpus,
                net_limits: (net_rate.unwrap_or(0), net_ops.unwrap_or(0)),
                disk_limits: (disk_rate.unwrap_or(0), disk_ops.unwrap_or(0)),
                stats,
                stop_timeout,
            },
            started,
        ),
        Command::Daemon {
            state_dir,
            pool,
            log_size,
            migration_listen,
            migration_disks,
            migration_max_memory,
            migration_ports,
        } => daemon::daemon(daemon::DaemonArgs {
            socket,
            state_dir,
            pool,
            log_size,
            migration_listen,
            migration_policy: wisp_toolstack::migration::Policy {
                disks: migration_disks,
                max_memory: migration_max_memory,
                ports: migration_ports,
                listen_ip: migration_listen.map(|a| a.ip()),
            },
        }),
        Command::Ps { all, format } => client::ps(&socket, all, format == "json"),
        Command::Logs { name, follow } => client::logs(&socket, &name, follow),
        Command::Pause { names } => client::action(&socket, "pause", &names, ""),
        Command::Resume { names } => client::action(&socket, "resume", &names, ""),
        Command::Stop { time, names } => {
            client::action(&socket, "stop", &names, &format!("?timeout={time}"))
        }
        Command::Kill { names } => client::action(&socket, "kill", &names, ""),
        Command::Rm { force, names } => client::rm(&socket, &names, force),
        Command::Save {
            name,
            file,
            leave_running,
        } => client::save(&socket, &name, &file, leave_running),
        Command::Migrate {
            name,
            to,
            name_there,
            publish,
        } => client::migrate(&socket, &name, &to, name_there, &publish),
        Command::Restore {
            file,
            name,
            publish,
            disk: None,
        } => client::restore(&socket, &file, name, &publish),
        Command::Restore {
            file,
            name,
            publish,
            disk: Some(disk),
        } => client::restore_with_disk(&socket, &file, name, &publish, &disk),
        Command::Clone {
            file,
            count,
            publish,
        } => client::clone(&socket, &file, count, &publish),
        Command::Stats { format } => client::stats(&socket, format == "json"),
        Command::Shell { memory, background } => {
            return ExitCode::from(daemon::shell(memory, background))
        }
        Command::Inspect { image } => inspect::inspect(&image).map(|_| 0),
        Command::New { name, path } => new::new(&name, path.as_deref()).map(|_| 0),
    };
    match result {
        Ok(status) if is_run => {
            // The guest is done and its output written: do not make the
            // caller wait for the VM's teardown.
            use std::io::Write;
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().flush();
            teardown::exit_now(status)
        }
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            wisp_monitor::report(format_args!("wisp: error: {}", one_line(&e)));
            ExitCode::from(wisp_abi::exit::MONITOR_ERROR)
        }
    }
}

/// `wisp run` flags that only a foreground run has.
struct DetachedFlags {
    timeout: bool,
    trace_boot: bool,
    net: bool,
    stats: bool,
    no_seccomp: bool,
    limits: bool,
    selftest: bool,
}

/// `wisp run -d`: refuses the flags a detached run does not support.
fn detached(
    socket: &std::path::Path,
    f: DetachedFlags,
    r: client::DetachedRun<'_>,
) -> anyhow::Result<u8> {
    let unsupported = [
        (f.timeout, "--timeout"),
        (f.trace_boot, "--trace-boot"),
        (f.net, "--net"),
        (f.stats, "--stats"),
        (f.no_seccomp, "--no-seccomp"),
        (f.limits, "--net-rate/--net-ops/--disk-rate/--disk-ops"),
        (f.selftest, "--seccomp-selftest"),
    ];
    if let Some((_, flag)) = unsupported.iter().find(|(set, _)| *set) {
        anyhow::bail!("{flag} is not supported with -d (run in the foreground for it)");
    }
    client::run_detached(socket, r)
}

/// What `wisp run` exits with, shown under `wisp run --help`.
const RUN_EXIT_STATUSES: &str = "\
Exit status:
  0-255  the guest's own status (what its main returned)
  101    the application panicked (message and location printed)
  124    --timeout expired
  143    stopped by force after SIGINT/SIGTERM (a guest that stops when asked
         exits with its own status)
  125    wisp could not run the image (bad image or flags, no KVM...: one line on stderr)
  139    the guest crashed: a CPU exception (a report goes to stderr), a triple
         fault, or a broken hypercall
  2      the command line could not be parsed";

/// An error and its causes on one line, leaving out a cause whose text is
/// already there: many errors print their source in their own message, and
/// the user should read an OS error once, not once per layer.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "cannot read x: {}", self.0)
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let e = anyhow::Error::new(Wrapper(io)).context("x is not an image");
        let line = one_line(&e);
        assert_eq!(line.matches("No such file").count(), 1, "{line}");
        assert!(
            line.starts_with("x is not an image: cannot read x: "),
            "{line}"
        );
    }

    #[test]
    fn distinct_causes_are_all_kept() {
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(one_line(&e), "outer: inner");
    }
}
