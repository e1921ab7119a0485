//! The vCPU thread: runs the guest and answers its few hypercalls, nothing
//! else. Devices' rings are the I/O thread's; the only device work done
//! here is a register access (rare) and a disk request at its notification.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress};

use crate::control::{self, Request, Shared, StopReason, ThreadState};
use crate::crash::Crash;
use crate::device_manager::MmioBus;
use crate::hypercall::{self, Hypercall};
use crate::quota::CpuQuota;
use crate::ratelimit::TokenBucket;
use crate::trace::BootTrace;
use crate::vm::{Machine, Outcome, VmError};

/// Console output a guest may write, per second and in one burst; the rest
/// is dropped (and counted), so a flooding guest costs the host neither
/// memory nor unbounded log space.
pub const CONSOLE_RATE: u64 = 1 << 20;
pub const CONSOLE_BURST: u64 = 4 << 20;

pub(crate) struct VcpuThread {
    pub machine: Machine,
    pub bus: MmioBus,
    pub shared: Arc<Shared>,
    pub console: Box<dyn Write + Send>,
    pub trace: Option<BootTrace>,
    pub quota: Option<CpuQuota>,
    pub console_limit: TokenBucket,
    pub console_dropped: u64,
    /// Console bytes dropped because the console's reader did not read.
    pub console_unread: u64,
}

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

