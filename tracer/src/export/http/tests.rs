#![allow(
    clippy::let_underscore_must_use,
    reason = "clean-up of processes, sockets and files that may be gone already, and calls made only to show they do not panic: their results are ignored on purpose"
)]
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::export::metrics::tests::{PSQL, assert_line, psql};

/// A one-shot HTTP/1.1 GET; returns (status, headers, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a full response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, head.to_owned(), body.to_owned())
}

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(5), future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

#[tokio::test(flavor = "current_thread")]
async fn endpoint_serves_health_metrics_and_stops_on_shutdown() {
    let listener = bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let metrics = Arc::new(Metrics::new(10, "9.9.9"));
    metrics.connection_opened(&psql());
    let ready = Arc::new(AtomicBool::new(false));
    let live = Arc::new(LiveTable::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        Arc::clone(&metrics),
        Arc::clone(&ready),
        Protection::default(),
        Arc::clone(&live),
        async move {
            let _ = stopped.await;
        },
    ));

    let (status, _, body) = within("healthz", get(addr, "/healthz")).await;
    assert_eq!((status, body.as_str()), (503, "not ready\n"));
    ready.store(true, Ordering::Release);
    let (status, _, body) = within("healthz", get(addr, "/healthz")).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    let (status, head, body) = within("metrics", get(addr, "/metrics")).await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_line(&body, r#"pgconn_tracer_build_info{version="9.9.9"} 1"#);
    assert_line(
        &body,
        &format!("pgconn_connections_opened_total{{{PSQL}}} 1"),
    );

    let (status, _, _) = within("404", get(addr, "/nope")).await;
    assert_eq!(status, 404);

    // The live table: 503 until the first tick publishes it, then the rows as JSON.
    let (status, _, _) = within("live", get(addr, API_PATH)).await;
    assert_eq!(status, 503);
    live.publish(Vec::new(), 1);
    let (status, head, body) = within("live", get(addr, API_PATH)).await;
    assert_eq!((status, body.as_str()), (200, "[]"));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );

    // An idle client connection must not hold shutdown up.
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    tokio::task::yield_now().await;
    stop.send(()).expect("server still running");
    let result = within("serve to return", server).await.expect("join");
    assert!(result.is_ok(), "{result:?}");
    let mut buf = [0_u8; 16];
    let n = within("idle connection closed", idle.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "idle connection got data after shutdown");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener still accepting after shutdown"
    );
}
