//! Where everything lives in guest-physical memory.
//!
//! ```text
//! 0x0000_0000  null page (unmapped)
//! 0x0000_1000  PML4, PDPT, page directories, page tables   supervisor RW
//!              GDT, IDT, TSS (with I/O bitmap)              supervisor RW
//!              boot page, argument strings                  user read-only
//!              free memory -> heap                          user RW NX
//! 0x0010_0000  the image's segments (guard holes unmapped)  per ELF flags
//!  image end   free memory -> heap, up to --memory          user RW NX
//! ```
//! Where things are is decided here; what each of them may be used for is
//! not: [`Layout::map`] describes the guest as a [`wisp_abi::memmap::Map`],
//! whose [`Kind`]s carry the permissions, and [`crate::paging`] builds the
//! tables from it with the same code the guest's PVH start uses under QEMU.
//! The guest is identity-mapped, with 2 MiB pages wherever a whole 2 MiB
//! region has one kind and 4 KiB pages where kinds change.

use wisp_abi::memmap::{Kind, Map, Range};

use crate::image::Image;

pub const PAGE: u64 = 4096;
pub const HUGE_PAGE: u64 = 2 << 20;
pub const GIB: u64 = 1 << 30;
/// Smallest guest memory accepted.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Largest guest memory accepted: hypercall arguments are 32-bit
/// guest-physical addresses, and 3-4 GiB is kept for device MMIO.
pub const MAX_MEMORY: u64 = 3 * GIB;
/// Most bytes of arguments (NUL-terminated strings).
pub const MAX_ARGS_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("--memory {given} is too small: this image needs at least {} MiB (it ends at {image_end:#x})", needed.div_ceil(1 << 20))]
    MemoryTooSmall {
        given: String,
        needed: u64,
        image_end: u64,
    },
    #[error("--memory {0} is too large (at most {max} MiB)", max = MAX_MEMORY >> 20)]
    MemoryTooLarge(String),
    #[error("--memory {0} is not a whole number of MiB")]
    MemoryUnaligned(String),
    #[error("arguments take {0} bytes; at most {MAX_ARGS_BYTES} are allowed")]
    ArgsTooLong(usize),
    #[error("boot structures ({boot_end:#x}) would overlap the image at {image_start:#x}")]
    BootAreaOverlapsImage { boot_end: u64, image_start: u64 },
    #[error("guest memory map: {0}")]
    Map(wisp_abi::memmap::MapError),
}

