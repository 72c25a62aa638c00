//! A type-0 (endpoint) PCI Express configuration space, reusable by any function.
//!
//! The 4 KiB space is a byte array plus a per-byte mask of guest-writable bits: a write changes
//! only the masked bits, so read-only fields, BAR sizing and reserved space all fall out of one
//! rule. Layout of what [`ConfigSpace::new`] builds:
//!
//! | Offset      | Field                         | Model                                       |
//! |-------------|-------------------------------|---------------------------------------------|
//! | 0x00 / 0x02 | vendor / device id            | RO, from [`FunctionIdentity`]               |
//! | 0x04        | COMMAND                       | RW bits: memory, bus master, parity, SERR#, |
//! |             |                               | INTx disable; I/O space is hardwired 0      |
//! | 0x06        | STATUS                        | RO: only CAP_LIST (bit 4) is set            |
//! | 0x08        | revision id, class code       | RO                                          |
//! | 0x0C        | cache line size               | RW (no effect); latency, BIST RO 0          |
//! | 0x0E        | header type                   | RO 0 (type 0, single function)              |
//! | 0x10..0x27  | BAR0..BAR5                    | see below; unused BARs RO 0                 |
//! | 0x2C / 0x2E | subsystem vendor / id         | RO                                          |
//! | 0x30        | expansion ROM BAR             | RO 0 (no ROM)                               |
//! | 0x34        | capabilities pointer          | RO 0x40                                     |
//! | 0x3C        | interrupt line                | RW scratch byte for the OS                  |
//! | 0x3D        | interrupt pin                 | RO 0: no INTx (the function raises nothing) |
//! | 0x40..0x7B  | PCI Express capability (0x10) | v2, endpoint; see [`PCIE_CAP_OFFSET`]       |
//! | 0x7C..0xFF  | further capabilities          | [`ConfigSpace::add_capability`]             |
//! | 0x100..     | extended capabilities         | [`ConfigSpace::add_extended_capability`];   |
//! |             |                               | a zero header at 0x100 means "none"         |
//!
//! Everything not listed reads 0 and ignores writes.
//!
//! BARs ([`ConfigSpace::add_bar`]): memory BARs only (bit 0 = 0), 32-bit (type 00) or 64-bit
//! (type 10, spanning two registers), optionally prefetchable (bit 3). The type and
//! prefetchable bits are read-only and the address bits below the (power-of-two) size are
//! hardwired 0, so writing all-ones and reading back yields the size mask with the flag bits,
//! exactly as a sizing OS expects. A BAR decodes only while COMMAND.memory is set; that gating
//! is done by the host bridge, which asks [`ConfigSpace::bar_range`].
//!
//! Accesses must be 1, 2 or 4 bytes, naturally aligned, within the 4 KiB space; anything else
//! is logged and ignored (reads return 0).

use super::super::WarnLimiter;

const NAME: &str = "pci-config";

/// Size of a PCI Express function's configuration space.
pub const CONFIG_SPACE_SIZE: usize = 0x1000;
/// Start of the extended (PCI Express) configuration space.
pub const EXT_CAP_START: u16 = 0x100;
/// Where [`ConfigSpace::new`] puts the PCI Express capability.
pub const PCIE_CAP_OFFSET: u16 = 0x40;
/// Length of a version-2 PCI Express capability structure.
pub const PCIE_CAP_LEN: u16 = 0x3C;
/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;

// Header offsets.
pub const VENDOR_ID: u16 = 0x00;
pub const DEVICE_ID: u16 = 0x02;
pub const COMMAND: u16 = 0x04;
pub const STATUS: u16 = 0x06;
pub const REVISION_ID: u16 = 0x08;
pub const CLASS_CODE: u16 = 0x09;
pub const CACHE_LINE_SIZE: u16 = 0x0C;
pub const HEADER_TYPE: u16 = 0x0E;
pub const BAR0: u16 = 0x10;
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2C;
pub const SUBSYSTEM_ID: u16 = 0x2E;
pub const CAPABILITIES_POINTER: u16 = 0x34;
pub const INTERRUPT_LINE: u16 = 0x3C;
pub const INTERRUPT_PIN: u16 = 0x3D;

/// COMMAND.memory: the function's memory BARs decode.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// The COMMAND bits a guest can set: memory space, bus master, parity error response, SERR#
/// enable, interrupt disable.
pub const COMMAND_WRITABLE: u16 = (1 << 1) | (1 << 2) | (1 << 6) | (1 << 8) | (1 << 10);
/// STATUS.CAP_LIST: a capabilities list starts at 0x34.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// Capability id of the PCI Express capability.
pub const CAP_ID_PCIE: u8 = 0x10;
/// Extended capability id of a Designated Vendor-Specific Extended Capability.
pub const EXT_CAP_ID_DVSEC: u16 = 0x0023;

// BAR flag bits.
const BAR_MEM_TYPE_64: u32 = 0b10 << 1;
const BAR_PREFETCHABLE: u32 = 1 << 3;
const BAR_FLAG_BITS: u32 = 0xF;

