//! `cargo xtask vm-test`: the root tests that prove the tracer on other kernels, run inside
//! Debian's own kernels booted with qemu (virtme-ng) over this machine's root filesystem.
//!
//! Each kernel package is downloaded from Debian's archive and unpacked under
//! `target/vm/kernels/` (inside the workspace: the guest sees the host's files read-only,
//! but hides `/var/cache` and `/lib/modules` behind its own mounts, and virtme-ng links the
//! guest's `/lib/modules/<release>` to the unpacked modules, so `inet_diag` & co. load on
//! demand as on a real host). The guest runs the test binaries built here, by exact name,
//! and reports their exit status on its console. KVM guests hang on these machines (see
//! ../shared/ENVIRONMENT.md), so the guest runs under TCG: several times slower, which the
//! tests' timeouts allow for.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, root_dir, run};

/// A kernel the VM tier boots.
pub(crate) struct Kernel {
    /// Debian package; a newer ABI of the same series is taken when this one has left the
    /// archive.
    pub package: &'static str,
    /// Hook sets this kernel must load, the one it gets by default first.
    pub expect_hooks: &'static str,
    /// Root tests run again with the second hook set forced, so that both sets are proven
    /// end to end where the kernel has both.
    pub forced_second_set: &'static [(&'static str, &'static str)],
}

/// Debian 12's kernels: 6.1 (also Amazon Linux 2023's series) has no I/O tracepoints and
/// gets the trampolines; 6.12 has both sets and gets the tracepoints.
pub(crate) const KERNELS: &[Kernel] = &[
    Kernel {
        package: "linux-image-6.1.0-50-amd64-unsigned",
        expect_hooks: "trampolines",
        forced_second_set: &[],
    },
    Kernel {
        package: "linux-image-6.12.107+deb12-amd64-unsigned",
        expect_hooks: "tracepoints trampolines",
        forced_second_set: &[(
            "foundation",
            "psql_over_tcp_gives_one_pair_per_role_with_the_right_owners",
        )],
    },
];

/// (test file, test name): what every kernel gets. The foundation (owners, bytes against
/// tcplife, a clean detach), Unix sockets, connections that existed before start-up, the
/// incident replay, `tracer check` loading every program the kernel can run, and one test
/// per later feature that reads what the kernel sees: pooler links, leaks older than the
/// daemon and across restarts, the live table and `tracer top`, redacted command lines.
pub(crate) const TESTS: &[(&str, &str)] = &[
    ("operations", "check_passes_as_root_and_loads_every_probe"),
    (
        "foundation",
        "psql_over_tcp_gives_one_pair_per_role_with_the_right_owners",
    ),
    ("foundation", "lifetimes_bytes_and_pids_agree_with_tcplife"),
    (
        "attribution",
        "psql_over_the_unix_socket_is_seen_on_both_roles",
    ),
    (
        "attribution",
        "connections_open_before_start_are_found_once_with_their_owners",
    ),
    (
        "detection",
        "incident_replay_names_the_leaker_the_starved_and_the_abandoned",
    ),
    (
        "foundation",
        "sigterm_under_load_exits_zero_quickly_and_detaches_everything",
    ),
    (
        "pooler",
        "transaction_pooling_names_the_client_behind_every_server_connection",
    ),
    (
        "seeding",
        "idle_in_transaction_before_start_up_is_flagged_on_both_ends_tcp_and_unix",
    ),
    (
        "seeding",
        "through_pgbouncer_the_backend_and_pgbouncers_end_are_flagged_the_app_end_stays_unknown",
    ),
    (
        "seeding",
        "a_leak_survives_sigterm_and_kill_9_and_a_connection_closed_meanwhile_is_not_open",
    ),
    (
        "live",
        "the_live_table_list_and_top_show_transaction_states",
    ),
    (
        "redaction",
        "no_credential_of_a_real_command_line_leaves_the_tracer",
    ),
];

const VIRTME_NG: &str = "virtme-ng==1.42";
const MARKER: &str = "TRACER-VM-RESULT";

fn vm_dir() -> PathBuf {
    root_dir().join("target/vm")
}

/// qemu, virtme-ng (in a venv under target/vm), kmod and a static busybox for its init.
fn setup_vm_tools() -> Result<PathBuf> {
    let venv = vm_dir().join("venv");
    let vng = venv.join("bin/vng");
    if !vng.exists() {
        fs::create_dir_all(vm_dir())?;
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(venv.join("bin/pip")).args(["install", "-q", VIRTME_NG]))?;
    }
    Ok(vng)
}

