//! One guest, built step by step and then started on its own threads.
//!
//! ```text
//! Shell::create(memory)          KVM VM + vCPU + guest RAM (memfd): a pool can keep these
//!   .load(&image, &args, ..)     layout, image, page tables, GDT/IDT/TSS, vCPU registers
//!   .attach_net(..) / .attach_block(..)   devices from backends already open
//!   .finish(trace)               boot page (clock read last)          -> Vm
//! Vm::start(console, options)    vCPU thread + I/O thread, filters on -> RunningVm
//! RunningVm::controller()        pause / resume / stop / state / counters, any thread
//! RunningVm::wait(timeout)       the outcome
//! ```
//! Nothing here is process-wide: timers are per thread, kicks are
//! thread-directed signals, so one process can run several guests.

use std::io::Write;
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use wisp_abi::manifest::{DEVICE_BLOCK, DEVICE_NET};

use crate::boot::{self, BootError, Clock};
use crate::control::{self, Controller, CounterValues, Request, Shared, StopReason, ThreadState};
use crate::crash::Crash;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::devices::guest_access::GuestAccess;
use crate::devices::virtio::block::Block;
use crate::image::Image;
use crate::io_thread::IoThread;
use crate::kvm::{self, KvmError};
use crate::layout::{self, Layout, LayoutError};
use crate::memory::{GuestRam, MemoryError};
use crate::net::tap::Tap;
use crate::net::user::{PortForward, UserNet};
use crate::net::{BackendKind, NetBackend, NicConfig};
use crate::quota::CpuQuota;
use crate::ratelimit::{Limits, TokenBucket};
use crate::seccomp::{self, ThreadKind};
use crate::trace::BootTrace;
use crate::vcpu;
use crate::vcpu_thread::{self, VcpuThread, CONSOLE_BURST, CONSOLE_RATE};
use crate::worker::{Worker, WorkerError};

/// `KVM_RUN`: `_IO(KVMIO, 0x80)` (include/uapi/linux/kvm.h).
const KVM_RUN_IOCTL: libc::c_ulong = 0xAE80;
/// `KVM_PRE_FAULT_MEMORY`: `_IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)`
/// (a 64-byte struct).
const KVM_PRE_FAULT_MEMORY_IOCTL: libc::c_ulong = 0xC040_AED5;

pub use crate::device_manager::GUEST_MAC;

/// How to run a guest (what `wisp run`'s flags say).
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest memory in bytes.
    pub memory: u64,
    /// Arguments passed to the application.
    pub args: Vec<String>,
    pub trace_boot: bool,
    /// The guest's NICs, in order (the first is the one the guest's
    /// network stack uses).
    pub nics: Vec<NicConfig>,
    /// Ports published on the user-mode NIC.
    pub publish: Vec<PortForward>,
    /// Per-NIC limits in each direction: (bytes/s, frames/s), 0 = none.
    pub net_limits: (u64, u64),
    /// Disk limits: (bytes/s, requests/s), 0 = none.
    pub disk_limits: (u64, u64),
    /// Attach a block device backed by a file.
    pub disk: Option<DiskConfig>,
}

/// `--disk FILE[,ro]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: std::path::PathBuf,
    pub read_only: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (path, opts) = match s.rsplit_once(',') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            Some((_, o)) => return Err(format!("unknown disk option '{o}' (use ro or rw)")),
            None => (s, false),
        };
        if path.is_empty() {
            return Err("empty disk path".into());
        }
        Ok(DiskConfig {
            path: path.into(),
            read_only: opts,
        })
    }
}

/// How a guest ended.
#[derive(Debug)]
pub enum Outcome {
    /// The guest exited with this status (the application's, or 101 for a
    /// panic).
    Exited(u8),
    Crashed(Crash),
    /// `--timeout` expired; where the guest was.
    TimedOut {
        rip: u64,
    },
    /// Stopped through its controller; where the guest was.
    Stopped {
        rip: u64,
    },
}

