//! Malformed images given to `wisp run` and `wisp inspect`: each is refused
//! with one clear line and status 125, and nothing is run.

mod common;

use common::*;
use std::path::PathBuf;

fn variant(name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(hello()).expect("hello image");
    edit(&mut bytes);
    let path = scratch().join(format!("bad-{name}.wisp"));
    std::fs::write(&path, bytes).expect("write variant");
    path
}

fn refused(name: &str, edit: impl FnOnce(&mut Vec<u8>), needle: &str) {
    let img = variant(name, edit);
    let o = run(&img, &[], &[]);
    assert_clean_error(&o, needle);
    assert!(stdout(&o).is_empty(), "{name}: nothing ran");
    let mut inspect = wisp();
    inspect.arg("inspect").arg(&img);
    assert_clean_error(&inspect.output().expect("inspect"), needle);
}

/// Offset of program header `i`'s field at `field` in the hello image.
fn phdr(bytes: &[u8], i: usize, field: usize) -> usize {
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().unwrap()) as usize;
    phoff + 56 * i + field
}

#[test]
fn not_elf() {
    refused(
        "text",
        |b| *b = b"just some text\n".to_vec(),
        "not an ELF file",
    );
}

#[test]
fn zero_length() {
    refused("empty", |b| b.clear(), "image is empty");
}

#[test]
fn truncated() {
    refused(
        "trunc-header",
        |b| b.truncate(30),
        "ELF header is truncated",
    );
    refused("trunc-body", |b| b.truncate(5000), "outside the");
}

#[test]
fn thirty_two_bit() {
    refused("elf32", |b| b[4] = 1, "not a 64-bit ELF");
}

#[test]
fn wrong_machine() {
    refused(
        "arm",
        |b| b[18..20].copy_from_slice(&183u16.to_le_bytes()),
        "not x86-64",
    );
}

#[test]
fn entry_outside() {
    refused(
        "entry",
        |b| b[24..32].copy_from_slice(&0x4000_0000u64.to_le_bytes()),
        "entry point 0x40000000",
    );
}

#[test]
fn huge_memsz() {
    refused(
        "huge",
        |b| {
            let at = phdr(b, 0, 40);
            b[at..at + 8].copy_from_slice(&0xffff_ffff_ffff_0000u64.to_le_bytes());
        },
        "overflows",
    );
}

#[test]
fn segment_over_the_boot_page() {
    refused(
        "lowseg",
        |b| {
            for field in [16, 24] {
                let at = phdr(b, 1, field);
                b[at..at + 8].copy_from_slice(&0x1000u64.to_le_bytes());
            }
        },
        "reserved for the monitor's boot structures",
    );
}

#[test]
fn segment_outside_memory() {
    // The last segment (the exception stack) grown to 64 MiB does not fit
    // in --memory 16M.
    let img = variant("bigstack", |b| {
        let at = phdr(b, 5, 40);
        b[at..at + 8].copy_from_slice(&(64u64 << 20).to_le_bytes());
    });
    let o = run(&img, &["--memory", "16M"], &[]);
    assert_clean_error(&o, "is too small: this image needs at least");
}

#[test]
fn not_a_wisp_image() {
    // A well-formed ELF executable that is not a Wisp image: any static
    // binary with no manifest (the test builds one from the hello image by
    // renaming the note).
    refused(
        "nonote",
        |b| {
            let pos = b
                .windows(5)
                .position(|w| w == b"Wisp\0")
                .expect("note name");
            b[pos] = b'X';
        },
        "no Wisp manifest note",
    );
}

#[test]
fn missing_file_and_directory() {
    let o = run(&scratch().join("does-not-exist.wisp"), &[], &[]);
    assert_clean_error(&o, "No such file");
    let o = run(&scratch(), &[], &[]);
    assert_clean_error(&o, "not a regular file");
}
