//! The guest kernel's modules. The nvgrace drivers are modules (a modular nvgrace-egm is what
//! lets the suite unload it), so a guest needs the module tree of the kernel it boots: gracevm
//! packs it into the archive it appends to the initrd, at `/lib/modules/<release>`, and the
//! guest's /init loads the drivers under test from it.
//!
//! A tree is given as what `make modules_install INSTALL_MOD_PATH=DIR` wrote (DIR, or its
//! `lib/modules/<release>`), or as a newc cpio archive of it (how the nested route hands the
//! tree to the gracevm inside level 1).

use std::fs;
use std::path::{Path, PathBuf};

use cpio::newc::Reader;
use thiserror::Error;

use crate::initramfs::Archive;

/// The drivers under test, in load order: nvgrace-gpu declares `softdep pre: nvgrace-egm`, which
/// busybox's modprobe does not follow, and nvgrace-egm must be there before a GPU probes for
/// the GPU to get its link under /sys/class/egm.
pub const DEFAULT_LOAD: &[&str] = &["nvgrace-egm", "nvgrace-gpu-vfio-pci"];

#[derive(Debug, Error)]
pub enum ModulesError {
    #[error("module tree {path}: {why}")]
    Unreadable { path: PathBuf, why: String },
    #[error(
        "{path} is not a module tree: expected the INSTALL_MOD_PATH of `make modules_install` \
         (with lib/modules/<release>), a lib/modules/<release> directory, or a cpio archive of one"
    )]
    NotATree { path: PathBuf },
    #[error(
        "{path} is a kernel build directory, not an installed module tree: pass the \
         INSTALL_MOD_PATH of `make modules_install` (gracevm's kernel build installs it in \
         {path}/modules)"
    )]
    BuildDir { path: PathBuf },
    #[error(
        "{path} holds modules for several kernels ({releases}): pass {path}/lib/modules/<release> \
         for the kernel you boot"
    )]
    SeveralReleases { path: PathBuf, releases: String },
    #[error(
        "the modules in {path} are for Linux {modules} but the kernel {kernel_path} is Linux \
         {kernel}: pass the module tree built with this kernel (`make kernel` installs it in \
         <build>/modules)"
    )]
    WrongRelease {
        path: PathBuf,
        modules: String,
        kernel_path: PathBuf,
        kernel: String,
    },
}

/// A module tree ready to append: the release it is for and its archive.
#[derive(Clone, Debug)]
pub struct ModuleTree {
    pub release: String,
    pub archive: Vec<u8>,
    /// How many `.ko` files it holds.
    pub count: usize,
}

/// What the guest gets: the tree and the modules its /init loads, in order.
#[derive(Clone, Debug)]
pub struct Modules {
    pub tree: ModuleTree,
    pub load: Vec<String>,
}

impl ModuleTree {
    /// Reads the tree at `path` (a directory or a cpio archive, see the module docs).
    pub fn load(path: &Path) -> Result<Self, ModulesError> {
        let unreadable = |e: std::io::Error| ModulesError::Unreadable {
            path: path.to_path_buf(),
            why: e.to_string(),
        };
        let meta = fs::metadata(path).map_err(unreadable)?;
        if meta.is_file() {
            let data = fs::read(path).map_err(unreadable)?;
            return Self::from_archive(path, data);
        }
        let release_dir = release_dir(path)?;
        let release = file_name(&release_dir);
        let mut archive = Archive::default();
        for dir in ["/lib", "/lib/modules"] {
            archive.dir(dir).map_err(unreadable)?;
        }
        let prefix = format!("/lib/modules/{release}");
        archive.dir(&prefix).map_err(unreadable)?;
        let mut count = 0;
        add_tree(&mut archive, &release_dir, &prefix, &mut count).map_err(unreadable)?;
        Ok(ModuleTree {
            release,
            archive: archive.finish().map_err(unreadable)?,
            count,
        })
    }

    /// An archive made by [`ModuleTree::load`] (or by cpio from such a tree).
    fn from_archive(path: &Path, data: Vec<u8>) -> Result<Self, ModulesError> {
        let not_a_tree = || ModulesError::NotATree {
            path: path.to_path_buf(),
        };
        let names = archive_names(&data).ok_or_else(not_a_tree)?;
        let mut releases: Vec<String> = names
            .iter()
            .filter_map(|n| {
                let rest = n.trim_start_matches("./").strip_prefix("lib/modules/")?;
                let release = rest.split('/').next()?;
                (!release.is_empty()).then(|| release.to_string())
            })
            .collect();
        releases.sort();
        releases.dedup();
        let release = match releases.as_slice() {
            [one] => one.clone(),
            [] => return Err(not_a_tree()),
            several => {
                return Err(ModulesError::SeveralReleases {
                    path: path.to_path_buf(),
                    releases: several.join(", "),
                })
            }
        };
        let count = names.iter().filter(|n| is_module(n)).count();
        Ok(ModuleTree {
            release,
            archive: data,
            count,
        })
    }

