//! The CLI around the monitor: `wisp new` + `wisp build` for a crate outside
//! this repository, `wisp inspect`, and bad flags.

mod common;

use common::*;

#[test]
fn new_crate_builds_and_runs() {
    let dir = scratch().join("newapp-test");
    let _ = std::fs::remove_dir_all(&dir);
    let o = wisp()
        .args(["new", "newapp"])
        .arg("--path")
        .arg(&dir)
        .output()
        .expect("wisp new");
    assert!(o.status.success(), "{}", stderr(&o));
    let img = scratch().join("newapp.wisp");
    let o = wisp()
        .arg("build")
        .arg(&dir)
        .arg("-o")
        .arg(&img)
        .output()
        .expect("wisp build");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&img, &[], &["x"]);
    assert_eq!(stdout(&o), "Hello from newapp! args: [\"x\"]\n");
    // Refuses to overwrite.
    let o = wisp()
        .args(["new", "newapp"])
        .arg("--path")
        .arg(&dir)
        .output()
        .expect("wisp new");
    assert_clean_error(&o, "already exists");
}

#[test]
fn new_rejects_bad_names() {
    let o = wisp()
        .args(["new", "9lives"])
        .current_dir(scratch())
        .output()
        .expect("wisp new");
    assert_clean_error(&o, "not a valid crate name");
}

#[test]
fn build_rejects_a_directory_without_a_crate() {
    let o = wisp()
        .arg("build")
        .arg(scratch())
        .output()
        .expect("wisp build");
    assert_clean_error(&o, "has no Cargo.toml");
}

#[test]
fn inspect_lists_entries_libraries_and_devices() {
    let o = wisp()
        .arg("inspect")
        .arg(hello())
        .output()
        .expect("inspect");
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.contains("entry (wisp): 0x100000"), "{out}");
    assert!(out.contains("entry (PVH):  0x"), "{out}");
    assert!(
        out.contains("libraries:") && out.contains("console") && out.contains("mem"),
        "{out}"
    );
    assert!(out.contains("devices:      none"), "{out}");
    // hello does not use the executor, so it is not linked in.
    assert!(!out.contains("exec"), "{out}");
}

#[test]
fn hello_is_small() {
    let len = std::fs::metadata(hello()).expect("image").len();
    assert!(len <= 64 * 1024, "hello is {len} bytes; the goal is 64 KiB");
}

#[test]
fn bad_flags_are_reported_not_panicked() {
    for args in [
        &["run", "x.wisp", "--memory", "lots"][..],
        &["run", "x.wisp", "--timeout", "soon"],
        &["frobnicate"],
    ] {
        let o = wisp().args(args).output().expect("wisp");
        assert_eq!(status(&o), 2, "{args:?}");
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
        assert!(stderr(&o).contains("error:"), "{}", stderr(&o));
    }
}

/// Copies `from` to `to` recursively, leaving out build output (`target`).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().expect("type").is_dir() {
            if entry.file_name() != "target" {
                copy_tree(&src, &dst);
            }
        } else {
            std::fs::copy(&src, &dst).expect("copy");
        }
    }
}

/// A directory removed when dropped, so a failing test leaves nothing behind.
struct TempTree(std::path::PathBuf);

impl TempTree {
    fn new(path: std::path::PathBuf) -> TempTree {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("mkdir");
        TempTree(path)
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `[[package]]` entries of a Cargo.lock as "name version" lines.
fn locked(lock: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(lock).expect("read Cargo.lock");
    let mut out = Vec::new();
    let mut name = None;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_string());
        } else if let (Some(v), Some(n)) = (line.strip_prefix("version = "), name.take()) {
            out.push(format!("{n} {}", v.trim_matches('"')));
        }
    }
    out
}

