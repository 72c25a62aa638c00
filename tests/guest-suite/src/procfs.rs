//! Readers and parsers for the kernel's text interfaces (/proc, /sys).

use std::collections::BTreeSet;

use crate::outcome::Outcome;

/// Reads a text file; a failure is the test's `Fail` naming the path.
pub fn read(path: &str) -> Result<String, Outcome> {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .map_err(|e| Outcome::fail(format!("cannot read {path}: {e}")))
}

/// The guest physical address behind virtual address `virt` of this process, from
/// /proc/self/pagemap (the page must be present: locked or touched; the frame number reads 0
/// without CAP_SYS_ADMIN).
pub fn physical_address(virt: usize) -> Result<u64, String> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const PFN_MASK: u64 = (1 << 55) - 1;
    let page = crate::devmem::page_size();
    let file = std::fs::File::open("/proc/self/pagemap")
        .map_err(|e| format!("cannot open /proc/self/pagemap: {e}"))?;
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, (virt / page) as u64 * 8)
        .map_err(|e| format!("cannot read /proc/self/pagemap: {e}"))?;
    let entry = u64::from_le_bytes(entry);
    let pfn = entry & PFN_MASK;
    if entry & PRESENT == 0 || pfn == 0 {
        return Err(format!(
            "/proc/self/pagemap gives no frame for {virt:#x} (entry {entry:#x})"
        ));
    }
    Ok(pfn * page as u64 + (virt % page) as u64)
}

/// One line of /proc/iomem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IomemEntry {
    pub start: u64,
    /// Inclusive.
    pub end: u64,
    pub name: String,
    /// Nesting level: 0 for top-level resources (the kernel indents two spaces per level).
    pub depth: usize,
}

impl IomemEntry {
    pub fn size(&self) -> u64 {
        self.end.wrapping_sub(self.start).wrapping_add(1)
    }
}

/// Parses /proc/iomem (`  start-end : name`, hex, indented by nesting).
pub fn parse_iomem(text: &str) -> Result<Vec<IomemEntry>, String> {
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || format!("/proc/iomem line {}: cannot parse {line:?}", index + 1);
        let body = line.trim_start_matches(' ');
        let depth = (line.len() - body.len()) / 2;
        let (range, name) = body.split_once(" : ").ok_or_else(bad)?;
        let (start, end) = range.split_once('-').ok_or_else(bad)?;
        let start = u64::from_str_radix(start, 16).map_err(|_| bad())?;
        let end = u64::from_str_radix(end, 16).map_err(|_| bad())?;
        entries.push(IomemEntry {
            start,
            end,
            name: name.to_string(),
            depth,
        });
    }
    Ok(entries)
}

/// The top-level /proc/iomem entries called `name` (nested ones are parts of these).
pub fn top_level<'a>(entries: &'a [IomemEntry], name: &str) -> Vec<&'a IomemEntry> {
    entries
        .iter()
        .filter(|entry| entry.depth == 0 && entry.name == name)
        .collect()
}

/// The entries (any depth) that share a byte with `[start, end)` (exclusive end).
pub fn overlapping(entries: &[IomemEntry], start: u64, end: u64) -> Vec<&IomemEntry> {
    entries
        .iter()
        .filter(|entry| entry.start < end && start <= entry.end)
        .collect()
}

/// `[start-end]` of an entry, inclusive end as the kernel prints it.
pub fn range_text(entry: &IomemEntry) -> String {
    format!("{:#x}-{:#x}", entry.start, entry.end)
}

/// Parses a kernel cpu list (`0-3,5`; empty means no CPUs).
pub fn parse_cpu_list(text: &str) -> Result<BTreeSet<u32>, String> {
    parse_list(text)
}

/// Parses a kernel node list (`/sys/devices/system/node/has_memory`, same format as cpus).
pub fn parse_node_list(text: &str) -> Result<BTreeSet<u32>, String> {
    parse_list(text)
}

