//! The QEMU command line that boots a Wisp image, in one place.
//!
//! Every image carries a PVH entry note, so `qemu-system-x86_64 -M microvm
//! -kernel IMAGE` boots it with no firmware and no bootloader. The tests
//! (which boot the same images on QEMU as on the Wisp monitor) and the
//! boot benchmark (which times QEMU against `wisp run`) both build their
//! command here, so the line they use is the one the README documents and
//! cannot drift between them.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// Guest memory given to QEMU (the same default as `wisp run`).
pub const MEMORY: &str = "64M";

/// Whether microvm gets ACPI tables. With ACPI off QEMU skips most of its
/// emulated firmware work (about 1.7 s saved on KVM PVM, where CPL0 code is
/// emulated); the README shows the line with ACPI on, the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acpi {
    On,
    Off,
}

/// The arguments of the README's line for `image`: microvm under KVM, no
/// default devices, the console (COM1) on stdio, no reboot on a triple
/// fault, `isa-debug-exit` at port 0xf4 (the guest's exit status becomes
/// QEMU's as `status * 2 + 1`), with `extra` (e.g. `-netdev`, `-device`)
/// before `-kernel IMAGE`. Add `-append "ARGS"` after it for arguments.
pub fn args(image: &Path, acpi: Acpi, extra: &[&str]) -> Vec<OsString> {
    let machine = match acpi {
        Acpi::On => "microvm",
        Acpi::Off => "microvm,acpi=off",
    };
    let mut v: Vec<OsString> = [
        "-M",
        machine,
        "-accel",
        "kvm",
        "-m",
        MEMORY,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
    ]
    .iter()
    .chain(extra)
    .chain(&["-kernel"])
    .map(OsString::from)
    .collect();
    v.push(image.into());
    v
}

/// A [`Command`] running QEMU with [`args`].
pub fn command(image: &Path, acpi: Acpi, extra: &[&str]) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args(args(image, acpi, extra));
    cmd
}

/// The guest's exit status from QEMU's, if QEMU exited through
/// `isa-debug-exit` (always an odd status; the OS keeps it modulo 256).
pub fn guest_status(qemu_status: i32) -> Option<i32> {
    (qemu_status % 2 == 1).then_some((qemu_status - 1) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_line() {
        let a = args(Path::new("hello.wisp"), Acpi::On, &[]);
        let line: Vec<&str> = a.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(
            line.join(" "),
            "-M microvm -accel kvm -m 64M -nodefaults -no-user-config \
             -display none -serial stdio -no-reboot \
             -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel hello.wisp"
        );
    }

    /// The README shows this very line: the docs and the tests agree.
    #[test]
    fn readme_shows_the_same_line() {
        let readme = include_str!("../../../README.md").replace("\\\n", " ");
        let readme = readme.split_whitespace().collect::<Vec<_>>().join(" ");
        let a = args(Path::new("hello.wisp"), Acpi::On, &[]);
        let line: Vec<&str> = a.iter().map(|s| s.to_str().unwrap()).collect();
        let expected = format!("{QEMU} {}", line.join(" "));
        assert!(readme.contains(&expected), "README lacks: {expected}");
    }

    #[test]
    fn extra_arguments_go_before_the_kernel() {
        let a = args(Path::new("x"), Acpi::Off, &["-netdev", "user,id=n0"]);
        assert_eq!(a[1], "microvm,acpi=off");
        let n = a.len();
        assert_eq!(&a[n - 4..], ["-netdev", "user,id=n0", "-kernel", "x"]);
    }

    #[test]
    fn exit_status_maps_back() {
        assert_eq!(guest_status(1), Some(0));
        assert_eq!(guest_status(15), Some(7));
        assert_eq!(guest_status(203), Some(101));
        assert_eq!(guest_status(2), None);
    }
}
