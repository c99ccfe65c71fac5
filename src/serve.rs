//! How both listeners (the control socket and the web listener) serve HTTP/1.1: a request's
//! headers must arrive within the time limit (hyper's header read timeout, which also closes a
//! keep-alive connection left idle that long), and its body must arrive whole, within the size
//! limit and the same time limit, before any handler sees it. A request that breaks a limit is
//! answered 413 or 408 and nothing of it is kept.

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::time::Duration;
use tower::ServiceExt;

/// The largest request body either listener takes (a connect body is a few hundred bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// How long a request may take to arrive, headers and body each, unless the config says
/// otherwise (`authkeeper.request_timeout_secs`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The limits a listener enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_body: usize,
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_body: MAX_BODY, timeout: REQUEST_TIMEOUT }
    }
}

/// Why a request was refused before any handler saw it.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the request body did not arrive within {0} s")]
    TooSlow(u64),
    #[error("the request body could not be read")]
    Unreadable,
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooSlow(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Unreadable => StatusCode::BAD_REQUEST,
        }
    }
}

/// Read the whole body within `limits`, then hand the request on; `refuse` makes the answer
/// to a request that broke a limit (JSON on the socket, a page on the web listener).
pub async fn buffer_body(limits: Limits, refuse: fn(RequestError) -> Response, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(limits.timeout, axum::body::to_bytes(body, limits.max_body)).await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Err(_) => return refuse(RequestError::TooSlow(limits.timeout.as_secs())),
        Ok(Err(e)) if is_length_limit(&e) => return refuse(RequestError::TooLarge(limits.max_body)),
        Ok(Err(_)) => return refuse(RequestError::Unreadable),
    };
    let mut response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    // A refused request's connection is not reused: what is left of its body is never read.
    if matches!(response.status(), StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT) {
        response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    response
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Add the limits to `router`, refusing with `refuse`.
pub fn limited(router: Router, limits: Limits, refuse: fn(RequestError) -> Response) -> Router {
    router.layer(axum::middleware::from_fn(move |req: Request, next: Next| buffer_body(limits, refuse, req, next)))
}

/// Serve `router` on `listener` until `shutdown` turns true, then let the requests in flight
/// finish (for at most the time limit). Each request carries its peer's address as `ConnectInfo`.
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: Limits,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: Clone + Send + Sync + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (io, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnectInfo(addr.clone()));
            router.clone().oneshot(req)
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(limits.timeout);
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(io), service));
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a connection ended with an error");
            }
        });
    }
    // A client that stopped reading (a stalled `/v1/events` reader) must not hold the daemon
    // up: what is still open after the time limit is closed.
    let drained = tokio::time::timeout(limits.timeout, async {
        graceful.shutdown().await;
        while connections.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::warn!(open = connections.len(), "connections still open at shutdown; closing them");
        connections.shutdown().await;
    }
    Ok(())
}

/// An error answer of the socket's shape for a refused request.
pub fn json_refusal(e: RequestError) -> Response {
    let code = match e {
        RequestError::TooLarge(_) => "payload_too_large",
        RequestError::TooSlow(_) => "request_timeout",
        RequestError::Unreadable => "bad_request",
    };
    let body = serde_json::json!({"error": code, "message": e.to_string()});
    (e.status(), axum::Json(body)).into_response()
}
