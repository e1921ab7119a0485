//! The guest's memory map: the one description of what the CPL3 guest may
//! read, write and execute, and the page tables that enforce it.
//!
//! Every monitor builds the guest's page tables from a [`Map`] with
//! [`Map::build`]: the Wisp monitor on the host before entry
//! (`host/monitor/src/paging.rs`), and the guest's own PVH start code
//! under QEMU or Firecracker (`guest/libos/src/platform/pvh.rs`, at CPL3
//! before the tables are locked). Where things are differs by monitor; what
//! each kind of memory may be used for is decided only here, by [`Kind`]:
//!
//! | kind | holds | CPL3 access |
//! |---|---|---|
//! | [`Kind::Unmapped`] | null page, guard pages, holes, anything not RAM | none |
//! | [`Kind::System`] | page tables, GDT, IDT, TSS, the CPL0 stack | none (supervisor read-write) |
//! | [`Kind::BootData`] | boot page, arguments, what the loader left below the image | read |
//! | [`Kind::Text`] | code | read, execute |
//! | [`Kind::ReadOnly`] | read-only data | read |
//! | [`Kind::Data`] | data, bss, stacks, heap; RAM that nothing else claims | read, write |
//! | [`Kind::DeviceMmio`] | virtio register windows | read, write (uncached) |
//! | [`Kind::SystemMmio`] | interrupt controllers (IOAPIC, LAPIC) | none (supervisor, uncached) |
//!
//! Nothing is both writable and executable, and the tables themselves are
//! [`Kind::System`], so the CPL3 guest cannot change its own mappings (it
//! cannot reload CR3 or `invlpg` either). Devices are held to the same map:
//! a device may write guest memory only where [`Kind::user_writable`] holds.
//!
//! Tables are built with 2 MiB pages wherever a whole 2 MiB region has one
//! kind (on KVM PVM each first touch of a page is a shadow fault, so fewer,
//! bigger pages are cheaper) and 4 KiB pages elsewhere.

use crate::x86::pte;

/// 4 KiB.
pub const PAGE: u64 = 4096;
/// 2 MiB, the size of a page-directory leaf.
pub const HUGE_PAGE: u64 = 2 << 20;
/// 1 GiB, what one page directory maps.
pub const GIB: u64 = 1 << 30;
/// Addresses the tables can map (more than any Wisp guest uses: the Wisp
/// monitor gives at most 3 GiB, the PVH start code uses RAM below 4 GiB).
pub const ADDRESS_LIMIT: u64 = 64 * GIB;

const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
/// Flags of every non-leaf entry: permissive, so that the leaf decides.
const TABLE: u64 = pte::PRESENT | pte::WRITABLE | pte::USER;

/// What a page of guest memory is for. Its mapping follows from this alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Not mapped at all.
    Unmapped,
    /// Reachable by the CPU (and CPL0 code) only: supervisor read-write, NX.
    System,
    /// Left by the monitor or loader for the guest to read: user read-only, NX.
    BootData,
    /// Code: user read and execute, never writable.
    Text,
    /// Read-only data: user read, NX.
    ReadOnly,
    /// Everything the guest writes: user read-write, NX.
    Data,
    /// Registers of a device the guest drives: user read-write, NX, uncached.
    DeviceMmio,
    /// Registers of the interrupt controllers: supervisor read-write, NX,
    /// uncached.
    SystemMmio,
}

impl Kind {
    /// Leaf page-table flags of this kind (0: not present).
    pub const fn pte_flags(self) -> u64 {
        use pte::{NO_EXECUTE as NX, PRESENT as P, USER as U, WRITABLE as W};
        match self {
            Kind::Unmapped => 0,
            Kind::System => P | W | NX,
            Kind::BootData | Kind::ReadOnly => P | U | NX,
            Kind::Text => P | U,
            Kind::Data => P | W | U | NX,
            Kind::DeviceMmio => P | W | U | NX | PCD | PWT,
            Kind::SystemMmio => P | W | NX | PCD | PWT,
        }
    }

    /// Whether CPL3 code (and so a device acting for the guest) may read it.
    pub const fn user_readable(self) -> bool {
        let f = self.pte_flags();
        f & pte::PRESENT != 0 && f & pte::USER != 0
    }

