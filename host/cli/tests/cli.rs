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
