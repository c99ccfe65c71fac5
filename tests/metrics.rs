//! `GET /metrics` on the control socket and on the web listener, through the real binary: both
//! parse as Prometheus text, and the series a user would graph move as a Trakt connection is
//! connected, refreshed, its config reloaded (and refused), a validation left without a verdict
//! and a revoked token refused, with no secret in them.

mod common;

use authkeeper::wire::{ConnectionView, WireEvent};
use authkeeper_fixtures::Fault;
use authkeeper_state::StateName;
use common::trackers::free_port;
use common::*;
use prometheus_parse::{Scrape, Value};
use serde_json::json;
use std::collections::BTreeMap;

/// One scrape: the raw text, and what a Prometheus parser made of it.
struct Metrics {
    text: String,
    scrape: Scrape,
}

impl Metrics {
    fn parse(text: String) -> Self {
        let lines = text.lines().map(|l| Ok(l.to_owned())).collect::<Vec<_>>();
        let scrape = Scrape::parse(lines.into_iter()).expect("the metrics parse as Prometheus text");
        // The parser skips lines it cannot read: every sample line must have become a sample.
        let read: usize = scrape
            .samples
            .iter()
            .map(|s| match &s.value {
                Value::Histogram(buckets) => buckets.len(),
                _ => 1,
            })
            .sum();
        let sample_lines = text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count();
        assert_eq!(read, sample_lines, "some lines were not Prometheus samples:\n{text}");
        Self { text, scrape }
    }

    /// The value of the series `metric{labels}`, labels matched exactly.
    fn get(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<&str, &str> = labels.iter().copied().collect();
        self.scrape.samples.iter().find_map(|s| {
            let have: BTreeMap<&str, &str> = s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            if s.metric != metric || have != want {
                return None;
            }
            match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                _ => None,
            }
        })
    }

    /// [`Self::get`], for a series that must be there.
    fn value(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(metric, labels).unwrap_or_else(|| panic!("no {metric}{labels:?} in:\n{}", self.text))
    }

    fn transitions(&self, cause: &str) -> f64 {
        self.get("authkeeper_transitions_total", &[("provider", "trakt"), ("cause", cause)]).unwrap_or(0.0)
    }

    fn calls(&self, endpoint: &str, outcome: &str) -> f64 {
        let labels = [("provider", "trakt"), ("endpoint", endpoint), ("outcome", outcome)];
        self.get("authkeeper_provider_calls_total", &labels).unwrap_or(0.0)
    }

    fn connections(&self, state: StateName) -> f64 {
        self.value("authkeeper_connections", &[("provider", "trakt"), ("state", state.as_str())])
    }
}

/// `GET /metrics` over the control socket.
async fn socket_metrics(h: &Harness) -> Metrics {
    authkeeper::providers::install_crypto();
    let http = reqwest::Client::builder().unix_socket(h.socket()).build().unwrap();
    let resp = http.get("http://localhost/metrics").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let kind = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    Metrics::parse(resp.text().await.unwrap())
}

/// `GET /metrics` on the web listener.
async fn web_metrics(public_url: &str) -> Metrics {
    let resp = reqwest::get(format!("{public_url}/metrics")).await.unwrap();
    assert_eq!(resp.status(), 200);
    Metrics::parse(resp.text().await.unwrap())
}