#[test]
fn a_new_crate_inside_the_checkout_survives_moving_the_checkout() {
    // A copy of the checkout (library OS, ABI, and the wisp binary where
    // `cargo build` puts it), so that moving it moves nothing of the real one.
    let tree = TempTree::new(scratch().join(format!("moved-checkout-{}", std::process::id())));
    let base = &tree.0;
    let checkout = base.join("wisp");
    copy_tree(&repo().join("abi"), &checkout.join("abi"));
    copy_tree(&repo().join("guest"), &checkout.join("guest"));
    let bin = checkout.join("target/release/wisp");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_wisp"), &bin).expect("copy wisp");

    let o = output_of_copied_binary(
        std::process::Command::new(&bin)
            .args(["new", "moveme", "--path", "apps/moveme"])
            .current_dir(&checkout)
            .env_remove("WISP_LIBOS"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let app = checkout.join("apps/moveme");
    let manifest = std::fs::read_to_string(app.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains(r#"wisp = { path = "../../guest/libos" }"#),
        "{manifest}"
    );
    // The app starts from the library OS's own lock, not a fresh resolve.
    assert_eq!(
        std::fs::read(app.join("Cargo.lock")).expect("wisp new writes a Cargo.lock"),
        std::fs::read(repo().join("guest/Cargo.lock")).unwrap()
    );

    let moved = base.join("elsewhere");
    std::fs::rename(&checkout, &moved).expect("move the checkout");
    let img = base.join("moveme.wisp");
    let o = output_of_copied_binary(
        std::process::Command::new(moved.join("target/release/wisp"))
            .arg("build")
            .arg(moved.join("apps/moveme"))
            .arg("-o")
            .arg(&img)
            .env("CARGO_NET_OFFLINE", "true"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&img, &[], &["moved"]);
    assert_eq!(stdout(&o), "Hello from moveme! args: [\"moved\"]\n");
    // Cargo kept only what the app uses, at the library OS's versions.
    let guest = locked(&repo().join("guest/Cargo.lock"));
    let app_lock = locked(&moved.join("apps/moveme/Cargo.lock"));
    assert!(
        app_lock.iter().any(|p| p.starts_with("talc ")),
        "{app_lock:?}"
    );
    for p in app_lock.iter().filter(|p| !p.starts_with("moveme ")) {
        assert!(
            guest.contains(p),
            "{p} is not the guest workspace's version"
        );
    }
}

#[test]
fn a_new_crate_outside_the_checkout_can_be_moved_on_its_own() {
    let tree = TempTree::new(
        std::env::temp_dir().join(format!("wisp-new-outside-{}", std::process::id())),
    );
    let base = &tree.0;
    let o = wisp()
        .args(["new", "roamer"])
        .current_dir(base)
        .env_remove("WISP_LIBOS")
        .output()
        .expect("wisp new");
    assert!(o.status.success(), "{}", stderr(&o));
    // Deeper down, so that a path relative to the old place would break.
    let moved = base.join("a/b/moved");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::rename(base.join("roamer"), &moved).expect("move the app");
    let img = base.join("roamer.wisp");
    let o = wisp()
        .arg("build")
        .arg(&moved)
        .arg("-o")
        .arg(&img)
        .output()
        .expect("wisp build");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&img, &[], &[]);
    assert_eq!(stdout(&o), "Hello from roamer! args: []\n");
}

#[test]
fn build_refuses_a_crate_that_does_not_use_wisp_in_one_line() {
    let dir = scratch().join("plain-rust");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        "[package]\nname = \"plain\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(dir.join("src/main.rs"), "fn main() {}\n").unwrap();
    let o = wisp().arg("build").arg(&dir).output().expect("wisp build");
    assert_clean_error(&o, "does not use the Wisp library OS");
    // The repository root is a workspace, not an application.
    let o = wisp()
        .arg("build")
        .arg(repo())
        .output()
        .expect("wisp build");
    assert_clean_error(&o, "holds a workspace, not an application crate");
}

#[test]
fn build_creates_the_output_directory() {
    let dir = scratch().join(format!("out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let img = dir.join("a/b/hello.wisp");
    let o = wisp()
        .arg("build")
        .arg(repo().join("examples/hello"))
        .arg("-o")
        .arg(&img)
        .output()
        .expect("wisp build");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&img, &[], &["made"]);
    assert_eq!(stdout(&o), "Hello from Wisp! args: [\"made\"]\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_image_is_reported_once() {
    for cmd in ["run", "inspect"] {
        let o = wisp()
            .args([cmd, "no-such-image.wisp"])
            .output()
            .expect("wisp");
        assert_clean_error(&o, "No such file or directory");
        assert_eq!(
            stderr(&o).matches("No such file").count(),
            1,
            "{cmd}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn a_zero_timeout_is_refused() {
    for t in ["0", "0s", "0ms"] {
        let o = wisp()
            .args(["run", "--timeout", t])
            .arg(hello())
            .output()
            .expect("wisp");
        assert_eq!(status(&o), 2, "--timeout {t}: {}", stderr(&o));
        assert!(stderr(&o).contains("positive duration"), "{}", stderr(&o));
    }
}

#[test]
fn run_help_describes_every_argument_and_the_exit_statuses() {
    let o = wisp().args(["run", "--help"]).output().expect("wisp");
    assert!(o.status.success());
    let help = stdout(&o);
    let image_line = help
        .lines()
        .find(|l| l.trim_start().starts_with("<IMAGE>"))
        .expect("IMAGE listed");
    assert!(image_line.contains("wisp build"), "{image_line}");
    for needle in [
        "/udp",
        "ip=dhcp",
        "dns=",
        "-q, --quiet",
        "no informational lines from wisp",
        "Exit status:",
    ] {
        assert!(help.contains(needle), "'{needle}' missing from:\n{help}");
    }
    let statuses = &help[help.find("Exit status:").unwrap()..];
    for status in ["0-255", "101", "124", "125", "139"] {
        assert!(statuses.contains(status), "{status} missing: {statuses}");
    }
}

#[test]
fn quiet_run_leaves_the_guest_output_alone() {
    let o = run(hello(), &["-q"], &["q"]);
    assert_eq!(status(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "Hello from Wisp! args: [\"q\"]\n");
    assert_eq!(stderr(&o), "");
}

/// A network namespace of this test's own, removed when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn a_tap_that_does_not_exist_is_refused_not_created() {
    require_kvm();
    let ns = Netns(format!("wisp-{}-notap", std::process::id()));
    let o = std::process::Command::new("ip")
        .args(["netns", "add", &ns.0])
        .output()
        .expect("run ip (iproute2)");
    assert!(o.status.success(), "ip netns add: {}", stderr(&o));
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", ns.0))
        .arg(env!("CARGO_BIN_EXE_wisp"))
        .args(["run", "--net", "tap:nosuch0"])
        .arg(hello());
    let o = output_within(cmd, std::time::Duration::from_secs(60));
    assert_clean_error(&o, "there is no interface 'nosuch0'");
    let links = std::process::Command::new("ip")
        .args(["-n", &ns.0, "-o", "link"])
        .output()
        .expect("ip link");
    assert!(!stdout(&links).contains("nosuch0"), "{}", stdout(&links));
}

/// Runs a binary this test has just written. Another test thread that
/// forks while the copy's file is still open for writing holds that
/// descriptor until its child execs, and exec of the copy meanwhile fails
/// with ETXTBSY ("Text file busy"): retried, as that window is short.
fn output_of_copied_binary(cmd: &mut std::process::Command) -> std::process::Output {
    for _ in 0..100 {
        match cmd.output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            r => return r.expect("run the copied wisp"),
        }
    }
    panic!("the copied wisp stayed busy (ETXTBSY) for 2 s");
}
