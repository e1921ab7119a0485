//! `wisp`: build, inspect and run Wisp unikernels.
//!
//! Errors are reported as one line (`wisp: error: ...`) with exit status
//! 125; `wisp run` otherwise exits with the guest's status (see
//! `wisp_abi::exit` for the statuses with a fixed meaning).

mod build;
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
    #[command(subcommand)]
    command: Command,
}

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
    Run {
        image: PathBuf,
        /// Guest memory, e.g. 2M, 64M, 1G (a plain number means MiB).
        #[arg(short, long, default_value = "64M", value_parser = units::parse_memory)]
        memory: u64,
        /// Stop the guest after this long, e.g. 500ms, 10s, 2m (exit status 124).
        #[arg(short, long, value_parser = units::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Print a timestamped breakdown of the boot to stderr.
        #[arg(long)]
        trace_boot: bool,
        /// Publish a guest TCP port on the host: [ADDR:]HOST:GUEST (ADDR
        /// defaults to 127.0.0.1). Gives the guest a NIC on the user-mode
        /// network. Repeatable.
        #[arg(short = 'p', long = "publish", value_name = "[ADDR:]HOST:GUEST")]
        publish: Vec<wisp_monitor::net::user::PortForward>,
        /// Give the guest a NIC: `user` (the built-in user-mode network,
        /// also implied by -p) or `tap:NAME` (an existing tap interface),
        /// with optional `,ip=A.B.C.D/N,gw=A.B.C.D` (tap; default
        /// 10.0.2.15/24 via 10.0.2.2). Repeatable: one NIC each.
        #[arg(long = "net", value_name = "user|tap:NAME[,ip=..,gw=..]")]
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
        /// monitor, blocking waits, wake-ups, frames).
        #[arg(long)]
        stats: bool,
        /// Run without the seccomp filter (for debugging the monitor).
        #[arg(long)]
        no_seccomp: bool,
        /// Test hook: after installing the seccomp filters, make a forbidden
        /// system call on this thread: control (default), vcpu or io (the
        /// process must be killed).
        #[arg(long, hide = true, num_args = 0..=1, require_equals = true,
              default_missing_value = "control", value_name = "THREAD")]
        seccomp_selftest: Option<wisp_monitor::seccomp::ThreadKind>,
        /// Give the guest a block device backed by FILE (",ro": read-only).
        #[arg(long, value_name = "FILE[,ro]")]
        disk: Option<wisp_monitor::DiskConfig>,
        /// Arguments for the application (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
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
    let cli = Cli::parse();
    let is_run = matches!(cli.command, Command::Run { .. });
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
            args,
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
                cpus,
                net_limits: (net_rate.unwrap_or(0), net_ops.unwrap_or(0)),
                disk_limits: (disk_rate.unwrap_or(0), disk_ops.unwrap_or(0)),
                quiet: false,
                stats,
            },
            started,
        ),
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
            eprintln!("wisp: error: {e:#}");
            ExitCode::from(wisp_abi::exit::MONITOR_ERROR)
        }
    }
}
