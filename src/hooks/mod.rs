//! Hooks (`authkeeper.hooks`): a command run, and webhooks posted to, on chosen events.
//!
//! One task subscribes to the daemon's events channel, so transitions never wait on a hook.
//! For each event it queues the command (one run at a time per connection, see [`command`])
//! and, for webhooks, writes the deliveries durably to the store's outbox *before* the first
//! attempt; [`webhook`] sends them, retrying with capped exponential backoff, and deletes each
//! on a 2xx answer. A restart resends what is left: delivery is at least once, and receivers
//! de-duplicate by the event id.
//!
//! Events:
//! - `transition`: every committed transition.
//! - `needs_login`: a transition into `expired` or `disconnected` that a user's new login is
//!   the only way out of: the provider rejected the token or the refresh ([`Cause::Rejected`],
//!   [`Cause::RefreshRejected`], [`Cause::RefreshAnswerLost`]), the token expired unrefreshed
//!   ([`Cause::ExpiredUnrefreshed`]), or a login attempt was denied or ran out
//!   ([`Cause::Denied`], [`Cause::FlowExpired`]). A user's own disconnect, cancel or removal is
//!   not one. Such a transition also sends its `transition` event.
//! - `warning`: something the user may want to know that changed no state.
//! - `linked`: the login behind a one-time link connected.

mod command;
mod webhook;

pub use webhook::{EVENT_ID_HEADER, SIGNATURE_HEADER, signature};

use crate::daemon::Shared;
use crate::wire::WireEvent;
use authkeeper_state::{Cause, Secret, StateName};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::warn;

/// What a hook can be told of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Transition,
    NeedsLogin,
    Warning,
    Linked,
}

impl EventKind {
    pub fn all() -> Vec<Self> {
        vec![Self::Transition, Self::NeedsLogin, Self::Warning, Self::Linked]
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transition => "transition",
            Self::NeedsLogin => "needs_login",
            Self::Warning => "warning",
            Self::Linked => "linked",
        }
    }
}

/// The `"hooks"` block.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HookSettings {
    /// The program and its arguments; none when empty.
    pub command: Vec<String>,
    /// The events the command runs on (default: all).
    pub events: Vec<EventKind>,
    /// A run still going after this long is killed (default 30).
    pub command_timeout_secs: u64,
    pub webhooks: Vec<WebhookSettings>,
    /// The first retry of a failed delivery waits this long, doubling up to `retry_max_secs`.
    pub retry_base_ms: u64,
    pub retry_max_secs: u64,
}

impl Default for HookSettings {
    fn default() -> Self {
        Self {
            command: Vec::new(),
            events: EventKind::all(),
            command_timeout_secs: 30,
            webhooks: Vec::new(),
            retry_base_ms: 1000,
            retry_max_secs: 3600,
        }
    }
}

/// One webhook. Its URL may hold a token (some chat services put one there): `Debug` shows
/// only its origin, and the store keeps only a hash of it; the secret is never shown.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub url: String,
    pub secret: Secret,
    #[serde(default = "EventKind::all")]
    pub events: Vec<EventKind>,
}

impl WebhookSettings {
    /// Scheme, host and port: what may be shown of the URL.
    pub fn origin(&self) -> String {
        match reqwest::Url::parse(&self.url) {
            Ok(url) => url.origin().ascii_serialization(),
            Err(_) => "(not a URL)".to_owned(),
        }
    }
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &self.origin())
            .field("secret", &self.secret)
            .field("events", &self.events)
            .finish()
    }
}

impl HookSettings {
    /// What a config must get right: a program when events are chosen for one, URLs that parse
    /// as http(s), and no plain http to a public host unless `allowed`.
    pub fn check(&self, allow_insecure_http: bool) -> Result<(), String> {
        if self.command.first().is_some_and(|p| p.trim().is_empty()) {
            return Err("authkeeper.hooks.command: the program is empty".into());
        }
        for (i, hook) in self.webhooks.iter().enumerate() {
            let what = format!("authkeeper.hooks.webhooks[{i}].url");
            match reqwest::Url::parse(&hook.url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                _ => return Err(format!("{what}: not an http(s) URL")),
            }
            crate::insecure::check(&what, &hook.origin(), allow_insecure_http)?;
            if hook.secret.expose().is_empty() {
                return Err(format!("authkeeper.hooks.webhooks[{i}].secret: empty"));
            }
        }
        Ok(())
    }

    /// Whether the command or a webhook is told of `kind`.
    fn wants(&self, kind: EventKind) -> bool {
        (!self.command.is_empty() && self.events.contains(&kind))
            || self.webhooks.iter().any(|w| w.events.contains(&kind))
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.command_timeout_secs.max(1))
    }
}

