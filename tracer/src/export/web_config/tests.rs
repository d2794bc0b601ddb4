//! The web config: what is accepted, every refusal as one line, and the real endpoint behind
//! it (TLS handshakes with certificates made here, basic auth, the bcrypt cache).
#![allow(
    clippy::let_underscore_must_use,
    reason = "clean-up of processes, sockets and files that may be gone already, and calls made only to show they do not panic: their results are ignored on purpose"
)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use base64::Engine as _;
use hyper::header::HeaderValue;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::{
    ClientConfig,
    pki_types::{PrivateKeyDer, ServerName},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{
    protection::{basic_credentials, digest},
    *,
};
use crate::{
    export::live::LiveTable,
    export::{
        http::{bind, serve},
        metrics::Metrics,
    },
};

/// Low cost: these tests check behaviour, not bcrypt's speed.
const COST: u32 = 4;

/// A directory of PEM files: a CA, a server certificate for localhost / 127.0.0.1 signed by
/// it, a client certificate signed by it, and a key that matches neither.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tracer-web-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca =
            CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, name: &str| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca).expect("sign");
            std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).expect("write");
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write");
        };
        leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        leaf(vec![], ExtendedKeyUsagePurpose::ClientAuth, "client");
        std::fs::write(dir.join("ca.crt"), ca.pem()).expect("write");
        std::fs::write(
            dir.join("other.key"),
            KeyPair::generate().expect("key").serialize_pem(),
        )
        .expect("write");
        std::fs::write(dir.join("garbage.pem"), "not a PEM file\n").expect("write");
        Self { dir }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    fn pem(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name)).expect("read")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn hash(password: &str) -> String {
    bcrypt::hash(password, COST).expect("bcrypt")
}

const TLS: &str = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n";

#[test]
fn a_full_config_loads_with_paths_relative_to_its_directory() {
    let pki = Pki::new();
    let text = format!(
        "{TLS}  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.crt\n  \
         min_version: TLS12\n  max_version: TLS13\n\
         basic_auth_users:\n  prometheus: {}\n  other: '{}'\n",
        hash("pw"),
        hash("x")
    );
    let config = WebConfig::load(&pki.write("web.yml", &text)).expect("loads");
    assert!(config.tls());
    assert_eq!(
        config.users.keys().collect::<Vec<_>>(),
        ["other", "prometheus"]
    );
    let shown = format!("{config:?}");
    assert!(!shown.contains("$2"), "Debug shows no hash: {shown}");

    // TLS only, basic auth only, and an empty file are valid too.
    assert!(
        WebConfig::load(&pki.write("tls.yml", TLS))
            .expect("tls")
            .tls()
    );
    let auth = format!("basic_auth_users:\n  u: {}\n", hash("p"));
    assert!(
        !WebConfig::load(&pki.write("auth.yml", &auth))
            .expect("auth")
            .tls()
    );
    let empty = WebConfig::load(&pki.write("empty.yml", "\n")).expect("empty");
    assert!(!empty.tls() && empty.users.is_empty());
}

