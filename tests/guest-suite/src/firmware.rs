//! What the guest sees of its firmware interfaces: the ACPI tables in
//! `/sys/firmware/acpi/tables`, the unflattened device tree in `/sys/firmware/devicetree/base`
//! and the EFI hand-off as the kernel logs it.

use std::io::ErrorKind;

pub const ACPI_TABLES: &str = "/sys/firmware/acpi/tables";
pub const DT_BASE: &str = "/sys/firmware/devicetree/base";
pub const EFI_DIR: &str = "/sys/firmware/efi";

/// Length of the common header of every ACPI system description table.
pub const ACPI_HEADER_LEN: usize = 36;

/// The common header of an ACPI system description table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiHeader {
    pub signature: String,
    pub length: u32,
    pub revision: u8,
    pub oem_id: String,
    pub oem_table_id: String,
}

/// Parses and checks an ACPI table as the kernel exports it: at least a header, the header's
/// length equal to the byte count, and the bytes summing to 0 (mod 256).
pub fn parse_acpi_table(bytes: &[u8]) -> Result<AcpiHeader, String> {
    if bytes.len() < ACPI_HEADER_LEN {
        return Err(format!(
            "{} bytes, shorter than the {ACPI_HEADER_LEN}-byte header",
            bytes.len()
        ));
    }
    let text = |range: std::ops::Range<usize>| {
        String::from_utf8_lossy(&bytes[range])
            .trim_end_matches(['\0', ' '])
            .to_string()
    };
    let header = AcpiHeader {
        signature: text(0..4),
        length: u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")),
        revision: bytes[8],
        oem_id: text(10..16),
        oem_table_id: text(16..24),
    };
    if header.length as usize != bytes.len() {
        return Err(format!(
            "header length {} but {} bytes",
            header.length,
            bytes.len()
        ));
    }
    let sum = bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte));
    if sum != 0 {
        return Err(format!("checksum: bytes sum to {sum:#04x}, not 0"));
    }
    Ok(header)
}

/// The names of the subdirectories (nodes or tables dirs) of `path`, sorted; `None` when
/// `path` does not exist.
pub fn subdirectories(path: &str) -> Result<Option<Vec<String>>, String> {
    entries(path, true)
}

/// The names of the plain files of `path`, sorted; `None` when `path` does not exist.
pub fn files(path: &str) -> Result<Option<Vec<String>>, String> {
    entries(path, false)
}

fn entries(path: &str, dirs: bool) -> Result<Option<Vec<String>>, String> {
    let read = match std::fs::read_dir(path) {
        Ok(read) => read,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot list {path}: {e}")),
    };
    let mut names = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| format!("cannot list {path}: {e}"))?;
        let is_dir = entry
            .file_type()
            .map_err(|e| format!("cannot stat {path}/{:?}: {e}", entry.file_name()))?
            .is_dir();
        if is_dir == dirs {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(Some(names))
}

