//! The Grace-like platform (issue 3), in either boot mode: the firmware interface the VMM
//! chose (ACPI over an EFI hand-off, or a device tree), the memory map (EGM carve-outs in no
//! memory map, one NUMA node per socket), and the carve-outs' contents as both the guest and
//! the VMM see them.
//!
//! Expectations come from `/gracevm/env`: `GRACEVM_BOOT_MODE` (`acpi` | `dt`),
//! `GRACEVM_SYSTEM_RAM` (bytes), `GRACEVM_NUMA_NODES` (node list, `0-1`),
//! `GRACEVM_CARVEOUTS` (`pxm:base:size:seed ...`) and `GRACEVM_TESTDEV` (address of the test
//! device). A missing key SKIPs the tests that need it.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use crate::devmem::{self, Access};
use crate::env::{BootMode, Carveout, CPUS, ENV_PATH, NUMA_NODES, SYSTEM_RAM};
use crate::firmware::{self, ACPI_TABLES, DT_BASE, EFI_DIR};
use crate::kconfig;
use crate::ktap::note;
use crate::outcome::{check, Checks, Outcome};
use crate::procfs::{self, bytes, IomemEntry};
use crate::registry::{Context, Test};
use crate::testdev::{PrinterError, Status, TestDev};

pub const TESTS: &[Test] = &[
    Test::new("acpi_in_use", acpi_in_use).during_fill(),
    Test::new("dt_in_use", dt_in_use).during_fill(),
    Test::new("efi_memmap_used", efi_memmap_used).during_fill(),
    Test::new("numa_nodes", numa_nodes).during_fill(),
    Test::new("carveouts_hidden", carveouts_hidden).during_fill(),
    Test::new("testdev_probe", testdev_probe).during_fill(),
    // Reads the carve-outs through /dev/mem itself: not while the VMM fills them.
    Test::new("carveout_pattern", carveout_pattern).with_timeout(Duration::from_secs(300)),
    Test::new("carveout_write_seen_by_vmm", carveout_write_seen_by_vmm)
        .with_timeout(Duration::from_secs(120)),
];

/// Tables every ACPI boot of the platform has (MCFG only with a PCI host bridge).
const ACPI_REQUIRED: &[&str] = &["DSDT", "FACP", "APIC", "GTDT", "SPCR", "SRAT"];
/// The DSDT's PL011 (`\_SB.COM0`), as the kernel names its ACPI device.
const ACPI_PL011_HID: &str = "ARMH0011";
const ACPI_DEVICES: &str = "/sys/bus/acpi/devices";
const PCI_DEVICES: &str = "/sys/bus/pci/devices";
const NODE_DIR: &str = "/sys/devices/system/node";
const MEMORY_DIR: &str = "/sys/devices/system/memory";
const KPAGEFLAGS: &str = "/proc/kpageflags";
/// `KPF_NOPAGE`: no struct page behind the pfn.
const KPF_NOPAGE: u64 = 1 << 20;
/// EFI memory descriptors are 2 MiB aligned (64 KiB-page kernels round them outward).
const EFI_ALIGN: u64 = 2 << 20;
/// Size of each window of a carve-out the guest reads word by word.
const SAMPLE_WINDOW: u64 = 64 << 10;
/// Length of one CHECK_PATTERN request: the vCPU waits in the MMIO exit while the VMM
/// compares, so a carve-out is checked in pieces rather than in one long stall.
const VMM_CHECK_CHUNK: u64 = 64 << 20;

fn skip_other_mode(mode: BootMode, wanted: BootMode) -> Option<Outcome> {
    (mode != wanted).then(|| Outcome::skip(format!("boot mode is {mode}, not {wanted}")))
}

fn iomem_entries() -> Result<Vec<IomemEntry>, Outcome> {
    let text = procfs::read("/proc/iomem")?;
    let entries = procfs::parse_iomem(&text).map_err(Outcome::Fail)?;
    if !entries.is_empty() && entries.iter().all(|e| e.start == 0 && e.end == 0) {
        return Err(Outcome::fail(
            "/proc/iomem shows only zero addresses: the suite is not root",
        ));
    }
    Ok(entries)
}

/// Top-level ranges called `name`, merged, inclusive ends.
fn top_level_ranges(entries: &[IomemEntry], name: &str) -> Vec<firmware::Range> {
    firmware::merge(
        procfs::top_level(entries, name)
            .iter()
            .map(|e| (e.start, e.end)),
    )
}

fn count_entries(path: &str) -> usize {
    std::fs::read_dir(path).map_or(0, |dir| dir.count())
}