#[test]
fn every_bad_config_is_one_line_naming_the_problem() {
    let pki = Pki::new();
    let good_hash = hash("pw");
    let cases: Vec<(String, &str)> = vec![
        ("tls_server_config: [\n".into(), "web.yml"),
        ("tls_server_config:\n  cert_file: [a\n".into(), "line"),
        ("bogus: 1\n".into(), "unknown field `bogus`"),
        (format!("{TLS}  key_flie: x\n"), "unknown field `key_flie`"),
        (
            "basic_auth_users:\n  prometheus: not-a-hash\n".into(),
            "basic_auth_users.prometheus: not a bcrypt hash",
        ),
        (
            "basic_auth_users:\n  prometheus: $2y$10$short\n".into(),
            "basic_auth_users.prometheus",
        ),
        (
            format!("basic_auth_users:\n  'a:b': {good_hash}\n"),
            "\"a:b\"",
        ),
        ("basic_auth_users: 5\n".into(), "basic_auth_users"),
        (
            "tls_server_config:\n  key_file: server.key\n".into(),
            "missing cert_file",
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n".into(),
            "missing key_file",
        ),
        (
            "tls_server_config:\n  cert_file: nope.crt\n  key_file: server.key\n".into(),
            "cert_file",
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: nope.key\n".into(),
            "No such file",
        ),
        (
            "tls_server_config:\n  cert_file: garbage.pem\n  key_file: server.key\n".into(),
            "no PEM certificate",
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: garbage.pem\n".into(),
            "no PEM private key",
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: other.key\n".into(),
            "key_file other.key",
        ),
        (
            format!("{TLS}  client_ca_file: ca.crt\n"),
            "without a client_auth_type",
        ),
        (
            format!("{TLS}  client_auth_type: RequireAndVerifyClientCert\n"),
            "needs client_ca_file",
        ),
        (
            format!("{TLS}  client_auth_type: RequireAnyClientCert\n  client_ca_file: ca.crt\n"),
            "not supported",
        ),
        (
            format!("{TLS}  client_auth_type: Sometimes\n"),
            "unknown client_auth_type",
        ),
        (
            format!(
                "{TLS}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: garbage.pem\n"
            ),
            "client_ca_file garbage.pem",
        ),
        (format!("{TLS}  min_version: TLS10\n"), "min_version TLS10"),
        (format!("{TLS}  max_version: SSL3\n"), "max_version"),
        (
            format!("{TLS}  min_version: TLS13\n  max_version: TLS12\n"),
            "above max_version",
        ),
        (
            format!("{TLS}  cipher_suites: [TLS_AES_128_GCM_SHA256]\n"),
            "cipher_suites is not supported",
        ),
        (
            "http_server_config:\n  http2: false\n".into(),
            "http_server_config is not supported",
        ),
        // A value in the wrong place is not quoted back (it may be a password).
        (
            "basic_auth_users: hunter2-secret\n".into(),
            "(value not shown)",
        ),
        ("tls_server_config: 'hunter2-secret'\n".into(), "line 1"),
    ];
    for (text, needle) in cases {
        let path = pki.write("web.yml", &text);
        let err = WebConfig::load(&path).expect_err(&text).to_string();
        assert!(!err.contains('\n'), "{text:?}: {err:?}");
        assert!(err.starts_with("web config "), "{text:?}: {err}");
        assert!(err.contains(&*path.to_string_lossy()), "{text:?}: {err}");
        assert!(err.contains(needle), "{text:?}: {err:?} lacks {needle:?}");
        assert!(!err.contains("hunter2"), "{text:?}: {err:?} quotes a value");
    }
    let missing = pki.dir.join("missing.yml");
    let err = WebConfig::load(&missing).expect_err("missing").to_string();
    assert!(
        err.contains("cannot read") && err.contains("missing.yml"),
        "{err}"
    );
}

#[test]
fn basic_credentials_are_read_from_the_header() {
    let header = |s: &str| HeaderValue::from_str(s).expect("header");
    assert_eq!(
        basic_credentials(&header("Basic cHJvbTpzM2NyZXQ6eA==")),
        Some(("prom".into(), "s3cret:x".into()))
    );
    assert_eq!(
        basic_credentials(&header("basic  cHJvbTpz ")),
        Some(("prom".into(), "s".into()))
    );
    for bad in [
        "Bearer cHJvbTpz",
        "Basic !!!",
        "Basic cHJvbQ==",
        "Basic",
        "",
    ] {
        assert_eq!(basic_credentials(&header(bad)), None, "{bad:?}");
    }
}

/// The daemon's endpoint behind `config`, on a free loopback port.
async fn endpoint(config: &WebConfig) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let metrics = Arc::new(Metrics::new(10, "9.9.9"));
    let ready = Arc::new(AtomicBool::new(true));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        metrics,
        ready,
        Protection::new(Some(config)),
        Arc::new(LiveTable::default()),
        async move {
            let _ = stopped.await;
        },
    ));
    (addr, stop)
}

