//! The toolstack commands of the CLI: `run -d`, `ps`, `logs`, `pause`,
//! `resume`, `stop`, `kill`, `rm`, `stats`, each one request to the
//! daemon's API.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use wisp_toolstack::client::{Client, Reply};

/// The daemon's socket: `--socket`, else `WISP_SOCKET`, else the default.
pub fn socket(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("WISP_SOCKET").map(PathBuf::from))
        .unwrap_or_else(wisp_toolstack::daemon::default_socket)
}

fn client(socket: &Path) -> Client {
    Client::new(socket)
}

/// The reply's JSON if its status is a success, or an error with the
/// daemon's message.
fn ok(reply: Reply) -> anyhow::Result<Value> {
    if (200..300).contains(&reply.status) {
        return Ok(reply.json().unwrap_or(Value::Null));
    }
    bail!("{}", reply.error_text())
}

fn absolute(p: &Path) -> anyhow::Result<String> {
    let abs = std::path::absolute(p).with_context(|| format!("{}", p.display()))?;
    Ok(abs.to_string_lossy().into_owned())
}

pub struct DetachedRun<'a> {
    pub image: &'a Path,
    pub name: Option<String>,
    pub memory: u64,
    pub args: Vec<String>,
    pub publish: Vec<String>,
    pub disk: Option<&'a wisp_monitor::DiskConfig>,
    pub cpus: Option<f64>,
    pub restart: Option<String>,
}

/// `wisp run -d`: prints the new VM's id.
pub fn run_detached(socket: &Path, r: DetachedRun<'_>) -> anyhow::Result<u8> {
    let mut body = json!({
        "image": absolute(r.image)?,
        "memory": r.memory,
        "args": r.args,
        "publish": r.publish,
    });
    if let Some(n) = r.name {
        body["name"] = json!(n);
    }
    if let Some(d) = r.disk {
        body["disk"] = json!(absolute(&d.path)?);
        body["disk_read_only"] = json!(d.read_only);
    }
    if let Some(c) = r.cpus {
        body["cpus"] = json!(c);
    }
    if let Some(p) = r.restart {
        body["restart"] = json!(p);
    }
    let v = ok(client(socket).request("POST", "/v1/vms", Some(&body))?)?;
    println!("{}", v["id"].as_str().unwrap_or_default());
    Ok(0)
}

fn path_of(name: &str) -> String {
    // Names and ids are [A-Za-z0-9_.-]: nothing to escape.
    format!("/v1/vms/{name}")
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{}G", b >> 30)
    } else {
        format!("{}M", b >> 20)
    }
}

