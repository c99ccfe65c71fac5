//! What the fuzz targets share: one tokio runtime per process, one real daemon (in-memory
//! store, every provider pointed at a closed loopback port), and the request format the
//! `socket_request` and `web_request` targets read.
//!
//! A request input is text shaped like HTTP/1.1 without its version: `METHOD PATH` on the
//! first line, `Name: value` header lines, an empty line, then the body. Lines end in `\n`
//! (a `\r` before it is dropped). It keeps the corpus readable and easy to seed by hand.

use authkeeper::clock::SystemClock;
use authkeeper::config::Paths;
use authkeeper::daemon::{self, Running, Shared};
use authkeeper_state::Store;
use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request, Response};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

/// The process's runtime: one worker, so that the daemon's tasks run while a target waits.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("a runtime")
    })
}

/// A loopback address nothing listens on: every provider call fails at once, on loopback.
pub fn dead_origin() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let port = listener.local_addr().expect("its address").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// The providers' blocks and settings of the fuzzed daemon: every provider configured, every
/// host at `origin`, limits that never make a request wait.
pub fn daemon_config(origin: &str) -> Value {
    let providers = ["plex", "trakt", "simkl", "anilist", "jellyfin", "emby", "mdblist", "tautulli", "tmdb"];
    let base_url: serde_json::Map<String, Value> = providers.iter().map(|p| (p.to_string(), json!(origin))).collect();
    let limits: serde_json::Map<String, Value> =
        providers.iter().map(|p| (p.to_string(), json!({"per_second": 1e9, "burst": 1_000_000}))).collect();
    json!({
        "trakt": {"client_id": "fuzz-client", "client_secret": "fuzz-secret", "instances": {"TRAKT-P01": {}}},
        "plex": {},
        "jellyfin": {"server": origin},
        "emby": {"server": origin},
        "simkl": {"client_id": "fuzz-client", "client_secret": "fuzz-secret"},
        "anilist": {"client_id": "1", "client_secret": "fuzz-secret"},
        "mdblist": {"client_id": "fuzz-client"},
        "tautulli": {"server_url": origin},
        "tmdb_sync": {},
        "oauth": {"instances": {"fuzz": {
            "client_id": "fuzz-client",
            "authorization_endpoint": format!("{origin}/authorize"),
            "token_endpoint": format!("{origin}/token"),
            "device_authorization_endpoint": format!("{origin}/device"),
            "userinfo_endpoint": format!("{origin}/userinfo"),
        }}},
        "pairs": [{"source": "plex", "target": "trakt"}],
        "authkeeper": {
            "base_url": base_url,
            "rate_limits": limits,
            "http_timeout_secs": 1,
            "backoff_base_secs": 1,
            "web": {"listen": "127.0.0.1:0", "public_url": "http://127.0.0.1:8765"},
        },
    })
}

struct Fuzzed {
    _dir: tempfile::TempDir,
    _running: Running,
    shared: Arc<Shared>,
}

/// The process's daemon, started on first use: a real one, with its socket, web listener,
/// config owner and actors, on an in-memory store.
pub fn daemon() -> Arc<Shared> {
    static DAEMON: OnceLock<Fuzzed> = OnceLock::new();
    DAEMON
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let config = dir.path().join("config.json");
            std::fs::write(&config, serde_json::to_string_pretty(&daemon_config(&dead_origin())).unwrap()).unwrap();
            let paths = Paths { config, state_dir: dir.path().join("state"), socket: dir.path().join("s.sock") };
            let mut opts = daemon::Options::new(paths, Arc::new(SystemClock));
            opts.store = Some(Arc::new(Store::in_memory().expect("an in-memory store")));
            let running = runtime().block_on(daemon::start(opts)).expect("the daemon starts");
            let shared = running.shared();
            Fuzzed { _dir: dir, _running: running, shared }
        })
        .shared
        .clone()
}

/// A request in the format above, or `None` when the method, path or a header cannot be one.
pub fn parse_request(data: &[u8]) -> Option<Request<Body>> {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let (method, path) = lines.next()?.split_once(' ')?;
    let mut request = Request::builder().method(Method::from_bytes(method.as_bytes()).ok()?).uri(path);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        request =
            request.header(HeaderName::from_bytes(name.as_bytes()).ok()?, HeaderValue::from_str(value.trim()).ok()?);
    }
    request.body(Body::from(body.to_vec())).ok()
}

/// Send `request` to `router` and read what its answer body has ready: a streamed answer that
/// waits for more (`/v1/events`) is dropped after what it had.
pub fn send(router: axum::Router, request: Request<Body>) -> Response<Vec<u8>> {
    runtime().block_on(async move {
        let response = router.oneshot(request).await.expect("a router never fails");
        let (parts, mut body) = response.into_parts();
        let mut bytes = Vec::new();
        while let Some(Some(Ok(frame))) = body.frame().now_or_never() {
            if let Ok(data) = frame.into_data() {
                bytes.extend_from_slice(&data);
            }
        }
        Response::from_parts(parts, bytes)
    })
}

/// What every answer of the socket or the web listener must be: a status the API speaks, and
/// JSON error bodies where the API promises them.
pub fn check_api_answer(response: &Response<Vec<u8>>) {
    let status = response.status();
    assert!(!status.is_informational(), "an informational status as a final answer: {status}");
    assert_ne!(status.as_u16(), 500, "an internal error: {}", String::from_utf8_lossy(response.body()));
}

/// A bearer grant with a refresh token, expiring at `expires_at`, and every named extra some
/// provider reads (secrets valued `fuzz-NAME`).
pub fn grant_with_extras(
    issued_at: chrono::DateTime<chrono::Utc>,
    expires_at: chrono::DateTime<chrono::Utc>,
    secrets: &[&str],
    facts: &[(&str, &str)],
) -> authkeeper_state::Grant {
    use authkeeper_state::{Extras, Grant, Secret};
    Grant {
        refresh_token: Some(Secret::new("fuzz-refresh")),
        token_type: "Bearer".into(),
        scope: Some("public".into()),
        expires_at: Some(expires_at),
        extras: Some(Box::new(Extras {
            secrets: secrets.iter().map(|s| (s.to_string(), Secret::new(format!("fuzz-{s}")))).collect(),
            facts: facts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        })),
        ..Grant::bearer("fuzz-access", issued_at)
    }
}
