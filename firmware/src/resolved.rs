//! The platform resolved once: a description that validated, and the memory map placed from
//! it. Firmware, the VMM and the guest's expectations all read this one value, so the memory
//! map is computed in one place ([`Platform::resolve`]) and nothing is built from a
//! description that did not validate.

use std::ops::Deref;

use crate::description::Platform;
use crate::layout::{self, MemoryMap};

/// A validated [`Platform`] with its [`MemoryMap`]. Derefs to the description, whose fields
/// (vCPUs, boot mode, the GPUs' fault knobs) stay what the user wrote; a GPU function's
/// properties with its knobs applied are [`crate::gpu_properties`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    platform: Platform,
    map: MemoryMap,
}

impl Resolved {
    /// Only [`Platform::resolve`] builds one, after validating.
    pub(crate) fn new(platform: Platform, map: MemoryMap) -> Self {
        Resolved { platform, map }
    }

    /// The description.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// Where everything is.
    pub fn map(&self) -> &MemoryMap {
        &self.map
    }

    /// Guest physical address bits the platform needs (at least 32): everything it places,
    /// including the PCIe windows, must be below 2^bits.
    pub fn required_ipa_bits(&self) -> u32 {
        layout::ipa_bits(self.map.top())
    }

    /// Check the platform fits a host whose KVM supports `limit_bits` of guest physical
    /// address; the error says what does not fit.
    pub fn validate_ipa(&self, limit_bits: u32) -> Result<(), String> {
        let need = self.required_ipa_bits();
        if need <= limit_bits {
            return Ok(());
        }
        let limit = 1u128 << limit_bits;
        let beyond: Vec<String> = self
            .map
            .named_ranges()
            .into_iter()
            .filter(|(_, r)| u128::from(r.end()) > limit)
            .map(|(name, r)| format!("{name} {r}"))
            .collect();
        Err(format!(
            "the platform needs {need}-bit guest physical addresses but this host's KVM \
             supports {limit_bits} bits; beyond {:#x}: {}. Shrink or move these (or run on a \
             host with a larger IPA limit)",
            limit,
            beyond.join(", ")
        ))
    }
}

impl Deref for Resolved {
    type Target = Platform;

    fn deref(&self) -> &Platform {
        &self.platform
    }
}