/// The hook settings in force, replaced on each config load.
#[derive(Default)]
pub struct Current(RwLock<Arc<HookSettings>>);

impl Current {
    pub fn set(&self, settings: &HookSettings) {
        let mut current = self.0.write().unwrap();
        if **current != *settings {
            *current = Arc::new(settings.clone());
        }
    }

    pub fn get(&self) -> Arc<HookSettings> {
        self.0.read().unwrap().clone()
    }
}

/// What a hook is told: the JSON on a command's stdin and in a webhook's body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HookEvent {
    /// Unique per event (not per webhook): receivers de-duplicate by it.
    pub id: String,
    pub event: EventKind,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<StateName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<StateName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// On `needs_login` when the web listener is on: a fresh one-time login link (it opens a
    /// login page, so it is a secret), and when it runs out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_url: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_url_expires_at: Option<DateTime<Utc>>,
}

/// Whether a transition into `to` for `cause` leaves a connection that only a new login mends.
pub fn needs_login(to: StateName, cause: Cause) -> bool {
    matches!(to, StateName::Expired | StateName::Disconnected)
        && matches!(
            cause,
            Cause::Rejected
                | Cause::RefreshRejected
                | Cause::RefreshAnswerLost
                | Cause::ExpiredUnrefreshed
                | Cause::Denied
                | Cause::FlowExpired
        )
}

impl HookEvent {
    fn new(event: EventKind, at: DateTime<Utc>) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            event,
            at,
            provider: None,
            profile: None,
            from: None,
            to: None,
            cause: None,
            detail: None,
            message: None,
            login_url: None,
            login_url_expires_at: None,
        }
    }

    /// The hook events a daemon event makes (none for most kinds).
    pub fn from_wire(wire: &WireEvent) -> Vec<Self> {
        match wire {
            WireEvent::Transition { provider, profile, from, to, cause, at, detail } => {
                let transition = Self {
                    provider: Some(provider.clone()),
                    profile: Some(profile.clone()),
                    from: Some(*from),
                    to: Some(*to),
                    cause: Some(*cause),
                    detail: detail.clone(),
                    ..Self::new(EventKind::Transition, *at)
                };
                let login = needs_login(*to, *cause).then(|| Self {
                    id: uuid::Uuid::now_v7().to_string(),
                    event: EventKind::NeedsLogin,
                    ..transition.clone()
                });
                std::iter::once(transition).chain(login).collect()
            }
            WireEvent::Linked { provider, owner, at } => vec![Self {
                provider: Some(provider.clone()),
                profile: Some(owner.clone()),
                ..Self::new(EventKind::Linked, *at)
            }],
            WireEvent::Warning { message, at, provider, profile, .. } => vec![Self {
                provider: provider.clone(),
                profile: profile.clone(),
                message: Some(message.clone()),
                ..Self::new(EventKind::Warning, *at)
            }],
            _ => Vec::new(),
        }
    }

    /// The connection it concerns, `provider/profile` (empty for none).
    fn connection(&self) -> String {
        match (&self.provider, &self.profile) {
            (Some(provider), Some(profile)) => format!("{provider}/{profile}"),
            (Some(provider), None) => provider.clone(),
            _ => String::new(),
        }
    }
}

/// Give a `needs_login` event a fresh one-time link when the web listener is on and the
/// provider has a login a browser page can do; otherwise it goes without.
async fn add_login_link(shared: &Arc<Shared>, event: &mut HookEvent) {
    let (Some(provider), Some(profile)) = (event.provider.clone(), event.profile.clone()) else { return };
    if shared.public_url.get().is_none() || crate::links::page_flow(&provider).is_none() {
        return;
    }
    match crate::links::create(shared, &provider, &profile).await {
        Ok(issued) => {
            event.login_url = Some(Secret::new(issued.url));
            event.login_url_expires_at = Some(issued.expires_at);
        }
        Err(e) => warn!(provider, profile, error = %e, "no login link for a needs_login event"),
    }
}

