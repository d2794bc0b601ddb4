//! The metrics endpoint behind `--web-config`, with the shipped files: the web config of the
//! Secret template (deploy/kubernetes/web-config-secret.yaml) filled in with a certificate
//! made by the openssl commands of deploy/README.md and a bcrypt hash, and a real Prometheus
//! running the shipped scrape job (deploy/kubernetes/prometheus-scrape.yaml) with its TLS and
//! basic-auth settings, pointed at the daemon instead of Kubernetes service discovery.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;
use tests::{
    Postgres, TempDir, Tracer, Value, free_port,
    prom::{Prometheus, http_get, https_get, sample_value},
    require_root, run_ok,
};

const SCRAPE: &str = "deploy/kubernetes/prometheus-scrape.yaml";
const WEB_SECRET: &str = "deploy/kubernetes/web-config-secret.yaml";
/// Where the shipped scrape job reads the CA certificate and the password.
const SCRAPE_SECRET_DIR: &str = "/etc/prometheus/secrets/pgconn-tracer-scrape";
const WAIT: Duration = Duration::from_secs(30);
const PASSWORD: &str = "scrape-pw-9f2c";

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml(rel: &str) -> Value {
    serde_yaml_ng::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The shipped scrape job.
fn shipped_job() -> Value {
    yaml(SCRAPE)["scrape_configs"][0].clone()
}

/// A CA and a server certificate for `name` (and 127.0.0.1) signed by it, made as
/// deploy/README.md says: `ca.crt`, `tls.crt`, `tls.key` in `dir`.
fn make_certificates(dir: &Path, name: &str) {
    let openssl = |args: &[&str]| {
        run_ok(Command::new("openssl").args(args).current_dir(dir))
            .unwrap_or_else(|e| panic!("openssl {args:?}: {e:#}"));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "30",
        "-subj",
        "/CN=pgconn-tracer-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    let san = format!("subjectAltName=DNS:{name},IP:127.0.0.1");
    let subject = format!("/CN={name}");
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        &subject,
        "-addext",
        &san,
        "-keyout",
        "tls.key",
        "-out",
        "tls.csr",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "30",
        "-copy_extensions",
        "copy",
        "-out",
        "tls.crt",
    ]);
}

/// The Secret template's files written to `dir`, the hash placeholder filled in; the
/// certificate and key are the ones [`make_certificates`] wrote. Returns the web config.
fn shipped_web_config(dir: &Path) -> PathBuf {
    let secret = yaml(WEB_SECRET);
    let text = secret["stringData"]["web-config.yml"]
        .as_str()
        .expect("web-config.yml in the Secret");
    let hash = bcrypt::hash(PASSWORD, 10).expect("bcrypt");
    assert!(text.contains("REPLACE_WITH_BCRYPT_HASH"), "{text}");
    let path = dir.join("web-config.yml");
    fs::write(&path, text.replace("REPLACE_WITH_BCRYPT_HASH", &hash)).expect("write");
    let config: Value = serde_yaml_ng::from_str(text).expect("web config YAML");
    assert_eq!(config["tls_server_config"]["cert_file"], "tls.crt");
    assert_eq!(config["tls_server_config"]["key_file"], "tls.key");
    path
}

