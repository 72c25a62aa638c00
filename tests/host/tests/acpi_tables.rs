//! Every ACPI table gracevm writes, disassembled by `iasl -d` (acpica-tools): no errors, no
//! warnings, no checksum or length complaints, and the values the drivers depend on where
//! iasl shows them.

use std::process::Command;

use firmware::description::{
    EGM_BASE_PA, EGM_PXM, EGM_RETIRED_PAGES_DATA_BASE, EGM_SIZE, GPU_MEM_BASE_PA, GPU_MEM_SIZE,
};
use firmware::layout::{self, GIB};
use firmware::{BootMode, Platform};
use host_tests::{dsd_properties, dsl_fields, iasl_disassemble, platform, tool, write};

/// Two sockets (each with a carve-out), two GB200s sharing socket 0's EGM, a GH200 on socket 1.
const RICH: &str = r#"
vcpus = 4
[[socket]]
ram = "1G"
[socket.egm]
size = "1G"
retired_pages = ["0x8000001000", "0x8000002000", "0x8000003000"]
[[socket]]
ram = "2G"
[socket.egm]
size = "2G"
[[gpu]]
model = "gb200"
mem_size = "1G"
[[gpu]]
model = "gb200"
mem_size = "2G"
[[gpu]]
model = "gh200"
socket = 1
mem_size = "1G"
"#;

fn signatures(w: &host_tests::Written) -> Vec<String> {
    let mut v: Vec<String> = w
        .tables()
        .iter()
        .map(|t| t.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_all_tables_clean(p: &Platform) {
    let w = write(p);
    for table in w.tables() {
        if table.file_name().unwrap() == "RSDP.dat" {
            assert_rsdp_recompiles_identically(&table);
        } else {
            iasl_disassemble(&table).assert_clean();
        }
    }
}

/// iasl (20200925) only takes files whose header length matches their size as tables, which an
/// RSDP ("RSD PTR ") never is. So the RSDP is checked the other way round: iasl's data-table
/// compiler builds an RSDP from our fields, computing both checksums itself, and the result
/// must equal ours byte for byte.
fn assert_rsdp_recompiles_identically(path: &std::path::Path) {
    let iasl = tool("iasl", "acpica-tools");
    let ours = std::fs::read(path).unwrap();
    assert_eq!(ours.len(), 36, "ACPI 2.0 RSDP length");
    assert_eq!(&ours[..8], b"RSD PTR ");
    let oem = String::from_utf8_lossy(&ours[9..15]).into_owned();
    let xsdt = u64::from_le_bytes(ours[24..32].try_into().unwrap());
    let asl = format!(
        "[0008]                          Signature : \"RSD PTR \"\n\
         [0001]                           Checksum : 00\n\
         [0006]                             Oem ID : \"{oem}\"\n\
         [0001]                           Revision : 02\n\
         [0004]                       RSDT Address : 00000000\n\
         [0004]                             Length : 00000024\n\
         [0008]                       XSDT Address : {xsdt:016X}\n\
         [0001]                  Extended Checksum : 00\n\
         [0003]                           Reserved : 000000\n"
    );
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("rsdp.asl"), asl).unwrap();
    let out = Command::new(iasl)
        .arg("rsdp.asl")
        .current_dir(work.path())
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && log.contains("0 Errors, 0 Warnings"),
        "{log}"
    );
    let theirs = std::fs::read(work.path().join("rsdp.aml")).unwrap();
    assert_eq!(ours, theirs, "our RSDP differs from iasl's");
}

#[test]
fn test_iasl_decodes_every_table_of_the_default_platform() {
    let p = Platform::default();
    let w = write(&p);
    assert_eq!(
        signatures(&w),
        ["APIC", "DSDT", "FACP", "GTDT", "MCFG", "RSDP", "SPCR", "SRAT", "XSDT"]
    );
    assert_all_tables_clean(&p);
}

#[test]
fn test_iasl_decodes_every_table_of_a_two_socket_three_gpu_platform() {
    assert_all_tables_clean(&platform(RICH));
}

#[test]
fn test_iasl_decodes_every_table_without_egm_or_gpu() {
    let p = Platform::minimal();
    let w = write(&p);
    assert_eq!(
        signatures(&w),
        ["APIC", "DSDT", "FACP", "GTDT", "RSDP", "SPCR", "SRAT", "XSDT"],
        "no GPU: no PCIe host bridge, no MCFG"
    );
    assert_all_tables_clean(&p);
}

