//! Provider adapters. Each turns a provider's protocol into the three-way verdicts the machine
//! understands: valid, rejected (the provider says the credential is bad), or unknown
//! (timeout, connection error, 5xx, 429, an unparseable body), which never changes state.

pub mod trakt;

use crate::config::{ProfileSettings, Settings};
use crate::limits::Gate;
use authkeeper_state::{Account, ConnKey, Credentials, DeviceFlow};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The answer to a validation or refresh.
#[derive(Debug)]
pub enum Verdict<T> {
    Valid(T),
    Rejected(String),
    Unknown(String),
}

/// The answer to one poll of a pending device-code flow.
#[derive(Debug)]
pub enum Poll {
    Pending,
    SlowDown,
    Approved(Credentials),
    /// The code expired, was already used, or is unknown: the flow is over.
    Gone(String),
    Denied,
    Unknown(String),
}

/// Why a flow could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The profile lacks settings the provider needs (a client id, say).
    #[error("{0}")]
    Config(String),
    /// The provider did not answer usefully.
    #[error("{0}")]
    Unavailable(String),
}

/// One provider's protocol, for one profile's settings.
pub trait Provider: Send + Sync + 'static {
    /// Ask for a device code the user can approve.
    fn start_flow(&self, now: DateTime<Utc>) -> impl Future<Output = Result<DeviceFlow, StartError>> + Send;
    fn poll(&self, flow: &DeviceFlow, now: DateTime<Utc>) -> impl Future<Output = Poll> + Send;
    fn validate(&self, credentials: &Credentials) -> impl Future<Output = Verdict<Account>> + Send;
    fn refresh(
        &self,
        credentials: &Credentials,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Verdict<Credentials>> + Send;
    /// Revoke upstream, best effort.
    fn revoke(&self, credentials: &Credentials) -> impl Future<Output = Result<(), String>> + Send;
    /// What a consumer needs besides the token (Trakt: the `trakt-api-key` client id).
    fn token_extras(&self) -> Extras;
}

/// Extra fields of a token answer (a Trakt client id, say). Shared, like the app settings they
/// come from, by every profile of the same app.
pub type Extras = std::sync::Arc<serde_json::Map<String, serde_json::Value>>;

/// The adapter of any provider this build connects, chosen by the connection's provider.
#[derive(Clone)]
pub enum Adapter {
    Trakt(trakt::Trakt),
}

impl Adapter {
    /// The adapter for one connection's effective settings; its calls pass `gate`.
    pub fn new(
        key: &ConnKey,
        profile: &ProfileSettings,
        settings: &Settings,
        http: &reqwest::Client,
        gate: Arc<Gate>,
    ) -> Self {
        match profile {
            ProfileSettings::Trakt(block) => Self::Trakt(trakt::Trakt::new(
                http.clone(),
                gate,
                key.to_string(),
                settings.base_url.get("trakt").map(String::as_str),
                block,
            )),
        }
    }
}

impl Adapter {
    /// Share `other`'s immutable settings where they are the same (profiles are many; apps few).
    pub fn share_with(&mut self, other: &Adapter) {
        match (self, other) {
            (Self::Trakt(a), Self::Trakt(b)) => a.share_app(b),
        }
    }
}

impl Provider for Adapter {
    async fn start_flow(&self, now: DateTime<Utc>) -> Result<DeviceFlow, StartError> {
        match self {
            Self::Trakt(p) => p.start_flow(now).await,
        }
    }
    async fn poll(&self, flow: &DeviceFlow, now: DateTime<Utc>) -> Poll {
        match self {
            Self::Trakt(p) => p.poll(flow, now).await,
        }
    }
    async fn validate(&self, credentials: &Credentials) -> Verdict<Account> {
        match self {
            Self::Trakt(p) => p.validate(credentials).await,
        }
    }
    async fn refresh(&self, credentials: &Credentials, now: DateTime<Utc>) -> Verdict<Credentials> {
        match self {
            Self::Trakt(p) => p.refresh(credentials, now).await,
        }
    }
    async fn revoke(&self, credentials: &Credentials) -> Result<(), String> {
        match self {
            Self::Trakt(p) => p.revoke(credentials).await,
        }
    }
    fn token_extras(&self) -> Extras {
        match self {
            Self::Trakt(p) => p.token_extras(),
        }
    }
}

/// A provider's entry in `GET /v1/providers`.
#[derive(Clone, Debug, Serialize)]
pub struct Manifest {
    pub name: &'static str,
    pub label: &'static str,
    pub flows: Vec<FlowManifest>,
    /// Keys the provider's config block must hold.
    pub config: Vec<&'static str>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FlowManifest {
    pub flow: &'static str,
    pub fields: Vec<&'static str>,
}

/// Every provider this build can connect.
pub fn manifests() -> Vec<Manifest> {
    vec![trakt::manifest()]
}

/// Make rustls usable (ring); every reqwest client needs it, TLS or not. Idempotent.
pub fn install_crypto() {
    // Installing the process-wide provider fails harmlessly when one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The HTTP client every adapter uses: rustls, a bounded timeout, our User-Agent.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("authkeeper/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the HTTP client builds")
}

/// Describe a transport failure without its URL (and so without anything that could be secret).
pub fn transport_error(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out waiting for the provider".into()
    } else if e.is_connect() {
        "cannot reach the provider".into()
    } else if e.is_decode() || e.is_body() {
        "unreadable answer from the provider".into()
    } else {
        format!("request failed: {}", e.without_url())
    }
}
