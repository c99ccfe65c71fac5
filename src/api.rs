//! The control socket's HTTP API (the contract in ARCHITECTURE.md). Handlers read from the
//! shared view or hand a command to the connection's actor and wait for its reply.

use crate::daemon::{Command, ConfigCommand, DaemonError, Shared};
use crate::providers::{self, Input};
use crate::wire::{ApiError, ConnectionView, WireEvent};
use authkeeper_state::{ConnKey, Secret, StateName};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

type App = State<Arc<Shared>>;
type Key = Path<(String, String)>;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/providers", get(list_providers))
        .route("/v1/providers/{provider}/profiles", post(add_profile))
        .route("/v1/providers/{provider}/profiles/{profile}", delete(remove_profile))
        .route("/v1/connections", get(list_connections))
        .route("/v1/connections/{provider}/{profile}", get(connection))
        .route("/v1/connections/{provider}/{profile}/connect", post(connect))
        .route("/v1/connections/{provider}/{profile}/cancel", post(cancel))
        .route("/v1/connections/{provider}/{profile}/validate", post(validate))
        .route("/v1/connections/{provider}/{profile}/refresh", post(refresh))
        .route("/v1/connections/{provider}/{profile}/disconnect", post(disconnect))
        .route("/v1/connections/{provider}/{profile}/token", get(token))
        .route("/v1/connections/{provider}/{profile}/history", get(history))
        .route("/v1/events", get(events))
        .route("/v1/links", post(create_link))
        .route("/metrics", get(crate::metrics::scrape))
        .fallback(|| async { ApiError::not_found() })
        .with_state(shared)
}

/// Every error answer has the contract's shape, axum's own refusals too (a path that does
/// not decode, a method a route does not take): `{"error": "<code>", "message": "…"}`. The
/// socket's server applies it to every answer ([`crate::serve::Answers`]).
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let json =
        response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let text = match axum::body::to_bytes(response.into_body(), 4096).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status.canonical_reason().unwrap_or("refused").to_owned(),
    };
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    };
    (status, Json(json!({"error": code, "message": text}))).into_response()
}

async fn health(State(shared): App) -> Response {
    let config = match &shared.config.read().unwrap().error {
        None => json!({"ok": true}),
        Some((error, position)) => json!({
            "ok": false,
            "error": error,
            "line": position.map(|p| p.0),
            "column": position.map(|p| p.1),
        }),
    };
    // Connections running on settings the store kept, because no good config was read.
    let (total, on_stored, warnings) = {
        let conns = shared.conns.read().unwrap();
        let warned: Vec<&str> = conns.values().filter_map(|s| s.warning.as_deref()).collect();
        let mut distinct: Vec<String> = warned.iter().map(|w| w.to_string()).collect();
        distinct.sort();
        distinct.dedup();
        (conns.len(), warned.len(), distinct)
    };
    let paused: serde_json::Map<String, serde_json::Value> =
        shared.gates.iter().filter_map(|(name, gate)| Some((name.clone(), json!(gate.paused_until()?)))).collect();
    Json(json!({
        "ok": true,
        "version": env!("CARGO_PKG_VERSION"),
        "config": config,
        "scheduler": shared.deadlines.stats(),
        "connections": {"total": total, "busy": shared.awake(), "on_stored_settings": on_stored},
        "warnings": warnings,
        "schedules": *shared.schedules.read().unwrap(),
        "providers_paused_until": paused,
        "store": store_health(&shared),
    }))
    .into_response()
}

/// Whether the store takes writes, and with daemons sharing it, this one's membership.
fn store_health(shared: &Shared) -> serde_json::Value {
    let mut store = match shared.store_health.status() {
        None => json!({"ok": true}),
        Some((since, error)) => json!({"ok": false, "failing_since": since, "error": error,
            "message": "the store refuses writes: new work is refused until it takes them again"}),
    };
    if let Some(leases) = &shared.leases {
        store["member"] = json!(leases.id());
        store["members"] = json!(leases.members());
        // Lapsed: not renewed in time (the database is out of reach); nothing is acted on.
        store["lease"] = json!(if leases.valid() { "held" } else { "lapsed" });
    }
    store
}

async fn list_providers() -> Response {
    Json(providers::manifests()).into_response()
}

/// Views written per chunk of the `GET /v1/connections` stream.
const LIST_CHUNK: usize = 256;

