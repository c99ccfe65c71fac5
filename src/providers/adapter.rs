//! One connection's view of its provider: the profile's settings, its per-profile state, and
//! the provider's reach (HTTP client, gate, public URL, metrics). Cheap to clone.

use super::{Begun, FlowError, Identity, Input, Poll, Provider, Verdict, transport_error};
use crate::limits::{Gate, Kind};
use crate::metrics::{Endpoint, Metrics, Outcome};
use crate::web::{CallbackQuery, PublicUrl};
use authkeeper_state::{ConnKey, Grant, PendingFlow, ProfileState};
use chrono::{DateTime, TimeDelta, Utc};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::{Map, Value, json};
use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// A profile's effective settings: the provider's block (the base deep-merged with the
/// profile's own), typed once, and where the provider is reached.
pub struct Profile {
    pub provider: &'static dyn Provider,
    pub block: Map<String, Value>,
    /// `authkeeper.base_url` for this provider: every host of it at one origin.
    pub base_url: Option<String>,
    /// `authkeeper.allow_insecure_http`: plain `http` to a public host is allowed.
    pub insecure_http: bool,
    typed: Box<dyn Any + Send + Sync>,
}

impl Profile {
    pub fn new(
        provider: &'static dyn Provider,
        block: Map<String, Value>,
        base_url: Option<String>,
    ) -> Result<Self, serde_json::Error> {
        let typed = provider.settings(&block)?;
        Ok(Self { provider, block, base_url, insecure_http: false, typed })
    }

    /// With `authkeeper.allow_insecure_http` as given.
    pub fn allowing_insecure_http(mut self, allowed: bool) -> Self {
        self.insecure_http = allowed;
        self
    }

    /// `url` may carry this profile's secrets: plain `http` only to a home-network host, unless
    /// allowed (`what` names the setting in the error).
    pub fn check_url(&self, what: &str, url: &str) -> Result<(), String> {
        crate::insecure::check(what, url, self.insecure_http)
    }

    /// The provider's own typed block.
    pub fn typed<T: 'static>(&self) -> &T {
        self.typed.downcast_ref().expect("a profile's settings are typed by its own provider")
    }

    /// What the store keeps so that the profile can run while no good config is read: the
    /// settings, without the credential keys (the grant is stored as the connection's).
    pub fn to_stored(&self) -> Vec<u8> {
        let keys = self.provider.manifest().credential_keys;
        let block: Map<String, Value> = self
            .block
            .iter()
            .filter(|(k, _)| !keys.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let stored = json!({"block": block, "base_url": self.base_url, "allow_insecure_http": self.insecure_http});
        serde_json::to_vec(&stored).expect("settings serialize")
    }

    /// The inverse of [`Profile::to_stored`].
    pub fn from_stored(provider: &'static dyn Provider, bytes: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(serde::Deserialize)]
        struct Stored {
            block: Map<String, Value>,
            base_url: Option<String>,
            #[serde(default)]
            allow_insecure_http: bool,
        }
        let s: Stored = serde_json::from_slice(bytes)?;
        Ok(Self::new(provider, s.block, s.base_url)?.allowing_insecure_http(s.allow_insecure_http))
    }

    /// The settings that decide how the provider is reached differ (anything but credentials).
    pub fn app_differs(&self, other: &Profile) -> bool {
        let keys = self.provider.manifest().credential_keys;
        let app = |p: &Profile| -> Vec<(String, Value)> {
            p.block.iter().filter(|(k, _)| !keys.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        self.base_url != other.base_url || self.insecure_http != other.insecure_http || app(self) != app(other)
    }

    /// The credential keys differ.
    pub fn credential_differs(&self, other: &Profile) -> bool {
        self.provider.manifest().credential_keys.iter().any(|k| self.block.get(*k) != other.block.get(*k))
    }
}

impl PartialEq for Profile {
    fn eq(&self, other: &Self) -> bool {
        self.provider.manifest().name == other.provider.manifest().name
            && self.base_url == other.base_url
            && self.insecure_http == other.insecure_http
            && self.block == other.block
    }
}

/// Only key names: a block holds client secrets and tokens.
impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("provider", &self.provider.manifest().name)
            .field("keys", &self.block.keys().collect::<Vec<_>>())
            .field("base_url", &self.base_url)
            .finish()
    }
}

/// How a provider's calls go out and are counted: one per provider, shared by its connections.
pub struct Reach {
    pub http: reqwest::Client,
    pub gate: Arc<Gate>,
    /// The web listener's public URL in force, shared by every provider.
    pub public_url: Arc<PublicUrl>,
    /// Where each call's endpoint class, outcome and latency are counted.
    pub metrics: Arc<Metrics>,
}

