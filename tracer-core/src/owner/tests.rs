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