/// Streamed: the list is written a chunk at a time as the client reads it, each chunk the next
/// connections in key order after the last one written, so the daemon holds one chunk at a
/// time whatever the number of connections. A connection added or removed while a list is
/// being read appears in it or not by where its key falls.
/// `GET /v1/connections?owner=discord:123456`: one owner's connections.
#[derive(Deserialize)]
struct ListQuery {
    owner: Option<String>,
}

async fn list_connections(State(shared): App, Query(q): Query<ListQuery>) -> Response {
    use std::ops::Bound::{Excluded, Unbounded};
    let policy = shared.policy();
    // (the last key written, whether anything was written yet), or `None` once closed.
    let start: Option<(Option<ConnKey>, bool)> = Some((None, false));
    let chunks = futures_util::stream::unfold(start, move |state| {
        let (shared, owner) = (shared.clone(), q.owner.clone());
        async move {
            let (after, started) = state?;
            let (chunk, last) = {
                let now = shared.clock.now();
                let conns = shared.conns.read().unwrap();
                let from = after.as_ref().map_or(Unbounded, Excluded);
                let chosen =
                    conns.range((from, Unbounded)).filter(|(k, _)| owner.as_ref().is_none_or(|o| k.profile == o));
                let chunk: Vec<_> =
                    chosen.take(LIST_CHUNK).map(|(k, s)| (k.clone(), s.committed.clone(), s.warnings(now))).collect();
                let last = chunk.last().map(|(k, _, _)| k.clone());
                (chunk, last)
            };
            let mut out = Vec::with_capacity(chunk.len() * 320 + 2);
            for (i, (_, machine, warnings)) in chunk.into_iter().enumerate() {
                out.push(match (started, i) {
                    (false, 0) => b'[',
                    _ => b',',
                });
                if let Err(e) =
                    serde_json::to_writer(&mut out, &ConnectionView::with_warnings(&machine, &policy, warnings))
                {
                    return Some((Err(e), None));
                }
            }
            match last {
                Some(last) => Some((Ok(Bytes::from(out)), Some((Some(last), true)))),
                // The end: close the array (or open and close it, when nothing was listed).
                None => Some((Ok(Bytes::from_static(if started { b"]" } else { b"[]" })), None)),
            }
        }
    });
    ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(chunks)).into_response()
}

async fn connection(State(shared): App, Path((provider, profile)): Key) -> Result<Response, ApiError> {
    let view = shared.lookup(&provider, &profile, |s| s.view(&shared.policy(), shared.clock.now()))?;
    Ok(Json(view).into_response())
}

/// Hand new work `make(reply)` to the connection's actor and wait for its answer.
async fn ask<T>(
    shared: &Arc<Shared>,
    provider: &str,
    profile: &str,
    make: impl FnOnce(oneshot::Sender<Result<T, DaemonError>>) -> Command,
) -> Result<T, ApiError> {
    Ok(shared.ask_new(&authkeeper_state::ConnKey::new(provider, profile), make).await?)
}

/// Hand a request to the config owner and wait for its answer.
async fn ask_config<T>(
    shared: &Shared,
    make: impl FnOnce(oneshot::Sender<Result<T, DaemonError>>) -> ConfigCommand,
) -> Result<T, ApiError> {
    let (reply, answer) = oneshot::channel();
    shared.config_tx.send(make(reply)).await.map_err(|_| DaemonError::ShuttingDown)?;
    Ok(answer.await.map_err(|_| DaemonError::ShuttingDown)??)
}

async fn add_profile(State(shared): App, Path(provider): Path<String>) -> Result<Response, ApiError> {
    let profile = ask_config(&shared, |reply| ConfigCommand::AddProfile { provider, reply }).await?;
    Ok((StatusCode::CREATED, Json(json!({ "profile": profile }))).into_response())
}

async fn remove_profile(State(shared): App, Path((provider, profile)): Key) -> Result<Response, ApiError> {
    let profile = ask_config(&shared, |reply| ConfigCommand::RemoveProfile { provider, profile, reply }).await?;
    Ok(Json(json!({ "profile": profile, "removed": true })).into_response())
}

#[derive(Deserialize)]
struct ConnectBody {
    flow: Option<String>,
    /// The flow's input fields (`username`, `password`, `api_key`, …), as strings.
    #[serde(flatten)]
    fields: serde_json::Map<String, serde_json::Value>,
}

