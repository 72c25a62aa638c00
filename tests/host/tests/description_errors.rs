//! One test per platform-description error: each invalid description is refused with a
//! message that names the offending value, and nothing is built from it.

use firmware::Platform;

/// Parse `toml`, expect it refused, and return the message.
fn refused(toml: &str) -> String {
    let e = Platform::from_toml(toml, "bad.toml")
        .expect_err("description should be refused")
        .to_string();
    assert!(e.starts_with("platform description bad.toml: "), "{e}");
    e
}

const EGM: &str = "[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"1G\"\n";

#[test]
fn test_description_overlapping_ranges_refused() {
    let e = refused(&format!("{EGM}base = \"0x40000000\""));
    assert!(
        e.contains("socket 0 RAM 0x40000000..0x80000000 overlaps socket 0 EGM carve-out"),
        "{e}"
    );
    // Two carve-outs on top of each other.
    let e = refused(&format!(
        "{EGM}base = \"0x8000000000\"\n[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"1G\"\nbase = \"0x8000000000\""
    ));
    assert!(
        e.contains("socket 0 EGM carve-out") && e.contains("overlaps socket 1 EGM carve-out"),
        "{e}"
    );
    // A carve-out inside the PCIe 64-bit window.
    let e = refused(&format!("{EGM}base = \"0xC000000000\""));
    assert!(e.contains("PCIe 64-bit window"), "{e}");
}

#[test]
fn test_description_carve_out_not_1g_aligned_refused() {
    let e = refused(&format!("{EGM}base = \"0x8010000000\""));
    assert!(
        e.contains("socket 0 EGM carve-out base 0x8010000000"),
        "{e}"
    );
    assert!(e.contains("multiples of 1G"), "{e}");
    let e = refused("[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"1536M\"");
    assert!(
        e.contains("size 1536M") && e.contains("multiples of 1G"),
        "{e}"
    );
}

#[test]
fn test_description_zero_sizes_refused() {
    assert!(refused("[[socket]]\nram = 0").contains("socket 0 ram = 0"));
    assert!(refused("[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = 0")
        .contains("socket 0 egm size = 0"));
    assert!(refused("[[gpu]]\nmem_size = \"0\"").contains("gpu 0 mem_size = 0"));
}

#[test]
fn test_description_beyond_host_ipa_limit_refused() {
    // validate_ipa is what the VMM calls with KVM's limit.
    let p = Platform::from_toml(&format!("{EGM}base = \"0x40000000000\""), "t")
        .unwrap()
        .resolve()
        .unwrap();
    assert_eq!(p.required_ipa_bits(), 43);
    p.validate_ipa(48).unwrap();
    let e = p.validate_ipa(40).unwrap_err();
    assert!(
        e.contains("needs 43-bit") && e.contains("supports 40 bits"),
        "{e}"
    );
    assert!(
        e.contains("socket 0 EGM carve-out 0x40000000000..0x40040000000"),
        "{e}"
    );
    // Beyond what any KVM offers is refused outright.
    let e =
        refused("[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"2G\"\nbase = \"0xFFFFC0000000\"");
    assert!(e.contains("48-bit"), "{e}");
}

#[test]
fn test_description_duplicate_pxm_refused() {
    let e = refused("[[socket]]\nram = \"1G\"\n[[socket]]\nram = \"1G\"\npxm = 0");
    assert!(
        e.contains("pxm 0 is given to both socket 0 and socket 1"),
        "{e}"
    );
    let e = refused(&format!("{EGM}pxm = 8\n[[gpu]]\nmem_size = \"1G\""));
    assert!(
        e.contains("pxm 8") && e.contains("EGM carve-out and gpu 0"),
        "{e}"
    );
}

#[test]
fn test_description_more_retired_pages_than_the_table_holds_refused() {
    let pages: Vec<String> = (0..4097u64)
        .map(|i| format!("\"{:#x}\"", 0x80_0000_0000u64 + i * 4096))
        .collect();
    let e = refused(&format!("{EGM}retired_pages = [{}]", pages.join(", ")));
    assert!(
        e.contains("4097 entries") && e.contains("at most 4096"),
        "{e}"
    );
}

#[test]
fn test_description_retired_page_outside_its_carve_out_refused() {
    let e = refused(&format!(
        "{EGM}retired_pages = [\"0x8000001000\", \"0x40001000\"]"
    ));
    assert!(
        e.contains(
            "retired_pages[1] = 0x40001000: outside the carve-out 0x8000000000..0x8040000000"
        ),
        "{e}"
    );
}

#[test]
fn test_description_unknown_keys_refused() {
    for (toml, key) in [
        ("cpus = 2", "cpus"),
        ("[[socket]]\nram = \"1G\"\nmemory = 1", "memory"),
        (&format!("{EGM}address = 0"), "address"),
        ("[[gpu]]\nmem_size = \"1G\"\nmem = 1", "mem"),
        (
            "[[gpu]]\nmem_size = \"1G\"\nreadiness = { delay = 5 }",
            "readiness",
        ),
    ] {
        let e = refused(toml);
        assert!(e.contains(key), "{toml}: {e}");
    }
}

#[test]
fn test_description_invalid_platform_builds_nothing() {
    let mut p = Platform::default();
    p.sockets[0].egm.as_mut().unwrap().size = firmware::Size(0);
    // Firmware is built only from a resolved platform, and this one does not resolve.
    let e = p.resolve().unwrap_err();
    assert!(e.contains("egm size = 0"), "{e}");
}
