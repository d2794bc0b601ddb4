//! The HTTP endpoint on the metrics address: `/metrics`, `/healthz` and the live table
//! (`/api/v1/connections`, see [`crate::export::live`]). TLS and basic auth from
//! `--web-config` are applied to every connection and request by
//! [`crate::export::web_config::Protection`], before any route is looked at.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use crate::export::{
    live::{API_PATH, FRESH_WAIT, LiveTable},
    metrics::Metrics,
    web_config::Protection,
};

/// Connections the endpoint serves at once; more wait in the listen backlog.
const MAX_HTTP_CONNECTIONS: usize = 32;
/// A client that has not finished its TLS handshake, or sent its request headers, by then is
/// dropped (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for responses in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed accept (for example EMFILE) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Binds first (so a bad or busy address fails before anything is attached), then serves.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the metrics endpoint"))
}

/// Serves `GET /metrics` (200, text format) and `GET /healthz` (200 `ok` once `ready`, 503
/// before) and `GET /api/v1/connections` (the `live` table) behind `protection` until
/// `shutdown` resolves; then stops accepting and lets responses in flight finish (at most
/// [`DRAIN_TIMEOUT`]).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    protection: Protection,
    live: Arc<LiveTable>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let (stream, permit) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = accept(&listener, &limit) => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    log::warn!("metrics endpoint: accept failed: {err}");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        let metrics = Arc::clone(&metrics);
        let ready = Arc::clone(&ready);
        let guard = protection.for_connection();
        let (http, watcher) = (http.clone(), graceful.watcher());
        let live = Arc::clone(&live);
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(HEADER_READ_TIMEOUT, guard.handshake(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => {
                        log::debug!("metrics endpoint: TLS handshake failed: {err}");
                        return;
                    }
                    Err(_) => {
                        log::debug!("metrics endpoint: TLS handshake timed out");
                        return;
                    }
                };
            let service = service_fn(move |request: Request<Incoming>| {
                let (metrics, ready, guard, live) = (
                    Arc::clone(&metrics),
                    Arc::clone(&ready),
                    guard.clone(),
                    Arc::clone(&live),
                );
                async move {
                    if let Some(refused) = guard.refuse(&request).await {
                        return Ok::<_, Infallible>(refused);
                    }
                    if request.uri().path() == API_PATH
                        && matches!(*request.method(), Method::GET | Method::HEAD)
                    {
                        wait_for_fresh_rows(&live).await;
                    }
                    Ok(respond(&request, &metrics, &ready, &live))
                }
            });
            let connection = watcher.watch(http.serve_connection(TokioIo::new(stream), service));
            if let Err(err) = connection.await {
                log::debug!("metrics endpoint: connection ended with an error: {err}");
            }
            drop(permit);
        });
    }

    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        log::debug!("metrics endpoint: gave up waiting for responses in flight");
    }
    Ok(())
}

async fn accept(
    listener: &TcpListener,
    limit: &Arc<Semaphore>,
) -> std::io::Result<(TcpStream, OwnedSemaphorePermit)> {
    // The semaphore is never closed, so this error cannot happen; map it rather than panic.
    let permit = Arc::clone(limit)
        .acquire_owned()
        .await
        .map_err(std::io::Error::other)?;
    let (stream, _) = listener.accept().await?;
    Ok((stream, permit))
}

fn respond<B>(
    request: &Request<B>,
    metrics: &Metrics,
    ready: &AtomicBool,
    live: &LiveTable,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | API_PATH) {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    if path == "/healthz" {
        return if ready.load(Ordering::Acquire) {
            plain(StatusCode::OK, "ok\n")
        } else {
            plain(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        };
    }
    if path == API_PATH {
        return live_table(live);
    }
    match metrics.try_render() {
        Ok(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(prometheus::TEXT_FORMAT),
            );
            response
        }
        Err(err) => {
            log::error!("metrics: cannot render: {err}");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot render metrics\n")
        }
    }
}

/// Rows older than [`crate::export::live::MAX_STALE`] (nobody read the table lately, so
/// the tick stopped building them): waits for the next tick's, at most [`FRESH_WAIT`].
async fn wait_for_fresh_rows(live: &LiveTable) {
    let Some(stale) = live.stale_at(crate::daemon::monotonic_ns()) else {
        return;
    };
    let deadline = tokio::time::Instant::now() + FRESH_WAIT;
    while tokio::time::Instant::now() < deadline && live.published_ns() == Some(stale) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /api/v1/connections`: the rows the last tick published, 503 before the first.
fn live_table(live: &LiveTable) -> Response<Full<Bytes>> {
    match live.to_json(crate::daemon::monotonic_ns()) {
        None => plain(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        Some(Ok(body)) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Some(Err(err)) => {
            log::error!("live table: cannot serialize: {err}");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot serialize the live table\n",
            )
        }
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests;
