//! Snapshots: save a running guest to a file, restore it (or clone it N
//! times) later, in this process or another.
//!
//! ```text
//! save(&running, path, opts)   pause -> vCPU + device state read on the
//!                              paused vCPU thread -> metadata + touched
//!                              memory written (to path.tmp, renamed) ->
//!                              stop, or resume (--leave-running)
//! Snapshot::open(path)         header, sections and memory checked (CRCs)
//! snapshot.restore(&cfg, opts) new VM whose RAM maps the snapshot's memory
//!                              privately (copy-on-write, on demand), vCPU
//!                              state, devices rebuilt from cfg's backends
//!                              with their queues where they were, boot
//!                              page's clock record re-based -> Vm
//! ```
//! One opened [`Snapshot`] restores any number of guests (clones); each
//! gets its own copy-on-write view of the memory, its own backends, and,
//! for a clone, its own MAC address and identity in the boot page
//! (`clone_id`, a fresh `seed`), which the guest reads to reseed.
//!
//! What a snapshot does not carry: host-side connections of the user-mode
//! network (a restored guest gets a fresh backend; clients reconnect), frames
//! queued in the monitor for a guest that had no receive buffer (dropped, as
//! on a lossy link), and the disk's contents (the restore names the disk; it
//! must have the same size).

mod cpu;
pub mod format;
pub(crate) mod memory;
pub mod parts;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use virtio_queue::QueueState;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wisp_abi::boot::{BootPage, Device};
use wisp_abi::manifest::{DEVICE_BLOCK, DEVICE_NET};
use wisp_abi::pod::Pod;

use crate::control::{ControlError, StopReason, VmState};
use crate::device_manager::{DeviceManager, GUEST_MAC};
use crate::devices::guest_access::GuestAccess;
use crate::devices::virtio::mmio::TransportState;
use crate::memory::GuestRam;
use crate::vm::{self, Machine, RunningVm, Vm, VmConfig, VmError};

