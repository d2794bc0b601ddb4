//! `tracer check`: can `tracer run` work on this host? One line per check, `ok` or what is
//! missing and what to do; the probes are really loaded and attached, then removed.

use std::path::Path;

use crate::{host::sockdiag, kernel::btf::VMLINUX_BTF, kernel::privileges, kernel::probes::Probes};

pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_default()
}

/// (major, minor) of a release string like "6.18.44-fc".
pub fn version_of(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The oldest kernel with everything the probes use (BTF tracepoints with socket cookies,
/// `bpf_task_pt_regs`, ring buffers).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

pub fn run_checks() -> Vec<Check> {
    let release = kernel_release();
    let mut checks = vec![kernel(&release), btf(), tracefs(), capabilities()];
    checks.extend(hooks_and_probes());
    checks.push(sock_diag(&release));
    checks.push(process_titles());
    checks
}

fn kernel(release: &str) -> Check {
    let ok = version_of(release).is_some_and(|v| v >= MIN_KERNEL);
    Check {
        name: "kernel",
        ok,
        detail: if ok {
            release.to_owned()
        } else {
            format!(
                "{release}: needs Linux {}.{} or newer",
                MIN_KERNEL.0, MIN_KERNEL.1
            )
        },
    }
}

fn btf() -> Check {
    let btf = Probes::kernel_offsets();
    Check {
        name: "btf",
        ok: btf.is_ok(),
        detail: match &btf {
            Ok(_) => format!("{VMLINUX_BTF} readable, structure offsets resolved"),
            Err(e) => format!("{e:#}: the kernel needs CONFIG_DEBUG_INFO_BTF=y"),
        },
    }
}

fn tracefs() -> Check {
    let mounted = Path::new("/sys/kernel/tracing/events").exists();
    Check {
        name: "tracefs",
        ok: true,
        detail: if mounted {
            "mounted (not required: the probes attach through BTF)".into()
        } else {
            "not mounted; not required: the probes attach through BTF".into()
        },
    }
}

fn capabilities() -> Check {
    let missing = privileges::missing(privileges::effective());
    Check {
        name: "capabilities",
        ok: missing.is_empty(),
        detail: if missing.is_empty() {
            "all present".into()
        } else {
            format!(
                "missing {}: run as root or grant them (see deploy/README.md)",
                missing.join(", ")
            )
        },
    }
}

/// The hook set this kernel gets, then one line per probe: does it load and attach.
fn hooks_and_probes() -> Vec<Check> {
    let mut checks = vec![match Probes::hook_set() {
        Ok((set, why)) => Check {
            name: "hooks",
            ok: true,
            detail: format!("{}: {why}", set.name()),
        },
        Err(e) => Check {
            name: "hooks",
            ok: false,
            detail: one_line(&format!("{e:#}")),
        },
    }];
    match Probes::check_each() {
        Ok(results) => checks.extend(results.into_iter().map(|(hook, result)| Check {
            name: "probe",
            ok: result.is_ok(),
            detail: match result {
                Ok(()) => format!("{hook} loads and attaches"),
                Err(e) => format!("{hook}: {}", one_line(&format!("{e:#}"))),
            },
        })),
        Err(e) => checks.push(Check {
            name: "probe",
            ok: false,
            detail: one_line(&format!("{e:#}")),
        }),
    }
    checks
}

fn sock_diag(release: &str) -> Check {
    let diag = sockdiag::tcp_sockets().and_then(|_| sockdiag::unix_sockets());
    Check {
        name: "sock_diag",
        ok: diag.is_ok(),
        detail: match diag {
            Ok(_) => "existing TCP and Unix sockets can be listed".into(),
            Err(sockdiag::DiagError::Kernel {
                errno: libc::ENOENT,
            }) => format!(
                "the kernel has no sock_diag handler for TCP or Unix sockets and could not load \
                 one: load the inet_diag, tcp_diag and unix_diag modules (modprobe; the kernel \
                 loads them itself when /lib/modules/{release} and modprobe are present); \
                 needed to find connections opened before start-up"
            ),
            Err(e) => format!("{e}: needed to find connections opened before start-up"),
        },
    }
}

/// Whether Postgres's process titles can seed the state of connections found at start-up.
fn process_titles() -> Check {
    let (ok, detail) = crate::host::proc_title::check_line(Path::new("/proc"));
    Check {
        name: "process_title",
        ok,
        detail,
    }
}

/// Collapses a multi-line error (a verifier log) into one line.
pub fn one_line(text: &str) -> String {
    let first = text.lines().next().unwrap_or_default();
    if text.lines().count() > 1 {
        format!("{first} (…)")
    } else {
        first.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_versions() {
        assert_eq!(version_of("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(version_of("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(version_of("garbage"), None);
        assert!(version_of("5.4.0").unwrap() < MIN_KERNEL);
    }

    #[test]
    fn one_line_keeps_the_first_line() {
        assert_eq!(one_line("a\nb\nc"), "a (…)");
        assert_eq!(one_line("single"), "single");
    }
}
