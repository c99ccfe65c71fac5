//! The web listener: only what a browser needs, never the control API. Off until
//! `"authkeeper": {"web": {"listen": …, "public_url": …}}` is set; bound to loopback by default.
//!
//! `GET /oauth/callback/{provider}` is where a provider sends the browser back after a login.
//! The redirect URI a flow gives the provider is always `{public_url}/oauth/callback/{provider}`
//! from the config, never derived from a request, so switching a browser between HTTP and HTTPS
//! changes nothing. A callback is matched to its pending flow by the flow's random `state`
//! (TMDB's request token), which is used once and dies with the flow.

pub mod pages;

use crate::daemon::{CallbackError, Command, Shared};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use reqwest::Url;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

/// Where a listener binds when the config names none.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8765";

/// The `"web"` block of `"authkeeper"`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebSettings {
    /// `127.0.0.1:PORT` (the default port is 8765).
    pub listen: Option<String>,
    /// The origin (and optional path) a browser reaches the listener at, e.g.
    /// `https://auth.example.org`; `http://{listen}` when absent.
    pub public_url: Option<String>,
    /// Reverse proxies whose `X-Forwarded-For` is believed (for throttling guessed links).
    #[serde(default)]
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// How long a one-time link may wait to be opened (default 600 s).
    pub link_ttl_secs: Option<u64>,
    /// Serve `GET /metrics` here too (off by default: this listener may face the internet).
    #[serde(default)]
    pub metrics: bool,
}

impl WebSettings {
    /// How long a one-time link may wait to be opened: ten minutes unless set (1 s..1 day).
    pub fn link_ttl(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::seconds(self.link_ttl_secs.unwrap_or(600).clamp(1, 86_400) as i64)
    }
}

impl WebSettings {
    /// Why the block is unusable, if it is.
    pub fn check(&self) -> Result<(), String> {
        let listen = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        if listen.parse::<SocketAddr>().is_err() {
            return Err(format!("authkeeper.web.listen: {listen:?} is not an address like \"127.0.0.1:8765\""));
        }
        if let Some(url) = &self.public_url {
            let parsed =
                Url::parse(url).map_err(|e| format!("authkeeper.web.public_url: {url:?} is not a URL: {e}"))?;
            let plain = parsed.query().is_none() && parsed.fragment().is_none();
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() || !plain {
                return Err(format!(
                    "authkeeper.web.public_url: {url:?} must be an http:// or https:// URL without query or fragment"
                ));
            }
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.as_deref().unwrap_or(DEFAULT_LISTEN).parse().expect("checked when the config was read")
    }

    /// The public URL without a trailing slash.
    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{}", self.listen_addr()),
        }
    }
}

/// `{public_url}/oauth/callback/{provider}`.
pub fn redirect_uri(public_url: &str, provider: &str) -> String {
    format!("{public_url}/oauth/callback/{provider}")
}

/// The public URL in force, shared by every connection's adapter and replaced on reload.
#[derive(Debug, Default)]
pub struct PublicUrl(RwLock<Option<Arc<str>>>);

impl PublicUrl {
    pub fn get(&self) -> Option<Arc<str>> {
        self.0.read().unwrap().clone()
    }

    /// Put `url` in force; true when it changed.
    pub fn set(&self, url: Option<String>) -> bool {
        let mut current = self.0.write().unwrap();
        let changed = current.as_deref() != url.as_deref();
        *current = url.map(Into::into);
        changed
    }

    /// The redirect URI of `provider` now, when the listener is configured.
    pub fn redirect_uri(&self, provider: &str) -> Option<String> {
        self.get().map(|url| redirect_uri(&url, provider))
    }
}

/// Pending callback flows by their `state`: how a callback finds its connection.
#[derive(Debug, Default)]
pub struct Callbacks(std::sync::Mutex<std::collections::HashMap<String, authkeeper_state::ConnKey>>);

impl Callbacks {
    pub fn insert(&self, state: &str, key: &authkeeper_state::ConnKey) {
        self.0.lock().unwrap().insert(state.to_owned(), key.clone());
    }

    pub fn remove(&self, state: &str) {
        self.0.lock().unwrap().remove(state);
    }

    pub fn find(&self, state: &str) -> Option<authkeeper_state::ConnKey> {
        self.0.lock().unwrap().get(state).cloned()
    }
}

