//! The API's routes (described in `docs/api.yaml`).

use std::fmt::Write as _;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::http::{self, Request, Response};
use crate::metrics::{self, label};
use crate::process;
use crate::record::{Record, State};
use crate::vms::{
    CloneRequest, RestoreRequest, RunRequest, SaveRequest, VmError, Vms, DEFAULT_STOP_TIMEOUT,
};

/// Serves one connection, accepted at `arrived` (monotonic ns: start
/// latency counts from there).
pub fn serve(vms: &Arc<Vms>, mut conn: UnixStream, arrived: u64) {
    let req = match http::read_request(&mut conn) {
        Ok(r) => r,
        Err(e) => {
            let _ = http::write_response(&mut conn, &Response::error(400, e));
            return;
        }
    };
    if req.method == "GET" && req.path.ends_with("/logs") && req.flag("follow") {
        follow_logs(vms, &req, &mut conn);
        return;
    }
    let resp = route(vms, &req, arrived).unwrap_or_else(|e| Response::error(e.status(), e));
    let _ = http::write_response(&mut conn, &resp);
}

fn route(vms: &Arc<Vms>, req: &Request, arrived: u64) -> Result<Response, VmError> {
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let m = req.method.as_str();
    match (m, parts.as_slice()) {
        ("GET", ["v1", "version"]) => Ok(Response::json(
            200,
            &json!({ "version": env!("CARGO_PKG_VERSION"), "api": "v1" }),
        )),
        ("GET", ["v1", "vms"]) => {
            let all = req.flag("all");
            let list: Vec<Record> = vms
                .list()
                .into_iter()
                .map(|(_, r)| r)
                .filter(|r| all || r.state != State::Exited)
                .collect();
            Ok(Response::json(200, &list))
        }
        ("POST", ["v1", "vms"]) => {
            let run: RunRequest = serde_json::from_slice(&req.body)
                .map_err(|e| VmError::BadRequest(format!("malformed request body: {e}")))?;
            let r = vms.run(run, arrived)?;
            Ok(Response::json(201, &r))
        }
        ("POST", ["v1", "restore"]) => {
            let req: RestoreRequest = serde_json::from_slice(&req.body)
                .map_err(|e| VmError::BadRequest(format!("malformed request body: {e}")))?;
            let r = vms.restore(req, arrived)?;
            Ok(Response::json(201, &r))
        }
        ("POST", ["v1", "clone"]) => {
            let req: CloneRequest = serde_json::from_slice(&req.body)
                .map_err(|e| VmError::BadRequest(format!("malformed request body: {e}")))?;
            let report = vms.clone_many(req, arrived);
            if report.vms.is_empty() {
                let msg = report.error.unwrap_or_default();
                return Err(match report.status {
                    404 => VmError::NotFound(msg),
                    409 => VmError::Conflict(msg),
                    503 => VmError::Unavailable(msg),
                    500 => VmError::Internal(msg),
                    _ => VmError::BadRequest(msg),
                });
            }
            Ok(Response::json(201, &report))
        }
        ("POST", ["v1", "vms", r, "save"]) => {
            let vm = vms.find(r)?;
            let save: SaveRequest = serde_json::from_slice(&req.body)
                .map_err(|e| VmError::BadRequest(format!("malformed request body: {e}")))?;
            let figures = vms.save(&vm, &save)?;
            Ok(Response::json(200, &figures))
        }
        ("POST", ["v1", "vms", r, "migrate"]) => {
            let vm = vms.find(r)?;
            let m: crate::migration::MigrateRequest = serde_json::from_slice(&req.body)
                .map_err(|e| VmError::BadRequest(format!("malformed request body: {e}")))?;
            let figures = vms.migrate(&vm, &m)?;
            Ok(Response::json(200, &figures))
        }
        ("GET", ["v1", "vms", r]) => Ok(Response::json(200, &vms.find(r)?.snapshot())),
        ("DELETE", ["v1", "vms", r]) => {
            let vm = vms.find(r)?;
            vms.remove(&vm, req.flag("force"))?;
            Ok(Response::text(204, "text/plain", vec![]))
        }
        ("POST", ["v1", "vms", r, action]) => {
            let vm = vms.find(r)?;
            let rec = match *action {
                "pause" => vms.pause(&vm)?,
                "resume" => vms.resume(&vm)?,
                "kill" => vms.kill(&vm)?,
                "stop" => {
                    let t = match req.query("timeout") {
                        None => DEFAULT_STOP_TIMEOUT,
                        Some(s) => s
                            .parse::<f64>()
                            .ok()
                            .filter(|t| t.is_finite() && (0.0..=3600.0).contains(t))
                            .map(Duration::from_secs_f64)
                            .ok_or_else(|| {
                                VmError::BadRequest(format!("timeout '{s}' is not 0-3600 seconds"))
                            })?,
                    };
                    vms.stop(&vm, t)?
                }
                other => return Err(VmError::NotFound(format!("action {other}"))),
            };
            Ok(Response::json(200, &rec))
        }
        ("GET", ["v1", "vms", r, "logs"]) => {
            let vm = vms.find(r)?;
            Ok(Response::text(
                200,
                "text/plain; charset=utf-8",
                crate::logs::read(&vms.log_dir(&vm)),
            ))
        }
        ("GET", ["v1", "stats"]) => Ok(Response::json(200, &stats(vms))),
        ("GET", ["v1", "pool"]) => Ok(Response::json(200, &pool(vms))),
        ("GET", ["metrics"]) => Ok(Response::text(
            200,
            "text/plain; version=0.0.4",
            prometheus(vms).into_bytes(),
        )),
        (_, ["v1", ..]) | (_, ["metrics"]) => Err(VmError::NotFound(format!(
            "{m} {}: no such endpoint",
            req.path
        ))),
        _ => Err(VmError::NotFound(format!("{}: no such endpoint", req.path))),
    }
}