    /// Refuses a tree built for another kernel than `image` (an arm64 Image, whose banner says
    /// its release). A kernel without a readable banner (compressed, or not Linux) is let
    /// through: the guest's modprobe then reports the mismatch.
    pub fn check_kernel(&self, tree: &Path, image: &Path) -> Result<(), ModulesError> {
        let data = fs::read(image).map_err(|e| ModulesError::Unreadable {
            path: image.to_path_buf(),
            why: e.to_string(),
        })?;
        match kernel_release(&data) {
            Some(kernel) if kernel != self.release => Err(ModulesError::WrongRelease {
                path: tree.to_path_buf(),
                modules: self.release.clone(),
                kernel_path: image.to_path_buf(),
                kernel,
            }),
            _ => Ok(()),
        }
    }
}

/// The `lib/modules/<release>` directory of a tree given as `path`.
fn release_dir(path: &Path) -> Result<PathBuf, ModulesError> {
    let modules = path.join("lib/modules");
    if modules.is_dir() {
        let mut releases: Vec<PathBuf> = fs::read_dir(&modules)
            .map_err(|e| ModulesError::Unreadable {
                path: modules.clone(),
                why: e.to_string(),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        releases.sort();
        return match releases.len() {
            1 => Ok(releases.remove(0)),
            0 => Err(ModulesError::NotATree {
                path: path.to_path_buf(),
            }),
            _ => Err(ModulesError::SeveralReleases {
                path: path.to_path_buf(),
                releases: releases
                    .iter()
                    .map(|p| file_name(p))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        };
    }
    // A kernel build directory has modules.order and kernel/ too, but not the installed tree.
    if path.join(".config").is_file() && path.join("Makefile").is_file() {
        return Err(ModulesError::BuildDir {
            path: path.to_path_buf(),
        });
    }
    // A release directory: what depmod and modules_install put at its top.
    let looks_installed = ["modules.dep", "modules.order", "kernel"]
        .iter()
        .any(|f| path.join(f).exists());
    if looks_installed {
        Ok(path.to_path_buf())
    } else {
        Err(ModulesError::NotATree {
            path: path.to_path_buf(),
        })
    }
}

/// Adds `dir`'s files under `prefix`, in name order (the same tree gives the same bytes).
/// Symlinks (`build`, `source` into the kernel tree) are left out.
fn add_tree(
    archive: &mut Archive,
    dir: &Path,
    prefix: &str,
    count: &mut usize,
) -> std::io::Result<()> {
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = format!("{prefix}/{}", entry.file_name().to_string_lossy());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            archive.dir(&name)?;
            add_tree(archive, &entry.path(), &name, count)?;
        } else if kind.is_file() {
            archive.file(&name, 0o644, &fs::read(entry.path())?)?;
            if is_module(&name) {
                *count += 1;
            }
        }
    }
    Ok(())
}

fn is_module(name: &str) -> bool {
    [".ko", ".ko.xz", ".ko.gz", ".ko.zst"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The entry names of a (possibly concatenated) newc archive; `None` if it is not one.
fn archive_names(mut data: &[u8]) -> Option<Vec<String>> {
    let mut names = Vec::new();
    while !data.is_empty() {
        // Concatenated archives are padded with zeros between them.
        if data[0] == 0 {
            data = &data[1..];
            continue;
        }
        let reader = Reader::new(data).ok()?;
        if reader.entry().is_trailer() {
            data = reader.finish().ok()?;
            continue;
        }
        names.push(reader.entry().name().to_string());
        data = reader.finish().ok()?;
    }
    (!names.is_empty()).then_some(names)
}

/// The release in an uncompressed kernel's banner: "Linux version 7.3.4 (user@host) ...".
/// (memmem: the Image is tens of MiB, scanned once per run, inside level 1 on the nested route.)
pub fn kernel_release(image: &[u8]) -> Option<String> {
    const BANNER: &[u8] = b"Linux version ";
    memchr::memmem::find_iter(image, BANNER).find_map(|at| {
        let rest = &image[at + BANNER.len()..];
        // A release is at most 64 bytes (__NEW_UTS_LEN), then " (builder@host)"; format
        // strings are not followed by that.
        let end = rest.iter().take(65).position(|&b| b == b' ')?;
        if rest.get(end + 1) != Some(&b'(') || end == 0 || end > 64 {
            return None;
        }
        std::str::from_utf8(&rest[..end])
            .ok()
            .filter(|r| r.bytes().all(|b| b.is_ascii_graphic()))
            .map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path, release: &str) -> PathBuf {
        let dir = root.join("lib/modules").join(release);
        let ko = dir.join("kernel/drivers/vfio/pci/nvgrace-gpu");
        fs::create_dir_all(&ko).unwrap();
        fs::write(ko.join("nvgrace-egm.ko"), b"\x7fELF egm").unwrap();
        fs::write(ko.join("nvgrace-gpu-vfio-pci.ko"), b"\x7fELF gpu").unwrap();
        fs::write(
            dir.join("modules.dep"),
            "kernel/drivers/vfio/pci/nvgrace-gpu/nvgrace-egm.ko:\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("/nonexistent/build", dir.join("build")).unwrap();
        dir
    }

    fn tempdir() -> vmm_sys_util::tempdir::TempDir {
        vmm_sys_util::tempdir::TempDir::new_with_prefix(
            std::env::temp_dir().join("gracevm-modules"),
        )
        .unwrap()
    }

    #[test]
    fn test_tree_packs_under_lib_modules_release() {
        let dir = tempdir();
        let root = dir.as_path().to_path_buf();
        let release_dir = tree(&root, "7.3.4");
        for given in [&root, &release_dir] {
            let t = ModuleTree::load(given).unwrap();
            assert_eq!(t.release, "7.3.4");
            assert_eq!(t.count, 2);
            let names = archive_names(&t.archive).unwrap();
            assert!(names.contains(&"lib/modules/7.3.4/modules.dep".to_string()));
            assert!(names.contains(
                &"lib/modules/7.3.4/kernel/drivers/vfio/pci/nvgrace-gpu/nvgrace-egm.ko".to_string()
            ));
            assert!(!names.iter().any(|n| n.ends_with("/build")), "{names:?}");
            assert_eq!(t.archive.len() % 4, 0);
        }
        // The archive form (what the nested route stages) reads back as the same tree.
        let t = ModuleTree::load(&root).unwrap();
        let file = root.join("modules.cpio");
        fs::write(&file, &t.archive).unwrap();
        let again = ModuleTree::load(&file).unwrap();
        assert_eq!((again.release.as_str(), again.count), ("7.3.4", 2));
        assert_eq!(again.archive, t.archive);
    }

    #[test]
    fn test_bad_trees_are_refused_with_the_reason() {
        let dir = tempdir();
        let root = dir.as_path().to_path_buf();
        let err = ModuleTree::load(&root).unwrap_err();
        assert!(matches!(err, ModulesError::NotATree { .. }), "{err}");
        tree(&root, "7.3.4");
        tree(&root, "7.3.5");
        let err = ModuleTree::load(&root).unwrap_err().to_string();
        assert!(err.contains("7.3.4, 7.3.5"), "{err}");
        let junk = root.join("junk.cpio");
        fs::write(&junk, b"not an archive").unwrap();
        let err = ModuleTree::load(&junk).unwrap_err();
        assert!(matches!(err, ModulesError::NotATree { .. }), "{err}");
        let build = root.join("build");
        fs::create_dir_all(build.join("kernel")).unwrap();
        for f in [".config", "Makefile", "modules.order"] {
            fs::write(build.join(f), "").unwrap();
        }
        let err = ModuleTree::load(&build).unwrap_err();
        assert!(matches!(err, ModulesError::BuildDir { .. }), "{err}");
        let err = ModuleTree::load(&root.join("missing")).unwrap_err();
        assert!(matches!(err, ModulesError::Unreadable { .. }), "{err}");
    }

    #[test]
    fn test_release_must_match_the_kernel_banner() {
        let dir = tempdir();
        let root = dir.as_path().to_path_buf();
        tree(&root, "7.3.4");
        let t = ModuleTree::load(&root).unwrap();
        let image = root.join("Image");
        let mut data = vec![0u8; 4096];
        data.extend(b"Linux version %s\0");
        data.extend(b"Linux version 7.3.4 (root@vm) (gcc) #1 SMP\0");
        fs::write(&image, &data).unwrap();
        assert_eq!(kernel_release(&data).as_deref(), Some("7.3.4"));
        t.check_kernel(&root, &image).unwrap();
        data.truncate(4096);
        data.extend(b"Linux version 7.3.4-egm+ (me@box) (gcc) #2 SMP\0");
        fs::write(&image, &data).unwrap();
        let err = t.check_kernel(&root, &image).unwrap_err().to_string();
        assert!(err.contains("for Linux 7.3.4 but") && err.contains("is Linux 7.3.4-egm+"));
        // No banner (a compressed Image): nothing to compare, let it through.
        fs::write(&image, vec![0x1f, 0x8b, 0, 0]).unwrap();
        t.check_kernel(&root, &image).unwrap();
    }
}