/// Booted with ACPI: the tables the platform provides are there and sound, the DSDT's
/// devices are enumerated, and no device tree was unflattened.
fn acpi_in_use(ctx: &Context) -> Outcome {
    let mode = check!(ctx.env.boot_mode());
    if let Some(skip) = skip_other_mode(mode, BootMode::Acpi) {
        return skip;
    }
    check!(kconfig::require_kernel("ACPI"));
    let mut checks = Checks::new();
    let Some(tables) = check!(firmware::files(ACPI_TABLES).map_err(Outcome::Fail)) else {
        return Outcome::fail(format!("{ACPI_TABLES} absent: the kernel did not use ACPI"));
    };
    let pci_devices = count_entries(PCI_DEVICES);
    let mut required: Vec<&str> = ACPI_REQUIRED.to_vec();
    if pci_devices > 0 {
        // arm64 finds PCI config space only through the MCFG.
        required.push("MCFG");
    } else if !tables.iter().any(|t| t == "MCFG") {
        note("no MCFG table (and no PCI device)");
    }
    let mut seen = Vec::new();
    for table in tables
        .iter()
        .filter(|t| required.contains(&t.as_str()) || t.as_str() == "MCFG" || t.as_str() == "SLIT")
    {
        let path = format!("{ACPI_TABLES}/{table}");
        let raw = match std::fs::read(&path) {
            Ok(raw) => raw,
            Err(e) => {
                checks.fail(format!("cannot read {path}: {e}"));
                continue;
            }
        };
        match firmware::parse_acpi_table(&raw) {
            Ok(header) => {
                checks.expect_eq(
                    &format!("{path} signature"),
                    table.as_str(),
                    &header.signature,
                );
                if table == "DSDT" {
                    // Revision 1 makes AML integers 32-bit (truncating 64-bit addresses).
                    checks.expect(header.revision >= 2, || {
                        format!(
                            "{path}: revision {} (< 2 truncates 64-bit AML integers)",
                            header.revision
                        )
                    });
                }
                seen.push(format!(
                    "{table}(r{} {} {})",
                    header.revision, header.oem_id, header.oem_table_id
                ));
            }
            Err(why) => checks.fail(format!("{path}: {why}")),
        }
    }
    for table in &required {
        checks.expect(tables.iter().any(|t| t == table), || {
            let why = if *table == "MCFG" {
                format!(" ({pci_devices} PCI device(s) present)")
            } else {
                String::new()
            };
            format!("{ACPI_TABLES}/{table} missing{why}")
        });
    }
    note(format!(
        "ACPI tables: {}; checked {}",
        tables.join(" "),
        seen.join(" ")
    ));
    // Devices in /sys/bus/acpi/devices are symlinks, not directories: look at the names.
    match std::fs::read_dir(ACPI_DEVICES) {
        Ok(dir) => {
            let prefix = format!("{ACPI_PL011_HID}:");
            let found = dir
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with(&prefix));
            checks.expect(found, || {
                format!("{ACPI_DEVICES} has no {ACPI_PL011_HID}:* device (the DSDT's PL011)")
            });
        }
        Err(e) => checks.fail(format!("cannot list {ACPI_DEVICES}: {e}")),
    }
    match firmware::subdirectories(DT_BASE) {
        Ok(None) => {}
        Ok(Some(nodes)) => {
            let others: Vec<&String> = nodes.iter().filter(|n| *n != "chosen").collect();
            checks.expect(others.is_empty(), || {
                format!(
                    "{DT_BASE} has device nodes under ACPI: {}",
                    others
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            });
        }
        Err(why) => checks.fail(why),
    }
    checks.outcome()
}

/// Reads a DT property of the unflattened tree.
fn dt_property(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))
}

/// A one-cell DT property (`#address-cells`).
fn dt_u32(path: &str) -> Result<u64, String> {
    let raw = dt_property(path)?;
    match firmware::dt_numbers(&raw, 1)?.as_slice() {
        [value] => Ok(*value),
        other => Err(format!("{path}: {} cells, expected 1", other.len())),
    }
}

/// The `reg` ranges of every `/memory@...` node.
fn dt_memory_ranges(nodes: &[String]) -> Result<Vec<(u64, u64)>, String> {
    let address_cells = dt_u32(&format!("{DT_BASE}/#address-cells"))? as usize;
    let size_cells = dt_u32(&format!("{DT_BASE}/#size-cells"))? as usize;
    if address_cells != size_cells {
        return Err(format!(
            "root #address-cells {address_cells} != #size-cells {size_cells}"
        ));
    }
    let mut ranges = Vec::new();
    for node in nodes.iter().filter(|n| n.starts_with("memory@")) {
        let path = format!("{DT_BASE}/{node}/reg");
        let numbers = firmware::dt_numbers(&dt_property(&path)?, address_cells)
            .map_err(|why| format!("{path}: {why}"))?;
        if numbers.len() % 2 != 0 {
            return Err(format!("{path}: odd number of address/size cells"));
        }
        ranges.extend(numbers.chunks_exact(2).map(|pair| (pair[0], pair[1])));
    }
    Ok(ranges)
}