pub use cpu::VcpuState;
use format::{Header, Kind, Reader, SectionEntry, Writer, FORMAT_VERSION, HEADER_LEN, PAGE};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a Wisp snapshot (bad magic)")]
    NotASnapshot,
    #[error("snapshot format version {found}; this monitor reads version {supported}")]
    Version { found: u32, supported: u32 },
    #[error("snapshot is truncated ({0} missing)")]
    Truncated(&'static str),
    #[error("snapshot is corrupted ({0} section fails its checksum or does not decode)")]
    Corrupt(&'static str),
    #[error("snapshot does not fit this guest: {0}")]
    Mismatch(String),
    #[error("controlling the guest: {0}")]
    Control(#[from] ControlError),
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn kvm((what, source): (&'static str, kvm_ioctls::Error)) -> SnapshotError {
    SnapshotError::Kvm { what, source }
}

/// What a running guest's snapshot needs besides its threads' state: its
/// memory (a clone of the mapping keeps it alive) and where its boot page
/// and page tables are.
pub(crate) struct Source {
    mem: GuestMemoryMmap,
    file: File,
    file_offset: u64,
    private: bool,
    size: u64,
    host_addr: u64,
    boot_page: u64,
    pml4: u64,
    devices: Vec<Device>,
    /// `/proc/self/pagemap`, opened now for a private (restored) mapping:
    /// a save may run later under a seccomp filter that forbids opening.
    pagemap: Option<File>,
}

impl Source {
    pub(crate) fn new(
        ram: &GuestRam,
        boot_page: u64,
        pml4: u64,
        devices: &[Device],
    ) -> std::io::Result<Source> {
        Ok(Source {
            mem: ram.mem.clone(),
            file: ram.file.try_clone()?,
            file_offset: ram.file_offset,
            private: ram.private,
            size: ram.size,
            host_addr: ram.host_addr,
            boot_page,
            pml4,
            devices: devices.to_vec(),
            pagemap: if ram.private {
                Some(File::open("/proc/self/pagemap")?)
            } else {
                None
            },
        })
    }
}

/// How to save.
#[derive(Clone, Copy, Debug, Default)]
pub struct SaveOptions {
    /// Resume the guest after the save instead of stopping it.
    pub leave_running: bool,
}

/// What a save did and how long it took.
#[derive(Clone, Copy, Debug)]
pub struct SaveReport {
    /// Guest memory pages written (the rest were never touched).
    pub pages_written: u64,
    pub memory_size: u64,
    /// Bytes of the file on disk (metadata + pages written).
    pub bytes_written: u64,
    /// Request to paused.
    pub pause: Duration,
    /// Request to the file complete (the guest is then stopped or resumed).
    pub total: Duration,
    /// How long the guest did not run (pause to resume) with
    /// `leave_running`; otherwise the same as `total`.
    pub downtime: Duration,
}

/// Saves a running guest to `path`: pauses it, writes its state, then stops
/// it (or resumes it with [`SaveOptions::leave_running`]). On any error the
/// guest is resumed and no file is left at `path`.
pub fn save(vm: &RunningVm, path: &Path, opts: SaveOptions) -> Result<SaveReport, SnapshotError> {
    save_with(vm, opts, |src, cpu, devices| {
        write_snapshot(path, src, cpu, devices)
    })
}

/// Saves a running guest into `out`, an open, empty, writable file (the
/// caller created it and renames it into place once this succeeds): for a
/// monitor whose thread may no longer open or rename files. As [`save`]
/// otherwise; on error `out` holds no valid snapshot.
pub fn save_to(vm: &RunningVm, out: &File, opts: SaveOptions) -> Result<SaveReport, SnapshotError> {
    let label = Path::new("<snapshot file>");
    save_with(vm, opts, |src, cpu, devices| {
        write_into(out, label, src, cpu, devices).inspect_err(|_| {
            let _ = out.set_len(0);
        })
    })
}

fn save_with(
    vm: &RunningVm,
    opts: SaveOptions,
    write: impl FnOnce(
        &Source,
        &VcpuState,
        &[(TransportState, u64)],
    ) -> Result<(u64, u64), SnapshotError>,
) -> Result<SaveReport, SnapshotError> {
    let t0 = Instant::now();
    let ctl = vm.controller();
    let was_paused = ctl.state() == VmState::Paused;
    ctl.pause()?;
    let pause = t0.elapsed();
    let result = (|| {
        let (cpu, devices) = ctl.on_paused_vcpu(|m: &mut Machine, bus| {
            (VcpuState::capture(&m.vcpu), bus.save_states())
        })?;
        let cpu = cpu.map_err(kvm)?;
        write(&vm.source, &cpu, &devices)
    })();
    let total = t0.elapsed();
    match &result {
        Ok(_) if !opts.leave_running => ctl.stop(StopReason::Requested),
        _ if !was_paused => {
            let _ = ctl.resume();
        }
        _ => {}
    }
    let downtime = if opts.leave_running {
        t0.elapsed()
    } else {
        total
    };
    let (pages_written, bytes_written) = result?;
    Ok(SaveReport {
        pages_written,
        memory_size: vm.source.size,
        bytes_written,
        pause,
        total,
        downtime,
    })
}

fn encode_machine(src: &Source) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(src.size);
    w.u64(src.boot_page);
    w.u64(src.pml4);
    w.u32(wisp_abi::ABI_VERSION);
    w.buf
}

fn encode_queue(w: &mut Writer, q: &QueueState) {
    w.u16(q.max_size);
    w.u16(q.next_avail);
    w.u16(q.next_used);
    w.u8(q.event_idx_enabled as u8);
    w.u16(q.size);
    w.u8(q.ready as u8);
    w.u64(q.desc_table);
    w.u64(q.avail_ring);
    w.u64(q.used_ring);
}

fn decode_queue(r: &mut Reader<'_>) -> Result<QueueState, SnapshotError> {
    Ok(QueueState {
        max_size: r.u16()?,
        next_avail: r.u16()?,
        next_used: r.u16()?,
        event_idx_enabled: r.u8()? != 0,
        size: r.u16()?,
        ready: r.u8()? != 0,
        desc_table: r.u64()?,
        avail_ring: r.u64()?,
        used_ring: r.u64()?,
    })
}

/// A device as the snapshot records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The boot page's entry (kind, MMIO window, MAC, capacity, addresses).
    pub entry: Device,
    /// Features the device offered (its kind and, for a disk, read-only).
    pub features: u64,
    pub transport: TransportState,
}

fn encode_devices(records: &[DeviceRecord]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(records.len() as u32);
    for d in records {
        w.blob(d.entry.as_bytes());
        w.u64(d.features);
        let t = &d.transport;
        w.u32(t.device_features_sel);
        w.u32(t.driver_features_sel);
        w.u64(t.acked_features);
        w.u32(t.queue_sel);
        w.u32(t.status);
        w.u32(t.interrupt_status);
        w.u32(t.config_generation);
        w.u8(t.activated as u8);
        w.u8(t.broken as u8);
        for qs in [&t.queues, &t.active] {
            w.u32(qs.len() as u32);
            for q in qs {
                encode_queue(&mut w, q);
            }
        }
    }
    w.buf
}

fn device_from_bytes(b: &[u8]) -> Option<Device> {
    (b.len() == std::mem::size_of::<Device>()).then(|| {
        // SAFETY: `Device` is plain integers (Pod): any bytes of its size
        // are a valid value; the read is unaligned-safe.
        unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Device>()) }
    })
}

