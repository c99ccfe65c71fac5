//! Webhooks: signed JSON POSTs from the store's outbox, retried until a 2xx answer.

use super::{HookEvent, HookSettings, WebhookSettings};
use crate::daemon::Shared;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, warn};

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub const SIGNATURE_HEADER: &str = "Authkeeper-Signature";
/// The event's id, the same on every retry and for every webhook.
pub const EVENT_ID_HEADER: &str = "Authkeeper-Event-Id";
/// How long one delivery attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The hex HMAC-SHA256 of `"<t>.<body>"` under `secret`: the `v1` of the signature header.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// A delivery as the outbox keeps it: which webhook (by a hash of its URL, which may hold a
/// token), the event id and the body. The secret is looked up in the config when sending.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Delivery {
    target: String,
    event_id: String,
    body: String,
}

fn target(hook: &WebhookSettings) -> String {
    Sha256::digest(hook.url.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Write the deliveries `events` make to the outbox, durably, before any attempt. A store that
/// fails is logged; the deliveries are still tried from memory.
pub(super) async fn enqueue(
    shared: &Arc<Shared>,
    settings: &HookSettings,
    events: &[HookEvent],
) -> Vec<(String, Vec<u8>)> {
    let mut rows = Vec::new();
    for event in events {
        let body = serde_json::to_string(event).expect("an event serializes");
        for hook in settings.webhooks.iter().filter(|h| h.events.contains(&event.event)) {
            let delivery = Delivery { target: target(hook), event_id: event.id.clone(), body: body.clone() };
            let bytes = serde_json::to_vec(&delivery).expect("a delivery serializes");
            rows.push((uuid::Uuid::now_v7().to_string(), bytes));
        }
    }
    if rows.is_empty() {
        return rows;
    }
    let store = shared.store.clone();
    let saved = rows.clone();
    match tokio::task::spawn_blocking(move || store.put_outbox(&saved)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "cannot save webhook deliveries; trying them from memory"),
        Err(e) => warn!(error = %e, "saving webhook deliveries panicked"),
    }
    rows
}

struct Pending {
    delivery: Delivery,
    attempts: u32,
    /// `None` while an attempt is in flight.
    due: Option<Instant>,
}

enum Outcome {
    Delivered,
    /// The webhook is no longer configured.
    Gone,
    Failed(String),
}

pub(super) struct Sender {
    shared: Arc<Shared>,
    queued: mpsc::UnboundedReceiver<Vec<(String, Vec<u8>)>>,
    pending: BTreeMap<String, Pending>,
    http: reqwest::Client,
}

impl Sender {
    pub fn new(shared: Arc<Shared>, queued: mpsc::UnboundedReceiver<Vec<(String, Vec<u8>)>>) -> Self {
        let http = crate::providers::http_client(ATTEMPT_TIMEOUT);
        Self { shared, queued, pending: BTreeMap::new(), http }
    }

    fn add(&mut self, id: String, bytes: &[u8]) {
        match serde_json::from_slice(bytes) {
            Ok(delivery) => {
                let pending = Pending { delivery, attempts: 0, due: Some(Instant::now()) };
                self.pending.insert(id, pending);
            }
            Err(e) => warn!(id, error = %e, "a webhook delivery in the store does not read; left there"),
        }
    }

    /// Send what the outbox holds and what comes, until `shutdown`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let store = self.shared.store.clone();
        match tokio::task::spawn_blocking(move || store.outbox()).await {
            Ok(Ok(rows)) => rows.into_iter().for_each(|(id, bytes)| self.add(id, &bytes)),
            Ok(Err(e)) => warn!(error = %e, "cannot read the webhook outbox"),
            Err(e) => warn!(error = %e, "reading the webhook outbox panicked"),
        }
        let mut flights: JoinSet<(String, Outcome)> = JoinSet::new();
        let mut open = true;
        loop {
            let now = Instant::now();
            let due: Vec<String> = self
                .pending
                .iter()
                .filter(|(_, p)| p.due.is_some_and(|d| d <= now))
                .map(|(id, _)| id.clone())
                .collect();
            for id in due {
                let pending = self.pending.get_mut(&id).expect("listed above");
                pending.due = None;
                let (delivery, http, settings) = (pending.delivery.clone(), self.http.clone(), self.shared.hooks.get());
                let t = self.shared.clock.now().timestamp();
                flights.spawn(async move { (id, attempt(&http, &settings, &delivery, t).await) });
            }
            let next = self.pending.values().filter_map(|p| p.due).min();
            tokio::select! {
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
                rows = self.queued.recv(), if open => match rows {
                    Some(rows) => rows.into_iter().for_each(|(id, bytes)| self.add(id, &bytes)),
                    None => open = false,
                },
                Some(Ok((id, outcome))) = flights.join_next() => self.settle(id, outcome).await,
                _ = tokio::time::sleep_until(next.unwrap_or(now)), if next.is_some() => {}
            }
        }
    }

    async fn settle(&mut self, id: String, outcome: Outcome) {
        let Some(pending) = self.pending.get_mut(&id) else { return };
        match outcome {
            // With no good config read, a webhook missing from it may come back: keep trying.
            Outcome::Gone if self.shared.config.read().unwrap().error.is_some() => {
                pending.due = Some(Instant::now() + backoff(&self.shared.hooks.get(), pending.attempts));
            }
            Outcome::Failed(why) => {
                let settings = self.shared.hooks.get();
                let delay = backoff(&settings, pending.attempts);
                pending.attempts += 1;
                pending.due = Some(Instant::now() + delay);
                let event_id = &pending.delivery.event_id;
                debug!(event_id, attempts = pending.attempts, retry_in = ?delay, why, "webhook delivery failed");
            }
            Outcome::Delivered | Outcome::Gone => {
                if matches!(outcome, Outcome::Gone) {
                    warn!(event_id = pending.delivery.event_id, "webhook no longer configured; delivery dropped");
                }
                self.pending.remove(&id);
                let store = self.shared.store.clone();
                match tokio::task::spawn_blocking(move || store.remove_outbox(&id)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "cannot remove a delivered webhook from the outbox"),
                    Err(e) => warn!(error = %e, "removing a delivered webhook panicked"),
                }
            }
        }
    }
}

