//! The snapshot's state sections outside a file, for a live migration:
//! the same encoders and decoders, so a migration stream carries exactly
//! what a snapshot file does (machine, vCPU, devices, boot page), and the
//! receiving side restores through [`Snapshot::restore`] as a restore does.

use std::fs::File;
use std::path::PathBuf;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wisp_abi::boot::BootPage;

use super::format::{Kind, Reader, Writer, PAGE};
use super::memory::{self, Ranges};
use super::{
    boot_page_from_bytes, decode_devices, encode_devices, encode_machine, DeviceRecord, Snapshot,
    SnapshotError, Source, VcpuState,
};
use crate::devices::virtio::mmio::TransportState;

impl Source {
    /// The guest's memory mapping.
    pub(crate) fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Bytes of guest memory.
    pub(crate) fn memory_size(&self) -> u64 {
        self.size
    }

    /// The pages the guest has ever touched (what a snapshot writes).
    pub(crate) fn touched(&self) -> std::io::Result<Ranges> {
        let mut ranges = memory::data_ranges(&self.file, self.file_offset, self.size)?;
        if let Some(pagemap) = self.pagemap.as_ref().filter(|_| self.private) {
            ranges.extend(memory::anonymous_pages(pagemap, self.host_addr, self.size)?);
            ranges = memory::merge(ranges);
        }
        Ok(ranges)
    }
}

/// Encodes the state sections of a paused guest (as a snapshot file
/// holds them).
pub(crate) fn encode_state(
    src: &Source,
    cpu: &VcpuState,
    devices: &[(TransportState, u64)],
) -> Result<Vec<(Kind, Vec<u8>)>, SnapshotError> {
    if devices.len() != src.devices.len() {
        return Err(SnapshotError::Mismatch(format!(
            "{} devices on the bus, {} in the boot page",
            devices.len(),
            src.devices.len()
        )));
    }
    let records: Vec<DeviceRecord> = src
        .devices
        .iter()
        .zip(devices)
        .map(|(e, (t, f))| DeviceRecord {
            entry: *e,
            features: *f,
            transport: t.clone(),
        })
        .collect();
    let mut boot = vec![0u8; std::mem::size_of::<BootPage>()];
    src.mem
        .read_slice(&mut boot, GuestAddress(src.boot_page))
        .map_err(|_| SnapshotError::Mismatch("boot page outside guest memory".into()))?;
    let mut vcpu = Writer::default();
    cpu.encode(&mut vcpu);
    Ok(vec![
        (Kind::Machine, encode_machine(src)),
        (Kind::Vcpu, vcpu.buf),
        (Kind::Devices, encode_devices(&records)),
        (Kind::BootPage, boot),
    ])
}

/// The state of a guest as a migration stream's STATE carries it, decoded
/// and checked.
pub(crate) struct State {
    boot_page_addr: u64,
    pml4: u64,
    cpu: VcpuState,
    devices: Vec<DeviceRecord>,
    boot_page: BootPage,
}

/// Decodes and checks the four state sections (from an untrusted peer:
/// every field is checked as [`Snapshot::open`] checks a file's) for a
/// guest of `mem_size` bytes.
pub(crate) fn decode_state(sections: &[Vec<u8>; 4], mem_size: u64) -> Result<State, SnapshotError> {
    let [machine, vcpu, devices, boot] = sections;
    let mut r = Reader::new(machine, "machine");
    let size = r.u64()?;
    let boot_page_addr = r.u64()?;
    let pml4 = r.u64()?;
    let abi = r.u32()?;
    r.end()?;
    if size != mem_size
        || !boot_page_addr.is_multiple_of(PAGE)
        || !pml4.is_multiple_of(PAGE)
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
    let mut r = Reader::new(vcpu, "vCPU");
    let cpu = VcpuState::decode(&mut r)?;
    r.end()?;
    let devices = decode_devices(devices)?;
    let boot_page = boot_page_from_bytes(boot).ok_or(SnapshotError::Corrupt("boot page"))?;
    Ok(State {
        boot_page_addr,
        pml4,
        cpu,
        devices,
        boot_page,
    })
}

/// Checks state sections as a receiver does before it builds anything
/// (for fuzzing the receiver's decoding).
pub fn check_state(sections: &[Vec<u8>; 4], mem_size: u64) -> Result<(), SnapshotError> {
    decode_state(sections, mem_size).map(|_| ())
}

impl Snapshot {
    /// A snapshot whose memory is `file` (from offset 0, `mem_size` bytes,
    /// `pages` of them written) and whose state is `state`.
    pub(crate) fn from_parts(file: File, mem_size: u64, pages: u64, state: State) -> Snapshot {
        Snapshot {
            file,
            path: PathBuf::from("<migration stream>"),
            mem_size,
            mem_offset: 0,
            boot_page_addr: state.boot_page_addr,
            pml4: state.pml4,
            cpu: state.cpu,
            devices: state.devices,
            boot_page: state.boot_page,
            pages,
        }
    }
}