fn client_config(pki: &Pki, client_cert: bool) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&pki.pem("ca.crt")) {
        roots.add(ca.expect("ca")).expect("add");
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
    Arc::new(if client_cert {
        let chain = CertificateDer::pem_slice_iter(&pki.pem("client.crt"))
            .collect::<Result<Vec<_>, _>>()
            .expect("chain");
        let key = PrivateKeyDer::from_pem_slice(&pki.pem("client.key")).expect("key");
        builder
            .with_client_auth_cert(chain, key)
            .expect("client auth")
    } else {
        builder.with_no_client_auth()
    })
}

fn request(path: &str, auth: Option<(&str, &str)>) -> String {
    let auth = auth.map_or(String::new(), |(u, p)| {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        format!("Authorization: Basic {encoded}\r\n")
    });
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
}

/// A GET over TLS; the whole answer, or the error of the handshake or the read.
async fn tls_get(
    addr: SocketAddr,
    client: Arc<ClientConfig>,
    path: &str,
    auth: Option<(&str, &str)>,
) -> std::io::Result<String> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await?;
    tls.write_all(request(path, auth).as_bytes()).await?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await?;
    Ok(answer)
}

async fn plain_get(addr: SocketAddr, path: &str, auth: Option<(&str, &str)>) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(request(path, auth).as_bytes())
        .await
        .expect("send");
    let mut raw = Vec::new();
    // A TLS server answers plain HTTP with a TLS alert or nothing, then closes.
    let _ = tcp.read_to_end(&mut raw).await;
    String::from_utf8_lossy(&raw).into_owned()
}

