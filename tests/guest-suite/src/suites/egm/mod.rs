//! The EGM driver (`nvgrace-egm`, RFC v2 series): the test matrix of section 5 of
//! /work/shared/spec/egm-driver.md, one test (or a few) per item; messages say `5.N`.
//!
//! Every test first asks whether the kernel has the driver ([`egm::require_egm_kernel`]): a
//! kernel without it (the default Debian 7.3 build) reports each test as SKIP with the reason,
//! never as a pass. Then the platform: the GPUs (`GRACEVM_GPUS`, with exactly the properties
//! their firmware node carries), the carve-outs (`GRACEVM_CARVEOUTS`) and the retired-pages
//! tables (`GRACEVM_EGM_RETIRED_PAGES`); a test whose scenario is not on this platform SKIPs
//! saying which scenario it needs. Memory is checked from both sides: the guest through
//! `/dev/egm<pxm>`, the VMM through the test device's probe (PEEK, CHECK_PATTERN, CHECK_VALUE).
//!
//! Expected results are the v2 behaviour of the spec. Where v2 deviates from the intended
//! contract (the spec's review points) a test reports XFAIL naming the review point when it
//! observes the deviation, and PASS when it observes the intended behaviour, so a fix shows.
//!
//! Only a region whose `nvidia,egm-base-pa`/`nvidia,egm-size` are exactly a carve-out is ever
//! opened: opening zeroes the whole region, so a wrong base would wipe guest memory.
//!
//! Order matters: tests that change binding state run last — the shared-region unbind order
//! (rebinds afterwards), rmmod (modules only), and finally unbind-while-mapped, which leaves
//! the kernel in the state the review point describes (use-after-free) and the GPUs unbound.
//!
//! One module per section of the spec: [`properties`] (section 1), [`objects`] (section 2),
//! [`open`], [`mmap`], [`retired_pages`] and [`poison`] (section 3), then the review findings
//! of section 4: [`locking`], [`rmmod`], [`fault_injection`], [`detach`]. [`machine`] is what
//! they share. This module only registers the tests, in the order they run.

use std::time::Duration;

use crate::registry::Test;

mod detach;
mod fault_injection;
mod locking;
mod machine;
mod mmap;
mod objects;
mod open;
mod poison;
mod properties;
mod retired_pages;
mod rmmod;

use detach::{
    known_detach, remove_while_mapped, remove_while_open, unbind_while_mapped, unbind_while_open,
};
use fault_injection::{known_probe_fault, probe_fault_sweep};
use locking::{known_no_locking, parallel_probe, poison_race};
use mmap::{mmap_bounds, mmap_no_grow, mmap_offset_alias, mmap_private, mmap_whole};
use objects::{device_created, minor_reserved, shared_region, size_sysfs};
use open::{known_multi_open, open_exclusive, open_zeroes};
use poison::poison;
use properties::missing_properties;
use retired_pages::{
    known_retired, retired_pages_ioctl, retired_pages_protocol, retired_table_limits,
};
use rmmod::{known_module_exit, rmmod_orders, rmmod_while_open};

