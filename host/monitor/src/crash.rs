//! What the monitor reports when a guest dies abnormally.

use std::fmt;

use wisp_abi::hypercall::{vector_name, CrashReport, GPR_NAMES};

/// Why a guest was stopped as crashed.
#[derive(Debug)]
pub enum Crash {
    /// A CPU exception, reported by the guest's handler; `cr2` read from the
    /// vCPU (a CPL3 handler cannot read it).
    Exception { report: Box<CrashReport>, cr2: u64 },
    /// The CPU could not deliver an exception (e.g. the exception stack was
    /// itself bad): KVM reports a shutdown.
    TripleFault { rip: u64, rsp: u64 },
    /// The guest broke the hypercall protocol.
    Protocol(String),
    /// KVM could not run the guest any further.
    Internal(String),
}

impl fmt::Display for Crash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Crash::Exception { report: r, cr2 } => {
                writeln!(
                    f,
                    "guest crashed: {} (vector {}), error code {:#x}",
                    vector_name(r.vector),
                    r.vector,
                    r.error_code
                )?;
                writeln!(
                    f,
                    "  rip {:#018x}  rsp {:#018x}  rflags {:#x}  cs {:#x}  ss {:#x}",
                    r.rip, r.rsp, r.rflags, r.cs, r.ss
                )?;
                if r.vector == 14 {
                    let access = if r.error_code & 2 != 0 {
                        "write"
                    } else if r.error_code & 16 != 0 {
                        "instruction fetch"
                    } else {
                        "read"
                    };
                    let why = if r.error_code & 1 != 0 {
                        "protection violation"
                    } else {
                        "page not mapped"
                    };
                    writeln!(f, "  fault address (cr2) {cr2:#018x}: {access}, {why}")?;
                }
                for (i, (name, v)) in GPR_NAMES.iter().zip(r.gprs.iter()).enumerate() {
                    write!(f, "  {name:>3} {v:#018x}")?;
                    if i % 4 == 3 {
                        writeln!(f)?;
                    }
                }
                Ok(())
            }
            Crash::TripleFault { rip, rsp } => {
                write!(f, "guest triple-faulted (an exception could not be delivered) at rip {rip:#x}, rsp {rsp:#x}")
            }
            Crash::Protocol(m) => write!(f, "guest broke the hypercall protocol: {m}"),
            Crash::Internal(m) => write!(f, "guest could not continue: {m}"),
        }
    }
}