#[test]
fn test_iasl_flags_a_corrupted_table() {
    // The check itself must catch a bad checksum, or a clean result means nothing.
    let w = write(&Platform::default());
    let path = w.path("GTDT.dat");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[48] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let d = iasl_disassemble(&path);
    assert!(
        d.complaints().iter().any(|c| c.contains("checksum")),
        "{:?}",
        d.complaints()
    );
}

#[test]
fn test_dsdt_gpu_dsd_properties_and_values() {
    let p = platform(RICH);
    let map = p.resolve().unwrap().map().clone();
    let w = write(&p);
    let d = iasl_disassemble(&w.path("DSDT.dat"));
    d.assert_clean();
    assert!(
        d.dsl.contains("DefinitionBlock (\"\", \"DSDT\", 2,"),
        "revision 2"
    );
    assert!(d
        .dsl
        .contains("ToUUID (\"daffd814-6eba-4d8c-8a91-bc9bbf4aa301\")"));
    let props = dsd_properties(&d.dsl);
    assert_eq!(
        props.keys().collect::<Vec<_>>(),
        ["GPU0", "GPU1", "GPU2"],
        "one device per GPU"
    );
    for g in &map.gpus {
        let dev = format!("GPU{}", g.index);
        let adr = format!(
            "Device ({dev})\n            {{\n                Name (_ADR, 0x{:08X})",
            u32::from(g.device) << 16
        );
        assert!(d.dsl.contains(&adr), "{dev} _ADR: want {adr}");
        let c = map.carve_out(g.socket).unwrap();
        let want = vec![
            (GPU_MEM_BASE_PA.to_string(), g.memory.base),
            (GPU_MEM_SIZE.to_string(), g.memory.size),
            (EGM_PXM.to_string(), u64::from(c.pxm)),
            (EGM_BASE_PA.to_string(), c.range.base),
            (EGM_SIZE.to_string(), c.range.size),
            (
                EGM_RETIRED_PAGES_DATA_BASE.to_string(),
                c.retired_pages_table,
            ),
        ];
        assert_eq!(props[&dev], want, "{dev}");
    }
    // The two GB200s on socket 0 share one EGM region; the GH200 has socket 1's.
    assert_eq!(props["GPU0"][3], props["GPU1"][3]);
    assert_eq!(props["GPU2"][2].1, 5);
    assert_eq!(props["GPU2"][3].1, layout::egm_default_base(1));
    assert_eq!(props["GPU1"][0].1, layout::GPU_MEM_BASE + GIB);
}

#[test]
fn test_dsdt_fault_knobs_omit_and_zero_properties() {
    let p = platform(&format!(
        r#"
        [[socket]]
        ram = "1G"
        [socket.egm]
        size = "1G"
        [[gpu]]
        mem_size = "1G"
        omit_properties = [{EGM_PXM:?}, {EGM_SIZE:?}]
        zero_properties = [{GPU_MEM_SIZE:?}]
        retired_pages_base = 0
        "#
    ));
    let w = write(&p);
    let d = iasl_disassemble(&w.path("DSDT.dat"));
    d.assert_clean();
    let props = &dsd_properties(&d.dsl)["GPU0"];
    let names: Vec<&str> = props.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            GPU_MEM_BASE_PA,
            GPU_MEM_SIZE,
            EGM_BASE_PA,
            EGM_RETIRED_PAGES_DATA_BASE
        ]
    );
    assert_eq!(props[1].1, 0);
    assert_eq!(props[3].1, 0);
}

#[test]
fn test_dsdt_uart_testdev_and_host_bridge() {
    let w = write(&Platform::default());
    let d = iasl_disassemble(&w.path("DSDT.dat"));
    for needle in [
        "Device (COM0)",
        "Name (_HID, \"ARMH0011\")",
        "0x09000000,         // Address Base",
        "0x00000021,",
        "Device (TDEV)",
        "Name (_HID, \"GRVM0001\")",
        "0x09010000,         // Address Base",
        "Device (PCI0)",
        "Name (_HID, EisaId (\"PNP0A08\")",
        "Name (_CID, EisaId (\"PNP0A03\")",
        "Name (_SEG, Zero)",
        "Name (_BBN, Zero)",
        "Name (_CCA, One)",
        "0x000F,             // Range Maximum",
        "0x10000000,         // Range Minimum",
        "0x3EFFFFFF,         // Range Maximum",
        "0x000000C000000000, // Range Minimum",
        "Name (_PRT, Package (0x80)",
        "Name (_HID, EisaId (\"PNP0C02\")",
        "0x3F000000,         // Address Base",
    ] {
        assert!(d.dsl.contains(needle), "DSDT lacks {needle}\n{}", d.dsl);
    }
}

