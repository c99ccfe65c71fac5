//! Link outcomes on the events stream: `link_opened` (from the login page), `linked` and
//! `link_failed` (from the transitions of a link's connection once its login started), and
//! `link_expired` (a link never opened in its 10 minutes).

use super::{load, progress};
use crate::daemon::Shared;
use crate::wire::WireEvent;
use authkeeper_state::{Cause, ConnKey, LinkRecord, StateName};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch as stop};

/// The links whose outcome is still to come.
#[derive(Default)]
pub struct Active(Mutex<Inner>);

#[derive(Default)]
struct Inner {
    /// Opened links, by the connection they log in.
    opened: HashMap<ConnKey, String>,
    /// Links not opened yet: id → (connection, end).
    waiting: HashMap<String, (ConnKey, DateTime<Utc>)>,
}

impl Active {
    /// Follow `record` (a link made, or read at start).
    pub fn track(&self, id: &str, record: &LinkRecord) {
        let key = ConnKey::new(&record.provider, &record.profile);
        let mut inner = self.0.lock().unwrap();
        inner.waiting.retain(|_, (k, _)| *k != key || record.session_hash.is_some());
        match (record.outcome.is_some(), record.session_hash.is_some()) {
            (true, _) => {}
            (false, true) => {
                inner.waiting.remove(id);
                inner.opened.insert(key, id.to_owned());
            }
            (false, false) => {
                inner.waiting.insert(id.to_owned(), (key, record.expires_at));
            }
        }
    }

    fn opened(&self, key: &ConnKey) -> Option<String> {
        self.0.lock().unwrap().opened.get(key).cloned()
    }

    fn finish(&self, key: &ConnKey) {
        self.0.lock().unwrap().opened.remove(key);
    }

    fn expired(&self, now: DateTime<Utc>) -> Vec<String> {
        let mut inner = self.0.lock().unwrap();
        let gone: Vec<String> =
            inner.waiting.iter().filter(|(_, (_, end))| *end <= now).map(|(id, _)| id.clone()).collect();
        for id in &gone {
            inner.waiting.remove(id);
        }
        gone
    }
}

/// Publish link outcomes until `shutdown`.
pub async fn watch(shared: Arc<Shared>, mut shutdown: stop::Receiver<bool>) {
    let store = shared.store.clone();
    if let Ok(Ok(links)) = tokio::task::spawn_blocking(move || store.links()).await {
        for (id, record) in links {
            shared.active_links.track(&id, &record);
        }
    }
    let mut events = shared.events.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            _ = tick.tick() => expire(&shared).await,
            event = events.recv() => match event {
                Ok(WireEvent::Transition { provider, profile, from, to, cause, detail, .. }) => {
                    let key = ConnKey::new(&provider, &profile);
                    outcome(&shared, &key, from, to, cause, detail).await;
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

async fn outcome(
    shared: &Arc<Shared>,
    key: &ConnKey,
    from: StateName,
    to: StateName,
    cause: Cause,
    detail: Option<String>,
) {
    let Some(id) = shared.active_links.opened(key) else { return };
    let Ok(Some(record)) = load(shared, &id).await else { return };
    if !record.started || record.outcome.is_some() {
        return;
    }
    let (provider, owner, at) = (key.provider.to_string(), key.profile.to_string(), shared.clock.now());
    let (outcome, event) = match (from, to, cause) {
        (_, StateName::Connected, _) => ("linked", WireEvent::Linked { provider, owner, at }),
        // The page cancels a pending code itself when the user switches to the password form.
        (_, _, Cause::Cancelled) => return,
        (StateName::Pending, StateName::Disconnected | StateName::Expired, _) => {
            ("failed", WireEvent::LinkFailed { provider, owner, at, detail })
        }
        _ => return,
    };
    shared.active_links.finish(key);
    if let Ok(Some(after)) = progress(shared, &id, false, Some(outcome), false).await
        && after.outcome.as_deref() == Some(outcome)
    {
        let _ = shared.events.send(event);
    }
}

async fn expire(shared: &Arc<Shared>) {
    for id in shared.active_links.expired(shared.clock.now()) {
        let Ok(Some(record)) = progress(shared, &id, false, Some("expired"), true).await else { continue };
        if record.outcome.as_deref() != Some("expired") || record.session_hash.is_some() {
            continue;
        }
        let (provider, owner, at) = (record.provider, record.profile, shared.clock.now());
        let _ = shared.events.send(WireEvent::LinkExpired { provider, owner, at });
    }
}
