//! One-time login links, for chat bots and other multi-user front ends: `POST /v1/links`
//! makes one for an owner (`discord:123456`) or a profile; the user opens it in a browser on
//! the web listener and logs in there. A link's token is `{id}.{secret}`: 256 random bits of
//! secret, stored only as a hash and compared in constant time, valid 10 minutes, usable once.
//! Its first use trades it for a browser session (an HttpOnly, SameSite=Strict cookie), so the
//! token leaves the address bar, and reloading the page, even after a restart, shows the same
//! login.

mod guesses;
mod pages;
mod watch;

pub use guesses::Guesses;
pub use pages::routes;
pub use watch::{Active, watch};

use crate::daemon::{ConfigCommand, DaemonError, Shared};
use crate::providers;
use crate::providers::oauth_code::random_token;
use authkeeper_state::{ConnKey, LinkRecord, is_owner_id};
use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// How long a link may wait to be opened, unless `authkeeper.web.link_ttl_secs` says otherwise.
pub const LINK_TTL: TimeDelta = TimeDelta::minutes(10);
/// How long the browser session a link became lasts, from the link's end.
pub const SESSION_TTL: TimeDelta = TimeDelta::minutes(30);

/// The 201 answer to `POST /v1/links`.
#[derive(Debug, Serialize)]
pub struct Issued {
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

pub fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// `secret` hashes to `expected`, compared in constant time.
pub fn matches(expected: &[u8; 32], secret: &str) -> bool {
    subtle::ConstantTimeEq::ct_eq(&expected[..], &hash(secret)[..]).into()
}

/// `{id}.{secret}` → (id, secret), when it has that shape.
pub fn split(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    let ok = |s: &str| {
        !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (ok(id) && ok(secret)).then_some((id, secret))
}

/// Make an owner's connection if it has none yet (a config profile must exist already).
pub async fn ensure_connection(shared: &Arc<Shared>, key: &ConnKey) -> Result<(), DaemonError> {
    match shared.lookup(&key.provider, &key.profile, |_| ()) {
        Ok(()) => return Ok(()),
        Err(e @ DaemonError::BadRequest(_)) => return Err(e),
        Err(_) => {}
    }
    if !is_owner_id(&key.profile) {
        return Err(DaemonError::unknown_profile(&key.provider, &key.profile));
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    let command = ConfigCommand::AddOwner { key: key.clone(), reply };
    shared.config_tx.send(command).await.map_err(|_| DaemonError::ShuttingDown)?;
    answer.await.map_err(|_| DaemonError::ShuttingDown)?
}

/// How a link's page logs in to a provider.
pub enum PageFlow {
    /// Start this flow, which asks nothing of the user but to act on a code or a page.
    Start(&'static str),
    /// Only a username and password: the form.
    Password,
}

/// What a link's page can do for `provider`, if anything.
pub fn page_flow(provider: &str) -> Option<PageFlow> {
    let m = providers::find(provider)?.manifest();
    if m.named_profiles {
        return None;
    }
    match m.flows.iter().find(|f| f.fields.is_empty()) {
        Some(f) => Some(PageFlow::Start(f.flow)),
        None => m.flows.iter().any(|f| f.flow == "password").then_some(PageFlow::Password),
    }
}

/// Whether `provider` offers a password login (a fallback on the page).
pub fn has_password(provider: &str) -> bool {
    providers::find(provider).is_some_and(|p| p.manifest().flows.iter().any(|f| f.flow == "password"))
}

/// A new link for `provider`/`profile`.
pub async fn create(shared: &Arc<Shared>, provider: &str, profile: &str) -> Result<Issued, DaemonError> {
    providers::find(provider).ok_or_else(|| DaemonError::UnknownProvider(crate::daemon::shown(provider)))?;
    if page_flow(provider).is_none() {
        return Err(DaemonError::BadRequest(format!(
            "{provider} has no login a browser page can do (it takes a key or a named instance): \
             use `authkeeper connect {provider}`"
        )));
    }
    let Some(public_url) = shared.public_url.get() else {
        return Err(DaemonError::Conflict(
            "links open on the web listener: set \"authkeeper\": {\"web\": {\"listen\", \"public_url\"}} first".into(),
        ));
    };
    let key = ConnKey::new(provider, profile);
    ensure_connection(shared, &key).await?;
    let (id, secret) = (random_token(), random_token());
    let expires_at = shared.clock.now() + *shared.link_ttl.read().unwrap();
    let record = LinkRecord {
        provider: provider.to_owned(),
        profile: profile.to_owned(),
        secret_hash: hash(&secret),
        expires_at,
        session_hash: None,
        started: false,
        outcome: None,
    };
    save(shared, &id, &record).await?;
    shared.active_links.track(&id, &record);
    Ok(Issued { url: format!("{public_url}/login?token={id}.{secret}"), expires_at })
}

/// Save a link's record, durably, off the runtime.
pub async fn save(shared: &Arc<Shared>, id: &str, record: &LinkRecord) -> Result<(), DaemonError> {
    let (store, id, record) = (shared.store.clone(), id.to_owned(), record.clone());
    tokio::task::spawn_blocking(move || store.put_link(&id, &record))
        .await
        .map_err(|e| DaemonError::Internal(e.to_string()))?
        .map_err(|e| DaemonError::Store(e.to_string()))
}

/// Progress a link atomically (see `Store::progress_link`), off the runtime.
pub async fn progress(
    shared: &Arc<Shared>,
    id: &str,
    started: bool,
    outcome: Option<&'static str>,
    only_unopened: bool,
) -> Result<Option<LinkRecord>, DaemonError> {
    let (store, id) = (shared.store.clone(), id.to_owned());
    tokio::task::spawn_blocking(move || store.progress_link(&id, started, outcome, only_unopened))
        .await
        .map_err(|e| DaemonError::Internal(e.to_string()))?
        .map_err(|e| DaemonError::Store(e.to_string()))
}

/// A link's record, off the runtime.
pub async fn load(shared: &Arc<Shared>, id: &str) -> Result<Option<LinkRecord>, DaemonError> {
    let (store, id) = (shared.store.clone(), id.to_owned());
    tokio::task::spawn_blocking(move || store.link(&id))
        .await
        .map_err(|e| DaemonError::Internal(e.to_string()))?
        .map_err(|e| DaemonError::Store(e.to_string()))
}
