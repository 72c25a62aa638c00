//! Host-side checks of what gracevm's firmware builds, read back by independent parsers:
//! `iasl -d` (Debian package acpica-tools) for every ACPI table and `dtc` (Debian package
//! device-tree-compiler) for the DTB. A missing tool fails the test with the package to
//! install; nothing passes silently.
//!
//! This library holds the helpers: running the tools, and a small reader for `dtc -O dts`
//! output (one node per block, one property per line, as dtc prints them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use firmware::{BootParams, Platform};

/// Find `name` on PATH, or fail saying which Debian package provides it.
pub fn tool(name: &str, debian_package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not installed but these checks need it: install the Debian package \
         {debian_package} (apt-get install {debian_package})"
    );
}

/// The firmware of `platform` written into a fresh temporary directory.
pub struct Written {
    pub dir: tempfile::TempDir,
    pub files: Vec<PathBuf>,
}

impl Written {
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The ACPI table files (`*.dat`).
    pub fn tables(&self) -> Vec<PathBuf> {
        self.files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "dat"))
            .cloned()
            .collect()
    }
}

/// Build and write `platform`'s firmware with example boot parameters.
pub fn write(platform: &Platform) -> Written {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut boot = BootParams::example(platform.vcpus);
    boot.initrd = Some((0x4800_0000, 0x4810_0000));
    boot.cmdline = "console=ttyAMA0 rdinit=/init".into();
    let platform = platform.resolve().expect("the platform resolves");
    let files = firmware::write_dir(&platform, &boot, dir.path()).expect("firmware builds");
    Written { dir, files }
}

/// Parse a description, failing the test with the message if it is invalid.
pub fn platform(toml: &str) -> Platform {
    Platform::from_toml(toml, "test").unwrap_or_else(|e| panic!("{e}"))
}

/// What `iasl -d` made of one table.
#[derive(Debug)]
pub struct Disassembly {
    pub table: PathBuf,
    /// iasl's own output (stdout and stderr).
    pub log: String,
    pub success: bool,
    /// The `.dsl` it wrote.
    pub dsl: String,
}

impl Disassembly {
    /// Everything iasl complained about: errors, warnings, checksum and length complaints,
    /// and the disassembler's in-line markers for bytes it could not decode.
    pub fn complaints(&self) -> Vec<String> {
        let bad_log = [
            "error",
            "warning",
            "checksum",
            "invalid",
            "unknown",
            "does not",
            "could not",
            "mismatch",
        ];
        let bad_dsl = [
            "**** ",
            "Incorrect checksum",
            "Invalid",
            "Unknown",
            "unknown",
            "terminates in the middle",
            "extra data",
            "Reserved field is not zero",
        ];
        let mut v = Vec::new();
        if !self.success {
            v.push("iasl exited with failure".to_string());
        }
        for line in self.log.lines() {
            let l = line.to_ascii_lowercase();
            // iasl's banner and the summary line "0 Errors, 0 Warnings" are fine.
            if l.contains("compiler/disassembler version") || l.contains("copyright") {
                continue;
            }
            if bad_log.iter().any(|b| l.contains(b)) {
                v.push(format!("log: {line}"));
            }
        }
        for line in self.dsl.lines() {
            if bad_dsl.iter().any(|b| line.contains(b)) {
                v.push(format!("dsl: {line}"));
            }
        }
        v
    }

    pub fn assert_clean(&self) {
        let c = self.complaints();
        assert!(
            c.is_empty(),
            "iasl -d {} complained:\n{}\n--- log ---\n{}\n--- dsl ---\n{}",
            self.table.display(),
            c.join("\n"),
            self.log,
            self.dsl
        );
    }
}