/// A reload changed the `web` block from `was` to `now`: put the public URL in force, and tell
/// every connection authorised with a redirect URI that a login would no longer use. A new
/// listen address needs a restart.
pub fn reconfigure(shared: &Shared, was: Option<&WebSettings>, now: Option<&WebSettings>) {
    if was.map(WebSettings::listen_addr) != now.map(WebSettings::listen_addr) {
        let message = "authkeeper.web.listen changed: restart the daemon to serve the web listener there";
        tracing::warn!("{message}");
        shared.publish_warning(None, message.into(), None);
    }
    *shared.link_ttl.write().unwrap() = now.map_or(crate::links::LINK_TTL, WebSettings::link_ttl);
    shared.metrics.serve_on_web(now.is_some_and(|w| w.metrics));
    if !shared.public_url.set(now.map(WebSettings::public_url)) {
        return;
    }
    let affected: Vec<(authkeeper_state::ConnKey, String)> = shared
        .conns
        .read()
        .unwrap()
        .iter()
        .filter_map(|(key, slot)| {
            let grant = slot.committed.connection().grant.as_ref()?;
            Some((key.clone(), slot.setup.redirect_warning(grant)?))
        })
        .collect();
    for (key, warning) in affected {
        tracing::warn!(connection = %key, "{warning}");
        shared.publish_warning(Some(&key), warning, None);
    }
}

/// Bind the listener (failing fast when the address is taken) and serve until `shutdown`.
pub async fn serve(
    settings: &WebSettings,
    shared: Arc<Shared>,
    limits: crate::serve::Limits,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    use anyhow::Context;
    let addr = settings.listen_addr();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for authkeeper.web"))?;
    tracing::info!(listen = %addr, public_url = %settings.public_url(), "web listener ready");
    let app = app(shared, settings.trusted_proxies.clone());
    // Refusals before any handler (too large, too slow) carry the pages' headers too.
    let answers = crate::serve::Answers { limits, refuse: page_refusal, finish: hygiene, peer: true };
    Ok(tokio::spawn(crate::serve::serve(listener, app, answers, shutdown)))
}

/// A plain page for a request refused before any handler saw it.
fn page_refusal(e: crate::serve::RequestError) -> Response {
    pages::page(e.status(), "Request refused", &e.to_string()).into_response()
}

/// Everything the listener serves: the OAuth callback and the login pages, each answer with the
/// pages' headers. `trusted` are the proxies whose `X-Forwarded-For` is believed.
pub fn app(shared: Arc<Shared>, trusted: Vec<std::net::IpAddr>) -> Router {
    router(shared.clone()).merge(crate::links::routes(shared, trusted)).layer(axum::middleware::map_response(hygiene))
}

/// Every answer of the listener, redirects and rejections included, carries the pages' headers.
async fn hygiene(mut response: Response) -> Response {
    for (name, value) in pages::HEADERS.iter().skip(1) {
        if !response.headers().contains_key(name) {
            response.headers_mut().insert(name.clone(), axum::http::HeaderValue::from_static(value));
        }
    }
    response
}

/// The listener's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/oauth/callback/{provider}", get(callback))
        .route("/metrics", get(metrics))
        .fallback(|| async { not_found() })
        .with_state(shared)
}

fn not_found() -> Response {
    pages::page(StatusCode::NOT_FOUND, "Not found", "There is nothing here.").into_response()
}

/// `GET /metrics`, when `authkeeper.web.metrics` is on.
async fn metrics(shared: State<Arc<Shared>>) -> Response {
    if !shared.metrics.on_web() {
        return not_found();
    }
    crate::metrics::scrape(shared).await
}

/// The query a provider's redirect carries: `code` and `state`, or `error`; TMDB's
/// `request_token` and `approved` or `denied`.
pub type CallbackQuery = BTreeMap<String, String>;

/// The value that names the flow: `state`, or TMDB's `request_token`.
pub fn flow_key(query: &CallbackQuery) -> Option<&str> {
    query.get("state").or_else(|| query.get("request_token")).map(String::as_str)
}

async fn callback(
    State(shared): State<Arc<Shared>>,
    Path(provider): Path<String>,
    query: Result<Query<CallbackQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return pages::refused(&CallbackError::UnknownState);
    };
    let Some(key) = flow_key(&query).and_then(|state| shared.callbacks.find(state)) else {
        return pages::refused(&CallbackError::UnknownState);
    };
    if key.provider != provider {
        return pages::refused(&CallbackError::WrongProvider { expected: key.provider.to_string(), got: provider });
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    if let Err(e) = shared.send(&key, Command::Callback(query, reply)).await {
        return pages::unavailable(&e.to_string());
    }
    match answer.await {
        Ok(Ok(view)) => pages::outcome(&view),
        Ok(Err(CallbackError::Daemon(e))) => pages::unavailable(&e.to_string()),
        Ok(Err(refused)) => pages::refused(&refused),
        Err(_) => pages::unavailable("the daemon is stopping"),
    }
    .into_response()
}