fn follow_logs(vms: &Arc<Vms>, req: &Request, conn: &mut UnixStream) {
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let vm = match parts.as_slice() {
        ["v1", "vms", r, "logs"] => vms.find(r),
        _ => Err(VmError::NotFound(req.path.clone())),
    };
    let vm = match vm {
        Ok(v) => v,
        Err(e) => {
            let _ = http::write_response(conn, &Response::error(e.status(), e));
            return;
        }
    };
    if http::write_stream_head(conn, "text/plain; charset=utf-8").is_err() {
        return;
    }
    let dir = vms.log_dir(&vm);
    crate::logs::follow(&dir, conn, &|| vms.is_live(&vm));
}

fn pool(vms: &Vms) -> serde_json::Value {
    let shells: Vec<_> = vms
        .pool()
        .status()
        .into_iter()
        .map(|(m, ready, target)| json!({ "memory": m, "ready": ready, "target": target }))
        .collect();
    json!({
        "shells": shells,
        "counters": vms.pool().counters(),
        "images": vms.images().counters(),
    })
}

/// Per-VM and host figures.
fn stats(vms: &Vms) -> serde_json::Value {
    let mut by_state = std::collections::BTreeMap::<&str, u64>::new();
    let mut list = Vec::new();
    for (vm, r) in vms.list() {
        *by_state.entry(r.state.as_str()).or_default() += 1;
        if !r.state.is_live() {
            continue;
        }
        let usage = r.pid.and_then(process::usage);
        let g = vms.guest_stats(&vm);
        list.push(json!({
            "id": r.id,
            "name": r.name,
            "state": r.state.as_str(),
            "pid": r.pid,
            "memory": r.spec.memory,
            "cpu_seconds": usage.map(|u| u.0),
            "rss_bytes": usage.map(|u| u.1),
            "exits": g.as_ref().map(|g| g.exits),
            "waits": g.as_ref().map(|g| g.waits),
            "wakeups": g.as_ref().map(|g| g.wakeups),
            "tx_frames": g.as_ref().map(|g| g.tx_frames),
            "rx_frames": g.as_ref().map(|g| g.rx_frames),
            "tx_bytes": g.as_ref().map(|g| g.tx_bytes),
            "rx_bytes": g.as_ref().map(|g| g.rx_bytes),
            "disk_read_bytes": g.as_ref().map(|g| g.disk_read_bytes),
            "disk_write_bytes": g.as_ref().map(|g| g.disk_write_bytes),
            "start_us": r.start_us,
            "restarts": r.restarts,
        }));
    }
    json!({
        "host": {
            "mem_available_bytes": process::mem_available(),
            "vms_by_state": by_state,
            "pool": pool(vms),
        },
        "vms": list,
    })
}