/// Formats a node set the way the kernel does (`0-1,3`).
pub fn format_node_list(nodes: &BTreeSet<u32>) -> String {
    format_cpu_list(nodes)
}

/// The kernel's list format (`bitmap_parselist`): ranges and singles joined by commas.
fn parse_list(text: &str) -> Result<BTreeSet<u32>, String> {
    let mut cpus = BTreeSet::new();
    let text = text.trim();
    if text.is_empty() {
        return Ok(cpus);
    }
    for part in text.split(',') {
        let bad = || format!("cannot parse list {text:?} at {part:?}");
        let number = |s: &str| s.trim().parse::<u32>().map_err(|_| bad());
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (number(first)?, number(last)?);
                if first > last {
                    return Err(bad());
                }
                cpus.extend(first..=last);
            }
            None => {
                cpus.insert(number(part)?);
            }
        }
    }
    Ok(cpus)
}

/// Formats a cpu set the way the kernel does (`0-3,5`).
pub fn format_cpu_list(cpus: &BTreeSet<u32>) -> String {
    let mut parts = Vec::new();
    let mut iter = cpus.iter().copied().peekable();
    while let Some(first) = iter.next() {
        let mut last = first;
        while iter.peek() == Some(&(last + 1)) {
            last += 1;
            iter.next();
        }
        parts.push(if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
    }
    parts.join(",")
}

/// The value of a `/proc/meminfo` field in kB (`MemTotal:  497520 kB`).
pub fn meminfo_kib(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key.trim() != field {
            return None;
        }
        value.split_whitespace().next()?.parse().ok()
    })
}

/// The value of a per-node meminfo field in kB (`/sys/devices/system/node/nodeN/meminfo`:
/// `Node 0 MemTotal:  497520 kB`).
pub fn node_meminfo_kib(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key.split_whitespace().last() != Some(field) {
            return None;
        }
        value.split_whitespace().next()?.parse().ok()
    })
}

/// How many `processor : N` lines /proc/cpuinfo has.
pub fn count_processors(cpuinfo: &str) -> usize {
    cpuinfo
        .lines()
        .filter(|line| {
            line.split_once(':')
                .is_some_and(|(key, _)| key.trim() == "processor")
        })
        .count()
}

/// The arguments in a /proc/PID/cmdline (NUL-separated).
pub fn split_cmdline(raw: &str) -> Vec<&str> {
    raw.split('\0').filter(|arg| !arg.is_empty()).collect()
}

/// The filesystem type of the topmost mount of `/` in /proc/mounts.
pub fn root_fstype(mounts: &str) -> Option<&str> {
    mounts.lines().rev().find_map(|line| {
        let mut fields = line.split_whitespace();
        let _device = fields.next()?;
        let mount_point = fields.next()?;
        let fstype = fields.next()?;
        (mount_point == "/").then_some(fstype)
    })
}

/// The state letter of a task from its `/proc/<pid>/task/<tid>/stat` line (`R`, `S`, `D`,
/// `Z`, ...): the field after the command name, which may itself hold spaces and parentheses.
pub fn task_state(stat: &str) -> Option<char> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

/// Whether every task of process `pid` is in uninterruptible sleep or dead (`D`, `Z`, `X`):
/// after an oops, one that holds a lock the dead task left held never wakes, and a SIGKILL
/// cannot reach it. False when the process cannot be read or has no task.
pub fn blocked_for_good(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        match task_state(&stat) {
            Some('D' | 'Z' | 'X') => any = true,
            _ => return false,
        }
    }
    any
}

