//! The files the project ships for deployment: the systemd unit, the container recipe and the
//! Kubernetes manifests. Static checks run anywhere; the root tests run the real daemon as an
//! unprivileged user holding exactly the unit's capabilities.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde::Deserialize;
use tests::{
    Event, TempDir, Value, events::read_events, free_port, lines, prom::https_get, require_root,
    tracer_bin,
};

const UNIT: &str = "deploy/systemd/tracer.service";
const CONTAINERFILE: &str = "deploy/container/Containerfile";
const DAEMONSET: &str = "deploy/kubernetes/daemonset.yaml";
const SCRAPE: &str = "deploy/kubernetes/prometheus-scrape.yaml";
const PODMONITOR: &str = "deploy/kubernetes/podmonitor.yaml";
const WEB_SECRET: &str = "deploy/kubernetes/web-config-secret.yaml";

/// `nobody`: what the root tests run the daemon as.
const NOBODY: u32 = 65534;

/// The options of `tracer run` (SPEC). Deployment files may use no others.
const RUN_FLAGS: &[&str] = &[
    "--port",
    "--unix-socket-glob",
    "--events",
    "--metrics-addr",
    "--stall-after",
    "--idle-in-transaction-after",
    "--close-wait-after",
    "--idle-after",
    "--log-level",
    "--state-dir",
    "--cmdline",
    "--web-config",
    "--config",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The capabilities `tracer run` checks for, as the unit spells them (`CAP_BPF`, ...).
fn required_caps() -> BTreeSet<String> {
    tracer::kernel::privileges::REQUIRED
        .iter()
        .map(|(_, name)| (*name).to_owned())
        .collect()
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------------------
// systemd unit

/// A unit file: (section, key, value) in file order. Keys may repeat (list-valued settings).
struct Unit {
    entries: Vec<(String, String, String)>,
}

/// The logical lines of a text in which a trailing backslash continues a line (unit files,
/// Containerfiles), continuations joined with a space. `skip(line, continuing)` drops a
/// trimmed physical line; the formats differ on comments inside a continuation.
fn logical_lines(text: &str, skip: impl Fn(&str, bool) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if skip(line, !pending.is_empty()) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        out.push(std::mem::take(&mut pending));
    }
    out
}

impl Unit {
    fn parse(text: &str) -> Self {
        let mut entries = Vec::new();
        let mut section = String::new();
        let logical_lines = logical_lines(text, |line, continuing| {
            !continuing && (line.is_empty() || line.starts_with(['#', ';']))
        });
        for logical in logical_lines {
            if let Some(name) = logical.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
            } else if let Some((key, value)) = logical.split_once('=') {
                entries.push((
                    section.clone(),
                    key.trim().to_owned(),
                    value.trim().to_owned(),
                ));
            } else {
                panic!("not a unit file line: {logical:?}");
            }
        }
        Self { entries }
    }

    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The value in force for a single-valued setting (the last assignment wins).
    fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.all(section, key).last().copied()
    }

    /// A space-separated list setting: assignments accumulate, an empty one resets.
    fn list(&self, section: &str, key: &str) -> Vec<String> {
        let mut items = Vec::new();
        for value in self.all(section, key) {
            if value.is_empty() {
                items.clear();
            }
            items.extend(value.split_whitespace().map(str::to_owned));
        }
        items
    }

    /// `[Service] ExecStart=` split into words (the unit uses no quoting).
    fn exec_start(&self) -> Vec<String> {
        let exec = self
            .get("Service", "ExecStart")
            .expect("the unit has ExecStart=");
        assert!(
            !exec.contains(['"', '\'', '$', '%']),
            "ExecStart= is kept free of quoting and specifiers: {exec}"
        );
        exec.split_whitespace().map(str::to_owned).collect()
    }

    /// CapabilityBoundingSet= / AmbientCapabilities= as a set of `CAP_*` names.
    fn caps(&self, key: &str) -> BTreeSet<String> {
        let items = self.list("Service", key);
        assert!(
            items.iter().all(|c| !c.starts_with('~')),
            "{key}= is an allow list, not a deny list: {items:?}"
        );
        items.into_iter().collect()
    }
}

fn unit() -> Unit {
    Unit::parse(&read(UNIT))
}

fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix(&format!("{flag}=")))
        })
}

fn assert_only_run_flags(args: &[String], whence: &str) {
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        let flag = arg.split('=').next().unwrap_or(arg);
        assert!(
            RUN_FLAGS.contains(&flag),
            "{whence} passes {flag}, which `tracer run` does not have"
        );
    }
}

