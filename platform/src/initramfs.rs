//! newc cpio archives built in memory: gracevm's own archive appended to the user's initrd
//! (Linux unpacks concatenated archives in order), and the level-1 image of the nested route.
//! Device nodes are written as archive entries, so no `mknod` (and no root) is needed.

use std::io::{self, Write};

use cpio::newc::{trailer, Builder, ModeFileType};

pub struct Archive {
    buf: Vec<u8>,
    ino: u32,
}

impl Default for Archive {
    fn default() -> Self {
        Archive {
            buf: Vec::new(),
            ino: 1000,
        }
    }
}

impl Archive {
    fn entry(&mut self, path: &str, mode: u32, kind: ModeFileType) -> Builder {
        self.ino += 1;
        Builder::new(path.trim_start_matches('/'))
            .ino(self.ino)
            .mode(mode)
            .set_mode_file_type(kind)
            .nlink(1)
    }

    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        self.dir_mode(path, 0o755)
    }

    pub fn dir_mode(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let b = self.entry(path, mode, ModeFileType::Directory).nlink(2);
        b.write(&mut self.buf, 0).finish()?;
        Ok(())
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::other(format!("{path} is over 4 GiB")))?;
        let b = self.entry(path, mode, ModeFileType::Regular);
        let mut w = b.write(&mut self.buf, size);
        w.write_all(data)?;
        w.finish()?;
        Ok(())
    }

    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        let b = self
            .entry(path, mode, ModeFileType::Char)
            .rdev_major(major)
            .rdev_minor(minor);
        b.write(&mut self.buf, 0).finish()?;
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<Vec<u8>> {
        trailer(&mut self.buf)?;
        // Keep the next concatenated archive 4-byte aligned, as the kernel's unpacker expects.
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
        Ok(self.buf)
    }
}

/// The guest's base initramfs: gracevm's `/init` (tests/guest/init), a static aarch64
/// busybox (/init makes its applet links at boot) and the in-guest suite, the device nodes
/// needed before devtmpfs is mounted (the kernel's console; /dev/mem, through which /init's first
/// act writes the VMM's boot timer), and the empty mount points. The same inputs
/// give the same bytes (owners root, mtimes 0).
pub fn guest_base(init: &[u8], busybox: &[u8], suite: &[u8]) -> io::Result<Vec<u8>> {
    let mut a = Archive::default();
    a.dir("/dev")?;
    a.char_dev("/dev/console", 0o600, 5, 1)?;
    a.char_dev("/dev/null", 0o666, 1, 3)?;
    a.char_dev("/dev/mem", 0o600, 1, 1)?;
    a.dir("/bin")?;
    a.file("/bin/busybox", 0o755, busybox)?;
    a.file("/bin/gracevm-suite", 0o755, suite)?;
    for d in ["/sbin", "/usr", "/usr/bin", "/usr/sbin"] {
        a.dir(d)?;
    }
    a.dir_mode("/proc", 0o555)?;
    a.dir_mode("/sys", 0o555)?;
    a.dir_mode("/tmp", 0o1777)?;
    a.dir_mode("/root", 0o700)?;
    a.file("/init", 0o755, init)?;
    a.finish()
}

/// Quote `s` as one POSIX shell word (the env file's quoting).
pub use gracevm_contract::env::shell_quote;

#[cfg(test)]
mod tests {
    use super::*;
    use cpio::newc::Reader;

    fn entries(mut data: &[u8]) -> Vec<(String, u32, Vec<u8>, u32)> {
        let mut out = Vec::new();
        loop {
            let mut r = Reader::new(data).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            let (name, mode, rdev) = (
                r.entry().name().to_string(),
                r.entry().mode(),
                r.entry().rdev_major(),
            );
            let mut body = Vec::new();
            io::Read::read_to_end(&mut r, &mut body).unwrap();
            out.push((name, mode, body, rdev));
            data = r.finish().unwrap();
        }
        out
    }

    #[test]
    fn test_archive_round_trips_through_reader() {
        let mut a = Archive::default();
        a.dir("/gracevm").unwrap();
        a.file("/gracevm/env", 0o644, b"A=1\n").unwrap();
        a.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        let data = a.finish().unwrap();
        assert_eq!(data.len() % 4, 0);
        let e = entries(&data);
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].0, "gracevm");
        assert_eq!(e[0].1 & 0o170000, 0o040000);
        assert_eq!(
            (e[1].0.as_str(), e[1].2.as_slice()),
            ("gracevm/env", &b"A=1\n"[..])
        );
        assert_eq!(e[2].1 & 0o170000, 0o020000);
        assert_eq!(e[2].3, 5);
    }

    #[test]
    fn test_guest_base_has_init_tools_and_nodes() {
        let data = guest_base(b"#!/bin/sh\n", b"bb", b"suite").unwrap();
        let e = entries(&data);
        let find = |n: &str| e.iter().find(|x| x.0 == n).unwrap();
        assert_eq!(find("init").2, b"#!/bin/sh\n");
        assert_eq!(find("init").1 & 0o777, 0o755);
        assert_eq!(find("bin/gracevm-suite").2, b"suite");
        assert_eq!(find("dev/null").3, 1);
        assert_eq!(find("dev/mem").3, 1);
        assert_eq!(find("tmp").1 & 0o7777, 0o1777);
        assert_eq!(
            guest_base(b"i", b"b", b"s").unwrap(),
            guest_base(b"i", b"b", b"s").unwrap()
        );
    }

    #[test]
    fn test_shell_quote_escapes_single_quotes() {
        assert_eq!(shell_quote("echo hi"), "'echo hi'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