/// The newest package of the same series when `package` itself is gone from the archive
/// (Debian replaces `6.1.0-N` by `6.1.0-(N+1)` on updates).
fn available_package(package: &str) -> Result<String> {
    let known = Command::new("apt-cache").args(["show", package]).output()?;
    if known.status.success() && !known.stdout.is_empty() {
        return Ok(package.to_owned());
    }
    // linux-image-6.1.0-50-amd64-unsigned -> prefix "linux-image-6.1.0-", suffix "-amd64-unsigned"
    let (prefix, suffix) = match package.rsplit_once("-amd64") {
        Some((head, _)) => (
            head.rsplit_once('-').map_or(head, |(series, _)| series),
            "-amd64-unsigned",
        ),
        None => bail!("cannot derive a kernel series from {package}"),
    };
    let names = Command::new("apt-cache")
        .args(["pkgnames", prefix])
        .output()?;
    let mut candidates: Vec<String> = String::from_utf8_lossy(&names.stdout)
        .lines()
        .filter(|n| n.ends_with(suffix) && !n.contains("-rt-") && !n.contains("-cloud-"))
        .map(str::to_owned)
        .collect();
    candidates.sort_by_key(|n| {
        n.trim_start_matches(prefix)
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|abi| abi.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop().with_context(|| {
        format!("neither {package} nor another {prefix}*{suffix} is in the archive")
    })
}

/// Downloads and unpacks the kernel package; returns (vmlinuz, release).
fn fetch_kernel(package: &str) -> Result<(PathBuf, String)> {
    let dir = vm_dir().join("kernels").join(package);
    let boot = dir.join("boot");
    if !boot.exists() {
        let package = available_package(package)?;
        let download = vm_dir().join("downloads");
        fs::create_dir_all(&download)?;
        // Not `run`: it runs everything from the workspace root, and apt-get downloads into
        // its current directory.
        let status = Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&download)
            .status()
            .context("spawning apt-get download")?;
        if !status.success() {
            bail!("apt-get download {package} failed: {status}");
        }
        let deb = fs::read_dir(&download)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")))
            })
            .with_context(|| format!("{package}: no .deb after apt-get download"))?;
        fs::create_dir_all(&dir)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
        fs::remove_file(&deb)?;
    }
    let vmlinuz = fs::read_dir(&boot)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {}", boot.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("vmlinuz name")?
        .to_owned();
    Ok((vmlinuz, release))
}