/// Run `iasl -d` on one table file (in a directory of its own, since iasl writes next to its
/// input and resolves other tables it finds there).
pub fn iasl_disassemble(table: &Path) -> Disassembly {
    let iasl = tool("iasl", "acpica-tools");
    let work = tempfile::tempdir().expect("temporary directory");
    let name = table.file_name().expect("a file");
    let copy = work.path().join(name);
    std::fs::copy(table, &copy).expect("copying the table");
    let out = Command::new(iasl)
        .arg("-d")
        .arg(name)
        .current_dir(work.path())
        .output()
        .expect("running iasl");
    let dsl_path = copy.with_extension("dsl");
    let dsl = std::fs::read_to_string(&dsl_path).unwrap_or_default();
    Disassembly {
        table: table.to_path_buf(),
        log: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        success: out.status.success(),
        dsl,
    }
}

/// A DT node as `dtc -O dts` prints it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DtNode {
    pub name: String,
    /// Property name -> value text as dtc prints it (empty for boolean properties).
    pub props: BTreeMap<String, String>,
    pub children: Vec<DtNode>,
}

impl DtNode {
    /// The node at `path` ("/cpus/cpu@0"), if any.
    pub fn at(&self, path: &str) -> Option<&DtNode> {
        let mut node = self;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            node = node.children.iter().find(|c| c.name == part)?;
        }
        Some(node)
    }

    /// The node at `path`, or fail naming it.
    pub fn node(&self, path: &str) -> &DtNode {
        self.at(path)
            .unwrap_or_else(|| panic!("no node {path} in the DTB:\n{self:#?}"))
    }

    /// Property text, or fail naming it.
    pub fn prop(&self, name: &str) -> &str {
        self.props.get(name).unwrap_or_else(|| {
            panic!(
                "node {} has no property {name}: {:?}",
                self.name, self.props
            )
        })
    }

    /// Property as 32-bit cells (`<0x01 0x02>` possibly in several groups).
    pub fn cells(&self, name: &str) -> Vec<u32> {
        parse_cells(self.prop(name))
    }

    /// Property as u64 values of two cells each.
    pub fn u64s(&self, name: &str) -> Vec<u64> {
        let c = self.cells(name);
        assert_eq!(
            c.len() % 2,
            0,
            "{name} is not made of 64-bit values: {c:x?}"
        );
        c.chunks(2)
            .map(|p| (u64::from(p[0]) << 32) | u64::from(p[1]))
            .collect()
    }

    /// Property as a list of strings.
    pub fn strings(&self, name: &str) -> Vec<String> {
        self.prop(name)
            .split("\", \"")
            .map(|s| s.trim_matches('"').to_string())
            .collect()
    }

    pub fn child_names(&self) -> Vec<&str> {
        self.children.iter().map(|c| c.name.as_str()).collect()
    }
}

/// Cells of a dts value like `<0x00 0x40000000>, <0x01>`.
pub fn parse_cells(value: &str) -> Vec<u32> {
    let mut v = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').expect("closing >") + start;
        for word in rest[start + 1..end].split_whitespace() {
            let n = match word.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16),
                None => word.parse(),
            };
            v.push(n.unwrap_or_else(|_| panic!("cell {word} in {value}")));
        }
        rest = &rest[end + 1..];
    }
    v
}

/// Read `dtc -O dts` output into a tree.
pub fn parse_dts(dts: &str) -> DtNode {
    let mut stack: Vec<DtNode> = Vec::new();
    let mut root = None;
    for line in dts.lines().map(str::trim) {
        if line.is_empty() || line.starts_with("/dts-v1/") || line.starts_with("/memreserve/") {
            continue;
        }
        if let Some(name) = line.strip_suffix(" {") {
            stack.push(DtNode {
                name: if name == "/" {
                    String::new()
                } else {
                    name.to_string()
                },
                ..Default::default()
            });
        } else if line == "};" {
            let done = stack.pop().expect("balanced braces");
            match stack.last_mut() {
                Some(parent) => parent.children.push(done),
                None => root = Some(done),
            }
        } else if let Some(prop) = line.strip_suffix(';') {
            let node = stack.last_mut().expect("property inside a node");
            match prop.split_once(" = ") {
                Some((k, v)) => node.props.insert(k.to_string(), v.to_string()),
                None => node.props.insert(prop.to_string(), String::new()),
            };
        } else {
            panic!("unexpected dts line: {line}");
        }
    }
    root.expect("a root node")
}

