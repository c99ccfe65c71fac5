//! What the tracker tests share: a daemon on a given config, one connection's calls through
//! the socket, a browser that follows redirects, and the failures every provider must survive.

use super::{Harness, fast_trakt};
use authkeeper::client::ClientError;
use authkeeper::wire::{ConnectReply, ConnectionView};
use authkeeper_fixtures::{CallLog, Fault};
use authkeeper_state::StateName;
use serde_json::{Value, json};

/// A harness whose config is `config`, with quick timeouts and backoff merged into
/// `"authkeeper"` (the harness's own Trakt emulator is not in it).
pub async fn harness(mut config: Value) -> Harness {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let settings = config.as_object_mut().unwrap().entry("authkeeper").or_insert_with(|| json!({}));
    for (k, v) in [("http_timeout_secs", json!(2)), ("backoff_base_secs", json!(1))] {
        settings.as_object_mut().unwrap().entry(k).or_insert(v);
    }
    std::fs::write(h.config_path(), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    h
}

/// A free loopback port for the web listener, and its `http://127.0.0.1:PORT` origin.
pub fn free_port() -> (String, String) {
    authkeeper_fixtures::server::free_loopback_port().expect("a free loopback port")
}

/// One connection, through the socket.
pub struct Conn<'a> {
    pub h: &'a Harness,
    pub path: String,
}

impl<'a> Conn<'a> {
    pub fn new(h: &'a Harness, provider: &str, profile: &str) -> Self {
        Self { h, path: format!("/v1/connections/{provider}/{profile}") }
    }

    pub async fn view(&self) -> ConnectionView {
        self.h.client().get(&self.path).await.unwrap()
    }

    pub async fn connect(&self, body: Value) -> Result<ConnectReply, ClientError> {
        self.h.client().post(&format!("{}/connect", self.path), Some(body)).await
    }

    pub async fn validate(&self) -> ConnectionView {
        self.h.client().post(&format!("{}/validate", self.path), None).await.unwrap()
    }

    pub async fn disconnect(&self) -> ConnectionView {
        self.h.client().post(&format!("{}/disconnect", self.path), None).await.unwrap()
    }

    pub async fn token(&self) -> Result<Value, ClientError> {
        self.h.client().get(&format!("{}/token", self.path)).await
    }

    /// The causes of its history, oldest first.
    pub async fn causes(&self) -> Vec<String> {
        let history: Vec<Value> = self.h.client().get(&format!("{}/history", self.path)).await.unwrap();
        history.iter().map(|t| t["cause"].as_str().unwrap().to_owned()).collect()
    }

    /// The `detail` of its newest transition.
    pub async fn last_detail(&self) -> String {
        let history: Vec<Value> = self.h.client().get(&format!("{}/history", self.path)).await.unwrap();
        history.last().and_then(|t| t["detail"].as_str()).unwrap_or_default().to_owned()
    }
}

/// A browser: follows redirects, keeps nothing. Returns the last page's status, URL and body.
pub async fn browse(url: &str) -> (u16, String, String) {
    authkeeper::providers::install_crypto();
    let resp = reqwest::Client::new().get(url).send().await.unwrap();
    let (status, at) = (resp.status().as_u16(), resp.url().to_string());
    (status, at, resp.text().await.unwrap())
}

/// Every fault an emulator serves, with what `last_error` must say about it. A huge body is
/// `huge` bytes; a drip sends one byte every 300 ms (its whole body takes over a minute).
pub fn faults(huge: u64) -> Vec<(Fault, &'static str)> {
    vec![
        (Fault::RetryAfter(1), "429"),
        (Fault::Status(503), "503"),
        (Fault::Hang, "timed out"),
        (Fault::Garbage, "unreadable"),
        (Fault::Reset, "connection reset"),
        (Fault::Truncated, "cut short"),
        (Fault::WrongContentType, "HTML page"),
        (Fault::Huge(huge), "larger than 1 MiB"),
        (Fault::Drip(300), "timed out"),
    ]
}

/// `view`, the connection's state right after a call met `fault`: still connected, with a
/// `last_error` that says `expected` and repeats no URL, and a retry scheduled.
pub fn assert_fault_kept_state(view: &ConnectionView, fault: &Fault, expected: &str) {
    assert_eq!(view.state, StateName::Connected, "{fault:?} must not change the state");
    assert!(view.next_attempt_at.is_some(), "{fault:?}: a retry is scheduled");
    let error = view.last_error.as_deref().unwrap_or_default();
    assert!(error.contains(expected), "{fault:?}: last_error {error:?} should say {expected:?}");
    assert!(!error.contains("http") && !error.contains("127.0.0.1"), "{fault:?}: a URL in {error:?}");
}

/// Each fault of [`faults`] served on `validation` (the path of the provider's validating
/// call) leaves the connected `conn` connected, with a clear `last_error`.
pub async fn failures_keep_state(conn: &Conn<'_>, log: &CallLog, validation: &str) {
    for (fault, expected) in faults(64 << 20) {
        log.inject(validation, fault.clone(), 1);
        assert_fault_kept_state(&conn.validate().await, &fault, expected);
        log.clear_faults();
    }
    let view = conn.validate().await;
    assert_eq!((view.state, view.last_error), (StateName::Connected, None), "and the next answer clears it");
}

/// No secret in `issued` appears in the daemon's log.
pub fn assert_no_leaks(h: &Harness, issued: &[String]) {
    let log = h.log();
    assert!(!issued.is_empty());
    for secret in issued {
        assert!(!log.contains(secret.as_str()), "a secret the emulator issued is in the daemon's log");
    }
}
