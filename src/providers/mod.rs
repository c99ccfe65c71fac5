//! Provider adapters: one module per provider behind one object-safe trait, listed once in
//! [`registry!`]. Nothing else in the daemon names a provider.
//!
//! Each adapter turns its provider's protocol into what the machine understands: a pending
//! flow or a grant, and three-way verdicts — valid, rejected (the provider says the credential
//! is bad), or unknown (timeout, connection error, 5xx, 429, an unparseable body), which never
//! changes state.

mod adapter;
pub(crate) mod answer;
mod http;
pub mod oauth2;
pub mod oauth_code;
mod token_answer;

pub use adapter::{Adapter, Profile, Reach, Setup, Unsent};
pub use http::{http_client, install_crypto, transport_error};
pub use token_answer::Extras;

use crate::limits::Limits;
use crate::web::CallbackQuery;
use async_trait::async_trait;
use authkeeper_state::{Account, Grant, PendingFlow, ProfileState};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use std::any::Any;
use std::collections::BTreeMap;

/// `check` and `settings` for a provider whose config block deserializes as `$block`.
macro_rules! typed_block {
    ($block:ty) => {
        fn check(&self, block: &str) -> Result<(), serde_json::Error> {
            $crate::providers::check_as::<$block>(block)
        }

        fn settings(
            &self,
            block: &serde_json::Map<String, serde_json::Value>,
        ) -> Result<Box<dyn std::any::Any + Send + Sync>, serde_json::Error> {
            $crate::providers::settings_as::<$block>(block)
        }
    };
}

/// Declares the provider modules and the registry table: one line per provider.
macro_rules! registry {
    ($($module:ident => $provider:expr,)*) => {
        $(pub mod $module;)*
        /// Every provider this build connects.
        pub static REGISTRY: &[&dyn Provider] = &[$(&$provider),*];
    };
}

registry! {
    trakt => trakt::Trakt,
    jellyfin => jellyfin::Jellyfin,
    plex => plex::Plex,
    simkl => simkl::Simkl,
    anilist => anilist::AniList,
    mdblist => mdblist::MdbList,
    tautulli => tautulli::Tautulli,
    tmdb => tmdb::Tmdb,
    emby => emby::Emby,
    oauth => oauth::OAuth,
}

/// The provider named `name` on the socket.
pub fn find(name: &str) -> Option<&'static dyn Provider> {
    REGISTRY.iter().copied().find(|p| p.manifest().name == name)
}

/// Every provider's manifest, for `GET /v1/providers`.
pub fn manifests() -> Vec<&'static Manifest> {
    REGISTRY.iter().map(|p| p.manifest()).collect()
}

/// A provider's entry in `GET /v1/providers`.
#[derive(Debug, Serialize)]
pub struct Manifest {
    /// The name on the socket and in `base_url`: `trakt`, `plex`, `jellyfin`.
    pub name: &'static str,
    pub label: &'static str,
    /// The CrossWatch block that holds its settings: usually the name (`tmdb_sync` for TMDB).
    pub block: &'static str,
    pub flows: Vec<FlowManifest>,
    /// Keys the provider's config block must hold before it can connect.
    pub config: Vec<&'static str>,
    /// Keys of its block that hold a credential (imported, written back, never stored as
    /// settings).
    #[serde(skip)]
    pub credential_keys: &'static [&'static str],
    /// Profiles are freely named instances (`oauth/authentik`), with no `default` profile;
    /// otherwise `default` and numbered ids (`TRAKT-P01`).
    pub named_profiles: bool,
}

#[derive(Debug, Serialize)]
pub struct FlowManifest {
    pub flow: &'static str,
    /// Every input field the flow needs, secret or not.
    pub fields: Vec<&'static str>,
    /// The fields among them that are secrets: prompted with no echo, never taken from the
    /// command line, never logged or stored.
    pub secret_fields: Vec<&'static str>,
}

/// What the user typed for a flow (`username`, `password`, `api_key`, …). Values are secret
/// until the provider says otherwise; the map is dropped as soon as the flow has begun.
pub type Input = BTreeMap<String, authkeeper_state::Secret>;

/// How a connect began.
#[derive(Debug)]
pub enum Begun {
    /// The user must act (enter a code, approve a PIN, follow a link).
    Pending(PendingFlow),
    /// The input was exchanged for a grant at once (a password, a key, a pasted token).
    Granted(Grant),
}

/// Why a flow could not begin.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// The profile lacks settings the provider needs (a client id, a server URL).
    #[error("{0}")]
    Config(String),
    /// The input is missing a field or is malformed.
    #[error("{0}")]
    Input(String),
    /// The provider refused the input (a wrong password, a disabled feature).
    #[error("{0}")]
    Rejected(String),
    /// The provider did not answer usefully.
    #[error("{0}")]
    Unavailable(String),
}

/// The answer to a validation or refresh.
#[derive(Debug)]
pub enum Verdict<T> {
    Valid(T),
    Rejected(String),
    Unknown(String),
}

/// Who a credential belongs to, and the grant with facts learned on the way (a Plex server).
#[derive(Debug)]
pub struct Identity {
    pub account: Account,
    pub grant: Option<Grant>,
}

/// The answer to one poll of a pending flow.
#[derive(Debug)]
pub enum Poll {
    Pending,
    SlowDown,
    Approved(Grant),
    /// The code expired, was already used, or is unknown: the flow is over.
    Gone(String),
    Denied,
    Unknown(String),
}

