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
    let dest = output
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("{name}.wisp")));
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
