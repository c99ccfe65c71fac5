//! How both listeners (the control socket and the web listener) serve HTTP/1.1: a request's
//! headers must arrive within the time limit (hyper's header read timeout, which also closes a
//! keep-alive connection left idle that long), and its body must arrive whole, within the size
//! limit and the same time limit, before any handler sees it. A request that breaks a limit is
//! answered 413 or 408 and nothing of it is kept.

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{Either, Full};
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
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

/// The request with its whole body, read within `limits`. A request that declares no body
/// (a `GET`, say) is handed on at once: there is nothing to wait for.
async fn receive(req: hyper::Request<hyper::body::Incoming>, limits: Limits) -> Result<Request, RequestError> {
    if req.body().is_end_stream() {
        return Ok(req.map(Body::new));
    }
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, limits.max_body);
    match tokio::time::timeout(limits.timeout, http_body_util::BodyExt::collect(limited)).await {
        Ok(Ok(collected)) => Ok(Request::from_parts(parts, Body::from(collected.to_bytes()))),
        Err(_) => Err(RequestError::TooSlow(limits.timeout.as_secs())),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(RequestError::TooLarge(limits.max_body)),
        Ok(Err(_)) => Err(RequestError::Unreadable),
    }
}

/// The answer to a request that broke a limit: its connection is not reused, since what is
/// left of its body is never read.
fn refused(refuse: fn(RequestError) -> Response, e: RequestError) -> Response {
    let mut response = refuse(e);
    response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    response
}

/// An answer a listener's service makes from the request line alone, before the router and
/// without a body: the socket's token lookups, every consumer's hot path. What it answers must
/// be what the service would have answered.
pub trait Quick {
    /// `Some(Ok(json))` is answered 200 with `json` as it is; `Some(Err(response))` is shaped
    /// by the listener's `finish` like any answer; `None` hands the request to the service.
    fn quick(&self, _method: &Method, _path: &str) -> Option<Result<Bytes, Response>> {
        None
    }
}

impl Quick for axum::Router {}

/// A quick answer's body, or the service's.
type Answer = hyper::Response<Either<Full<Bytes>, Body>>;

/// A 200 JSON answer of `json`, without the boxed body and copied header an axum answer takes.
fn quick_json(json: Bytes) -> Answer {
    let mut answer = hyper::Response::new(Either::Left(Full::new(json)));
    answer.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    answer
}

/// How a listener answers, around its service: `refuse` makes the answer to a request that
/// broke a limit, and `finish` shapes every answer, refusals included (the socket's errors are
/// JSON, the web listener's answers carry the pages' headers). With `peer`, each request carries
/// its peer's address as `ConnectInfo`.
#[derive(Clone, Copy)]
pub struct Answers<F> {
    pub limits: Limits,
    pub refuse: fn(RequestError) -> Response,
    pub finish: F,
    pub peer: bool,
}

/// Serve `app` on `listener` until `shutdown` turns true, then let the requests in flight
/// finish (for at most the time limit). A request reaches `app` only once its whole body has
/// arrived within the limits.
pub async fn serve<L, S, F, Fut>(
    mut listener: L,
    app: S,
    answers: Answers<F>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: Clone + Send + Sync + 'static,
    S: tower::Service<Request, Response = Response, Error = Infallible> + Quick + Clone + Send + Sync + 'static,
    S::Future: Send,
    F: Fn(Response) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send,
{
    let limits = answers.limits;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (io, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            // A quick answer is made here, before the service and the peer's address are
            // cloned for the request: both are shared between workers.
            let quick = req.body().is_end_stream().then(|| app.quick(req.method(), req.uri().path()));
            let quick = quick.flatten().ok_or_else(|| (app.clone(), addr.clone()));
            async move {
                let response = match quick {
                    Ok(Ok(json)) => return Ok::<_, Infallible>(quick_json(json)),
                    Ok(Err(response)) => response,
                    Err((app, addr)) => match receive(req, answers.limits).await {
                        Ok(mut req) => {
                            if answers.peer {
                                req.extensions_mut().insert(ConnectInfo(addr));
                            }
                            app.oneshot(req).await.unwrap_or_else(|never| match never {})
                        }
                        Err(e) => refused(answers.refuse, e),
                    },
                };
                Ok::<_, Infallible>((answers.finish)(response).await.map(Either::Right))
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(HeadTimer::default()).header_read_timeout(limits.timeout);
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

/// One connection's timer for hyper's header read timeout. hyper asks for a new timer for
/// every request's head and drops it once the head is in: with tokio's timer, an entry into
/// the timer wheel and out again, under the wheel's lock, on every request. Here a connection
/// keeps one tokio sleep across its requests; a head's timer only carries its deadline, and the
/// sleep is moved on when it fires before that deadline (on a busy connection, once per time
/// limit). A head still has exactly the time limit to arrive.
#[derive(Clone, Default)]
struct HeadTimer(Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>);

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    /// Tokio's clock, which tests may pause.
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into()
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep { sleep: self.0.clone(), deadline: deadline.into() })
    }
}

struct HeadSleep {
    sleep: Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
    deadline: tokio::time::Instant,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        let mut shared = self.sleep.lock().unwrap_or_else(PoisonError::into_inner);
        let sleep = shared.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) if tokio::time::Instant::now() < deadline => {
                // An earlier head's deadline: wait on for this one's.
                sleep.as_mut().reset(deadline);
                sleep.as_mut().poll(cx)
            }
            polled => polled,
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}

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