/// Booted with a device tree: the nodes the platform writes are there, and no ACPI table or
/// EFI hand-off was used.
fn dt_in_use(ctx: &Context) -> Outcome {
    let mode = check!(ctx.env.boot_mode());
    if let Some(skip) = skip_other_mode(mode, BootMode::Dt) {
        return skip;
    }
    let mut checks = Checks::new();
    let Some(nodes) = check!(firmware::subdirectories(DT_BASE).map_err(Outcome::Fail)) else {
        return Outcome::fail(format!(
            "{DT_BASE} absent: the kernel did not unflatten a device tree"
        ));
    };
    for name in ["cpus", "chosen"] {
        checks.expect(nodes.iter().any(|n| n == name), || {
            format!("{DT_BASE}: no /{name} node")
        });
    }
    for prefix in ["memory@", "intc@", "pl011@"] {
        checks.expect(nodes.iter().any(|n| n.starts_with(prefix)), || {
            format!("{DT_BASE}: no /{prefix}... node")
        });
    }
    note(format!("DT nodes: {}", nodes.join(" ")));
    if let Some(cpus) = ctx.env.get(CPUS).and_then(crate::env::parse_u64) {
        match firmware::subdirectories(&format!("{DT_BASE}/cpus")) {
            Ok(Some(cpu_nodes)) => {
                let count = cpu_nodes.iter().filter(|n| n.starts_with("cpu@")).count() as u64;
                checks.expect_eq("cpu@ nodes under /cpus", cpus, count);
            }
            Ok(None) => {}
            Err(why) => checks.fail(why),
        }
    }
    match dt_memory_ranges(&nodes) {
        Ok(ranges) => {
            let total: u64 = ranges.iter().map(|r| r.1).sum();
            if let Some(expected) = ctx.env.get(SYSTEM_RAM).and_then(crate::env::parse_u64) {
                checks.expect(total == expected, || {
                    format!(
                        "/memory nodes: expected {} in total, observed {}",
                        bytes(expected),
                        bytes(total)
                    )
                });
            }
            if let Ok(carveouts) = ctx.env.carveouts() {
                for c in &carveouts {
                    for (base, size) in &ranges {
                        checks.expect(!c.overlaps(*base, base.saturating_add(*size)), || {
                            format!("/memory reg [{base:#x}, +{size:#x}) covers {c}")
                        });
                    }
                }
            }
        }
        Err(why) => checks.fail(why),
    }
    match firmware::files(ACPI_TABLES) {
        Ok(None) => {}
        Ok(Some(tables)) => checks.expect(tables.is_empty(), || {
            format!("{ACPI_TABLES} has tables in dt mode: {}", tables.join(" "))
        }),
        Err(why) => checks.fail(why),
    }
    checks.expect(!std::path::Path::new(EFI_DIR).exists(), || {
        format!("{EFI_DIR} exists: the kernel took an EFI hand-off in dt mode")
    });
    checks.outcome()
}