fn boot_page_from_bytes(b: &[u8]) -> Option<BootPage> {
    (b.len() == std::mem::size_of::<BootPage>()).then(|| {
        // SAFETY: `BootPage` is plain integers (Pod): any bytes of its size
        // are a valid value; the read is unaligned-safe.
        unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<BootPage>()) }
    })
}

fn decode_devices(b: &[u8]) -> Result<Vec<DeviceRecord>, SnapshotError> {
    let mut r = Reader::new(b, "devices");
    let n = r.count(64)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let entry = device_from_bytes(r.blob()?).ok_or(SnapshotError::Corrupt("devices"))?;
        let features = r.u64()?;
        let mut t = TransportState {
            device_features_sel: r.u32()?,
            driver_features_sel: r.u32()?,
            acked_features: r.u64()?,
            queue_sel: r.u32()?,
            status: r.u32()?,
            interrupt_status: r.u32()?,
            config_generation: r.u32()?,
            activated: r.u8()? != 0,
            broken: r.u8()? != 0,
            queues: Vec::new(),
            active: Vec::new(),
        };
        for i in 0..2 {
            let qn = r.count(32)?;
            let mut qs = Vec::with_capacity(qn);
            for _ in 0..qn {
                qs.push(decode_queue(&mut r)?);
            }
            if i == 0 {
                t.queues = qs;
            } else {
                t.active = qs;
            }
        }
        out.push(DeviceRecord {
            entry,
            features,
            transport: t,
        });
    }
    r.end()?;
    Ok(out)
}

/// Writes the snapshot file (to `path.tmp`, renamed into place once
/// complete); returns (pages written, bytes on disk).
fn write_snapshot(
    path: &Path,
    src: &Source,
    cpu: &VcpuState,
    devices: &[(TransportState, u64)],
) -> Result<(u64, u64), SnapshotError> {
    let tmp = path.with_extension("tmp");
    let out = File::create(&tmp).map_err(io(&tmp))?;
    let written = write_into(&out, &tmp, src, cpu, devices);
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let written = written?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path)(e)
    })?;
    Ok(written)
}

