//! Command lines from arbitrary bytes (argv split at NUL, as `/proc/<pid>/cmdline` holds
//! it): redaction never panics, `off` emits nothing, and a password appended after any
//! junk, in each form the rules know, never comes out under `redacted`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_core::redact::{CmdlineMode, cmdline};

const MARK: &str = "Zq9Mark";

fuzz_target!(|data: &[u8]| {
    let args: Vec<String> = data
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    for mode in [CmdlineMode::Full, CmdlineMode::Redacted] {
        let _ = cmdline(&args, mode);
    }
    assert_eq!(cmdline(&args, CmdlineMode::Off), None);
    if args.is_empty() || data.windows(MARK.len()).any(|w| w == MARK.as_bytes()) {
        return;
    }
    let forms: [&[String]; 5] = [
        &["--db-password".into(), MARK.into()],
        &[format!("--db-password={MARK}")],
        &[format!("PGPASSWORD={MARK}")],
        &[format!("postgresql://u:{MARK}@h/db")],
        &[format!("host=h password={MARK} dbname=d")],
    ];
    for form in forms {
        let mut all = args.clone();
        all.extend(form.iter().cloned());
        let shown = cmdline(&all, CmdlineMode::Redacted).unwrap_or_default();
        assert!(!shown.contains(MARK), "{all:?} -> {shown}");
    }
});
