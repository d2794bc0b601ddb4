//! Who owns a connection: the executable, command line and cgroup of a process, and the
//! container or systemd unit its cgroup path names. Parsing only; reading `/proc` is the
//! host's job (`tracer::host::process`).

use serde::Serialize;

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

#[cfg(test)]
mod tests;
