//! `--web-config FILE`: the Prometheus exporter-toolkit web configuration (the file
//! node_exporter, postgres_exporter and pgbouncer_exporter take), applied by the HTTP server
//! to every connection and every request, whatever the path. Owns the file format and its
//! validation before anything is attached; [`protection`] applies it (TLS handshake,
//! basic-auth check, re-reading changed files).
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt          # relative paths: from the web config's directory
//!   key_file: server.key
//!   client_auth_type: RequireAndVerifyClientCert   # optional, with client_ca_file
//!   client_ca_file: clients-ca.crt
//!   min_version: TLS12             # optional: TLS12 or TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$...         # bcrypt hashes (htpasswd -nBC 10 prometheus)
//! ```
//!
//! bcrypt costs 50-100 ms per check at cost 10: checks run on the blocking pool, one at a
//! time (a password guesser cannot take more than one core), and a successful check is
//! remembered (a digest of user and password, as exporter-toolkit caches it) so that
//! Prometheus's scrapes cost one bcrypt run per daemon life.
//!
//! Like exporter-toolkit, the daemon picks up a changed web config, certificate or key
//! without a restart ([`protection`]); unlike it, a changed file that fails the checks keeps
//! the previous config in force (logged) rather than failing requests.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use serde::Deserialize;

/// The file as written. Keys of the exporter-toolkit format that the tracer does not
/// implement are read so that they can be refused by name rather than ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfigFile {
    tls_server_config: Option<TlsFile>,
    basic_auth_users: Option<BTreeMap<String, String>>,
    http_server_config: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: Option<String>,
    key_file: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<String>,
    min_version: Option<String>,
    max_version: Option<String>,
    cert: Option<serde_yaml_ng::Value>,
    key: Option<serde_yaml_ng::Value>,
    client_ca: Option<serde_yaml_ng::Value>,
    cipher_suites: Option<serde_yaml_ng::Value>,
    curve_preferences: Option<serde_yaml_ng::Value>,
    prefer_server_cipher_suites: Option<serde_yaml_ng::Value>,
    client_allowed_sans: Option<serde_yaml_ng::Value>,
}

/// Why `--web-config FILE` was refused; always one line naming the file and the problem.
#[derive(Debug, thiserror::Error)]
#[error("web config {}: {reason}", path.display())]
pub struct WebConfigError {
    pub path: PathBuf,
    pub reason: String,
}

/// A validated web configuration: the TLS server set-up (certificates read and checked) and
/// the basic-auth users.
pub struct WebConfig {
    path: PathBuf,
    tls: Option<Arc<ServerConfig>>,
    /// User -> bcrypt hash.
    users: BTreeMap<String, String>,
    /// The web config and every file it names: a change to any of them is a new config.
    files: Vec<PathBuf>,
}

impl std::fmt::Debug for WebConfig {
    /// The file, whether TLS is on, and the user names; never the hashes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("path", &self.path)
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PartialEq for WebConfig {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
            && self.tls.is_some() == other.tls.is_some()
            && self.users == other.users
    }
}

impl WebConfig {
    /// Reads and checks `path`: YAML, keys, bcrypt hashes, certificate, key and client CA.
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let fail = |reason: String| WebConfigError {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        Self::parse(&text, path).map_err(fail)
    }

    /// Checks the text of the web config at `path`; relative file names in it are taken from
    /// its directory.
    fn parse(text: &str, path: &Path) -> Result<Self, String> {
        let dir = path.parent().unwrap_or(Path::new("."));
        // An empty file is valid and changes nothing (as in exporter-toolkit).
        let file: WebConfigFile = if text.trim().is_empty() {
            WebConfigFile::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| yaml_error(&e))?
        };
        if file.http_server_config.is_some() {
            return Err("http_server_config is not supported by tracer".into());
        }
        let mut files = vec![path.to_owned()];
        if let Some(t) = &file.tls_server_config {
            let named = [&t.cert_file, &t.key_file, &t.client_ca_file];
            files.extend(named.into_iter().flatten().map(|f| resolve(dir, f)));
        }
        let tls = file
            .tls_server_config
            .map(|t| server_config(t, dir).map(Arc::new))
            .transpose()?;
        let users = file.basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            if user.is_empty() || user.contains(':') {
                return Err(format!(
                    "basic_auth_users: user name {user:?} cannot be sent in basic auth"
                ));
            }
            hash.parse::<bcrypt::HashParts>().map_err(|e| {
                format!(
                    "basic_auth_users.{user}: not a bcrypt hash ({e}); make one with \
                     `htpasswd -nBC 10 {user}`"
                )
            })?;
        }
        Ok(Self {
            path: path.to_owned(),
            tls,
            users,
            files,
        })
    }

    /// Whether connections are TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// The YAML parser's message on one line, without the values it quotes: a misplaced
/// password or hash must not end up in a log line.
fn yaml_error(e: &serde_yaml_ng::Error) -> String {
    let message = crate::config::flatten(&e.to_string());
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                out.push_str("(value not shown)");
            }
            ('"', true) => quoted = false,
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

fn resolve(dir: &Path, file: &str) -> PathBuf {
    dir.join(file)
}

