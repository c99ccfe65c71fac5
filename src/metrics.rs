//! Prometheus metrics, served as `GET /metrics` (text format 0.0.4) on the control socket and,
//! with `authkeeper.web.metrics`, on the web listener. Each daemon has its own registry in its `Shared`. Counters and histograms
//! move where the work happens; the connection and queue gauges are read from the daemon's
//! views at each scrape. Labels are provider names, states, causes, endpoint classes and
//! outcomes only: never a profile id, a URL or anything from a credential.

use crate::daemon::Shared;
use crate::providers::{Poll, Verdict};
use authkeeper_state::{Cause, StateName};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text::{CONTENT_TYPE, encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    provider: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    provider: String,
    /// Its wire name, as in history.
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    provider: &'static str,
    endpoint: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    provider: &'static str,
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Which kind of provider endpoint a call went to.
#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    Validate,
    Refresh,
    Poll,
    Revoke,
    /// Starting a flow, exchanging a callback's code.
    Other,
}

impl Endpoint {
    fn as_str(self) -> &'static str {
        match self {
            Self::Validate => "validate",
            Self::Refresh => "refresh",
            Self::Poll => "poll",
            Self::Revoke => "revoke",
            Self::Other => "other",
        }
    }
}

/// What a provider call came back with: an answer either way, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Valid,
    Rejected,
    Unknown,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::Rejected => "rejected",
            Self::Unknown => "unknown",
        }
    }
}

impl<T> From<&Verdict<T>> for Outcome {
    fn from(v: &Verdict<T>) -> Self {
        match v {
            Verdict::Valid(_) => Self::Valid,
            Verdict::Rejected(_) => Self::Rejected,
            Verdict::Unknown(_) => Self::Unknown,
        }
    }
}

impl From<&Poll> for Outcome {
    fn from(p: &Poll) -> Self {
        match p {
            Poll::Pending | Poll::SlowDown | Poll::Approved(_) => Self::Valid,
            Poll::Gone(_) | Poll::Denied => Self::Rejected,
            Poll::Unknown(_) => Self::Unknown,
        }
    }
}

/// One daemon's metrics.
pub struct Metrics {
    /// Under a lock so that one scrape's gauges are not reset by another's halfway through.
    registry: Mutex<Registry>,
    connections: Family<StateLabels, Gauge>,
    transitions: Family<CauseLabels, Counter>,
    calls: Family<CallLabels, Counter>,
    call_seconds: Histograms<EndpointLabels>,
    refresh_lead: Histograms<ProviderLabels>,
    queue_depth: Gauge,
    commit_batch: Histogram,
    commit_seconds: Histogram,
    config_reloads: Counter,
    config_errors: Counter,
    /// `authkeeper.web.metrics`: the web listener answers `GET /metrics` too.
    on_web: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("authkeeper");
        let connections = Family::<StateLabels, Gauge>::default();
        r.register("connections", "Connections by provider and state", connections.clone());
        let transitions = Family::<CauseLabels, Counter>::default();
        r.register("transitions", "Committed transitions by provider and cause", transitions.clone());
        let calls = Family::<CallLabels, Counter>::default();
        r.register("provider_calls", "Provider calls by provider, endpoint class and outcome", calls.clone());
        let call_seconds: Histograms<EndpointLabels> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 14)));
        r.register_with_unit(
            "provider_call_duration",
            "Provider call latency, rate-limit waits included",
            Unit::Seconds,
            call_seconds.clone(),
        );
        let refresh_lead: Histograms<ProviderLabels> = Family::new_with_constructor(|| {
            Histogram::new([60.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0, 21600.0, 43200.0, 86400.0, 259200.0, 604800.0])
        });
        r.register_with_unit(
            "refresh_lead_time",
            "How long before the old token's expiry each successful refresh happened",
            Unit::Seconds,
            refresh_lead.clone(),
        );
        let queue_depth = Gauge::default();
        r.register(
            "scheduler_queue_depth",
            "Connections with a deadline in the scheduler's queue",
            queue_depth.clone(),
        );
        let commit_batch = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        r.register("commit_batch_size", "Transitions per store transaction", commit_batch.clone());
        let commit_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        r.register_with_unit("commit_duration", "Store transaction latency", Unit::Seconds, commit_seconds.clone());
        let config_reloads = Counter::default();
        r.register("config_reloads", "Config file reads applied", config_reloads.clone());
        let config_errors = Counter::default();
        r.register("config_errors", "Config file reads refused as invalid", config_errors.clone());
        Self {
            registry: Mutex::new(r),
            connections,
            transitions,
            calls,
            call_seconds,
            refresh_lead,
            queue_depth,
            commit_batch,
            commit_seconds,
            config_reloads,
            config_errors,
            on_web: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn transition(&self, provider: &str, cause: Cause) {
        self.transitions.get_or_create(&CauseLabels { provider: provider.to_owned(), cause: wire_name(cause) }).inc();
    }

    pub fn provider_call(&self, provider: &'static str, endpoint: Endpoint, outcome: Outcome, took: Duration) {
        let endpoint = endpoint.as_str();
        self.calls.get_or_create(&CallLabels { provider, endpoint, outcome: outcome.as_str() }).inc();
        self.call_seconds.get_or_create(&EndpointLabels { provider, endpoint }).observe(took.as_secs_f64());
    }

    /// A refresh succeeded `lead_secs` before the old token would have expired.
    pub fn refresh_lead(&self, provider: &str, lead_secs: f64) {
        self.refresh_lead.get_or_create(&ProviderLabels { provider: provider.to_owned() }).observe(lead_secs.max(0.0));
    }

    pub fn commit(&self, batch: usize, took: Duration) {
        self.commit_batch.observe(batch as f64);
        self.commit_seconds.observe(took.as_secs_f64());
    }

    pub fn config_reloaded(&self) {
        self.config_reloads.inc();
    }

    pub fn config_refused(&self) {
        self.config_errors.inc();
    }

    pub fn serve_on_web(&self, on: bool) {
        self.on_web.store(on, Ordering::Relaxed);
    }

    pub fn on_web(&self) -> bool {
        self.on_web.load(Ordering::Relaxed)
    }

    /// The text for a scrape, with the gauges read from `shared` now.
    pub fn render(&self, shared: &Shared) -> String {
        let registry = self.registry.lock().unwrap();
        self.connections.clear();
        let conns = shared.conns.read().unwrap();
        let providers: BTreeSet<&str> = conns.keys().map(|k| k.provider.as_str()).collect();
        // Every state of a provider in use, zero or not, so a state emptying shows as 0.
        for provider in providers {
            for state in [StateName::Disconnected, StateName::Pending, StateName::Connected, StateName::Expired] {
                self.connections
                    .get_or_create(&StateLabels { provider: provider.to_owned(), state: state.as_str() })
                    .set(0);
            }
        }
        for (key, slot) in conns.iter() {
            let state = slot.committed.state_name().as_str();
            self.connections.get_or_create(&StateLabels { provider: key.provider.to_string(), state }).inc();
        }
        drop(conns);
        self.queue_depth.set(shared.deadlines.stats().deadlines as i64);
        let mut out = String::new();
        encode(&mut out, &registry).expect("writing to a String does not fail");
        out
    }
}

fn wire_name(cause: Cause) -> String {
    match serde_json::to_value(cause) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{cause:?}"),
    }
}

/// `GET /metrics`, on either listener.
pub async fn scrape(axum::extract::State(shared): axum::extract::State<std::sync::Arc<Shared>>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], shared.metrics.render(&shared)).into_response()
}