/// The set of syscall names in a `systemd-analyze syscall-filter` group, nested groups
/// expanded.
fn syscall_group(name: &str, memo: &mut BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    if let Some(known) = memo.get(name) {
        return known.clone();
    }
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager", name])
        .output()
        .expect("systemd-analyze syscall-filter");
    assert!(out.status.success(), "unknown syscall group {name}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut set = BTreeSet::new();
    for line in text.lines().skip(1) {
        let item = line.trim();
        if item.is_empty() || item.starts_with('#') {
            continue;
        }
        if item.starts_with('@') {
            set.extend(syscall_group(item, memo));
        } else {
            set.insert(item.to_owned());
        }
    }
    memo.insert(name.to_owned(), set.clone());
    set
}

/// What `SystemCallFilter=` lets through, following systemd.exec(5): the first assignment
/// decides allow list vs deny list; later ones add to or (`~`) remove from it.
enum SyscallPolicy {
    Unrestricted,
    AllowOnly(BTreeSet<String>),
    DenyOnly(BTreeSet<String>),
}

impl SyscallPolicy {
    fn of(unit: &Unit) -> Self {
        let mut memo = BTreeMap::new();
        let mut policy = Self::Unrestricted;
        for value in unit.all("Service", "SystemCallFilter") {
            if value.is_empty() {
                policy = Self::Unrestricted;
                continue;
            }
            let (invert, list) = match value.strip_prefix('~') {
                Some(rest) => (true, rest),
                None => (false, value),
            };
            let mut names = BTreeSet::new();
            for item in list.split_whitespace() {
                // `name:errno` sets the errno of that call only.
                let item = item.split(':').next().unwrap_or(item);
                if item.starts_with('@') {
                    names.extend(syscall_group(item, &mut memo));
                } else {
                    names.insert(item.to_owned());
                }
            }
            policy = match (policy, invert) {
                (Self::Unrestricted, false) => Self::AllowOnly(names),
                (Self::Unrestricted, true) => Self::DenyOnly(names),
                (Self::AllowOnly(mut allowed), false) => {
                    allowed.extend(names);
                    Self::AllowOnly(allowed)
                }
                (Self::AllowOnly(allowed), true) => {
                    Self::AllowOnly(allowed.difference(&names).cloned().collect())
                }
                (Self::DenyOnly(denied), false) => {
                    Self::DenyOnly(denied.difference(&names).cloned().collect())
                }
                (Self::DenyOnly(mut denied), true) => {
                    denied.extend(names);
                    Self::DenyOnly(denied)
                }
            };
        }
        policy
    }

    fn allows(&self, syscall: &str) -> bool {
        match self {
            Self::Unrestricted => true,
            Self::AllowOnly(allowed) => allowed.contains(syscall),
            Self::DenyOnly(denied) => !denied.contains(syscall),
        }
    }
}

#[test]
fn unit_grants_exactly_the_capabilities_run_checks_for() {
    let unit = unit();
    let required = required_caps();
    assert_eq!(required.len(), 5, "SPEC names five capabilities");
    assert_eq!(unit.caps("CapabilityBoundingSet"), required);
    assert_eq!(unit.caps("AmbientCapabilities"), required);
    assert_eq!(unit.get("Service", "NoNewPrivileges"), Some("yes"));

    // Not root: a dynamic user, or a named user other than root.
    let dynamic = unit.get("Service", "DynamicUser") == Some("yes");
    let user = unit.get("Service", "User");
    assert!(
        dynamic || user.is_some_and(|u| u != "root" && u != "0"),
        "the service runs as an unprivileged user"
    );
    // Capabilities inside a user namespace do not allow bpf().
    assert_ne!(unit.get("Service", "PrivateUsers"), Some("yes"));
}

#[test]
fn unit_is_hardened_without_hiding_what_the_daemon_reads() {
    let unit = unit();
    let svc = |key: &str| unit.get("Service", key);

    assert_eq!(svc("ProtectSystem"), Some("strict"));
    assert_eq!(svc("ProtectHome"), Some("read-only"));
    assert_eq!(svc("PrivateTmp"), Some("yes"));
    assert_eq!(svc("Restart"), Some("on-failure"));
    assert_eq!(svc("KillSignal"), Some("SIGTERM"));
    assert_eq!(svc("TimeoutStopSec"), Some("10"));
    assert!(svc("MemoryMax").is_some(), "memory is capped");

    // Other processes' /proc entries and the host's sockets stay visible.
    assert!(matches!(svc("ProtectProc"), None | Some("default")));
    assert!(matches!(svc("ProcSubset"), None | Some("all")));
    assert_ne!(svc("PrivateNetwork"), Some("yes"));
    let families: BTreeSet<String> = unit
        .list("Service", "RestrictAddressFamilies")
        .into_iter()
        .collect();
    for family in ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"] {
        assert!(families.contains(family), "{family} allowed: {families:?}");
    }
    // Paths the daemon reads must not be made inaccessible.
    for key in ["InaccessiblePaths", "TemporaryFileSystem"] {
        for path in unit.list("Service", key) {
            for needed in ["/proc", "/sys", "/sys/kernel/btf", "/sys/fs/cgroup"] {
                assert!(
                    !needed.starts_with(path.trim_start_matches(['-', '+'])),
                    "{key}={path} hides {needed}"
                );
            }
        }
    }

    // The daemon writes its events under the logs directory the unit makes writable.
    let exec = unit.exec_start();
    assert_eq!(exec[0], "/usr/local/bin/tracer");
    assert_eq!(exec[1], "run");
    assert_only_run_flags(&exec[2..], "the unit's ExecStart");
    // The state file survives restarts in the directory systemd makes and names for it.
    assert_eq!(svc("StateDirectory"), Some("tracer"));
    assert!(
        flag_value(&exec, "--state-dir").is_none(),
        "the daemon finds $STATE_DIRECTORY itself"
    );
    let logs = svc("LogsDirectory").expect("LogsDirectory=");
    let events = flag_value(&exec, "--events").expect("ExecStart passes --events");
    assert!(
        events == "-" || events.starts_with(&format!("/var/log/{logs}/")),
        "events go to the journal or under /var/log/{logs}: {events}"
    );

    // A system call filter, if any, must let bpf() through.
    if which("systemd-analyze").is_some() {
        let policy = SyscallPolicy::of(&unit);
        for call in [
            "bpf",
            "perf_event_open",
            "socket",
            "sendmsg",
            "recvmsg",
            "openat",
        ] {
            assert!(policy.allows(call), "SystemCallFilter= blocks {call}");
        }
    } else {
        eprintln!("systemd-analyze missing: SystemCallFilter= not expanded");
    }
}