    /// Whether CPL3 code (and so a device acting for the guest) may write it.
    pub const fn user_writable(self) -> bool {
        self.user_readable() && self.pte_flags() & pte::WRITABLE != 0
    }

    /// Whether CPL3 code may execute it.
    pub const fn user_executable(self) -> bool {
        self.user_readable() && self.pte_flags() & pte::NO_EXECUTE == 0
    }

    /// The kind of an image segment with these ELF permissions (`None` for
    /// writable and executable, which no Wisp image may have).
    pub const fn of_segment(write: bool, exec: bool) -> Option<Kind> {
        match (write, exec) {
            (false, false) => Some(Kind::ReadOnly),
            (false, true) => Some(Kind::Text),
            (true, false) => Some(Kind::Data),
            (true, true) => None,
        }
    }
}

/// `[start, end)` of guest-physical memory, and what it is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
    pub kind: Kind,
}

impl Range {
    pub const fn new(start: u64, end: u64, kind: Kind) -> Range {
        Range { start, end, kind }
    }

    fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end
    }
}

/// Why a map or its tables were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// A range is empty, reversed or not 4 KiB aligned.
    BadRange { start: u64, end: u64 },
    /// A range reaches past [`ADDRESS_LIMIT`].
    BeyondLimit { end: u64 },
    /// A range other than MMIO or unmapped lies (partly) outside RAM.
    OutsideRam { start: u64, end: u64 },
    /// MMIO overlaps RAM.
    MmioInRam { start: u64, end: u64 },
    /// The tables need more pages than were given.
    TooManyTables { needed: usize, available: usize },
}

impl MapError {
    /// What went wrong, in a few words (no formatting code needed).
    pub const fn reason(&self) -> &'static str {
        match self {
            MapError::BadRange { .. } => "a range is empty or not 4 KiB aligned",
            MapError::BeyondLimit { .. } => "a range is beyond the mappable addresses",
            MapError::OutsideRam { .. } => "a range is not inside guest RAM",
            MapError::MmioInRam { .. } => "an MMIO range overlaps guest RAM",
            MapError::TooManyTables { .. } => "the page tables need more pages than reserved",
        }
    }
}

impl core::fmt::Display for MapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            MapError::BadRange { start, end } => {
                write!(
                    f,
                    "range {start:#x}..{end:#x} is empty or not 4 KiB aligned"
                )
            }
            MapError::BeyondLimit { end } => {
                write!(f, "range ending at {end:#x} is beyond {ADDRESS_LIMIT:#x}")
            }
            MapError::OutsideRam { start, end } => {
                write!(f, "range {start:#x}..{end:#x} is not inside guest RAM")
            }
            MapError::MmioInRam { start, end } => {
                write!(f, "MMIO range {start:#x}..{end:#x} overlaps guest RAM")
            }
            MapError::TooManyTables { needed, available } => write!(
                f,
                "page tables need {needed} pages, only {available} are reserved"
            ),
        }
    }
}

/// A guest's memory map: its RAM and the ranges that are not plain data.
///
/// The kind of an address is decided by these rules, in order:
/// 1. the null page is [`Kind::Unmapped`];
/// 2. the **last** range in `ranges` that contains it (so a later range
///    refines an earlier one: an image's span can be declared unmapped and
///    its segments listed after it, leaving the holes between them as guard
///    pages);
/// 3. RAM that no range claims is [`Kind::Data`] (free memory, the heap);
/// 4. anything else is [`Kind::Unmapped`].
#[derive(Clone, Copy, Debug)]
pub struct Map<'a> {
    /// Guest RAM as `[start, end)` pairs, 4 KiB aligned.
    pub ram: &'a [(u64, u64)],
    /// Ranges with a kind other than free memory.
    pub ranges: &'a [Range],
}

fn aligned(start: u64, end: u64) -> bool {
    start < end && start.is_multiple_of(PAGE) && end.is_multiple_of(PAGE)
}

