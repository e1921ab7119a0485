//! Image validation: one valid image and one test per way to be malformed.

use crate::image::*;
use crate::testing::{elf, valid_elf, valid_parts, Seg, DATA, TEXT};

fn err(bytes: Vec<u8>) -> ImageError {
    Image::parse(bytes).expect_err("image should be refused")
}

#[test]
fn valid_image_parses() {
    let img = Image::parse(valid_elf()).expect("valid");
    assert_eq!(img.entry, TEXT);
    assert_eq!(img.segments.len(), 2);
    assert_eq!(img.start(), TEXT);
    assert_eq!(img.end(), DATA + 0x10000);
    assert!(img.segments[0].perms.exec && !img.segments[0].perms.write);
}

#[test]
fn empty_and_not_elf() {
    assert!(matches!(err(vec![]), ImageError::Empty));
    assert!(matches!(
        err(b"#!/bin/sh\necho hi\n".to_vec()),
        ImageError::NotElf
    ));
}

#[test]
fn truncated() {
    let full = valid_elf();
    assert!(matches!(
        err(full[..40].to_vec()),
        ImageError::TruncatedHeader(40)
    ));
    assert!(matches!(
        err(full[..100].to_vec()),
        ImageError::BadProgramHeaders(_)
    ));
    // Headers intact, segment data cut off.
    assert!(matches!(
        err(full[..4096 + 100].to_vec()),
        ImageError::SegmentOutsideFile { .. }
    ));
}

#[test]
fn wrong_class_endianness_machine_type() {
    let mut b = valid_elf();
    b[4] = 1;
    assert!(matches!(err(b), ImageError::Not64Bit));
    let mut b = valid_elf();
    b[5] = 2;
    assert!(matches!(err(b), ImageError::NotLittleEndian));
    let mut b = valid_elf();
    b[18..20].copy_from_slice(&183u16.to_le_bytes());
    assert!(matches!(err(b), ImageError::WrongMachine(183, "aarch64")));
    let mut b = valid_elf();
    b[16..18].copy_from_slice(&3u16.to_le_bytes());
    assert!(matches!(err(b), ImageError::NotExecutable(_)));
}

#[test]
fn entry_outside_code() {
    let (_, segs, m) = valid_parts();
    assert!(matches!(
        err(elf(0xdead_0000, &segs, Some(m))),
        ImageError::EntryOutsideCode(0xdead_0000)
    ));
    // Inside a loaded but non-executable segment is refused too.
    assert!(matches!(
        err(elf(DATA, &segs, Some(m))),
        ImageError::EntryOutsideCode(_)
    ));
}

#[test]
fn segment_over_boot_area() {
    let (entry, mut segs, m) = valid_parts();
    segs.push(Seg {
        vaddr: 0x1000,
        memsz: 4096,
        flags: 4,
        data: vec![],
    });
    assert!(matches!(
        err(elf(entry, &segs, Some(m))),
        ImageError::SegmentBelowMinimum { addr: 0x1000, .. }
    ));
}

#[test]
fn huge_memsz_and_overflow() {
    let (entry, mut segs, m) = valid_parts();
    segs[1].memsz = u64::MAX - 0x1000;
    assert!(matches!(
        err(elf(entry, &segs, Some(m))),
        ImageError::SegmentOverflow { .. }
    ));
}

#[test]
fn overlapping_segments() {
    let (entry, mut segs, m) = valid_parts();
    segs.push(Seg {
        vaddr: DATA + 0x1000,
        memsz: 4096,
        flags: 4,
        data: vec![],
    });
    assert!(matches!(
        err(elf(entry, &segs, Some(m))),
        ImageError::SegmentsOverlap(..)
    ));
}

#[test]
fn writable_and_executable() {
    let (entry, mut segs, m) = valid_parts();
    segs[0].flags = 7;
    assert!(matches!(
        err(elf(entry, &segs, Some(m))),
        ImageError::WritableAndExecutable(0)
    ));
}

#[test]
fn file_size_over_mem_size() {
    let (entry, mut segs, m) = valid_parts();
    segs[1].memsz = 16;
    assert!(matches!(
        err(elf(entry, &segs, Some(m))),
        ImageError::FileSizeExceedsMemSize { .. }
    ));
}

#[test]
fn unaligned_segment() {
    let (entry, mut segs, m) = valid_parts();
    segs[1].vaddr += 8;
    assert!(matches!(
        err(elf(entry, &segs, Some(m))),
        ImageError::SegmentUnaligned { .. }
    ));
}

#[test]
fn manifest_missing_mismatched_or_pointing_outside() {
    let (entry, segs, mut m) = valid_parts();
    assert!(matches!(
        err(elf(entry, &segs, None)),
        ImageError::NoManifest
    ));
    m.abi_version = 99;
    assert!(matches!(
        err(elf(entry, &segs, Some(m))),
        ImageError::AbiMismatch { image: 99, .. }
    ));
    let (_, _, mut m) = valid_parts();
    m.exception_vectors = DATA; // writable: refused
    assert!(matches!(
        err(elf(entry, &segs, Some(m))),
        ImageError::ManifestAddress { .. }
    ));
    let (_, _, mut m) = valid_parts();
    m.stack_top = 0x4000_0000;
    assert!(matches!(
        err(elf(entry, &segs, Some(m))),
        ImageError::ManifestAddress { .. }
    ));
}

#[test]
fn too_many_program_headers() {
    let mut b = valid_elf();
    b[56..58].copy_from_slice(&1000u16.to_le_bytes());
    assert!(matches!(err(b), ImageError::BadProgramHeaders(_)));
}

#[test]
fn notes_iterator_stops_on_garbage() {
    let garbage = [0xffu8; 40];
    assert_eq!(NoteIter::new(&garbage).count(), 0);
    assert_eq!(NoteIter::new(&[]).count(), 0);
}
