//! The providers' answer parsing: a loopback server answers every request with the fuzz input's
//! status, headers and body, and a real adapter (the provider picked by the first byte) makes
//! one of its calls against it: begin a flow, poll or complete it, validate, refresh, revoke.
//! Every host, those the answers name included, is reached through the loopback server (it is
//! also the client's proxy), so nothing leaves the machine. No answer may panic, and an
//! answer that is not a success never grants anything.
//!
//! Input: byte 0 picks the provider, byte 1 the status, byte 2 the call (bits 0–2), the
//! content type (bits 3–4) and a `Retry-After` (bits 5–6); the rest is the body.

#![no_main]

use authkeeper::clock::SystemClock;
use authkeeper::limits::{Gate, Limits};
use authkeeper::providers::{Adapter, Begun, Input, Poll, Profile, REGISTRY, Verdict, install_crypto};
use authkeeper_fuzz::runtime;
use authkeeper_state::{Grant, PendingFlow, ProfileState, Secret};
use axum::body::Body;
use axum::http::{Method, Response, StatusCode};
use chrono::{TimeDelta, Utc};
use libfuzzer_sys::fuzz_target;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const STATUSES: [u16; 20] =
    [200, 200, 200, 200, 201, 204, 302, 400, 401, 403, 404, 409, 410, 418, 423, 429, 500, 502, 503, 299];
const CONTENT_TYPES: [Option<&str>; 4] =
    [Some("application/json"), Some("text/html; charset=utf-8"), None, Some("application/xml")];
const RETRY_AFTER: [Option<&str>; 4] = [None, Some("0"), Some("soon"), Some("86400")];

/// What the loopback server answers, set by each run.
struct Answer {
    status: u16,
    content_type: Option<&'static str>,
    retry_after: Option<&'static str>,
    body: Vec<u8>,
}

/// Requests the loopback server answered.
static CALLS: AtomicUsize = AtomicUsize::new(0);

static ANSWER: Mutex<Answer> =
    Mutex::new(Answer { status: 200, content_type: None, retry_after: None, body: Vec::new() });

async fn answer(method: Method) -> Response<Body> {
    if method == Method::CONNECT {
        // An https URL from an answer: refused here, so no TLS is tried and nothing goes out.
        return Response::builder().status(StatusCode::BAD_GATEWAY).body(Body::empty()).unwrap();
    }
    CALLS.fetch_add(1, Ordering::SeqCst);
    let a = ANSWER.lock().unwrap();
    let mut response = Response::builder().status(a.status);
    if let Some(t) = a.content_type {
        response = response.header("content-type", t);
    }
    if let Some(r) = a.retry_after {
        response = response.header("retry-after", r);
    }
    response.body(Body::from(a.body.clone())).unwrap()
}

/// The loopback server's origin, started once.
fn origin() -> &'static str {
    static ORIGIN: OnceLock<String> = OnceLock::new();
    ORIGIN.get_or_init(|| {
        runtime().block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let app = axum::Router::new().fallback(answer);
            tokio::spawn(async move { axum::serve(listener, app).await });
            format!("http://{addr}")
        })
    })
}

/// One HTTP client for every run; every request goes to the loopback server.
fn http() -> reqwest::Client {
    static HTTP: OnceLock<reqwest::Client> = OnceLock::new();
    HTTP.get_or_init(|| {
        install_crypto();
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(origin()).unwrap())
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap()
    })
    .clone()
}

/// A gate that never holds a call back; a new one after an answer that may have paused it.
fn gate(renew: bool) -> Arc<Gate> {
    static GATE: Mutex<Option<Arc<Gate>>> = Mutex::new(None);
    let mut gate = GATE.lock().unwrap();
    if renew || gate.is_none() {
        let limits = Limits { per_second: 1e9, burst: 1_000_000, account_reads: None, account_writes: None };
        *gate = Some(Arc::new(Gate::new(Arc::new(SystemClock), limits)));
    }
    gate.clone().unwrap()
}

/// The settings each provider needs to make its calls, every URL at the loopback server.
fn block(provider: &str) -> serde_json::Value {
    let o = origin();
    match provider {
        "jellyfin" | "emby" => json!({"server": o}),
        "tautulli" => json!({"server_url": o, "api_key": "fuzz-key"}),
        "oauth" => json!({
            "client_id": "fuzz-client",
            "client_secret": "fuzz-secret",
            "authorization_endpoint": format!("{o}/authorize"),
            "token_endpoint": format!("{o}/token"),
            "device_authorization_endpoint": format!("{o}/device"),
            "userinfo_endpoint": format!("{o}/userinfo"),
            "revocation_endpoint": format!("{o}/revoke"),
        }),
        "mdblist" => json!({"client_id": "fuzz-client", "api_key": "fuzz-key"}),
        "anilist" => json!({"client_id": "1", "client_secret": "fuzz-secret"}),
        _ => json!({"client_id": "fuzz-client", "client_secret": "fuzz-secret"}),
    }
}

