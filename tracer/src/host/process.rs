//! Who a process is, read from `/proc` at one place, under a root that tests can point
//! elsewhere. The parsing of what is read (cgroup paths, containers) is pure and lives in
//! `tracer_core::owner`.

use std::path::Path;

pub use tracer_core::owner::{Container, ProcessDetails};
use tracer_core::owner::{cgroup_path, container_from_cgroup};

use crate::host::redact::{self, CmdlineMode};

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