fn status(answer: &str) -> &str {
    answer.split_whitespace().nth(1).unwrap_or("")
}

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_basic_auth_guard_every_path_and_remember_good_passwords() {
    let pki = Pki::new();
    let text = format!("{TLS}basic_auth_users:\n  prometheus: {}\n", hash("s3cret"));
    let config = WebConfig::load(&pki.write("web.yml", &text)).expect("loads");
    let (addr, _stop) = endpoint(&config).await;
    let client = client_config(&pki, false);
    let get = |path: &'static str, auth: Option<(&'static str, &'static str)>| {
        let client = client.clone();
        async move {
            within(path, tls_get(addr, client, path, auth))
                .await
                .expect("tls get")
        }
    };

    let ok = get("/metrics", Some(("prometheus", "s3cret"))).await;
    assert_eq!(status(&ok), "200", "{ok}");
    assert!(
        ok.contains("pgconn_tracer_build_info{version=\"9.9.9\"} 1"),
        "{ok}"
    );
    let health = get("/healthz", Some(("prometheus", "s3cret"))).await;
    assert_eq!(status(&health), "200", "{health}");

    for path in ["/metrics", "/healthz", "/nope"] {
        for auth in [
            None,
            Some(("prometheus", "wrong")),
            Some(("nobody", "s3cret")),
            Some(("prometheus", "")),
        ] {
            let answer = get(path, auth).await;
            assert_eq!(status(&answer), "401", "{path} {auth:?}: {answer}");
            assert!(
                answer
                    .to_ascii_lowercase()
                    .contains("www-authenticate: basic"),
                "{answer}"
            );
            assert!(!answer.contains("pgconn_"), "{answer}");
        }
    }

    // Plain HTTP to the TLS endpoint: no HTTP answer, no metrics.
    let plain = within(
        "plain",
        plain_get(addr, "/metrics", Some(("prometheus", "s3cret"))),
    )
    .await;
    assert!(
        !plain.contains("HTTP/1.1 200") && !plain.contains("pgconn_"),
        "{plain:?}"
    );

    // The good password was checked by bcrypt once; later scrapes hit the cache.
    let auth = Protection::new(Some(&config))
        .for_connection()
        .auth
        .expect("auth");
    let key = digest("prometheus", "s3cret");
    assert!(!auth.remembered().contains(&key));
    assert!(auth.check("prometheus", "s3cret").await);
    assert!(auth.remembered().contains(&key));
    assert!(!auth.check("prometheus", "nope").await);
    assert!(!auth.check("nobody", "s3cret").await);
    assert_eq!(auth.remembered().len(), 1, "failures are not remembered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_when_the_config_says_so() {
    let pki = Pki::new();
    let text =
        format!("{TLS}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n");
    let config = WebConfig::load(&pki.write("web.yml", &text)).expect("loads");
    let (addr, _stop) = endpoint(&config).await;
    let with_cert = within(
        "with cert",
        tls_get(addr, client_config(&pki, true), "/metrics", None),
    )
    .await
    .expect("with a client certificate");
    assert_eq!(status(&with_cert), "200", "{with_cert}");
    let without = within(
        "without cert",
        tls_get(addr, client_config(&pki, false), "/metrics", None),
    )
    .await;
    assert!(
        without.as_ref().is_err() || !without.as_ref().is_ok_and(|a| a.contains("pgconn_")),
        "{without:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_without_tls_guards_plain_http() {
    let pki = Pki::new();
    let text = format!("basic_auth_users:\n  prometheus: {}\n", hash("pw"));
    let config = WebConfig::load(&pki.write("web.yml", &text)).expect("loads");
    let (addr, _stop) = endpoint(&config).await;
    let refused = within("no auth", plain_get(addr, "/healthz", None)).await;
    assert_eq!(status(&refused), "401", "{refused}");
    let ok = within(
        "auth",
        plain_get(addr, "/healthz", Some(("prometheus", "pw"))),
    )
    .await;
    assert_eq!(status(&ok), "200", "{ok}");
}

/// Replaces `name` in `dir` the way Kubernetes updates a Secret volume and most tools write
/// files: a new file renamed over the old one.
fn replace(dir: &Path, name: &str, contents: &[u8]) {
    let staged = dir.join(format!(".{name}.new"));
    std::fs::write(&staged, contents).expect("write");
    std::fs::rename(&staged, dir.join(name)).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_config_or_certificate_is_picked_up_and_a_broken_one_ignored() {
    let pki = Pki::new();
    let users =
        |password: &str| format!("{TLS}basic_auth_users:\n  prometheus: {}\n", hash(password));
    let config = WebConfig::load(&pki.write("web.yml", &users("one"))).expect("loads");
    let (addr, _stop) = endpoint(&config).await;
    let status_of = |client: Arc<ClientConfig>, password: &'static str| async move {
        match within(
            "get",
            tls_get(addr, client, "/metrics", Some(("prometheus", password))),
        )
        .await
        {
            Ok(answer) => status(&answer).to_owned(),
            Err(err) => format!("error: {err}"),
        }
    };
    let client = client_config(&pki, false);
    assert_eq!(status_of(client.clone(), "one").await, "200");

    // A new password.
    replace(&pki.dir, "web.yml", users("two").as_bytes());
    assert_eq!(status_of(client.clone(), "one").await, "401");
    assert_eq!(status_of(client.clone(), "two").await, "200");

    // A broken config leaves the last good one in force.
    replace(&pki.dir, "web.yml", b"basic_auth_users: [\n");
    assert_eq!(status_of(client.clone(), "two").await, "200");
    replace(
        &pki.dir,
        "web.yml",
        b"basic_auth_users:\n  prometheus: not-a-hash\n",
    );
    assert_eq!(status_of(client.clone(), "two").await, "200");
    replace(&pki.dir, "web.yml", users("two").as_bytes());

    // A certificate from another CA, rotated in place: clients of the new CA get in, clients
    // that only trust the old one no longer do.
    let rotated = Pki::new();
    replace(&pki.dir, "server.key", &rotated.pem("server.key"));
    replace(&pki.dir, "server.crt", &rotated.pem("server.crt"));
    assert_eq!(
        status_of(client_config(&rotated, false), "two").await,
        "200"
    );
    assert!(status_of(client, "two").await.starts_with("error"));
}
