use super::*;

/// The default platform's GPU as the VMM writes it.
const GB200: &str = "bdf=0000:00:01.0;id=10de:2941;style=blackwell;readiness=ready;\
    mem=0xd000000000+0x40000000;props=gpu-mem-base-pa:0xd000000000,gpu-mem-size:0x40000000,\
    egm-pxm:0x4,egm-base-pa:0x8000000000,egm-size:0x40000000,\
    egm-retired-pages-data-base:0x40100000";

fn sample(mode: Mode) -> Env {
    Env {
        mode,
        tests: vec!["egm_*".into(), "kernel_log_boot".into()],
        modules: Some(ModuleLoad {
            release: "7.3.4".into(),
            modprobe: vec!["nvgrace-egm".into(), "nvgrace-gpu-vfio-pci".into()],
        }),
        testdev: 0x901_0000,
        cpus: 3,
        system_ram: 1 << 30,
        boot_mode: BootMode::Dt,
        numa_nodes: "0-1,6-7".into(),
        carveouts: vec![Carveout {
            pxm: 4,
            base: 0x80_0000_0000,
            size: 0x4000_0000,
            seed: 0x4752_4143_4500_0004,
        }],
        retired_pages: vec![
            RetiredTable {
                pxm: 4,
                table: 0x4010_0000,
                pages: vec![0x80_0000_1000, 0x80_0000_3000],
            },
            RetiredTable {
                pxm: 5,
                table: 0x4020_0000,
                pages: vec![],
            },
        ],
        table_room: vec![TableRoom {
            pxm: 4,
            bytes: 4096,
        }],
        gpus: Gpu::parse_list(&format!(
            "{GB200} bdf=0000:00:02.0;id=10de:2342;style=hopper;readiness=delay:1500;\
             mem=0xe000000000+0x80000000;props="
        ))
        .unwrap(),
    }
}

#[test]
fn test_env_write_then_read_round_trips_every_mode() {
    for mode in [
        Mode::Shell,
        Mode::Run("echo 'hi there'\ncat /proc/cpuinfo | head -3 \"$x\"".into()),
        Mode::Test(TestRequest::default()),
        Mode::Test(TestRequest {
            expect: vec!["egm".into()],
            why: "the tree carries drivers/vfio/pci/nvgrace-gpu/egm.c (it's there)".into(),
            tests: vec!["egm_*".into(), "gpu_bind".into()],
        }),
    ] {
        let env = sample(mode);
        let text = env.write();
        let vars = Vars::parse(&text);
        assert!(vars.warnings.is_empty(), "{:?}", vars.warnings);
        assert_eq!(Env::read(&vars), Ok(env), "{text}");
    }
}

#[test]
fn test_env_write_layout_quotes_lists_and_derives_power_off() {
    let mut env = sample(Mode::Run("echo 'hi'".into()));
    env.modules = None;
    env.tests.clear();
    let text = env.write();
    assert!(text.starts_with("GRACEVM_MODE=run\nGRACEVM_CMD='echo '\\''hi'\\'''\n"));
    assert!(text.contains("GRACEVM_BOOT_TIMER=0x9010000\nGRACEVM_TESTDEV=0x9010000\n"));
    assert!(
        text.contains("GRACEVM_POWER_OFF='0x9010030 0x2166666f'\n"),
        "{text}"
    );
    assert!(text.contains("GRACEVM_CARVEOUTS='4:0x8000000000:0x40000000:0x4752414345000004'\n"));
    assert!(text.contains(
        "GRACEVM_EGM_RETIRED_PAGES='4:0x40100000:0x8000001000,0x8000003000 5:0x40200000:'\n"
    ));
    assert!(text.contains("GRACEVM_EGM_TABLE_ROOM='4:4096'\n"));
    assert!(text.contains(&format!("GRACEVM_GPUS='{GB200} bdf=0000:00:02.0;")));
    assert!(!text.contains("GRACEVM_TESTS") && !text.contains("GRACEVM_MODPROBE"));
}

#[test]
fn test_parse_plain_and_quoted_values_strips_one_level() {
    let vars = Vars::parse(
        "GRACEVM_MODE=test\nGRACEVM_CPUS='4'\n\
         GRACEVM_CMD='echo hi; cat /proc/cpuinfo | head -3'\n",
    );
    assert_eq!(vars.get("GRACEVM_MODE"), Some("test"));
    assert_eq!(vars.get("GRACEVM_CPUS"), Some("4"));
    assert_eq!(
        vars.get("GRACEVM_CMD"),
        Some("echo hi; cat /proc/cpuinfo | head -3")
    );
    assert!(vars.warnings.is_empty());
}

