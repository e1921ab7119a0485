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
        /// monitor, blocking waits, wake-ups, frames).
        #[arg(long)]
        stats: bool,
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
            quiet,
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
                quiet,
                cpus,
                net_limits: (net_rate.unwrap_or(0), net_ops.unwrap_or(0)),
                disk_limits: (disk_rate.unwrap_or(0), disk_ops.unwrap_or(0)),
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
            wisp_monitor::report(format_args!("wisp: error: {}", one_line(&e)));
            ExitCode::from(wisp_abi::exit::MONITOR_ERROR)
        }
    }
}

/// What `wisp run` exits with, shown under `wisp run --help`.
const RUN_EXIT_STATUSES: &str = "\
Exit status:
  0-255  the guest's own status (what its main returned)
  101    the application panicked (message and location printed)
  124    --timeout expired
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
