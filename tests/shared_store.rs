//! Several daemons on one PostgreSQL store (a throwaway cluster): both serve every
//! connection, exactly one refreshes each token, one takes over from another that was killed or
//! paused, a paused one writes nothing over the newer credential when it wakes, and together
//! they keep to a provider's rate. Without PostgreSQL installed the tests say so and pass,
//! unless `AUTHKEEPER_REQUIRE_POSTGRES` is set (as in CI).
//!
//! `AUTHKEEPER_SHARED_SECS` (20 by default) sets how long the exactly-one-refresher run lasts;
//! `AUTHKEEPER_SHARED_SECS=600` is the ten minutes of the acceptance.

mod common;

use authkeeper::wire::{ConnectReply, ConnectionView};
use authkeeper_fixtures::{Fault, TraktOptions};
use authkeeper_pgstore::PgStore;
use authkeeper_pgstore::cluster::Cluster;
use authkeeper_state::{Cause, ConnectionStore, StateName};
use common::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The lease of these tests' daemons: short, so that take-overs come quickly.
const LEASE_SECS: u64 = 3;

struct Shared {
    _cluster: Cluster,
    h: Harness,
    url: String,
}

/// A cluster, an emulator whose tokens live `lifetime` seconds and are refreshed half-way, and
/// a config declaring `n` profiles (`TRAKT-P01`…) that the store already holds connected, the
/// token of profile `i` ending `ends_in(i)` seconds from now.
async fn shared(n: usize, lifetime: u64, ends_in: impl Fn(usize) -> i64) -> Option<Shared> {
    let settings = json!({
        "refresh_margin_secs": lifetime / 2,
        "rate_limits": {"trakt": {"per_second": 500.0, "burst": 500}},
        "store": {"lease_secs": LEASE_SECS},
    });
    shared_with(n, settings, lifetime, lifetime, ends_in).await
}

