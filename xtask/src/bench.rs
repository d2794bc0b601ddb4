//! `cargo xtask bench`: set up, build the daemon and the `bench` crate in release mode, and
//! run the benchmark as root. It prints the eight figures of docs/performance.md, each with
//! the command that made it, in under 10 minutes on the project's 2-core machines.

use std::{path::PathBuf, process::Command};

use anyhow::{Result, bail};

use crate::{cargo, is_root, root_dir, run, setup};

/// Where cargo puts release binaries (honours `CARGO_TARGET_DIR`).
fn release_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                root_dir().join(p)
            }
        })
        .unwrap_or_else(|| root_dir().join("target"));
    target.join("release")
}

pub(crate) fn bench(args: Vec<String>) -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask bench` attaches BPF programs and runs Postgres: run it as root");
    }
    setup()?;
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "tracer",
        "--package",
        "bench",
    ]))?;
    let dir = release_dir();
    let mut cmd = Command::new(dir.join("bench"));
    cmd.arg("--tracer").arg(dir.join("tracer")).args(args);
    run(&mut cmd)
}