/// Writes a whole snapshot into `out` (`tmp` names it in errors).
fn write_into(
    out: &File,
    tmp: &Path,
    src: &Source,
    cpu: &VcpuState,
    devices: &[(TransportState, u64)],
) -> Result<(u64, u64), SnapshotError> {
    let mut sections = parts::encode_state(src, cpu, devices)?;
    // Touched pages: the backing file's data (for a restored guest, its
    // snapshot's pages) and, for a private mapping, the guest's own copies.
    let ranges = src.touched().map_err(io(tmp))?;

    // The memory index's CRC is known only once the memory is written: its
    // section is written last, at a place reserved for it.
    let mut index = Writer::default();
    index.u32(ranges.len() as u32);
    for &(s, l) in &ranges {
        index.u64(s);
        index.u64(l);
    }
    let index_len = index.buf.len() as u64 + 4;
    let mut offset = HEADER_LEN;
    let mut table = Vec::new();
    for (kind, bytes) in &sections {
        table.push(SectionEntry {
            kind: *kind as u32,
            offset,
            len: bytes.len() as u64,
            crc: crc32fast::hash(bytes),
        });
        offset += bytes.len() as u64;
    }
    let index_offset = offset;
    let mem_offset = format::round_up(index_offset + index_len, PAGE);
    let file_len = mem_offset + src.size;

    let written = (|| {
        out.set_len(file_len)?;
        // SAFETY: `host_addr` maps `size` bytes, kept alive by `src.mem`;
        // the guest is paused and its I/O thread quiet, so nothing writes
        // them; every range lies within `size` (clipped when found).
        let mem_crc =
            unsafe { memory::write_ranges(src.host_addr as *const u8, &ranges, out, mem_offset)? };
        index.u32(mem_crc);
        sections.push((Kind::MemoryIndex, std::mem::take(&mut index.buf)));
        table.push(SectionEntry {
            kind: Kind::MemoryIndex as u32,
            offset: index_offset,
            len: index_len,
            crc: crc32fast::hash(&sections[sections.len() - 1].1),
        });
        let mut meta = Vec::new();
        for (_, b) in &sections {
            meta.extend_from_slice(b);
        }
        out.write_all_at(&meta, HEADER_LEN)?;
        let header = Header {
            version: FORMAT_VERSION,
            mem_size: src.size,
            mem_offset,
            file_len,
            sections: table,
        };
        out.write_all_at(&header.encode(), 0)?;
        Ok(())
    })();
    written.map_err(io(tmp))?;
    let pages: u64 = ranges.iter().map(|r| r.1 / PAGE).sum();
    Ok((pages, mem_offset + pages * PAGE))
}

/// How to restore.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreOptions {
    /// 0 for a plain restore; otherwise this guest is clone number
    /// `clone_id` of the snapshot: it gets its own MAC addresses, and the
    /// boot page tells it so that it reseeds.
    pub clone_id: u32,
}

/// An opened, checked snapshot, ready to restore one or more guests.
pub struct Snapshot {
    file: File,
    path: PathBuf,
    mem_size: u64,
    mem_offset: u64,
    boot_page_addr: u64,
    pml4: u64,
    cpu: VcpuState,
    devices: Vec<DeviceRecord>,
    boot_page: BootPage,
    /// Pages of memory the snapshot holds.
    pages: u64,
}

impl Snapshot {
    /// Opens `path` and checks it whole: magic, format version, every
    /// section's checksum, the memory's checksum, and that the file is as
    /// long as its header says.
    pub fn open(path: &Path) -> Result<Snapshot, SnapshotError> {
        Snapshot::open_checked(path, true)
    }

