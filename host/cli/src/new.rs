//! `wisp new`: a new application crate that builds out of the box.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Where the library OS lives: `$WISP_LIBOS`; else the checkout this
/// `wisp` binary was built in, found from the binary's own path (so a moved
/// checkout still finds its library OS); else the checkout it was compiled
/// from.
fn libos_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("WISP_LIBOS") {
        let p = PathBuf::from(p);
        return p
            .canonicalize()
            .with_context(|| format!("WISP_LIBOS={} is not a library OS directory", p.display()));
    }
    let beside_exe = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .map(|dir| dir.join("guest/libos"))
            .find(|libos| is_libos(libos))
    });
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/libos");
    let found = beside_exe.unwrap_or(built_in);
    found.canonicalize().with_context(|| {
        format!(
            "cannot find the Wisp library OS at {}; set WISP_LIBOS",
            found.display()
        )
    })
}

/// Whether `dir` holds the library OS crate (its linker script is unique
/// to it).
fn is_libos(dir: &Path) -> bool {
    dir.join("Cargo.toml").is_file() && dir.join("wisp.ld").is_file()
}

/// The checkout holding the library OS, if it is the usual `guest/libos`
/// of one: the parent of the guest workspace.
fn checkout_of(libos: &Path) -> Option<&Path> {
    let guest = libos.parent()?;
    guest
        .join("Cargo.toml")
        .is_file()
        .then_some(guest.parent()?)
}

/// The path from directory `from` to `to`, both absolute and canonical.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for c in &to[common..] {
        rel.push(c);
    }
    rel
}

/// How the new crate at `dir` (canonical) names the library OS: relative
/// when the crate lives inside the library OS's checkout, so that moving
/// or cloning the checkout moves the dependency with it; absolute
/// otherwise, so that moving the crate alone keeps it.
fn libos_dependency(dir: &Path, libos: &Path) -> PathBuf {
    match checkout_of(libos) {
        Some(checkout) if dir.starts_with(checkout) => relative(dir, libos),
        _ => libos.to_path_buf(),
    }
}

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
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
    let abs_dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let dependency = libos_dependency(&abs_dir, &libos);
    let dependency = dependency
        .to_str()
        .with_context(|| format!("{} is not a UTF-8 path", dependency.display()))?;
    let cargo_toml = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"

[dependencies]
wisp = {{ path = {libos} }}

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
        libos = toml_string(dependency)
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
    // The library OS's own workspace lock: the first build uses the
    // versions the library OS is built and tested with instead of
    // resolving afresh (cargo drops the entries the crate does not need).
    let lock = libos.parent().map(|guest| guest.join("Cargo.lock"));
    match lock.filter(|l| l.is_file()) {
        Some(lock) => {
            std::fs::copy(&lock, dir.join("Cargo.lock"))
                .with_context(|| format!("copying {}", lock.display()))?;
        }
        None => eprintln!(
            "wisp: note: no Cargo.lock beside the library OS at {}; the first build resolves versions",
            libos.display()
        ),
    }
    eprintln!(
        "wisp: created {} (build it with: wisp build {})",
        dir.display(),
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        let r = |a: &str, b: &str| relative(Path::new(a), Path::new(b));
        assert_eq!(
            r("/w/apps/x", "/w/guest/libos"),
            Path::new("../../guest/libos")
        );
        assert_eq!(r("/w/x", "/w/guest/libos"), Path::new("../guest/libos"));
        assert_eq!(r("/w", "/w/guest/libos"), Path::new("guest/libos"));
        assert_eq!(r("/a/b", "/c"), Path::new("../../c"));
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string("../guest/libos"), "\"../guest/libos\"");
        assert_eq!(toml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(toml_string("a\tb"), "\"a\\u0009b\"");
    }
}
