//! The guest's page tables, built once by the monitor before entry.
//!
//! A CPL3 guest can neither reload CR3 nor `invlpg` (pvm-costs.md), so these
//! mappings are final: they are where the security properties live (text
//! RX, data NX, guard pages and the null page unmapped, system structures
//! supervisor-only). The policy and the table builder are
//! [`wisp_abi::memmap`]'s, shared with the guest's PVH start code, so the
//! guest gets the same protections under every monitor; this module only
//! places the tables where [`Layout`] says.

use wisp_abi::memmap::Kind;

use crate::image::Image;
use crate::layout::{Layout, PAGE};

/// Free memory: user read-write, never executable.
pub const USER_DATA: u64 = Kind::Data.pte_flags();
/// Page tables, GDT, IDT, TSS: reachable by the CPU, not by CPL3 code.
pub const SUPERVISOR_DATA: u64 = Kind::System.pte_flags();
/// Device registers: user read-write, never executable, uncached.
pub const USER_MMIO: u64 = Kind::DeviceMmio.pte_flags();
/// Boot page and arguments: user read-only.
pub const USER_RODATA: u64 = Kind::BootData.pte_flags();

/// One 4 KiB table and the guest-physical address it goes to.
pub struct Table {
    pub addr: u64,
    pub entries: Box<[u64; 512]>,
}

impl Table {
    /// The table as bytes for writing into guest memory.
    pub fn bytes(&self) -> Vec<u8> {
        self.entries.iter().flat_map(|e| e.to_le_bytes()).collect()
    }
}

/// Leaf flags of the 4 KiB page at `addr` (0 = not mapped).
pub fn page_flags(layout: &Layout, _image: &Image, addr: u64) -> u64 {
    layout.map().page_flags(addr)
}

/// Builds every table for `layout` (PML4, PDPT, page directories, page
/// tables), addressed as the layout says.
pub fn build(layout: &Layout, _image: &Image) -> Vec<Table> {
    let map = layout.map();
    let mut pages = vec![[0u64; 512]; map.tables_needed()];
    // The layout validated this map and reserved exactly this many pages.
    let used = map.build(layout.pml4, &mut pages).unwrap_or(0);
    pages
        .into_iter()
        .take(used)
        .enumerate()
        .map(|(i, entries)| Table {
            addr: layout.pml4 + i as u64 * PAGE,
            entries: Box::new(entries),
        })
        .collect()
}
