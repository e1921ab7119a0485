//! The vCPU's state in a snapshot: general and special registers, FPU and
//! extended state (XSAVE, XCRs), pending events and the MSRs a guest can
//! change, the TSC among them.
//!
//! Read on the paused vCPU thread (the only one that uses the `VcpuFd`
//! while the guest lives); written on a fresh vCPU before it first runs.
//! The TSC is saved but not written back: on KVM PVM the guest's `rdtsc`
//! runs natively at CPL3 and reads the host's TSC, which no TSC offset
//! (`IA32_TSC`, `KVM_CAP_TSC_CONTROL`: absent here) changes, and writing
//! the MSR would only make KVM's view disagree with the guest's. The
//! restore re-bases the guest's clocks in the boot page's clock record
//! instead, from the saved TSC (the monotonic clock continues from its
//! value at the save) and the new host's.

use kvm_bindings::{
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use zerocopy::{FromBytes, IntoBytes};

use super::format::{Reader, Writer};
use super::SnapshotError;

pub const MSR_IA32_TSC: u32 = 0x10;

/// MSRs saved (those this host does not have are left out at the save).
const MSRS: &[u32] = &[
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    MSR_IA32_TSC,
];

/// One vCPU's state.
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    /// `None` where the host has no `KVM_GET_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    pub events: kvm_vcpu_events,
    pub msrs: Vec<(u32, u64)>,
}

type KvmResult<T> = Result<T, (&'static str, kvm_ioctls::Error)>;

fn tag<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> KvmResult<T> {
    r.map_err(|e| (what, e))
}

fn msrs_of(indices: &[u32], values: Option<&[(u32, u64)]>) -> KvmResult<Msrs> {
    let entries: Vec<kvm_msr_entry> = match values {
        Some(v) => v
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect(),
        None => indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect(),
    };
    tag(
        "build MSR list",
        Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::EINVAL)),
    )
}

impl VcpuState {
    /// Reads the state of a vCPU that is out of `KVM_RUN` with its pending
    /// exit completed.
    pub fn capture(vcpu: &VcpuFd) -> KvmResult<VcpuState> {
        let regs = tag("get registers", vcpu.get_regs())?;
        let sregs = tag("get special registers", vcpu.get_sregs())?;
        let xsave = tag("get XSAVE state", vcpu.get_xsave())?;
        let xcrs = vcpu.get_xcrs().ok();
        let events = tag("get vCPU events", vcpu.get_vcpu_events())?;
        // KVM_GET_MSRS stops at the first MSR it cannot read: leave that one
        // out and read on.
        let mut wanted: Vec<u32> = MSRS.to_vec();
        let mut msrs = Vec::with_capacity(wanted.len());
        while !wanted.is_empty() {
            let mut list = msrs_of(&wanted, None)?;
            let n = tag("get MSRs", vcpu.get_msrs(&mut list))?;
            msrs.extend(list.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            wanted.drain(..(n + 1).min(wanted.len()));
        }
        if !msrs.iter().any(|&(i, _)| i == MSR_IA32_TSC) {
            return Err(("read the guest TSC", kvm_ioctls::Error::new(libc::EIO)));
        }
        Ok(VcpuState {
            regs,
            sregs,
            xsave,
            xcrs,
            events,
            msrs,
        })
    }

    /// The guest's TSC at the save.
    pub fn tsc(&self) -> u64 {
        self.msrs
            .iter()
            .find(|&&(i, _)| i == MSR_IA32_TSC)
            .map_or(0, |&(_, v)| v)
    }

    /// Writes the state into a vCPU that has not run yet.
    pub fn apply(&self, vcpu: &VcpuFd) -> KvmResult<()> {
        tag("set special registers", vcpu.set_sregs(&self.sregs))?;
        tag("set registers", vcpu.set_regs(&self.regs))?;
        if let Some(x) = &self.xcrs {
            tag("set XCRs", vcpu.set_xcrs(x))?;
        }
        // SAFETY: `xsave` is a plain `kvm_xsave` of the legacy 4 KiB size
        // (as KVM_GET_XSAVE returns it), so KVM reads no byte beyond it.
        tag("set XSAVE state", unsafe { vcpu.set_xsave(&self.xsave) })?;
        tag("set vCPU events", vcpu.set_vcpu_events(&self.events))?;
        let msrs: Vec<(u32, u64)> = self
            .msrs
            .iter()
            .copied()
            .filter(|&(i, _)| i != MSR_IA32_TSC)
            .collect();
        let list = msrs_of(&[], Some(&msrs))?;
        let n = tag("set MSRs", vcpu.set_msrs(&list))?;
        if n != msrs.len() {
            return Err(("set MSRs", kvm_ioctls::Error::new(libc::EINVAL)));
        }
        Ok(())
    }

    pub fn encode(&self, w: &mut Writer) {
        w.blob(self.regs.as_bytes());
        w.blob(self.sregs.as_bytes());
        w.blob(self.xsave.as_bytes());
        match &self.xcrs {
            Some(x) => w.blob(x.as_bytes()),
            None => w.blob(&[]),
        }
        w.blob(self.events.as_bytes());
        w.u32(self.msrs.len() as u32);
        for &(i, v) in &self.msrs {
            w.u32(i);
            w.u64(v);
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<VcpuState, SnapshotError> {
        let bad = || SnapshotError::Corrupt("vCPU");
        let regs = kvm_regs::read_from_bytes(r.blob()?).map_err(|_| bad())?;
        let sregs = kvm_sregs::read_from_bytes(r.blob()?).map_err(|_| bad())?;
        let xsave = kvm_xsave::read_from_bytes(r.blob()?).map_err(|_| bad())?;
        let xcrs = match r.blob()? {
            [] => None,
            b => Some(kvm_xcrs::read_from_bytes(b).map_err(|_| bad())?),
        };
        let events = kvm_vcpu_events::read_from_bytes(r.blob()?).map_err(|_| bad())?;
        let n = r.count(12)?;
        let mut msrs = Vec::with_capacity(n);
        for _ in 0..n {
            msrs.push((r.u32()?, r.u64()?));
        }
        if !msrs.iter().any(|&(i, _)| i == MSR_IA32_TSC) {
            return Err(bad());
        }
        Ok(VcpuState {
            regs,
            sregs,
            xsave,
            xcrs,
            events,
            msrs,
        })
    }
}