#[test]
fn test_fadt_madt_gtdt_spcr_mcfg_fields() {
    let p = platform(RICH);
    let w = write(&p);
    let fadt = iasl_disassemble(&w.path("FACP.dat"));
    assert_eq!(dsl_fields(&fadt.dsl, "Hardware Reduced (V5)"), ["1"]);
    assert_eq!(dsl_fields(&fadt.dsl, "PSCI Compliant"), ["1"]);
    assert_eq!(dsl_fields(&fadt.dsl, "Must use HVC for PSCI"), ["1"]);

    let madt = iasl_disassemble(&w.path("APIC.dat"));
    let mpidrs = dsl_fields(&madt.dsl, "ARM MPIDR");
    assert_eq!(
        mpidrs,
        [
            "0000000000000000",
            "0000000000000001",
            "0000000000000002",
            "0000000000000003"
        ]
    );
    assert_eq!(dsl_fields(&madt.dsl, "Version"), ["03"], "GICv3");
    assert!(dsl_fields(&madt.dsl, "Base Address").contains(&"0000000008000000"));
    assert_eq!(
        dsl_fields(&madt.dsl, "Base Address").len(),
        4 + 2,
        "4 GICC + GICD + GICR"
    );

    let gtdt = iasl_disassemble(&w.path("GTDT.dat"));
    assert_eq!(dsl_fields(&gtdt.dsl, "Secure EL1 Interrupt"), ["0000001D"]);
    assert_eq!(
        dsl_fields(&gtdt.dsl, "Non-Secure EL1 Interrupt"),
        ["0000001E"]
    );
    assert_eq!(
        dsl_fields(&gtdt.dsl, "Virtual Timer Interrupt"),
        ["0000001B"]
    );
    assert_eq!(
        dsl_fields(&gtdt.dsl, "Non-Secure EL2 Interrupt"),
        ["0000001A"]
    );

    let spcr = iasl_disassemble(&w.path("SPCR.dat"));
    assert_eq!(dsl_fields(&spcr.dsl, "Interface Type"), ["03"], "PL011");
    assert_eq!(dsl_fields(&spcr.dsl, "Interrupt"), ["00000021"], "SPI 1");
    assert_eq!(dsl_fields(&spcr.dsl, "Address"), ["0000000009000000"]);

    let mcfg = iasl_disassemble(&w.path("MCFG.dat"));
    assert_eq!(dsl_fields(&mcfg.dsl, "Base Address"), ["000000003F000000"]);
    assert_eq!(dsl_fields(&mcfg.dsl, "End Bus Number"), ["0F"]);
}

#[test]
fn test_srat_domains_for_ram_egm_and_gpus() {
    let p = platform(RICH);
    let w = write(&p);
    let srat = iasl_disassemble(&w.path("SRAT.dat"));
    srat.assert_clean();
    let dsl = &srat.dsl;
    // Subtable types in order: 4 GICC affinities, 2 RAM, 2 EGM placeholders, then per GPU a
    // placeholder and a Generic Initiator.
    let types = dsl_fields(dsl, "Subtable Type");
    let gi = types
        .iter()
        .filter(|t| t.contains("Generic Initiator"))
        .count();
    let mem = types
        .iter()
        .filter(|t| t.contains("Memory Affinity"))
        .count();
    let gicc = types.iter().filter(|t| t.contains("GICC Affinity")).count();
    assert_eq!((gicc, mem, gi), (4, 2 + 2 + 3, 3));
    let pxms = dsl_fields(dsl, "Proximity Domain");
    for want in [
        "00000000", "00000001", "00000004", "00000005", "00000008", "00000009", "0000000A",
    ] {
        assert!(pxms.contains(&want), "PXM {want} in {pxms:?}");
    }
    assert!(
        dsl_fields(dsl, "Base Address").contains(&"0000002000000000"),
        "socket 1 RAM"
    );
    assert_eq!(
        dsl_fields(dsl, "Hot Pluggable")
            .iter()
            .filter(|v| **v == "1")
            .count(),
        2 + 3,
        "EGM and GPU placeholders are hot-pluggable"
    );
    // PCI handle: segment 0, then BDF as a little-endian u16 (devfn, bus).
    let handles = dsl_fields(dsl, "Device Handle");
    assert_eq!(handles.len(), 3);
    assert!(handles[0].starts_with("00 00 08 00"), "{}", handles[0]);
    assert!(handles[2].starts_with("00 00 18 00"), "{}", handles[2]);
}

#[test]
fn test_write_dir_dt_mode_has_no_acpi_tables() {
    let p = Platform {
        boot: BootMode::Dt,
        ..Platform::default()
    };
    let w = write(&p);
    assert!(w.tables().is_empty());
    assert!(w.path("gracevm.dtb").is_file());
}