/// Booted through the EFI hand-off: the kernel took gracevm's system table, found the ACPI
/// tables through it, and /proc/iomem holds the RAM of the EFI memory map and nothing else.
///
/// The vendor comes from the kernel's banner (`efi: EFI v2.7 by gracevm`) in the kernel log
/// (arm64 has no /sys/firmware/efi/fw_vendor), the RSDP from /sys/firmware/efi/systab. When
/// the kernel logged the EFI memory map (`efi=debug`), /proc/iomem is compared with it range
/// by range; otherwise with GRACEVM_SYSTEM_RAM, 2 MiB alignment and no `reserved` memory.
fn efi_memmap_used(ctx: &Context) -> Outcome {
    let mode = check!(ctx.env.boot_mode());
    if let Some(skip) = skip_other_mode(mode, BootMode::Acpi) {
        return skip;
    }
    let system_ram = check!(ctx.env.require_u64(SYSTEM_RAM));
    check!(kconfig::require_kernel("EFI"));
    if !std::path::Path::new(EFI_DIR).is_dir() {
        return Outcome::fail(format!(
            "{EFI_DIR} absent: the kernel did not take the EFI hand-off"
        ));
    }
    let mut checks = Checks::new();
    let log = match procfs::kernel_log() {
        Ok(log) => log,
        Err(why) => {
            checks.fail(format!("cannot read the kernel log: {why}"));
            String::new()
        }
    };
    match firmware::efi_vendor_from_log(&log) {
        Some(vendor) => checks.expect_eq(
            "EFI vendor (kernel log 'efi: EFI v... by VENDOR')",
            "gracevm",
            vendor.as_str(),
        ),
        None => checks.fail("kernel log has no 'efi: EFI vX.Y by VENDOR' banner"),
    }
    let entries = check!(iomem_entries());
    let ram = top_level_ranges(&entries, "System RAM");
    let reserved = top_level_ranges(&entries, "reserved");
    let systab_path = format!("{EFI_DIR}/systab");
    match procfs::read(&systab_path).map(|text| firmware::systab_acpi20(&text)) {
        Ok(Some(rsdp)) => {
            // The ACPI tables sit in ACPI-reclaim memory, which arm64 lists as System RAM.
            checks.expect(ram.iter().any(|r| r.0 <= rsdp && rsdp <= r.1), || {
                format!(
                    "RSDP (ACPI20={rsdp:#x} in {systab_path}) is in no System RAM range \
                     [{}]: the ACPI tables are not in EFI ACPI-reclaim memory",
                    firmware::ranges_text(&ram)
                )
            });
        }
        Ok(None) => checks.fail(format!(
            "{systab_path} has no ACPI20= line: the system table names no ACPI 2.0 RSDP"
        )),
        Err(Outcome::Fail(why)) => checks.fail(why),
        Err(other) => return other,
    }
    let total: u64 = ram.iter().map(|r| r.1 - r.0 + 1).sum();
    checks.expect(total == system_ram, || {
        format!(
            "System RAM in /proc/iomem: expected {}, observed {} [{}]",
            bytes(system_ram),
            bytes(total),
            firmware::ranges_text(&ram)
        )
    });
    let map = firmware::efi_map_from_log(&log);
    if map.is_empty() {
        note(
            "the kernel log has no EFI memory map (no efi=debug): compared the total, \
             2 MiB alignment and the absence of reserved memory",
        );
        for (start, end) in &ram {
            checks.expect(start % EFI_ALIGN == 0 && (end + 1) % EFI_ALIGN == 0, || {
                format!("System RAM {start:#x}-{end:#x} is not 2 MiB aligned as EFI map ranges are")
            });
        }
        checks.expect(reserved.is_empty(), || {
            format!(
                "top-level reserved (nomap) memory [{}]: the EFI map should list only usable \
                 RAM and ACPI-reclaim memory",
                firmware::ranges_text(&reserved)
            )
        });
    } else {
        let (expected_ram, expected_reserved) = firmware::iomem_from_efi_map(&map);
        note(format!(
            "EFI memory map from the kernel log: {} descriptor(s), RAM [{}]",
            map.len(),
            firmware::ranges_text(&expected_ram)
        ));
        checks.expect(ram == expected_ram, || {
            format!(
                "System RAM in /proc/iomem: expected the EFI map's [{}], observed [{}]",
                firmware::ranges_text(&expected_ram),
                firmware::ranges_text(&ram)
            )
        });
        checks.expect(reserved == expected_reserved, || {
            format!(
                "reserved memory in /proc/iomem: expected the EFI map's [{}], observed [{}]",
                firmware::ranges_text(&expected_reserved),
                firmware::ranges_text(&reserved)
            )
        });
    }
    if !checks.failed() {
        note(format!(
            "System RAM [{}], {}",
            firmware::ranges_text(&ram),
            bytes(total)
        ));
    }
    checks.outcome()
}

/// The nodes with memory according to sysfs: `has_memory`, or (older kernels) the online
/// nodes whose meminfo has a non-zero MemTotal.
fn nodes_with_memory() -> Result<std::collections::BTreeSet<u32>, Outcome> {
    let has_memory = format!("{NODE_DIR}/has_memory");
    if std::path::Path::new(&has_memory).exists() {
        let text = procfs::read(&has_memory)?;
        return procfs::parse_node_list(&text)
            .map_err(|why| Outcome::fail(format!("{has_memory}: {why}")));
    }
    let online = format!("{NODE_DIR}/online");
    let text = procfs::read(&online)?;
    let online =
        procfs::parse_node_list(&text).map_err(|why| Outcome::fail(format!("{online}: {why}")))?;
    let mut nodes = std::collections::BTreeSet::new();
    for node in online {
        let meminfo = procfs::read(&format!("{NODE_DIR}/node{node}/meminfo"))?;
        if procfs::node_meminfo_kib(&meminfo, "MemTotal").unwrap_or(0) > 0 {
            nodes.insert(node);
        }
    }
    Ok(nodes)
}

/// One NUMA node with memory per socket, exactly the nodes the VMM described.
fn numa_nodes(ctx: &Context) -> Outcome {
    let text = check!(ctx.env.require(NUMA_NODES));
    let expected = match procfs::parse_node_list(text) {
        Ok(nodes) => nodes,
        Err(why) => return Outcome::fail(format!("{NUMA_NODES} in {ENV_PATH}: {why}")),
    };
    if kconfig::kernel_has("NUMA") == Some(false) {
        return Outcome::skip("kernel built without CONFIG_NUMA");
    }
    if !std::path::Path::new(NODE_DIR).is_dir() {
        return Outcome::skip(format!("{NODE_DIR} absent (kernel without CONFIG_NUMA?)"));
    }
    let observed = check!(nodes_with_memory());
    let mut details = Vec::new();
    for node in &observed {
        let dir = format!("{NODE_DIR}/node{node}");
        let mem = std::fs::read_to_string(format!("{dir}/meminfo"))
            .ok()
            .and_then(|text| procfs::node_meminfo_kib(&text, "MemTotal"))
            .map_or("?".to_string(), |kib| bytes(kib * 1024));
        let cpus = std::fs::read_to_string(format!("{dir}/cpulist"))
            .map_or("?".to_string(), |text| text.trim().to_string());
        details.push(format!("node {node}: MemTotal {mem}, cpus [{cpus}]"));
    }
    let online = std::fs::read_to_string(format!("{NODE_DIR}/online"))
        .map_or("?".to_string(), |text| text.trim().to_string());
    let summary = format!("online nodes {online}; {}", details.join("; "));
    if observed == expected {
        note(summary);
        Outcome::Pass
    } else {
        Outcome::fail(format!(
            "NUMA nodes with memory: expected {}, observed {}\n{summary}",
            procfs::format_node_list(&expected),
            procfs::format_node_list(&observed)
        ))
    }
}

