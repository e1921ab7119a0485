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
    pub migration_policy: wisp_toolstack::migration::Policy,
}

/// Parses `--migration-ports LO-HI` (1 <= LO <= HI).
pub fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let bad = || format!("'{s}' is not a port range LO-HI (e.g. 8000-8999)");
    let (lo, hi) = s.split_once('-').ok_or_else(bad)?;
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok(lo..=hi)
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
        migration_policy: a.migration_policy,
    })?;
    Ok(0)
}

/// `wisp shell --memory BYTES`: only the daemon runs this.
pub fn shell(memory: u64, background: bool) -> u8 {
    let status = wisp_toolstack::shell_main(memory, background);
    status.clamp(0, 255) as u8
}

#[cfg(test)]
mod tests {
    use super::parse_port_range;

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("8000-8999"), Ok(8000..=8999));
        assert_eq!(parse_port_range("80-80"), Ok(80..=80));
        for bad in ["0-10", "10-9", "8000", "a-b", "1-70000", ""] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
    }
}