/// `promtool check config FILE`: (success, output).
fn promtool_check_config(file: &Path) -> (bool, String) {
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .expect("promtool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn wait_sample(prom: &Prometheus, promql: &str, want: f64) {
    prom.wait_for(promql, WAIT, |r| {
        r.len() == 1 && sample_value(&r[0]) == Some(want)
    })
    .unwrap_or_else(|e| panic!("{e:#}\nprometheus log:\n{}", prom.log()));
}

/// The last scrape error Prometheus reports for `job`, once it has scraped it.
fn last_error(prom: &Prometheus, job: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let targets = prom.targets().expect("targets");
        if let Some(t) = targets
            .iter()
            .find(|t| t["labels"]["job"] == job && t["lastScrape"] != "0001-01-01T00:00:00Z")
        {
            return t["lastError"].as_str().unwrap_or_default().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{job} never scraped: {targets:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Debian's Prometheus is built without Kubernetes service discovery: its promtool refuses
/// `kubernetes_sd_configs` as an unknown field. The check gives it the shipped file with that
/// one block swapped for `static_configs`; everything else (scheme, TLS, basic auth,
/// relabelling) is checked as shipped. The block itself is checked in packaging.rs.
#[test]
fn promtool_accepts_the_shipped_scrape_config() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("scrape-check").expect("temp dir");
    let shipped = read(SCRAPE);
    assert_eq!(
        shipped.matches(&format!("{SCRAPE_SECRET_DIR}/")).count(),
        2,
        "the CA and password paths"
    );
    let mut config: Value = serde_yaml_ng::from_str(&shipped).expect("YAML");
    for job in config["scrape_configs"]
        .as_array_mut()
        .expect("scrape_configs")
    {
        let job = job.as_object_mut().expect("a job");
        assert!(job.remove("kubernetes_sd_configs").is_some(), "{job:?}");
        job.insert(
            "static_configs".into(),
            json!([{ "targets": ["10.0.0.7:9433"] }]),
        );
    }
    let text = serde_yaml_ng::to_string(&config).expect("YAML");
    let path = dir.0.join("prometheus-scrape.yaml");
    fs::write(&path, &text).expect("write");
    let (ok, out) = promtool_check_config(&path);
    assert!(ok, "promtool check config:\n{out}\n--- file:\n{text}");
    // The check is a real one: it refuses a misspelt TLS key, a bad TLS version, and two
    // passwords.
    type Break = fn(&mut Value);
    let breaks: [(&str, Break); 3] = [
        ("tls_config.ca_fiel", |job| {
            let tls = job["tls_config"].as_object_mut().expect("tls_config");
            let ca = tls.remove("ca_file").expect("ca_file");
            tls.insert("ca_fiel".into(), ca);
        }),
        ("min_version TLS99", |job| {
            job["tls_config"]["min_version"] = json!("TLS99");
        }),
        ("password and password_file", |job| {
            job["basic_auth"]["password"] = json!("x");
        }),
    ];
    for (what, break_it) in breaks {
        let mut broken = config.clone();
        break_it(&mut broken["scrape_configs"][0]);
        let broken_path = dir.0.join("broken.yaml");
        fs::write(
            &broken_path,
            serde_yaml_ng::to_string(&broken).expect("YAML"),
        )
        .expect("write");
        let (ok, out) = promtool_check_config(&broken_path);
        assert!(!ok, "promtool accepted {what}:\n{out}");
        eprintln!("{what}: {}", out.trim().replace('\n', " "));
    }
}

#[test]
fn a_real_prometheus_scrapes_over_tls_with_basic_auth_and_nothing_else_gets_metrics() {
    if !require_root() {
        return;
    }
    let job = shipped_job();
    let server_name = job["tls_config"]["server_name"]
        .as_str()
        .expect("tls_config.server_name")
        .to_owned();
    let user = job["basic_auth"]["username"]
        .as_str()
        .expect("basic_auth.username")
        .to_owned();
    let dir = TempDir::new("web").expect("temp dir");
    make_certificates(&dir.0, &server_name);
    let web_config = shipped_web_config(&dir.0);
    let ca = dir.0.join("ca.crt");
    fs::write(dir.0.join("password"), PASSWORD).expect("write");
    fs::write(dir.0.join("wrong"), "not-the-password").expect("write");

    let pg = Postgres::start().expect("postgres");
    let port = pg.port.to_string();
    let addr = format!("127.0.0.1:{}", free_port().expect("port"));
    let web_config_arg = web_config.to_string_lossy().into_owned();
    let tracer = Tracer::start(&[
        "--port",
        &port,
        "--metrics-addr",
        &addr,
        "--web-config",
        &web_config_arg,
    ])
    .expect("tracer");
    let mut psql = pg.psql_spawn("127.0.0.1", "select pg_sleep(60)");

    // Straight at the endpoint.
    let get = |path: &str, auth: Option<(&str, &str)>| {
        https_get(&addr, &ca, &server_name, path, auth, Duration::from_secs(5)).expect("https get")
    };
    let r = get("/metrics", Some((&user, PASSWORD)));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("pgconn_tracer_build_info"), "{r:?}");
    let r = get("/healthz", Some((&user, PASSWORD)));
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    for path in ["/metrics", "/healthz"] {
        for auth in [
            None,
            Some((user.as_str(), "wrong")),
            Some(("admin", PASSWORD)),
        ] {
            let r = get(path, auth);
            assert_eq!(r.status, 401, "{path} {auth:?}: {r:?}");
            assert!(
                r.headers
                    .to_ascii_lowercase()
                    .contains("www-authenticate: basic"),
                "{r:?}"
            );
            assert!(!r.body.contains("pgconn_"), "{r:?}");
        }
    }
    match http_get(&addr, "/metrics", Duration::from_secs(5)) {
        Ok(r) => assert!(
            r.status != 200 && !r.body.contains("pgconn_"),
            "plain HTTP got an answer: {r:?}"
        ),
        Err(e) => eprintln!("plain HTTP to the TLS endpoint: {e:#}"),
    }

    // Prometheus with the shipped job, and the same job with a wrong password, without one,
    // and over plain HTTP.
    let mut good = job.clone();
    let object = good.as_object_mut().expect("a job");
    object.remove("kubernetes_sd_configs");
    // The relabelling keeps Kubernetes pods only.
    object.remove("relabel_configs");
    object.insert("static_configs".into(), json!([{ "targets": [addr] }]));
    object.insert("scrape_interval".into(), json!("1s"));
    object.insert("scrape_timeout".into(), json!("1s"));
    good["tls_config"]["ca_file"] = json!(ca.to_string_lossy());
    good["basic_auth"]["password_file"] = json!(dir.0.join("password").to_string_lossy());
    let job_name = good["job_name"].as_str().expect("job_name").to_owned();
    let mut wrong = good.clone();
    wrong["job_name"] = json!("wrong-password");
    wrong["basic_auth"]["password_file"] = json!(dir.0.join("wrong").to_string_lossy());
    let mut anonymous = good.clone();
    anonymous["job_name"] = json!("no-password");
    anonymous.as_object_mut().expect("job").remove("basic_auth");
    let mut plain = good.clone();
    plain["job_name"] = json!("plain-http");
    plain["scheme"] = json!("http");
    plain.as_object_mut().expect("job").remove("tls_config");
    let config = json!({
        "global": { "scrape_interval": "1s", "evaluation_interval": "1s" },
        "scrape_configs": [good, wrong, anonymous, plain],
    });
    let config = serde_yaml_ng::to_string(&config).expect("YAML");
    let config_path = dir.0.join("prometheus.yml");
    fs::write(&config_path, &config).expect("write");
    let (ok, out) = promtool_check_config(&config_path);
    assert!(ok, "promtool check config:\n{out}\n{config}");
    let prom = Prometheus::start_with_config(&config).expect("prometheus");

    wait_sample(&prom, &format!("up{{job=\"{job_name}\"}}"), 1.0);
    wait_sample(
        &prom,
        &format!(
            "pgconn_open_connections{{job=\"{job_name}\",comm=\"psql\",role=\"client\",state=\"active\"}}"
        ),
        1.0,
    );
    for refused in ["wrong-password", "no-password", "plain-http"] {
        wait_sample(&prom, &format!("up{{job=\"{refused}\"}}"), 0.0);
    }
    for refused in ["wrong-password", "no-password"] {
        let error = last_error(&prom, refused);
        assert!(error.contains("401"), "{refused}: {error}");
    }
    let plain_error = last_error(&prom, "plain-http");
    assert!(!plain_error.is_empty(), "plain HTTP scrape had no error");
    let leaked = prom
        .query("{job=~\"wrong-password|no-password|plain-http\",__name__=~\"pgconn_.*\"}")
        .expect("query");
    assert!(leaked.is_empty(), "refused jobs got metrics: {leaked:?}");

    let _ = psql.kill();
    let _ = psql.wait();
    drop(tracer);
}