/// What `/proc/kpageflags` says about `pfn`: `None` past the last pfn the kernel tracks,
/// else its flags.
fn kpageflags(file: &std::fs::File, pfn: u64) -> Result<Option<u64>, String> {
    let mut buf = [0u8; 8];
    let offset = pfn
        .checked_mul(8)
        .ok_or_else(|| format!("pfn {pfn:#x} too large"))?;
    match file.read_at(&mut buf, offset) {
        Ok(0) => Ok(None),
        Ok(8) => Ok(Some(u64::from_ne_bytes(buf))),
        Ok(n) => Err(format!(
            "{KPAGEFLAGS}: short read of {n} bytes at pfn {pfn:#x}"
        )),
        Err(e) => Err(format!("{KPAGEFLAGS} at pfn {pfn:#x}: {e}")),
    }
}

/// The memory block numbers under /sys/devices/system/memory and the block size; `None`
/// when the kernel has no memory block devices.
fn memory_blocks() -> Result<Option<(u64, Vec<u64>)>, String> {
    let size_path = format!("{MEMORY_DIR}/block_size_bytes");
    let Ok(text) = std::fs::read_to_string(&size_path) else {
        return Ok(None);
    };
    let block_size = u64::from_str_radix(text.trim().trim_start_matches("0x"), 16)
        .map_err(|_| format!("{size_path}: {:?} is not hex", text.trim()))?;
    let names = firmware::subdirectories(MEMORY_DIR)?.unwrap_or_default();
    let blocks = names
        .iter()
        .filter_map(|name| name.strip_prefix("memory")?.parse().ok())
        .collect();
    Ok(Some((block_size, blocks)))
}

/// The EGM carve-outs are in no memory map: no System RAM (or reserved memory) overlaps
/// them, the kernel's MemTotal does not count them, no memory block covers them and they
/// have no struct page.
fn carveouts_hidden(ctx: &Context) -> Outcome {
    let carveouts = check!(ctx.env.carveouts());
    let system_ram = check!(ctx.env.require_u64(SYSTEM_RAM));
    let entries = check!(iomem_entries());
    let mut checks = Checks::new();
    for c in &carveouts {
        for entry in procfs::overlapping(&entries, c.base, c.end()) {
            let is_memory =
                entry.name == "System RAM" || (entry.depth == 0 && entry.name == "reserved");
            if is_memory {
                checks.fail(format!(
                    "/proc/iomem: {:?} {} overlaps {c}",
                    entry.name,
                    procfs::range_text(entry)
                ));
            } else {
                note(format!(
                    "/proc/iomem: {:?} {} inside {c}",
                    entry.name,
                    procfs::range_text(entry)
                ));
            }
        }
    }
    let meminfo = check!(procfs::read("/proc/meminfo"));
    match procfs::meminfo_kib(&meminfo, "MemTotal") {
        Some(kib) => {
            let mem_total = kib.saturating_mul(1024);
            checks.expect(mem_total < system_ram, || {
                format!(
                    "MemTotal: expected less than {SYSTEM_RAM} {} (carve-outs not counted), \
                     observed {}",
                    bytes(system_ram),
                    bytes(mem_total)
                )
            });
        }
        None => checks.fail("/proc/meminfo has no MemTotal"),
    }
    match memory_blocks() {
        Ok(Some((block_size, blocks))) if block_size > 0 => {
            for block in blocks {
                let start = block.saturating_mul(block_size);
                for c in &carveouts {
                    checks.expect(!c.overlaps(start, start.saturating_add(block_size)), || {
                        format!(
                            "{MEMORY_DIR}/memory{block} [{start:#x}, +{block_size:#x}) covers {c}"
                        )
                    });
                }
            }
        }
        Ok(_) => note(format!(
            "no memory block devices ({MEMORY_DIR}, CONFIG_MEMORY_HOTPLUG): not checked"
        )),
        Err(why) => checks.fail(why),
    }
    match std::fs::File::open(KPAGEFLAGS) {
        Ok(file) => {
            let page = devmem::page_size() as u64;
            for c in &carveouts {
                let first = c.base / page;
                let last = (c.end() - 1) / page;
                for pfn in [first, first + (last - first) / 2, last] {
                    match kpageflags(&file, pfn) {
                        Ok(None) => {}
                        Ok(Some(flags)) => checks.expect(flags & KPF_NOPAGE != 0, || {
                            format!(
                                "{KPAGEFLAGS}: pfn {pfn:#x} of {c} has a struct page \
                                 (flags {flags:#x})"
                            )
                        }),
                        Err(why) => checks.fail(why),
                    }
                }
            }
        }
        Err(e) => note(format!("{KPAGEFLAGS}: {e}: struct pages not checked")),
    }
    checks.outcome()
}

