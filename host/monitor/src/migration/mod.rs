//! Live migration: a running guest moves to another monitor over a
//! connection while it keeps running, and stops only for a short final
//! copy.
//!
//! ```text
//! send(&running, conn, opts)           receive(conn, size, &cfg) -> Vm
//!   dirty logging on (KVM slot flag      memory: a fresh memfd, written
//!   + the devices' own bitmap)           page by page as PAGES arrive
//!   round 0: every touched page   ---->
//!   rounds 1..: pages dirtied     ---->  (page numbers checked)
//!   since the last round, until few
//!   pause; vCPU + device state read
//!   last dirty pages + STATE      ---->  STATE decoded and checked as a
//!                                        snapshot's; restored from the
//!                                        memfd (clock re-based), built
//!   wait                          <----  READY (or FAILED)
//!   GO                            ---->  start (never without GO)
//!   wait                          <----  RUNNING (confirm)
//!   stop the guest (it runs there)
//! ```
//! Until RUNNING arrives, nothing is lost: any error (connection cut,
//! receiver killed, a FAILED reply, a timeout) switches tracking off and
//! resumes the guest where it was. The destination starts nothing before
//! GO, so a failure before GO leaves exactly one copy running (the
//! source's); only a cut between GO and RUNNING can leave two. The state sections are the snapshot's
//! ([`crate::snapshot`]), not a second format.
//!
//! What does not move: host connections of the user-mode network (their
//! sockets belong to this process; a client sees its connection reset or
//! closed when the source ends, and reconnects to the destination), and
//! the disk's contents (the destination opens the same file).

pub mod stream;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress};