/// One provider's protocol. Every call gets the connection's [`Adapter`]: its settings, its
/// per-profile state, the HTTP client and the provider's gate; a token answer, which calls
/// nothing, gets the connection's [`Setup`].
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    fn manifest(&self) -> &'static Manifest;

    /// Its default rate limits (global and per account).
    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// Check a config block (the base block or one profile's own) against the typed block.
    fn check(&self, block: &str) -> Result<(), serde_json::Error>;

    /// The typed settings of a profile's effective block (the base deep-merged with its own).
    fn settings(&self, block: &Map<String, Value>) -> Result<Box<dyn Any + Send + Sync>, serde_json::Error>;

    /// The URLs a profile's settings send secrets to (a server, an OAuth endpoint), each with
    /// its key, so that plain `http` to a public host is refused (see `crate::insecure`).
    fn urls(&self, _profile: &Profile) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// The grant a CrossWatch block holds, if any, for import.
    fn import(&self, profile: &Profile, now: DateTime<Utc>) -> Option<Grant>;

    /// The CrossWatch keys a grant is written back as (`None`: disconnected); a `None` value
    /// removes the key.
    fn export(&self, grant: Option<&Grant>) -> Vec<(&'static str, Option<Value>)>;

    /// Fill in the per-profile state the provider needs before its first call (a stable device
    /// id). True when it changed, so that the caller saves it before use.
    fn prepare(&self, _profile: &Profile, _state: &mut ProfileState) -> bool {
        false
    }

    /// Start `flow` with the user's input.
    async fn begin(&self, cx: &Adapter, flow: &str, input: Input, now: DateTime<Utc>) -> Result<Begun, FlowError>;

    /// Ask whether a polled flow was approved.
    async fn poll(&self, _cx: &Adapter, _flow: &PendingFlow, _now: DateTime<Utc>) -> Poll {
        Poll::Unknown("this flow is not polled".into())
    }

    /// Finish a callback flow with the query the browser brought back (its `state` already
    /// checked): exchange the code for a grant.
    async fn complete(&self, _cx: &Adapter, _flow: &PendingFlow, _query: &CallbackQuery, _now: DateTime<Utc>) -> Poll {
        Poll::Gone("this flow does not end by callback".into())
    }

    /// Confirm the credential and learn whose it is.
    async fn validate(&self, cx: &Adapter, grant: &Grant) -> Verdict<Identity>;

    /// Exchange the refresh token for a new grant.
    async fn refresh(&self, _cx: &Adapter, _grant: &Grant, _now: DateTime<Utc>) -> Verdict<Grant> {
        Verdict::Rejected("this provider has no refresh".into())
    }

    /// Revoke upstream, best effort.
    async fn revoke(&self, _cx: &Adapter, _grant: &Grant) -> Result<(), String> {
        Ok(())
    }

    /// What a consumer needs besides `access_token`, `token_type`, `expires_at`, `scope` and
    /// `account` (which `out` cannot replace), in the order written: by name, as answers have
    /// always listed them.
    fn token(&self, cx: &Setup, grant: &Grant, out: &mut Extras);
}

/// `check` for a provider whose block deserializes as `T`.
pub fn check_as<T: serde::de::DeserializeOwned>(block: &str) -> Result<(), serde_json::Error> {
    serde_json::from_str::<T>(block).map(drop)
}

/// `settings` for a provider whose block deserializes as `T`.
pub fn settings_as<T: serde::de::DeserializeOwned + Send + Sync + 'static>(
    block: &Map<String, Value>,
) -> Result<Box<dyn Any + Send + Sync>, serde_json::Error> {
    let typed: T = serde_json::from_value(Value::Object(block.clone()))?;
    Ok(Box::new(typed))
}

/// The longest lifetime a provider's answer is taken at (ten years): nothing a provider sends
/// can overflow a time.
const MAX_LIFETIME_SECS: i64 = 10 * 366 * 86_400;

/// A provider's `expires_in`, held to zero..ten years.
pub fn lifetime(secs: i64) -> chrono::TimeDelta {
    chrono::TimeDelta::seconds(secs.clamp(0, MAX_LIFETIME_SECS))
}

/// A provider's poll interval, held to 1 s..1 h.
pub fn poll_interval(secs: u64) -> u64 {
    secs.clamp(1, 3600)
}

/// When a JWT says it expires (its `exp` claim), read without checking its signature: only to
/// schedule, never to trust.
pub fn jwt_expiry(token: &str) -> Option<DateTime<Utc>> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    DateTime::from_timestamp(claims.get("exp")?.as_i64()?, 0)
}

/// Give the profile a random `device_id` fact once, kept across logins; true when it was made.
pub fn stable_device_id(state: &mut ProfileState) -> bool {
    if state.fact("device_id").is_some() {
        return false;
    }
    let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    state.facts.insert("device_id".into(), id);
    true
}

/// A non-empty string setting.
pub fn nonempty(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

/// A non-empty secret setting (a config block's token or client secret), exposed for one use.
pub fn nonempty_secret(v: &Option<authkeeper_state::Secret>) -> Option<&str> {
    v.as_ref().map(authkeeper_state::Secret::expose).filter(|s| !s.is_empty())
}
