//! Project tasks: `cargo xtask <setup|build|run|test|demo|bench|fuzz|soak>`.
//!
//! Each task does its own set-up first (`setup` is idempotent and fast once done), so the two
//! commands in the README work on a fresh machine.
#![allow(
    clippy::let_underscore_must_use,
    reason = "clean-up of processes, sockets and files that may be gone already, and calls made only to show they do not panic: their results are ignored on purpose"
)]

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod fuzz;
mod soak;
mod vm;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need: rust-src, bpf-linker, Postgres, PgBouncer,
    /// libbpf-tools, bpftool, Prometheus, Python's psycopg2 (needs root for apt).
    Setup,
    /// Build the daemon (release), with the kernel programs embedded.
    Build,
    /// Set up, build and run the daemon with its defaults (needs root). Arguments after
    /// `--` go to `tracer run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Replay the PgBouncer incident live (a leaky worker starves a backend) with the
    /// tracer's events on stdout, then clean up (needs root).
    Demo,
    /// Set up, then run the whole suite: fmt, clippy, unit tests, the root tests against
    /// the real kernel, Postgres and peers (root required: a skipped root test fails), and
    /// the VM tier on Debian's 6.1 and 6.12 kernels (`vm-test`).
    Test {
        /// Only the checks and tests that need no root.
        #[arg(long)]
        no_root: bool,
        /// Only root tests whose name contains this (the VM tier is skipped).
        #[arg(long)]
        filter: Option<String>,
        /// Skip the VM tier.
        #[arg(long)]
        no_vm: bool,
    },
    /// Boot Debian kernels in qemu over this machine's root filesystem and run the root
    /// tests that prove each one (needs root): every probe loading, the foundation, Unix
    /// sockets, connections open before start-up, the incident replay, and one test per
    /// later feature (pooler links, leaks older than the daemon, the live table and `top`,
    /// redaction). `TRACER_VM_TESTS=a,b` picks tests.
    VmTest {
        /// Debian kernel package (or part of its name), repeatable; default: every kernel
        /// of the tier (6.1 and 6.12).
        #[arg(long)]
        kernel: Vec<String>,
    },
    /// Set up, build (release) and run the benchmark as root: the eight figures of
    /// docs/performance.md. Arguments after `--` go to the bench binary (`--help`).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every fuzz target (`fuzz/`) for N seconds each; installs cargo-fuzz if missing.
    Fuzz {
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Run the daemon under churn, idle pools and leaks for N minutes; check its memory and
    /// that its tracked connections match the kernel's (needs root).
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
}

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd
        .current_dir(root_dir())
        .status()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// A TCP port free on 127.0.0.1 right now.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|ids| ids.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

fn setup() -> Result<()> {
    run(Command::new("bash").arg(root_dir().join("xtask/scripts/setup.sh")))
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Fuzz { seconds } => fuzz::fuzz(seconds),
        Task::Soak { minutes } => soak::soak(minutes),
        Task::Build => {
            setup()?;
            run(cargo().args(["build", "--release", "--package", "tracer"]))
        }
        Task::Run { args } => {
            if !is_root() {
                bail!("`cargo xtask run` starts the daemon, which needs root");
            }
            setup()?;
            run(cargo().args(["build", "--release", "--package", "tracer"]))?;
            let mut cmd = Command::new(root_dir().join("target/release/tracer"));
            cmd.arg("run").args(args);
            run(&mut cmd)
        }
        Task::Demo => {
            if !is_root() {
                bail!("`cargo xtask demo` loads eBPF programs and runs Postgres: it needs root");
            }
            setup()?;
            run(cargo().args(["build", "--release", "--package", "tracer"]))?;
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root_dir().join("target"));
            demo::demo(&target.join("release/tracer"))
        }
        Task::Bench { args } => bench::bench(args),
        Task::VmTest { kernel } => {
            if !is_root() {
                bail!("`cargo xtask vm-test` boots kernels and loads eBPF programs: it needs root");
            }
            setup()?;
            vm::vm_test(&kernel)
        }
        Task::Test {
            no_root,
            filter,
            no_vm,
        } => {
            if !no_root && !is_root() {
                bail!("the root tests need root: run as root, or pass --no-root for the rest");
            }
            setup()?;
            run(cargo().args(["fmt", "--all", "--check"]))?;
            // The fuzz crate is not a workspace member (it needs its own profile).
            run(cargo()
                .args(["fmt", "--check", "--manifest-path"])
                .arg(root_dir().join("fuzz/Cargo.toml")))?;
            run(cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "tracer-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            run(cargo().args([
                "test",
                "--workspace",
                "--exclude",
                "tracer-ebpf",
                "--exclude",
                "tests",
            ]))?;
            if no_root {
                return Ok(());
            }
            run(cargo().args(["build", "--package", "tracer"]))?;
            let mut cmd = cargo();
            cmd.args([
                "test",
                "--package",
                "tests",
                "--",
                "--test-threads=1",
                "--nocapture",
            ])
            .env("TRACER_BIN", root_dir().join("target/debug/tracer"))
            // A root test that cannot run fails instead of skipping.
            .env("TRACER_REQUIRE_ROOT_TESTS", "1");
            let whole_suite = filter.is_none();
            if let Some(filter) = filter {
                cmd.arg(filter);
            }
            run(&mut cmd)?;
            if whole_suite && !no_vm {
                vm::vm_test(&[])?;
            }
            Ok(())
        }
    }
}
