//! What the HTTP server applies from the web config: the TLS handshake of every connection
//! and the basic-auth check of every request, and the re-reading of the web config when its
//! files change (certificates are rotated in place: cert-manager, Kubernetes Secret volumes).
//!
//! Each new connection looks at the files' inode, size and modification time; when any of
//! them changed, the web config is loaded again. A new config that fails its checks is
//! logged and the previous one stays in force: a half-written certificate never opens the
//! endpoint, nor closes it.

use std::{
    collections::{BTreeMap, HashSet},
    io,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll},
    time::SystemTime,
};

use base64::Engine as _;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::Bytes,
    header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE},
};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::Semaphore,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::WebConfig;

/// Successful checks remembered at most; beyond, the memory starts again (users are few).
const MAX_REMEMBERED: usize = 1024;

/// The protection of the HTTP endpoint, as the web config says; nothing without one.
#[derive(Clone, Default)]
pub struct Protection {
    source: Option<Arc<Source>>,
}

/// The web config file and what was last loaded from it.
struct Source {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    /// The files of the config in force.
    files: Vec<PathBuf>,
    /// What those files looked like when last looked at (loaded, or refused).
    seen: Vec<Stamp>,
    guard: ConnectionGuard,
}

/// Enough of a file's metadata to notice that it was replaced or rewritten; `None` when it
/// cannot be read.
type Stamp = Option<(u64, u64, Option<SystemTime>)>;

fn stamps(files: &[PathBuf]) -> Vec<Stamp> {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .map(|m| (m.ino(), m.len(), m.modified().ok()))
        })
        .collect()
}

impl Protection {
    pub fn new(config: Option<&WebConfig>) -> Self {
        let Some(config) = config else {
            return Self::default();
        };
        let state = State {
            files: config.files.clone(),
            seen: stamps(&config.files),
            guard: ConnectionGuard::new(config, None),
        };
        Self {
            source: Some(Arc::new(Source {
                path: config.path.clone(),
                state: Mutex::new(state),
            })),
        }
    }

    /// The protection of a new connection: the web config in force, loaded again first if
    /// its files changed.
    pub fn for_connection(&self) -> ConnectionGuard {
        let Some(source) = &self.source else {
            return ConnectionGuard::default();
        };
        let mut state = source.state();
        let now = stamps(&state.files);
        if now != state.seen {
            // Stamps taken before loading: a change made while loading is seen next time.
            state.seen.clone_from(&now);
            match WebConfig::load(&source.path) {
                Ok(config) => {
                    log::info!("{}: loaded again", source.path.display());
                    state.guard = ConnectionGuard::new(&config, Some(&state.guard));
                    if config.files != state.files {
                        state.seen = stamps(&config.files);
                        state.files = config.files;
                    }
                }
                Err(err) => log::warn!("{err}; the previous web config stays in force"),
            }
        }
        state.guard.clone()
    }
}

impl Source {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state is replaced whole; a panicked holder cannot leave half of it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What applies to one connection: TLS, and basic auth on each of its requests.
#[derive(Clone, Default)]
pub struct ConnectionGuard {
    tls: Option<TlsAcceptor>,
    pub(super) auth: Option<Arc<BasicAuth>>,
}

pub(super) struct BasicAuth {
    users: BTreeMap<String, String>,
    /// SHA-256 digests of (user, password) that bcrypt accepted.
    verified: Mutex<HashSet<[u8; 32]>>,
    /// One bcrypt run at a time.
    verifying: Semaphore,
}

/// A connection after [`ConnectionGuard::handshake`].
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ConnectionGuard {
    /// The guard of `config`; the remembered checks of `previous` carry over when the users
    /// and their hashes did not change.
    fn new(config: &WebConfig, previous: Option<&ConnectionGuard>) -> Self {
        let kept = previous
            .and_then(|p| p.auth.clone())
            .filter(|auth| auth.users == config.users);
        Self {
            tls: config.tls.clone().map(TlsAcceptor::from),
            auth: kept.or_else(|| {
                (!config.users.is_empty()).then(|| {
                    Arc::new(BasicAuth {
                        users: config.users.clone(),
                        verified: Mutex::new(HashSet::new()),
                        verifying: Semaphore::new(1),
                    })
                })
            }),
        }
    }

    /// The TLS handshake when TLS is on. A client speaking plain HTTP fails here and gets
    /// nothing.
    pub async fn handshake(&self, stream: TcpStream) -> io::Result<Stream> {
        match &self.tls {
            Some(acceptor) => Ok(Stream::Tls(Box::new(acceptor.accept(stream).await?))),
            None => Ok(Stream::Plain(stream)),
        }
    }

    /// `None` when `request` may be served; else the answer to send instead (401 with
    /// `WWW-Authenticate: Basic`).
    pub async fn refuse<B>(&self, request: &Request<B>) -> Option<Response<Full<Bytes>>> {
        let auth = self.auth.as_ref()?;
        let credentials = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(basic_credentials);
        match credentials {
            Some((user, password)) if auth.check(&user, &password).await => None,
            _ => Some(unauthorized()),
        }
    }
}

/// `Authorization: Basic base64(user:password)` -> (user, password).
pub(super) fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

pub(super) fn digest(user: &str, password: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
    hasher.update((user.len() as u64).to_le_bytes());
    hasher.update(user.as_bytes());
    hasher.update(password.as_bytes());
    hasher.finalize().into()
}

impl BasicAuth {
    pub(super) async fn check(&self, user: &str, password: &str) -> bool {
        let key = digest(user, password);
        if self.remembered().contains(&key) {
            return true;
        }
        // An unknown user costs a bcrypt run too, so timing does not tell users apart.
        let known = self.users.contains_key(user);
        let Some(hash) = self
            .users
            .get(user)
            .or_else(|| self.users.values().next())
            .cloned()
        else {
            return false;
        };
        let Ok(_permit) = self.verifying.acquire().await else {
            return false;
        };
        let password = password.to_owned();
        let matches = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .is_ok_and(|r| r.unwrap_or(false));
        let ok = known && matches;
        if ok {
            let mut remembered = self.remembered();
            if remembered.len() >= MAX_REMEMBERED {
                remembered.clear();
            }
            remembered.insert(key);
        }
        ok
    }

    pub(super) fn remembered(&self) -> MutexGuard<'_, HashSet<[u8; 32]>> {
        // A set of digests stays consistent even if a holder panicked.
        self.verified.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"unauthorized\n")));
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    let headers = response.headers_mut();
    headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic"));
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