/// Human form of a byte count for errors.
pub fn human(bytes: u64) -> String {
    if bytes.is_multiple_of(GIB) {
        format!("{}G", bytes / GIB)
    } else if bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// Checks a guest memory size on its own (before any image is known): a
/// whole number of MiB, between [`MIN_MEMORY`] and [`MAX_MEMORY`].
pub fn check_memory(mem_size: u64) -> Result<(), LayoutError> {
    if !mem_size.is_multiple_of(1 << 20) {
        return Err(LayoutError::MemoryUnaligned(human(mem_size)));
    }
    if mem_size > MAX_MEMORY {
        return Err(LayoutError::MemoryTooLarge(human(mem_size)));
    }
    if mem_size < MIN_MEMORY {
        return Err(LayoutError::MemoryTooSmall {
            given: human(mem_size),
            needed: MIN_MEMORY,
            image_end: 0,
        });
    }
    Ok(())
}

/// The addresses of every boot structure for one guest.
#[derive(Clone, Debug)]
pub struct Layout {
    pub mem_size: u64,
    pub pml4: u64,
    pub pdpt: u64,
    /// One page directory per GiB, consecutive.
    pub pd_base: u64,
    pub pd_count: u64,
    /// Page directory of the device (MMIO) gigabyte, if there are devices.
    pub mmio_pd: Option<u64>,
    /// Page tables, consecutive; `pt_regions[i]` is the 2 MiB region
    /// (index) that table `i` maps with 4 KiB pages.
    pub pt_base: u64,
    pub pt_regions: Vec<u64>,
    pub gdt: u64,
    pub idt: u64,
    pub tss: u64,
    /// End of the supervisor-only structures.
    pub system_end: u64,
    pub boot_page: u64,
    pub args: u64,
    /// End of the user-read-only boot data.
    pub boot_area_end: u64,
    pub image_start: u64,
    pub image_end: u64,
    /// Free memory for the guest heap: (start, len).
    pub free: Vec<(u64, u64)>,
    /// Guest RAM, for [`Layout::map`].
    ram: [(u64, u64); 1],
    /// What each part of memory is for, for [`Layout::map`].
    ranges: Vec<Range>,
}

impl Layout {
    /// Lays out a guest of `mem_size` bytes running `image` with
    /// `args_bytes` bytes of arguments.
    pub fn new(image: &Image, mem_size: u64, args_bytes: usize) -> Result<Layout, LayoutError> {
        Self::with_devices(image, mem_size, args_bytes, false)
    }

    /// As [`Layout::new`], with the device MMIO window mapped if `devices`.
    pub fn with_devices(
        image: &Image,
        mem_size: u64,
        args_bytes: usize,
        devices: bool,
    ) -> Result<Layout, LayoutError> {
        if !mem_size.is_multiple_of(1 << 20) {
            return Err(LayoutError::MemoryUnaligned(human(mem_size)));
        }
        if mem_size > MAX_MEMORY {
            return Err(LayoutError::MemoryTooLarge(human(mem_size)));
        }
        let image_start = image.start();
        let image_end = image.end();
        let needed = image_end.max(MIN_MEMORY);
        if mem_size < needed {
            return Err(LayoutError::MemoryTooSmall {
                given: human(mem_size),
                needed,
                image_end,
            });
        }
        if args_bytes > MAX_ARGS_BYTES {
            return Err(LayoutError::ArgsTooLong(args_bytes));
        }

        let ram = [(0, mem_size)];
        let mmio = devices.then_some((
            crate::devices::MMIO_BASE,
            crate::devices::MMIO_BASE + HUGE_PAGE,
        ));
        // The boot area's size depends on how many pages of tables the map
        // needs, and the map on where the boot area ends: start from the
        // fewest tables and grow until the count is stable (it always is at
        // once, as the boot area lies in the first 2 MiB, which always needs
        // a table for the null page).
        let mut tables = 3;
        let (system_end, boot_area_end, ranges) = loop {
            let system_end = PAGE + tables as u64 * PAGE + 3 * PAGE;
            let boot_area_end = system_end + PAGE + (args_bytes as u64).next_multiple_of(PAGE);
            if boot_area_end > image_start {
                return Err(LayoutError::BootAreaOverlapsImage {
                    boot_end: boot_area_end,
                    image_start,
                });
            }
            let ranges = ranges(image, system_end, boot_area_end, mmio);
            let map = Map {
                ram: &ram,
                ranges: &ranges,
            };
            map.validate().map_err(LayoutError::Map)?;
            let needed = map.tables_needed();
            if needed == tables {
                break (system_end, boot_area_end, ranges);
            }
            if needed < tables {
                // Cannot happen (more tables only push the boot area up
                // inside the first region); refuse rather than loop.
                return Err(LayoutError::Map(
                    wisp_abi::memmap::MapError::TooManyTables {
                        needed: tables,
                        available: needed,
                    },
                ));
            }
            tables = needed;
        };
        let map = Map {
            ram: &ram,
            ranges: &ranges,
        };
        let pml4 = PAGE;
        let pdpt = pml4 + PAGE;
        let pd_base = pdpt + PAGE;
        let pd_count = mem_size.div_ceil(GIB);
        let mmio_pd = devices.then_some(pd_base + pd_count * PAGE);
        let pt_base = pd_base + map.directory_gibs().count() as u64 * PAGE;
        let pt_regions: Vec<u64> = map.table_regions().collect();
        let gdt = pml4 + tables as u64 * PAGE;
        let idt = gdt + PAGE;
        let tss = idt + PAGE;
        debug_assert_eq!(tss + PAGE, system_end);
        let boot_page = system_end;
        let args = boot_page + PAGE;
        let mut free = Vec::new();
        if image_start > boot_area_end {
            free.push((boot_area_end, image_start - boot_area_end));
        }
        if mem_size > image_end {
            free.push((image_end, mem_size - image_end));
        }
        Ok(Layout {
            mem_size,
            pml4,
            pdpt,
            pd_base,
            pd_count,
            mmio_pd,
            pt_base,
            pt_regions,
            gdt,
            idt,
            tss,
            system_end,
            boot_page,
            args,
            boot_area_end,
            image_start,
            image_end,
            free,
            ram,
            ranges,
        })
    }

    /// The guest's memory map: what every address is for, and so how the
    /// CPU (and every device) may access it.
    pub fn map(&self) -> Map<'_> {
        Map {
            ram: &self.ram,
            ranges: &self.ranges,
        }
    }
}

/// The ranges of the map: system structures, boot data, the image's span
/// (unmapped, so holes between segments are guard pages) refined by each
/// segment, and the device window. Free RAM is plain data by default.
fn ranges(
    image: &Image,
    system_end: u64,
    boot_area_end: u64,
    mmio: Option<(u64, u64)>,
) -> Vec<Range> {
    let mut r = vec![
        Range::new(PAGE, system_end, Kind::System),
        Range::new(system_end, boot_area_end, Kind::BootData),
        Range::new(image.start(), image.end(), Kind::Unmapped),
    ];
    for s in &image.segments {
        // Image::parse refuses writable and executable segments; were one
        // to get here, it stays unmapped.
        let kind = Kind::of_segment(s.perms.write, s.perms.exec).unwrap_or(Kind::Unmapped);
        r.push(Range::new(s.addr, s.end_page(), kind));
    }
    if let Some((start, end)) = mmio {
        r.push(Range::new(start, end, Kind::DeviceMmio));
    }
    r
}