#[test]
fn unit_passes_systemd_analyze() {
    if which("systemd-analyze").is_none() {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    // `verify` checks that ExecStart= is executable: point it at a binary that exists.
    let dir = TempDir::new("unit").expect("temp dir");
    let bin = tracer_bin();
    let bin = if bin.is_file() {
        bin
    } else {
        PathBuf::from("/bin/true")
    };
    let text = read(UNIT).replace("/usr/local/bin/tracer", &bin.to_string_lossy());
    let path = dir.0.join("tracer.service");
    fs::write(&path, text).expect("write unit copy");

    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // It exits 0 on unknown keys and bad values too, but names them.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("tracer.service"))
        .collect();
    assert!(complaints.is_empty(), "systemd-analyze verify: {stderr}");

    // Overall exposure on systemd's 0-10 scale stays at most 3.0 (it is 2.4 now; the rest is
    // inherent: capabilities, host network, other processes' /proc).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager", "--threshold=30"])
        .arg(&path)
        .output()
        .expect("systemd-analyze security");
    assert!(
        out.status.success(),
        "exposure above 3.0:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// Container recipe

/// One Containerfile instruction: keyword (upper case) and its arguments, continuations
/// joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    logical_lines(text, |line, continuing| {
        line.starts_with('#') || (!continuing && line.is_empty())
    })
    .into_iter()
    .map(|logical| {
        let (keyword, rest) = logical
            .split_once(char::is_whitespace)
            .unwrap_or((&logical, ""));
        (keyword.to_ascii_uppercase(), rest.trim().to_owned())
    })
    .collect()
}