// Fields of the PCI Express capability, relative to its start.
const PCIE_CAPS: usize = 0x02;
const PCIE_DEVCAP: usize = 0x04;
const PCIE_DEVCTL: usize = 0x08;
const PCIE_LNKCAP: usize = 0x0C;
const PCIE_LNKCTL: usize = 0x10;
const PCIE_LNKSTA: usize = 0x12;
const PCIE_DEVCAP2: usize = 0x24;
const PCIE_DEVCTL2: usize = 0x28;
const PCIE_LNKCAP2: usize = 0x2C;
const PCIE_LNKCTL2: usize = 0x30;

/// Link speed code for 32 GT/s (PCIe 5.0, as on Grace's C2C-attached GPUs' PCIe side).
const LINK_SPEED_32GT: u16 = 5;
/// Link width x16.
const LINK_WIDTH_X16: u16 = 16;

/// Identity fields of a function's header (all read-only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    /// Base class, subclass and programming interface: `0x03_02_00` is a 3D controller.
    pub class_code: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// Address width of a memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// One register; the BAR must sit below 4 GiB.
    Memory32,
    /// Two registers (this one and the next); anywhere in the 64-bit space.
    Memory64,
}

/// A memory BAR a function implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// A power of two, at least 16 bytes; at most 2 GiB for a 32-bit BAR.
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

impl Bar {
    /// The read-only low bits of the BAR register.
    fn flags(&self) -> u32 {
        let mut flags = 0;
        if self.kind == BarKind::Memory64 {
            flags |= BAR_MEM_TYPE_64;
        }
        if self.prefetchable {
            flags |= BAR_PREFETCHABLE;
        }
        flags
    }
}

/// What a BAR register slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BarSlot {
    Unused,
    Bar(Bar),
    /// The upper half of the 64-bit BAR in the slot below.
    Upper,
}

/// Why building a configuration space failed (a VMM bug, never guest input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("BAR index {0} is not 0..=5 (or a 64-bit BAR at index 5 has no upper register)")]
    BadBarIndex(usize),
    #[error("BAR size {0:#x} is not a power of two within the BAR type's limits")]
    BadBarSize(u64),
    #[error("BAR register {0} is already in use")]
    BarInUse(usize),
    #[error("capability of {len} bytes does not fit at {offset:#x}")]
    NoRoom { offset: u16, len: usize },
    #[error("capability body and writable mask differ in length ({body} vs {mask})")]
    MaskLength { body: usize, mask: usize },
}

/// A type-0 PCI Express configuration space. See the module documentation.
pub struct ConfigSpace {
    bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    /// Per-byte guest-writable bits.
    wmask: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [BarSlot; NUM_BARS],
    /// Where the next standard capability goes.
    next_cap: u16,
    /// The last standard capability, whose next pointer a new one is linked into.
    last_cap: u16,
    /// Where the next extended capability goes.
    next_ext_cap: u16,
    /// The last extended capability, if any.
    last_ext_cap: Option<u16>,
    warn: WarnLimiter,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor_id", &format_args!("{:#06x}", self.get16(VENDOR_ID)))
            .field("device_id", &format_args!("{:#06x}", self.get16(DEVICE_ID)))
            .field("command", &format_args!("{:#06x}", self.command()))
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    /// A type-0 endpoint header with `id`, a PCI Express capability and no BARs.
    pub fn new(id: FunctionIdentity) -> Self {
        let mut cs = Self {
            bytes: Box::new([0; CONFIG_SPACE_SIZE]),
            wmask: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: [BarSlot::Unused; NUM_BARS],
            next_cap: PCIE_CAP_OFFSET,
            last_cap: CAPABILITIES_POINTER,
            next_ext_cap: EXT_CAP_START,
            last_ext_cap: None,
            warn: WarnLimiter::default(),
        };
        cs.set16(VENDOR_ID, id.vendor_id);
        cs.set16(DEVICE_ID, id.device_id);
        cs.set16(STATUS, STATUS_CAP_LIST);
        cs.set32(
            REVISION_ID,
            (id.class_code << 8) | u32::from(id.revision_id),
        );
        cs.set16(SUBSYSTEM_VENDOR_ID, id.subsystem_vendor_id);
        cs.set16(SUBSYSTEM_ID, id.subsystem_id);
        cs.set_wmask16(COMMAND, COMMAND_WRITABLE);
        cs.set_wmask8(CACHE_LINE_SIZE, 0xFF);
        cs.set_wmask8(INTERRUPT_LINE, 0xFF);
        let (body, mask) = pcie_capability();
        cs.add_capability(CAP_ID_PCIE, &body, &mask)
            .expect("the PCI Express capability fits in an empty header");
        cs
    }

    /// Declares BAR `index`. A 64-bit BAR also takes register `index + 1`.
    pub fn add_bar(&mut self, index: usize, bar: Bar) -> Result<(), ConfigError> {
        let regs = match bar.kind {
            BarKind::Memory32 => 1,
            BarKind::Memory64 => 2,
        };
        if index + regs > NUM_BARS {
            return Err(ConfigError::BadBarIndex(index));
        }
        let max = match bar.kind {
            BarKind::Memory32 => 1 << 31,
            BarKind::Memory64 => 1 << 63,
        };
        if !bar.size.is_power_of_two() || bar.size < 16 || bar.size > max {
            return Err(ConfigError::BadBarSize(bar.size));
        }
        if let Some(used) = (index..index + regs).find(|&i| self.bars[i] != BarSlot::Unused) {
            return Err(ConfigError::BarInUse(used));
        }
        let addr_mask = !(bar.size - 1);
        let reg = bar_reg(index);
        self.set32(reg, bar.flags());
        self.set_wmask32(reg, addr_mask as u32 & !BAR_FLAG_BITS);
        self.bars[index] = BarSlot::Bar(bar);
        if bar.kind == BarKind::Memory64 {
            self.set_wmask32(reg + 4, (addr_mask >> 32) as u32);
            self.bars[index + 1] = BarSlot::Upper;
        }
        Ok(())
    }

    /// Appends a capability to the list at 0x34: `body` is everything after the two-byte
    /// header (id, next pointer), `writable` its guest-writable bits. Returns its offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<u16, ConfigError> {
        check_mask(body, writable)?;
        let offset = self.next_cap;
        let len = 2 + body.len();
        let end = usize::from(offset) + len;
        if end > usize::from(EXT_CAP_START) {
            return Err(ConfigError::NoRoom { offset, len });
        }
        self.set8(offset, id);
        self.put_bytes(offset + 2, body, writable);
        // `offset` is below 0x100: it fits the one-byte pointer.
        self.set8(self.next_pointer(self.last_cap), offset as u8);
        self.last_cap = offset;
        self.next_cap = end.next_multiple_of(4) as u16;
        Ok(offset)
    }

