//! The `nvidia,*` firmware properties of a GPU function (ACPI `_DSD` or DT), all u64: what the
//! VMM's firmware emits and what the suite expects the drivers to read. Each name is written
//! once; [`short`] has them without the `nvidia,` prefix, as `/gracevm/env` carries them.

macro_rules! properties {
    ($($(#[$doc:meta])* $name:ident = $short:literal;)*) => {
        $($(#[$doc])* pub const $name: &str = concat!("nvidia,", $short);)*
        /// The same names without `nvidia,`.
        pub mod short {
            $(pub const $name: &str = $short;)*
        }
        /// Every property, in the order firmware emits them.
        pub const ALL: [&str; [$($short),*].len()] = [$($name),*];
    };
}

properties! {
    /// Base of the GPU's coherent memory; read first by nvgrace-gpu.
    GPU_MEM_BASE_PA = "gpu-mem-base-pa";
    /// Size of that memory (0: C2C link down, plain vfio-pci).
    GPU_MEM_SIZE = "gpu-mem-size";
    /// The EGM region's proximity domain; missing: EGM silently skipped.
    EGM_PXM = "egm-pxm";
    EGM_BASE_PA = "egm-base-pa";
    EGM_SIZE = "egm-size";
    /// Where the retired-pages table is (0: "Retired pages region is not setup").
    EGM_RETIRED_PAGES_DATA_BASE = "egm-retired-pages-data-base";
}

/// What every property name starts with.
pub const PREFIX: &str = "nvidia,";

/// The property `name` without `nvidia,`.
pub fn short_name(name: &str) -> &str {
    name.strip_prefix(PREFIX).unwrap_or(name)
}

/// The full name of the property `short` (`egm-pxm`: `nvidia,egm-pxm`).
pub fn full_name(short: &str) -> String {
    format!("{PREFIX}{short}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_full_and_short_names_agree() {
        assert_eq!(ALL.len(), 6);
        assert_eq!(GPU_MEM_BASE_PA, "nvidia,gpu-mem-base-pa");
        assert_eq!(full_name(short::EGM_PXM), EGM_PXM);
        assert_eq!(
            short_name(EGM_RETIRED_PAGES_DATA_BASE),
            short::EGM_RETIRED_PAGES_DATA_BASE
        );
    }
}