/// Builds the daemon and the root tests; returns test file name -> test binary.
fn build_tests() -> Result<Vec<(String, PathBuf)>> {
    // The daemon in its release build: the guest's emulated CPU is slow enough.
    run(cargo().args(["build", "--release", "--package", "tracer"]))?;
    let out = cargo()
        .args([
            "test",
            "--package",
            "tests",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(root_dir())
        .output()
        .context("building the root tests")?;
    if !out.status.success() {
        bail!(
            "building the root tests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["reason"] == "compiler-artifact"
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(exe)) = (
            is_test,
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
        ) {
            binaries.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    Ok(binaries)
}

/// The script the guest runs: every test by exact name, then one result line.
fn guest_script(kernel: &Kernel, binaries: &[(String, PathBuf)]) -> Result<String> {
    let tracer = root_dir().join("target/release/tracer");
    let mut script = format!(
        "#!/bin/bash\n\
         # Written by `cargo xtask vm-test`; runs inside the guest.\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export HOME=/root TRACER_BIN={} TRACER_REQUIRE_ROOT_TESTS=1 \
         TRACER_EXPECT_HOOKS='{}' TRACER_VM=1\n\
         ip link set lo up 2>/dev/null\n\
         cd {}\n\
         echo \"guest kernel $(uname -r)\"\n\
         failed=0\n",
        tracer.display(),
        kernel.expect_hooks,
        root_dir().join("tests").display(),
    );
    let second = kernel.expect_hooks.split_whitespace().nth(1);
    // `TRACER_VM_TESTS=part[,part...]` runs only the tests whose `file::name` contains one
    // of the parts (for a rerun).
    let only = std::env::var("TRACER_VM_TESTS").unwrap_or_default();
    let only: Vec<&str> = only.split(',').filter(|p| !p.is_empty()).collect();
    let runs = TESTS
        .iter()
        .map(|t| (t, None))
        .chain(kernel.forced_second_set.iter().map(|t| (t, second)))
        .filter(|((file, test), _)| {
            let name = format!("{file}::{test}");
            only.is_empty() || only.iter().any(|part| name.contains(part))
        });
    for ((file, test), forced) in runs {
        let binary = binaries
            .iter()
            .find(|(name, _)| name == file)
            .map(|(_, b)| b)
            .with_context(|| format!("no test binary for {file}"))?;
        let env = forced.map_or(String::new(), |set| format!("TRACER_HOOKS={set} "));
        script.push_str(&format!(
            "echo \"=== {env}{file}::{test}\"; start=$SECONDS\n\
             if {env}{} --exact {test} --test-threads=1 --nocapture; then \
             echo \"=== ok $((SECONDS-start))s {env}{file}::{test}\"; \
             else failed=$((failed+1)); echo \"=== FAILED {env}{file}::{test}\"; fi\n",
            binary.display()
        ));
    }
    script.push_str(&format!("echo \"{MARKER}=$failed\"\n"));
    Ok(script)
}

pub(crate) fn vm_test(kernels: &[String]) -> Result<()> {
    let vng = setup_vm_tools()?;
    let selected: Vec<&Kernel> = if kernels.is_empty() {
        KERNELS.iter().collect()
    } else {
        kernels
            .iter()
            .map(|name| {
                KERNELS
                    .iter()
                    .find(|k| k.package == name || k.package.contains(name.as_str()))
                    .with_context(|| {
                        let known: Vec<_> = KERNELS.iter().map(|k| k.package).collect();
                        format!("unknown kernel {name}: one of {}", known.join(", "))
                    })
            })
            .collect::<Result<_>>()?
    };
    let binaries = build_tests()?;
    let mut failures = Vec::new();
    for kernel in selected {
        let (vmlinuz, release) = fetch_kernel(kernel.package)?;
        let script_path = vm_dir().join(format!("guest-{release}.sh"));
        fs::write(&script_path, guest_script(kernel, &binaries)?)?;
        let log_path = vm_dir().join(format!("guest-{release}.log"));
        eprintln!(
            "xtask: booting {release} under qemu (TCG); console in {}",
            log_path.display()
        );
        let started = Instant::now();
        let result = boot(&vng, &vmlinuz, &script_path, &log_path);
        let seconds = started.elapsed().as_secs();
        match result {
            Ok(0) => eprintln!("xtask: vm-test {release}: all tests passed in {seconds} s"),
            Ok(n) => {
                eprintln!("xtask: vm-test {release}: {n} test(s) failed ({seconds} s)");
                failures.push(release);
            }
            Err(e) => {
                eprintln!("xtask: vm-test {release}: {e:#} ({seconds} s)");
                failures.push(release);
            }
        }
    }
    if !failures.is_empty() {
        bail!("vm-test failed on {}", failures.join(", "));
    }
    Ok(())
}

/// Boots the kernel with the script as its only job; returns the number of failed tests.
fn boot(vng: &Path, vmlinuz: &Path, script: &Path, log: &Path) -> Result<u32> {
    let log_file = fs::File::create(log)?;
    let status = Command::new(vng)
        .arg("-r")
        .arg(vmlinuz)
        .args([
            "--disable-kvm",
            "--memory",
            "3G",
            "--cpus",
            "2",
            "--verbose",
        ])
        .arg("--exec")
        .arg(format!("bash {}", script.display()))
        // vng runs its helpers (virtme-run) from PATH.
        .env(
            "PATH",
            format!(
                "{}:{}",
                vng.parent().expect("venv bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .context("starting vng")?;
    let console = fs::read_to_string(log).unwrap_or_default();
    // The guest's own lines (the kernel's start with `[`), for CI's log.
    for line in console
        .lines()
        .filter(|l| l.starts_with("=== ") || l.starts_with("guest "))
    {
        eprintln!("xtask:   {line}");
    }
    let result = console
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{MARKER}=")))
        .and_then(|n| n.trim().parse::<u32>().ok());
    match result {
        Some(failed) => {
            if failed > 0 {
                print_failures(&console);
            }
            Ok(failed)
        }
        None => {
            let tail: Vec<&str> = console.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the guest never reported a result (vng: {status}); last console lines:\n{}",
                tail.join("\n")
            )
        }
    }
}

/// The console output of each failed test, for CI's log.
fn print_failures(console: &str) {
    let mut current: Vec<&str> = Vec::new();
    for line in console.lines() {
        if line.starts_with("=== FAILED") {
            eprintln!("{}\n{line}", current.join("\n"));
            current.clear();
        } else if line.starts_with("=== ") {
            current.clear();
            current.push(line);
        } else {
            current.push(line);
        }
    }
}
