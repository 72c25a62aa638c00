//! Kernel modules in the guest: the tree gracevm appended at `/lib/modules/<release>` and
//! what the kernel has loaded (`/sys/module/<name>/initstate`).
//!
//! Module names come in two spellings: files use dashes (`nvgrace-egm.ko`), the kernel uses
//! underscores (`nvgrace_egm`); everything here compares the kernel's spelling.

use std::path::Path;

/// The kernel's spelling of a module name.
pub fn kernel_name(module: &str) -> String {
    module.replace('-', "_")
}

/// The running kernel's release (`uname -r`).
pub fn release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|r| r.trim().to_string())
}

/// The module tree of release `release`.
pub fn tree_dir(release: &str) -> String {
    format!("/lib/modules/{release}")
}

/// Whether a loaded module is live (`/sys/module/<name>/initstate`: only modules, not
/// built-in code, have it).
pub fn loaded(module: &str) -> bool {
    std::fs::read_to_string(format!("/sys/module/{}/initstate", kernel_name(module)))
        .is_ok_and(|state| state.trim() == "live")
}

/// Whether a module list in the format of `modules.dep` (`path/name.ko: deps`) or
/// `modules.builtin` (`path/name.ko`) names `module`.
pub fn listed(list: &str, module: &str) -> bool {
    let wanted = kernel_name(module);
    list.lines().any(|line| {
        let path = line.split(':').next().unwrap_or("").trim();
        let file = path.rsplit('/').next().unwrap_or("");
        let stem = file.split(".ko").next().unwrap_or("");
        file.contains(".ko") && kernel_name(stem) == wanted
    })
}

/// Where `module` stands in the tree at `dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InTree {
    Module,
    BuiltIn,
    Absent,
}

pub fn in_tree(dir: &str, module: &str) -> InTree {
    let read = |file: &str| std::fs::read_to_string(Path::new(dir).join(file)).unwrap_or_default();
    if listed(&read("modules.dep"), module) {
        InTree::Module
    } else if listed(&read("modules.builtin"), module) {
        InTree::BuiltIn
    } else {
        InTree::Absent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_listed_matches_either_spelling() {
        let dep = "kernel/drivers/vfio/pci/nvgrace-gpu/nvgrace-gpu-vfio-pci.ko:\n\
                   kernel/drivers/vfio/pci/nvgrace-gpu/nvgrace-egm.ko.xz: kernel/x.ko\n";
        assert!(listed(dep, "nvgrace-egm"));
        assert!(listed(dep, "nvgrace_egm"));
        assert!(listed(dep, "nvgrace_gpu_vfio_pci"));
        assert!(!listed(dep, "nvgrace"));
        assert!(!listed(dep, "x.ko"));
        assert!(!listed("", "nvgrace-egm"));
        assert_eq!(kernel_name("nvgrace-gpu-vfio-pci"), "nvgrace_gpu_vfio_pci");
    }
}
