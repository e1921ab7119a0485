//! Decoding of the guest's hypercalls (see `wisp_abi::hypercall`).
//!
//! The port, the width of the access and every argument block are
//! guest-controlled: each is checked and a violation is a typed error (the
//! guest is then stopped as crashed), never a panic or an access outside
//! guest memory.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wisp_abi::hypercall::{self as hc, ConsoleWrite, CrashReport, Wait};
use wisp_abi::pod::Pod;

/// A decoded, validated hypercall.
#[derive(Debug)]
pub enum Hypercall {
    /// Write `len` bytes at `addr` (range checked) to the console.
    Console {
        addr: u64,
        len: u64,
    },
    Wait {
        timeout_ns: u64,
    },
    Exit(u8),
    Crash(Box<CrashReport>),
    Mark(u32),
}

#[derive(Debug, thiserror::Error)]
pub enum HypercallError {
    #[error("guest wrote to I/O port {0:#x}, which is not a hypercall")]
    UnknownPort(u16),
    #[error("hypercall on port {port:#x} used a {width}-byte access (must be 4)")]
    BadWidth { port: u16, width: usize },
    #[error("hypercall on port {port:#x} passed argument address {addr:#x} outside guest memory")]
    BadArgument { port: u16, addr: u64 },
    #[error(
        "console write of {len} bytes at {addr:#x} is outside guest memory or over {} bytes",
        hc::CONSOLE_MAX
    )]
    BadConsoleRange { addr: u64, len: u64 },
}

fn read_arg<T: Pod>(mem: &GuestMemoryMmap, port: u16, addr: u64) -> Result<T, HypercallError> {
    let mut buf = vec![0u8; core::mem::size_of::<T>()];
    mem.read_slice(&mut buf, GuestAddress(addr))
        .map_err(|_| HypercallError::BadArgument { port, addr })?;
    T::read_from(&buf).ok_or(HypercallError::BadArgument { port, addr })
}

/// Decodes an `out` of `data` to `port`.
pub fn decode(
    port: u16,
    data: &[u8],
    mem: &GuestMemoryMmap,
    mem_size: u64,
) -> Result<Hypercall, HypercallError> {
    if !(hc::PORT_BASE..hc::PORT_BASE + hc::PORT_COUNT).contains(&port) {
        return Err(HypercallError::UnknownPort(port));
    }
    let value: [u8; 4] = data.try_into().map_err(|_| HypercallError::BadWidth {
        port,
        width: data.len(),
    })?;
    let value = u32::from_le_bytes(value);
    Ok(match port {
        hc::PORT_CONSOLE => {
            let w: ConsoleWrite = read_arg(mem, port, value as u64)?;
            let in_memory = w.addr.checked_add(w.len).is_some_and(|end| end <= mem_size);
            if !in_memory || w.len > hc::CONSOLE_MAX {
                return Err(HypercallError::BadConsoleRange {
                    addr: w.addr,
                    len: w.len,
                });
            }
            Hypercall::Console {
                addr: w.addr,
                len: w.len,
            }
        }
        hc::PORT_WAIT => {
            let w: Wait = read_arg(mem, port, value as u64)?;
            Hypercall::Wait {
                timeout_ns: w.timeout_ns,
            }
        }
        hc::PORT_EXIT => Hypercall::Exit(value as u8),
        hc::PORT_CRASH => Hypercall::Crash(Box::new(read_arg(mem, port, value as u64)?)),
        hc::PORT_MARK => Hypercall::Mark(value),
        _ => return Err(HypercallError::UnknownPort(port)),
    })
}
