//! The bugs reviewers found in the EGM series (RFC v1 and v2), each named once with where it
//! was reported. A test that reproduces one reports XFAIL naming it (the known review point)
//! instead of a bare failure; anything else it sees fails.

use std::fmt;

/// One review finding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Short key, used in scenario names and test messages.
    pub key: &'static str,
    /// Where: series revision and patch.
    pub patch: &'static str,
    pub summary: &'static str,
    /// The review mail.
    pub message_id: &'static str,
    /// Still open in the newest revision (v2): reproducing it is an expected failure (XFAIL).
    /// A v1 finding that v2 fixed is a regression when it reappears: it fails, by name.
    pub open: bool,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "known review point [{}] {}: {} ({})",
            self.key, self.patch, self.summary, self.message_id
        )
    }
}

pub const UNBIND_WHILE_OPEN: Finding = Finding {
    key: "unbind-while-open",
    patch: "v2 08/15, 09/15",
    summary: "open() takes no reference: the GPU or aux device goes away while /dev/egmN is \
              open or mapped; release touches freed memory and the old mapping still reaches \
              the carve-out",
    message_id: "<20260304150437.50503b55@shazbot.org>",
    open: true,
};

pub const RETIRED_OFF_BY_ONE: Finding = Finding {
    key: "retired-off-by-one",
    patch: "v2 11/15",
    summary: "count > PAGE_SIZE/8 lets 512 entries through: entry 512 is read past the \
              one-page memremap of the retired-pages table",
    message_id: "<20260304153700.59fa72d2@shazbot.org>",
    open: true,
};

pub const AUX_ADD_DOUBLE_FREE: Finding = Finding {
    key: "aux-add-double-free",
    patch: "v2 02/15",
    summary: "double free when auxiliary_device_add fails",
    message_id: "<20260303171349.36be0589@shazbot.org>",
    open: true,
};

pub const SHARED_REGION_UAF: Finding = Finding {
    key: "shared-region-uaf",
    patch: "v2 03/15",
    summary: "use-after-free when the second GPU of a shared region fails to attach: the \
              region entry is freed while still on the list",
    message_id: "<20260304101409.3c069046@shazbot.org>",
    open: true,
};

pub const NO_LOCKING: Finding = Finding {
    key: "no-locking",
    patch: "v2 02/15, 03/15, 12/15, 15/15",
    summary: "region and GPU lists unprotected against parallel probes; the retired-pages \
              hash updated by memory-failure handling while the ioctl walks it",
    message_id: "<20260304160055.38ea91be@shazbot.org>",
    open: true,
};

pub const TOO_SMALL_BUFFER: Finding = Finding {
    key: "too-small-buffer",
    patch: "v2 12/15",
    summary: "a retired-pages buffer too small for the list returns 0 (argsz updated, count \
              0) rather than -ENOSPC",
    message_id: "v2 12/15 review",
    open: true,
};

pub const MINOR_NUMBERS: Finding = Finding {
    key: "minor-numbers",
    patch: "v2 06/15, 14/15",
    summary: "minor number = PXM, outside the reserved minors 0..3",
    message_id: "v2 06/15 review",
    open: true,
};

pub const MAP_PRIVATE: Finding = Finding {
    key: "map-private",
    patch: "v1, still in v2",
    summary: "MAP_PRIVATE accepted: writes go to COW pages, not to EGM",
    message_id: "v1 review (Jason Gunthorpe), still in v2",
    open: true,
};

pub const V1_MMAP_BOUNDS: Finding = Finding {
    key: "v1-mmap-bounds",
    patch: "v1",
    summary: "mmap ignores the offset and the length: a mapping larger than the region, or at \
              an offset, maps from the base and past the end",
    message_id: "<20250905133624.GF616306@nvidia.com>",
    open: false,
};

pub const V1_MULTI_OPEN: Finding = Finding {
    key: "v1-multi-open",
    patch: "v1",
    summary: "a second open() succeeds without private_data: mmap/ioctl on it dereference NULL",
    message_id: "v1 review",
    open: false,
};

pub const V1_MODULE_EXIT: Finding = Finding {
    key: "v1-module-exit",
    patch: "v1",
    summary: "module exit destroys the class before unregistering the aux driver: rmmod with \
              devices bound touches a destroyed class",
    message_id: "v1 review",
    open: false,
};

pub const V1_RETIRED_UNCHECKED: Finding = Finding {
    key: "v1-retired-unchecked",
    patch: "v1",
    summary: "the retired-pages count is not checked: any count reads past the one-page mapping",
    message_id: "v1 review",
    open: false,
};

/// Every finding, for listings.
pub const ALL: &[Finding] = &[
    UNBIND_WHILE_OPEN,
    RETIRED_OFF_BY_ONE,
    AUX_ADD_DOUBLE_FREE,
    SHARED_REGION_UAF,
    NO_LOCKING,
    TOO_SMALL_BUFFER,
    MINOR_NUMBERS,
    MAP_PRIVATE,
    V1_MMAP_BOUNDS,
    V1_MULTI_OPEN,
    V1_MODULE_EXIT,
    V1_RETIRED_UNCHECKED,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_finding_keys_unique_and_display_names_key() {
        let mut keys: Vec<_> = ALL.iter().map(|f| f.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), ALL.len());
        assert!(RETIRED_OFF_BY_ONE
            .to_string()
            .contains("[retired-off-by-one] v2 11/15"));
    }
}