fn read_pem(dir: &Path, key: &str, file: &str) -> Result<Vec<u8>, String> {
    let path = resolve(dir, file);
    std::fs::read(&path).map_err(|e| format!("{key} {}: {e}", path.display()))
}

/// The rustls server set-up of a `tls_server_config`.
fn server_config(t: TlsFile, dir: &Path) -> Result<ServerConfig, String> {
    reject_unsupported(&t)?;
    let cert_file = t.cert_file.ok_or("tls_server_config: missing cert_file")?;
    let key_file = t.key_file.ok_or("tls_server_config: missing key_file")?;
    let certs = CertificateDer::pem_slice_iter(&read_pem(dir, "cert_file", &cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cert_file {cert_file}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("cert_file {cert_file}: no PEM certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_slice(&read_pem(dir, "key_file", &key_file)?)
        .map_err(|e| format!("key_file {key_file}: no PEM private key in it ({e})"))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions = protocol_versions(t.min_version.as_deref(), t.max_version.as_deref())?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("tls_server_config: {e}"))?;
    let auth_type = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let builder = match client_verifier(auth_type, t.client_ca_file, dir, provider)? {
        None => builder.with_no_client_auth(),
        Some(verifier) => builder.with_client_cert_verifier(verifier),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("cert_file {cert_file} / key_file {key_file}: {e}"))?;
    // The endpoint speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Keys of exporter-toolkit's `tls_server_config` that the tracer does not implement: refused
/// by name rather than ignored.
fn reject_unsupported(t: &TlsFile) -> Result<(), String> {
    for (key, given) in [
        ("cert", t.cert.is_some()),
        ("key", t.key.is_some()),
        ("client_ca", t.client_ca.is_some()),
        ("cipher_suites", t.cipher_suites.is_some()),
        ("curve_preferences", t.curve_preferences.is_some()),
        (
            "prefer_server_cipher_suites",
            t.prefer_server_cipher_suites.is_some(),
        ),
        ("client_allowed_sans", t.client_allowed_sans.is_some()),
    ] {
        if given {
            return Err(format!(
                "tls_server_config.{key} is not supported by tracer (use cert_file, key_file, \
                 client_ca_file, client_auth_type, min_version, max_version)"
            ));
        }
    }
    Ok(())
}

/// The client-certificate check of `client_auth_type` (exporter-toolkit's names), or `None`
/// for no client certificates.
fn client_verifier(
    auth_type: &str,
    ca_file: Option<String>,
    dir: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Option<Arc<dyn ClientCertVerifier>>, String> {
    match (auth_type, ca_file) {
        ("NoClientCert", None) => Ok(None),
        ("NoClientCert", Some(_)) => {
            Err("tls_server_config: client_ca_file given without a client_auth_type".into())
        }
        ("VerifyClientCertIfGiven" | "RequireAndVerifyClientCert", None) => Err(format!(
            "tls_server_config: client_auth_type {auth_type} needs client_ca_file"
        )),
        (kind @ ("VerifyClientCertIfGiven" | "RequireAndVerifyClientCert"), Some(ca_file)) => {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(&read_pem(dir, "client_ca_file", &ca_file)?) {
                let ca = ca.map_err(|e| format!("client_ca_file {ca_file}: {e}"))?;
                roots
                    .add(ca)
                    .map_err(|e| format!("client_ca_file {ca_file}: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "client_ca_file {ca_file}: no PEM certificate in it"
                ));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if kind == "VerifyClientCertIfGiven" {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            verifier
                .build()
                .map(Some)
                .map_err(|e| format!("client_ca_file {ca_file}: {e}"))
        }
        ("RequestClientCert" | "RequireAnyClientCert", _) => Err(format!(
            "tls_server_config: client_auth_type {auth_type} is not supported by tracer: \
             client certificates are always verified (VerifyClientCertIfGiven or \
             RequireAndVerifyClientCert)"
        )),
        (other, _) => Err(format!(
            "tls_server_config: unknown client_auth_type {other:?} (NoClientCert, \
             VerifyClientCertIfGiven, RequireAndVerifyClientCert)"
        )),
    }
}

fn protocol_versions(
    min: Option<&str>,
    max: Option<&str>,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    let rank = |key: &str, v: &str| match v {
        "TLS12" => Ok(0),
        "TLS13" => Ok(1),
        "TLS10" | "TLS11" => Err(format!(
            "tls_server_config.{key} {v}: TLS 1.0 and 1.1 are not supported (TLS12, TLS13)"
        )),
        _ => Err(format!(
            "tls_server_config.{key} {v:?}: expected TLS12 or TLS13"
        )),
    };
    let lo = min
        .map(|v| rank("min_version", v))
        .transpose()?
        .unwrap_or(0);
    let hi = max
        .map(|v| rank("max_version", v))
        .transpose()?
        .unwrap_or(1);
    if lo > hi {
        return Err("tls_server_config: min_version is above max_version".into());
    }
    Ok([&rustls::version::TLS12, &rustls::version::TLS13][lo..=hi].to_vec())
}

pub mod protection;

pub use protection::{ConnectionGuard, Protection, Stream};

#[cfg(test)]
mod tests;
