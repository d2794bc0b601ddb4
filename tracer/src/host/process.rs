//! Who a process is: executable, command line, cgroup, and the container or systemd unit
//! its cgroup path names. The path parsing is pure; `/proc` is read at one place, under a
//! root that tests can point elsewhere.

use std::path::Path;

use serde::Serialize;

use crate::host::redact::{self, CmdlineMode};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Container {
    pub container_id: Option<String>,
    pub container_runtime: Option<&'static str>,
    pub pod_uid: Option<String>,
    pub systemd_unit: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessDetails {
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub cgroup: Option<String>,
    pub container: Container,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Reads a container, pod and systemd unit out of a cgroup path (v2, or v1's best path).
pub fn container_from_cgroup(path: &str) -> Container {
    let mut out = Container::default();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        let stem = part
            .strip_suffix(".scope")
            .or_else(|| part.strip_suffix(".slice"))
            .unwrap_or(part);
        // Runtime prefixes used by the systemd cgroup driver (and podman's cgroupfs one).
        for (prefix, runtime) in [
            ("docker-", "docker"),
            ("cri-containerd-", "containerd"),
            ("crio-", "cri-o"),
            ("libpod-", "podman"),
        ] {
            if let Some(id) = stem.strip_prefix(prefix)
                && is_container_id(id)
            {
                out.container_id = Some(id.to_owned());
                out.container_runtime = Some(runtime);
            }
        }
        // cgroupfs driver: the bare id under a runtime's or a pod's directory.
        if is_container_id(part) {
            out.container_id = Some((*part).to_owned());
            let parent = if i > 0 { parts[i - 1] } else { "" };
            out.container_runtime = match parent {
                "docker" => Some("docker"),
                "libpod_parent" => Some("podman"),
                _ if parent.starts_with("crio") => Some("cri-o"),
                _ => out.container_runtime,
            };
        }
        // Kubernetes pods: "pod<uid>" (cgroupfs) or "kubepods-<qos>-pod<uid_with_underscores>.slice".
        let in_kubepods = parts[..=i].iter().any(|p| p.starts_with("kubepods"));
        if in_kubepods
            && let Some(pos) = stem.rfind("pod")
            && stem.len() - (pos + 3) == 36
        {
            out.pod_uid = Some(stem[pos + 3..].replace('_', "-"));
        }
        if part.ends_with(".service") || (part.ends_with(".scope") && out.container_id.is_some()) {
            out.systemd_unit = Some((*part).to_owned());
        }
    }
    out
}

/// Picks the cgroup path from `/proc/<pid>/cgroup`: the v2 path when it says more than the
/// root, else the systemd (or first) v1 hierarchy's path.
pub fn cgroup_path(proc_cgroup: &str) -> Option<String> {
    let mut v2 = None;
    let mut v1_systemd = None;
    let mut v1_any = None;
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path);
        } else if controllers == "name=systemd" {
            v1_systemd = Some(path);
        } else if v1_any.is_none() {
            v1_any = Some(path);
        }
    }
    match v2 {
        Some(p) if p != "/" => Some(p.to_owned()),
        _ => v1_systemd.or(v1_any).or(v2).map(str::to_owned),
    }
}