/// The test device answers, and its probe rejects what it must (unaligned, empty, outside
/// every probe region).
fn testdev_probe(ctx: &Context) -> Outcome {
    let dev = check!(TestDev::from_env(&ctx.env));
    let mut checks = Checks::new();
    if let Some(timer) = ctx
        .env
        .get("GRACEVM_BOOT_TIMER")
        .and_then(crate::env::parse_u64)
    {
        if timer == dev.base() {
            checks.expect(dev.boot_recorded(), || {
                "BOOT register reads 0: /init's boot-timer write did not reach the VMM".into()
            });
        }
    }
    let carveouts = match ctx.env.carveouts() {
        Ok(carveouts) => carveouts,
        Err(Outcome::Fail(why)) => return Outcome::Fail(why),
        Err(_) => Vec::new(),
    };
    // Below every region the layout has: nothing is probe-able there.
    let outside = 0;
    let inside = carveouts.first().map_or(outside, |c| c.base);
    let cases = [
        (
            "CHECK_PATTERN of an unaligned address",
            inside + 4,
            8,
            Status::BadRequest,
        ),
        ("CHECK_PATTERN of 0 bytes", inside, 0, Status::BadRequest),
        ("CHECK_PATTERN of 12 bytes", inside, 12, Status::BadRequest),
        (
            "CHECK_PATTERN outside every region",
            outside,
            8,
            Status::Outside,
        ),
    ];
    for (what, addr, len, expected) in cases {
        match dev.check_pattern(addr, len) {
            Ok(status) => checks.expect(status == expected, || {
                format!("{what} ({addr:#x}, {len} bytes): expected {expected}, observed {status}")
            }),
            Err(why) if carveouts.is_empty() => {
                return Outcome::skip(format!("no probe regions: {why}"));
            }
            Err(why) => {
                checks.fail(why);
                break;
            }
        }
    }
    for c in &carveouts {
        let beyond = c.end() - 8;
        match dev.check_pattern(beyond, 16) {
            Ok(status) => checks.expect(status == Status::Outside, || {
                format!("CHECK_PATTERN across the end of {c}: expected OUTSIDE, observed {status}")
            }),
            Err(why) => checks.fail(why),
        }
    }
    print_checks(dev, &mut checks);
    checks.outcome()
}

/// PRINT, the suite's output channel: refusals of what the VMM must not read, and one line
/// through it (a diagnostic of this test).
fn print_checks(dev: TestDev, checks: &mut Checks) {
    let max = gracevm_contract::testdev::PRINT_MAX;
    // The register page itself is a device, not memory.
    let device = dev.base();
    let refused = [
        ("PRINT of 0 bytes", device, 0, Status::BadRequest),
        (
            "PRINT of more than a page",
            device,
            max + 1,
            Status::BadRequest,
        ),
        ("PRINT of the device page", device, 8, Status::Outside),
    ];
    for (what, gpa, len, expected) in refused {
        let status = dev.print(gpa, len);
        checks.expect(status == expected, || {
            format!("{what} ({gpa:#x}, {len} bytes): expected {expected}, observed {status}")
        });
    }
    match crate::testdev::Printer::new(dev) {
        Ok(_) => {}
        // A kernel without /proc/self/pagemap: the suite prints to the UART, the VMM is fine.
        Err(why @ PrinterError::NoAddress(_)) => {
            note(format!("PRINT from a page not checked: {why}"))
        }
        Err(why) => checks.fail(format!("PRINT of a line from a locked page: {why}")),
    }
}

/// The windows of a `size`-byte region the guest reads: start, middle and end, each
/// `SAMPLE_WINDOW` bytes (or the whole region when smaller), merged where they overlap.
/// `(offset, length)` pairs, 8-byte aligned when `size` is.
pub fn sample_windows(size: u64) -> Vec<(u64, u64)> {
    let window = SAMPLE_WINDOW.min(size);
    let middle = ((size / 2) & !(SAMPLE_WINDOW - 1)).min(size - window);
    let ranges = [0, middle, size - window].map(|start| (start, start + window - 1));
    firmware::merge(ranges)
        .into_iter()
        .map(|(start, end)| (start, end - start + 1))
        .collect()
}