#[test]
fn test_parse_shell_quoting_decodes() {
    let vars = Vars::parse("C='echo '\\''hi there'\\'''\nA=\"x \\\"y\\\" \\$z \\n\"\nB=a\\ b\n");
    assert_eq!(vars.get("C"), Some("echo 'hi there'"));
    assert_eq!(vars.get("A"), Some("x \"y\" $z \\n"));
    assert_eq!(vars.get("B"), Some("a b"));
    for s in ["", "it's", "a\nb", "'''", "\\", "$x \"y\""] {
        let vars = Vars::parse(&format!("K={}\n", shell_quote(s)));
        assert_eq!(vars.get("K"), Some(s), "{s:?}");
    }
}

#[test]
fn test_parse_multiline_comments_export_crlf() {
    let vars = Vars::parse(
        "# made by gracevm\n\n  export GRACEVM_CPUS=2\r\nEMPTY=\nCMD='echo a\necho b'\nM=run\n",
    );
    assert_eq!(vars.get("GRACEVM_CPUS"), Some("2"));
    assert_eq!(vars.get("EMPTY"), Some(""));
    assert_eq!(vars.get("CMD"), Some("echo a\necho b"));
    assert_eq!(vars.get("M"), Some("run"));
    assert!(vars.warnings.is_empty());
}

#[test]
fn test_parse_malformed_lines_warn_and_skip_later_key_wins() {
    let vars = Vars::parse("garbage\n1BAD=x\nGOOD=1\nGOOD=2\nOPEN='never closed\n");
    assert_eq!(vars.get("GOOD"), Some("2"));
    assert_eq!(vars.get("OPEN"), None);
    assert_eq!(vars.warnings.len(), 3, "{:?}", vars.warnings);
    assert!(vars.warnings[0].starts_with("line 1:"));
    assert!(vars.warnings[1].starts_with("line 2:"));
    assert!(vars.warnings[2].starts_with("line 5:"));
}

#[test]
fn test_parse_carveouts_hex_decimal_and_malformed() {
    let carveouts = Carveout::parse_list(
        " 4:0x8000000000:0x40000000:0x6772616365000004\n5:0x9000000000:1073741824:7 ",
    )
    .unwrap();
    assert_eq!(carveouts.len(), 2);
    assert_eq!(carveouts[1].size, 1 << 30);
    assert_eq!(carveouts[0].end(), 0x80_4000_0000);
    assert_eq!(carveouts[0].pattern_word(0x10), 0x6772_6163_6500_0014);
    assert_eq!(
        carveouts[0].to_string(),
        "carve-out pxm 4 [0x8000000000-0x803fffffff]"
    );
    assert_eq!(Carveout::parse_list("  \n").unwrap(), vec![]);
    assert_eq!(
        Carveout::parse_list("4:0x0:0x8:0x0,5:0x8:0x8:0x1")
            .unwrap()
            .len(),
        2
    );
    assert!(Carveout::parse_list("a:1:8:0,b")
        .unwrap_err()
        .contains("pxm"));
    for bad in [
        "4:0x8000000000:0x40000000",
        "4:0x8000000000:0x40000000:0x1:9",
        "4:0x8000000000:0:0x1",
        "4:0x8000000004:0x40000000:0x1",
        "4:0x8000000000:0x40000004:0x1",
        "4:0xffffffffffffff00:0x200:0x1",
        "4:0x8000000000:0x40000000:0x677261636500000004",
        "0x100000000:0x0:0x8:0x0",
        "4:0x80zz:0x8:0x0",
    ] {
        assert!(Carveout::parse_list(bad).is_err(), "{bad}");
    }
}

#[test]
fn test_parse_retired_tables_and_room() {
    let tables = RetiredTable::parse_list("4:0x40100000: 5:0x1000:0x2000,0x3000").unwrap();
    assert_eq!(tables[0].pages, Vec::<u64>::new());
    assert_eq!(tables[1].pages, vec![0x2000, 0x3000]);
    for bad in ["4", "4:0x1", "x:0x1:", "4:zz:", "4:0x1:0x2,q"] {
        assert!(RetiredTable::parse_list(bad).is_err(), "{bad}");
    }
    let room = TableRoom::parse_list("4:4096 5:16").unwrap();
    assert_eq!((room[0].entries(), room[1].entries()), (511, 1));
    assert_eq!(TableRoom { pxm: 4, bytes: 0 }.entries(), 0);
    assert!(TableRoom::parse_list("4:0x10").is_err());
}