/// The kernel log ring buffer (`dmesg`), through syslog(2) `SYSLOG_ACTION_READ_ALL`.
pub fn kernel_log() -> Result<String, String> {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: SIZE_BUFFER takes no buffer (null, 0) and only returns a number.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    if size < 0 {
        return Err(format!(
            "syslog(SIZE_BUFFER): {}",
            std::io::Error::last_os_error()
        ));
    }
    let size = size.max(1 << 17);
    let mut buf = vec![0u8; size as usize];
    // SAFETY: the kernel writes at most `size` bytes into `buf`, which is that long and lives
    // across the call.
    let read = unsafe { libc::klogctl(SYSLOG_ACTION_READ_ALL, buf.as_mut_ptr().cast(), size) };
    if read < 0 {
        return Err(format!(
            "syslog(READ_ALL): {}",
            std::io::Error::last_os_error()
        ));
    }
    buf.truncate(read as usize);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The message of a kernel log line, without its `<level>` and `[ timestamp]` prefixes.
pub fn log_message(line: &str) -> &str {
    let mut rest = line;
    if rest.starts_with('<') {
        if let Some(end) = rest.find('>') {
            rest = &rest[end + 1..];
        }
    }
    let trimmed = rest.trim_start();
    if trimmed.starts_with('[') {
        if let Some(end) = trimmed.find(']') {
            return trimmed[end + 1..]
                .strip_prefix(' ')
                .unwrap_or(&trimmed[end + 1..]);
        }
    }
    rest
}

/// `bytes` with a binary unit when exact, e.g. `536870912 (512 MiB)`.
pub fn bytes(value: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if value >= unit && value % unit == 0 {
            return format!("{value} ({} {name})", value / unit);
        }
    }
    if value >= 1 << 20 {
        return format!("{value} (~{:.1} MiB)", value as f64 / (1u64 << 20) as f64);
    }
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const IOMEM: &str = "\
09000000-09000fff : pl011@9000000
  09000000-09000fff : 9000000.pl011 pl011@9000000
40000000-5fffffff : System RAM
  40210000-4147ffff : Kernel code
  41480000-4172ffff : reserved
  41730000-41a0ffff : Kernel data
    41800000-41800fff : nested deeper
  48000000-483fffff : reserved
4010000000-401fffffff : PCI ECAM
8000000000-80ffffffff : System RAM
";

    #[test]
    fn test_parse_iomem_depth_from_indentation() {
        let entries = parse_iomem(IOMEM).unwrap();
        assert_eq!(entries.len(), 10);
        assert_eq!(
            entries[2],
            IomemEntry {
                start: 0x4000_0000,
                end: 0x5fff_ffff,
                name: "System RAM".into(),
                depth: 0
            }
        );
        assert_eq!(entries[3].depth, 1);
        assert_eq!(entries[6].depth, 2);
        assert_eq!(entries[6].name, "nested deeper");
    }

    #[test]
    fn test_top_level_system_ram_nested_not_counted() {
        let text = format!("{IOMEM}  80000000-80000fff : System RAM\n");
        let entries = parse_iomem(&text).unwrap();
        let ram = top_level(&entries, "System RAM");
        let total: u64 = ram.iter().map(|entry| entry.size()).sum();
        assert_eq!(ram.len(), 2);
        assert_eq!(total, (512 << 20) + (4 << 30));
    }

    #[test]
    fn test_parse_iomem_garbage_line_errors() {
        assert!(parse_iomem("40000000-5fffffff System RAM\n").is_err());
        assert!(parse_iomem("zz-5fffffff : System RAM\n").is_err());
        assert_eq!(parse_iomem("\n").unwrap(), vec![]);
    }

    #[test]
    fn test_parse_cpu_list_ranges_and_singles() {
        assert_eq!(
            parse_cpu_list("0-3,5\n").unwrap(),
            BTreeSet::from([0, 1, 2, 3, 5])
        );
        assert_eq!(parse_cpu_list("0").unwrap(), BTreeSet::from([0]));
        assert_eq!(parse_cpu_list("").unwrap(), BTreeSet::new());
        assert_eq!(
            parse_cpu_list("0-1,8-9").unwrap(),
            BTreeSet::from([0, 1, 8, 9])
        );
    }

    #[test]
    fn test_overlapping_inclusive_end_half_open_query() {
        let entries = parse_iomem(IOMEM).unwrap();
        let names = |start, end| -> Vec<String> {
            overlapping(&entries, start, end)
                .iter()
                .map(|e| format!("{}@{}", e.name, e.depth))
                .collect()
        };
        assert_eq!(names(0x80_0000_0000, 0x80_4000_0000), ["System RAM@0"]);
        assert_eq!(names(0x60_0000_0000, 0x80_0000_0000), Vec::<String>::new());
        assert_eq!(names(0x5fff_ffff, 0x6000_0000), ["System RAM@0"]);
        assert_eq!(names(0x6000_0000, 0x40_1000_0000), Vec::<String>::new());
        assert_eq!(
            names(0x4800_0000, 0x4800_0001),
            ["System RAM@0", "reserved@1"]
        );
        assert_eq!(range_text(&entries[2]), "0x40000000-0x5fffffff");
    }

    #[test]
    fn test_node_list_compares_as_sets() {
        assert_eq!(
            parse_node_list("0-1\n").unwrap(),
            parse_node_list("0,1").unwrap()
        );
        assert_ne!(
            parse_node_list("0").unwrap(),
            parse_node_list("0-1").unwrap()
        );
        assert_eq!(format_node_list(&parse_node_list("1,0,2").unwrap()), "0-2");
        assert!(parse_node_list("0-1 2").is_err());
    }

    #[test]
    fn test_log_message_strips_level_and_time() {
        assert_eq!(
            log_message("<6>[    0.000000] efi: EFI v2.7 by gracevm"),
            "efi: EFI v2.7 by gracevm"
        );
        assert_eq!(log_message("[    1.5] x"), "x");
        assert_eq!(log_message("plain"), "plain");
    }

    #[test]
    fn test_parse_cpu_list_malformed_errors() {
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("0-").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("0,,1").is_err());
    }

    #[test]
    fn test_format_cpu_list_round_trips_kernel_form() {
        for text in ["0", "0-1", "0-3,5", "0,2,4-7", ""] {
            assert_eq!(format_cpu_list(&parse_cpu_list(text).unwrap()), text);
        }
    }

    #[test]
    fn test_meminfo_and_cpuinfo_fields() {
        let meminfo = "MemTotal:         497520 kB\nMemFree:          480000 kB\n";
        assert_eq!(meminfo_kib(meminfo, "MemTotal"), Some(497_520));
        assert_eq!(meminfo_kib(meminfo, "SwapTotal"), None);
        let node = "Node 1 MemTotal:       1048576 kB\nNode 1 MemFree:  10 kB\n";
        assert_eq!(node_meminfo_kib(node, "MemTotal"), Some(1_048_576));
        assert_eq!(node_meminfo_kib(node, "MemUsed"), None);
        let cpuinfo = "processor\t: 0\nBogoMIPS\t: 125.00\n\nprocessor\t: 1\nFeatures\t: fp\n";
        assert_eq!(count_processors(cpuinfo), 2);
    }

    #[test]
    fn test_cmdline_and_root_fstype() {
        assert_eq!(
            split_cmdline("/bin/busybox\0sh\0/init\0"),
            vec!["/bin/busybox", "sh", "/init"]
        );
        let mounts = "none / rootfs rw 0 0\nproc /proc proc rw 0 0\n";
        assert_eq!(root_fstype(mounts), Some("rootfs"));
        let pivoted = "none / rootfs rw 0 0\n/dev/vda / ext4 rw 0 0\n";
        assert_eq!(root_fstype(pivoted), Some("ext4"));
        assert_eq!(root_fstype("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn test_bytes_human_units() {
        assert_eq!(bytes(536_870_912), "536870912 (512 MiB)");
        assert_eq!(bytes(3 << 30), "3221225472 (3 GiB)");
        assert_eq!(bytes(12), "12");
    }

    #[test]
    fn test_task_state_after_a_command_with_parentheses() {
        assert_eq!(task_state("91 (gracevm-suite) D 1 91 91 0"), Some('D'));
        assert_eq!(task_state("7 (a) b) (c) S 1 2"), Some('S'));
        assert_eq!(task_state("garbage"), None);
        assert_eq!(task_state("1 (x)"), None);
    }
}