/// The adapter of `provider`'s profile, with its per-profile state prepared as the daemon does.
fn adapter(provider: &'static dyn authkeeper::providers::Provider, renew_gate: bool) -> Adapter {
    let name = provider.manifest().name;
    let settings = block(name).as_object().unwrap().clone();
    let profile = Profile::new(provider, settings, Some(origin().to_owned())).expect("the fuzz settings are valid");
    let mut state = ProfileState::default();
    provider.prepare(&profile, &mut state);
    let public_url = Arc::<authkeeper::web::PublicUrl>::default();
    public_url.set(Some("http://127.0.0.1:8765".into()));
    Adapter {
        profile: Arc::new(profile),
        state: Arc::new(state),
        http: http(),
        gate: gate(renew_gate),
        account: format!("{name}/default").into(),
        public_url,
        metrics: Arc::default(),
    }
}

/// A flow in progress with every secret some provider's poll or callback reads.
fn pending(kind: &str) -> PendingFlow {
    let now = Utc::now();
    let secrets =
        ["device_code", "pin_id", "secret", "request_token", "state", "code_verifier", "nonce", "redirect_uri"];
    PendingFlow {
        kind: kind.into(),
        user_code: Some("ABCD1234".into()),
        verification_url: Some("http://127.0.0.1:8765/activate".into()),
        authorize_url: None,
        issued_at: now,
        expires_at: now + TimeDelta::minutes(10),
        interval_secs: Some(5),
        secrets: secrets
            .iter()
            .map(|s| {
                let value = if *s == "redirect_uri" {
                    "http://127.0.0.1:8765/oauth/callback/x".into()
                } else {
                    format!("fuzz-{s}")
                };
                (s.to_string(), Secret::new(value))
            })
            .collect(),
    }
}

/// A connected grant with every extra some provider's validate or refresh reads.
fn grant() -> Grant {
    let now = Utc::now();
    let secrets = ["server_token", "session_id", "api_key", "id_token", "device_key"];
    let facts = [
        ("user_id", "u-1"),
        ("device_id", "d-1"),
        ("client_identifier", "c-1"),
        ("server_url", origin()),
        ("machine_id", "m-1"),
        ("account_id", "42"),
        ("username", "fuzzer"),
    ];
    authkeeper_fuzz::grant_with_extras(now, now + TimeDelta::hours(1), &secrets, &facts)
}

/// Every field a flow asks for, filled in.
fn input(fields: &[&str]) -> Input {
    fields.iter().map(|f| (f.to_string(), Secret::new(format!("fuzz-{f}")))).collect()
}

fuzz_target!(|data: &[u8]| {
    let [pick, status, call, body @ ..] = data else { return };
    let provider = REGISTRY[*pick as usize % REGISTRY.len()];
    let status = STATUSES[*status as usize % STATUSES.len()];
    let retry_after = RETRY_AFTER[(*call as usize >> 5) & 3];
    *ANSWER.lock().unwrap() =
        Answer { status, content_type: CONTENT_TYPES[(*call as usize >> 3) & 3], retry_after, body: body.to_vec() };
    let cx = adapter(provider, retry_after.is_some() || status == 429);
    let flows = &provider.manifest().flows;
    let flow = &flows[(*call as usize >> 3) % flows.len()];
    let calls = CALLS.load(Ordering::SeqCst);
    // Only an answer that was asked for and is not a success must grant nothing.
    let refused = |verb: &str| {
        let asked = CALLS.load(Ordering::SeqCst) > calls;
        assert!(!asked || (200..300).contains(&status), "{}: a {status} answer {verb}", provider.manifest().name);
    };
    runtime().block_on(async {
        let now = Utc::now();
        match call & 7 {
            0 | 1 => {
                if let Ok(Begun::Granted(_)) = cx.begin(flow.flow, input(&flow.fields), now).await {
                    refused("granted a flow");
                }
            }
            2 => {
                if let Poll::Approved(_) = cx.poll(&pending(flow.flow), now).await {
                    refused("approved a poll");
                }
            }
            3 => {
                let query = BTreeMap::from([
                    ("code".to_owned(), "fuzz-code".to_owned()),
                    ("state".to_owned(), "fuzz-state".to_owned()),
                    ("request_token".to_owned(), "fuzz-request_token".to_owned()),
                    ("approved".to_owned(), "true".to_owned()),
                ]);
                if let Poll::Approved(_) = cx.complete(&pending(flow.flow), &query, now).await {
                    refused("approved a callback");
                }
            }
            4 | 7 => {
                if let Verdict::Valid(_) = cx.validate(&grant()).await {
                    refused("validated a grant");
                }
            }
            5 => {
                if let Verdict::Valid(_) = cx.refresh(&grant(), now).await {
                    refused("refreshed a grant");
                }
            }
            _ => {
                let _ = cx.revoke(&grant()).await;
            }
        }
    });
});
