//! Serving connections, with the limits a front door needs: HTTP/1.1 with a header read timeout
//! (a client that trickles its headers is disconnected), a bound on each request's head (bytes
//! and fields: `crate::limits`), at most `max_connections` open at once (more wait in the listen
//! backlog until one closes), a connection closed after `max_requests_per_connection` requests
//! or `max_connection_age` (so no caller holds a share of the connection cap for free), the
//! peer's address on every request (protected mode), and a graceful stop that lets the requests
//! in flight finish. (`axum::serve` offers none of these settings.) The body read timeout is the
//! request extractor's (`crate::http::Incoming`).

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::shutdown::Shutdown;

/// Connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    pub header_timeout: Duration,
    pub max_connections: usize,
    pub max_requests_per_connection: u64,
    pub max_connection_age: Duration,
}

/// Serves `router` on `listener` until `shutdown`, then waits for open connections to finish.
pub async fn serve(listener: TcpListener, router: Router, limits: ServeLimits, shutdown: Shutdown) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (open_tx, open_rx) = watch::channel(());
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.clone().wait() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.clone().wait() => break,
        };
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().ok();
        let opened = std::time::Instant::now();
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let app = router.clone();
        let service = TowerToHyperService::new(tower::service_fn(
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                let app = app.clone();
                let served = served.clone();
                async move {
                    if let Some(p) = peer {
                        req.extensions_mut().insert(axum::extract::ConnectInfo(p));
                    }
                    let n = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    let mut resp = tower::ServiceExt::oneshot(app, req).await?;
                    if n >= limits.max_requests_per_connection
                        || opened.elapsed() >= limits.max_connection_age
                    {
                        // Answered, then closed: the client opens a new connection.
                        resp.headers_mut().insert(
                            axum::http::header::CONNECTION,
                            axum::http::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            },
        ));
        let stop = shutdown.clone();
        let open = open_rx.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(crate::limits::MAX_HEAD_BYTES)
                .max_headers(crate::limits::MAX_HEADERS)
                .keep_alive(true);
            {
                // The connection (and the router, the producer, it holds) is dropped before
                // `open` says it ended: when serving returns, no connection holds a client.
                let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    }
                    _ = stop.wait() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            }
            drop(permit);
            drop(open);
        });
    }
    drop(open_rx);
    drop(listener);
    open_tx.closed().await;
}
