//! `wisp daemon` and the hidden `wisp shell` (one monitor process that the
//! daemon starts ahead of need).

use std::path::PathBuf;

use anyhow::Context;

pub struct DaemonArgs {
    pub socket: PathBuf,
    pub state_dir: Option<PathBuf>,
    /// `SIZE:COUNT` entries, e.g. `64M:4`.
    pub pool: Vec<String>,
    pub log_size: u64,
    pub migration_listen: Option<std::net::SocketAddr>,
    pub migration_disks: Option<PathBuf>,
}

/// Parses `--pool SIZE:COUNT`.
pub fn parse_pool(s: &str) -> Result<(u64, usize), String> {
    let (size, count) = s
        .split_once(':')
        .ok_or_else(|| format!("'{s}' is not SIZE:COUNT (e.g. 64M:4)"))?;
    let size = crate::units::parse_memory(size)?;
    let count = count
        .parse::<usize>()
        .ok()
        .filter(|&c| c <= 10_000)
        .ok_or_else(|| format!("'{count}' is not a shell count (0-10000)"))?;
    Ok((size, count))
}

pub fn daemon(a: DaemonArgs) -> anyhow::Result<u8> {
    let pool = if a.pool.is_empty() {
        vec![(64 << 20, 4)]
    } else {
        a.pool
            .iter()
            .map(|p| parse_pool(p).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let state_dir = a
        .state_dir
        .or_else(|| std::env::var_os("WISP_STATE_DIR").map(PathBuf::from))
        .unwrap_or_else(wisp_toolstack::daemon::default_dir);
    let exe = std::env::current_exe().context("finding the wisp executable")?;
    wisp_toolstack::daemon::run(wisp_toolstack::daemon::Config {
        socket: a.socket,
        state_dir: std::path::absolute(state_dir)?,
        pool,
        log_limit: a.log_size,
        exe,
        migration_listen: a.migration_listen,
        migration_disks: a.migration_disks,
    })?;
    Ok(0)
}

/// `wisp shell --memory BYTES`: only the daemon runs this.
pub fn shell(memory: u64) -> u8 {
    let status = wisp_toolstack::shell_main(memory);
    status.clamp(0, 255) as u8
}