/// Start the hooks on `events` (subscribed before any connection moves), and run until
/// `drain` turns true, after every event already published has been handed on. The webhook
/// sender stops at `shutdown`; what it has not delivered stays in the outbox.
pub fn spawn(
    shared: &Arc<Shared>,
    mut events: broadcast::Receiver<WireEvent>,
    shutdown: watch::Receiver<bool>,
    mut drain: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let (to_send, queued) = mpsc::unbounded_channel();
    let sender = tokio::spawn(webhook::Sender::new(shared.clone(), queued).run(shutdown));
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut commands = command::Queues::default();
        loop {
            let mut batch = Vec::new();
            let done = tokio::select! {
                received = events.recv() => match received {
                    Ok(event) => { batch.push(event); false }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "hooks fell behind the events; some were not handed on");
                        false
                    }
                    Err(broadcast::error::RecvError::Closed) => true,
                },
                _ = async { let _ = drain.wait_for(|d| *d).await; } => true,
            };
            while let Ok(event) = events.try_recv() {
                batch.push(event);
            }
            let settings = shared.hooks.get();
            let mut hook_events: Vec<HookEvent> = batch.iter().flat_map(HookEvent::from_wire).collect();
            for event in hook_events.iter_mut().filter(|e| e.event == EventKind::NeedsLogin) {
                if settings.wants(EventKind::NeedsLogin) {
                    add_login_link(&shared, event).await;
                }
            }
            for event in &hook_events {
                if !settings.command.is_empty() && settings.events.contains(&event.event) {
                    commands.queue(&settings, event);
                }
            }
            let rows = webhook::enqueue(&shared, &settings, &hook_events).await;
            if !rows.is_empty() {
                let _ = to_send.send(rows);
            }
            if done {
                break;
            }
        }
        drop(to_send);
        let _ = sender.await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_with_defaults_and_debug_shows_neither_secret_nor_url_path() {
        let settings: HookSettings = serde_json::from_value(serde_json::json!({
            "command": ["/bin/notify", "x"],
            "webhooks": [{"url": "https://hooks.example.com/api/webhooks/123/tok-in-path", "secret": "s3cr3t-value"}],
        }))
        .unwrap();
        assert_eq!((settings.events.len(), settings.command_timeout_secs), (4, 30));
        assert_eq!(settings.webhooks[0].events, EventKind::all());
        let shown = format!("{settings:?}");
        assert!(!shown.contains("s3cr3t-value") && !shown.contains("tok-in-path"), "{shown}");
        assert!(shown.contains("https://hooks.example.com"), "{shown}");
        assert_eq!(settings.check(false), Ok(()));
        let unknown = serde_json::from_value::<HookSettings>(serde_json::json!({"events": ["reboot"]}));
        assert!(unknown.is_err());
    }

    #[test]
    fn bad_webhook_urls_are_refused_without_showing_them() {
        let hook = |url: &str| HookSettings {
            webhooks: vec![WebhookSettings { url: url.into(), secret: "k".into(), events: EventKind::all() }],
            ..HookSettings::default()
        };
        let plain = hook("http://hooks.example.com/secret-path").check(false).unwrap_err();
        assert!(plain.contains("webhooks[0].url") && !plain.contains("secret-path"), "{plain}");
        assert_eq!(hook("http://hooks.example.com/x").check(true), Ok(()));
        assert_eq!(hook("http://127.0.0.1:9/x").check(false), Ok(()));
        assert!(hook("ftp://example.com/").check(true).unwrap_err().contains("not an http(s) URL"));
    }

    #[test]
    fn needs_login_is_a_rejection_or_a_lapse_not_a_users_own_choice() {
        use StateName::*;
        for cause in [Cause::Rejected, Cause::RefreshRejected, Cause::RefreshAnswerLost, Cause::ExpiredUnrefreshed] {
            assert!(needs_login(Expired, cause), "{cause:?}");
        }
        assert!(needs_login(Disconnected, Cause::Denied) && needs_login(Disconnected, Cause::FlowExpired));
        for cause in [Cause::Disconnected, Cause::Cancelled, Cause::Removed] {
            assert!(!needs_login(Disconnected, cause), "{cause:?}");
        }
        assert!(!needs_login(Connected, Cause::Validated) && !needs_login(Pending, Cause::ConnectRequested));
    }

    #[test]
    fn a_transition_that_needs_a_login_makes_two_events_with_their_own_ids() {
        let wire = WireEvent::Transition {
            provider: "trakt".into(),
            profile: "default".into(),
            from: StateName::Connected,
            to: StateName::Expired,
            cause: Cause::RefreshRejected,
            at: Utc::now(),
            detail: None,
        };
        let events = HookEvent::from_wire(&wire);
        let kinds: Vec<EventKind> = events.iter().map(|e| e.event).collect();
        assert_eq!(kinds, [EventKind::Transition, EventKind::NeedsLogin]);
        assert_ne!(events[0].id, events[1].id);
        let config = WireEvent::ConfigReloaded { changed: vec![], at: Utc::now() };
        assert!(HookEvent::from_wire(&config).is_empty());
    }
}