    /// [`Snapshot::open`], skipping the memory's checksum and scan when
    /// `check_memory` is false: for a caller that has checked this same
    /// file already (the daemon, once for a whole batch of clones). Every
    /// other section is still checked and decoded: the monitor trusts no
    /// state it has not parsed itself, and the memory is the guest's own.
    pub fn open_checked(path: &Path, check_memory: bool) -> Result<Snapshot, SnapshotError> {
        let file = File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        let mut page = vec![0u8; HEADER_LEN as usize];
        let n = read_up_to(&file, &mut page, 0).map_err(io(path))?;
        if n < 8 {
            return Err(if n == 0 {
                SnapshotError::Truncated("header")
            } else {
                SnapshotError::NotASnapshot
            });
        }
        if page[..8] != format::MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        if (n as u64) < HEADER_LEN {
            // Decoded first so that another version says so.
            Header::decode(&page[..n])?;
            return Err(SnapshotError::Truncated("header"));
        }
        let h = Header::decode(&page)?;
        let section = |kind: Kind| -> Result<Vec<u8>, SnapshotError> {
            let e = h.section(kind)?;
            let end = e
                .offset
                .checked_add(e.len)
                .ok_or(SnapshotError::Corrupt(kind.name()))?;
            if end > len {
                return Err(SnapshotError::Truncated(kind.name()));
            }
            if e.len > 64 << 20 {
                return Err(SnapshotError::Corrupt(kind.name()));
            }
            let mut b = vec![0u8; e.len as usize];
            file.read_exact_at(&mut b, e.offset).map_err(io(path))?;
            if crc32fast::hash(&b) != e.crc {
                return Err(SnapshotError::Corrupt(kind.name()));
            }
            Ok(b)
        };
        let machine = section(Kind::Machine)?;
        let vcpu = section(Kind::Vcpu)?;
        let devices = section(Kind::Devices)?;
        let boot = section(Kind::BootPage)?;
        let index = section(Kind::MemoryIndex)?;
        if len < h.file_len || h.file_len != h.mem_offset.saturating_add(h.mem_size) {
            return Err(SnapshotError::Truncated("memory"));
        }

        let mut r = Reader::new(&machine, "machine");
        let mem_size = r.u64()?;
        let boot_page_addr = r.u64()?;
        let pml4 = r.u64()?;
        let abi = r.u32()?;
        r.end()?;
        if mem_size != h.mem_size
            || !h.mem_offset.is_multiple_of(PAGE)
            || boot_page_addr.saturating_add(PAGE) > mem_size
            || pml4.saturating_add(PAGE) > mem_size
        {
            return Err(SnapshotError::Corrupt("machine"));
        }
        if abi != wisp_abi::ABI_VERSION {
            return Err(SnapshotError::Mismatch(format!(
                "the guest was built for ABI {abi}, this monitor speaks {}",
                wisp_abi::ABI_VERSION
            )));
        }
        let mut r = Reader::new(&vcpu, "vCPU");
        let cpu = VcpuState::decode(&mut r)?;
        r.end()?;
        let devices = decode_devices(&devices)?;
        let boot_page = boot_page_from_bytes(&boot).ok_or(SnapshotError::Corrupt("boot page"))?;

        let mut r = Reader::new(&index, "memory index");
        let n = r.count(16)?;
        let mut ranges = Vec::with_capacity(n);
        for _ in 0..n {
            let (s, l) = (r.u64()?, r.u64()?);
            if s.checked_add(l).is_none_or(|e| e > mem_size) {
                return Err(SnapshotError::Corrupt("memory index"));
            }
            ranges.push((s, l));
        }
        let crc = r.u32()?;
        r.end()?;
        if check_memory {
            if memory::checksum(&file, h.mem_offset, &ranges).map_err(io(path))? != crc {
                return Err(SnapshotError::Corrupt("memory"));
            }
            // Outside the written pages the memory must be zero: holes, or
            // zeros in a copy that filled them in (anything else is
            // corruption).
            let found = memory::data_ranges(&file, h.mem_offset, mem_size).map_err(io(path))?;
            let extra = memory::subtract(&found, &memory::merge(ranges.clone()));
            if !memory::all_zero(&file, h.mem_offset, &extra).map_err(io(path))? {
                return Err(SnapshotError::Corrupt("memory"));
            }
        }
        Ok(Snapshot {
            file,
            path: path.to_path_buf(),
            mem_size,
            mem_offset: h.mem_offset,
            boot_page_addr,
            pml4,
            cpu,
            devices,
            boot_page,
            pages: ranges.iter().map(|r| r.1 / PAGE).sum(),
        })
    }

    /// Guest memory size of the snapshot.
    pub fn memory(&self) -> u64 {
        self.mem_size
    }

    /// Pages of guest memory the snapshot holds.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The devices the snapshot's guest had, in bus order.
    pub fn devices(&self) -> &[DeviceRecord] {
        &self.devices
    }

