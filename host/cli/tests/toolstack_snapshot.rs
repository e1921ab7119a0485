//! Snapshots through the toolstack: `wisp save`, `wisp restore` and
//! `wisp clone` against a daemon on a temporary socket and state directory.

mod common;

use std::path::PathBuf;

use common::daemon::*;
use common::*;

/// (tick number, restore count, clone id) of each `tick` line of a log.
fn ticks(log: &str) -> Vec<(u64, u32, u32)> {
    log.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 12 || f[0] != "tick" {
                return None;
            }
            Some((f[1].parse().ok()?, f[7].parse().ok()?, f[9].parse().ok()?))
        })
        .collect()
}

fn logs(d: &Daemon, name: &str) -> String {
    d.ok(&["logs", name])
}

fn wait_ticks(d: &Daemon, name: &str, n: usize) -> Vec<(u64, u32, u32)> {
    until(&format!("{name} ticks {n} times"), || {
        ticks(&logs(d, name)).len() >= n
    });
    ticks(&logs(d, name))
}

fn snap(d: &Daemon, name: &str) -> PathBuf {
    d.dir.join(format!("{name}.snap"))
}

#[test]
fn save_restore_and_clone_through_the_daemon() {
    let d = Daemon::start("snap", "16M:1");
    let img = probe().to_str().unwrap();
    d.ok(&[
        "run", "-d", "--name", "c", "-m", "16M", img, "--", "counter", "10",
    ]);
    wait_ticks(&d, "c", 5);
    let file = snap(&d, "c");
    let out = d.ok(&["save", "c", file.to_str().unwrap()]);
    assert!(out.contains("saved"), "{out}");
    assert!(file.exists(), "no snapshot at {}", file.display());
    assert!(!PathBuf::from(format!("{}.tmp", file.display())).exists());
    // The guest stopped after the save, and says it was saved.
    let rec = d.wait_state("c", "exited");
    assert_eq!(rec["exit"]["how"], "saved", "{rec}");
    let ps = d.ok(&["ps", "-a"]);
    assert!(
        ps.lines()
            .any(|l| l.starts_with("c ") && l.contains("exited")),
        "{ps}"
    );
    let before = ticks(&logs(&d, "c"));
    let last = *before.last().expect("ticks before the save");

    // Restore: the count continues where it stopped.
    let id = d.ok(&["restore", file.to_str().unwrap(), "--name", "r"]);
    assert_eq!(id.trim().len(), 16, "an id is printed: {id}");
    d.wait_state("r", "running");
    let after = wait_ticks(&d, "r", 3);
    assert_eq!(
        after[0].0,
        last.0 + 1,
        "the count did not continue: {last:?} then {after:?}"
    );
    // The identity is checked on the second tick: the save may have caught
    // the first between its identity read and its print.
    assert_eq!(after[1].1, 1, "restore count: {after:?}");
    assert_eq!(after[1].2, 0, "a plain restore is no clone: {after:?}");
    for w in after.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "{after:?}");
    }

    // Clones: three running guests, each its own clone id, each counting on.
    let out = d.ok(&["clone", file.to_str().unwrap(), "--count", "3"]);
    let ids: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" clone "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{out}");
    assert!(out.contains("ms per clone"), "{out}");
    let mut clone_ids = Vec::new();
    for id in &ids {
        d.wait_state(id, "running");
        let t = wait_ticks(&d, id, 2);
        assert_eq!(t[0].0, last.0 + 1, "clone {id} did not continue: {t:?}");
        clone_ids.push(t[1].2);
    }
    clone_ids.sort();
    assert_eq!(clone_ids, [1, 2, 3]);

    // --leave-running: the guest goes on counting, and its snapshot restores.
    // A restored guest saves too (its written pages are its own copies).
    let file2 = snap(&d, "r");
    d.ok(&["save", "r", file2.to_str().unwrap(), "--leave-running"]);
    let n = ticks(&logs(&d, "r")).len();
    wait_ticks(&d, "r", n + 2);
    assert_eq!(d.vm("r")["state"], "running");
    d.ok(&["restore", file2.to_str().unwrap(), "--name", "r2"]);
    let again = wait_ticks(&d, "r2", 2);
    assert_eq!(again[1].1, 2, "second restore: {again:?}");
    assert!(again[0].0 > after[0].0, "{again:?} after {after:?}");
}

