//! `cargo xtask fuzz [--seconds N]`: runs every cargo-fuzz target in `fuzz/` for N seconds.
//!
//! cargo-fuzz needs nightly compiler flags (`-Zsanitizer`). `RUSTC_BOOTSTRAP=1` lets the
//! pinned stable compiler accept them, so the same toolchain builds, tests and fuzzes, on a
//! developer's machine and in CI alike, without installing nightly.
//!
//! The first run builds the kernel programs too (the `tracer` crate's build script), which
//! takes a few minutes; the build is cached in `fuzz/target` afterwards.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cargo, root_dir, run};

/// The targets in `fuzz/fuzz_targets/`.
pub(crate) const TARGETS: [&str; 3] = ["decode", "protocol", "cmdline"];

fn has_cargo_fuzz() -> bool {
    cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `cargo fuzz ...` on the current toolchain, with the unstable flags allowed.
fn cargo_fuzz() -> Command {
    let mut cmd = cargo();
    cmd.arg("fuzz").env("RUSTC_BOOTSTRAP", "1");
    // The fuzz crate is not a workspace member: it builds in its own target directory.
    cmd.env_remove("CARGO_TARGET_DIR");
    cmd
}

pub(crate) fn fuzz(seconds: u64) -> Result<()> {
    if !has_cargo_fuzz() {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))
            .context("installing cargo-fuzz")?;
    }
    eprintln!("xtask fuzz: {seconds} s per target (RUSTC_BOOTSTRAP=1 on this toolchain)");
    let corpus_root = root_dir().join("target/fuzz-corpus");
    let mut failed = Vec::new();
    for target in TARGETS {
        let corpus = corpus_root.join(target);
        std::fs::create_dir_all(&corpus)?;
        let mut cmd = cargo_fuzz();
        cmd.args(["run", target])
            .arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-print_final_stats=1",
            ])
            .current_dir(root_dir().join("fuzz"));
        eprintln!("xtask: {cmd:?}");
        let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
        if !status.success() {
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets failed: {failed:?} (crash inputs are in fuzz/artifacts/)");
    }
    Ok(())
}