impl Map<'_> {
    /// Checks the map's ranges: aligned, within [`ADDRESS_LIMIT`], memory
    /// kinds inside RAM, MMIO outside it.
    pub fn validate(&self) -> Result<(), MapError> {
        for &(start, end) in self.ram {
            if !aligned(start, end) {
                return Err(MapError::BadRange { start, end });
            }
            if end > ADDRESS_LIMIT {
                return Err(MapError::BeyondLimit { end });
            }
        }
        for r in self.ranges {
            if !aligned(r.start, r.end) {
                return Err(MapError::BadRange {
                    start: r.start,
                    end: r.end,
                });
            }
            if r.end > ADDRESS_LIMIT {
                return Err(MapError::BeyondLimit { end: r.end });
            }
            let in_ram = self.ram.iter().any(|&(s, e)| r.start >= s && r.end <= e);
            let touches_ram = self.ram.iter().any(|&(s, e)| r.start < e && s < r.end);
            match r.kind {
                Kind::Unmapped => {}
                Kind::DeviceMmio | Kind::SystemMmio if touches_ram => {
                    return Err(MapError::MmioInRam {
                        start: r.start,
                        end: r.end,
                    })
                }
                Kind::DeviceMmio | Kind::SystemMmio => {}
                _ if !in_ram => {
                    return Err(MapError::OutsideRam {
                        start: r.start,
                        end: r.end,
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// What the page holding `addr` is for.
    pub fn kind_at(&self, addr: u64) -> Kind {
        if addr < PAGE {
            return Kind::Unmapped;
        }
        if let Some(r) = self.ranges.iter().rev().find(|r| r.contains(addr)) {
            return r.kind;
        }
        if self.ram.iter().any(|&(s, e)| addr >= s && addr < e) {
            Kind::Data
        } else {
            Kind::Unmapped
        }
    }

    /// Leaf flags of the 4 KiB page holding `addr` (0: not mapped).
    pub fn page_flags(&self, addr: u64) -> u64 {
        self.kind_at(addr).pte_flags()
    }

    /// The kind of all of `[lo, hi)` if it has only one: the kind can only
    /// change at the start or end of RAM or of a range (or after the null
    /// page).
    fn uniform(&self, lo: u64, hi: u64) -> Option<Kind> {
        let kind = self.kind_at(lo);
        let changes = |b: u64| b > lo && b < hi && self.kind_at(b) != kind;
        if changes(PAGE) {
            return None;
        }
        for &(s, e) in self.ram {
            if changes(s) || changes(e) {
                return None;
            }
        }
        for r in self.ranges {
            if changes(r.start) || changes(r.end) {
                return None;
            }
        }
        Some(kind)
    }

    /// Whether anything in `[lo, hi)` is mapped.
    fn any_mapped(&self, lo: u64, hi: u64) -> bool {
        self.uniform(lo, hi) != Some(Kind::Unmapped)
    }

    /// Highest address the map can make present.
    fn top(&self) -> u64 {
        let ram = self.ram.iter().map(|&(_, e)| e);
        let ranges = self
            .ranges
            .iter()
            .filter(|r| r.kind != Kind::Unmapped)
            .map(|r| r.end);
        ram.chain(ranges).max().unwrap_or(0).min(ADDRESS_LIMIT)
    }

    /// The gigabytes that need a page directory, as a bit mask.
    fn directory_mask(&self) -> u64 {
        let gibs = self.top().div_ceil(GIB);
        (0..gibs)
            .filter(|&g| self.any_mapped(g * GIB, (g + 1) * GIB))
            .fold(0, |m, g| m | 1 << g)
    }

    /// The gigabytes (by index) that need a page directory, in order.
    pub fn directory_gibs(&self) -> impl Iterator<Item = u64> {
        let mask = self.directory_mask();
        (0..64).filter(move |g| mask & 1 << g != 0)
    }

    /// The 2 MiB regions (by index) that need a table of 4 KiB pages, in
    /// address order.
    pub fn table_regions(&self) -> impl Iterator<Item = u64> + '_ {
        // Nothing is mapped from `top` up: no region there needs a look.
        let top = self.top();
        self.directory_gibs().flat_map(move |g| {
            (g * 512..(g + 1) * 512).filter(move |&r| {
                r * HUGE_PAGE < top && self.uniform(r * HUGE_PAGE, (r + 1) * HUGE_PAGE).is_none()
            })
        })
    }

    /// Pages of tables [`Map::build`] writes: PML4, PDPT, the page
    /// directories and the page tables.
    pub fn tables_needed(&self) -> usize {
        2 + self.directory_mask().count_ones() as usize + self.table_regions().count()
    }

    /// Builds the page tables into `tables`, which the CPU will see at
    /// guest-physical `base`, `base + 4096`, ... (the PML4 first, then the
    /// PDPT, the page directories in address order, the page tables in
    /// address order). Returns how many pages were used; the rest of
    /// `tables` is left as it was.
    pub fn build(&self, base: u64, tables: &mut [[u64; 512]]) -> Result<usize, MapError> {
        self.validate()?;
        let needed = self.tables_needed();
        if needed > tables.len() {
            return Err(MapError::TooManyTables {
                needed,
                available: tables.len(),
            });
        }
        let addr = |slot: usize| base + slot as u64 * PAGE;
        for t in tables[..needed].iter_mut() {
            *t = [0; 512];
        }
        tables[0][0] = addr(1) | TABLE;
        let mask = self.directory_mask();
        let top = self.top();
        let mut pd = 1;
        let mut next_pt = 2 + mask.count_ones() as usize;
        for g in 0..64u64 {
            if mask & 1 << g == 0 {
                continue;
            }
            pd += 1;
            tables[1][g as usize] = addr(pd) | TABLE;
            for slot in 0..512u64 {
                let region = (g * 512 + slot) * HUGE_PAGE;
                if region >= top {
                    continue; // unmapped, and the directory was zeroed
                }
                tables[pd][slot as usize] = match self.uniform(region, region + HUGE_PAGE) {
                    Some(kind) if kind.pte_flags() == 0 => 0,
                    Some(kind) => region | kind.pte_flags() | pte::HUGE,
                    None => {
                        for (p, e) in tables[next_pt].iter_mut().enumerate() {
                            let page = region + p as u64 * PAGE;
                            let flags = self.page_flags(page);
                            *e = if flags == 0 { 0 } else { page | flags };
                        }
                        next_pt += 1;
                        addr(next_pt - 1) | TABLE
                    }
                };
            }
        }
        Ok(needed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn lookup(tables: &[[u64; 512]], base: u64, addr: u64) -> u64 {
        let slot = |e: u64| ((e & pte::ADDR_MASK) - base) as usize / PAGE as usize;
        let pdpte = tables[slot(tables[0][0])][(addr >> 30) as usize & 511];
        if pdpte == 0 {
            return 0;
        }
        let pde = tables[slot(pdpte)][(addr >> 21) as usize & 511];
        if pde == 0 || pde & pte::HUGE != 0 {
            return pde;
        }
        tables[slot(pde)][(addr >> 12) as usize & 511]
    }

    fn sample() -> ([(u64, u64); 1], [Range; 6]) {
        (
            [(0, 64 * MIB)],
            [
                Range::new(PAGE, 4 * PAGE, Kind::System),
                Range::new(4 * PAGE, 5 * PAGE, Kind::BootData),
                Range::new(MIB, MIB + 64 * PAGE, Kind::Unmapped),
                Range::new(MIB, MIB + 16 * PAGE, Kind::Text),
                Range::new(MIB + 17 * PAGE, MIB + 64 * PAGE, Kind::Data),
                Range::new(0xd000_0000, 0xd020_0000, Kind::DeviceMmio),
            ],
        )
    }

    #[test]
    fn kinds_follow_the_rules() {
        let (ram, ranges) = sample();
        let m = Map {
            ram: &ram,
            ranges: &ranges,
        };
        assert_eq!(m.kind_at(0), Kind::Unmapped);
        assert_eq!(m.kind_at(PAGE), Kind::System);
        assert_eq!(m.kind_at(4 * PAGE), Kind::BootData);
        assert_eq!(m.kind_at(5 * PAGE), Kind::Data, "free RAM");
        assert_eq!(m.kind_at(MIB), Kind::Text);
        assert_eq!(m.kind_at(MIB + 16 * PAGE), Kind::Unmapped, "guard hole");
        assert_eq!(m.kind_at(64 * MIB), Kind::Unmapped, "beyond RAM");
        assert_eq!(m.kind_at(0xd000_1000), Kind::DeviceMmio);
        assert_eq!(m.kind_at(0xfec0_0000), Kind::Unmapped);
    }

    #[test]
    fn policy_never_grants_write_and_execute_or_user_system_access() {
        for k in [
            Kind::Unmapped,
            Kind::System,
            Kind::BootData,
            Kind::Text,
            Kind::ReadOnly,
            Kind::Data,
            Kind::DeviceMmio,
            Kind::SystemMmio,
        ] {
            assert!(!(k.user_writable() && k.user_executable()), "{k:?}");
            let f = k.pte_flags();
            assert!(f & pte::WRITABLE == 0 || f & pte::NO_EXECUTE != 0, "{k:?}");
        }
        assert!(!Kind::System.user_readable() && !Kind::SystemMmio.user_readable());
        assert!(Kind::BootData.user_readable() && !Kind::BootData.user_writable());
        assert_eq!(Kind::of_segment(true, true), None);
    }

    #[test]
    fn tables_match_the_map_page_by_page() {
        let (ram, ranges) = sample();
        let m = Map {
            ram: &ram,
            ranges: &ranges,
        };
        let base = PAGE;
        let mut t = [[0u64; 512]; 8];
        let n = m.build(base, &mut t).expect("fits");
        // PML4, PDPT, PD for GiB 0 and GiB 3, one table for 0..2 MiB.
        assert_eq!(n, 5);
        assert_eq!(m.tables_needed(), 5);
        for addr in (0..80 * MIB)
            .step_by(PAGE as usize)
            .chain([0xd000_0000, 0xd01f_f000])
        {
            let e = lookup(&t, base, addr);
            let want = m.page_flags(addr);
            assert_eq!(e & !pte::ADDR_MASK & !pte::HUGE, want, "flags at {addr:#x}");
            if want != 0 {
                let frame = if e & pte::HUGE != 0 {
                    addr & !(HUGE_PAGE - 1)
                } else {
                    addr
                };
                assert_eq!(e & pte::ADDR_MASK, frame, "identity at {addr:#x}");
            }
        }
        assert_ne!(
            lookup(&t, base, 2 * MIB) & pte::HUGE,
            0,
            "2 MiB pages where uniform"
        );
        assert_eq!(lookup(&t, base, 0xd020_0000), 0);
        assert_eq!(lookup(&t, base, 0x4000_0000), 0, "GiB 1 has no directory");
    }

    #[test]
    fn partial_regions_get_small_pages_and_nothing_past_ram() {
        let ram = [(0, 3 * MIB), (4 * MIB, 5 * MIB)];
        let m = Map {
            ram: &ram,
            ranges: &[],
        };
        let mut t = [[0u64; 512]; 8];
        m.build(0x10000, &mut t).expect("fits");
        assert_eq!(lookup(&t, 0x10000, 3 * MIB - PAGE) & 1, 1);
        assert_eq!(lookup(&t, 0x10000, 3 * MIB), 0);
        assert_eq!(lookup(&t, 0x10000, 4 * MIB) & 1, 1);
        assert_eq!(lookup(&t, 0x10000, 5 * MIB), 0);
        assert_eq!(m.table_regions().count(), 3, "null page and two RAM ends");
    }

    #[test]
    fn bad_maps_are_refused() {
        let ram = [(0, 8 * MIB)];
        let bad = |ranges: &[Range]| {
            Map { ram: &ram, ranges }
                .build(0, &mut [[0; 512]; 16])
                .unwrap_err()
        };
        assert!(matches!(
            bad(&[Range::new(5, PAGE, Kind::Data)]),
            MapError::BadRange { .. }
        ));
        assert!(matches!(
            bad(&[Range::new(7 * MIB, 9 * MIB, Kind::Text)]),
            MapError::OutsideRam { .. }
        ));
        assert!(matches!(
            bad(&[Range::new(7 * MIB, 9 * MIB, Kind::DeviceMmio)]),
            MapError::MmioInRam { .. }
        ));
        let many: [Range; 1] = [Range::new(0xfe00_0000, 0xfe00_1000, Kind::DeviceMmio)];
        let m = Map {
            ram: &ram,
            ranges: &many,
        };
        assert_eq!(
            m.build(0, &mut [[0; 512]; 3]),
            Err(MapError::TooManyTables {
                needed: 6,
                available: 3
            })
        );
    }
}