impl Outcome {
    /// The exit status `wisp run` reports.
    pub fn status(&self) -> u8 {
        match self {
            Outcome::Exited(s) => *s,
            Outcome::Crashed(_) => wisp_abi::exit::CRASH,
            Outcome::TimedOut { .. } => wisp_abi::exit::TIMEOUT,
            // As a process killed by SIGTERM reports itself to a shell.
            Outcome::Stopped { .. } => 128 + libc::SIGTERM as u8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("KVM {what} failed: {source}")]
    KvmCall {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("writing guest console output: {0}")]
    Console(std::io::Error),
    #[error("this image needs a {0} device; give it one ({1})")]
    MissingDevice(&'static str, &'static str),
    #[error("network: {0}")]
    Net(std::io::Error),
    #[error("disk {0}: {1}")]
    Disk(String, std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("starting the guest's threads: {0}")]
    Thread(std::io::Error),
    #[error("the guest's vCPU thread died unexpectedly")]
    VcpuThreadDied,
}

pub(crate) fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

/// `/dev/kvm`, opened once per process: a pool of shells or several
/// guests share it.
pub(crate) fn host_kvm() -> Result<&'static Kvm, KvmError> {
    static KVM: std::sync::OnceLock<Kvm> = std::sync::OnceLock::new();
    if let Some(k) = KVM.get() {
        return Ok(k);
    }
    let k = kvm::open()?;
    Ok(KVM.get_or_init(|| k))
}

/// The KVM objects and memory of one guest. Kept together so that a caller
/// about to exit can leave their (0.4-0.9 ms) teardown to the kernel.
pub struct Machine {
    // Field order is drop order: the vCPU before the VM, the VM (and its
    // memory slot) before the memory it maps.
    pub(crate) vcpu: VcpuFd,
    pub(crate) vm: VmFd,
    pub(crate) ram: GuestRam,
}

/// A KVM VM with one vCPU and its memory, and nothing else yet: no image.
///
/// Creating it is the most expensive step of a cold boot on KVM PVM
/// (~0.2 ms for the VM, ~0.2-0.3 ms for the vCPU) and needs nothing from
/// the image, so a daemon can keep a pool of them ready (LightVM's
/// "shells"); `wisp run` creates one after validating the image.
pub struct Shell {
    machine: Machine,
    ready_at: Instant,
    /// Special registers set ahead by [`Shell::preset_sregs`] (what the
    /// vCPU holds now) and the system tables they point at.
    preset: Option<(kvm_bindings::kvm_sregs, vcpu::SystemTables)>,
}

impl Shell {
    /// Creates the VM, its vCPU and `memory` bytes of guest RAM.
    pub fn create(memory: u64) -> Result<Shell, VmError> {
        layout::check_memory(memory)?;
        let kvm = host_kvm()?;
        let vm = kvm.create_vm().map_err(kvm_call("create VM"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_call("create vCPU"))?;
        let ram = GuestRam::new(memory)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size,
            userspace_addr: ram.host_addr,
        };
        // This call mostly sleeps (~25 µs of CPU, then an SRCU grace period:
        // ~70 µs on an idle host, milliseconds on a busy one). Making it on a
        // helper thread while the vCPU is created was measured: the thread
        // cost more than the overlap saved.
        // SAFETY: the region maps `size` bytes owned by `ram`, which lives
        // as long as the VM (both in `Machine`, dropped VM first); the slot
        // is new and covers exactly it.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_call("set memory region"))?;
        Ok(Shell {
            machine: Machine { vcpu, vm, ram },
            ready_at: Instant::now(),
            preset: None,
        })
    }

    /// Guest memory size in bytes.
    pub fn memory(&self) -> u64 {
        self.machine.ram.size
    }

    /// Its KVM objects and memory (a restore replaces the memory).
    pub(crate) fn into_machine(self) -> Machine {
        self.machine
    }