pub const TESTS: &[Test] = &[
    Test::new("egm_device_created", device_created)
        .no_carveouts()
        .with_timeout(Duration::from_secs(120)),
    Test::new("egm_minor_reserved", minor_reserved)
        .no_carveouts()
        .with_timeout(Duration::from_secs(120)),
    Test::new("egm_size_sysfs", size_sysfs)
        .no_carveouts()
        .with_timeout(Duration::from_secs(120)),
    Test::new("egm_open_zeroes", open_zeroes).with_timeout(Duration::from_secs(300)),
    Test::new("egm_mmap_whole", mmap_whole).with_timeout(Duration::from_secs(180)),
    Test::new("egm_mmap_bounds", mmap_bounds).with_timeout(Duration::from_secs(180)),
    Test::new("egm_mmap_offset_alias", mmap_offset_alias).with_timeout(Duration::from_secs(180)),
    Test::new("egm_mmap_private", mmap_private).with_timeout(Duration::from_secs(180)),
    Test::new("egm_mmap_no_grow", mmap_no_grow).with_timeout(Duration::from_secs(180)),
    Test::new("egm_retired_pages_ioctl", retired_pages_ioctl)
        .with_timeout(Duration::from_secs(180)),
    Test::new("egm_retired_pages_protocol", retired_pages_protocol)
        .with_timeout(Duration::from_secs(180)),
    Test::new("egm_retired_table_limits", retired_table_limits)
        .with_timeout(Duration::from_secs(180))
        .with_known(known_retired),
    // After the mmap and ioctl tests: on a driver that lets a second open through (v1), using
    // that descriptor oopses, and what the dead task holds stalls the tests after it.
    Test::new("egm_open_exclusive", open_exclusive)
        .with_timeout(Duration::from_secs(300))
        .with_known(known_multi_open),
    Test::new("egm_missing_properties", missing_properties)
        .no_carveouts()
        .with_timeout(Duration::from_secs(300)),
    Test::new("egm_poison", poison).with_timeout(Duration::from_secs(240)),
    Test::new("egm_poison_race", poison_race)
        .with_timeout(Duration::from_secs(240))
        .with_known(known_no_locking),
    Test::new("egm_shared_region", shared_region)
        .no_carveouts()
        .with_timeout(Duration::from_secs(300)),
    Test::new("egm_parallel_probe", parallel_probe)
        .no_carveouts()
        .with_timeout(Duration::from_secs(300))
        .with_known(known_no_locking),
    Test::new("egm_rmmod_while_open", rmmod_while_open)
        .with_timeout(Duration::from_secs(180))
        .with_known(known_module_exit),
    Test::new("egm_rmmod_orders", rmmod_orders).with_timeout(Duration::from_secs(180)),
    Test::new("egm_probe_fault_sweep", probe_fault_sweep)
        .no_carveouts()
        .with_timeout(Duration::from_secs(900))
        .with_known(known_probe_fault),
    Test::new("egm_unbind_while_open", unbind_while_open)
        .with_timeout(Duration::from_secs(240))
        .with_known(known_detach),
    Test::new("egm_remove_while_open", remove_while_open)
        .with_timeout(Duration::from_secs(240))
        .with_known(known_detach),
    Test::new("egm_remove_while_mapped", remove_while_mapped)
        .with_timeout(Duration::from_secs(240))
        .with_known(known_detach),
    Test::new("egm_unbind_while_mapped", unbind_while_mapped)
        .with_timeout(Duration::from_secs(240))
        .with_known(known_detach),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egm;
    use crate::outcome::Outcome;
    use crate::registry::Context;

    #[test]
    fn test_tests_ordered_binding_changes_last() {
        let names: Vec<&str> = TESTS.iter().map(|t| t.name).collect();
        assert_eq!(names.first(), Some(&"egm_device_created"));
        assert_eq!(names.last(), Some(&"egm_unbind_while_mapped"));
        let at = |name: &str| names.iter().position(|n| *n == name).unwrap();
        assert!(at("egm_open_zeroes") < at("egm_open_exclusive"));
        assert!(at("egm_retired_pages_ioctl") < at("egm_poison"));
        assert!(at("egm_poison") < at("egm_shared_region"));
        assert!(at("egm_shared_region") < at("egm_rmmod_while_open"));
        assert!(names.iter().all(|n| n.starts_with("egm_")));
    }

    #[test]
    fn test_without_driver_every_test_skips() {
        // On a host (or a kernel without the driver) there is no /sys/class/egm: every test
        // must SKIP, never pass.
        if std::path::Path::new(egm::EGM_CLASS).exists() {
            return;
        }
        let ctx = Context {
            env: crate::env::GuestEnv::parse(
                "GRACEVM_CARVEOUTS='4:0x8000000000:0x40000000:0x4752414345000004'\n\
                 GRACEVM_GPUS='bdf=0000:00:01.0;id=10de:2941;props=gpu-mem-base-pa:0xd000000000,\
                 gpu-mem-size:0x40000000,egm-pxm:0x4,egm-base-pa:0x8000000000,\
                 egm-size:0x40000000,egm-retired-pages-data-base:0x40100000'\n",
            ),
        };
        for test in TESTS {
            let outcome = (test.run)(&ctx);
            assert!(
                matches!(outcome, Outcome::Skip(_)),
                "{}: {outcome:?}",
                test.name
            );
        }
    }
}