/// A DT property of big-endian cells as numbers of `cells` cells each (1 or 2).
pub fn dt_numbers(bytes: &[u8], cells: usize) -> Result<Vec<u64>, String> {
    if !(1..=2).contains(&cells) || bytes.len() % (4 * cells) != 0 {
        return Err(format!(
            "{} bytes are not a list of {cells}-cell numbers",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(4 * cells)
        .map(|number| {
            number.chunks_exact(4).fold(0u64, |value, cell| {
                (value << 32) | u64::from(u32::from_be_bytes(cell.try_into().expect("4 bytes")))
            })
        })
        .collect())
}

/// The firmware vendor from the kernel's EFI banner (`efi: EFI v2.7 by gracevm`).
pub fn efi_vendor_from_log(log: &str) -> Option<String> {
    log.lines()
        .map(crate::procfs::log_message)
        .find_map(|line| {
            let banner = line.strip_prefix("efi: EFI v")?;
            let (_, vendor) = banner.split_once(" by ")?;
            Some(vendor.trim().to_string())
        })
}

/// One EFI memory descriptor as the kernel logs it with `efi=debug`
/// (`efi:   0x000040000000-0x0000401fffff [ACPI Reclaim|...|WB|WT|WC|UC]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EfiRegion {
    pub start: u64,
    /// Inclusive, as logged.
    pub end: u64,
    /// The kernel's name of the memory type (`Conventional`, `ACPI Reclaim`, ...).
    pub kind: String,
    /// Attribute flags that are set (`WB`, `RUN`, ...).
    pub attributes: Vec<String>,
}

/// The memory types arm64 turns into System RAM when they are write-back cacheable
/// (`is_usable_memory` in drivers/firmware/efi/efi-init.c).
const USABLE_TYPES: &[&str] = &[
    "Loader Code",
    "Loader Data",
    "ACPI Reclaim",
    "Boot Code",
    "Boot Data",
    "Conventional",
    "Persistent",
];

impl EfiRegion {
    fn has(&self, attribute: &str) -> bool {
        self.attributes.iter().any(|a| a == attribute)
    }

    /// Added to memblock at all (`is_memory`: a cacheable attribute).
    pub fn is_memory(&self) -> bool {
        self.has("WB") || self.has("WT") || self.has("WC")
    }

    /// Becomes System RAM (otherwise a memory region is mapped nomap and shows as `reserved`).
    pub fn is_usable(&self) -> bool {
        self.has("WB") && USABLE_TYPES.contains(&self.kind.as_str())
    }
}

/// The EFI memory map the kernel logged (`efi=debug`); empty when it was not logged.
pub fn efi_map_from_log(log: &str) -> Vec<EfiRegion> {
    log.lines()
        .map(crate::procfs::log_message)
        .filter_map(parse_efi_region_line)
        .collect()
}

fn parse_efi_region_line(line: &str) -> Option<EfiRegion> {
    let rest = line.strip_prefix("efi:")?.trim_start();
    let (range, flags) = rest.split_once(' ')?;
    let (start, end) = range.split_once('-')?;
    let hex = |s: &str| u64::from_str_radix(s.strip_prefix("0x")?, 16).ok();
    let (start, end) = (hex(start)?, hex(end)?);
    let flags = flags.trim().strip_prefix('[')?.strip_suffix(']')?;
    let mut fields = flags.split('|').map(str::trim);
    let kind = fields.next()?.to_string();
    let attributes = fields
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect();
    Some(EfiRegion {
        start,
        end,
        kind,
        attributes,
    })
}

/// A physical range with an inclusive end.
pub type Range = (u64, u64);

/// What /proc/iomem shows at top level for an EFI map on arm64: the System RAM ranges and
/// the `reserved` (nomap) ranges, each with adjacent ranges merged.
pub fn iomem_from_efi_map(map: &[EfiRegion]) -> (Vec<Range>, Vec<Range>) {
    let mut memory: Vec<&EfiRegion> = map.iter().filter(|r| r.is_memory()).collect();
    memory.sort_by_key(|r| r.start);
    let ram = merge(
        memory
            .iter()
            .filter(|r| r.is_usable())
            .map(|r| (r.start, r.end)),
    );
    let reserved = merge(
        memory
            .iter()
            .filter(|r| !r.is_usable())
            .map(|r| (r.start, r.end)),
    );
    (ram, reserved)
}

/// Sorts ranges and merges touching or overlapping ones.
pub fn merge(ranges: impl IntoIterator<Item = Range>) -> Vec<Range> {
    let mut ranges: Vec<Range> = ranges.into_iter().collect();
    ranges.sort_unstable();
    let mut merged: Vec<Range> = Vec::new();
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// `a-b, c-d` in hex.
pub fn ranges_text(ranges: &[Range]) -> String {
    if ranges.is_empty() {
        return "none".to_string();
    }
    ranges
        .iter()
        .map(|(start, end)| format!("{start:#x}-{end:#x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `ACPI20=` address in /sys/firmware/efi/systab.
pub fn systab_acpi20(systab: &str) -> Option<u64> {
    systab.lines().find_map(|line| {
        let value = line.trim().strip_prefix("ACPI20=")?;
        crate::env::parse_u64(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(signature);
        bytes.extend_from_slice(&((ACPI_HEADER_LEN + body.len()) as u32).to_le_bytes());
        bytes.push(revision);
        bytes.push(0);
        bytes.extend_from_slice(b"GRACE ");
        bytes.extend_from_slice(b"GRACEVM\0");
        bytes.extend_from_slice(&[0; 12]);
        bytes.extend_from_slice(body);
        let sum = bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        bytes[9] = 0u8.wrapping_sub(sum);
        bytes
    }

    #[test]
    fn test_parse_acpi_table_valid_header_fields() {
        let header = parse_acpi_table(&table(b"DSDT", 2, &[1, 2, 3])).unwrap();
        assert_eq!(
            header,
            AcpiHeader {
                signature: "DSDT".into(),
                length: 39,
                revision: 2,
                oem_id: "GRACE".into(),
                oem_table_id: "GRACEVM".into(),
            }
        );
    }

    #[test]
    fn test_parse_acpi_table_bad_checksum_length_short_errors() {
        let mut bad_sum = table(b"APIC", 5, &[0; 8]);
        bad_sum[40] = 1;
        assert!(parse_acpi_table(&bad_sum).unwrap_err().contains("checksum"));
        let mut truncated = table(b"APIC", 5, &[0; 8]);
        truncated.pop();
        assert!(parse_acpi_table(&truncated).unwrap_err().contains("length"));
        assert!(parse_acpi_table(&[0; 10]).is_err());
    }

    #[test]
    fn test_dt_numbers_one_and_two_cells() {
        let reg = [0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0];
        assert_eq!(dt_numbers(&reg, 2).unwrap(), vec![0x4000_0000, 0x2000_0000]);
        assert_eq!(dt_numbers(&reg[..8], 1).unwrap(), vec![0, 0x4000_0000]);
        assert!(dt_numbers(&reg[..6], 1).is_err());
        assert!(dt_numbers(&reg, 3).is_err());
    }

    const LOG: &str = "\
<6>[    0.000000] efi: EFI v2.7 by gracevm
<6>[    0.000000] efi: ACPI 2.0=0x40000000 RTPROP=0x40000180 MEMRESERVE=0x4010001
<6>[    0.000000] efi: Processing EFI memory map:
<6>[    0.000000] efi:   0x000040000000-0x0000401fffff [ACPI Reclaim|   |  |  |  |  |  |  |  |  |   |WB|WT|WC|UC]
<6>[    0.000000] efi:   0x000040200000-0x00005fffffff [Conventional|   |  |  |  |  |  |  |  |  |   |WB|WT|WC|UC]
<6>[    0.000000] efi:   0x002000000000-0x00203fffffff [Conventional|   |  |  |  |  |  |  |  |  |   |WB|WT|WC|UC]
<6>[    0.000000] efi:   0x002040000000-0x0020401fffff [Runtime Data|RUN|  |  |  |  |  |  |  |  |   |WB|WT|WC|UC]
<6>[    0.000000] efi:   0x009000000000-0x009000000fff [MMIO        |RUN|  |  |  |  |  |  |  |  |   |  |  |  |UC]
<6>[    0.000000] NUMA: Faking a node at [mem 0x0000000040000000-0x000000005fffffff]
";

    #[test]
    fn test_efi_vendor_from_log_banner() {
        assert_eq!(efi_vendor_from_log(LOG).as_deref(), Some("gracevm"));
        assert_eq!(
            efi_vendor_from_log("efi: EFI v2.70 by EDK II\n").as_deref(),
            Some("EDK II")
        );
        assert_eq!(efi_vendor_from_log("efi: UEFI not found.\n"), None);
    }

    #[test]
    fn test_efi_map_from_log_types_and_attributes() {
        let map = efi_map_from_log(LOG);
        assert_eq!(map.len(), 5);
        assert_eq!(map[0].kind, "ACPI Reclaim");
        assert_eq!(map[0].start, 0x4000_0000);
        assert_eq!(map[0].end, 0x401f_ffff);
        assert_eq!(map[0].attributes, ["WB", "WT", "WC", "UC"]);
        assert!(map[0].is_usable());
        assert!(map[3].is_memory() && !map[3].is_usable());
        assert_eq!(map[4].kind, "MMIO");
        assert!(!map[4].is_memory());
        assert!(efi_map_from_log("efi: EFI v2.7 by gracevm\n").is_empty());
    }

    #[test]
    fn test_iomem_from_efi_map_merges_usable_reserves_runtime() {
        let (ram, reserved) = iomem_from_efi_map(&efi_map_from_log(LOG));
        assert_eq!(
            ram,
            vec![(0x4000_0000, 0x5fff_ffff), (0x20_0000_0000, 0x20_3fff_ffff)]
        );
        assert_eq!(reserved, vec![(0x20_4000_0000, 0x20_401f_ffff)]);
    }

    #[test]
    fn test_merge_touching_and_overlapping_ranges() {
        assert_eq!(
            merge([(10, 19), (0, 9), (30, 39), (35, 50)]),
            vec![(0, 19), (30, 50)]
        );
        assert_eq!(merge([(0, u64::MAX), (5, 6)]), vec![(0, u64::MAX)]);
        assert_eq!(ranges_text(&[(0x10, 0x1f)]), "0x10-0x1f");
        assert_eq!(ranges_text(&[]), "none");
    }

    #[test]
    fn test_systab_acpi20_line() {
        assert_eq!(
            systab_acpi20("ACPI20=0x40002000\nACPI=0x40002000\n"),
            Some(0x4000_2000)
        );
        assert_eq!(systab_acpi20("SMBIOS=0x1000\n"), None);
    }
}