use crate::control::{ControlError, StopReason, VmState};
use crate::memory::DirtyPages;
use crate::snapshot::parts::encode_state;
use crate::snapshot::{RestoreOptions, Snapshot, SnapshotError, VcpuState};
use crate::vm::{Machine, RunningVm, Vm, VmConfig, VmError};
use stream::{Conn, Kind, BATCH, PAGE};

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("the other side closed the connection")]
    Closed,
    #[error("connection: {0}")]
    Io(std::io::Error),
    #[error("no progress on the connection for {0:?}")]
    Timeout(Duration),
    #[error("the migration did not finish within {0:?}")]
    Deadline(Duration),
    #[error("bad migration stream: {0}")]
    Protocol(String),
    #[error("the destination refused the guest: {0}")]
    Refused(String),
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("controlling the guest: {0}")]
    Control(#[from] ControlError),
    #[error(transparent)]
    State(#[from] SnapshotError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("guest memory: {0}")]
    Memory(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MigrationError {
    move |source| MigrationError::Kvm { what, source }
}

/// How a running guest's memory is tracked during a migration: its own
/// handle on the KVM VM (the vCPU thread owns the original) to switch
/// dirty logging on the RAM slot and read the log, and the bitmap of
/// pages the devices write.
pub(crate) struct Tracker {
    vm: VmFd,
    dirty: Arc<DirtyPages>,
    host_addr: u64,
    size: u64,
    /// The published TCP listeners: released at the pause so that a
    /// destination on the same host can bind their ports.
    listeners: Vec<OwnedFd>,
}

impl Tracker {
    pub(crate) fn new(m: &Machine, listeners: Vec<OwnedFd>) -> Result<Tracker, VmError> {
        // SAFETY: dup of the VM descriptor we own; the result is checked.
        let fd = unsafe { libc::dup(m.vm.as_raw_fd()) };
        if fd < 0 {
            return Err(VmError::Thread(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor of a KVM VM, owned by nothing
        // else; the `VmFd` takes it over.
        let vm = match unsafe { crate::vm::host_kvm()?.create_vmfd_from_rawfd(fd) } {
            Ok(vm) => vm,
            Err(e) => {
                // SAFETY: `fd` is ours and not used after this.
                unsafe { libc::close(fd) };
                return Err(crate::vm::kvm_call("duplicate VM handle")(e));
            }
        };
        Ok(Tracker {
            vm,
            dirty: m.ram.dirty.clone(),
            host_addr: m.ram.host_addr,
            size: m.ram.size,
            listeners,
        })
    }

    /// Stops the published listeners listening (their ports stay bound,
    /// but a socket with `SO_REUSEADDR` may bind them now); connections
    /// not yet accepted are reset.
    fn release_ports(&self) {
        for l in &self.listeners {
            // SAFETY: shutdown of a socket we hold a handle on.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RD) };
        }
    }

    /// Makes the published listeners listen again (a failed migration);
    /// the first port that cannot be taken back is named.
    fn rebind_ports(&self) -> Result<(), String> {
        let mut failed = None;
        for l in &self.listeners {
            // SAFETY: listen on a bound socket we hold a handle on.
            let rc = unsafe { libc::listen(l.as_raw_fd(), crate::net::user::HOST_BACKLOG) };
            if rc != 0 && failed.is_none() {
                failed = Some(std::io::Error::last_os_error().to_string());
            }
        }
        failed.map_or(Ok(()), Err)
    }

    fn set_logging(&self, on: bool) -> Result<(), MigrationError> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.host_addr,
        };
        // SAFETY: the same slot, address and size the VM was given (the
        // memory lives as long as the VM); only the flags change.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(kvm("set dirty logging"))
    }

    /// Starts tracking: KVM's log on (and emptied), the devices' bitmap on.
    fn start(&self) -> Result<(), MigrationError> {
        self.set_logging(true)?;
        self.dirty.start();
        self.kvm_log()?;
        Ok(())
    }

    fn stop(&self) {
        self.dirty.stop();
        let _ = self.set_logging(false);
    }

    /// Pages the guest CPU wrote since the last call (KVM clears the log
    /// and protects them again).
    fn kvm_log(&self) -> Result<Vec<u64>, MigrationError> {
        self.vm
            .get_dirty_log(0, self.size as usize)
            .map_err(kvm("get dirty log"))
    }
}

/// How to send.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// The toolstack's description of the guest, sent first (the
    /// receiving toolstack reads it before it hands the stream on).
    pub meta: Vec<u8>,
    /// Most pre-copy rounds after the first full copy.
    pub max_rounds: u32,
    /// A round that finds at most this many dirty pages ends the pre-copy:
    /// they are sent with the guest paused.
    pub stop_pages: u64,
    /// Longest any one read or write may wait, and the wait for the
    /// destination's confirmation.
    pub timeout: Duration,
}

impl Default for SendOptions {
    fn default() -> SendOptions {
        SendOptions {
            meta: Vec::new(),
            max_rounds: 12,
            stop_pages: 64,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What a migration did.
#[derive(Clone, Debug, Default)]
pub struct SendReport {
    pub memory_size: u64,
    /// Pages sent in each pre-copy round (round 0 first).
    pub rounds: Vec<u64>,
    /// Pages sent with the guest paused.
    pub final_pages: u64,
    pub bytes_sent: u64,
    /// Request to the destination's confirmation.
    pub total: Duration,
    /// Pause to the destination's confirmation: how long the guest ran
    /// nowhere.
    pub downtime: Duration,
}

/// Migrates a running guest over `conn` (a connected stream socket to a
/// receiver): pre-copy rounds while it runs, then pause, the last pages
/// and the state, and, once the receiver says the guest runs there, stops
/// it here. On any error before that confirmation the guest is resumed
/// here (if it was running) and the error returned.
pub fn send(
    vm: &RunningVm,
    conn: &dyn AsRawFd,
    opts: &SendOptions,
) -> Result<SendReport, MigrationError> {
    let t0 = Instant::now();
    let ctl = vm.controller();
    let was_paused = match ctl.state() {
        VmState::Ended => return Err(ControlError::Ended.into()),
        s => s == VmState::Paused,
    };
    let mut c = Conn::new(conn, opts.timeout);
    let mut report = SendReport {
        memory_size: vm.source.memory_size(),
        ..Default::default()
    };
    let mut paused_at = None;
    let result = (|| {
        // Tracking is switched on with the guest paused (both threads out
        // of guest memory): a device that checked a write just before the
        // switch, and landed it after round 0 had copied the page, would
        // otherwise leave that write recorded nowhere. The pause's lock
        // hand-over also makes the switch visible to both threads.
        if !was_paused {
            ctl.pause()?;
        }
        let started = vm.tracker.start();
        if !was_paused {
            ctl.resume()?;
        }
        started?;
        c.write_header(report.memory_size)?;
        c.send(Kind::Meta, &[&opts.meta])?;
        // Round 0: everything the guest ever touched.
        let touched = vm
            .source
            .touched()
            .map_err(|e| MigrationError::Memory(e.to_string()))?;
        let first: Vec<u64> = touched
            .iter()
            .flat_map(|&(s, l)| (s / PAGE as u64)..((s + l) / PAGE as u64))
            .collect();
        send_pages(vm, &mut c, &first)?;
        sync(&mut c)?;
        report.rounds.push(first.len() as u64);
        let words = (report.memory_size / PAGE as u64).div_ceil(64) as usize;
        let mut pending;
        let mut round = 0;
        loop {
            let mut bits = vm.tracker.kvm_log()?;
            bits.resize(words, 0);
            vm.tracker.dirty.take_into(&mut bits);
            pending = bits;
            let n: u64 = pending.iter().map(|w| w.count_ones() as u64).sum();
            round += 1;
            if n <= opts.stop_pages || round > opts.max_rounds {
                break;
            }
            send_pages(vm, &mut c, &pages_of(&pending))?;
            sync(&mut c)?;
            report.rounds.push(n);
        }
        // Stop and copy.
        ctl.pause()?;
        paused_at = Some(Instant::now());
        vm.tracker.release_ports();
        let (cpu, devices) = ctl.on_paused_vcpu(|m: &mut Machine, bus| {
            (VcpuState::capture(&m.vcpu), bus.save_states())
        })?;
        let cpu = cpu.map_err(|(what, source)| MigrationError::Kvm { what, source })?;
        let mut last = vm.tracker.kvm_log()?;
        last.resize(words, 0);
        for (w, p) in last.iter_mut().zip(&pending) {
            *w |= p;
        }
        vm.tracker.dirty.take_into(&mut last);
        vm.tracker.dirty.ever_into(&mut last);
        // The used rings: devices write them without a check per write.
        for (t, _) in &devices {
            for q in &t.active {
                let len = 6 + 8 * u64::from(q.size);
                mark(&mut last, q.used_ring, len, report.memory_size);
            }
        }
        let last = pages_of(&last);
        send_pages(vm, &mut c, &last)?;
        report.final_pages = last.len() as u64;
        let sections = encode_state(&vm.source, &cpu, &devices)?;
        let mut state = Vec::new();
        for (_, b) in &sections {
            state.extend_from_slice(&(b.len() as u32).to_le_bytes());
            state.extend_from_slice(b);
        }
        c.send(Kind::State, &[&state])?;
        // The destination builds the guest but does not start it before
        // GO: a destination that is slow, fails or is cut off before GO
        // never runs it, and the guest resumes here.
        expect(&mut c, Kind::Ready)?;
        c.send(Kind::Go, &[])?;
        // From here until RUNNING is read, a cut connection leaves it open
        // whether the destination read GO: the guest resumes here, and
        // runs twice if it did (the window is the destination's start of
        // its threads and one write; see design.md).
        expect(&mut c, Kind::Running)
    })();
    report.bytes_sent = c.sent;
    match result {
        Ok(()) => {
            // The guest runs there: measured now, before the slot update
            // that switches logging off (KVM waits for its readers).
            report.total = t0.elapsed();
            report.downtime = paused_at.map_or(report.total, |p| p.elapsed());
            ctl.stop(StopReason::Requested);
            vm.tracker.stop();
            Ok(report)
        }
        Err(e) => {
            vm.tracker.stop();
            if paused_at.is_some() {
                if let Err(why) = vm.tracker.rebind_ports() {
                    crate::report(format_args!(
                        "wisp: migration failed, and a published port could not be taken back: {why}"
                    ));
                }
                if !was_paused {
                    let _ = ctl.resume();
                }
            }
            Err(e)
        }
    }
}

/// Waits until the receiver has taken in everything sent so far: the
/// next round's dirty set is then measured over a round that includes
/// the receiver's work, and the pause does not wait for a receiver still
/// behind (or still setting itself up).
fn sync(c: &mut Conn<'_>) -> Result<(), MigrationError> {
    c.send(Kind::Sync, &[])?;
    expect(c, Kind::Synced)
}

/// Reads the receiver's next reply, which must be `want` (FAILED is its
/// refusal).
fn expect(c: &mut Conn<'_>, want: Kind) -> Result<(), MigrationError> {
    match c.recv()? {
        (k, _) if k == want => Ok(()),
        (Kind::Failed, msg) => Err(MigrationError::Refused(
            String::from_utf8_lossy(&msg).into_owned(),
        )),
        (k, _) => Err(MigrationError::Protocol(format!(
            "the destination answered {k:?}, not {want:?}"
        ))),
    }
}

/// Sets the bits of the pages of `[addr, addr + len)` inside memory.
fn mark(bits: &mut [u64], addr: u64, len: u64, size: u64) {
    if len == 0 || addr >= size {
        return;
    }
    let last = addr.saturating_add(len - 1).min(size - 1) / PAGE as u64;
    for p in addr / PAGE as u64..=last {
        if let Some(w) = bits.get_mut((p / 64) as usize) {
            *w |= 1 << (p % 64);
        }
    }
}

fn pages_of(bits: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, &w) in bits.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            let b = w.trailing_zeros() as u64;
            out.push(i as u64 * 64 + b);
            w &= w - 1;
        }
    }
    out
}

/// Sends `pages` (numbers), read from guest memory now, in batches.
fn send_pages(vm: &RunningVm, c: &mut Conn<'_>, pages: &[u64]) -> Result<(), MigrationError> {
    let mem = vm.source.guest_memory();
    let mut data = vec![0u8; BATCH * PAGE];
    for batch in pages.chunks(BATCH) {
        let mut numbers = Vec::with_capacity(batch.len() * 8);
        for (i, &p) in batch.iter().enumerate() {
            numbers.extend_from_slice(&p.to_le_bytes());
            mem.read_slice(
                &mut data[i * PAGE..(i + 1) * PAGE],
                GuestAddress(p * PAGE as u64),
            )
            .map_err(|e| MigrationError::Memory(e.to_string()))?;
        }
        let count = (batch.len() as u32).to_le_bytes();
        c.send(
            Kind::Pages,
            &[&count, &numbers, &data[..batch.len() * PAGE]],
        )?;
    }
    Ok(())
}

/// Most SYNC messages a receiver takes (a sender's pre-copy rounds are
/// bounded: [`SendOptions::max_rounds`], 12 by default); page data is
/// bounded likewise, to this many times the guest's pages (plus two: the
/// first full copy and the final one).
pub const MAX_SYNCS: u32 = 64;

/// Longest a whole receive may take, from the first page to GO, however
/// each step progresses: a sender that trickles cannot hold a receiving
/// monitor for ever.
pub const RECEIVE_LIMIT: Duration = Duration::from_secs(600);

/// What a receive did.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReceiveReport {
    /// Distinct guest pages received.
    pub pages: u64,
    /// PAGES messages' pages, counting resends.
    pub pages_received: u64,
}

/// The start of an incoming stream: the header and the META message.
/// Returns the guest's memory size and the sender's meta bytes.
pub fn read_start(conn: &dyn AsRawFd, timeout: Duration) -> Result<(u64, Vec<u8>), MigrationError> {
    let mut c = Conn::new(conn, timeout);
    // The whole start, not each read of it, within `timeout`.
    c.deadline = Some((Instant::now() + timeout, timeout));
    let size = c.read_header()?;
    crate::layout::check_memory(size)
        .map_err(|e| MigrationError::Protocol(format!("memory size {size}: {e}")))?;
    match c.recv()? {
        (Kind::Meta, meta) => Ok((size, meta)),
        (k, _) => Err(MigrationError::Protocol(format!(
            "expected META, got {k:?}"
        ))),
    }
}

/// Receives the rest of a stream (after [`read_start`]) for a guest of
/// `mem_size` bytes and builds it as `cfg` says (its memory must be
/// `mem_size`; its devices must match the guest's): memory from the
/// stream, state checked and restored as a snapshot's, clock re-based.
/// Start the returned VM, then [`confirm`] (or [`refuse`] on an error).
pub fn receive(
    conn: &dyn AsRawFd,
    mem_size: u64,
    cfg: &VmConfig,
    timeout: Duration,
) -> Result<(Vm, ReceiveReport), MigrationError> {
    use std::os::unix::fs::FileExt;
    if cfg.memory != mem_size {
        return Err(MigrationError::Protocol(format!(
            "the stream's guest has {mem_size} bytes of memory, this monitor was given {}",
            cfg.memory
        )));
    }
    let mut c = Conn::new(conn, timeout);
    c.deadline = Some((Instant::now() + RECEIVE_LIMIT, RECEIVE_LIMIT));
    let file = crate::memory::memfd(mem_size).map_err(|e| MigrationError::Memory(e.to_string()))?;
    let pages = mem_size / PAGE as u64;
    let mut seen = vec![0u64; pages.div_ceil(64) as usize];
    let mut report = ReceiveReport::default();
    let mut syncs = 0u32;
    loop {
        match c.recv()? {
            (Kind::Pages, payload) => {
                let batch = stream::decode_pages(&payload, pages)?;
                if report.pages_received + batch.len() as u64 > pages * u64::from(MAX_SYNCS + 2) {
                    return Err(MigrationError::Protocol(format!(
                        "more than {} times the guest's pages sent",
                        MAX_SYNCS + 2
                    )));
                }
                for (n, bytes) in batch {
                    file.write_all_at(bytes, n * PAGE as u64)
                        .map_err(|e| MigrationError::Memory(e.to_string()))?;
                    report.pages_received += 1;
                    let w = &mut seen[(n / 64) as usize];
                    if *w & (1 << (n % 64)) == 0 {
                        *w |= 1 << (n % 64);
                        report.pages += 1;
                    }
                }
            }
            (Kind::Sync, _) => {
                syncs += 1;
                if syncs > MAX_SYNCS {
                    return Err(MigrationError::Protocol(format!(
                        "more than {MAX_SYNCS} pre-copy rounds"
                    )));
                }
                c.send(Kind::Synced, &[])?
            }
            (Kind::State, payload) => {
                let sections = stream::decode_state(&payload)?;
                let state = crate::snapshot::parts::decode_state(&sections, mem_size)?;
                let snap = Snapshot::from_parts(file, mem_size, report.pages, state);
                let vm = snap.restore(cfg, RestoreOptions::default())?;
                // Built, not started: it starts only once the sender has
                // committed (GO); without GO it is dropped here.
                c.send(Kind::Ready, &[])?;
                match c.recv()? {
                    (Kind::Go, _) => return Ok((vm, report)),
                    (k, _) => {
                        return Err(MigrationError::Protocol(format!("expected GO, got {k:?}")))
                    }
                }
            }
            (k, _) => {
                return Err(MigrationError::Protocol(format!(
                    "unexpected {k:?} message"
                )))
            }
        }
    }
}

/// Tells the sender the guest runs here (it then stops its copy).
pub fn confirm(conn: &dyn AsRawFd, timeout: Duration) -> Result<(), MigrationError> {
    Conn::new(conn, timeout).send(Kind::Running, &[])
}

/// Tells the sender the migration failed here (it resumes its guest).
pub fn refuse(conn: &dyn AsRawFd, error: &str, timeout: Duration) {
    let mut msg = error.as_bytes();
    msg = &msg[..msg.len().min(4000)];
    let _ = Conn::new(conn, timeout).send(Kind::Failed, &[msg]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_list_and_mark_pages() {
        let mut b = vec![0u64; 2];
        mark(&mut b, 4096 * 63, 4097, 4096 * 100);
        mark(&mut b, 4096 * 99, 1 << 20, 4096 * 100);
        assert_eq!(pages_of(&b), vec![63, 64, 99]);
        mark(&mut b, 4096 * 200, 10, 4096 * 100);
        assert_eq!(pages_of(&b).len(), 3);
    }

    fn config(memory: u64) -> VmConfig {
        VmConfig {
            memory,
            args: vec![],
            trace_boot: false,
            nics: vec![],
            publish: vec![],
            net_limits: (0, 0),
            disk_limits: (0, 0),
            disk: None,
        }
    }

    /// A sender that never ends its pre-copy (SYNC after SYNC, or the same
    /// pages again and again) is cut off after a bounded number.
    #[test]
    fn a_sender_that_never_stops_is_refused() {
        use std::os::unix::net::UnixStream;
        let t = Duration::from_secs(5);
        let size = 1 << 20;
        let (a, b) = UnixStream::pair().unwrap();
        let sender = std::thread::spawn(move || {
            let mut w = Conn::new(&a, t);
            for _ in 0..1000 {
                if w.send(Kind::Sync, &[]).is_err() || w.recv().is_err() {
                    break;
                }
            }
        });
        let e = receive(&b, size, &config(size), t).err().unwrap();
        assert!(e.to_string().contains("pre-copy rounds"), "{e}");
        sender.join().unwrap();

        let (a, b) = UnixStream::pair().unwrap();
        let sender = std::thread::spawn(move || {
            let mut w = Conn::new(&a, t);
            let mut p = 1u32.to_le_bytes().to_vec();
            p.extend_from_slice(&3u64.to_le_bytes());
            p.extend_from_slice(&[1u8; PAGE]);
            for _ in 0..100_000 {
                if w.send(Kind::Pages, &[&p]).is_err() {
                    break;
                }
            }
        });
        let e = receive(&b, size, &config(size), t).err().unwrap();
        assert!(e.to_string().contains("times the guest's pages"), "{e}");
        drop(b);
        sender.join().unwrap();
    }
}
