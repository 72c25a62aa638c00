//! The DTB gracevm writes, decompiled by `dtc` (device-tree-compiler) and checked node by node,
//! in both boot modes.

use firmware::description::{
    EGM_BASE_PA, EGM_PXM, EGM_RETIRED_PAGES_DATA_BASE, EGM_SIZE, GPU_MEM_BASE_PA, GPU_MEM_SIZE,
};
use firmware::layout::{self, GuestRange, GIB};
use firmware::{BootMode, Platform};
use host_tests::{dtc_decompile, platform, write, Decompiled};

fn dt_mode(mut p: Platform) -> Platform {
    p.boot = BootMode::Dt;
    p
}

fn decompile(p: &Platform) -> Decompiled {
    let w = write(p);
    let d = dtc_decompile(&w.path("gracevm.dtb"));
    assert!(
        d.warnings.trim().is_empty(),
        "dtc warnings:\n{}",
        d.warnings
    );
    d
}

/// [base, size] pairs of a `reg` with 2 address and 2 size cells.
fn ranges(reg: Vec<u64>) -> Vec<GuestRange> {
    reg.chunks(2).map(|c| GuestRange::new(c[0], c[1])).collect()
}

#[test]
fn test_dt_mode_nodes_of_the_default_platform() {
    let mut p = dt_mode(Platform::default());
    p.vcpus = 2;
    let d = decompile(&p);
    let root = &d.root;

    assert_eq!(root.cells("#address-cells"), [2]);
    assert_eq!(root.cells("#size-cells"), [2]);

    // cpus, with MPIDR affinity in reg.
    let cpus = root.node("/cpus");
    assert_eq!(cpus.child_names(), ["cpu@0", "cpu@1"]);
    for (i, name) in ["cpu@0", "cpu@1"].iter().enumerate() {
        let cpu = cpus.node(name);
        assert_eq!(cpu.u64s("reg"), [i as u64]);
        assert_eq!(cpu.strings("device_type"), ["cpu"]);
        assert_eq!(cpu.strings("enable-method"), ["psci"]);
        assert_eq!(cpu.cells("numa-node-id"), [0]);
    }

    // memory: socket RAM only.
    let mem = root.node("/memory@40000000");
    assert_eq!(mem.strings("device_type"), ["memory"]);
    assert_eq!(mem.u64s("reg"), [layout::RAM_BASE, GIB]);

    // The firmware region is reserved but mapped (no no-map).
    let fw = root.node("/reserved-memory/firmware@40000000");
    assert_eq!(
        fw.u64s("reg"),
        [layout::FIRMWARE_BASE, layout::FIRMWARE_SIZE]
    );
    assert!(!fw.props.contains_key("no-map"));

    let gic = root.node("/intc@8000000");
    assert_eq!(gic.strings("compatible"), ["arm,gic-v3"]);
    assert!(gic.props.contains_key("interrupt-controller"));
    assert_eq!(
        gic.u64s("reg"),
        [
            layout::GIC_DIST_BASE,
            layout::GIC_DIST_SIZE,
            layout::GIC_REDIST_BASE,
            2 * layout::GIC_REDIST_SIZE_PER_CPU
        ]
    );

    let timer = root.node("/timer");
    assert_eq!(timer.strings("compatible"), ["arm,armv8-timer"]);
    assert_eq!(
        timer.cells("interrupts"),
        [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]
    );

    let psci = root.node("/psci");
    assert_eq!(psci.strings("method"), ["hvc"]);
    assert!(psci.prop("compatible").contains("arm,psci-0.2"));

    let uart = root.node("/pl011@9000000");
    assert!(uart.prop("compatible").contains("arm,pl011"));
    assert_eq!(uart.u64s("reg"), [layout::UART_BASE, layout::UART_SIZE]);
    assert_eq!(uart.cells("interrupts"), [0, 1, 4]);

    let testdev = root.node("/testdev@9010000");
    assert_eq!(testdev.strings("compatible"), ["gracevm,testdev"]);
    assert_eq!(
        testdev.u64s("reg"),
        [layout::TESTDEV_BASE, layout::TESTDEV_SIZE]
    );

    let chosen = root.node("/chosen");
    assert_eq!(chosen.strings("bootargs"), ["console=ttyAMA0 rdinit=/init"]);
    assert_eq!(chosen.strings("stdout-path"), ["/pl011@9000000"]);
    assert_eq!(chosen.u64s("linux,initrd-start"), [0x4800_0000]);
    assert_eq!(chosen.u64s("linux,initrd-end"), [0x4810_0000]);
    assert!(chosen.props.contains_key("kaslr-seed"));
    assert!(chosen.props.contains_key("rng-seed"));
    assert!(!chosen.props.contains_key("linux,uefi-system-table"));
}