#[test]
fn test_parse_gpus_contract_example() {
    let g = Gpu::parse_list(GB200).unwrap().remove(0);
    assert_eq!(g.bdf, "0000:00:01.0");
    assert_eq!((g.vendor, g.device), (0x10de, 0x2941));
    assert_eq!((g.style, g.readiness), (Style::Blackwell, Readiness::Ready));
    assert_eq!((g.mem_base, g.mem_size), (0xd0_0000_0000, 0x4000_0000));
    assert_eq!(g.props.len(), 6);
    assert_eq!(g.prop("egm-retired-pages-data-base"), Some(0x4010_0000));
    assert_eq!(g.to_string(), "GPU 0000:00:01.0 (10de:2941, blackwell)");
    assert_eq!(g.entry(), GB200);
    assert!(g.backed(0xd0_3fff_fff8, 8) && !g.backed(0xd0_3fff_fff8, 16));
    assert!(!g.backed(0xcf_ffff_fff8, 8) && !g.backed(u64::MAX, 8));
    assert_eq!(Gpu::parse_list("  ").unwrap(), vec![]);
}

#[test]
fn test_gpu_props_set_and_remove_keep_order() {
    let mut g = Gpu::parse_list(GB200).unwrap().remove(0);
    g.set_prop("gpu-mem-size", 0);
    g.remove_prop("egm-pxm");
    g.set_prop("egm-pxm", 5);
    let names: Vec<&str> = g.props.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[1], "gpu-mem-size");
    assert_eq!(names.last(), Some(&"egm-pxm"));
    assert_eq!(
        (g.prop("gpu-mem-size"), g.prop("egm-pxm")),
        (Some(0), Some(5))
    );
}

#[test]
fn test_parse_gpus_malformed_entries_error() {
    for (from, to) in [
        ("bdf=0000:00:01.0", "bdf=00:01.0"),
        ("bdf=0000:00:01.0", "bdf=0000:00:21.0"),
        ("id=10de:2941", "id=10de"),
        ("style=blackwell", "style=ampere"),
        ("readiness=ready", "readiness=soon"),
        ("readiness=ready", "readiness=delay:x"),
        ("mem=0xd000000000+0x40000000", "mem=0xd000000000"),
        ("mem=0xd000000000+0x40000000", "mem=0xffffffffffffffff+0x2"),
        ("gpu-mem-size:0x40000000", "gpu-mem-size"),
        ("gpu-mem-size:0x40000000", "gpu-mem-size:big"),
        ("egm-pxm:0x4", "gpu-mem-size:0x4"),
        (";props=", ";bdf=0000:00:02.0;props="),
        (";props=", ";"),
        ("bdf=", "bdf"),
    ] {
        assert!(GB200.contains(from), "{from}");
        let entry = GB200.replacen(from, to, 1);
        assert!(Gpu::parse_list(&entry).is_err(), "{entry}");
    }
}

#[test]
fn test_is_bdf_shape() {
    assert!(is_bdf("0000:00:01.0") && is_bdf("0001:ff:1f.7"));
    for bad in [
        "",
        "0000:00:01",
        "0000:00:20.0",
        "0000:00:01.8",
        "000g:00:01.0",
        "éé00:00:01.0",
    ] {
        assert!(!is_bdf(bad), "{bad}");
    }
}

/// xorshift64*: reproducible pseudo-random bytes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Every parser on `text`: each may refuse it, none may panic.
fn parse_everything(text: &str) {
    let vars = Vars::parse(text);
    let _ = Env::read(&vars);
    for value in [text, vars.get(key::GPUS).unwrap_or_default()] {
        let _ = Carveout::parse_list(value);
        let _ = RetiredTable::parse_list(value);
        let _ = TableRoom::parse_list(value);
        let _ = Gpu::parse_list(value);
        let _ = Readiness::parse(value);
        let _ = Style::parse(value);
        let _ = BootMode::parse(value);
        let _ = parse_u64(value);
        let _ = is_bdf(value);
    }
}

#[test]
fn test_parsers_never_panic_on_arbitrary_bytes() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let alphabet = b"=':;,+.x0123456789abcdefABCDEF_\"\\\n\r #GRACEVM_GPUS bdf id props\xff\xc3";
    for _ in 0..3000 {
        let len = rng.below(200);
        let bytes: Vec<u8> = (0..len)
            .map(|_| match rng.below(4) {
                0 => rng.next() as u8,
                _ => alphabet[rng.below(alphabet.len())],
            })
            .collect();
        parse_everything(&String::from_utf8_lossy(&bytes));
    }
}

#[test]
fn test_parsers_never_panic_on_mutated_files() {
    let mut rng = Rng(42);
    let good = sample(Mode::Run("echo 'x'".into())).write().into_bytes();
    for _ in 0..3000 {
        let mut bytes = good.clone();
        for _ in 0..=rng.below(8) {
            let at = rng.below(bytes.len());
            match rng.below(3) {
                0 => bytes[at] = rng.next() as u8,
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.truncate(at),
            }
            if bytes.is_empty() {
                break;
            }
        }
        parse_everything(&String::from_utf8_lossy(&bytes));
    }
}