/// Reads the sampled windows of `c` through /dev/mem and compares every u64 with the pattern.
fn guest_pattern_check(c: &Carveout, checks: &mut Checks) {
    let mut words = 0;
    for (offset, len) in sample_windows(c.size) {
        let map = match devmem::map(c.base + offset, len as usize, Access::Read) {
            Ok(map) => map,
            Err(why) => {
                checks.fail(why);
                return;
            }
        };
        let (first, count) = devmem::compare_u64(&map, 0, len as usize, |at| {
            c.pattern_word(offset + at as u64)
        });
        words += len / 8;
        if let Some((at, found)) = first {
            let at = offset + at as u64;
            checks.fail(format!(
                "guest reads {found:#x} at offset {at:#x} of {c}, expected {:#x} \
                 ({count} of {} words differ in [{offset:#x}, +{len:#x}))",
                c.pattern_word(at),
                len / 8
            ));
        }
    }
    note(format!(
        "{c}: guest compared {words} words at start, middle and end"
    ));
}

/// Asks the VMM to compare all of `c` with its pattern, a chunk at a time.
fn vmm_pattern_check(dev: &TestDev, c: &Carveout, checks: &mut Checks) {
    let started = Instant::now();
    let mut offset = 0;
    while offset < c.size {
        let len = VMM_CHECK_CHUNK.min(c.size - offset);
        match dev.check_pattern(c.base + offset, len) {
            Ok(Status::Ok) => offset += len,
            Ok(Status::Mismatch { at }) => {
                let at = offset + at;
                let seen = dev
                    .peek(c.base + at)
                    .map_or_else(|why| why, |value| format!("{value:#x}"));
                checks.fail(format!(
                    "VMM: CHECK_PATTERN over {c}: MISMATCH at offset {at:#x}: VMM sees {seen}, \
                     expected {:#x}",
                    c.pattern_word(at)
                ));
                return;
            }
            Ok(status) => {
                checks.fail(format!(
                    "VMM: CHECK_PATTERN [{:#x}, +{len:#x}) of {c}: {status}",
                    c.base + offset
                ));
                return;
            }
            Err(why) => {
                checks.fail(why);
                return;
            }
        }
    }
    note(format!(
        "{c}: VMM checked all {} in {:.1} s",
        bytes(c.size),
        started.elapsed().as_secs_f64()
    ));
}

/// Each carve-out holds the VMM's boot pattern (`seed ^ offset` in every u64), as the guest
/// reads it through /dev/mem and as the VMM sees its backing.
fn carveout_pattern(ctx: &Context) -> Outcome {
    let carveouts = check!(ctx.env.carveouts());
    let mut checks = Checks::new();
    for c in &carveouts {
        guest_pattern_check(c, &mut checks);
    }
    let dev = match TestDev::from_env(&ctx.env) {
        Ok(dev) => dev,
        Err(Outcome::Skip(why)) if !checks.failed() => {
            return Outcome::skip(format!("{why}: guest side matched, VMM side unchecked"));
        }
        Err(Outcome::Skip(why)) => {
            checks.fail(format!("VMM side unchecked: {why}"));
            return checks.outcome();
        }
        Err(other) => return other,
    };
    for c in &carveouts {
        vmm_pattern_check(&dev, c, &mut checks);
    }
    checks.outcome()
}

/// The offset of `c` the write test uses: past the middle, not page or cache-line aligned.
pub fn write_offset(size: u64) -> u64 {
    ((size / 2 + 0x1238) & !7).min(size - 8)
}

/// The window around `offset` the write test asks the VMM to compare: up to 256 bytes each
/// side, inside the region. `(start, length)`.
pub fn window_around(offset: u64, size: u64) -> (u64, u64) {
    let start = offset.saturating_sub(256);
    let end = (offset + 8 + 256).min(size);
    (start, end - start)
}

/// What the guest writes: "gracewrt", made to differ from the pattern word it replaces.
fn distinctive_value(c: &Carveout, offset: u64) -> u64 {
    let value = 0x6772_6163_6577_7274;
    if value == c.pattern_word(offset) {
        !value
    } else {
        value
    }
}