/// A connection's provider settings apart from the connection: its profile's settings, its
/// per-profile state and its provider's reach. What a slot keeps for reads; cheap to clone.
#[derive(Clone)]
pub struct Setup {
    pub profile: Arc<Profile>,
    pub state: Arc<ProfileState>,
    pub reach: Arc<Reach>,
}

/// One connection's handle on its provider: its setup, bound to the connection whose
/// per-account limits its calls count against.
#[derive(Clone)]
pub struct Adapter {
    pub setup: Setup,
    pub account: ConnKey,
}

impl std::ops::Deref for Adapter {
    type Target = Setup;

    fn deref(&self) -> &Setup {
        &self.setup
    }
}

/// Why a call that must not be repeated blindly failed.
#[derive(Debug)]
pub enum Unsent {
    /// It never reached the provider (no connection, or a pause in force).
    NotSent(String),
    /// It went out and no answer came back: the provider may have acted on it.
    Lost(String),
}

/// The longest `Retry-After` pause a call waits out; a longer one fails the call at once.
const MAX_PAUSE_WAIT: TimeDelta = TimeDelta::seconds(10);

/// Days before the end of a token with no refresh at which the user is told.
const NOTICE_DAYS: [i64; 3] = [30, 7, 1];

impl Setup {
    /// This setup bound to the connection `key`.
    pub fn bind(&self, key: &ConnKey) -> Adapter {
        Adapter { setup: self.clone(), account: key.clone() }
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.reach.http
    }

    pub fn gate(&self) -> &Gate {
        &self.reach.gate
    }

    pub fn provider(&self) -> &'static dyn Provider {
        self.profile.provider
    }

    /// The origin of a provider host: `base_url` when set, else `default`.
    pub fn origin(&self, default: &str) -> String {
        self.profile.base_url.as_deref().unwrap_or(default).trim_end_matches('/').to_owned()
    }

    /// `{public_url}/oauth/callback/{provider}` now, when the web listener is configured.
    pub fn redirect_uri(&self) -> Option<String> {
        self.reach.public_url.redirect_uri(self.provider().manifest().name)
    }

    /// What the user should know about `grant` now: the redirect URI it was authorised with is
    /// no longer the one a login would use; it ends within 30 days and cannot be refreshed.
    pub fn warnings(&self, grant: &Grant, now: DateTime<Utc>) -> Vec<String> {
        let mut out: Vec<String> = self.redirect_warning(grant).into_iter().collect();
        if let Some(end) = grant.expires_at.filter(|end| grant.refresh_token.is_none() && *end > now)
            && end - now <= TimeDelta::days(NOTICE_DAYS[0])
        {
            out.push(self.expiry_message(end, now));
        }
        out
    }

    /// Set when `grant` was authorised with a redirect URI that a login would no longer use.
    pub fn redirect_warning(&self, grant: &Grant) -> Option<String> {
        let used = grant.fact("redirect_uri")?;
        match self.redirect_uri() {
            Some(current) if current == used => None,
            Some(current) => Some(format!(
                "authorised with the redirect URI {used}, but authkeeper.web.public_url now gives {current}: \
                 register {current} with the provider's app before the next login"
            )),
            None => Some(format!(
                "authorised with the redirect URI {used}, but the web listener is no longer configured: \
                 the next browser login needs authkeeper.web"
            )),
        }
    }

    /// The notice to publish when a notice point (30, 7, 1 days before the end of a token with
    /// no refresh) fell after `last` and by `now`.
    pub fn expiry_notice(&self, grant: &Grant, last: DateTime<Utc>, now: DateTime<Utc>) -> Option<String> {
        let end = grant.expires_at.filter(|_| grant.refresh_token.is_none())?;
        let due = NOTICE_DAYS.iter().any(|d| {
            let at = end - TimeDelta::days(*d);
            last < at && at <= now
        });
        due.then(|| self.expiry_message(end, now))
    }

    fn expiry_message(&self, end: DateTime<Utc>, now: DateTime<Utc>) -> String {
        let left = end - now;
        let left = if left >= TimeDelta::days(1) {
            format!("{} days", left.num_days())
        } else {
            format!("{} hours", left.num_hours().max(1))
        };
        format!(
            "the token expires at {} (in {left}) and {} cannot refresh it: log in again before then",
            end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.provider().manifest().label
        )
    }

    /// A consumer's token answer, written into `out` as JSON: the grant's token and expiry,
    /// and what the provider adds.
    pub fn write_token(&self, grant: &Grant, account: Option<&str>, out: &mut Vec<u8>) -> serde_json::Result<()> {
        super::token_answer::write(self, grant, account, out)
    }
}