#[test]
fn test_dt_mode_pcie_host_and_gpu_nodes() {
    let p = dt_mode(platform(&format!(
        r#"
        [[socket]]
        ram = "1G"
        [socket.egm]
        size = "1G"
        [[gpu]]
        model = "gb200"
        mem_size = "1G"
        [[gpu]]
        model = "gb200"
        mem_size = "1G"
        omit_properties = [{EGM_PXM:?}]
        zero_properties = [{GPU_MEM_SIZE:?}]
        "#
    )));
    let map = p.resolve().unwrap().map().clone();
    let d = decompile(&p);
    let pcie = d.root.node("/pcie@3f000000");
    assert_eq!(pcie.strings("compatible"), ["pci-host-ecam-generic"]);
    assert_eq!(pcie.strings("device_type"), ["pci"]);
    assert_eq!(
        pcie.u64s("reg"),
        [layout::PCI_ECAM_BASE, layout::PCI_ECAM_SIZE]
    );
    assert_eq!(pcie.cells("bus-range"), [0, 15]);
    assert_eq!(
        pcie.cells("ranges"),
        [
            0x0200_0000,
            0,
            0x1000_0000,
            0,
            0x1000_0000,
            0,
            0x2f00_0000, //
            0x4300_0000,
            0xc0,
            0,
            0xc0,
            0,
            0x10,
            0
        ]
    );
    assert_eq!(pcie.cells("interrupt-map-mask"), [0x1800, 0, 0, 7]);
    let imap = pcie.cells("interrupt-map");
    assert_eq!(imap.len(), 16 * 10);
    // Device 1, INTA -> SPI 4 (the swizzle), level high, through the GIC (phandle 1).
    assert_eq!(&imap[40..50], &[0x800, 0, 0, 1, 1, 0, 0, 0, 4, 4]);
    assert_eq!(pcie.child_names(), ["gpu@1", "gpu@2"]);

    let c = &map.carve_outs[0];
    let gpu0 = pcie.node("gpu@1");
    assert_eq!(gpu0.cells("reg"), [1 << 11, 0, 0, 0, 0]);
    assert_eq!(gpu0.strings("compatible"), ["pci10de,2941"]);
    for (name, want) in [
        (GPU_MEM_BASE_PA, map.gpus[0].memory.base),
        (GPU_MEM_SIZE, GIB),
        (EGM_PXM, 4),
        (EGM_BASE_PA, c.range.base),
        (EGM_SIZE, c.range.size),
        (EGM_RETIRED_PAGES_DATA_BASE, c.retired_pages_table),
    ] {
        // Two cells: an 8-byte property.
        assert_eq!(gpu0.u64s(name), [want], "{name}");
    }
    let gpu1 = pcie.node("gpu@2");
    assert_eq!(gpu1.cells("reg"), [2 << 11, 0, 0, 0, 0]);
    assert!(!gpu1.props.contains_key(EGM_PXM));
    assert_eq!(gpu1.u64s(GPU_MEM_SIZE), [0]);
    assert_eq!(gpu1.u64s(EGM_BASE_PA), [c.range.base], "shared EGM");
    assert_eq!(gpu1.u64s(GPU_MEM_BASE_PA), [map.gpus[1].memory.base]);
}