/// Wait on the events stream for a config event (`reloaded`: true for a reload, false for an error).
async fn wait_config(events: &mut authkeeper::client::EventStream, reloaded: bool) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match events.next().await.expect("the stream stays open").unwrap() {
                WireEvent::ConfigReloaded { .. } if reloaded => return,
                WireEvent::ConfigError { .. } if !reloaded => return,
                _ => {}
            }
        }
    })
    .await
    .expect("the config event came");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_connection_its_refresh_and_config_reloads_on_both_listeners() {
    let (listen, public_url) = free_port();
    let web = json!({"listen": listen, "public_url": public_url, "metrics": true});
    let h = Harness::new(fast_trakt(), json!({ "web": web })).await;
    let daemon = h.start_daemon().await;

    // Before anything happens: the configured profile, disconnected; nothing counted yet.
    let m = socket_metrics(&h).await;
    assert_eq!(m.connections(StateName::Disconnected), 1.0);
    assert_eq!(m.connections(StateName::Connected), 0.0);
    assert_eq!(m.transitions("approved"), 0.0);
    assert_eq!(m.value("authkeeper_config_reloads_total", &[]), 0.0);
    assert_eq!(m.value("authkeeper_config_errors_total", &[]), 0.0);

    // Connect through a device code the emulator approves.
    let mut events = connect_approved(&h).await;
    let polls = h.emulator.log().calls_to("/oauth/device/token").len() as f64;
    for m in [socket_metrics(&h).await, web_metrics(&public_url).await] {
        assert_eq!(m.connections(StateName::Connected), 1.0);
        assert_eq!(m.connections(StateName::Disconnected), 0.0);
        assert_eq!(m.transitions("connect_requested"), 1.0);
        assert_eq!(m.transitions("approved"), 1.0);
        assert_eq!(m.transitions("validated"), 1.0);
        assert_eq!(m.calls("other", "valid"), 1.0, "the device code request");
        assert_eq!(m.calls("poll", "valid"), polls, "one per poll the emulator saw");
        assert_eq!(m.calls("validate", "valid"), 1.0);
        let duration = [("provider", "trakt"), ("endpoint", "validate")];
        assert_eq!(m.value("authkeeper_provider_call_duration_seconds_count", &duration), 1.0);
        // connect_requested, approved, validated: at least one transaction, no more than three.
        let commits = m.value("authkeeper_commit_batch_size_count", &[]);
        assert!((1.0..=3.0).contains(&commits), "{commits} commits");
        assert_eq!(m.value("authkeeper_commit_batch_size_sum", &[]), 3.0, "three transitions committed");
        assert_eq!(m.value("authkeeper_commit_duration_seconds_count", &[]), commits);
    }

    // A refresh asked for at once, about a week before the token's expiry.
    let view: ConnectionView = h.client().post("/v1/connections/trakt/default/refresh", None).await.unwrap();
    assert_eq!(view.state, StateName::Connected);
    let health: serde_json::Value = h.client().get("/v1/health").await.unwrap();
    let m = socket_metrics(&h).await;
    assert_eq!(m.transitions("refreshed"), 1.0);
    assert_eq!(m.calls("refresh", "valid"), 1.0);
    assert_eq!(m.calls("refresh", "rejected") + m.calls("refresh", "unknown"), 0.0);
    let lead = [("provider", "trakt")];
    assert_eq!(m.value("authkeeper_refresh_lead_time_seconds_count", &lead), 1.0);
    let week = fast_trakt().token_lifetime as f64;
    let sum = m.value("authkeeper_refresh_lead_time_seconds_sum", &lead);
    assert!(week - 120.0 < sum && sum <= week, "refreshed {sum}s before expiry, of a {week}s token");
    assert_eq!(
        m.value("authkeeper_scheduler_queue_depth", &[]),
        health["scheduler"]["deadlines"].as_f64().unwrap(),
        "the queue /v1/health shows"
    );
    assert_eq!(m.value("authkeeper_scheduler_queue_depth", &[]), 1.0, "the connection's next check");

    // An edit the daemon applies (retries after an unknown answer wait ten minutes or more, so
    // none comes during this test), then one it refuses.
    let config = std::fs::read_to_string(h.config_path()).unwrap();
    let mut edited: serde_json::Value = serde_json::from_str(&config).unwrap();
    edited["authkeeper"]["backoff_base_secs"] = json!(600);
    save_by_rename(&h.config_path(), &serde_json::to_string_pretty(&edited).unwrap());
    wait_config(&mut events, true).await;
    save_by_rename(&h.config_path(), "{ this is not json");
    wait_config(&mut events, false).await;
    for m in [socket_metrics(&h).await, web_metrics(&public_url).await] {
        assert_eq!(m.value("authkeeper_config_reloads_total", &[]), 1.0);
        assert_eq!(m.value("authkeeper_config_errors_total", &[]), 1.0);
        assert_eq!(m.transitions("refreshed"), 1.0);
        // No secret, and no URL at all.
        for secret in h.emulator.issued_tokens().iter().map(String::as_str).chain(["emulator-client-secret"]) {
            assert!(!m.text.contains(secret), "a secret is in the metrics");
        }
        assert!(!m.text.contains("://") && !m.text.contains("default"), "{}", m.text);
    }
    // No verdict (a 500 from Trakt), then a refusal: the revoked token is rejected, and so is
    // its refresh.
    let conn = common::trackers::Conn::new(&h, "trakt", "default");
    h.emulator.log().inject("/users/settings", Fault::Status(500), 1);
    let view = conn.validate().await;
    assert_eq!((view.state, view.last_error.is_some()), (StateName::Connected, true));
    h.emulator.revoke_all_grants();
    assert_eq!(conn.validate().await.state, StateName::Expired);
    let m = web_metrics(&public_url).await;
    assert_eq!(m.calls("validate", "unknown"), 1.0);
    assert_eq!(m.calls("validate", "rejected"), 1.0);
    assert_eq!(m.calls("validate", "valid"), 1.0);
    assert_eq!(m.calls("refresh", "rejected"), 1.0);
    assert_eq!(m.transitions("refresh_rejected"), 1.0);
    assert_eq!((m.connections(StateName::Expired), m.connections(StateName::Connected)), (1.0, 0.0));

    // Every transition in the connection's history is counted under its cause, once.
    let mut history: BTreeMap<String, f64> = BTreeMap::new();
    for cause in conn.causes().await {
        *history.entry(cause).or_default() += 1.0;
    }
    let m = socket_metrics(&h).await;
    let counted: BTreeMap<String, f64> = m
        .scrape
        .samples
        .iter()
        .filter(|s| s.metric == "authkeeper_transitions_total")
        .map(|s| match s.value {
            Value::Counter(v) => (s.labels["cause"].clone(), v),
            _ => panic!("transitions are a counter"),
        })
        .collect();
    assert_eq!(counted, history);

    // Turned off on the web listener: not found there; the socket still answers.
    edited["authkeeper"]["web"]["metrics"] = json!(false);
    save_by_rename(&h.config_path(), &serde_json::to_string_pretty(&edited).unwrap());
    wait_config(&mut events, true).await;
    let resp = reqwest::get(format!("{public_url}/metrics")).await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(!resp.text().await.unwrap().contains("authkeeper_"));
    assert_eq!(socket_metrics(&h).await.value("authkeeper_config_reloads_total", &[]), 2.0);
    assert_eq!(daemon.stop().await, 0);
}