/// [`shared`] with these `settings`, new tokens living `issued_lifetime` seconds, and the stored
/// connections on grants of `lifetime` seconds.
async fn shared_with(
    n: usize,
    settings: Value,
    issued_lifetime: u64,
    lifetime: u64,
    ends_in: impl Fn(usize) -> i64,
) -> Option<Shared> {
    let cluster = Cluster::for_tests()?;
    let url = cluster.database("shared").unwrap();
    let h = Harness::new(TraktOptions { token_lifetime: issued_lifetime, ..fast_trakt() }, settings).await;
    if n > 0 {
        let mut config: Value = serde_json::from_slice(&std::fs::read(h.config_path()).unwrap()).unwrap();
        config["trakt"]["instances"] =
            (0..n).map(|i| (profile(i), json!({}))).collect::<serde_json::Map<_, _>>().into();
        save_by_rename(&h.config_path(), &config.to_string());
        let now = chrono::Utc::now();
        let redb = connected_store(&h.emulator, n, lifetime as i64, |i| now + chrono::TimeDelta::seconds(ends_in(i)));
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

    /// Each stored connection's refresh token, by profile.
    fn stored_refresh_tokens(&self, store: &PgStore) -> BTreeMap<String, String> {
        let refresh = |m: &authkeeper_state::Machine| m.connection().refresh_token().map(|t| t.expose().to_owned());
        let all = store.load_all().unwrap().into_iter();
        all.map(|s| (s.machine.key().profile.to_string(), refresh(&s.machine).unwrap_or_default())).collect()
    }

    /// No refresh is answered but uncommitted: every stored refresh token is one the emulator
    /// has not seen presented (a rotation whose answer is not in the store yet leaves a spent one).
    fn all_committed(&self, store: &PgStore) -> bool {
        self.stored_refresh_tokens(store).values().all(|t| self.h.emulator.refresh_token_live(t))
    }
}

async fn token(client: &authkeeper::client::Client, profile: &str) -> Value {
    client.get(&format!("/v1/connections/trakt/{profile}/token")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_serve_the_same_connections_and_a_connect_through_one_shows_on_the_other() {
    let Some(s) = shared(0, 3600, |_| 3600).await else { return };
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
    // Tokens live 20 s and are refreshed every 10 s, 10 s before they end: a take-over (the
    // lease, plus a third of it to notice) fits in that margin with room for a loaded machine.
    const LIFETIME: u64 = 20;
    const INTERVAL: u64 = LIFETIME / 2;
    let secs: u64 = std::env::var("AUTHKEEPER_SHARED_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let Some(s) = shared(N, LIFETIME, |i| 1 + (i as i64 % LIFETIME as i64)).await else { return };
    let store = PgStore::open_as_is(&s.url).unwrap();
    let (a, b) = (s.node("a").await, s.node("b").await);
    // Both run for a while: every token is refreshed several times, each by one daemon.
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (by_a, by_b) = (s.refreshes("daemon.log"), s.refreshes("b.log"));
    eprintln!("in {secs} s: A refreshed {by_a} tokens, B {by_b}");
    assert!(by_a > 0 && by_b > 0, "the work is spread: A refreshed {by_a}, B {by_b}");
    assert!(
        by_a + by_b >= N * (secs / INTERVAL).saturating_sub(1).max(1) as usize,
        "every token kept fresh: {} refreshes",
        by_a + by_b
    );
    assert_eq!(s.h.emulator.reused_refresh_tokens(), 0, "no refresh token used twice");

    // A dies while refreshes are being asked for, but with none answered and not yet committed:
    // the token endpoint fails for a moment (503) while the store catches up, and A is killed
    // then. (A kill between the provider's answer and its commit loses the rotated token
    // whatever the daemons do: the answer-lost case of tests/crash.rs.)
    s.h.emulator.log().inject("/oauth/token", Fault::Status(503), usize::MAX);
    until(PATIENCE, async || s.all_committed(&store)).await.expect("every answered refresh committed in time");
    let mut seen_on_b = b.client().events().await.unwrap();
    let at_kill = s.stored_refresh_tokens(&store);
    a.kill9().await;
    s.h.emulator.log().clear_faults();

    // B takes A's connections over within the lease and refreshes every one of them (and its
    // own) within one refresh interval more; none expires meanwhile.
    let took = until(Duration::from_secs(LEASE_SECS + INTERVAL + 5), async || {
        let now = s.stored_refresh_tokens(&store);
        now.len() == N && now.iter().all(|(profile, t)| at_kill.get(profile) != Some(t))
    })
    .await
    .expect("B refreshed every connection within the lease and one refresh interval after A was killed");
    eprintln!("after A was killed, B had refreshed all {N} connections in {} ms", took.as_millis());
    let mut expired = Vec::new();
    while let Ok(Some(Ok(event))) = tokio::time::timeout(Duration::from_millis(1), seen_on_b.next()).await {
        if let authkeeper::wire::WireEvent::Transition { profile, to: StateName::Expired, .. } = event {
            expired.push(profile);
        }
    }
    assert!(expired.is_empty(), "no token expired during the take-over: {expired:?}");
    let on_b = b.client();
    let all: Vec<ConnectionView> = on_b.get("/v1/connections").await.unwrap();
    let instances: Vec<&ConnectionView> = all.iter().filter(|v| v.profile.starts_with("TRAKT-P")).collect();
    assert_eq!(instances.len(), N);
    assert!(instances.iter().all(|v| v.state == StateName::Connected), "every connection still connected");
    assert_eq!(s.h.emulator.reused_refresh_tokens(), 0, "no refresh token used twice");
    assert!(s.all_committed(&store), "every stored refresh token is the one in force");
    // The tokens B hands out work at the provider.
    let http = reqwest::Client::new();
    for i in [0, N / 2, N - 1] {
        let t = token(&on_b, &profile(i)).await;
        let settings = http
            .get(format!("{}/users/settings", s.h.emulator.url()))
            .bearer_auth(t["access_token"].as_str().unwrap_or_default())
            .header("trakt-api-key", fast_trakt().client_id)
            .header("trakt-api-version", "2")
            .send()
            .await
            .unwrap();
        assert_eq!(settings.status(), 200, "{}'s token is accepted", profile(i));
    }
    assert_eq!(b.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_paused_past_its_lease_writes_nothing_when_it_wakes() {
    const N: usize = 20;
    // Every token ends 16 s from now and lives 20 s: the daemons refresh them all together in
    // about 6 s (each within a second's jitter), and the next round is 10 s after that. A is
    // stopped between the two rounds, once every answer of the first is committed, so that
    // nothing it holds is in flight at the provider and all it could write on waking is what
    // the lease must refuse.
    const LIFETIME: u64 = 20;
    let Some(s) = shared(N, LIFETIME, |_| 16).await else { return };
    let store = PgStore::open_as_is(&s.url).unwrap();
    let (a, b) = (s.node("a").await, s.node("b").await);
    until(PATIENCE, async || s.h.emulator.refreshes() >= N && s.all_committed(&store))
        .await
        .expect("the first round of refreshes committed in time");
    a.signal("STOP");
    // B takes A's share once A's lease lapses, and refreshes it in the second round.
    until(PATIENCE, async || s.h.emulator.refreshes() >= 2 * N && s.all_committed(&store))
        .await
        .expect("B refreshed every connection in the second round in time");
    let reused_before = s.h.emulator.reused_refresh_tokens();
    let newest = s.stored_refresh_tokens(&store);
    a.signal("CONT");
    // A finds its lease lapsed and stops, having written nothing.
    assert_eq!(a.exited().await, 1);
    let log = std::fs::read_to_string(s.h.log_path()).unwrap();
    assert!(log.contains("this daemon's lease lapsed"), "{log}");
    assert!(s.refreshes("daemon.log") > 0, "A held leases and refreshed before it was stopped");
    assert_eq!(reused_before, 0);
    assert_eq!(s.h.emulator.reused_refresh_tokens(), 0, "no refresh token used twice");
    assert_eq!(s.stored_refresh_tokens(&store), newest, "nothing written over B's refreshes");
    for (profile, refresh) in &newest {
        assert!(s.h.emulator.refresh_token_live(refresh), "{profile} holds the newest refresh token");
    }
    assert_eq!(b.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_adding_profiles_to_one_config_file_lose_none_and_share_no_number() {
    let Some(s) = shared(0, 3600, |_| 3600).await else { return };
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

/// Both daemons call the same provider app, so its global rate is split between them: together
/// they keep to the configured rate. The emulator answers `429` past its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_keep_to_a_providers_global_rate_together() {
    const N: usize = 40;
    // 10 calls a second between them, evenly spaced. The emulator refuses a 13th in any one
    // second: two daemons' evenly spaced calls may meet at a window's edges. At the full rate
    // each, they would make 20.
    let settings = json!({
        "refresh_margin_secs": 10,
        "validate_every_secs": 86_400,
        "rate_limits": {"trakt": {"per_second": 10.0, "burst": 1}},
        "store": {"lease_secs": LEASE_SECS},
    });
    // Minute-long grants, all due for refresh together 8 s from now (10 s ahead of expiry, with
    // up to 1 s of jitter), once both daemons know of each other; new tokens live an hour.
    let Some(s) = shared_with(N, settings, 3600, 60, |_| 19).await else { return };
    s.h.emulator.log().set_rate_limit(12);
    let (a, b) = (s.node("a").await, s.node("b").await);
    until(PATIENCE, async || s.h.emulator.refreshes() >= N).await.expect("every connection refreshed in time");
    let (by_a, by_b) = (s.refreshes("daemon.log"), s.refreshes("b.log"));
    assert!(by_a > 0 && by_b > 0, "both refreshed: A {by_a}, B {by_b}");
    assert_eq!(s.h.emulator.log().throttled(), 0, "no call went past the provider's limit");
    assert_eq!(s.h.emulator.reused_refresh_tokens(), 0);
    assert_eq!(a.stop().await, 0);
    assert_eq!(b.stop().await, 0);
}
