//! Layout and page-table properties: what the guest can and cannot touch.

use crate::image::Image;
use crate::layout::{Layout, LayoutError};
use crate::paging::{self, page_flags, SUPERVISOR_DATA, USER_DATA, USER_RODATA};
use crate::testing::{elf, valid_elf, valid_parts, Seg, DATA, TEXT};
use wisp_abi::x86::pte;

fn image() -> Image {
    Image::parse(valid_elf()).expect("valid")
}

#[test]
fn memory_too_small_or_large_or_unaligned() {
    let (entry, mut segs, m) = valid_parts();
    segs.push(Seg {
        vaddr: 0x800_0000,
        memsz: 4096,
        flags: 6,
        data: vec![],
    });
    let big = Image::parse(elf(entry, &segs, Some(m))).expect("valid image");
    match Layout::new(&big, 64 << 20, 0) {
        Err(LayoutError::MemoryTooSmall { needed, .. }) => assert_eq!(needed, 0x800_1000),
        other => panic!("expected MemoryTooSmall, got {other:?}"),
    }
    assert!(Layout::new(&big, 256 << 20, 0).is_ok());
    assert!(matches!(
        Layout::new(&image(), 1 << 20, 0),
        Err(LayoutError::MemoryTooSmall { .. })
    ));
    assert!(matches!(
        Layout::new(&image(), 4 << 30, 0),
        Err(LayoutError::MemoryTooLarge(_))
    ));
    assert!(matches!(
        Layout::new(&image(), (2 << 20) + 5, 0),
        Err(LayoutError::MemoryUnaligned(_))
    ));
    assert!(matches!(
        Layout::new(&image(), 64 << 20, 1 << 20),
        Err(LayoutError::ArgsTooLong(_))
    ));
}

#[test]
fn boots_in_two_mib() {
    let l = Layout::new(&image(), 2 << 20, 100).expect("fits");
    assert!(l.boot_area_end <= TEXT);
    let free: u64 = l.free.iter().map(|f| f.1).sum();
    assert!(free > 1 << 20, "most of 2 MiB is left for the heap: {free}");
}

#[test]
fn page_permissions() {
    let img = image();
    let l = Layout::new(&img, 64 << 20, 10).expect("fits");
    assert_eq!(page_flags(&l, &img, 0), 0, "null page unmapped");
    assert_eq!(page_flags(&l, &img, l.pml4), SUPERVISOR_DATA);
    assert_eq!(page_flags(&l, &img, l.gdt), SUPERVISOR_DATA);
    assert_eq!(page_flags(&l, &img, l.idt), SUPERVISOR_DATA);
    assert_eq!(page_flags(&l, &img, l.tss), SUPERVISOR_DATA);
    assert_eq!(page_flags(&l, &img, l.boot_page), USER_RODATA);
    assert_eq!(page_flags(&l, &img, l.args), USER_RODATA);
    let text = page_flags(&l, &img, TEXT);
    assert!(text & pte::USER != 0 && text & pte::WRITABLE == 0 && text & pte::NO_EXECUTE == 0);
    assert_eq!(
        page_flags(&l, &img, TEXT + 0x1000),
        0,
        "hole between segments is a guard page"
    );
    let data = page_flags(&l, &img, DATA);
    assert!(data & pte::WRITABLE != 0 && data & pte::NO_EXECUTE != 0);
    assert_eq!(page_flags(&l, &img, l.image_end), USER_DATA);
    assert_eq!(page_flags(&l, &img, 64 << 20), 0, "nothing beyond memory");
}

#[test]
fn tables_map_huge_pages_outside_the_image() {
    let img = image();
    let l = Layout::new(&img, 64 << 20, 0).expect("fits");
    let tables = paging::build(&l, &img);
    let pd = tables
        .iter()
        .find(|t| t.addr == l.pd_base)
        .expect("page directory");
    assert_eq!(pd.entries[0] & pte::HUGE, 0, "first 2 MiB uses 4 KiB pages");
    assert_eq!(pd.entries[1], (2 << 20) | USER_DATA | pte::HUGE);
    assert_eq!(pd.entries[32], 0, "no mapping past 64 MiB");
    let pt = tables
        .iter()
        .find(|t| t.addr == l.pt_base)
        .expect("page table");
    assert_eq!(pt.entries[0], 0);
    assert_eq!(pt.entries[(TEXT / 4096) as usize] & pte::ADDR_MASK, TEXT);
}

#[test]
fn reserved_table_pages_are_exactly_the_tables_built() {
    let img = image();
    for (mem, devices) in [(2 << 20, false), (64 << 20, true), (3 << 30, true)] {
        let l = Layout::with_devices(&img, mem, 100, devices).expect("fits");
        let tables = paging::build(&l, &img);
        assert_eq!(tables.len() as u64 * 4096, l.gdt - l.pml4, "{mem:#x}");
        assert_eq!(tables.last().map(|t| t.addr + 4096), Some(l.gdt));
        assert_eq!(l.mmio_pd.is_some(), devices);
        assert_eq!(l.map().page_flags(crate::devices::MMIO_BASE) != 0, devices);
    }
}