    /// Checks, before anything is created, that `cfg` describes the
    /// snapshot's machine: memory size, devices in order (NICs, then the
    /// disk) and the disk's size.
    fn check(&self, cfg: &VmConfig) -> Result<(), SnapshotError> {
        if cfg.memory != self.mem_size {
            return Err(SnapshotError::Mismatch(format!(
                "the snapshot has {} of memory, the restore asks for {}",
                crate::layout::human(self.mem_size),
                crate::layout::human(cfg.memory)
            )));
        }
        let mut want: Vec<u32> = cfg.nics.iter().map(|_| DEVICE_NET).collect();
        if cfg.disk.is_some() {
            want.push(DEVICE_BLOCK);
        }
        let have: Vec<u32> = self.devices.iter().map(|d| d.entry.kind).collect();
        if want != have {
            let names = |k: &[u32]| {
                k.iter()
                    .map(|&k| if k == DEVICE_NET { "net" } else { "block" })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            return Err(SnapshotError::Mismatch(format!(
                "the snapshot's devices are [{}], the restore gives [{}]",
                names(&have),
                names(&want)
            )));
        }
        if let Some(disk) = &cfg.disk {
            let len = std::fs::metadata(&disk.path).map_err(io(&disk.path))?.len();
            let cap =
                len / crate::devices::virtio::block::SECTOR * crate::devices::virtio::block::SECTOR;
            let saved = self.devices.iter().find(|d| d.entry.kind == DEVICE_BLOCK);
            if let Some(saved) = saved.filter(|d| d.entry.capacity != cap) {
                return Err(SnapshotError::Mismatch(format!(
                    "the snapshot's disk has {} bytes, {} has {cap}",
                    saved.entry.capacity,
                    disk.path.display()
                )));
            }
        }
        Ok(())
    }

    /// Restores a guest: a new VM whose memory is the snapshot's, mapped
    /// copy-on-write, with the vCPU and devices as they were and backends
    /// opened from `cfg` (its memory and devices must match the snapshot;
    /// its arguments are ignored). Start it with [`Vm::start`].
    pub fn restore(&self, cfg: &VmConfig, opts: RestoreOptions) -> Result<Vm, SnapshotError> {
        self.check(cfg)?;
        let kvm_host = vm::host_kvm().map_err(VmError::from)?;
        let vm_fd = kvm_host.create_vm().map_err(vm::kvm_call("create VM"))?;
        let vcpu = vm_fd.create_vcpu(0).map_err(vm::kvm_call("create vCPU"))?;
        self.restore_on(vm_fd, vcpu, cfg, opts)
    }

    /// [`Snapshot::restore`] into a shell made ahead (a daemon's pooled
    /// one, of the snapshot's memory size): its VM and vCPU are used, and
    /// its own memory slot is replaced by the snapshot's memory.
    pub fn restore_into(
        &self,
        shell: vm::Shell,
        cfg: &VmConfig,
        opts: RestoreOptions,
    ) -> Result<Vm, SnapshotError> {
        self.check(cfg)?;
        if shell.memory() != self.mem_size {
            return Err(SnapshotError::Mismatch(format!(
                "the shell has {} of memory, the snapshot {}",
                crate::layout::human(shell.memory()),
                crate::layout::human(self.mem_size)
            )));
        }
        let Machine {
            vcpu,
            vm: vm_fd,
            ram,
        } = shell.into_machine();
        let empty = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0,
            userspace_addr: ram.host_addr,
        };
        // SAFETY: a size of 0 deletes slot 0; the guest has never run, and
        // `ram` is dropped only after the slot no longer maps it.
        unsafe { vm_fd.set_user_memory_region(empty) }
            .map_err(vm::kvm_call("delete memory region"))?;
        drop(ram);
        self.restore_on(vm_fd, vcpu, cfg, opts)
    }