/// What `dtc` made of a DTB: the tree and its warnings.
pub struct Decompiled {
    pub dts: String,
    pub warnings: String,
    pub root: DtNode,
}

/// Decompile a DTB with `dtc -I dtb -O dts`.
pub fn dtc_decompile(dtb: &Path) -> Decompiled {
    let dtc = tool("dtc", "device-tree-compiler");
    let out = Command::new(dtc)
        .args(["-I", "dtb", "-O", "dts"])
        .arg(dtb)
        .output()
        .expect("running dtc");
    let dts = String::from_utf8_lossy(&out.stdout).into_owned();
    let warnings = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "dtc failed on {}: {warnings}",
        dtb.display()
    );
    let root = parse_dts(&dts);
    Decompiled {
        dts,
        warnings,
        root,
    }
}

/// Values of `_DSD` device properties in an iasl disassembly of the DSDT, per device:
/// device name -> [(property, value)].
pub fn dsd_properties(dsl: &str) -> BTreeMap<String, Vec<(String, u64)>> {
    let mut out: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    let mut device = String::new();
    let lines: Vec<&str> = dsl.lines().map(str::trim).collect();
    for (i, line) in lines.iter().enumerate() {
        if let Some(rest) = line.strip_prefix("Device (") {
            device = rest.trim_end_matches(')').to_string();
        }
        let Some(name) = line
            .strip_prefix('"')
            .and_then(|l| l.strip_suffix("\","))
            .filter(|n| firmware::description::GPU_PROPERTIES.contains(n))
        else {
            continue;
        };
        let value = lines[i + 1..]
            .iter()
            .find(|l| !l.is_empty())
            .expect("a value after the property name");
        out.entry(device.clone())
            .or_default()
            .push((name.to_string(), parse_asl_integer(value)));
    }
    out
}

/// An ASL integer as iasl prints it: `Zero`, `One`, `Ones`, `0x...`.
pub fn parse_asl_integer(text: &str) -> u64 {
    let t = text.trim().trim_end_matches(',').trim();
    let t = t.split_whitespace().next().unwrap_or(t);
    match t {
        "Zero" => 0,
        "One" => 1,
        "Ones" => u64::MAX,
        _ => u64::from_str_radix(t.trim_start_matches("0x"), 16)
            .unwrap_or_else(|_| panic!("not an ASL integer: {text}")),
    }
}

/// A field of an iasl data-table disassembly: the text after `name : ` on the first line
/// whose label starts with `name`.
pub fn dsl_fields<'a>(dsl: &'a str, name: &str) -> Vec<&'a str> {
    dsl.lines()
        .filter_map(|l| {
            let (label, value) = l.split_once(" : ")?;
            let label = label.split_once(']').map_or(label, |(_, rest)| rest).trim();
            (label == name).then_some(value.trim())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "install the Debian package no-such-package")]
    fn test_missing_tool_fails_naming_the_package() {
        tool("gracevm-no-such-tool", "no-such-package");
    }

    #[test]
    fn test_parse_dts_nodes_props_cells() {
        let root = parse_dts(
            "/dts-v1/;\n\n/ {\n\t#address-cells = <0x02>;\n\n\tchosen {\n\t\tbootargs = \"a b\";\n\t\tflag;\n\t\treg = <0x00 0x40000000>, <0x01>;\n\t};\n};\n",
        );
        assert_eq!(root.cells("#address-cells"), [2]);
        let chosen = root.node("/chosen");
        assert_eq!(chosen.strings("bootargs"), ["a b"]);
        assert!(chosen.props.contains_key("flag"));
        assert_eq!(chosen.cells("reg"), [0, 0x4000_0000, 1]);
    }

    #[test]
    fn test_parse_asl_integers() {
        assert_eq!(parse_asl_integer("Zero"), 0);
        assert_eq!(parse_asl_integer("One"), 1);
        assert_eq!(parse_asl_integer("0x000000D000000000"), 0xD0_0000_0000);
        assert_eq!(parse_asl_integer("0x04, "), 4);
    }
}