async fn connect(State(shared): App, Path((provider, profile)): Key, body: Bytes) -> Result<Response, ApiError> {
    let body: ConnectBody = if body.iter().all(u8::is_ascii_whitespace) {
        ConnectBody { flow: None, fields: Default::default() }
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?
    };
    shared.lookup(&provider, &profile, |_| ())?;
    let manifest = providers::find(&provider).expect("looked up").manifest();
    let flow = match &body.flow {
        None => &manifest.flows[0],
        Some(flow) => manifest.flows.iter().find(|f| f.flow == flow).ok_or_else(|| {
            let known: Vec<_> = manifest.flows.iter().map(|f| f.flow).collect();
            // The value is not echoed: a secret pasted into the wrong field must not come back.
            ApiError::bad_request(format!("{provider} has no flow by that name; it supports: {}", known.join(", ")))
        })?,
    };
    let mut input = Input::new();
    for (name, value) in body.fields {
        if !flow.fields.contains(&name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "the {} flow takes no field {name:?} (it takes: {})",
                flow.flow,
                if flow.fields.is_empty() { "none".to_owned() } else { flow.fields.join(", ") }
            )));
        }
        let serde_json::Value::String(value) = value else {
            return Err(ApiError::bad_request(format!("the field {name:?} must be a string")));
        };
        input.insert(name, Secret::new(value));
    }
    let reply =
        ask(&shared, &provider, &profile, |reply| Command::Connect(Some(flow.flow.to_owned()), input, reply)).await?;
    Ok((StatusCode::ACCEPTED, Json(reply)).into_response())
}

async fn cancel(State(shared): App, Path((provider, profile)): Key) -> Result<Response, ApiError> {
    Ok(Json(ask(&shared, &provider, &profile, Command::Cancel).await?).into_response())
}

async fn validate(State(shared): App, Path((provider, profile)): Key) -> Result<Response, ApiError> {
    Ok(Json(ask(&shared, &provider, &profile, Command::Validate).await?).into_response())
}

async fn refresh(State(shared): App, Path((provider, profile)): Key) -> Result<Response, ApiError> {
    Ok(Json(ask(&shared, &provider, &profile, Command::Refresh).await?).into_response())
}

async fn disconnect(State(shared): App, Path((provider, profile)): Key) -> Result<Response, ApiError> {
    Ok(Json(ask(&shared, &provider, &profile, Command::Disconnect).await?).into_response())
}

async fn token(State(shared): App, Path((provider, profile)): Key) -> Response {
    token_answer(&shared, &provider, &profile)
}

/// The hot path of every consumer: the committed machine is read under the read lock and its
/// grant written straight into the answer's bytes. Not connected, the error answer.
fn token_json(shared: &Shared, provider: &str, profile: &str) -> Result<Bytes, ApiError> {
    thread_local! {
        /// Where this worker writes answers before they are copied out at their exact size.
        static ANSWER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
    }
    let now = shared.clock.now();
    let owner = authkeeper_state::is_owner_id(profile);
    let answer = match shared.lookup(provider, profile, |s| {
        let c = s.committed.connection();
        let live = s.committed.state_name() == StateName::Connected;
        match c.grant.as_ref().filter(|g| live && g.expires_at.is_none_or(|at| at > now)) {
            Some(grant) => Ok(ANSWER.with_borrow_mut(|buf| {
                buf.clear();
                let account = c.account.as_ref().map(|a| a.name.as_str());
                s.setup.write_token(grant, account, buf).map(|()| Bytes::copy_from_slice(buf))
            })),
            None => Err(Box::new(s.view(&shared.policy(), now))),
        }
    }) {
        // An owner never linked is as not connected as one whose link lapsed.
        Err(DaemonError::UnknownProfile { .. }) if owner => {
            let machine = authkeeper_state::Machine::new(ConnKey::new(provider, profile), now);
            Err(Box::new(ConnectionView::of(&machine, &shared.policy())))
        }
        Err(e) => return Err(ApiError::from(e)),
        Ok(answer) => answer,
    };
    match answer {
        Ok(Ok(json)) => Ok(json),
        Ok(Err(e)) => Err(ApiError::internal(e.to_string())),
        Err(view) if owner => {
            let message = shared.login_message(provider);
            Err(ApiError::from(DaemonError::LoginFirst { view, message }))
        }
        Err(view) => Err(ApiError::from(DaemonError::NotConnected(view))),
    }
}

