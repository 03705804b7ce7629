//! Serving an axum router over HTTP/1.1 on a TCP listener, with bounded patience.
//!
//! `axum::serve` gives hyper no timer, so a client that opens a connection and sends half a
//! request header holds it forever (slowloris). This accept loop hands each connection to
//! hyper's HTTP/1 server with [`HEADER_READ_TIMEOUT`] (which also closes idle keep-alive
//! connections that send no next request) and keeps at most [`MAX_CONNECTIONS`] open.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A client must send a request's whole header within this time, else its connection is
/// closed. Local clients send theirs at once; 5 s leaves room for a loaded machine.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// Pause after a failed `accept` (e.g. out of file descriptors) before the next one.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting, asks
/// every connection to close after its current response, and waits until they have.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (close_tx, close_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot accept an HTTP connection");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                };
                if connections.len() >= MAX_CONNECTIONS {
                    tracing::debug!(%remote, "too many HTTP connections; closing a new one");
                    continue;
                }
                let service = TowerToHyperService::new(router.clone());
                let mut close = close_rx.clone();
                connections.spawn(async move {
                    let mut builder = http1::Builder::new();
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT);
                    let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
                    let closing = async {
                        let _ = close.wait_for(|c| *c).await;
                    };
                    let done = tokio::select! {
                        result = conn.as_mut() => Some(result),
                        () = closing => None,
                    };
                    let result = match done {
                        Some(result) => result,
                        None => {
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!(%remote, error = %e, "HTTP connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = close_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}