#[test]
fn containerfile_builds_with_the_pinned_toolchain_and_ships_only_the_binary() {
    let all = instructions(&read(CONTAINERFILE));
    let stages: Vec<&[(String, String)]> = {
        let starts: Vec<usize> = all
            .iter()
            .enumerate()
            .filter(|(_, (k, _))| k == "FROM")
            .map(|(i, _)| i)
            .collect();
        assert!(starts.len() >= 2, "a multi-stage build");
        assert_eq!(starts[0], 0, "FROM comes first");
        starts
            .iter()
            .enumerate()
            .map(|(n, &s)| &all[s..*starts.get(n + 1).unwrap_or(&all.len())])
            .collect()
    };

    // Build stage: the workspace's Rust version, bpf-linker as setup.sh pins it, rust-src.
    let build = stages[0];
    let from: Vec<&str> = build[0].1.split_whitespace().collect();
    let manifest = read("Cargo.toml");
    let rust_version = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version"))
        .and_then(|v| v.split('"').nth(1))
        .expect("workspace rust-version");
    assert!(
        from[0] == format!("rust:{rust_version}-bookworm"),
        "build image follows rust-version {rust_version}: {from:?}"
    );
    assert!(
        from.len() == 3 && from[1].eq_ignore_ascii_case("AS"),
        "named build stage"
    );
    let build_name = from[2];
    let runs: Vec<&str> = build
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, v)| v.as_str())
        .collect();
    let setup = read("xtask/scripts/setup.sh");
    let linker_version = setup
        .split("bpf-linker --version ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("setup.sh pins bpf-linker");
    assert!(
        runs.iter().any(|r| r.contains("cargo install")
            && r.contains("bpf-linker")
            && r.contains(&format!("--version {linker_version}"))),
        "bpf-linker {linker_version}, as setup.sh installs it"
    );
    assert!(runs.iter().any(|r| r.contains("rust-src")));
    assert!(
        runs.iter().any(|r| r.contains("cargo xtask build")
            || (r.contains("cargo build")
                && r.contains("--release")
                && (r.contains("--package tracer") || r.contains("-p tracer")))),
        "the release build of the tracer: {runs:?}"
    );

    // Final stage: slim Debian, the binary and nothing else, running as uid 0 (capabilities
    // come from the runtime; see the Containerfile).
    let last = stages.last().expect("final stage");
    assert_eq!(last[0].1, "debian:bookworm-slim");
    for (keyword, args) in last.iter() {
        assert!(
            !["RUN", "ADD", "USER"].contains(&keyword.as_str()),
            "final stage has {keyword} {args}"
        );
    }
    let copies: Vec<&str> = last
        .iter()
        .filter(|(k, _)| k == "COPY")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(copies.len(), 1, "one COPY: {copies:?}");
    let copy: Vec<&str> = copies[0].split_whitespace().collect();
    assert_eq!(copy[0], format!("--from={build_name}"));
    assert!(
        copy[1].ends_with("target/release/tracer"),
        "copies the release binary: {copy:?}"
    );
    assert_eq!(copy[2], "/usr/local/bin/tracer");
    let exec_form = |keyword: &str| -> Vec<String> {
        let (_, v) = last
            .iter()
            .rfind(|(k, _)| k == keyword)
            .unwrap_or_else(|| panic!("final stage has {keyword}"));
        serde_json::from_str(v).unwrap_or_else(|e| panic!("{keyword} in exec (JSON) form: {e}"))
    };
    assert_eq!(exec_form("ENTRYPOINT"), ["/usr/local/bin/tracer"]);
    assert_eq!(exec_form("CMD"), ["run"]);

    // The build context leaves out build output.
    let ignore = read(".dockerignore");
    assert!(
        ignore
            .lines()
            .any(|l| ["target", "target/", "/target", "/target/"].contains(&l.trim())),
        ".dockerignore excludes target/"
    );
}

// ---------------------------------------------------------------------------------------
// Kubernetes

fn yaml_documents(rel: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(&read(rel))
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

fn str_set(v: &Value) -> BTreeSet<String> {
    strings(v).into_iter().collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("a list: {v}"))
        .iter()
        .map(|s| s.as_str().expect("strings").to_owned())
        .collect()
}

