//! The guest physical memory map, in one place (read it top to bottom).
//!
//! | GPA                          | what                                            |
//! |------------------------------|-------------------------------------------------|
//! | 0x0800_0000                  | GICv3 distributor (64 KiB)                      |
//! | 0x080A_0000                  | GICv3 redistributors, 128 KiB per vCPU          |
//! | 0x0900_0000                  | PL011 UART, SPI 1 (INTID 33)                    |
//! | 0x0901_0000                  | gracevm test device (boot timer, checks)        |
//! | 0x4000_0000 ..               | socket 0 RAM                                    |
//!
//! Inside socket 0 RAM the boot images sit at fixed places:
//! | RAM offset                   | what                                            |
//! |------------------------------|-------------------------------------------------|
//! | 0                            | firmware blob (EFI tables, ACPI), 2 MiB         |
//! | 2 MiB                        | kernel Image (2 MiB aligned, as arm64 requires) |
//! | top - 2 MiB                  | DTB (at most 2 MiB, in a 2 MiB block of its own)|
//! | below the DTB                | initrd, page aligned                            |

/// Bytes in a KiB/MiB/GiB, for readable sizes.
pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

pub const GIC_DIST_BASE: u64 = 0x0800_0000;
pub const GIC_DIST_SIZE: u64 = 64 * KIB;
pub const GIC_REDIST_BASE: u64 = 0x080A_0000;
/// Each GICv3 redistributor has an RD and an SGI frame of 64 KiB each.
pub const GIC_REDIST_SIZE_PER_CPU: u64 = 128 * KIB;

pub const UART_BASE: u64 = 0x0900_0000;
pub const UART_SIZE: u64 = 4 * KIB;
/// SPI number of the UART (INTID = 32 + SPI).
pub const UART_SPI: u32 = 1;

pub const TESTDEV_BASE: u64 = 0x0901_0000;
pub const TESTDEV_SIZE: u64 = 4 * KIB;

/// The redistributors must end below the UART; this bounds the vCPU count.
pub const MAX_VCPUS: u32 = ((UART_BASE - GIC_REDIST_BASE) / GIC_REDIST_SIZE_PER_CPU) as u32;

/// Number of interrupt lines given to the vGIC (SGIs+PPIs+SPIs), a multiple of 32.
pub const GIC_NR_IRQS: u32 = 128;

/// Architected timer PPIs: secure phys, non-secure phys, virtual, hypervisor phys.
pub const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];

pub const RAM_BASE: u64 = 0x4000_0000;
/// The first 2 MiB of RAM hold what the firmware hands over (EFI system table, memory map,
/// ACPI tables); 2 MiB so every EFI descriptor stays 2 MiB aligned.
pub const FIRMWARE_SIZE: u64 = 2 * MIB;
pub const KERNEL_OFFSET: u64 = FIRMWARE_SIZE;
pub const DTB_MAX_SIZE: u64 = 2 * MIB;

/// Smallest RAM that holds the firmware blob, a minimal kernel, an initrd and the DTB.
pub const MIN_RAM: u64 = 64 * MIB;

/// Where the redistributor region of `vcpus` vCPUs ends (exclusive).
pub fn gic_redist_size(vcpus: u32) -> u64 {
    u64::from(vcpus) * GIC_REDIST_SIZE_PER_CPU
}

/// Address of the DTB for a socket-0 RAM of `ram_size` bytes.
pub fn dtb_addr(ram_size: u64) -> u64 {
    RAM_BASE + ram_size - DTB_MAX_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_layout_devices_do_not_overlap() {
        let mut ranges = [
            (GIC_DIST_BASE, GIC_DIST_SIZE),
            (GIC_REDIST_BASE, gic_redist_size(MAX_VCPUS)),
            (UART_BASE, UART_SIZE),
            (TESTDEV_BASE, TESTDEV_SIZE),
            (RAM_BASE, MIN_RAM),
        ];
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
    }

    #[test]
    fn test_layout_boot_images_aligned() {
        assert_eq!((RAM_BASE + KERNEL_OFFSET) % (2 * MIB), 0);
        assert_eq!(dtb_addr(MIN_RAM) % (2 * MIB), 0);
        assert!(dtb_addr(MIN_RAM) > RAM_BASE + KERNEL_OFFSET);
    }

    #[test]
    fn test_layout_max_vcpus_fits_below_uart() {
        assert!(GIC_REDIST_BASE + gic_redist_size(MAX_VCPUS) <= UART_BASE);
        assert!(MAX_VCPUS >= 64);
    }
}