    /// The rest of a restore, on a VM and vCPU with no memory slot yet.
    fn restore_on(
        &self,
        vm_fd: kvm_ioctls::VmFd,
        vcpu: kvm_ioctls::VcpuFd,
        cfg: &VmConfig,
        opts: RestoreOptions,
    ) -> Result<Vm, SnapshotError> {
        let khz = vcpu
            .get_tsc_khz()
            .map_err(vm::kvm_call("get TSC frequency"))? as u64;
        if khz != self.boot_page.tsc_khz {
            return Err(SnapshotError::Mismatch(format!(
                "the snapshot's TSC runs at {} kHz, this host's at {khz} kHz",
                self.boot_page.tsc_khz
            )));
        }
        let file = self.file.try_clone().map_err(io(&self.path))?;
        let ram =
            GuestRam::map_private(file, self.mem_offset, self.mem_size).map_err(VmError::from)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size,
            userspace_addr: ram.host_addr,
        };
        // SAFETY: the region maps `size` bytes owned by `ram`, which lives
        // as long as the VM (both in `Machine`, dropped VM first); the slot
        // is new and covers exactly it.
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(vm::kvm_call("set memory region"))?;
        let machine = Machine {
            vcpu,
            vm: vm_fd,
            ram,
        };
        // The page tables are in the snapshot's memory, where the guest
        // cannot write them: devices obey them as before.
        let access = GuestAccess::from_page_tables(&machine.ram.mem, self.pml4, self.mem_size)
            .tracking(machine.ram.dirty.clone());
        let mut devices = DeviceManager::default();
        let mut published = Vec::new();
        vm::attach_configured(&mut devices, &mut published, &machine, &access, cfg)?;
        let offered = devices.offered_features();
        for (i, (d, f)) in self.devices.iter().zip(&offered).enumerate() {
            if d.features != *f {
                return Err(SnapshotError::Mismatch(format!(
                    "device {i} offers features {f:#x}, the snapshot's offered {:#x} (read-only disk?)",
                    d.features
                )));
            }
        }
        if opts.clone_id != 0 {
            let nics = self
                .devices
                .iter()
                .filter(|d| d.entry.kind == DEVICE_NET)
                .count();
            for i in 0..nics {
                devices.set_mac(i, clone_mac(opts.clone_id, i));
            }
        }
        let states: Vec<TransportState> =
            self.devices.iter().map(|d| d.transport.clone()).collect();
        devices
            .restore_states(&states)
            .map_err(SnapshotError::Mismatch)?;

        self.cpu.apply(&machine.vcpu).map_err(kvm)?;
        // Both clocks re-based at this instant: the monotonic one continues
        // from the guest's value at the save (computed as the guest computes
        // it, from the TSC read after it stopped, so never behind anything
        // it saw), the wall clock from the host's.
        let tsc_now =
            crate::vcpu::guest_tsc(&machine.vcpu).map_err(vm::kvm_call("read guest TSC"))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut page = self.boot_page;
        let (mono_tsc, mono_base) = if page.clock_generation == 0 {
            (page.boot_tsc, 0)
        } else {
            (page.mono_tsc, page.mono_base_ns)
        };
        page.mono_base_ns = mono_base.saturating_add(crate::boot::ticks_to_ns(
            self.cpu.tsc().saturating_sub(mono_tsc),
            page.tsc_khz,
        ));
        page.mono_tsc = tsc_now;
        page.clock_generation = page.clock_generation.wrapping_add(1).max(1);
        page.wall_tsc = tsc_now;
        page.wall_unix_ns = now;
        page.restore_count = page.restore_count.wrapping_add(1);
        page.clone_id = opts.clone_id;
        page.seed = crate::boot::random_seed();
        // A stop asked of the saved guest is not asked of this one.
        page.shutdown = wisp_abi::boot::SHUTDOWN_NONE;
        for (slot, e) in page.devices.iter_mut().zip(devices.entries()) {
            slot.mac = e.mac;
            // The configuration copy holds the MAC address too.
            slot.config = e.config;
        }
        machine
            .ram
            .mem
            .write_slice(page.as_bytes(), GuestAddress(self.boot_page_addr))
            .map_err(|_| SnapshotError::Corrupt("boot page"))?;
        Ok(Vm::restored(
            machine,
            self.boot_page_addr,
            self.pml4,
            devices,
            published,
        ))
    }
}

/// The MAC address of NIC `index` of clone `clone_id`: the cold-boot MAC
/// with the clone number in bytes 2-4 (byte 2 never 0, the cold boot's;
/// still locally administered).
pub fn clone_mac(clone_id: u32, index: usize) -> [u8; 6] {
    let mut mac = GUEST_MAC;
    mac[2] = 1u8.wrapping_add((clone_id >> 16) as u8).max(1);
    mac[3] = (clone_id >> 8) as u8;
    mac[4] = clone_id as u8;
    mac[5] = mac[5].wrapping_add(index as u8);
    mac
}

fn read_up_to(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests;