#[test]
fn daemonset_runs_in_the_host_namespaces_with_exactly_the_five_capabilities() {
    let docs = yaml_documents(DAEMONSET);
    let ns = of_kind(&docs, "Namespace")["metadata"]["name"].clone();
    assert_eq!(ns, "pgconn-tracer");
    for doc in docs.iter().filter(|d| d["kind"] != "Namespace") {
        assert_eq!(doc["metadata"]["namespace"], ns, "{}", doc["kind"]);
    }
    let sa = of_kind(&docs, "ServiceAccount");
    let ds = of_kind(&docs, "DaemonSet");
    assert_eq!(ds["apiVersion"], "apps/v1");
    let template = &ds["spec"]["template"];
    let selector = ds["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    for (key, value) in selector {
        assert_eq!(
            &template["metadata"]["labels"][key], value,
            "selector {key}"
        );
    }

    let pod = &template["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert!(
        pod["tolerations"]
            .as_array()
            .expect("tolerations")
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "tolerates every taint"
    );

    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    let sc = &c["securityContext"];
    let wanted: BTreeSet<String> = required_caps()
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    assert_eq!(str_set(&sc["capabilities"]["add"]), wanted);
    assert_eq!(
        str_set(&sc["capabilities"]["drop"]),
        BTreeSet::from(["ALL".to_owned()])
    );
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);

    // Host paths, read-only, mounted where the daemon reads them.
    let volumes = pod["volumes"].as_array().expect("volumes");
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    for path in ["/sys/kernel/btf", "/sys/fs/cgroup"] {
        let volume = volumes
            .iter()
            .find(|v| v["hostPath"]["path"] == path)
            .unwrap_or_else(|| panic!("hostPath volume {path}"));
        let mount = mounts
            .iter()
            .find(|m| m["name"] == volume["name"])
            .unwrap_or_else(|| panic!("{path} is mounted"));
        assert_eq!(mount["mountPath"], path);
        assert_eq!(mount["readOnly"], true, "{path} read-only");
    }

    // The state file's directory: on the node, so that it outlives the pod; writable.
    let state = volumes
        .iter()
        .find(|v| v["hostPath"]["path"] == tracer::config::DEFAULT_STATE_DIR)
        .expect("hostPath volume for the state directory");
    let mount = mounts
        .iter()
        .find(|m| m["name"] == state["name"])
        .expect("the state directory is mounted");
    assert_eq!(mount["mountPath"], tracer::config::DEFAULT_STATE_DIR);
    assert_ne!(mount["readOnly"], true);

    // Metrics: port 9433 named metrics, bound to the node's IP (not 0.0.0.0), probed.
    let ports = c["ports"].as_array().expect("ports");
    assert!(
        ports
            .iter()
            .any(|p| p["name"] == "metrics" && p["containerPort"] == 9433),
        "port 9433 named metrics: {ports:?}"
    );
    let args = strings(&c["args"]);
    assert_eq!(args[0], "run");
    assert_only_run_flags(&args[1..], "the DaemonSet");
    assert_eq!(flag_value(&args, "--events"), Some("-"), "events to stdout");
    let metrics_addr = flag_value(&args, "--metrics-addr").expect("--metrics-addr");
    assert!(metrics_addr.ends_with(":9433"), "{metrics_addr}");
    assert!(
        !metrics_addr.starts_with("0.0.0.0") && !metrics_addr.starts_with("127."),
        "metrics on the node IP: {metrics_addr}"
    );
    if let Some(var) = metrics_addr
        .strip_prefix("$(")
        .and_then(|r| r.split(')').next())
    {
        let env = c["env"].as_array().expect("env");
        let def = env
            .iter()
            .find(|e| e["name"] == var)
            .unwrap_or_else(|| panic!("env {var} defined"));
        assert_eq!(def["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    }
    // Basic auth guards every path: the kubelet checks that the endpoint listens.
    for probe in ["livenessProbe", "readinessProbe"] {
        let port = &c[probe]["tcpSocket"]["port"];
        assert!(port == "metrics" || port == 9433, "{probe} port: {port}");
    }
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9433");
    assert_eq!(annotations["prometheus.io/scheme"], "https");

    // The web config comes from the Secret web-config-secret.yaml defines, mounted where
    // --web-config looks, with the files it names next to it.
    let web_config = flag_value(&args, "--web-config").expect("--web-config");
    let (dir, file) = web_config.rsplit_once('/').expect("an absolute path");
    let mount = mounts
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("{dir} is mounted"));
    assert_eq!(mount["readOnly"], true);
    let volume = volumes
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the web config volume");
    let secret_docs = yaml_documents(WEB_SECRET);
    let secret = of_kind(&secret_docs, "Secret");
    assert_eq!(volume["secret"]["secretName"], secret["metadata"]["name"]);
    assert_eq!(secret["metadata"]["namespace"], ns);
    let data = &secret["stringData"];
    let text = data[file].as_str().expect("the web config in the Secret");
    let config: Value = serde_yaml_ng::from_str(text).expect("web config YAML");
    for key in ["cert_file", "key_file"] {
        let name = config["tls_server_config"][key].as_str().expect(key);
        assert!(data[name].is_string(), "{key} {name} is in the Secret");
    }

    let res = &c["resources"];
    for (kind, resource, value) in [
        ("requests", "cpu", "50m"),
        ("requests", "memory", "64Mi"),
        ("limits", "cpu", "500m"),
        ("limits", "memory", "256Mi"),
    ] {
        assert_eq!(res[kind][resource], value, "{kind}.{resource}");
    }
}

#[test]
fn scrape_config_and_podmonitor_select_the_tracer_pods_metrics_port() {
    let ds_docs = yaml_documents(DAEMONSET);
    let ds = of_kind(&ds_docs, "DaemonSet");
    let ns = ds["metadata"]["namespace"].as_str().expect("namespace");
    let labels = ds["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .expect("pod labels");

    let docs = yaml_documents(SCRAPE);
    assert_eq!(docs.len(), 1);
    let jobs = docs[0]["scrape_configs"]
        .as_array()
        .expect("scrape_configs");
    let job = jobs
        .iter()
        .find(|j| j["job_name"] == "pgconn-tracer")
        .expect("job pgconn-tracer");
    let sd = job["kubernetes_sd_configs"]
        .as_array()
        .expect("kubernetes_sd_configs");
    assert!(sd.iter().all(|s| s["role"] == "pod"));
    assert!(
        sd.iter()
            .all(|s| str_set(&s["namespaces"]["names"]).contains(ns))
    );
    let path = job["metrics_path"].as_str().unwrap_or("/metrics");
    assert_eq!(path, "/metrics");

    // The keep rules must match the DaemonSet's own pod label and port name.
    let keeps: Vec<&Value> = job["relabel_configs"]
        .as_array()
        .expect("relabel_configs")
        .iter()
        .filter(|r| r["action"] == "keep")
        .collect();
    let keeps_on = |source: &str, value: &str| {
        keeps.iter().any(|r| {
            strings(&r["source_labels"]) == [source]
                && r["regex"].as_str().is_some_and(|re| re == value)
        })
    };
    let label_kept = labels.iter().any(|(key, value)| {
        let meta: String = key
            .chars()
            .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' })
            .collect();
        keeps_on(
            &format!("__meta_kubernetes_pod_label_{meta}"),
            value.as_str().unwrap_or_default(),
        )
    });
    assert!(label_kept, "keeps the tracer pods by label: {keeps:?}");
    assert!(
        keeps_on("__meta_kubernetes_pod_container_port_name", "metrics"),
        "keeps only the metrics port: {keeps:?}"
    );

    let docs = yaml_documents(PODMONITOR);
    let pm = of_kind(&docs, "PodMonitor");
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(pm["metadata"]["namespace"], ns);
    for (key, value) in pm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(labels.get(key), Some(value), "PodMonitor selects by {key}");
    }
    assert!(str_set(&pm["spec"]["namespaceSelector"]["matchNames"]).contains(ns));
    let endpoints = pm["spec"]["podMetricsEndpoints"]
        .as_array()
        .expect("podMetricsEndpoints");
    assert!(endpoints.iter().any(|e| e["port"] == "metrics"));
    // Both scrape over TLS with basic auth, verifying the name the certificate is made for.
    for endpoint in endpoints {
        assert_eq!(endpoint["scheme"], "https");
        assert_eq!(
            endpoint["tlsConfig"]["serverName"],
            job["tls_config"]["server_name"]
        );
        assert!(endpoint["basicAuth"]["password"]["key"].is_string());
    }
    assert_eq!(job["scheme"], "https");
    assert!(job["tls_config"]["ca_file"].is_string());
    assert!(job["basic_auth"]["username"].is_string());
    assert!(job["basic_auth"]["password_file"].is_string());
}

/// The template of the web config Secret, its placeholders replaced by real values, is a web
/// config the daemon accepts; with a placeholder left in, it is refused.
#[test]
fn the_web_config_secret_template_is_accepted_once_filled_in() {
    let docs = yaml_documents(WEB_SECRET);
    let data = &of_kind(&docs, "Secret")["stringData"];
    let dir = TempDir::new("web-secret").expect("temp dir");
    let certified =
        rcgen::generate_simple_self_signed(vec!["pgconn-tracer".to_owned()]).expect("certificate");
    let hash = bcrypt::hash("pw", 4).expect("bcrypt");
    let fill = |text: &str| {
        text.replace("REPLACE_WITH_BCRYPT_HASH", &hash)
            .replace("REPLACE_WITH_PEM_CERTIFICATE", certified.cert.pem().trim())
            .replace(
                "REPLACE_WITH_PEM_PRIVATE_KEY",
                certified.signing_key.serialize_pem().trim(),
            )
    };
    let mut config = None;
    for (name, value) in data.as_object().expect("stringData") {
        let text = value.as_str().expect("a string");
        assert!(
            text.contains("REPLACE_"),
            "{name} has no placeholder: {text}"
        );
        let path = dir.0.join(name);
        fs::write(&path, text).expect("write");
        if name.ends_with(".yml") {
            config = Some(path);
        }
    }
    let config = config.expect("a .yml web config");
    let err =
        tracer::export::web_config::WebConfig::load(&config).expect_err("placeholders refused");
    assert!(
        err.to_string().contains("REPLACE") || err.to_string().contains("no PEM"),
        "{err}"
    );
    for (name, value) in data.as_object().expect("stringData") {
        fs::write(dir.0.join(name), fill(value.as_str().expect("a string"))).expect("write");
    }
    let loaded =
        tracer::export::web_config::WebConfig::load(&config).expect("the filled-in template");
    assert!(loaded.tls(), "the template turns TLS on");
}

// ---------------------------------------------------------------------------------------
// Root tests: the daemon as `nobody`, holding the unit's capabilities and nothing else.

/// `setpriv` running `program` as nobody with exactly `caps` (e.g. `CAP_BPF`) in every set
/// and no_new_privs, as the unit's DynamicUser + AmbientCapabilities + NoNewPrivileges do.
fn as_nobody_with(caps: &BTreeSet<String>, program: &Path) -> Command {
    let list: String = caps
        .iter()
        .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        "--nnp",
        &format!("--inh-caps=-all{list}"),
        &format!("--ambient-caps=-all{list}"),
        &format!("--bounding-set=-all{list}"),
    ])
    .arg(program);
    cmd
}