/// A byte count for the stats table: `512B`, `1.5kB`, `3.2MB` (decimal
/// units, as `docker stats`).
fn io_bytes(b: u64) -> String {
    match b {
        b if b < 1000 => format!("{b}B"),
        b if b < 1_000_000 => format!("{:.1}kB", b as f64 / 1e3),
        b if b < 1_000_000_000 => format!("{:.1}MB", b as f64 / 1e6),
        b => format!("{:.1}GB", b as f64 / 1e9),
    }
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// The STATE column: for an ended VM, how and with which status.
fn state_text(v: &Value) -> String {
    let state = v["state"].as_str().unwrap_or("?");
    let exit = &v["exit"];
    if state != "exited" && state != "restarting" || exit.is_null() {
        return state.to_string();
    }
    let how = exit["how"].as_str().unwrap_or("exited");
    match (exit["status"].as_i64(), exit["signal"].as_i64()) {
        (_, Some(sig)) => format!("{state} ({how}, signal {sig})"),
        (Some(st), _) => format!("{state} ({how}, {st})"),
        _ => format!("{state} ({how})"),
    }
}

/// `wisp ps [-a] [--format json]`.
pub fn ps(socket: &Path, all: bool, json_out: bool) -> anyhow::Result<u8> {
    let path = if all { "/v1/vms?all=1" } else { "/v1/vms" };
    let v = ok(client(socket).request("GET", path, None)?)?;
    let list = v.as_array().cloned().unwrap_or_default();
    if json_out {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    let now = wisp_toolstack::record::unix_ms();
    let mut rows =
        vec![["NAME", "ID", "STATE", "IMAGE", "MEMORY", "UPTIME", "PORTS"].map(String::from)];
    for vm in &list {
        let image = vm["spec"]["image"].as_str().unwrap_or("");
        let image = Path::new(image)
            .file_name()
            .map_or(image.into(), |f| f.to_string_lossy().into_owned());
        let live = matches!(vm["state"].as_str(), Some("running" | "paused"));
        let uptime = match vm["started_unix_ms"].as_u64() {
            Some(t) if live => human_duration(now.saturating_sub(t) / 1000),
            _ => "-".into(),
        };
        let ports: Vec<String> = vm["ports"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        let udp = if p["udp"].as_bool() == Some(true) {
                            "/udp"
                        } else {
                            ""
                        };
                        format!(
                            "{}->{}{udp}",
                            p["host"].as_str().unwrap_or("?"),
                            p["guest_port"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        rows.push([
            vm["name"].as_str().unwrap_or("").into(),
            vm["id"].as_str().unwrap_or("").chars().take(12).collect(),
            state_text(vm),
            image,
            human_bytes(vm["spec"]["memory"].as_u64().unwrap_or(0)),
            uptime,
            ports.join(","),
        ]);
    }
    print_table(&rows);
    Ok(0)
}

fn print_table<const N: usize>(rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == N {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// `wisp logs NAME [-f]`.
pub fn logs(socket: &Path, name: &str, follow: bool) -> anyhow::Result<u8> {
    let c = client(socket);
    let mut out = std::io::stdout();
    let path = format!(
        "{}/logs{}",
        path_of(name),
        if follow { "?follow=1" } else { "" }
    );
    let reply = c.stream(&path, &mut out)?;
    if reply.status != 200 {
        bail!("{}", reply.error_text());
    }
    Ok(0)
}

/// `wisp pause|resume|kill NAME...`: one action per VM; prints each name.
pub fn action(socket: &Path, action: &str, names: &[String], query: &str) -> anyhow::Result<u8> {
    let c = client(socket);
    let mut failed = false;
    for n in names {
        let path = format!("{}/{action}{query}", path_of(n));
        match ok(c.request("POST", &path, None)?) {
            Ok(_) => println!("{n}"),
            Err(e) => {
                wisp_monitor::report(format_args!("wisp: error: {n}: {e}"));
                failed = true;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

/// `wisp save NAME FILE [--leave-running]`: prints what was written.
pub fn save(socket: &Path, name: &str, file: &Path, leave_running: bool) -> anyhow::Result<u8> {
    let body = json!({ "path": absolute(file)?, "leave_running": leave_running });
    let path = format!("{}/save", path_of(name));
    let v = ok(client(socket).request("POST", &path, Some(&body))?)?;
    println!(
        "{name}: saved {} pages ({} KiB file, of {} memory) in {:.2} ms, guest stopped {:.2} ms",
        v["pages_written"],
        v["bytes_written"].as_u64().unwrap_or(0).div_ceil(1024),
        human_bytes(v["memory"].as_u64().unwrap_or(0)),
        v["total_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
        v["downtime_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
    );
    Ok(0)
}

/// `wisp migrate NAME HOST:PORT [--name-there N] [-p ...]`.
pub fn migrate(
    socket: &Path,
    name: &str,
    to: &str,
    name_there: Option<String>,
    publish: &[String],
) -> anyhow::Result<u8> {
    let mut body = json!({ "to": to });
    if let Some(n) = name_there {
        body["name"] = json!(n);
    }
    if !publish.is_empty() {
        body["publish"] = json!(publish);
    }
    let path = format!("{}/migrate", path_of(name));
    let v = ok(client(socket).request("POST", &path, Some(&body))?)?;
    let rounds: Vec<String> = v["rounds"]
        .as_array()
        .map(|r| r.iter().map(|n| n.to_string()).collect())
        .unwrap_or_default();
    println!(
        "{name}: migrated to {to} in {:.2} ms, guest stopped {:.2} ms; pages per round [{}], {} with the guest paused, {} KiB sent",
        v["total_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
        v["downtime_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
        rounds.join(", "),
        v["final_pages"],
        v["bytes_sent"].as_u64().unwrap_or(0).div_ceil(1024),
    );
    Ok(0)
}

fn restore_one(
    c: &Client,
    file: &str,
    name: Option<String>,
    publish: &[String],
    clone_id: u32,
) -> anyhow::Result<Value> {
    let mut body = json!({ "snapshot": file, "publish": publish, "clone_id": clone_id });
    if let Some(n) = name {
        body["name"] = json!(n);
    }
    ok(c.request("POST", "/v1/restore", Some(&body))?)
}

/// `wisp restore FILE [--name N] [-p ...]`: prints the new VM's id.
pub fn restore(
    socket: &Path,
    file: &Path,
    name: Option<String>,
    publish: &[String],
) -> anyhow::Result<u8> {
    let v = restore_one(&client(socket), &absolute(file)?, name, publish, 0)?;
    println!("{}", v["id"].as_str().unwrap_or_default());
    Ok(0)
}

/// `wisp restore FILE --disk FILE[,ro] [--name N] [-p ...]`: a guest
/// saved with a disk; prints the new VM's id.
pub fn restore_with_disk(
    socket: &Path,
    file: &Path,
    name: Option<String>,
    publish: &[String],
    disk: &str,
) -> anyhow::Result<u8> {
    let (path, read_only) = match disk.rsplit_once(',') {
        Some((p, "ro")) => (p, true),
        Some((p, "rw")) => (p, false),
        _ => (disk, false),
    };
    let mut body = json!({
        "snapshot": absolute(file)?,
        "publish": publish,
        "disk": absolute(Path::new(path))?,
        "disk_read_only": read_only,
    });
    if let Some(n) = name {
        body["name"] = json!(n);
    }
    let v = ok(client(socket).request("POST", "/v1/restore", Some(&body))?)?;
    println!("{}", v["id"].as_str().unwrap_or_default());
    Ok(0)
}

/// `wisp clone FILE --count N`: one request for N clones (clone ids
/// 1..N; the daemon opens and checks the snapshot once); prints each id,
/// its clone id and its time, then the total.
pub fn clone(socket: &Path, file: &Path, count: u32, publish: &[String]) -> anyhow::Result<u8> {
    if count == 0 {
        bail!("--count must be at least 1");
    }
    let c = client(socket);
    let file = absolute(file)?;
    let all = std::time::Instant::now();
    let body = json!({ "snapshot": file, "count": count, "publish": publish });
    let v = ok(c.request("POST", "/v1/clone", Some(&body))?)?;
    let total = all.elapsed().as_secs_f64() * 1000.0;
    let vms = v["vms"].as_array().cloned().unwrap_or_default();
    let per = v["per_clone_us"].as_array().cloned().unwrap_or_default();
    for (i, vm) in vms.iter().enumerate() {
        let us = per.get(i).and_then(Value::as_f64).unwrap_or(0.0);
        println!(
            "{} clone {} {:.2} ms",
            vm["id"].as_str().unwrap_or_default(),
            i + 1,
            us / 1000.0
        );
    }
    let n = vms.len().max(1) as f64;
    println!(
        "{} clones in {total:.1} ms ({:.2} ms per clone; snapshot opened and checked in {:.2} ms)",
        vms.len(),
        total / n,
        v["open_us"].as_f64().unwrap_or(0.0) / 1000.0
    );
    if let Some(e) = v["error"].as_str() {
        bail!("{e}");
    }
    Ok(0)
}

/// `wisp rm [-f] NAME...`.
pub fn rm(socket: &Path, names: &[String], force: bool) -> anyhow::Result<u8> {
    let c = client(socket);
    let mut failed = false;
    for n in names {
        let path = format!("{}{}", path_of(n), if force { "?force=1" } else { "" });
        match ok(c.request("DELETE", &path, None)?) {
            Ok(_) => println!("{n}"),
            Err(e) => {
                wisp_monitor::report(format_args!("wisp: error: {n}: {e}"));
                failed = true;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

/// `wisp stats [--format json]`.
pub fn stats(socket: &Path, json_out: bool) -> anyhow::Result<u8> {
    let v = ok(client(socket).request("GET", "/v1/stats", None)?)?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let host = &v["host"];
    let avail = host["mem_available_bytes"].as_u64().unwrap_or(0);
    let states: Vec<String> = host["vms_by_state"]
        .as_object()
        .map(|m| m.iter().map(|(k, n)| format!("{k} {n}")).collect())
        .unwrap_or_default();
    let pool: Vec<String> = host["pool"]["shells"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    format!(
                        "{} {}/{}",
                        human_bytes(s["memory"].as_u64().unwrap_or(0)),
                        s["ready"],
                        s["target"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "host: MemAvailable {} MiB; VMs: {}; ready shells: {}",
        avail >> 20,
        if states.is_empty() {
            "none".into()
        } else {
            states.join(", ")
        },
        pool.join(", ")
    );
    let mut rows = vec![[
        "NAME",
        "STATE",
        "CPU",
        "RSS",
        "EXITS",
        "TX",
        "RX",
        "NET I/O",
        "BLOCK I/O",
        "START",
    ]
    .map(String::from)];
    let opt = |x: &Value| x.as_u64().map_or("-".into(), |n| n.to_string());
    // As `docker stats`: received / sent, read / written.
    let pair = |a: &Value, b: &Value| match (a.as_u64(), b.as_u64()) {
        (Some(a), Some(b)) => format!("{} / {}", io_bytes(a), io_bytes(b)),
        _ => "-".into(),
    };
    for vm in v["vms"].as_array().cloned().unwrap_or_default() {
        rows.push([
            vm["name"].as_str().unwrap_or("").into(),
            vm["state"].as_str().unwrap_or("").into(),
            vm["cpu_seconds"]
                .as_f64()
                .map_or("-".into(), |c| format!("{c:.2}s")),
            vm["rss_bytes"]
                .as_u64()
                .map_or("-".into(), |b| format!("{:.1}M", b as f64 / 1048576.0)),
            opt(&vm["exits"]),
            opt(&vm["tx_frames"]),
            opt(&vm["rx_frames"]),
            pair(&vm["rx_bytes"], &vm["tx_bytes"]),
            pair(&vm["disk_read_bytes"], &vm["disk_write_bytes"]),
            vm["start_us"]
                .as_u64()
                .map_or("-".into(), |u| format!("{:.3}ms", u as f64 / 1000.0)),
        ]);
    }
    print_table(&rows);
    Ok(0)
}