impl Adapter {
    /// Send through the provider's gate: wait for a slot under the rate limits, and honour a
    /// `Retry-After` for every later call.
    /// A pause longer than [`MAX_PAUSE_WAIT`] is not waited out: the call fails at once, saying
    /// until when the provider asked for quiet.
    pub async fn send(&self, kind: Kind, req: RequestBuilder) -> Result<Response, String> {
        match self.send_once(kind, req).await {
            Ok(resp) => Ok(resp),
            Err(Unsent::NotSent(e) | Unsent::Lost(e)) => Err(e),
        }
    }

    /// [`Adapter::send`] for a call that must not be repeated blindly (a refresh that rotates):
    /// says whether a failed request may have reached the provider.
    pub async fn send_once(&self, kind: Kind, req: RequestBuilder) -> Result<Response, Unsent> {
        if let Some(until) = self.gate().paused_until()
            && until - self.gate().now() > MAX_PAUSE_WAIT
        {
            let label = self.provider().manifest().label;
            return Err(Unsent::NotSent(format!(
                "{label} asked for no calls until {} (Retry-After); not calling it before then",
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )));
        }
        self.gate().acquire(&self.account.to_string(), kind).await.map_err(|e| Unsent::NotSent(e.to_string()))?;
        let resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) if e.is_connect() || e.is_builder() => return Err(Unsent::NotSent(transport_error(e))),
            Err(e) => return Err(Unsent::Lost(transport_error(e))),
        };
        // `Retry-After` on a 429 or a 503 holds back every connection of this provider.
        if matches!(resp.status(), StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
            && let Some(value) = resp.headers().get("retry-after").and_then(|v| v.to_str().ok())
        {
            self.gate().pause_for_header(value);
        }
        Ok(resp)
    }

    /// Run one provider call and count it: its endpoint class, its outcome and how long it took
    /// (no outcome: it never went out).
    async fn counted<T>(
        &self,
        endpoint: Endpoint,
        call: impl Future<Output = T>,
        outcome: impl FnOnce(&T) -> Option<Outcome>,
    ) -> T {
        let started = std::time::Instant::now();
        let answer = call.await;
        if let Some(outcome) = outcome(&answer) {
            let name = self.provider().manifest().name;
            self.reach.metrics.provider_call(name, endpoint, outcome, started.elapsed());
        }
        answer
    }

    pub async fn begin(&self, flow: &str, input: Input, now: DateTime<Utc>) -> Result<Begun, FlowError> {
        self.counted(Endpoint::Other, self.provider().begin(self, flow, input, now), |r| match r {
            Ok(_) => Some(Outcome::Valid),
            Err(FlowError::Rejected(_)) => Some(Outcome::Rejected),
            Err(FlowError::Unavailable(_)) => Some(Outcome::Unknown),
            // Settings or input refused before any call.
            Err(FlowError::Config(_) | FlowError::Input(_)) => None,
        })
        .await
    }

    pub async fn poll(&self, flow: &PendingFlow, now: DateTime<Utc>) -> Poll {
        self.counted(Endpoint::Poll, self.provider().poll(self, flow, now), |a| Some(Outcome::from(a))).await
    }

    pub async fn complete(&self, flow: &PendingFlow, query: &CallbackQuery, now: DateTime<Utc>) -> Poll {
        self.counted(Endpoint::Other, self.provider().complete(self, flow, query, now), |a| Some(Outcome::from(a)))
            .await
    }

    pub async fn validate(&self, grant: &Grant) -> Verdict<Identity> {
        self.counted(Endpoint::Validate, self.provider().validate(self, grant), |a| Some(Outcome::from(a))).await
    }

    pub async fn refresh(&self, grant: &Grant, now: DateTime<Utc>) -> Verdict<Grant> {
        self.counted(Endpoint::Refresh, self.provider().refresh(self, grant, now), |a| Some(Outcome::from(a))).await
    }

    pub async fn revoke(&self, grant: &Grant) -> Result<(), String> {
        let outcome = |r: &Result<(), String>| Some(if r.is_ok() { Outcome::Valid } else { Outcome::Unknown });
        self.counted(Endpoint::Revoke, self.provider().revoke(self, grant), outcome).await
    }
}
