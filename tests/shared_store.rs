//! Several daemons on one PostgreSQL store (a throwaway cluster): both serve every
//! connection, exactly one refreshes each token, one takes over from another that was killed or
//! paused, and a paused one writes nothing over the newer credential when it wakes. Without
//! PostgreSQL installed the tests say so and pass, unless `AUTHKEEPER_REQUIRE_POSTGRES` is set
//! (as in CI).
//!
//! `AUTHKEEPER_SHARED_SECS` (20 by default) sets how long the exactly-one-refresher run lasts;
//! `AUTHKEEPER_SHARED_SECS=600` is the ten minutes of the acceptance.

mod common;

use authkeeper::wire::{ConnectReply, ConnectionView};
use authkeeper_fixtures::TraktOptions;
use authkeeper_pgstore::PgStore;
use authkeeper_pgstore::cluster::Cluster;
use authkeeper_state::{Cause, ConnectionStore, StateName};
use common::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The lease of these tests' daemons: short, so that take-overs come quickly.
const LEASE_SECS: u64 = 3;

struct Shared {
    _cluster: Cluster,
    h: Harness,
    url: String,
}

/// A cluster, an emulator whose tokens live `lifetime` seconds, and a config declaring `n`
/// profiles (`TRAKT-P01`…) that the store already holds connected.
async fn shared(n: usize, lifetime: u64) -> Option<Shared> {
    let cluster = Cluster::for_tests()?;
    let url = cluster.database("shared").unwrap();
    let settings = json!({
        "refresh_margin_secs": lifetime / 2,
        "rate_limits": {"trakt": {"per_second": 500.0, "burst": 500}},
        "store": {"lease_secs": LEASE_SECS},
    });
    let h = Harness::new(TraktOptions { token_lifetime: lifetime, ..fast_trakt() }, settings).await;
    if n > 0 {
        let mut config: Value = serde_json::from_slice(&std::fs::read(h.config_path()).unwrap()).unwrap();
        config["trakt"]["instances"] =
            (0..n).map(|i| (profile(i), json!({}))).collect::<serde_json::Map<_, _>>().into();
        save_by_rename(&h.config_path(), &config.to_string());
        let now = chrono::Utc::now();
        let redb = connected_store(&h.emulator, n, lifetime as i64, |i| {
            now + chrono::TimeDelta::seconds(1 + (i as i64 % lifetime as i64))
        });
        PgStore::open_as_is(&url).unwrap().import(&redb.export().unwrap()).unwrap();
    }
    Some(Shared { _cluster: cluster, h, url })
}

impl Shared {
    async fn node(&self, name: &str) -> Daemon {
        match name {
            "a" => self.h.start_daemon_with(&["--store", &self.url]).await,
            _ => self.h.start_node(name, &["--store", &self.url]).await,
        }
    }

    /// Refreshes each daemon logged, by the log's name.
    fn refreshes(&self, log: &str) -> usize {
        let text = std::fs::read_to_string(self.h.dir.path().join(log)).unwrap_or_default();
        text.lines().filter(|l| l.contains("transition") && l.contains("cause=Refreshed")).count()
    }
}

