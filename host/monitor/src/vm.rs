//! One guest: create the KVM VM, lay out and fill its memory, set up its
//! vCPU, and run it while serving hypercalls.

use std::io::Write;
use std::time::Duration;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::boot::{self, BootError, Clock};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::VirtioMmio;
use crate::devices::virtio::net::Net;
use crate::devices::{MmioDevice, MMIO_BASE, MMIO_WINDOW};
use crate::net::tap::Tap;
use crate::net::user::{PortForward, UserNet};
use crate::net::{BackendKind, NetBackend, NicConfig};
use crate::ratelimit::{Limits, TokenBucket};
use wisp_abi::boot::Device;
use wisp_abi::manifest::{DEVICE_BLOCK, DEVICE_NET};

/// MAC address of the guest's NIC (locally administered).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
use crate::crash::Crash;
use crate::hypercall::{self, Hypercall};
use crate::image::Image;
use crate::kvm::{self, KvmError};
use crate::layout::{Layout, LayoutError};
use crate::timeout::{CpuQuota, Deadline};
use crate::trace::BootTrace;
use crate::vcpu;

/// How to run a guest.
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
}

impl Outcome {
    /// The exit status `wisp run` reports.
    pub fn status(&self) -> u8 {
        match self {
            Outcome::Exited(s) => *s,
            Outcome::Crashed(_) => wisp_abi::exit::CRASH,
            Outcome::TimedOut { .. } => wisp_abi::exit::TIMEOUT,
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
    #[error("cannot allocate {size} bytes of guest memory: {reason}")]
    Memory { size: u64, reason: String },
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
}

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

/// A KVM VM with one vCPU and nothing else yet: no memory, no image.
///
/// Creating it is the most expensive step of a cold boot on KVM PVM
/// (~0.2 ms for the VM, ~0.2-0.3 ms for the vCPU) and needs nothing from
/// the image, so a daemon can keep a pool of them ready (LightVM's
/// "shells"); `wisp run` creates one after validating the image.
pub struct Shell {
    vm: VmFd,
    vcpu: VcpuFd,
    ready_at: std::time::Instant,
}

impl Shell {
    /// Opens KVM and creates the VM and its vCPU.
    pub fn create() -> Result<Shell, VmError> {
        let kvm = kvm::open()?;
        let vm = kvm.create_vm().map_err(kvm_call("create VM"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_call("create vCPU"))?;
        Ok(Shell {
            vm,
            vcpu,
            ready_at: std::time::Instant::now(),
        })
    }
}

/// A guest ready to run.
pub struct Vm {
    // Field order is drop order: the vCPU before the VM, the VM (and its
    // memory slot) before the memory it maps.
    vcpu: VcpuFd,
    _vm: VmFd,
    mem: GuestMemoryMmap,
    layout: Layout,
    trace: Option<BootTrace>,
    /// Exits from `KVM_RUN` to this monitor (each costs 80-110 µs on PVM).
    exits: u64,
    /// The guest's devices, by MMIO base address.
    bus: Vec<(u64, BusDevice)>,
    console_limit: TokenBucket,
    /// `--cpus`: the share of a CPU the guest may use.
    cpu_quota: Option<CpuQuota>,
    /// Console bytes dropped by the rate limit, not yet reported.
    console_dropped: u64,
}

impl Vm {
    /// Validates that `image` fits `cfg`, then builds the VM. Cheap checks
    /// come first so a bad `--memory` fails before KVM is touched.
    pub fn new(
        shell: Shell,
        image: &Image,
        cfg: &VmConfig,
        mut trace: Option<BootTrace>,
    ) -> Result<Vm, VmError> {
        let args = boot::encode_args(&cfg.args);
        if image.required_devices & (1 << DEVICE_NET) != 0 && cfg.nics.is_empty() {
            return Err(VmError::MissingDevice(
                "network",
                "-p HOST:GUEST or --net user",
            ));
        }
        if image.required_devices & (1 << DEVICE_BLOCK) != 0 && cfg.disk.is_none() {
            return Err(VmError::MissingDevice("block", "--disk FILE"));
        }
        let has_devices = !cfg.nics.is_empty() || cfg.disk.is_some();
        let layout = Layout::with_devices(image, cfg.memory, args.len(), has_devices)?;
        let Shell { vm, vcpu, ready_at } = shell;
        if let Some(t) = trace.as_mut() {
            t.mark_at("KVM VM and vCPU created", ready_at);
        }

        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), layout.mem_size as usize)])
                .map_err(|e| VmError::Memory {
                    size: layout.mem_size,
                    reason: e.to_string(),
                })?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| VmError::Memory {
                size: layout.mem_size,
                reason: e.to_string(),
            })?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: layout.mem_size,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` maps `mem_size` bytes owned by `mem`, which outlives
        // the VM (field order in `Vm`); the slot is new and covers exactly it.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_call("set memory region"))?;
        mark(&mut trace, "guest memory mapped");

        boot::load_image(&mem, image)?;
        boot::write_system(&mem, &layout, image, &args)?;
        mark(&mut trace, "image loaded, page tables built");

        vcpu::setup_sregs(&vcpu, &layout).map_err(kvm_call("set special registers"))?;
        vcpu::setup_regs(
            &vcpu,
            image.entry,
            image.manifest.stack_top,
            layout.boot_page,
        )
        .map_err(kvm_call("set registers"))?;
        let tsc_khz = vcpu.get_tsc_khz().map_err(kvm_call("get TSC frequency"))? as u64;
        let boot_tsc = vcpu::guest_tsc(&vcpu).map_err(kvm_call("read guest TSC"))?;
        let boot_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let clock = Clock {
            tsc_khz,
            boot_tsc,
            boot_unix_ns,
        };
        let mut devices = Vec::new();
        let mut bus = Vec::new();
        let access = crate::devices::guest_access::GuestAccess::for_guest(&mem, &layout);
        for (i, nic) in cfg.nics.iter().enumerate() {
            let backend: Box<dyn NetBackend> = match &nic.backend {
                BackendKind::User => Box::new(UserNet::new(&cfg.publish).map_err(VmError::Net)?),
                BackendKind::Tap(name) => Box::new(Tap::open(name).map_err(VmError::Net)?),
            };
            let mut mac = GUEST_MAC;
            mac[5] = mac[5].wrapping_add(i as u8);
            let mut d = Device::new(DEVICE_NET);
            d.mmio_base = MMIO_BASE + bus.len() as u64 * MMIO_WINDOW;
            d.mmio_len = MMIO_WINDOW;
            d.mac[..6].copy_from_slice(&mac);
            d.ipv4 = nic.ip.octets();
            d.gateway = nic.gateway.octets();
            d.prefix_len = nic.prefix_len as u32;
            d.dns = nic.dns.map_or([0; 4], |a| a.octets());
            devices.push(d);
            bus.push((
                d.mmio_base,
                BusDevice::Net(VirtioMmio::new({
                    let mut net = Net::new(mac, mem.clone(), access.clone(), backend);
                    net.tx_limits = Limits::new(cfg.net_limits.0, cfg.net_limits.1);
                    net.rx_limits = Limits::new(cfg.net_limits.0, cfg.net_limits.1);
                    net
                })),
            ));
        }
        if let Some(disk) = &cfg.disk {
            let block = Block::open(&disk.path, disk.read_only, mem.clone(), access.clone())
                .map_err(|e| VmError::Disk(disk.path.display().to_string(), e))?;
            let mut d = Device::new(DEVICE_BLOCK);
            d.mmio_base = MMIO_BASE + bus.len() as u64 * MMIO_WINDOW;
            d.mmio_len = MMIO_WINDOW;
            d.capacity = block.capacity_bytes();
            devices.push(d);
            let mut block = block;
            block.limits = Limits::new(cfg.disk_limits.0, cfg.disk_limits.1);
            bus.push((d.mmio_base, BusDevice::Block(VirtioMmio::new(block))));
        }
        boot::write_boot_page(
            &mem,
            &layout,
            &args,
            cfg.args.len(),
            clock,
            cfg.trace_boot,
            &devices,
        )?;
        mark(&mut trace, "vCPU ready");
        Ok(Vm {
            vcpu,
            _vm: vm,
            mem,
            layout,
            trace,
            exits: 0,
            bus,
            console_limit: TokenBucket::new(CONSOLE_RATE, CONSOLE_BURST),
            console_dropped: 0,
            cpu_quota: None,
        })
    }

    /// The layout the guest was given.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Sends what the guest's NICs have queued (the guest does not notify
    /// for transmit: frames go out at its exits).
    fn flush_network(&mut self) {
        for (_, dev) in &mut self.bus {
            if let BusDevice::Net(n) = dev {
                n.device.process_tx();
                n.device.backend().poll();
            }
        }
    }

    /// Holds the guest to `fraction` of one CPU from now on.
    pub fn limit_cpu(&mut self, fraction: f64) -> std::io::Result<()> {
        self.cpu_quota = Some(CpuQuota::arm(fraction)?);
        Ok(())
    }

    /// How many times the guest exited to the monitor so far.
    pub fn exits(&self) -> u64 {
        self.exits
    }

    /// The boot trace, once the guest has run.
    pub fn trace(&self) -> Option<&BootTrace> {
        self.trace.as_ref()
    }

    /// Runs the guest until it exits, crashes or passes `deadline`,
    /// writing its console output to `console`.
    pub fn run(
        &mut self,
        console: &mut dyn Write,
        deadline: &Deadline,
    ) -> Result<Outcome, VmError> {
        mark(&mut self.trace, "guest entered");
        loop {
            if deadline.expired() {
                let rip = self.vcpu.get_regs().map_err(kvm_call("get registers"))?.rip;
                return Ok(Outcome::TimedOut { rip });
            }
            let exit = match self.vcpu.run() {
                Ok(exit) => {
                    self.exits += 1;
                    exit
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if let Some(q) = &self.cpu_quota {
                        q.throttle();
                    }
                    continue;
                }
                Err(e) => {
                    return Err(VmError::KvmCall {
                        what: "run vCPU",
                        source: e,
                    })
                }
            };
            let call = match exit {
                VcpuExit::IoOut(port, data) => {
                    hypercall::decode(port, data, &self.mem, self.layout.mem_size)
                }
                VcpuExit::IoIn(port, data) => {
                    data.fill(0xff);
                    return Ok(crashed_protocol(format!(
                        "guest read from I/O port {port:#x}"
                    )));
                }
                VcpuExit::MmioRead(addr, data) => {
                    match find_device(&mut self.bus, addr) {
                        Some((dev, offset)) => dev.read(offset, data),
                        None => return Ok(no_device(addr)),
                    }
                    continue;
                }
                VcpuExit::MmioWrite(addr, data) => {
                    let data = data.to_vec();
                    match find_device(&mut self.bus, addr) {
                        Some((dev, offset)) => dev.write(offset, &data),
                        None => return Ok(no_device(addr)),
                    }
                    continue;
                }
                VcpuExit::Shutdown => {
                    let regs = self.vcpu.get_regs().map_err(kvm_call("get registers"))?;
                    return Ok(Outcome::Crashed(Crash::TripleFault {
                        rip: regs.rip,
                        rsp: regs.rsp,
                    }));
                }
                VcpuExit::Hlt => return Ok(crashed_protocol("guest halted".into())),
                VcpuExit::FailEntry(reason, _) => {
                    return Ok(Outcome::Crashed(Crash::Internal(format!(
                        "KVM entry failure, reason {reason:#x}"
                    ))));
                }
                VcpuExit::InternalError => {
                    let regs = self.vcpu.get_regs().map_err(kvm_call("get registers"))?;
                    return Ok(Outcome::Crashed(Crash::Internal(format!(
                        "KVM internal error (emulation failure?) at rip {:#x}",
                        regs.rip
                    ))));
                }
                VcpuExit::Intr => continue,
                other => {
                    return Ok(Outcome::Crashed(Crash::Internal(format!(
                        "unexpected KVM exit {other:?}"
                    ))))
                }
            };
            match call {
                Ok(Hypercall::Console { addr, len }) => {
                    // A flood is cut to the console's rate, not buffered.
                    let allowed = self.console_limit.take_up_to(len);
                    if allowed < len {
                        self.console_dropped += len - allowed;
                    } else if self.console_dropped > 0 {
                        report_dropped(&mut self.console_dropped);
                    }
                    let len = allowed;
                    let mut buf = vec![0u8; len as usize];
                    if self.mem.read_slice(&mut buf, GuestAddress(addr)).is_err() {
                        return Ok(crashed_protocol(format!(
                            "console buffer {addr:#x}+{len} unreadable"
                        )));
                    }
                    console.write_all(&buf).map_err(VmError::Console)?;
                }
                Ok(Hypercall::Wait { timeout_ns }) => {
                    let mut d = Duration::from_nanos(timeout_ns);
                    if let Some(left) = deadline.remaining() {
                        d = d.min(left);
                    }
                    let mut nics: Vec<&mut Net> = self
                        .bus
                        .iter_mut()
                        .filter_map(|(_, dev)| match dev {
                            BusDevice::Net(n) => Some(&mut n.device),
                            _ => None,
                        })
                        .collect();
                    if nics.is_empty() {
                        std::thread::sleep(d);
                    } else {
                        wait_for_network(&mut nics, d);
                    }
                }
                Ok(Hypercall::Exit(status)) => {
                    // Frames the guest queued just before exiting still go out.
                    self.flush_network();
                    if self.console_dropped > 0 {
                        report_dropped(&mut self.console_dropped);
                    }
                    mark(&mut self.trace, "guest exited");
                    console.flush().map_err(VmError::Console)?;
                    return Ok(Outcome::Exited(status));
                }
                Ok(Hypercall::Crash(report)) => {
                    let cr2 = self
                        .vcpu
                        .get_sregs()
                        .map_err(kvm_call("get special registers"))?
                        .cr2;
                    console.flush().map_err(VmError::Console)?;
                    return Ok(Outcome::Crashed(Crash::Exception { report, cr2 }));
                }
                Ok(Hypercall::Mark(_)) => mark(&mut self.trace, "guest main() reached"),
                Err(e) => return Ok(crashed_protocol(e.to_string())),
            }
        }
    }
}

/// A device on the MMIO bus.
enum BusDevice {
    Net(VirtioMmio<Net>),
    Block(VirtioMmio<Block>),
}

impl BusDevice {
    fn mmio(&mut self) -> &mut dyn MmioDevice {
        match self {
            BusDevice::Net(d) => d,
            BusDevice::Block(d) => d,
        }
    }
}

/// The device whose window holds `addr`, and the offset into it.
fn find_device(bus: &mut [(u64, BusDevice)], addr: u64) -> Option<(&mut dyn MmioDevice, u64)> {
    bus.iter_mut()
        .find(|(base, _)| (*base..*base + MMIO_WINDOW).contains(&addr))
        .map(|(base, dev)| {
            let offset = addr - *base;
            (dev.mmio(), offset)
        })
}

/// Console output a guest may write, per second and in one burst; the rest
/// is dropped (and counted), so a flooding guest costs the host neither
/// memory nor unbounded log space.
pub const CONSOLE_RATE: u64 = 1 << 20;
pub const CONSOLE_BURST: u64 = 4 << 20;

fn report_dropped(dropped: &mut u64) {
    crate::report(format_args!(
        "wisp: {} bytes of guest console output dropped (limit {} KiB/s)",
        std::mem::take(dropped),
        CONSOLE_RATE >> 10
    ));
}

fn no_device(addr: u64) -> Outcome {
    crashed_protocol(format!(
        "guest accessed {addr:#x}, where there is no memory or device"
    ))
}

/// Serves the network while the guest waits: returns as soon as frames were
/// delivered to the guest, or after `timeout`.
fn wait_for_network(nics: &mut [&mut Net], timeout: Duration) {
    // Send what the guest queued (it does not notify: see Net::process_tx);
    // frames handed over during an earlier exit may not have been seen.
    let mut unseen = false;
    for net in nics.iter_mut() {
        net.process_tx();
        net.backend().poll();
        if net.process_rx() > 0 {
            unseen = true;
        }
        unseen |= net.take_delivered_since_wait();
    }
    if unseen {
        return;
    }
    let until = std::time::Instant::now() + timeout;
    loop {
        let mut delivered = 0;
        for net in nics.iter_mut() {
            net.backend().poll();
            delivered += net.process_rx();
        }
        if delivered > 0 {
            return;
        }
        let now = std::time::Instant::now();
        if now >= until {
            return;
        }
        let mut wait = until - now;
        let mut fds: Vec<libc::pollfd> = Vec::new();
        for net in nics.iter_mut() {
            if let Some(d) = net.rx_delay() {
                wait = wait.min(d.max(Duration::from_millis(1)));
            }
            if let Some(t) = net.backend().next_timeout() {
                wait = wait.min(t);
            }
            fds.extend(net.backend().fds().into_iter().map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            }));
        }
        let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that
        // outlives the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    }
}

fn crashed_protocol(msg: String) -> Outcome {
    Outcome::Crashed(Crash::Protocol(msg))
}

fn mark(trace: &mut Option<BootTrace>, stage: &'static str) {
    if let Some(t) = trace {
        t.mark(stage);
    }
}