    /// Faults in (host side) the guest pages of `[start, start + len)`,
    /// clipped to the memory: a pooled shell does it while it waits, for
    /// the pages every guest's load writes, so that the load after the
    /// request does not take the host's page faults for them.
    pub fn prefault(&self, start: u64, len: u64) -> std::io::Result<()> {
        /// `MADV_POPULATE_WRITE` (Linux 5.14).
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        let size = self.machine.ram.size;
        let start = start.min(size) & !(layout::PAGE - 1);
        let end = start.saturating_add(len).min(size);
        if end <= start {
            return Ok(());
        }
        // SAFETY: the range lies inside the guest memory mapping, which
        // this shell owns; populating pages changes no contents.
        let rc = unsafe {
            libc::madvise(
                (self.machine.ram.host_addr + start) as *mut libc::c_void,
                (end - start) as usize,
                MADV_POPULATE_WRITE,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sets the vCPU's special registers now, for the system tables most
    /// images get at this memory size (page tables for the first GiBs and
    /// one table for the first 2 MiB, no device window): a waiting shell
    /// does it so that [`Shell::load`] has two fewer vCPU calls (~30 µs
    /// here). A load whose layout differs sets them as before.
    pub fn preset_sregs(&mut self) -> Result<(), VmError> {
        let size = self.machine.ram.size;
        let tables = 3 + size.div_ceil(layout::GIB);
        let gdt = layout::PAGE + tables * layout::PAGE;
        let t = vcpu::SystemTables {
            pml4: layout::PAGE,
            gdt,
            idt: gdt + layout::PAGE,
            tss: gdt + 2 * layout::PAGE,
        };
        let vcpu = &self.machine.vcpu;
        let sregs = vcpu::sregs_for(
            vcpu.get_sregs()
                .map_err(kvm_call("get special registers"))?,
            &t,
        );
        vcpu.set_sregs(&sregs)
            .map_err(kvm_call("set special registers"))?;
        self.preset = Some((sregs, t));
        Ok(())
    }

    /// Loads the vCPU's MMU ahead of the guest, after [`Shell::preset_sregs`]:
    /// fills KVM's per-vCPU caches of shadow page-table pages (~80 zeroed
    /// pages, which the first guest fault would otherwise allocate, on a
    /// host where a fresh page costs an outer-hypervisor fault) and
    /// allocates the root for the preset CR3. It is done with
    /// `KVM_PRE_FAULT_MEMORY`, which on a shadow-paging VM such as PVM's
    /// loads the MMU and then refuses (`EOPNOTSUPP`: pre-faulting is for
    /// two-dimensional paging); the refusal is expected and ignored, and a
    /// kernel that refuses earlier makes this a no-op, and on a host with
    /// two-dimensional paging it maps the first page of the image, the
    /// guest's own memory at its own address (harmless). Nothing of the
    /// guest's page tables is read: the root starts empty, so the tables
    /// the load writes later are what the guest's first faults walk. The
    /// root is thrown away (and built again at the first run) if the load
    /// sets other special registers.
    pub fn preload_mmu(&self) {
        /// `struct kvm_pre_fault_memory` (include/uapi/linux/kvm.h).
        #[repr(C)]
        struct PreFault {
            gpa: u64,
            size: u64,
            flags: u64,
            padding: [u64; 5],
        }
        let mut range = PreFault {
            gpa: wisp_abi::IMAGE_MIN_ADDR,
            size: layout::PAGE,
            flags: 0,
            padding: [0; 5],
        };
        // SAFETY: a vCPU ioctl on this shell's vCPU with a pointer to a
        // correctly sized and aligned struct that lives across the call.
        unsafe {
            libc::ioctl(
                self.machine.vcpu.as_raw_fd(),
                KVM_PRE_FAULT_MEMORY_IOCTL,
                &mut range,
            )
        };
    }

    /// Starts the thread that will run the vCPU ([`Worker`], under the vCPU
    /// filter) and has it call `KVM_RUN` once with `immediate_exit` set:
    /// KVM returns at once, without entering the guest, but first does
    /// what it does when a vCPU runs on a thread for the first time (on
    /// this host it starts the VM's `kvm-nx-lpage-recovery` worker). That
    /// is then done before the request, and the real first `KVM_RUN`, on
    /// the same thread, finds it done (another thread's would wait for an
    /// RCU grace period).
    pub fn vcpu_worker(&mut self, name: &str) -> Result<Arc<Worker>, WorkerError> {
        let fd = self.machine.vcpu.as_raw_fd();
        self.machine.vcpu.set_kvm_immediate_exit(1);
        let worker = Worker::spawn_with(name, ThreadKind::Vcpu, move || {
            // SAFETY: KVM_RUN on this shell's vCPU descriptor, which lives
            // as long as the shell; `immediate_exit` is set, so the guest
            // is not entered and the call ends with EINTR (ignored: the
            // real run reports any error). The shell's thread waits in
            // `spawn_with` meanwhile: nothing else uses the vCPU.
            unsafe { libc::ioctl(fd, KVM_RUN_IOCTL, 0) };
        });
        self.machine.vcpu.set_kvm_immediate_exit(0);
        worker
    }

    /// Loads `image` with its arguments: layout, segments, page tables,
    /// GDT/IDT/TSS and the vCPU's registers. `devices` says whether the
    /// device window must be mapped (whether devices will be attached).
    pub fn load(
        self,
        image: &Image,
        args: &[String],
        devices: bool,
        mut trace: Option<BootTrace>,
    ) -> Result<Loaded, VmError> {
        let Shell {
            machine,
            ready_at,
            preset,
        } = self;
        if let Some(t) = trace.as_mut() {
            t.mark_at("KVM VM, vCPU and memory created", ready_at);
        }
        let encoded = boot::encode_args(args);
        let layout = Layout::with_devices(image, machine.ram.size, encoded.len(), devices)?;
        let mem = &machine.ram.mem;
        boot::load_image(mem, image)?;
        boot::write_system(mem, &layout, image, &encoded)?;
        vcpu_thread::mark(&mut trace, "image loaded, page tables built");
        let tables = vcpu::SystemTables::of(&layout);
        match preset {
            // Set ahead for these very tables: nothing to do.
            Some((_, t)) if t == tables => {}
            // The vCPU holds `sregs`: only the tables change.
            Some((sregs, _)) => machine
                .vcpu
                .set_sregs(&vcpu::sregs_for(sregs, &tables))
                .map_err(kvm_call("set special registers"))?,
            None => vcpu::setup_sregs(&machine.vcpu, &layout)
                .map_err(kvm_call("set special registers"))?,
        }
        vcpu::setup_regs(
            &machine.vcpu,
            image.entry,
            image.manifest.stack_top,
            layout.boot_page,
        )
        .map_err(kvm_call("set registers"))?;
        // The device access map follows the page tables just written.
        let access = GuestAccess::for_guest(mem, &layout).tracking(machine.ram.dirty.clone());
        Ok(Loaded {
            access,
            machine,
            layout,
            args: encoded,
            argc: args.len(),
            required_devices: image.required_devices,
            devices: DeviceManager::default(),
            published: Vec::new(),
            trace,
        })
    }

    /// Every step from a configuration: checks, load, devices opened from
    /// the configuration's paths and ports, boot page.
    pub fn build(
        self,
        image: &Image,
        cfg: &VmConfig,
        trace: Option<BootTrace>,
    ) -> Result<Vm, VmError> {
        check(image, cfg)?;
        let devices = !cfg.nics.is_empty() || cfg.disk.is_some();
        let mut l = self.load(image, &cfg.args, devices, trace)?;
        attach_configured(&mut l.devices, &mut l.published, &l.machine, &l.access, cfg)?;
        l.finish(cfg.trace_boot)
    }
}

/// Opens the backends `cfg` names (user network or tap, disk file) and
/// attaches their devices in order: NICs, then the disk. Shared by a cold
/// boot and a restore, which must rebuild the same devices.
pub(crate) fn attach_configured(
    devices: &mut DeviceManager,
    published: &mut Vec<(std::net::SocketAddr, u16, bool)>,
    machine: &Machine,
    access: &GuestAccess,
    cfg: &VmConfig,
) -> Result<(), VmError> {
    for nic in &cfg.nics {
        let backend: Box<dyn NetBackend + Send> = match &nic.backend {
            BackendKind::User => {
                let u = UserNet::new(&cfg.publish).map_err(VmError::Net)?;
                published.extend(
                    u.local_addrs()
                        .into_iter()
                        .zip(cfg.publish.iter().filter(|p| !p.udp))
                        .map(|(a, p)| (a, p.guest_port, false)),
                );
                published.extend(
                    cfg.publish
                        .iter()
                        .filter(|p| p.udp)
                        .map(|p| (p.host, p.guest_port, true)),
                );
                Box::new(u)
            }
            BackendKind::Tap(name) => Box::new(Tap::open(name).map_err(VmError::Net)?),
        };
        devices.attach_net(
            &machine.vm,
            &machine.ram.mem,
            access.clone(),
            backend,
            nic,
            cfg.net_limits,
        )?;
    }
    if let Some(disk) = &cfg.disk {
        let mut block = Block::open(
            &disk.path,
            disk.read_only,
            machine.ram.mem.clone(),
            access.clone(),
        )
        .map_err(|e| VmError::Disk(disk.path.display().to_string(), e))?;
        block.limits = Limits::new(cfg.disk_limits.0, cfg.disk_limits.1);
        devices.attach_block(block)?;
    }
    Ok(())
}

/// Checks that `image` can run with `cfg`, before anything is created (a
/// bad `--memory` or a missing device fails without touching KVM).
pub fn check(image: &Image, cfg: &VmConfig) -> Result<(), VmError> {
    if image.required_devices & (1 << DEVICE_NET) != 0 && cfg.nics.is_empty() {
        return Err(VmError::MissingDevice(
            "network",
            "-p HOST:GUEST or --net user",
        ));
    }
    if image.required_devices & (1 << DEVICE_BLOCK) != 0 && cfg.disk.is_none() {
        return Err(VmError::MissingDevice("block", "--disk FILE"));
    }
    let devices = !cfg.nics.is_empty() || cfg.disk.is_some();
    Layout::with_devices(
        image,
        cfg.memory,
        boot::encode_args(&cfg.args).len(),
        devices,
    )?;
    Ok(())
}

/// An image loaded into a shell; devices can be attached.
pub struct Loaded {
    /// What devices may read and write: what the guest's CPU may.
    access: GuestAccess,
    machine: Machine,
    layout: Layout,
    args: Vec<u8>,
    argc: usize,
    required_devices: u64,
    devices: DeviceManager,
    published: Vec<(std::net::SocketAddr, u16, bool)>,
    trace: Option<BootTrace>,
}

impl Loaded {
    /// Attaches a NIC served by an already-open backend.
    pub fn attach_net(
        &mut self,
        backend: Box<dyn NetBackend + Send>,
        nic: &NicConfig,
        limits: (u64, u64),
    ) -> Result<(), VmError> {
        self.devices.attach_net(
            &self.machine.vm,
            &self.machine.ram.mem,
            self.access.clone(),
            backend,
            nic,
            limits,
        )?;
        Ok(())
    }

    /// What devices of this guest may access (for [`Block::open`]).
    pub fn access(&self) -> &GuestAccess {
        &self.access
    }

    /// Guest memory (for [`Block::open`]).
    pub fn memory(&self) -> &vm_memory::GuestMemoryMmap {
        &self.machine.ram.mem
    }

    /// Attaches a disk (open it with [`Block::open`] or from a file handed
    /// over by another process).
    pub fn attach_block(&mut self, block: Block) -> Result<(), VmError> {
        self.devices.attach_block(block)?;
        Ok(())
    }

    /// Writes the boot page (the clock is read last) and checks the image
    /// got the devices it requires.
    pub fn finish(mut self, trace_boot: bool) -> Result<Vm, VmError> {
        let kinds: u64 = self
            .devices
            .entries()
            .iter()
            .fold(0, |k, d| k | (1 << d.kind));
        if self.required_devices & (1 << DEVICE_NET) & !kinds != 0 {
            return Err(VmError::MissingDevice(
                "network",
                "-p HOST:GUEST or --net user",
            ));
        }
        if self.required_devices & (1 << DEVICE_BLOCK) & !kinds != 0 {
            return Err(VmError::MissingDevice("block", "--disk FILE"));
        }
        let vcpu = &self.machine.vcpu;
        let tsc_khz = vcpu.get_tsc_khz().map_err(kvm_call("get TSC frequency"))? as u64;
        let boot_tsc = vcpu::guest_tsc(vcpu).map_err(kvm_call("read guest TSC"))?;
        let boot_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        boot::write_boot_page(
            &self.machine.ram.mem,
            &self.layout,
            &self.args,
            self.argc,
            Clock {
                tsc_khz,
                boot_tsc,
                boot_unix_ns,
            },
            trace_boot,
            self.devices.entries(),
        )?;
        vcpu_thread::mark(&mut self.trace, "vCPU ready");
        Ok(Vm {
            boot_page: self.layout.boot_page,
            pml4: self.layout.pml4,
            machine: self.machine,
            layout: Some(self.layout),
            devices: self.devices,
            published: self.published,
            trace: self.trace,
        })
    }
}

/// A guest ready to start.
pub struct Vm {
    machine: Machine,
    /// `None` for a guest restored from a snapshot (which keeps only what
    /// it needs of its layout: the boot page and the page tables).
    layout: Option<Layout>,
    boot_page: u64,
    pml4: u64,
    devices: DeviceManager,
    published: Vec<(std::net::SocketAddr, u16, bool)>,
    trace: Option<BootTrace>,
}

/// How to start a guest.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// `--cpus`: the share of one CPU the guest may use.
    pub cpu_quota: Option<f64>,
    /// Run the guest's threads without seccomp filters (debugging only).
    pub no_seccomp: bool,
    /// Test hook: after its filter is on, this thread makes a forbidden
    /// system call (the filter must kill the process).
    pub seccomp_selftest: Option<ThreadKind>,
}

/// What a finished run reports.
pub struct RunReport {
    pub outcome: Outcome,
    pub trace: Option<BootTrace>,
    pub counters: CounterValues,
    /// The KVM VM and memory, still alive: drop it, or `mem::forget` it in a
    /// process about to exit to skip the teardown.
    pub machine: Machine,
}

type VcpuResult = (Result<Outcome, VmError>, Option<BootTrace>, Machine);

/// A started guest.
pub struct RunningVm {
    controller: Controller,
    /// What a snapshot of this guest reads besides its threads' state.
    pub(crate) source: crate::snapshot::Source,
    /// What a live migration of this guest tracks its memory with.
    pub(crate) tracker: crate::migration::Tracker,
    /// Written once the outcome is ready (for callers that wait in `poll`).
    done: Arc<vmm_sys_util::eventfd::EventFd>,
    results: std::sync::mpsc::Receiver<VcpuResult>,
    /// `None` when the guest runs on a [`crate::worker::Worker`].
    vcpu: Option<std::thread::JoinHandle<()>>,
    io: Option<std::thread::JoinHandle<()>>,
}

impl Vm {
    /// The layout the guest was given (`None` for a restored guest).
    pub fn layout(&self) -> Option<&Layout> {
        self.layout.as_ref()
    }

    /// A guest rebuilt from a snapshot (see [`crate::snapshot`]).
    pub(crate) fn restored(
        machine: Machine,
        boot_page: u64,
        pml4: u64,
        devices: DeviceManager,
        published: Vec<(std::net::SocketAddr, u16, bool)>,
    ) -> Vm {
        Vm {
            machine,
            layout: None,
            boot_page,
            pml4,
            devices,
            published,
            trace: None,
        }
    }

    /// Host addresses published on the user network: (address, guest port,
    /// UDP).
    pub fn published(&self) -> &[(std::net::SocketAddr, u16, bool)] {
        &self.published
    }

    /// Starts the guest on a vCPU thread (and an I/O thread if it has
    /// NICs), each under its own seccomp filter installed here before the
    /// thread does anything for the guest.
    pub fn start(
        self,
        console: Box<dyn Write + Send>,
        opts: StartOptions,
    ) -> Result<RunningVm, VmError> {
        self.start_on(console, opts, None)
    }

    /// [`Vm::start`], running the guest on `worker` (a thread started
    /// ahead, under the vCPU filter) when one is given and can take it: a
    /// CPU quota must be armed on the thread before its filter, so with
    /// one the vCPU thread is started here as usual.
    pub fn start_on(
        self,
        console: Box<dyn Write + Send>,
        opts: StartOptions,
        worker: Option<Arc<crate::worker::Worker>>,
    ) -> Result<RunningVm, VmError> {
        use crate::worker::SpawnOn;
        let worker = worker.filter(|w| {
            opts.cpu_quota.is_none()
                && !opts.no_seccomp
                && opts.seccomp_selftest.is_none()
                && w.filter() == ThreadKind::Vcpu
        });
        control::install_handlers().map_err(VmError::Thread)?;
        let source = crate::snapshot::Source::new(
            &self.machine.ram,
            self.boot_page,
            self.pml4,
            self.devices.entries(),
        )
        .map_err(VmError::Thread)?;
        let mut devices = self.devices;
        let tracker = crate::migration::Tracker::new(&self.machine, devices.take_listeners())?;
        let (bus, nics) = devices.split(&self.machine.vm, &self.machine.vcpu);
        let notice = control::ShutdownNotice {
            mem: self.machine.ram.mem.clone(),
            boot_page: self.boot_page,
        };
        let shared =
            Arc::new(Shared::new(!nics.is_empty(), Some(notice)).map_err(VmError::Thread)?);
        bus.set_disk_wake(Arc::new(vcpu_thread::ControlWake(shared.clone())));
        // Filters are built before any thread runs guest work.
        // A worker runs under the filter already.
        let vcpu_filter = (!opts.no_seccomp && worker.is_none())
            .then(|| seccomp::program(ThreadKind::Vcpu))
            .transpose()?;
        let io_filter = (!opts.no_seccomp && !nics.is_empty())
            .then(|| seccomp::program(ThreadKind::Io))
            .transpose()?;
        let selftest = opts.seccomp_selftest;
        let io = if nics.is_empty() {
            None
        } else {
            let io_thread = IoThread {
                nics,
                shared: shared.clone(),
                quota: None,
            };
            let io_quota = opts.cpu_quota;
            let sh = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("wisp-io".into())
                    .spawn(move || {
                        // Armed before the filter: creating a timer is not
                        // something a running I/O thread may do.
                        let mut io_thread = io_thread;
                        io_thread.quota = io_quota.and_then(|f| {
                            CpuQuota::arm_for_this_thread(f)
                                .map_err(|e| {
                                    crate::report(format_args!("wisp: I/O thread quota: {e}"))
                                })
                                .ok()
                        });
                        if let Some(f) = &io_filter {
                            if let Err(e) = seccomp::apply(f) {
                                crate::report(format_args!("wisp: I/O thread: {e}"));
                                Controller { shared: sh.clone() }.stop(StopReason::Requested);
                                sh.set_io(ThreadState::Ended);
                                return;
                            }
                        }
                        if selftest == Some(ThreadKind::Io) {
                            seccomp::forbidden_call();
                        }
                        io_thread.run()
                    })
                    .map_err(VmError::Thread)?,
            )
        };
        let (tx, results) = std::sync::mpsc::sync_channel(1);
        let done = Arc::new(
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::Thread)?,
        );
        let done_w = done.clone();
        let sh = shared.clone();
        let mut machine = self.machine;
        let trace = self.trace;
        let quota = opts.cpu_quota;
        let vcpu = std::thread::Builder::new()
            .name("wisp-vcpu".into())
            .spawn_on(worker, move || {
                let r = (|| {
                    vcpu_thread::register(&mut machine, &sh).map_err(VmError::Thread)?;
                    let quota = quota
                        .map(CpuQuota::arm_for_this_thread)
                        .transpose()
                        .map_err(VmError::Thread)?;
                    if let Some(f) = &vcpu_filter {
                        seccomp::apply(f)?;
                    }
                    if selftest == Some(ThreadKind::Vcpu) {
                        seccomp::forbidden_call();
                    }
                    Ok(quota)
                })();
                let mut t = VcpuThread {
                    machine,
                    bus,
                    shared: sh.clone(),
                    console,
                    trace,
                    quota: None,
                    console_limit: TokenBucket::new(CONSOLE_RATE, CONSOLE_BURST),
                    console_dropped: 0,
                    console_unread: 0,
                };
                let outcome = match r {
                    Ok(q) => {
                        t.quota = q;
                        t.run()
                    }
                    Err(e) => Err(e),
                };
                // The guest is over: the I/O thread stops too.
                {
                    let mut g = sh.lock();
                    g.vcpu = ThreadState::Ended;
                    if !matches!(g.request, Request::Stop(_)) {
                        g.request = Request::Stop(StopReason::Requested);
                    }
                }
                sh.changed.notify_all();
                let _ = sh.io_wake.write(1);
                control::register_vcpu_thread(std::ptr::null_mut());
                drop(t.quota.take());
                let _ = tx.send((outcome, t.trace.take(), t.machine));
                let _ = done_w.write(1);
            })
            .map_err(VmError::Thread)?;
        Ok(RunningVm {
            source,
            tracker,
            controller: Controller { shared },
            done,
            results,
            vcpu,
            io,
        })
    }
}

impl RunningVm {
    /// A handle to pause, resume or stop the guest from any thread.
    pub fn controller(&self) -> Controller {
        self.controller.clone()
    }

    /// A descriptor that becomes readable when the guest has ended (then
    /// [`RunningVm::wait`] returns at once).
    pub fn done_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.done.as_raw_fd()
    }

    /// Waits for the guest to end; after `timeout`, stops it (outcome
    /// [`Outcome::TimedOut`]).
    pub fn wait(self, timeout: Option<Duration>) -> Result<RunReport, VmError> {
        let got = match timeout {
            Some(t) => match self.results.recv_timeout(t) {
                Ok(r) => Some(r),
                Err(_) => {
                    self.controller.stop(StopReason::Timeout);
                    None
                }
            },
            None => None,
        };
        let got = match got {
            Some(r) => r,
            None => self.results.recv().map_err(|_| VmError::VcpuThreadDied)?,
        };
        if let Some(vcpu) = self.vcpu {
            let _ = vcpu.join();
        }
        if let Some(io) = self.io {
            let _ = io.join();
        }
        let (outcome, trace, machine) = got;
        Ok(RunReport {
            outcome: outcome?,
            trace,
            counters: self.controller.counters(),
            machine,
        })
    }
}