async fn token(client: &authkeeper::client::Client, profile: &str) -> Value {
    client.get(&format!("/v1/connections/trakt/{profile}/token")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_serve_the_same_connections_and_a_connect_through_one_shows_on_the_other() {
    let Some(s) = shared(0, 3600).await else { return };
    let (a, b) = (s.node("a").await, s.node("b").await);
    let (on_a, on_b) = (a.client(), b.client());
    let mut seen_on_a = on_a.events().await.unwrap();
    let mut events_b = on_b.events().await.unwrap();

    // Connect through B.
    let reply: ConnectReply = on_b.post("/v1/connections/trakt/default/connect", None).await.unwrap();
    assert!(s.h.emulator.approve(reply.user_code().unwrap()));
    wait_transition(&mut events_b, Cause::Validated).await;
    let committed = Instant::now();
    // A hears of it (its events show B's transitions) and serves it.
    wait_transition(&mut seen_on_a, Cause::Validated).await;
    eprintln!("A saw B's connect {} ms after B committed it", committed.elapsed().as_millis());
    let view: ConnectionView = on_a.get("/v1/connections/trakt/default").await.unwrap();
    assert_eq!(view.state, StateName::Connected);
    assert_eq!(token(&on_a, "default").await, token(&on_b, "default").await, "both hand out the same token");

    // A refresh asked of A moves the connection's lease to A, and B sees the new token.
    let view: ConnectionView = match on_a.post("/v1/connections/trakt/default/refresh", None).await {
        Ok(view) => view,
        Err(e) => {
            panic!("{e}\nA:\n{}\nB:\n{}", s.h.log(), std::fs::read_to_string(s.h.dir.path().join("b.log")).unwrap())
        }
    };
    assert_eq!((view.state, view.last_error), (StateName::Connected, None));
    let mut events_b = on_b.events().await.unwrap();
    let newest = token(&on_a, "default").await;
    if token(&on_b, "default").await != newest {
        wait_transition(&mut events_b, Cause::Refreshed).await;
    }
    assert_eq!(token(&on_b, "default").await, newest);
    assert_eq!(s.h.emulator.reused_refresh_tokens(), 0);
    assert_eq!(a.stop().await, 0);
    assert_eq!(b.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_refresh_each_token_exactly_once_and_one_takes_over_when_the_other_is_killed() {
    const N: usize = 100;
    let secs: u64 = std::env::var("AUTHKEEPER_SHARED_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    // Tokens live 12 s and are refreshed 6 s before they end: more than a take-over takes (the
    // lease, plus a third of it to notice).
    let Some(s) = shared(N, 12).await else { return };
    let (a, b) = (s.node("a").await, s.node("b").await);
    // Both run for a while: every token is refreshed several times, each by one daemon.
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (by_a, by_b) = (s.refreshes("daemon.log"), s.refreshes("b.log"));
    eprintln!("in {secs} s: A refreshed {by_a} tokens, B {by_b}");
    assert!(by_a > 0 && by_b > 0, "the work is spread: A refreshed {by_a}, B {by_b}");
    assert!(by_a + by_b >= N * (secs as usize / 12), "every token kept fresh: {} refreshes", by_a + by_b);
    assert_eq!(s.h.emulator.reused_refresh_tokens(), 0, "no refresh token used twice");

    // A dies mid-storm; B takes its connections over within the lease and keeps them fresh.
    let mut seen_on_b = b.client().events().await.unwrap();
    a.kill9().await;
    let before = s.refreshes("b.log");
    tokio::time::sleep(Duration::from_secs(LEASE_SECS + 12)).await;
    let mut expired = Vec::new();
    while let Ok(Some(Ok(event))) = tokio::time::timeout(Duration::from_millis(1), seen_on_b.next()).await {
        if let authkeeper::wire::WireEvent::Transition { profile, to: StateName::Expired, .. } = event {
            expired.push(profile);
        }
    }
    assert!(expired.is_empty(), "no token expired during the take-over: {expired:?}");
    let after = s.refreshes("b.log") - before;
    eprintln!("after A was killed, B refreshed {after} tokens in {} s", LEASE_SECS + 12);
    assert!(after >= N, "B refreshed A's share too");
    let on_b = b.client();
    let all: Vec<ConnectionView> = on_b.get("/v1/connections").await.unwrap();
    let instances: Vec<&ConnectionView> = all.iter().filter(|v| v.profile.starts_with("TRAKT-P")).collect();
    assert_eq!(instances.len(), N);
    assert!(instances.iter().all(|v| v.state == StateName::Connected), "no connection left connected");
    assert_eq!(s.h.emulator.reused_refresh_tokens(), 0, "no refresh token used twice");
    for i in [0, N / 2, N - 1] {
        let t = token(&on_b, &profile(i)).await;
        assert!(
            s.h.emulator.refresh_token_live(t["refresh_token"].as_str().unwrap_or_default())
                || t.get("refresh_token").is_none()
        );
    }
    assert_eq!(b.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_paused_past_its_lease_writes_nothing_when_it_wakes() {
    const N: usize = 20;
    let Some(s) = shared(N, 6).await else { return };
    let (a, b) = (s.node("a").await, s.node("b").await);
    let mut events_b = b.client().events().await.unwrap();
    wait_transition(&mut events_b, Cause::Refreshed).await;
    a.signal("STOP");
    // B takes A's share once A's lease lapses, and refreshes it.
    tokio::time::sleep(Duration::from_secs(LEASE_SECS + 2 * 6)).await;
    let reused_before = s.h.emulator.reused_refresh_tokens();
    a.signal("CONT");
    // A finds its lease lapsed and stops, having written nothing.
    assert_eq!(a.exited().await, 1);
    let log = std::fs::read_to_string(s.h.log_path()).unwrap();
    assert!(log.contains("this daemon's lease lapsed"), "{log}");
    assert_eq!(reused_before, 0);
    assert_eq!(s.h.emulator.reused_refresh_tokens(), 0, "no refresh token used twice");
    let store = PgStore::open(&s.url, None).unwrap();
    for stored in store.load_all().unwrap() {
        let refresh = stored.machine.connection().refresh_token().unwrap().expose().to_owned();
        assert!(s.h.emulator.refresh_token_live(&refresh), "{} holds the newest refresh token", stored.machine.key());
    }
    assert_eq!(b.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_adding_profiles_to_one_config_file_lose_none_and_share_no_number() {
    let Some(s) = shared(0, 3600).await else { return };
    let (a, b) = (s.node("a").await, s.node("b").await);
    let add = |client: authkeeper::client::Client| async move {
        let mut ids = Vec::new();
        for _ in 0..20 {
            let added: Value = client.post("/v1/providers/trakt/profiles", None).await.unwrap();
            ids.push(added["profile"].as_str().unwrap_or_default().to_owned());
        }
        ids
    };
    let (from_a, from_b) = tokio::join!(add(a.client()), add(b.client()));
    let mut all: Vec<String> = from_a.into_iter().chain(from_b).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 40, "forty distinct profiles: {all:?}");
    let config: Value = serde_json::from_slice(&std::fs::read(s.h.config_path()).unwrap()).unwrap();
    let declared = config["trakt"]["instances"].as_object().map(|o| o.len()).unwrap_or(0);
    assert_eq!(declared, 40, "every one is in the file: {}", config["trakt"]);
    assert_eq!(a.stop().await, 0);
    assert_eq!(b.stop().await, 0);
}