/// `tracer run` options from the unit's ExecStart=, with the events going to `events` and
/// the watched port replaced.
fn unit_run_args(unit: &Unit, port: u16, events: &Path, metrics_addr: &str) -> Vec<String> {
    let exec = unit.exec_start();
    let mut args = vec!["run".to_owned()];
    let mut rest = exec[2..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--events" | "--port" | "--metrics-addr" | "--config" => {
                rest.next();
            }
            a if a.starts_with("--events=")
                || a.starts_with("--port=")
                || a.starts_with("--metrics-addr=")
                || a.starts_with("--config=") => {}
            _ => args.push(arg.clone()),
        }
    }
    args.extend(["--port".into(), port.to_string()]);
    args.extend(["--events".into(), events.to_string_lossy().into_owned()]);
    if run_accepts("--metrics-addr") {
        args.extend(["--metrics-addr".into(), metrics_addr.to_owned()]);
    }
    args
}

/// Whether this build's `tracer run` has `flag` (it is in the SPEC; builds catch up).
fn run_accepts(flag: &str) -> bool {
    Command::new(tracer_bin())
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false)
}

/// A daemon started by a test; killed on drop if the test did not stop it.
struct Daemon {
    child: Option<Child>,
    /// The process to signal: the tracer itself (under strace it is a grandchild).
    pid: u32,
    events: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    /// `dir` must be writable by nobody.
    fn start(mut cmd: Command, dir: &Path) -> Self {
        let events = dir.join("events.jsonl");
        let stderr = dir.join("stderr");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let pid = child.id();
        Self {
            child: Some(child),
            pid,
            events,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_for(&mut self, what: &str, timeout: Duration, done: impl Fn(&[Event]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let events = read_events(&self.events);
            if done(&events) {
                return;
            }
            let exited = tests::exit_status(&mut self.child);
            if exited.is_some() || Instant::now() >= deadline {
                panic!(
                    "{what}: not seen within {timeout:?} (exit: {exited:?})\nevents:\n{}stderr:\n{}",
                    lines(&events),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status of the spawned process.
    fn terminate(mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on a process this test started.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "still running {timeout:?} after SIGTERM; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The tracer first: killing strace alone would detach it and leave it running.
            let mut pids = children_of(child.id());
            pids.push(self.pid);
            for pid in pids {
                // SAFETY: kill(2) on processes this test started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Parent pid of `pid`, from /proc/<pid>/stat.
fn ppid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn children_of(parent: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&pid| ppid(pid) == Some(parent))
                .collect()
        })
        .unwrap_or_default()
}

/// A directory nobody can write its events into.
fn nobody_dir(tag: &str) -> TempDir {
    let dir = TempDir::new(tag).expect("temp dir");
    std::os::unix::fs::chown(&dir.0, Some(NOBODY), Some(NOBODY)).expect("chown temp dir");
    dir
}

/// One client connection from this process to `listener`, with bytes both ways.
fn exchange(listener: &TcpListener) {
    let port = listener.local_addr().expect("addr").port();
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    client.write_all(b"ping").expect("client write");
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).expect("server read");
    server.write_all(b"pong").expect("server write");
    client.read_exact(&mut buf).expect("client read");
    assert_eq!(&buf, b"pong");
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("request");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn daemon_runs_with_only_the_unit_capability_set() {
    if !require_root() {
        return;
    }
    let unit = unit();
    let caps = unit.caps("AmbientCapabilities");
    assert_eq!(caps, unit.caps("CapabilityBoundingSet"));

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let dir = nobody_dir("pkg-caps");
    let events = dir.0.join("events.jsonl");
    let mut cmd = as_nobody_with(&caps, &tracer_bin());
    cmd.args(unit_run_args(&unit, port, &events, "off"));
    let mut daemon = Daemon::start(cmd, &dir.0);
    daemon.wait_for("ready", Duration::from_secs(30), |evs| {
        evs.iter().any(|e| e.kind == "ready")
    });

    exchange(&listener);
    let me = std::process::id();
    daemon.wait_for(
        "an open event for this test's client connection",
        Duration::from_secs(10),
        |evs| {
            evs.iter().any(|e| {
                e.kind == "open"
                    && e.role == "client"
                    && e.pid == me
                    && tests::port_of(&e.remote) == Some(port)
            })
        },
    );

    let status = daemon.terminate(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

#[test]
fn daemon_without_capabilities_exits_1_with_one_line_naming_cap_bpf() {
    if !require_root() {
        return;
    }
    let out = as_nobody_with(&BTreeSet::new(), &tracer_bin())
        .args(["run", "--port", &free_port().expect("port").to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("spawn tracer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{:?}: {stderr}", out.status);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.contains("CAP_BPF"), "{stderr:?}");
    assert!(out.stdout.is_empty(), "nothing on stdout");
    assert!(out.status.signal().is_none());
}

#[test]
fn unit_syscall_filter_allows_every_syscall_the_daemon_makes() {
    if !require_root() {
        return;
    }
    for tool in ["strace", "systemd-analyze"] {
        if which(tool).is_none() {
            if std::env::var_os("TRACER_REQUIRE_ROOT_TESTS").is_some() {
                panic!("{tool} is not installed (xtask/scripts/setup.sh installs it)");
            }
            eprintln!("skipped: {tool} is not installed");
            return;
        }
    }
    let unit = unit();
    let policy = SyscallPolicy::of(&unit);
    if matches!(policy, SyscallPolicy::Unrestricted) {
        return;
    }
    let caps = unit.caps("AmbientCapabilities");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let metrics_port = free_port().expect("port");
    let dir = nobody_dir("pkg-strace");
    let trace_dir = TempDir::new("pkg-strace-out").expect("temp dir");
    let events = dir.0.join("events.jsonl");
    let bin = tracer_bin();
    // The metrics endpoint as deployments protect it: TLS and basic auth (the handshake and
    // the bcrypt check on the blocking pool are paths of their own).
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    fs::write(dir.0.join("tls.crt"), certified.cert.pem()).expect("write");
    fs::write(dir.0.join("tls.key"), certified.signing_key.serialize_pem()).expect("write");
    let web_config = dir.0.join("web-config.yml");
    fs::write(
        &web_config,
        format!(
            "tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n\
             basic_auth_users:\n  prometheus: {}\n",
            bcrypt::hash("pw", 4).expect("bcrypt")
        ),
    )
    .expect("write");

    let mut cmd = Command::new("strace");
    // As systemd's StateDirectory= does: the state file is written every tick.
    let state_dir = dir.0.join("state");
    cmd.env("STATE_DIRECTORY", &state_dir);
    cmd.args(["-f", "-ff", "-qq", "-o"])
        .arg(trace_dir.0.join("st"))
        .arg("setpriv")
        .args(as_nobody_with(&caps, &bin).get_args())
        .args(unit_run_args(
            &unit,
            port,
            &events,
            &format!("127.0.0.1:{metrics_port}"),
        ))
        .arg("--web-config")
        .arg(&web_config);
    let mut daemon = Daemon::start(cmd, &dir.0);
    daemon.wait_for("ready", Duration::from_secs(60), |evs| {
        evs.iter().any(|e| e.kind == "ready")
    });
    // setpriv execs the tracer in place: it is strace's child.
    let strace_pid = daemon.pid;
    let tracer_pid = *children_of(strace_pid).first().expect("the traced tracer");
    daemon.pid = tracer_pid;

    // Exercise the paths a running daemon takes: a watched connection, the metrics server.
    exchange(&listener);
    let me = std::process::id();
    daemon.wait_for("open event", Duration::from_secs(10), |evs| {
        evs.iter()
            .any(|e| e.kind == "open" && e.role == "client" && e.pid == me)
    });
    let addr = format!("127.0.0.1:{metrics_port}");
    let ca = dir.0.join("tls.crt");
    let get = |path: &str, password: &str| {
        https_get(
            &addr,
            &ca,
            "localhost",
            path,
            Some(("prometheus", password)),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
    };
    for path in ["/healthz", "/metrics"] {
        assert_eq!(get(path, "pw").status, 200, "{path}");
    }
    assert_eq!(get("/metrics", "wrong").status, 401);
    let plain = http_get(metrics_port, "/metrics");
    assert!(
        !plain.starts_with("HTTP/1."),
        "plain HTTP answered: {plain:?}"
    );
    let status = daemon.terminate(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(
        state_dir.join("state.json").exists(),
        "the state file was written: {}",
        daemon_stderr_of(&dir.0)
    );

    // Every system call the tracer made (setpriv's, before it execs the tracer, excluded).
    let exec_line = format!("execve(\"{}\"", bin.display());
    let mut used = BTreeSet::new();
    for entry in fs::read_dir(&trace_dir.0).expect("strace output") {
        let text = fs::read_to_string(entry.expect("entry").path()).expect("read trace");
        let mut body = text.as_str();
        if let Some(at) = text.find(&exec_line) {
            body = &text[at..];
        }
        for line in body.lines() {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && line[name.len()..].starts_with('(') {
                used.insert(name);
            }
        }
    }
    assert!(used.contains("bpf"), "the trace saw the daemon: {used:?}");
    let blocked: Vec<&String> = used.iter().filter(|s| !policy.allows(s)).collect();
    assert!(
        blocked.is_empty(),
        "the unit's SystemCallFilter= would block {blocked:?} (the daemon made {used:?})"
    );
}

fn daemon_stderr_of(dir: &Path) -> String {
    fs::read_to_string(dir.join("stderr")).unwrap_or_default()
}