#[test]
fn a_bad_save_or_restore_is_a_clear_error_and_changes_nothing() {
    let d = Daemon::start("snapbad", "16M:1");
    let img = probe().to_str().unwrap();
    d.ok(&[
        "run", "-d", "--name", "c", "-m", "16M", img, "--", "counter", "10",
    ]);
    wait_ticks(&d, "c", 3);
    let file = snap(&d, "c");

    let o = d.wisp(&["save", "nosuch", file.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nosuch"), "{}", stderr(&o));
    assert!(!file.exists());

    d.ok(&["save", "c", file.to_str().unwrap(), "--leave-running"]);
    let n = ticks(&logs(&d, "c")).len();
    wait_ticks(&d, "c", n + 1);

    // One byte of the memory flipped: refused, no VM created.
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 16 * 4096 + 100;
    let i = (0..bytes.len() - at)
        .map(|k| at + k)
        .find(|&k| bytes[k] != 0)
        .unwrap_or(bytes.len() / 2);
    bytes[i] ^= 0xff;
    let bad = snap(&d, "bad");
    std::fs::write(&bad, &bytes).unwrap();
    let vms_before = d.json("/v1/vms?all=1").as_array().unwrap().len();
    let o = d.wisp(&["restore", bad.to_str().unwrap(), "--name", "x"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("corrupt") || e.contains("checksum"), "{e}");
    assert_eq!(
        d.json("/v1/vms?all=1").as_array().unwrap().len(),
        vms_before
    );
    // Not a snapshot at all.
    let o = d.wisp(&["restore", img, "--name", "x"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a Wisp snapshot"), "{}", stderr(&o));
    assert_eq!(
        d.json("/v1/vms?all=1").as_array().unwrap().len(),
        vms_before
    );
    // Devices that do not fit the snapshot (it has no NIC).
    let o = d.wisp(&[
        "restore",
        file.to_str().unwrap(),
        "--name",
        "x",
        "-p",
        "0:80",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has 0 NIC(s)"), "{}", stderr(&o));
    assert_eq!(
        d.json("/v1/vms?all=1").as_array().unwrap().len(),
        vms_before
    );
    // The running guest was not touched.
    assert_eq!(d.vm("c")["state"], "running");
    // The good snapshot still restores.
    d.ok(&["restore", file.to_str().unwrap(), "--name", "ok"]);
    wait_ticks(&d, "ok", 1);
}

#[test]
fn a_guest_with_a_nic_is_cloned_with_its_ports_published() {
    let d = Daemon::start("snapnic", "16M:1");
    let img = probe().to_str().unwrap();
    let publish = format!("{}:80", free_port());
    d.ok(&[
        "run", "-d", "--name", "n", "-m", "16M", "-p", &publish, img, "--", "counter", "10",
    ]);
    wait_ticks(&d, "n", 2);
    let file = snap(&d, "n");
    d.ok(&["save", "n", file.to_str().unwrap(), "--leave-running"]);
    // Without ports the restore would lack the NIC: refused up front.
    let vms_before = d.json("/v1/vms?all=1").as_array().unwrap().len();
    let o = d.wisp(&["restore", file.to_str().unwrap(), "--name", "x"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has 1 NIC(s)"), "{}", stderr(&o));
    assert_eq!(
        d.json("/v1/vms?all=1").as_array().unwrap().len(),
        vms_before
    );
    // Two clones, each with its own free host port.
    let out = d.ok(&[
        "clone",
        file.to_str().unwrap(),
        "--count",
        "2",
        "-p",
        "0:80",
    ]);
    let ids: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" clone "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{out}");
    let mut hosts = Vec::new();
    for id in &ids {
        let rec = d.wait_state(id, "running");
        let host = rec["ports"][0]["host"]
            .as_str()
            .expect("a published port")
            .to_string();
        assert!(!host.ends_with(":0"), "{rec}");
        hosts.push(host);
        let t = wait_ticks(&d, id, 2);
        assert!(t[1].2 >= 1, "{t:?}");
    }
    assert_ne!(hosts[0], hosts[1]);
}

/// Pids of the shells waiting in the pool: their spare VM directories
/// (`STATE/pool/PID`) are named after them.
fn pooled_pids(d: &Daemon) -> Vec<i64> {
    std::fs::read_dir(d.state().join("pool"))
        .map(|r| {
            r.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn pool_full(d: &Daemon) {
    until("the pool is full", || {
        let p = d.json("/v1/pool");
        p["shells"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["ready"] == s["target"])
    });
}

#[test]
fn one_clone_request_starts_n_guests_on_pooled_shells() {
    let d = Daemon::start("clonen", "16M:3");
    let img = probe().to_str().unwrap();
    d.ok(&[
        "run", "-d", "--name", "c", "-m", "16M", img, "--", "counter", "10",
    ]);
    wait_ticks(&d, "c", 3);
    let file = snap(&d, "c");
    d.ok(&["save", "c", file.to_str().unwrap()]);
    d.wait_state("c", "exited");
    let last = *ticks(&logs(&d, "c")).last().unwrap();

    // A plain restore is served by a pooled shell: its monitor is one of
    // the shells that waited in the pool.
    pool_full(&d);
    let pooled = pooled_pids(&d);
    assert_eq!(pooled.len(), 3, "{pooled:?}");
    let warm_before = d.json("/v1/pool")["counters"]["warm"].as_u64().unwrap();
    d.ok(&["restore", file.to_str().unwrap(), "--name", "r"]);
    let r = d.wait_state("r", "running");
    assert_eq!(r["from_pool"], true, "{r}");
    assert!(
        pooled.contains(&r["pid"].as_i64().unwrap()),
        "{r} {pooled:?}"
    );
    let warm = d.json("/v1/pool")["counters"]["warm"].as_u64().unwrap();
    assert_eq!(warm, warm_before + 1);

    // Three clones in one request, all on pooled shells.
    pool_full(&d);
    let pooled = pooled_pids(&d);
    let body = format!(
        r#"{{"snapshot":"{}","count":3,"name":"k"}}"#,
        file.display()
    );
    let (status, reply) = d.http("POST", "/v1/clone", &body);
    assert_eq!(status, 201, "{reply}");
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let vms = v["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 3, "{v}");
    assert_eq!(v["per_clone_us"].as_array().unwrap().len(), 3, "{v}");
    assert!(v["error"].is_null(), "{v}");
    let warm2 = d.json("/v1/pool")["counters"]["warm"].as_u64().unwrap();
    assert_eq!(warm2, warm + 3, "every clone took a pooled shell");
    let mut pids = Vec::new();
    let mut clone_ids = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        let name = format!("k-{}", i + 1);
        assert_eq!(vm["name"], name.as_str());
        assert_eq!(vm["from_pool"], true, "{vm}");
        let pid = vm["pid"].as_i64().unwrap();
        assert!(pooled.contains(&pid), "{vm} {pooled:?}");
        pids.push(pid);
        // Each clone continues the count on its own, with its own id.
        let t = wait_ticks(&d, &name, 2);
        assert_eq!(t[0].0, last.0 + 1, "{name} did not continue: {t:?}");
        clone_ids.push(t[1].2);
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 3, "one monitor per clone");
    clone_ids.sort_unstable();
    assert_eq!(clone_ids, [1, 2, 3]);

    // A bad count or snapshot: a clear error, nothing started.
    let before = d.json("/v1/vms?all=1").as_array().unwrap().len();
    let (status, reply) = d.http(
        "POST",
        "/v1/clone",
        &format!(r#"{{"snapshot":"{}","count":0}}"#, file.display()),
    );
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("count 0"), "{reply}");
    let (status, reply) = d.http(
        "POST",
        "/v1/clone",
        &format!(r#"{{"snapshot":"{}","count":2}}"#, img),
    );
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("not a Wisp snapshot"), "{reply}");
    assert_eq!(d.json("/v1/vms?all=1").as_array().unwrap().len(), before);
}