/// Reads what `/proc` knows of `pid`, its command line as `cmdline` allows (see
/// [`crate::host::redact`]). A process that already exited yields `None` fields.
pub fn read_details(proc_root: &Path, pid: u32, cmdline: CmdlineMode) -> ProcessDetails {
    let dir = proc_root.join(pid.to_string());
    let exe = std::fs::read_link(dir.join("exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let cmdline = match cmdline {
        CmdlineMode::Off => None,
        mode => std::fs::read(dir.join("cmdline")).ok().and_then(|raw| {
            let args: Vec<String> = raw
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            redact::cmdline(&args, mode)
        }),
    };
    let cgroup = std::fs::read_to_string(dir.join("cgroup"))
        .ok()
        .and_then(|c| cgroup_path(&c));
    let container = cgroup
        .as_deref()
        .map(container_from_cgroup)
        .unwrap_or_default();
    ProcessDetails {
        exe,
        cmdline,
        cgroup,
        container,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c2b8e9d0a4f5e6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f90";
    const POD: &str = "0b3e4c5d-6f70-4182-93a4-b5c6d7e8f901";

    #[test]
    fn recognises_runtimes_from_real_world_paths() {
        let pod_us = POD.replace('-', "_");
        type Case<'a> = (String, Option<&'a str>, Option<&'a str>, Option<&'a str>);
        let cases: Vec<Case> = vec![
            (
                format!("/system.slice/docker-{ID}.scope"),
                Some(ID),
                Some("docker"),
                None,
            ),
            (format!("/docker/{ID}"), Some(ID), Some("docker"), None),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_us}.slice/cri-containerd-{ID}.scope"
                ),
                Some(ID),
                Some("containerd"),
                Some(POD),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_us}.slice/crio-{ID}.scope"
                ),
                Some(ID),
                Some("cri-o"),
                Some(POD),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{pod_us}.slice/cri-containerd-{ID}.scope"),
                Some(ID),
                Some("containerd"),
                Some(POD),
            ),
            (
                format!("/kubepods/burstable/pod{POD}/{ID}"),
                Some(ID),
                None,
                Some(POD),
            ),
            (
                format!("/kubepods/pod{POD}/{ID}"),
                Some(ID),
                None,
                Some(POD),
            ),
            (
                format!("/machine.slice/libpod-{ID}.scope"),
                Some(ID),
                Some("podman"),
                None,
            ),
            (
                format!("/libpod_parent/libpod-{ID}"),
                Some(ID),
                Some("podman"),
                None,
            ),
            (
                "/system.slice/postgresql@15-main.service".into(),
                None,
                None,
                None,
            ),
            (
                "/user.slice/user-0.slice/session-3.scope".into(),
                None,
                None,
                None,
            ),
            ("/".into(), None, None, None),
            ("/docker/not-an-id".into(), None, None, None),
        ];
        for (path, id, runtime, pod) in cases {
            let c = container_from_cgroup(&path);
            assert_eq!(c.container_id.as_deref(), id, "{path}");
            assert_eq!(c.container_runtime, runtime, "{path}");
            assert_eq!(c.pod_uid.as_deref(), pod, "{path}");
        }
    }

    #[test]
    fn names_the_systemd_unit() {
        let c = container_from_cgroup("/system.slice/pgbouncer.service");
        assert_eq!(c.systemd_unit.as_deref(), Some("pgbouncer.service"));
        let c = container_from_cgroup(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(c.systemd_unit, Some(format!("docker-{ID}.scope")));
        assert_eq!(
            container_from_cgroup("/user.slice/user-0.slice/session-3.scope").systemd_unit,
            None
        );
    }

    #[test]
    fn picks_v2_path_then_systemd_v1() {
        assert_eq!(
            cgroup_path("0::/system.slice/x.service\n").as_deref(),
            Some("/system.slice/x.service")
        );
        let hybrid = "12:memory:/m\n1:name=systemd:/system.slice/y.service\n0::/\n";
        assert_eq!(
            cgroup_path(hybrid).as_deref(),
            Some("/system.slice/y.service")
        );
        assert_eq!(cgroup_path("0::/\n").as_deref(), Some("/"));
        assert_eq!(cgroup_path("garbage"), None);
    }

    #[test]
    fn reads_a_fake_proc_and_survives_a_missing_process() {
        let root = std::env::temp_dir().join(format!("tracer-proc-{}", std::process::id()));
        let dir = root.join("77");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("cmdline"),
            b"psql\0postgresql://u:SECRET@db/app\0-c\0select 1\0",
        )
        .expect("write");
        std::fs::write(dir.join("cgroup"), format!("0::/docker/{ID}\n")).expect("write");
        let d = read_details(&root, 77, CmdlineMode::Redacted);
        assert_eq!(
            d.cmdline.as_deref(),
            Some("psql postgresql://u:<redacted>@db/app -c <sql>"),
            "SQL hidden, password redacted"
        );
        assert_eq!(read_details(&root, 77, CmdlineMode::Off).cmdline, None);
        assert_eq!(d.container.container_id.as_deref(), Some(ID));
        assert_eq!(d.exe, None);
        assert_eq!(
            read_details(&root, 78, CmdlineMode::Redacted),
            ProcessDetails::default()
        );
        std::fs::remove_dir_all(root).expect("cleanup");
    }
}