/// The Prometheus text exposition.
fn prometheus(vms: &Vms) -> String {
    let mut out = String::new();
    let list = vms.list();
    metrics::header(&mut out, "wisp_vms", "gauge", "VMs by state.");
    for s in [
        State::Creating,
        State::Running,
        State::Paused,
        State::Restarting,
        State::Exited,
    ] {
        let n = list.iter().filter(|(_, r)| r.state == s).count();
        let _ = writeln!(out, "wisp_vms{{state=\"{}\"}} {n}", s.as_str());
    }
    metrics::header(
        &mut out,
        "wisp_pool_ready_shells",
        "gauge",
        "Pre-started shells ready, by guest memory size.",
    );
    for (m, ready, _) in vms.pool().status() {
        let _ = writeln!(
            out,
            "wisp_pool_ready_shells{{memory_bytes=\"{m}\"}} {ready}"
        );
    }
    let c = vms.pool().counters();
    metrics::header(
        &mut out,
        "wisp_starts_total",
        "counter",
        "Starts served by a pooled shell (warm) or a new one (cold).",
    );
    let _ = writeln!(out, "wisp_starts_total{{kind=\"warm\"}} {}", c.warm);
    let _ = writeln!(out, "wisp_starts_total{{kind=\"cold\"}} {}", c.cold);
    metrics::header(
        &mut out,
        "wisp_start_latency_seconds",
        "histogram",
        "Time from the run request reaching the daemon to the guest's main.",
    );
    let (warm, cold) = vms.latency();
    warm.write(&mut out, "wisp_start_latency_seconds", "kind=\"warm\"");
    cold.write(&mut out, "wisp_start_latency_seconds", "kind=\"cold\"");
    let mut rows = Vec::new();
    for (vm, r) in &list {
        if !r.state.is_live() {
            continue;
        }
        let l = format!("id=\"{}\",name=\"{}\"", r.id, label(&r.name));
        rows.push((l, r.pid.and_then(process::usage), vms.guest_stats(vm), r));
    }
    type Get = fn(&(f64, u64), &crate::proto::GuestStats) -> f64;
    let per_vm: [(&str, &str, &str, Get); 11] = [
        (
            "wisp_vm_cpu_seconds_total",
            "counter",
            "CPU time of the VM's monitor process (all its threads).",
            |u, _| u.0,
        ),
        (
            "wisp_vm_rss_bytes",
            "gauge",
            "Resident memory of the VM's monitor process, guest pages touched included.",
            |u, _| u.1 as f64,
        ),
        (
            "wisp_vm_exits_total",
            "counter",
            "Exits from KVM_RUN to the monitor.",
            |_, g| g.exits as f64,
        ),
        (
            "wisp_vm_waits_total",
            "counter",
            "Blocking waits of the guest (idle).",
            |_, g| g.waits as f64,
        ),
        (
            "wisp_vm_wakeups_total",
            "counter",
            "Times the I/O thread woke a waiting guest.",
            |_, g| g.wakeups as f64,
        ),
        (
            "wisp_vm_tx_frames_total",
            "counter",
            "Network frames sent by the guest.",
            |_, g| g.tx_frames as f64,
        ),
        (
            "wisp_vm_rx_frames_total",
            "counter",
            "Network frames delivered to the guest.",
            |_, g| g.rx_frames as f64,
        ),
        (
            "wisp_vm_network_transmit_bytes_total",
            "counter",
            "Bytes of the network frames sent by the guest (Ethernet frames).",
            |_, g| g.tx_bytes as f64,
        ),
        (
            "wisp_vm_network_receive_bytes_total",
            "counter",
            "Bytes of the network frames delivered to the guest (Ethernet frames).",
            |_, g| g.rx_bytes as f64,
        ),
        (
            "wisp_vm_disk_read_bytes_total",
            "counter",
            "Bytes the guest's disk read into guest memory.",
            |_, g| g.disk_read_bytes as f64,
        ),
        (
            "wisp_vm_disk_written_bytes_total",
            "counter",
            "Bytes the guest's disk wrote from guest memory.",
            |_, g| g.disk_write_bytes as f64,
        ),
    ];
    for (name, kind, help, get) in per_vm {
        metrics::header(&mut out, name, kind, help);
        for (l, u, g, _) in &rows {
            if let (Some(u), Some(g)) = (u, g) {
                let _ = writeln!(out, "{name}{{{l}}} {}", get(u, g));
            }
        }
    }
    metrics::header(
        &mut out,
        "wisp_vm_memory_bytes",
        "gauge",
        "Guest memory configured.",
    );
    for (l, _, _, r) in &rows {
        let _ = writeln!(out, "wisp_vm_memory_bytes{{{l}}} {}", r.spec.memory);
    }
    metrics::header(
        &mut out,
        "wisp_vm_restarts_total",
        "counter",
        "Restarts by --restart on-failure.",
    );
    for (l, _, _, r) in &rows {
        let _ = writeln!(out, "wisp_vm_restarts_total{{{l}}} {}", r.restarts);
    }
    out
}
