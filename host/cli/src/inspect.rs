//! `wisp inspect`: what an image contains and needs.

use std::path::Path;

use anyhow::Context;
use wisp_abi::manifest::{DEVICE_BLOCK, DEVICE_NET, LIBS_SECTION};
use wisp_monitor::Image;

pub fn inspect(path: &Path) -> anyhow::Result<()> {
    let image = Image::from_file(path)
        .with_context(|| format!("{} is not a bootable Wisp image", path.display()))?;
    let elf = goblin::elf::Elf::parse(image.bytes()).context("reading section headers")?;
    let m = image.manifest;
    println!("image:        {}", path.display());
    println!(
        "file size:    {} bytes ({:.1} KiB)",
        image.bytes().len(),
        image.bytes().len() as f64 / 1024.0
    );
    println!("ABI version:  {}", { m.abi_version });
    println!("entry (wisp): {:#x} (64-bit, CPL3)", image.entry);
    match image.pvh_entry {
        Some(e) => println!("entry (PVH):  {e:#x} (32-bit, QEMU microvm)"),
        None => println!("entry (PVH):  none"),
    }
    println!(
        "memory span:  {:#x}..{:#x} ({} KiB)",
        image.start(),
        image.end(),
        (image.end() - image.start()) / 1024
    );
    println!("segments:");
    for s in &image.segments {
        let p = format!(
            "{}{}{}",
            if s.perms.read { "r" } else { "-" },
            if s.perms.write { "w" } else { "-" },
            if s.perms.exec { "x" } else { "-" }
        );
        println!(
            "  {:#010x}  {:>8} bytes in memory, {:>7} in file  {p}",
            s.addr, s.mem_size, s.file_size
        );
    }
    println!(
        "stack top:    {:#x}  (exception stack top {:#x})",
        { m.stack_top },
        { m.ist_top }
    );
    let libs: Vec<String> = elf
        .section_headers
        .iter()
        .find(|sh| elf.shdr_strtab.get_at(sh.sh_name) == Some(LIBS_SECTION))
        .and_then(|sh| {
            image
                .bytes()
                .get(sh.sh_offset as usize..(sh.sh_offset + sh.sh_size) as usize)
        })
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|n| !n.is_empty())
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect()
        })
        .unwrap_or_default();
    println!(
        "libraries:    {}",
        if libs.is_empty() {
            "(none listed)".into()
        } else {
            libs.join(", ")
        }
    );
    let dev = image.required_devices;
    let mut devices = Vec::new();
    if dev & (1 << DEVICE_NET) != 0 {
        devices.push("net");
    }
    if dev & (1 << DEVICE_BLOCK) != 0 {
        devices.push("block");
    }
    println!(
        "devices:      {}",
        if devices.is_empty() {
            "none".to_string()
        } else {
            devices.join(", ")
        }
    );
    Ok(())
}