/// One carve-out of [`carveout_write_seen_by_vmm`].
fn write_seen_by_vmm(dev: &TestDev, c: &Carveout, checks: &mut Checks) {
    let offset = write_offset(c.size);
    let gpa = c.base + offset;
    let pattern = c.pattern_word(offset);
    let value = distinctive_value(c, offset);
    let map = match devmem::map(gpa, 8, Access::ReadWrite) {
        Ok(map) => map,
        Err(why) => {
            checks.fail(why);
            return;
        }
    };
    let at = format!("offset {offset:#x} of {c}");
    let original = map.read_u64(0);
    checks.expect(original == pattern, || {
        format!("before the write, guest reads {original:#x} at {at}, expected {pattern:#x}")
    });
    map.write_u64(0, value);
    let readback = map.read_u64(0);
    checks.expect(readback == value, || {
        format!("guest wrote {value:#x} at {at} and reads back {readback:#x}")
    });
    match dev.peek(gpa) {
        Ok(seen) => checks.expect(seen == value, || {
            format!("guest wrote {value:#x} at {at}; VMM PEEK sees {seen:#x}")
        }),
        Err(why) => checks.fail(why),
    }
    match dev.check_value(gpa, 8, value) {
        Ok(status) => checks.expect(status == Status::Ok, || {
            format!("VMM CHECK_VALUE {value:#x} at {at}: {status}")
        }),
        Err(why) => checks.fail(why),
    }
    let (start, len) = window_around(offset, c.size);
    let expected = Status::Mismatch { at: offset - start };
    match dev.check_pattern(c.base + start, len) {
        Ok(status) => checks.expect(status == expected, || {
            format!(
                "VMM CHECK_PATTERN [{start:#x}, +{len:#x}) of {c} after the write: expected \
                 {expected} (offset {offset:#x}), observed {status}"
            )
        }),
        Err(why) => checks.fail(why),
    }
    // Put the pattern back whatever happened above: later tests expect it.
    map.write_u64(0, pattern);
    let restored = map.read_u64(0);
    checks.expect(restored == pattern, || {
        format!("guest restored {pattern:#x} at {at} and reads back {restored:#x}")
    });
    match dev.check_pattern(c.base + start, len) {
        Ok(status) => checks.expect(status == Status::Ok, || {
            format!(
                "VMM CHECK_PATTERN [{start:#x}, +{len:#x}) of {c} after restoring: expected OK, \
                 observed {status}"
            )
        }),
        Err(why) => checks.fail(why),
    }
    note(format!(
        "{c}: wrote {value:#x} at offset {offset:#x}, VMM saw it there, pattern restored"
    ));
}

/// A u64 the guest writes into a carve-out through /dev/mem lands at the same offset of the
/// VMM's backing (PEEK, CHECK_VALUE, CHECK_PATTERN pinpointing it), and restoring the pattern
/// word makes the VMM see the pattern again.
fn carveout_write_seen_by_vmm(ctx: &Context) -> Outcome {
    let carveouts = check!(ctx.env.carveouts());
    let dev = check!(TestDev::from_env(&ctx.env));
    let mut checks = Checks::new();
    for c in &carveouts {
        write_seen_by_vmm(&dev, c, &mut checks);
    }
    checks.outcome()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_sample_windows_gib_start_middle_end() {
        assert_eq!(
            sample_windows(1 << 30),
            vec![
                (0, SAMPLE_WINDOW),
                (1 << 29, SAMPLE_WINDOW),
                ((1 << 30) - SAMPLE_WINDOW, SAMPLE_WINDOW)
            ]
        );
    }

    #[test]
    fn test_sample_windows_small_regions_merge() {
        assert_eq!(sample_windows(64), vec![(0, 64)]);
        assert_eq!(
            sample_windows(2 * SAMPLE_WINDOW),
            vec![(0, 2 * SAMPLE_WINDOW)]
        );
        assert_eq!(
            sample_windows(3 * SAMPLE_WINDOW + 8),
            vec![
                (0, 2 * SAMPLE_WINDOW),
                (2 * SAMPLE_WINDOW + 8, SAMPLE_WINDOW)
            ]
        );
        for size in [8, 0x1000, 0x12_3458, 1 << 30] {
            let windows = sample_windows(size);
            assert!(windows
                .iter()
                .all(|(o, l)| o % 8 == 0 && l % 8 == 0 && o + l <= size));
            assert_eq!(windows.last().map(|(o, l)| o + l), Some(size), "{size:#x}");
        }
    }

    #[test]
    fn test_write_offset_and_window_inside_region() {
        assert_eq!(write_offset(1 << 30), (1 << 29) + 0x1238);
        assert_eq!(
            window_around(write_offset(1 << 30), 1 << 30),
            ((1 << 29) + 0x1138, 520)
        );
        assert_eq!(write_offset(16), 8);
        assert_eq!(window_around(8, 16), (0, 16));
        for size in [8, 0x2000, 0x1_0000, 1 << 30] {
            let offset = write_offset(size);
            let (start, len) = window_around(offset, size);
            assert!(offset % 8 == 0 && offset + 8 <= size);
            assert!(start <= offset && offset + 8 <= start + len && start + len <= size);
        }
    }

    #[test]
    fn test_distinctive_value_never_the_pattern() {
        let c = Carveout {
            pxm: 4,
            base: 0x80_0000_0000,
            size: 1 << 30,
            seed: 0x6772_6163_6577_7274 ^ 0x100,
        };
        assert_ne!(distinctive_value(&c, 0x100), c.pattern_word(0x100));
        assert_eq!(distinctive_value(&c, 0x108), 0x6772_6163_6577_7274);
    }

    #[test]
    fn test_skip_other_mode_only_when_different() {
        assert!(skip_other_mode(BootMode::Acpi, BootMode::Acpi).is_none());
        assert_eq!(
            skip_other_mode(BootMode::Dt, BootMode::Acpi),
            Some(Outcome::skip("boot mode is dt, not acpi"))
        );
    }
}
