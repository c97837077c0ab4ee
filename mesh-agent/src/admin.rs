//! The agent's small HTTP endpoints: `/metrics` (:15020), `/ready`, `/live` (:15021) and the
//! admin port. Pods can reach the node's address, so each listener bounds what a client can
//! hold: the request head must arrive within the head timeout, and only so many connections
//! are served at once (more are closed at accept and counted).

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::IntCounter;
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::debug;

/// Answers a request path with a status and a text body.
pub type Handler = Arc<dyn Fn(&str) -> (StatusCode, String) + Send + Sync>;

/// Connections one endpoint listener serves at once.
pub const MAX_CONNECTIONS: usize = 256;

/// How one endpoint listener protects itself.
#[derive(Clone)]
pub struct Limits {
    /// A client must send its whole request head within this (slowloris).
    pub head_timeout: Duration,
    /// Counts connections closed at accept because [`MAX_CONNECTIONS`] were open.
    pub over_capacity: IntCounter,
    /// Counts connections cut because their request head was too slow.
    pub head_timeouts: IntCounter,
}

pub async fn serve(listener: TcpListener, handler: Handler, limits: Limits) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            limits.over_capacity.inc();
            continue;
        };
        let handler = handler.clone();
        let head_timeout = limits.head_timeout;
        let head_timeouts = limits.head_timeouts.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, body) = handler(req.uri().path());
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                if e.is_timeout() {
                    head_timeouts.inc();
                }
                debug!("endpoint connection: {e}");
            }
        });
    }
}