#[test]
fn test_dt_mode_memory_excludes_carve_outs_and_gpu_memory() {
    let p = dt_mode(platform(
        r#"
        vcpus = 4
        [[socket]]
        ram = "1G"
        [socket.egm]
        size = "1G"
        [[socket]]
        ram = "2G"
        [socket.egm]
        size = "2G"
        base = "0x9000000000"
        [[gpu]]
        mem_size = "1G"
        [[gpu]]
        socket = 1
        mem_size = "1G"
        "#,
    ));
    let map = p.resolve().unwrap().map().clone();
    let d = decompile(&p);
    let mems: Vec<_> = d
        .root
        .children
        .iter()
        .filter(|n| {
            n.props
                .get("device_type")
                .is_some_and(|t| t == "\"memory\"")
        })
        .collect();
    assert_eq!(mems.len(), 2, "one memory node per socket");
    let listed: Vec<GuestRange> = mems.iter().flat_map(|m| ranges(m.u64s("reg"))).collect();
    assert_eq!(
        listed,
        [
            GuestRange::new(layout::RAM_BASE, GIB),
            GuestRange::new(layout::SOCKET_RAM_STRIDE, 2 * GIB)
        ]
    );
    assert_eq!(d.root.node("/memory@2000000000").cells("numa-node-id"), [1]);
    for r in &listed {
        for c in &map.carve_outs {
            assert!(
                !r.overlaps(&c.range),
                "memory {r} lists carve-out {}",
                c.range
            );
        }
        for g in &map.gpus {
            assert!(
                !r.overlaps(&g.memory),
                "memory {r} lists GPU memory {}",
                g.memory
            );
        }
    }
    let nodes: Vec<u32> = d
        .root
        .node("/cpus")
        .children
        .iter()
        .map(|c| c.cells("numa-node-id")[0])
        .collect();
    assert_eq!(nodes, [0, 0, 1, 1]);
}

#[test]
fn test_dt_mode_without_gpu_has_no_pcie_node() {
    let d = decompile(&dt_mode(Platform::minimal()));
    assert!(d.root.at("/pcie@3f000000").is_none());
    assert!(d.root.at("/memory@40000000").is_some());
}

#[test]
fn test_acpi_mode_dtb_holds_only_chosen_with_the_efi_handoff() {
    let p = Platform::default();
    let fw = firmware::build(&p.resolve().unwrap(), &firmware::BootParams::example(1)).unwrap();
    let d = decompile(&p);
    assert_eq!(d.root.child_names(), ["chosen"], "ACPI needs a stub DT");
    let chosen = d.root.node("/chosen");
    let bootargs = chosen.strings("bootargs");
    assert!(bootargs[0].ends_with(" efi=noruntime"), "{bootargs:?}");
    assert_eq!(
        chosen.u64s("linux,uefi-system-table"),
        [layout::FIRMWARE_BASE]
    );
    assert_eq!(
        chosen.u64s("linux,uefi-mmap-start"),
        [layout::FIRMWARE_BASE + layout::FW_EFI_MMAP_OFFSET]
    );
    assert_eq!(
        chosen.cells("linux,uefi-mmap-size"),
        [40 * fw.efi_memory_map.len() as u32]
    );
    assert_eq!(chosen.cells("linux,uefi-mmap-desc-size"), [40]);
    assert_eq!(chosen.cells("linux,uefi-mmap-desc-ver"), [1]);
    assert_eq!(chosen.cells("linux,uefi-secure-boot"), [2], "disabled");
    assert!(chosen.props.contains_key("kaslr-seed"));
    assert!(chosen.props.contains_key("rng-seed"));
    assert_eq!(chosen.u64s("linux,initrd-start"), [0x4800_0000]);
    assert!(
        !chosen.props.contains_key("stdout-path"),
        "the SPCR names the console"
    );
}
