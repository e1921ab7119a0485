//! `wisp build`: compile any application crate into a Wisp image.
//!
//! Applications are ordinary `no_std` binary crates that depend on the
//! library OS. What makes them bootable is only how they are linked, so
//! that lives here, in one place: a static, non-PIE, freestanding link with
//! the library OS's linker script (`wisp.ld`, put on the search path by the
//! library OS's build script), for the stable `x86_64-unknown-linux-gnu`
//! target (no nightly, no `-Zbuild-std`). Rust flags are passed with
//! `--target`, so they apply to the image and not to build scripts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// The target every Wisp image is built for.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Rust flags of a Wisp image.
pub const RUSTFLAGS: &[&str] = &[
    "-C",
    "relocation-model=static",
    "-C",
    "link-arg=-nostartfiles",
    "-C",
    "link-arg=-nostdlib",
    "-C",
    "link-arg=-static",
    "-C",
    "link-arg=-no-pie",
    "-C",
    "link-arg=-Twisp.ld",
    "-C",
    "link-arg=-Wl,--gc-sections",
    "-C",
    "link-arg=-Wl,-z,max-page-size=4096",
    "-C",
    "link-arg=-Wl,--build-id=none",
    // No symbol table in the image: nothing reads it (crash reports give
    // addresses; `wisp inspect` reads sections), and it is a sixth of a
    // small image.
    "-C",
    "strip=symbols",
];

/// Builds the crate in `app_dir`; returns the image path.
pub fn build(app_dir: &Path, output: Option<&Path>) -> anyhow::Result<PathBuf> {
    let manifest = app_dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!(
            "{} has no Cargo.toml: not an application crate directory",
            app_dir.display()
        );
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    check_uses_libos(&cargo, app_dir, &manifest)?;
    let dest = match output {
        Some(out) => {
            // `-o DIR/x.wisp` makes DIR, as `cargo build` makes `target/`.
            if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            Some(out.to_path_buf())
        }
        None => None,
    };
    let child = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "--message-format=json-render-diagnostics",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["--config", "profile.release.panic=\"abort\""])
        .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS.join("\x1f"))
        .env_remove("RUSTFLAGS")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", Path::new(&cargo).display()))?;
    let out = child.wait_with_output().context("waiting for cargo")?;

    let mut executables = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" {
            if let Some(exe) = msg["executable"].as_str() {
                executables.push((
                    msg["target"]["name"].as_str().unwrap_or("app").to_string(),
                    PathBuf::from(exe),
                ));
            }
        }
    }
    if !out.status.success() {
        bail!("cargo build failed for {}", app_dir.display());
    }
    let (name, exe) = match executables.as_slice() {
        [one] => one.clone(),
        [] => bail!(
            "{} built no binary: an application needs a src/main.rs",
            app_dir.display()
        ),
        _ => bail!(
            "{} has several binaries; Wisp builds one application per crate",
            app_dir.display()
        ),
    };
    let dest = dest.unwrap_or_else(|| PathBuf::from(format!("{name}.wisp")));
    std::fs::copy(&exe, &dest).with_context(|| format!("writing {}", dest.display()))?;
    let image = wisp_monitor::Image::from_file(&dest).with_context(|| {
        format!(
            "{} was built but is not a Wisp image (does the crate use wisp::main!?)",
            dest.display()
        )
    })?;
    eprintln!(
        "wisp: built {} ({} bytes, entry {:#x})",
        dest.display(),
        image.bytes().len(),
        image.entry
    );
    Ok(dest)
}

/// The package the library OS is (its `links` key): what every application
/// depends on, directly or through another library.
const LIBOS_LINKS: &str = "wisp";

/// Refuses, in one line, a crate that does not use the library OS (or a
/// directory holding a workspace rather than one application): linked with
/// Wisp's settings it would fail with a page of linker command line.
///
/// A direct dependency on `wisp` is read from the manifest alone (fast);
/// only without one is the dependency graph resolved, to find the library
/// OS behind another library. If cargo cannot read the crate at all, the
/// build itself reports why.
fn check_uses_libos(
    cargo: &std::ffi::OsStr,
    app_dir: &Path,
    manifest: &Path,
) -> anyhow::Result<()> {
    let Some(meta) = metadata(cargo, manifest, true) else {
        return Ok(());
    };
    let want = manifest.canonicalize().ok();
    let Some(package) = meta["packages"].as_array().and_then(|ps| {
        ps.iter().find(|p| {
            p["manifest_path"]
                .as_str()
                .and_then(|m| Path::new(m).canonicalize().ok())
                == want
        })
    }) else {
        bail!(
            "{} holds a workspace, not an application crate: give the directory of one application",
            app_dir.display()
        );
    };
    let direct = package["dependencies"].as_array().is_some_and(|deps| {
        deps.iter()
            .any(|d| d["name"] == LIBOS_LINKS && d["kind"].is_null())
    });
    if direct {
        return Ok(());
    }
    let Some(full) = metadata(cargo, manifest, false) else {
        return Ok(());
    };
    if !reaches_libos(&full, package["id"].as_str().unwrap_or_default()) {
        bail!(
            "{} does not use the Wisp library OS (no dependency on `wisp`): an application depends on it and calls wisp::main! (`wisp new NAME` makes one)",
            app_dir.display()
        );
    }
    Ok(())
}

/// `cargo metadata` for `manifest` (without resolving dependencies if
/// `no_deps`), or `None` if cargo could not produce it.
fn metadata(cargo: &std::ffi::OsStr, manifest: &Path, no_deps: bool) -> Option<serde_json::Value> {
    let mut cmd = Command::new(cargo);
    cmd.args(["metadata", "--format-version", "1"])
        .arg("--manifest-path")
        .arg(manifest);
    if no_deps {
        cmd.arg("--no-deps");
    } else {
        cmd.args(["--filter-platform", TARGET]);
    }
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Whether the package `root` depends, through normal dependencies, on the
/// library OS in the resolved graph `meta`.
fn reaches_libos(meta: &serde_json::Value, root: &str) -> bool {
    let empty = Vec::new();
    let packages = meta["packages"].as_array().unwrap_or(&empty);
    let is_libos = |id: &str| {
        packages
            .iter()
            .any(|p| p["id"] == id && p["links"] == LIBOS_LINKS)
    };
    let nodes = meta["resolve"]["nodes"].as_array().unwrap_or(&empty);
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![root.to_string()];
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        if id != root && is_libos(&id) {
            return true;
        }
        let Some(node) = nodes.iter().find(|n| n["id"] == id.as_str()) else {
            continue;
        };
        for dep in node["deps"].as_array().unwrap_or(&empty) {
            let normal = dep["dep_kinds"]
                .as_array()
                .is_some_and(|ks| ks.iter().any(|k| k["kind"].is_null()));
            if let (true, Some(pkg)) = (normal, dep["pkg"].as_str()) {
                todo.push(pkg.to_string());
            }
        }
    }
    false
}
