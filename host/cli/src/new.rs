//! `wisp new`: a new application crate that builds out of the box.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Where the library OS lives: `$WISP_LIBOS`, else this checkout's
/// `guest/libos`.
fn libos_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("WISP_LIBOS") {
        return Ok(PathBuf::from(p));
    }
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/libos");
    built_in.canonicalize().with_context(|| {
        format!(
            "cannot find the Wisp library OS at {}; set WISP_LIBOS",
            built_in.display()
        )
    })
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub fn new(name: &str, path: Option<&Path>) -> anyhow::Result<()> {
    if !valid_name(name) {
        bail!("'{name}' is not a valid crate name (letters, digits, '-' and '_', starting with a letter)");
    }
    let dir = path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let libos = libos_path()?;
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let cargo_toml = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"

[dependencies]
wisp = {{ path = "{libos}" }}

# Wisp images abort on panic, and are small and fast when optimised whole.
[profile.release]
panic = "abort"
opt-level = "s"
lto = true
codegen-units = 1

[profile.dev]
panic = "abort"

# A unikernel is its own workspace.
[workspace]
"#,
        libos = libos.display()
    );
    let main_rs = format!(
        r#"//! {name}: a Wisp unikernel. Build with `wisp build .`, run with
//! `wisp run {name}.wisp -- ARGS`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

wisp::main!(main);

fn main(args: wisp::Args) -> i32 {{
    let args: Vec<&str> = args.collect();
    wisp::println!("Hello from {name}! args: {{:?}}", args);
    0
}}
"#
    );
    std::fs::write(dir.join("Cargo.toml"), cargo_toml)?;
    std::fs::write(dir.join("src/main.rs"), main_rs)?;
    std::fs::write(dir.join(".gitignore"), "/target\n*.wisp\n")?;
    eprintln!(
        "wisp: created {} (build it with: wisp build {})",
        dir.display(),
        dir.display()
    );
    Ok(())
}