    /// Appends an extended capability (at 0x100 and up): `body` follows the 4-byte header,
    /// `writable` its guest-writable bits. Returns its offset.
    pub fn add_extended_capability(
        &mut self,
        id: u16,
        version: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<u16, ConfigError> {
        check_mask(body, writable)?;
        let offset = self.next_ext_cap;
        let len = 4 + body.len();
        let end = usize::from(offset) + len;
        if end > CONFIG_SPACE_SIZE {
            return Err(ConfigError::NoRoom { offset, len });
        }
        self.set32(offset, u32::from(id) | (u32::from(version & 0xF) << 16));
        self.put_bytes(offset + 4, body, writable);
        if let Some(last) = self.last_ext_cap {
            let header = self.get32(last) & 0x000F_FFFF;
            self.set32(last, header | (u32::from(offset) << 20));
        }
        self.last_ext_cap = Some(offset);
        self.next_ext_cap = end.next_multiple_of(4) as u16;
        Ok(offset)
    }

    /// Appends a DVSEC (extended capability 0x23): `vendor`/`dvsec_id` in its two DVSEC
    /// headers, then `body` (from DVSEC+0xA on), read-only. Returns its offset.
    pub fn add_dvsec(
        &mut self,
        vendor: u16,
        revision: u8,
        dvsec_id: u16,
        body: &[u8],
    ) -> Result<u16, ConfigError> {
        // Header 1 (+4): vendor, revision, length (of the whole DVSEC); header 2 (+8): id.
        let len = 0xA + body.len();
        let len_field = u32::try_from(len).unwrap_or(u32::MAX).min(0xFFF);
        let mut bytes = Vec::with_capacity(len - 4);
        let header1 = u32::from(vendor) | (u32::from(revision & 0xF) << 16) | (len_field << 20);
        bytes.extend_from_slice(&header1.to_le_bytes());
        bytes.extend_from_slice(&dvsec_id.to_le_bytes());
        bytes.extend_from_slice(body);
        let mask = vec![0; bytes.len()];
        self.add_extended_capability(EXT_CAP_ID_DVSEC, 1, &bytes, &mask)
    }

    /// A guest config read of `data.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(start) = self.check("read", offset, data.len()) {
            data.copy_from_slice(&self.bytes[start..start + data.len()]);
        }
    }

    /// A guest config write: only the writable bits of the addressed bytes change.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(start) = self.check("write", offset, data.len()) else {
            return;
        };
        for (i, &new) in data.iter().enumerate() {
            let at = start + i;
            let mask = self.wmask[at];
            self.bytes[at] = (self.bytes[at] & !mask) | (new & mask);
        }
    }

    /// The current COMMAND register.
    pub fn command(&self) -> u16 {
        self.get16(COMMAND)
    }

    /// Whether COMMAND.memory is set (memory BARs decode).
    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    /// The BAR declared at `index`, if any (not the upper half of a 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<Bar> {
        match self.bars.get(index) {
            Some(BarSlot::Bar(bar)) => Some(*bar),
            _ => None,
        }
    }

    /// The guest-programmed `(address, size)` of BAR `index`, if it exists. Decoding also
    /// needs [`ConfigSpace::memory_enabled`].
    pub fn bar_range(&self, index: usize) -> Option<(u64, u64)> {
        let bar = self.bar(index)?;
        let reg = bar_reg(index);
        let low = u64::from(self.get32(reg) & !BAR_FLAG_BITS);
        let high = match bar.kind {
            BarKind::Memory32 => 0,
            BarKind::Memory64 => u64::from(self.get32(reg + 4)),
        };
        Some(((high << 32) | low, bar.size))
    }

    /// Walks the capability list from 0x34 to the capability with `id` (bounded, so a
    /// malformed list cannot loop).
    pub fn find_capability(&self, id: u8) -> Option<u16> {
        let mut ptr = u16::from(self.get8(CAPABILITIES_POINTER)) & !3;
        for _ in 0..48 {
            if ptr < 0x40 {
                return None;
            }
            if self.get8(ptr) == id {
                return Some(ptr);
            }
            ptr = u16::from(self.get8(ptr + 1)) & !3;
        }
        None
    }

    /// Walks the extended capabilities from 0x100 to the one with `id` (bounded).
    pub fn find_extended_capability(&self, id: u16) -> Option<u16> {
        let mut ptr = EXT_CAP_START;
        for _ in 0..(CONFIG_SPACE_SIZE / 8) {
            let header = self.get32(ptr);
            if header == 0 || header == u32::MAX {
                return None;
            }
            if header & 0xFFFF == u32::from(id) {
                return Some(ptr);
            }
            ptr = (header >> 20) as u16 & !3;
            if ptr < EXT_CAP_START {
                return None;
            }
        }
        None
    }

    /// The 8-bit value at `offset` (must be in range: for the device's own use).
    pub fn get8(&self, offset: u16) -> u8 {
        self.bytes[usize::from(offset)]
    }

    /// The 16-bit little-endian value at `offset` (device-internal).
    pub fn get16(&self, offset: u16) -> u16 {
        let at = usize::from(offset);
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    /// The 32-bit little-endian value at `offset` (device-internal).
    pub fn get32(&self, offset: u16) -> u32 {
        let at = usize::from(offset);
        let mut raw = [0u8; 4];
        raw.copy_from_slice(&self.bytes[at..at + 4]);
        u32::from_le_bytes(raw)
    }

    /// The guest-writable bits of the 32-bit register at `offset` (device-internal).
    pub fn writable32(&self, offset: u16) -> u32 {
        let at = usize::from(offset);
        let mut raw = [0u8; 4];
        raw.copy_from_slice(&self.wmask[at..at + 4]);
        u32::from_le_bytes(raw)
    }

    /// Offset of the next-pointer byte of the capability at `cap` (or 0x34 itself).
    fn next_pointer(&self, cap: u16) -> u16 {
        if cap == CAPABILITIES_POINTER {
            cap
        } else {
            cap + 1
        }
    }

    fn set8(&mut self, offset: u16, value: u8) {
        self.bytes[usize::from(offset)] = value;
    }

    fn set16(&mut self, offset: u16, value: u16) {
        let at = usize::from(offset);
        self.bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn set32(&mut self, offset: u16, value: u32) {
        let at = usize::from(offset);
        self.bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn set_wmask8(&mut self, offset: u16, mask: u8) {
        self.wmask[usize::from(offset)] = mask;
    }

    fn set_wmask16(&mut self, offset: u16, mask: u16) {
        let at = usize::from(offset);
        self.wmask[at..at + 2].copy_from_slice(&mask.to_le_bytes());
    }

    fn set_wmask32(&mut self, offset: u16, mask: u32) {
        let at = usize::from(offset);
        self.wmask[at..at + 4].copy_from_slice(&mask.to_le_bytes());
    }

    fn put_bytes(&mut self, offset: u16, body: &[u8], writable: &[u8]) {
        let at = usize::from(offset);
        self.bytes[at..at + body.len()].copy_from_slice(body);
        self.wmask[at..at + writable.len()].copy_from_slice(writable);
    }

    /// Checks an access's shape; returns its start index, or logs and returns `None`.
    fn check(&mut self, op: &str, offset: u64, size: usize) -> Option<usize> {
        let problem = if !matches!(size, 1 | 2 | 4) {
            "unsupported access size"
        } else if offset % size as u64 != 0 {
            "unaligned offset"
        } else if offset >= CONFIG_SPACE_SIZE as u64 {
            "offset beyond the configuration space"
        } else {
            // Aligned and below 4 KiB: the access ends within the space.
            return usize::try_from(offset).ok();
        };
        self.warn.warn(
            NAME,
            format_args!("{problem}: {size}-byte {op} at offset {offset:#x}"),
        );
        None
    }
}

/// Offset of BAR register `index`.
fn bar_reg(index: usize) -> u16 {
    // index < 6: fits.
    BAR0 + 4 * index as u16
}

fn check_mask(body: &[u8], writable: &[u8]) -> Result<(), ConfigError> {
    if body.len() == writable.len() {
        Ok(())
    } else {
        Err(ConfigError::MaskLength {
            body: body.len(),
            mask: writable.len(),
        })
    }
}

/// Body (after the id/next header) and writable mask of a version-2 PCI Express capability
/// for an endpoint: 256-byte max payload, extended tags, role-based error reporting, a
/// 32 GT/s x16 link (trained at that speed), no ASPM, no slot, no FLR.
fn pcie_capability() -> (Vec<u8>, Vec<u8>) {
    let len = usize::from(PCIE_CAP_LEN);
    let mut cap = vec![0u8; len];
    let mut mask = vec![0u8; len];
    fn put16(buf: &mut [u8], at: usize, v: u16) {
        buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    // Capability version 2, device/port type 0 (PCI Express endpoint).
    put16(&mut cap, PCIE_CAPS, 0x0002);
    // DEVCAP: max payload 256 B (1), extended tag (bit 5), L0s/L1 acceptable latency
    // "no limit" (7 << 6, 7 << 9), role-based error reporting (bit 15).
    let devcap: u32 = 1 | (1 << 5) | (7 << 6) | (7 << 9) | (1 << 15);
    cap[PCIE_DEVCAP..PCIE_DEVCAP + 4].copy_from_slice(&devcap.to_le_bytes());
    // DEVCTL: reset value relaxed ordering + no snoop + 512 B max read request; writable:
    // error reporting enables, relaxed ordering, max payload, extended tag, no snoop,
    // max read request.
    put16(&mut cap, PCIE_DEVCTL, (1 << 4) | (1 << 11) | (2 << 12));
    put16(&mut mask, PCIE_DEVCTL, 0x79FF);
    // LNKCAP: 32 GT/s, x16, no ASPM, port number 0.
    let lnkcap = u32::from(LINK_SPEED_32GT | (LINK_WIDTH_X16 << 4));
    cap[PCIE_LNKCAP..PCIE_LNKCAP + 4].copy_from_slice(&lnkcap.to_le_bytes());
    // LNKCTL: RCB, common clock configuration, extended synch are writable.
    put16(&mut mask, PCIE_LNKCTL, (1 << 3) | (1 << 6) | (1 << 7));
    // LNKSTA: trained at 32 GT/s x16, slot clock configuration.
    put16(
        &mut cap,
        PCIE_LNKSTA,
        LINK_SPEED_32GT | (LINK_WIDTH_X16 << 4) | (1 << 12),
    );
    // DEVCAP2: completion timeout ranges A-D and disable supported.
    let devcap2: u32 = 0x1F;
    cap[PCIE_DEVCAP2..PCIE_DEVCAP2 + 4].copy_from_slice(&devcap2.to_le_bytes());
    // DEVCTL2: completion timeout value / disable writable.
    put16(&mut mask, PCIE_DEVCTL2, 0x001F);
    // LNKCAP2: supported speeds 2.5 to 32 GT/s (bits 1..5).
    let lnkcap2: u32 = 0x1F << 1;
    cap[PCIE_LNKCAP2..PCIE_LNKCAP2 + 4].copy_from_slice(&lnkcap2.to_le_bytes());
    // LNKCTL2: target link speed (reset 32 GT/s) writable.
    put16(&mut cap, PCIE_LNKCTL2, LINK_SPEED_32GT);
    put16(&mut mask, PCIE_LNKCTL2, 0x000F);
    // Drop the two-byte id/next header: `add_capability` writes it.
    (cap.split_off(2), mask.split_off(2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_utils::SplitMix64;

    fn identity() -> FunctionIdentity {
        FunctionIdentity {
            vendor_id: 0x1234,
            device_id: 0x5678,
            revision_id: 0xA1,
            class_code: 0x03_02_00,
            subsystem_vendor_id: 0x1234,
            subsystem_id: 0x9ABC,
        }
    }

    fn space_with_bars() -> ConfigSpace {
        let mut cs = ConfigSpace::new(identity());
        let bar32 = Bar {
            size: 16 << 20,
            kind: BarKind::Memory32,
            prefetchable: false,
        };
        let bar64 = Bar {
            size: 8 << 30,
            kind: BarKind::Memory64,
            prefetchable: true,
        };
        cs.add_bar(0, bar32).unwrap();
        cs.add_bar(2, bar64).unwrap();
        cs
    }

    fn read32(cs: &mut ConfigSpace, offset: u16) -> u32 {
        let mut data = [0u8; 4];
        cs.read(u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(cs: &mut ConfigSpace, offset: u16, value: u32) {
        cs.write(u64::from(offset), &value.to_le_bytes());
    }

    fn read16(cs: &mut ConfigSpace, offset: u16) -> u16 {
        let mut data = [0u8; 2];
        cs.read(u64::from(offset), &mut data);
        u16::from_le_bytes(data)
    }

    #[test]
    fn test_header_identity_reads_back() {
        // Arrange
        let mut cs = ConfigSpace::new(identity());
        // Act / Assert
        assert_eq!(read32(&mut cs, VENDOR_ID), 0x5678_1234);
        assert_eq!(read32(&mut cs, REVISION_ID), 0x0302_00A1);
        assert_eq!(cs.get8(HEADER_TYPE), 0);
        assert_eq!(read16(&mut cs, STATUS), STATUS_CAP_LIST);
        assert_eq!(read32(&mut cs, SUBSYSTEM_VENDOR_ID), 0x9ABC_1234);
        assert_eq!(cs.get8(CAPABILITIES_POINTER), 0x40);
        assert_eq!(cs.get8(INTERRUPT_PIN), 0);
    }

    #[test]
    fn test_header_read_only_fields_ignore_writes() {
        // Arrange
        let mut cs = space_with_bars();
        let before: Vec<u8> = cs.bytes.to_vec();
        // Act
        for offset in [
            VENDOR_ID,
            REVISION_ID,
            0x2C,
            0x28,
            0x30,
            CAPABILITIES_POINTER,
            0x38,
        ] {
            write32(&mut cs, offset, u32::MAX);
        }
        cs.write(u64::from(HEADER_TYPE), &[0xFF]);
        cs.write(u64::from(INTERRUPT_PIN), &[0xFF]);
        cs.write(u64::from(STATUS), &[0xFF, 0xFF]);
        // Assert
        assert_eq!(cs.bytes.to_vec(), before);
    }

    #[test]
    fn test_command_only_writable_bits_stick() {
        // Arrange
        let mut cs = ConfigSpace::new(identity());
        // Act
        cs.write(u64::from(COMMAND), &[0xFF, 0xFF]);
        // Assert
        assert_eq!(cs.command(), COMMAND_WRITABLE);
        assert!(cs.memory_enabled());
        assert_eq!(read16(&mut cs, STATUS), STATUS_CAP_LIST);
    }

    #[test]
    fn test_interrupt_line_is_scratch_pin_is_none() {
        // Arrange
        let mut cs = ConfigSpace::new(identity());
        // Act
        write32(&mut cs, INTERRUPT_LINE, u32::MAX);
        // Assert
        assert_eq!(read32(&mut cs, INTERRUPT_LINE), 0xFF);
    }

    #[test]
    fn test_bar32_sizing_returns_size_mask() {
        // Arrange
        let mut cs = space_with_bars();
        // Act
        write32(&mut cs, BAR0, u32::MAX);
        let mask = read32(&mut cs, BAR0);
        write32(&mut cs, BAR0, 0x1200_0000 | 0xF);
        let programmed = read32(&mut cs, BAR0);
        // Assert
        assert_eq!(mask, 0xFF00_0000);
        assert_eq!(programmed, 0x1200_0000);
        assert_eq!(cs.bar_range(0), Some((0x1200_0000, 16 << 20)));
    }

    #[test]
    fn test_bar64_prefetchable_sizing_spans_two_registers() {
        // Arrange
        let mut cs = space_with_bars();
        // Act
        write32(&mut cs, BAR0 + 8, u32::MAX);
        write32(&mut cs, BAR0 + 12, u32::MAX);
        let low = read32(&mut cs, BAR0 + 8);
        let high = read32(&mut cs, BAR0 + 12);
        write32(&mut cs, BAR0 + 8, 0);
        write32(&mut cs, BAR0 + 12, 0xC0);
        // Assert: 8 GiB = 0xFFFF_FFFE_0000_0000 mask; type 64 (0x4) | prefetchable (0x8).
        assert_eq!(low, 0x0000_000C);
        assert_eq!(high, 0xFFFF_FFFE);
        assert_eq!(cs.bar_range(2), Some((0xC0_0000_0000, 8 << 30)));
        assert_eq!(cs.bar(3), None);
        assert_eq!(cs.bar_range(3), None);
    }

    #[test]
    fn test_bar64_small_size_masks_low_register() {
        // Arrange
        let mut cs = ConfigSpace::new(identity());
        let bar = Bar {
            size: 0x4000,
            kind: BarKind::Memory64,
            prefetchable: false,
        };
        cs.add_bar(4, bar).unwrap();
        // Act
        write32(&mut cs, BAR0 + 16, u32::MAX);
        write32(&mut cs, BAR0 + 20, u32::MAX);
        // Assert
        assert_eq!(read32(&mut cs, BAR0 + 16), 0xFFFF_C004);
        assert_eq!(read32(&mut cs, BAR0 + 20), 0xFFFF_FFFF);
        assert_eq!(cs.bar_range(4), Some((0xFFFF_FFFF_FFFF_C000, 0x4000)));
    }

    #[test]
    fn test_unused_bars_read_zero_and_ignore_writes() {
        // Arrange
        let mut cs = space_with_bars();
        // Act
        write32(&mut cs, BAR0 + 4, u32::MAX);
        write32(&mut cs, BAR0 + 16, u32::MAX);
        write32(&mut cs, BAR0 + 20, u32::MAX);
        // Assert
        assert_eq!(read32(&mut cs, BAR0 + 4), 0);
        assert_eq!(read32(&mut cs, BAR0 + 16), 0);
        assert_eq!(read32(&mut cs, BAR0 + 20), 0);
    }

    #[test]
    fn test_bar_narrow_writes_merge_bytes() {
        // Arrange
        let mut cs = space_with_bars();
        // Act
        cs.write(u64::from(BAR0 + 3), &[0x3F]);
        cs.write(u64::from(BAR0 + 2), &[0x45]);
        cs.write(u64::from(BAR0), &[0xFF, 0xFF]);
        // Assert
        assert_eq!(read32(&mut cs, BAR0), 0x3F00_0000);
    }

    #[test]
    fn test_add_bar_bad_arguments_error() {
        // Arrange
        let mut cs = space_with_bars();
        let bar = |size, kind| Bar {
            size,
            kind,
            prefetchable: false,
        };
        // Act / Assert
        assert_eq!(
            cs.add_bar(6, bar(16, BarKind::Memory32)),
            Err(ConfigError::BadBarIndex(6))
        );
        assert_eq!(
            cs.add_bar(5, bar(16, BarKind::Memory64)),
            Err(ConfigError::BadBarIndex(5))
        );
        assert_eq!(
            cs.add_bar(1, bar(24, BarKind::Memory32)),
            Err(ConfigError::BadBarSize(24))
        );
        assert_eq!(
            cs.add_bar(1, bar(8, BarKind::Memory32)),
            Err(ConfigError::BadBarSize(8))
        );
        assert_eq!(
            cs.add_bar(1, bar(4 << 30, BarKind::Memory32)),
            Err(ConfigError::BadBarSize(4 << 30))
        );
        assert_eq!(
            cs.add_bar(3, bar(16, BarKind::Memory32)),
            Err(ConfigError::BarInUse(3))
        );
        assert_eq!(
            cs.add_bar(1, bar(16, BarKind::Memory64)),
            Err(ConfigError::BarInUse(2))
        );
    }

    #[test]
    fn test_capability_walk_finds_pcie_endpoint_v2() {
        // Arrange
        let mut cs = ConfigSpace::new(identity());
        // Act
        let pcie = cs.find_capability(CAP_ID_PCIE).unwrap();
        let caps = read16(&mut cs, pcie + 2);
        let devcap = read32(&mut cs, pcie + 4);
        let lnkcap = read32(&mut cs, pcie + 0xC);
        let lnksta = read16(&mut cs, pcie + 0x12);
        // Assert
        assert_eq!(pcie, PCIE_CAP_OFFSET);
        assert_eq!(cs.get8(pcie + 1), 0, "last capability");
        assert_eq!(caps & 0xF, 2, "version 2");
        assert_eq!((caps >> 4) & 0xF, 0, "endpoint");
        assert_eq!(devcap & 0x7, 1, "256-byte max payload");
        assert_eq!(devcap & (1 << 28), 0, "no FLR");
        assert_eq!(lnkcap & 0x3FF, 0x105, "32 GT/s x16");
        assert_eq!(lnksta & 0x3FF, 0x105);
        assert_eq!(cs.find_capability(0x05), None);
    }

    #[test]
    fn test_capability_chain_links_new_capabilities() {
        // Arrange
        let mut cs = ConfigSpace::new(identity());
        // Act
        let pm = cs.add_capability(0x01, &[0x03, 0x00, 0, 0, 0, 0], &[0; 6]);
        let vendor = cs.add_capability(0x09, &[4], &[0]);
        // Assert
        assert_eq!(pm, Ok(0x7C));
        assert_eq!(vendor, Ok(0x84));
        assert_eq!(cs.get8(PCIE_CAP_OFFSET + 1), 0x7C);
        assert_eq!(cs.get8(0x7D), 0x84);
        assert_eq!(cs.find_capability(0x09), Some(0x84));
        assert_eq!(
            cs.add_capability(0x09, &[0; 0x80], &[0; 0x80]),
            Err(ConfigError::NoRoom {
                offset: 0x88,
                len: 0x82
            })
        );
        assert_eq!(
            cs.add_capability(0x09, &[0; 2], &[0; 3]),
            Err(ConfigError::MaskLength { body: 2, mask: 3 })
        );
    }

    #[test]
    fn test_pcie_capability_control_registers_keep_writable_bits_only() {
        // Arrange
        let mut cs = ConfigSpace::new(identity());
        let pcie = PCIE_CAP_OFFSET;
        // Act
        write32(&mut cs, pcie + 0x8, u32::MAX);
        write32(&mut cs, pcie + 0x4, 0);
        write32(&mut cs, pcie + 0xC, 0);
        // Assert
        assert_eq!(read32(&mut cs, pcie + 0x8), 0x79FF, "DEVSTA stays 0");
        assert_ne!(read32(&mut cs, pcie + 0x4), 0, "DEVCAP is read-only");
        assert_eq!(read32(&mut cs, pcie + 0xC) & 0x3FF, 0x105);
    }

    #[test]
    fn test_extended_capabilities_absent_read_zero_header() {
        // Arrange
        let mut cs = ConfigSpace::new(identity());
        // Act / Assert
        assert_eq!(read32(&mut cs, EXT_CAP_START), 0);
        assert_eq!(cs.find_extended_capability(EXT_CAP_ID_DVSEC), None);
    }

    #[test]
    fn test_extended_capability_walk_finds_dvsec() {
        // Arrange
        let mut cs = ConfigSpace::new(identity());
        let first = cs
            .add_extended_capability(0x000B, 1, &[0; 8], &[0; 8])
            .unwrap();
        let dvsec = cs.add_dvsec(0x10DE, 0, 3, &[1, 0, 0, 0]).unwrap();
        // Act
        let found = cs.find_extended_capability(EXT_CAP_ID_DVSEC);
        let header = read32(&mut cs, first);
        let header1 = read32(&mut cs, dvsec + 4);
        let id = read16(&mut cs, dvsec + 8);
        let word = read16(&mut cs, dvsec + 0xA);
        // Assert
        assert_eq!(first, 0x100);
        assert_eq!(dvsec, 0x10C);
        assert_eq!(found, Some(0x10C));
        assert_eq!(header, 0x10C1_000B);
        assert_eq!(header1 & 0xFFFF, 0x10DE);
        assert_eq!(header1 >> 20, 0xE, "DVSEC length");
        assert_eq!(id, 3);
        assert_eq!(word, 1);
    }

    #[test]
    fn test_bad_sizes_unaligned_and_out_of_range_change_nothing() {
        // Arrange
        let mut cs = space_with_bars();
        write32(&mut cs, BAR0, 0x2000_0000);
        let before: Vec<u8> = cs.bytes.to_vec();
        // Act / Assert
        for (offset, size) in [
            (u64::from(COMMAND), 0usize),
            (u64::from(COMMAND), 3),
            (u64::from(COMMAND), 8),
            (u64::from(BAR0), 16),
            (u64::from(COMMAND) + 1, 2),
            (u64::from(BAR0) + 2, 4),
            (u64::from(BAR0) + 1, 4),
            (0x1000, 4),
            (0xFFF, 2),
            (u64::MAX - 3, 4),
            (u64::MAX, 1),
        ] {
            cs.write(offset, &vec![0xFF; size]);
            assert_eq!(
                cs.bytes.to_vec(),
                before,
                "{size}-byte write at {offset:#x}"
            );
            let mut data = vec![0xA5; size];
            cs.read(offset, &mut data);
            assert!(
                data.iter().all(|&b| b == 0),
                "{size}-byte read at {offset:#x}"
            );
        }
    }

    #[test]
    fn test_fuzz_config_space_keeps_read_only_bits() {
        // Arrange
        let mut cs = space_with_bars();
        let initial: Vec<u8> = cs.bytes.to_vec();
        let wmask: Vec<u8> = cs.wmask.to_vec();
        let mut rng = SplitMix64(0xC0F1_6000_5EED);
        let hot = [
            0x00u64, 0x04, 0x0C, 0x10, 0x18, 0x1C, 0x3C, 0x40, 0x48, 0x100,
        ];
        // Act / Assert
        for step in 0..100_000 {
            let offset = match rng.below(10) {
                0..=6 => hot[rng.below(hot.len() as u64) as usize] + rng.below(4),
                7..=8 => rng.below(0x1004),
                _ => rng.next_u64(),
            };
            let size = [1usize, 2, 4, 4, 0, 3, 8][rng.below(7) as usize];
            if rng.below(2) == 0 {
                let data: Vec<u8> = (0..size).map(|_| rng.next_u64() as u8).collect();
                cs.write(offset, &data);
            } else {
                let mut data = vec![0xA5; size];
                cs.read(offset, &mut data);
                let legal = matches!(size, 1 | 2 | 4)
                    && offset % size as u64 == 0
                    && offset < CONFIG_SPACE_SIZE as u64;
                if !legal {
                    assert!(data.iter().all(|&b| b == 0), "step {step}");
                }
            }
            if step % 64 == 0 {
                for (i, ((&now, &was), &m)) in cs
                    .bytes
                    .iter()
                    .zip(initial.iter())
                    .zip(wmask.iter())
                    .enumerate()
                {
                    assert_eq!(now & !m, was & !m, "read-only bits at {i:#x}, step {step}");
                }
            }
        }
        assert_eq!(cs.bar_range(0).unwrap().0 % (16 << 20), 0);
        assert_eq!(cs.bar_range(2).unwrap().0 % (8 << 30), 0);
    }
}
