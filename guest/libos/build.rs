//! Puts the guest linker script on the link search path of every crate that
//! depends on the library OS, so `-Twisp.ld` (added by `wisp build`) finds it
//! whatever directory the application lives in.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::copy("wisp.ld", out.join("wisp.ld")).expect("copy wisp.ld to OUT_DIR");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=wisp.ld");
}