fn token_answer(shared: &Shared, provider: &str, profile: &str) -> Response {
    match token_json(shared, provider, profile) {
        Ok(json) => {
            ([(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"))], json).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The socket's service: the router, with token lookups by plain ids (no percent-escapes,
/// which is every id a profile or owner can have unescaped) answered without it, as quick
/// answers ([`crate::serve::Quick`]). Routing,
/// path extraction and the router's per-request extensions were two thirds of a lookup's
/// allocations.
#[derive(Clone)]
pub struct Socket {
    router: Router,
    shared: Arc<Shared>,
}

impl Socket {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { router: router(shared.clone()), shared }
    }
}

/// `/v1/connections/{provider}/{profile}/token`, when both ids are plain.
fn token_path(path: &str) -> Option<(&str, &str)> {
    let ids = path.strip_prefix("/v1/connections/")?.strip_suffix("/token")?;
    let (provider, profile) = ids.split_once('/')?;
    let plain = |id: &str| !id.is_empty() && !id.contains(['/', '%']);
    (plain(provider) && plain(profile)).then_some((provider, profile))
}

/// Everything but a quick answer goes to the router.
impl tower::Service<axum::extract::Request> for Socket {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = <Router as tower::Service<axum::extract::Request>>::Future;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::extract::Request) -> Self::Future {
        tower::Service::call(&mut self.router, req)
    }
}

/// A token lookup by plain ids, answered before its (empty) body is read and without the router.
impl crate::serve::Quick for Socket {
    fn quick(&self, method: &axum::http::Method, path: &str) -> Option<Result<Bytes, Response>> {
        let (provider, profile) = token_path(path).filter(|_| method == axum::http::Method::GET)?;
        Some(token_json(&self.shared, provider, profile).map_err(IntoResponse::into_response))
    }
}

/// `POST /v1/links {"provider", "owner" | "profile"}` → 201 `{"url", "expires_at"}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkRequest {
    provider: String,
    owner: Option<String>,
    profile: Option<String>,
}

async fn create_link(
    State(shared): App,
    body: Result<Json<LinkRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| {
        DaemonError::BadRequest(format!("the body must be {{\"provider\", \"owner\" | \"profile\"}}: {e}"))
    })?;
    let profile = match (req.owner, req.profile) {
        (Some(owner), None) if authkeeper_state::is_owner_id(&owner) => owner,
        (Some(owner), None) => {
            return Err(DaemonError::BadRequest(format!(
                "{owner:?} is not an owner id: namespace:id, letters, digits and :._@-, up to 128 characters"
            ))
            .into());
        }
        (None, Some(profile)) => profile,
        _ => return Err(DaemonError::BadRequest("give exactly one of owner and profile".into()).into()),
    };
    let issued = crate::links::create(&shared, &req.provider, &profile).await?;
    Ok((StatusCode::CREATED, Json(issued)).into_response())
}

/// History outlives its connection: a profile removed from the config still answers here.
async fn history(State(shared): App, Path((provider, profile)): Key) -> Result<Response, ApiError> {
    let known = shared.lookup(&provider, &profile, |_| ());
    let store = shared.store.clone();
    let key = authkeeper_state::ConnKey::new(&provider, &profile);
    let rows = tokio::task::spawn_blocking(move || store.history(&key))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    match known {
        Err(e) if rows.is_empty() => Err(e.into()),
        _ => Ok(Json(rows).into_response()),
    }
}

async fn events(State(shared): App) -> Response {
    let mut stop = shared.shutdown.clone();
    let clock = shared.clock.clone();
    // This daemon's events, and the other daemons' transitions when they share the store.
    let local = BroadcastStream::new(shared.events.subscribe());
    let remote = BroadcastStream::new(shared.remote_events.subscribe());
    let lines = futures_util::stream::select(local, remote)
        .map(move |item| {
            let event = match item {
                Ok(event) => event,
                Err(BroadcastStreamRecvError::Lagged(n)) => WireEvent::Warning {
                    message: format!("this reader fell behind and missed {n} events"),
                    at: clock.now(),
                    provider: None,
                    profile: None,
                    next_attempt_at: None,
                },
            };
            let mut line = serde_json::to_vec(&event).expect("events serialize");
            line.push(b'\n');
            Ok::<_, std::convert::Infallible>(Bytes::from(line))
        })
        .take_until(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response()
}
