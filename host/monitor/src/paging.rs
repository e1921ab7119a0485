//! The guest's page tables, built once by the monitor before entry.
//!
//! A CPL3 guest can neither reload CR3 nor `invlpg` (pvm-costs.md), so these
//! mappings are final: they are where the security properties live (text
//! RX, data NX, guard pages and the null page unmapped, system structures
//! supervisor-only). Every level carries U/S=1 so the leaf decides.

use wisp_abi::x86::pte;

use crate::image::Image;
use crate::layout::{Layout, HUGE_PAGE, PAGE};

const TABLE: u64 = pte::PRESENT | pte::WRITABLE | pte::USER;
/// Free memory: user read-write, never executable.
pub const USER_DATA: u64 = pte::PRESENT | pte::WRITABLE | pte::USER | pte::NO_EXECUTE;
/// Page tables, GDT, IDT, TSS: reachable by the CPU, not by CPL3 code.
pub const SUPERVISOR_DATA: u64 = pte::PRESENT | pte::WRITABLE | pte::NO_EXECUTE;
/// Device registers: user read-write, never executable, uncached.
pub const USER_MMIO: u64 = pte::PRESENT | pte::WRITABLE | pte::USER | pte::NO_EXECUTE | PCD | PWT;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
/// Boot page and arguments: user read-only.
pub const USER_RODATA: u64 = pte::PRESENT | pte::USER | pte::NO_EXECUTE;

/// One 4 KiB table and the guest-physical address it goes to.
pub struct Table {
    pub addr: u64,
    pub entries: Box<[u64; 512]>,
}

impl Table {
    fn new(addr: u64) -> Table {
        Table {
            addr,
            entries: Box::new([0; 512]),
        }
    }

    /// The table as bytes for writing into guest memory.
    pub fn bytes(&self) -> Vec<u8> {
        self.entries.iter().flat_map(|e| e.to_le_bytes()).collect()
    }
}

/// Leaf flags of the 4 KiB page at `addr` (0 = not mapped).
pub fn page_flags(layout: &Layout, image: &Image, addr: u64) -> u64 {
    if addr == 0 || addr >= layout.mem_size {
        0
    } else if addr < layout.system_end {
        SUPERVISOR_DATA
    } else if addr < layout.boot_area_end {
        USER_RODATA
    } else if addr < layout.image_start || addr >= layout.image_end {
        USER_DATA
    } else {
        match image
            .segments
            .iter()
            .find(|s| addr >= s.addr && addr < s.end_page())
        {
            None => 0, // a hole between segments: guard page
            Some(s) => {
                let mut f = pte::PRESENT | pte::USER;
                if s.perms.write {
                    f |= pte::WRITABLE;
                }
                if !s.perms.exec {
                    f |= pte::NO_EXECUTE;
                }
                f
            }
        }
    }
}

/// Builds every table for `layout` (PML4, PDPT, page directories, page
/// tables), addressed as the layout says.
pub fn build(layout: &Layout, image: &Image) -> Vec<Table> {
    let mut pml4 = Table::new(layout.pml4);
    let mut pdpt = Table::new(layout.pdpt);
    pml4.entries[0] = layout.pdpt | TABLE;
    let mut pds: Vec<Table> = (0..layout.pd_count)
        .map(|i| Table::new(layout.pd_base + i * PAGE))
        .collect();
    for (i, pd) in pds.iter().enumerate() {
        pdpt.entries[i] = pd.addr | TABLE;
    }
    let regions = layout.mem_size.div_ceil(HUGE_PAGE);
    for r in 0..regions {
        let (pd, slot) = ((r / 512) as usize, (r % 512) as usize);
        pds[pd].entries[slot] = (r * HUGE_PAGE) | USER_DATA | pte::HUGE;
    }
    let mut pts = Vec::with_capacity(layout.pt_regions.len());
    for (i, &r) in layout.pt_regions.iter().enumerate() {
        let mut pt = Table::new(layout.pt_base + i as u64 * PAGE);
        for (p, entry) in pt.entries.iter_mut().enumerate() {
            let addr = r * HUGE_PAGE + p as u64 * PAGE;
            let flags = page_flags(layout, image, addr);
            *entry = if flags == 0 { 0 } else { addr | flags };
        }
        pds[(r / 512) as usize].entries[(r % 512) as usize] = pt.addr | TABLE;
        pts.push(pt);
    }
    if let Some(addr) = layout.mmio_pd {
        // The 2 MiB window holding every device's registers, in the 4th GiB.
        let mut pd = Table::new(addr);
        let base = crate::devices::MMIO_BASE;
        pd.entries[((base >> 21) & 511) as usize] = base | USER_MMIO | pte::HUGE;
        pdpt.entries[(base >> 30) as usize] = addr | TABLE;
        pts.push(pd);
    }
    let mut all = vec![pml4, pdpt];
    all.extend(pds);
    all.extend(pts);
    all
}