impl VcpuThread {
    /// Runs the guest to its end; returns how it ended.
    pub fn run(&mut self) -> Result<Outcome, VmError> {
        mark(&mut self.trace, "guest entered");
        loop {
            match self.shared.request() {
                Request::Run => {}
                Request::Pause => {
                    self.complete_pending_exit()?;
                    self.shared.set_vcpu(ThreadState::Paused);
                    let r = self
                        .shared
                        .wait_while_paused_serving(&mut self.machine, &self.bus);
                    self.shared.set_vcpu(ThreadState::Running);
                    if let Request::Stop(reason) = r {
                        return self.stopped(reason);
                    }
                    continue;
                }
                Request::Stop(reason) => {
                    self.complete_pending_exit()?;
                    return self.stopped(reason);
                }
            }
            let exit = match self.machine.vcpu.run() {
                Ok(exit) => {
                    self.shared.counters.exits.fetch_add(1, Ordering::Relaxed);
                    // Register writes KVM buffered during the run come
                    // before whatever this exit is.
                    self.bus.drain();
                    exit
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.machine.vcpu.set_kvm_immediate_exit(0);
                    self.shared
                        .counters
                        .interruptions
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(owed) = self.quota.as_ref().and_then(CpuQuota::owed) {
                        wait_on(&self.shared, owed);
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
                    hypercall::decode(port, data, &self.machine.ram.mem, self.machine.ram.size)
                }
                VcpuExit::IoIn(port, data) => {
                    data.fill(0xff);
                    return Ok(crashed_protocol(format!(
                        "guest read from I/O port {port:#x}"
                    )));
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !self.bus.read(addr, data) {
                        return Ok(no_device(addr));
                    }
                    continue;
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !self.bus.write(addr, data) {
                        return Ok(no_device(addr));
                    }
                    // A disk request completes during its notification
                    // (this write): publish the disk's byte counts.
                    let (read, written) = self.bus.disk_bytes();
                    let c = &self.shared.counters;
                    c.disk_read_bytes.store(read, Ordering::Relaxed);
                    c.disk_write_bytes.store(written, Ordering::Relaxed);
                    continue;
                }
                VcpuExit::Shutdown => {
                    let regs = self
                        .machine
                        .vcpu
                        .get_regs()
                        .map_err(kvm_call("get registers"))?;
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
                    let regs = self
                        .machine
                        .vcpu
                        .get_regs()
                        .map_err(kvm_call("get registers"))?;
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
                Ok(Hypercall::Console { addr, len }) => self.console(addr, len)?,
                Ok(Hypercall::Wait { timeout_ns }) => self.wait(timeout_ns),
                Ok(Hypercall::Exit(status)) => {
                    // Frames the guest queued just before exiting still go
                    // out: the I/O thread sends them as it stops.
                    self.report_dropped();
                    mark(&mut self.trace, "guest exited");
                    self.console.flush().map_err(VmError::Console)?;
                    return Ok(Outcome::Exited(status));
                }
                Ok(Hypercall::Crash(report)) => {
                    let cr2 = self
                        .machine
                        .vcpu
                        .get_sregs()
                        .map_err(kvm_call("get special registers"))?
                        .cr2;
                    self.console.flush().map_err(VmError::Console)?;
                    return Ok(Outcome::Crashed(Crash::Exception { report, cr2 }));
                }
                Ok(Hypercall::Mark(m)) => {
                    if m == wisp_abi::hypercall::MARK_MAIN {
                        let now = control::monotonic_ns();
                        let reached = now.saturating_sub(self.since_mark_ns());
                        let _ = (self.shared.main_exit_ns).compare_exchange(
                            0,
                            now,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                        let _ = (self.shared.main_reached_ns).compare_exchange(
                            0,
                            reached,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                        // Taken and released so that a waiter either saw
                        // the time or is in its wait when notified.
                        drop(self.shared.lock());
                        self.shared.changed.notify_all();
                    }
                    mark(&mut self.trace, "guest main() reached")
                }
                Err(e) => return Ok(crashed_protocol(e.to_string())),
            }
        }
    }

    /// How long ago (ns) the guest reached the mark it reports now, from
    /// the TSC it passed in `rsi` and the vCPU's TSC now; 0 when the value
    /// is unusable (absent, in the future, or more than a second old: the
    /// guest controls it, so it only ever moves the time back that far).
    fn since_mark_ns(&self) -> u64 {
        let vcpu = &self.machine.vcpu;
        // The TSC rate from the boot page's clock record (read-only to
        // the guest): the vCPU filter allows no KVM_GET_TSC_KHZ.
        let khz = self.shared.notice.as_ref().and_then(|n| {
            let at = n.boot_page + core::mem::offset_of!(wisp_abi::boot::BootPage, tsc_khz) as u64;
            n.mem.read_obj::<u64>(GuestAddress(at)).ok()
        });
        let (Ok(regs), Some(khz), Ok(now)) = (vcpu.get_regs(), khz, crate::vcpu::guest_tsc(vcpu))
        else {
            return 0;
        };
        let at = regs.rsi;
        if at == 0 || at > now || khz == 0 {
            return 0;
        }
        let ns = (now - at) as u128 * 1_000_000 / khz as u128;
        if ns > 1_000_000_000 {
            return 0;
        }
        ns as u64
    }

    fn console(&mut self, addr: u64, len: u64) -> Result<(), VmError> {
        // A flood is cut to the console's rate, not buffered.
        let allowed = self.console_limit.take_up_to(len);
        if allowed < len {
            self.console_dropped += len - allowed;
        } else {
            self.report_over_rate();
        }
        let mut buf = vec![0u8; allowed as usize];
        if self
            .machine
            .ram
            .mem
            .read_slice(&mut buf, GuestAddress(addr))
            .is_ok()
        {
            self.write_console(&buf)?;
        }
        Ok(())
    }

    /// Writes `buf` to the console; what a console that would block does
    /// not take (a reader that does not read, see [`crate::console`]) is
    /// dropped and counted, so that the guest is not held by its reader.
    fn write_console(&mut self, mut buf: &[u8]) -> Result<(), VmError> {
        while !buf.is_empty() {
            match self.console.write(buf) {
                Ok(0) => return Err(VmError::Console(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.console_unread += buf.len() as u64;
                    return Ok(());
                }
                Err(e) => return Err(VmError::Console(e)),
            }
        }
        // The reader reads again: what it missed is reported once.
        self.report_unread();
        Ok(())
    }

    /// Reports every console byte dropped and not yet reported.
    fn report_dropped(&mut self) {
        self.report_over_rate();
        self.report_unread();
    }

    fn report_over_rate(&mut self) {
        if self.console_dropped > 0 {
            crate::report(format_args!(
                "wisp: {} bytes of guest console output dropped (limit {} KiB/s)",
                std::mem::take(&mut self.console_dropped),
                CONSOLE_RATE >> 10
            ));
        }
    }

    fn report_unread(&mut self) {
        if self.console_unread > 0 {
            crate::report(format_args!(
                "wisp: {} bytes of guest console output dropped (its reader did not read for {} ms)",
                std::mem::take(&mut self.console_unread),
                crate::console::STALL_LIMIT.as_millis()
            ));
        }
    }

    /// The guest has nothing to do until `timeout_ns` or an event: block
    /// here (this exit is the only one an idle guest makes) unless the I/O
    /// thread delivered something since the guest last looked.
    fn wait(&mut self, timeout_ns: u64) {
        let s = &self.shared;
        s.counters.waits.fetch_add(1, Ordering::Relaxed);
        self.bus.kick_pending_tx();
        s.guest_waiting.store(true, Ordering::SeqCst);
        if !s.events.swap(false, Ordering::SeqCst) && s.request() == Request::Run {
            s.counters.blocked_waits.fetch_add(1, Ordering::Relaxed);
            wait_on(s, Duration::from_nanos(timeout_ns));
        }
        s.guest_waiting.store(false, Ordering::SeqCst);
        // The guest looks at its rings when it returns: what was delivered
        // until now is seen then.
        s.events.store(false, Ordering::SeqCst);
    }

    /// Re-enters `KVM_RUN` with `immediate_exit` set: KVM completes a
    /// pending port-I/O or MMIO exit and returns at once, leaving the vCPU's
    /// state consistent (the instruction retired).
    fn complete_pending_exit(&mut self) -> Result<(), VmError> {
        self.machine.vcpu.set_kvm_immediate_exit(1);
        let r = self.machine.vcpu.run().map(|_| ());
        self.machine.vcpu.set_kvm_immediate_exit(0);
        match r {
            Err(e) if e.errno() != libc::EINTR && e.errno() != libc::EAGAIN => {
                Err(VmError::KvmCall {
                    what: "complete pending exit",
                    source: e,
                })
            }
            _ => Ok(()),
        }
    }

    fn stopped(&mut self, reason: StopReason) -> Result<Outcome, VmError> {
        let rip = self
            .machine
            .vcpu
            .get_regs()
            .map_err(kvm_call("get registers"))?
            .rip;
        self.report_dropped();
        let _ = self.console.flush();
        Ok(match reason {
            StopReason::Timeout => Outcome::TimedOut { rip },
            StopReason::Requested => Outcome::Stopped { rip },
        })
    }
}

/// Blocks on the vCPU's wake eventfd for at most `d` (a delivery or a
/// control request ends it early).
fn wait_on(s: &Shared, d: Duration) {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: s.vcpu_wake.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: d.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd and a valid timespec; no signal mask change.
    unsafe { libc::ppoll(&mut fd, 1, &ts, std::ptr::null()) };
    let _ = s.vcpu_wake.read();
}

/// Ends a disk's rate-limit wait on the vCPU thread when a control
/// request (pause, stop, a job for the paused vCPU) is made: the request
/// in flight then goes through without the rest of its wait (counted
/// against the limit), and the thread answers the request.
pub(crate) struct ControlWake(pub Arc<Shared>);

impl crate::ratelimit::Wake for ControlWake {
    fn sleep(&self, d: Duration) -> bool {
        let needed = || self.0.request() != Request::Run;
        if needed() {
            return true;
        }
        // A request sets itself, then writes the eventfd: one made after
        // the check above ends this wait.
        wait_on(&self.0, d);
        needed()
    }
}

fn no_device(addr: u64) -> Outcome {
    crashed_protocol(format!(
        "guest accessed {addr:#x}, where there is no memory or device"
    ))
}

fn crashed_protocol(msg: String) -> Outcome {
    Outcome::Crashed(Crash::Protocol(msg))
}

pub(crate) fn mark(trace: &mut Option<BootTrace>, stage: &'static str) {
    if let Some(t) = trace {
        t.mark(stage);
    }
}

/// Registers the calling thread as `machine`'s vCPU thread for kicks.
pub(crate) fn register(machine: &mut Machine, shared: &Shared) -> std::io::Result<()> {
    control::install_handlers()?;
    let p: *mut u8 = &mut machine.vcpu.get_kvm_run().immediate_exit;
    control::register_vcpu_thread(p);
    shared.vcpu_tid.store(control::gettid(), Ordering::SeqCst);
    Ok(())
}
