//! Two small pieces of shared state: the write-back queue, which keeps the latest credential of
//! each connection until the config owner writes it (never dropping one), and the store's
//! health, which says whether commits go through (and, while they do not, tries an empty one
//! now and then so that the store's recovery is noticed even when nothing else writes).

use authkeeper_state::{ConnKey, Grant};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::sync::Mutex;
use tokio::sync::Notify;

/// Credentials waiting to be mirrored into config.json: one entry per connection, the latest
/// wins (an older one would only be overwritten), nothing is ever dropped.
#[derive(Default)]
pub struct WriteBacks {
    pending: Mutex<BTreeMap<ConnKey, Option<Grant>>>,
    ready: Notify,
}

impl WriteBacks {
    /// `key`'s credential is now `grant` (`None`: disconnected).
    pub fn push(&self, key: ConnKey, grant: Option<Grant>) {
        self.pending.lock().unwrap().insert(key, grant);
        self.ready.notify_one();
    }

    /// Put back what could not be written yet, unless a newer credential came meanwhile.
    pub fn keep(&self, unwritten: BTreeMap<ConnKey, Option<Grant>>) {
        let mut pending = self.pending.lock().unwrap();
        for (key, grant) in unwritten {
            pending.entry(key).or_insert(grant);
        }
    }

    /// Wake the writer to look again at what is kept.
    pub fn nudge(&self) {
        self.ready.notify_one();
    }

    /// Everything waiting, oldest key first; the queue is empty afterwards.
    pub fn take(&self) -> BTreeMap<ConnKey, Option<Grant>> {
        std::mem::take(&mut *self.pending.lock().unwrap())
    }

    /// Resolves when something was pushed since the last call (at once if it already was).
    pub async fn ready(&self) {
        self.ready.notified().await
    }
}

/// Whether the store takes writes. Set by every commit's outcome.
#[derive(Default)]
pub struct StoreHealth {
    failing: Mutex<Option<(DateTime<Utc>, String)>>,
}

impl StoreHealth {
    pub fn record(&self, outcome: Result<(), &str>, now: DateTime<Utc>) {
        let mut failing = self.failing.lock().unwrap();
        match outcome {
            Ok(()) => *failing = None,
            Err(e) => {
                let since = failing.as_ref().map_or(now, |(since, _)| *since);
                *failing = Some((since, e.to_owned()));
            }
        }
    }

    /// The last error, while commits fail.
    pub fn failing(&self) -> Option<String> {
        self.failing.lock().unwrap().as_ref().map(|(_, e)| e.clone())
    }

    /// Since when commits fail, and the last error.
    pub fn status(&self) -> Option<(DateTime<Utc>, String)> {
        self.failing.lock().unwrap().clone()
    }
}

/// How often an empty commit tries the store while commits fail.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// While commits fail, commit nothing every [`PROBE_EVERY`]: work waits for the store meanwhile
/// (scheduled calls are deferred, new commands refused), so something must notice it is back.
pub async fn probe_while_failing(
    shared: std::sync::Arc<super::Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if shared.store_health.failing().is_none() {
            continue;
        }
        let store = shared.store.clone();
        if let Ok(outcome) = tokio::task::spawn_blocking(move || store.commit(&[])).await {
            let outcome = outcome.map_err(|e| e.to_string());
            if outcome.is_ok() {
                tracing::info!("the store takes writes again");
            }
            shared.store_health.record(outcome.as_ref().map(drop).map_err(String::as_str), shared.clock.now());
        }
    }
}