/// `retry_base_ms · 2^attempts`, capped at `retry_max_secs`, less up to a quarter of jitter.
fn backoff(settings: &HookSettings, attempts: u32) -> Duration {
    let base = Duration::from_millis(settings.retry_base_ms.max(1));
    let cap = Duration::from_secs(settings.retry_max_secs.max(1));
    let delay = base.saturating_mul(1 << attempts.min(30)).min(cap);
    delay.mul_f64(1.0 - fastrand::f64() / 4.0)
}

async fn attempt(http: &reqwest::Client, settings: &HookSettings, delivery: &Delivery, t: i64) -> Outcome {
    let Some(hook) = settings.webhooks.iter().find(|h| target(h) == delivery.target) else {
        return Outcome::Gone;
    };
    let v1 = signature(hook.secret.expose().as_bytes(), t, delivery.body.as_bytes());
    let sent = http
        .post(&hook.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, format!("t={t},v1={v1}"))
        .header(EVENT_ID_HEADER, &delivery.event_id)
        .body(delivery.body.clone())
        .send()
        .await;
    match sent {
        Ok(answer) if answer.status().is_success() => Outcome::Delivered,
        Ok(answer) => Outcome::Failed(format!("{} answered {}", hook.origin(), answer.status())),
        Err(e) => Outcome::Failed(format!("{}: {}", hook.origin(), crate::providers::transport_error(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_time_dot_body() {
        // Computed with Python's hmac: hmac.new(b"Jefe", b'1700000000.{"a":1}', sha256).
        let expected = "fa5f6481efc59da48b19c9dc10196c9953e5651f8304b3a318b6b87d70272e0a";
        assert_eq!(signature(b"Jefe", 1_700_000_000, br#"{"a":1}"#), expected);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let settings = HookSettings { retry_base_ms: 100, retry_max_secs: 1, ..HookSettings::default() };
        let first = backoff(&settings, 0);
        assert!(first <= Duration::from_millis(100) && first >= Duration::from_millis(75));
        let third = backoff(&settings, 2);
        assert!(third <= Duration::from_millis(400) && third >= Duration::from_millis(300));
        assert!(backoff(&settings, 20) <= Duration::from_secs(1));
    }
}
