//! Crash torture: connections on Trakt and a generic OAuth server, both rotating refresh
//! tokens on every refresh, under a storm of refreshes, and `kill -9` at random moments.
//! After each kill the store must open, hold every connection and pending flow, and every
//! stored refresh token must be the one the provider has in force, unless the store says the
//! refresh was under way (then the restarted daemon settles it, honestly).
//!
//! `AUTHKEEPER_CRASH_KILLS` (10 by default) sets the number of kills;
//! `AUTHKEEPER_CRASH_KILLS=100 cargo test --release --test crash -- --nocapture` is the run
//! reported in RELIABILITY.md.

mod common;

use authkeeper::wire::{ConnectReply, ConnectionView};
use authkeeper_fixtures::TraktOptions;
use authkeeper_fixtures::oauth::{OauthEmulator, OauthOptions};
use authkeeper_state::{Account, Cause, Commit, ConnKey, Event, Grant, Machine, Policy, REFRESH_ANSWER_LOST, Secret};
use authkeeper_state::{StateName, Store};
use chrono::{TimeDelta, Utc};
use common::{Harness, PATIENCE};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

const TRAKT: usize = 16;
const OAUTH: usize = 8;
const PENDING: usize = 3;
/// Tokens live 6 s and are refreshed 3 s ahead: each connection refreshes every 3 s.
const LIFETIME: i64 = 6;

fn trakt_profile(i: usize) -> String {
    format!("TRAKT-P{:02}", i + 1)
}

fn oauth_profile(i: usize) -> String {
    format!("c{i:02}")
}

/// A connected machine holding `(access, refresh)` with a token issued now.
fn connected(key: ConnKey, (access, refresh): (String, String)) -> Commit {
    let now = Utc::now();
    let grant = Grant {
        refresh_token: Some(Secret::new(refresh)),
        expires_at: Some(now + TimeDelta::seconds(LIFETIME)),
        ..Grant::bearer(access, now)
    };
    let mut m = Machine::new(key, now);
    m.handle(&Event::CredentialsSupplied { grant }, now, Policy::default(), 0.0);
    let account = Account { name: "torture".into(), id: None };
    let step = m.handle(&Event::Validated { account, grant: None }, now, Policy::default(), 0.0);
    Commit { machine: m, transition: step.transition }
}

/// What one look at the store (the daemon dead) found.
#[derive(Default, Debug)]
struct Found {
    connections: usize,
    pending: Vec<(String, String)>,
    in_doubt: usize,
    expired: Vec<(String, Cause)>,
    lost: Vec<String>,
}

struct World {
    h: Harness,
    oauth: OauthEmulator,
}

impl World {
    fn db(&self) -> std::path::PathBuf {
        self.h.state_dir().join("authkeeper.redb")
    }

    fn live(&self, key: &ConnKey, refresh: &str) -> bool {
        match key.provider.as_str() {
            "trakt" => self.h.emulator.refresh_token_live(refresh),
            _ => self.oauth.refresh_token_live(refresh),
        }
    }

    /// Open the store the daemon left and check every connection in it.
    fn inspect(&self) -> Found {
        let store = Store::open(&self.db()).expect("the database opens after kill -9");
        let mut found = Found::default();
        for stored in store.load_all().unwrap() {
            let m = stored.machine;
            let c = m.connection();
            let key = m.key().to_string();
            if let Some(flow) = m.pending_flow() {
                found.pending.push((key, flow.user_code.clone().unwrap_or_default()));
                continue;
            }
            let Some(refresh) = c.refresh_token() else { continue };
            found.connections += 1;
            let doubt = c.last_error.as_deref().is_some_and(|e| e.starts_with(REFRESH_ANSWER_LOST));
            if m.state_name() == StateName::Expired {
                let cause = store.history(m.key()).unwrap().last().map(|t| t.cause).unwrap();
                found.expired.push((key.clone(), cause));
                if cause == Cause::RefreshAnswerLost {
                    continue; // ended honestly: nothing left to lose
                }
            }
            if doubt {
                found.in_doubt += 1;
            } else if !self.live(m.key(), refresh.expose()) {
                found.lost.push(key);
            }
        }
        found
    }
}

async fn setup() -> World {
    let opts = TraktOptions { token_lifetime: LIFETIME as u64, interval: 1, ..TraktOptions::default() };
    let h = Harness::new(opts.clone(), json!({})).await;
    let oauth = OauthEmulator::start(OauthOptions { token_lifetime: LIFETIME as u64, ..OauthOptions::default() })
        .await
        .unwrap();
    let oo = OauthOptions::default();
    let trakt: serde_json::Map<String, Value> = (0..TRAKT + PENDING).map(|i| (trakt_profile(i), json!({}))).collect();
    let instances: serde_json::Map<String, Value> = (0..OAUTH)
        .map(|i| {
            let block = json!({"issuer": oauth.issuer(), "client_id": oo.client_id, "client_secret": oo.client_secret,
                               "scope": "openid offline_access"});
            (oauth_profile(i), block)
        })
        .collect();
    let config = json!({
        "trakt": {"client_id": opts.client_id, "client_secret": opts.client_secret,
                  "instances": trakt},
        "oauth": {"instances": instances},
        "authkeeper": {"base_url": {"trakt": h.emulator.url()}, "http_timeout_secs": 5, "backoff_base_secs": 1,
                       "refresh_margin_secs": 3, "validate_every_secs": 3600,
                       "rate_limits": {"trakt": {"per_second": 1000, "burst": 1000}}},
    });
    std::fs::write(h.config_path(), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    std::fs::create_dir_all(h.state_dir()).unwrap();
    let store = Store::open(&h.state_dir().join("authkeeper.redb")).unwrap();
    let mut batch: Vec<Commit> =
        (0..TRAKT).map(|i| connected(ConnKey::new("trakt", trakt_profile(i)), h.emulator.issue_grant())).collect();
    batch.extend((0..OAUTH).map(|i| connected(ConnKey::new("oauth", oauth_profile(i)), oauth.issue_grant())));
    store.commit(&batch).unwrap();
    drop(store);
    World { h, oauth }
}

/// `window_us=N` values the daemons logged: from a refresh answer to its commit.
fn windows(log: &str) -> Vec<u64> {
    let mut out: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("refresh answer stored"))
        .filter_map(|l| {
            let at = l.find("window_us")? + "window_us".len();
            let digits: String =
                l[at..].chars().skip_while(|c| !c.is_ascii_digit()).take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect();
    out.sort_unstable();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_no_credential() {
    let kills: usize = std::env::var("AUTHKEEPER_CRASH_KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(10);
    let w = setup().await;
    let daemon = w.h.start_daemon().await;
    let client = w.h.client();
    let mut codes = BTreeMap::new();
    for i in TRAKT..TRAKT + PENDING {
        let path = format!("/v1/connections/trakt/{}/connect", trakt_profile(i));
        let reply: ConnectReply = client.post(&path, None).await.unwrap();
        codes.insert(format!("trakt/{}", trakt_profile(i)), reply.user_code().unwrap().to_owned());
    }
    let mut daemon = Some(daemon);
    let (mut in_doubt, mut refreshes) = (0, 0);
    for kill in 0..kills {
        let before = w.h.emulator.log().calls_to("/oauth/token").len() + w.oauth.log().calls_to("/token").len();
        // A random moment 0.3 to 2.3 s into the storm.
        tokio::time::sleep(Duration::from_millis(300 + fastrand::u64(..2000))).await;
        daemon.take().unwrap().kill9().await;
        refreshes +=
            w.h.emulator.log().calls_to("/oauth/token").len() + w.oauth.log().calls_to("/token").len() - before;

        let found = w.inspect();
        assert_eq!(found.connections, TRAKT + OAUTH, "kill {kill}: every connection is in the store");
        assert!(
            found.lost.is_empty(),
            "kill {kill}: stored refresh tokens the provider no longer has: {:?}",
            found.lost
        );
        let pending: BTreeMap<String, String> = found.pending.into_iter().collect();
        assert_eq!(pending, codes, "kill {kill}: every pending flow is stored with its code");
        in_doubt += found.in_doubt;

        // Restart: every machine is back, and every pending flow is polled again.
        let polls = w.h.emulator.log().calls_to("/oauth/device/token").len();
        daemon = Some(w.h.start_daemon().await);
        let all: Vec<ConnectionView> = client.get("/v1/connections").await.unwrap();
        let ours = all.iter().filter(|v| v.profile.starts_with("TRAKT-P") || v.provider == "oauth").count();
        assert_eq!(ours, TRAKT + OAUTH + PENDING, "kill {kill}: every machine restored");
        let resumed = w.h.emulator.log().wait_for_calls("/oauth/device/token", polls + PENDING);
        tokio::time::timeout(PATIENCE, resumed).await.expect("the pending flows are polled again");
    }
    // Let the last restart settle any refresh left in doubt, then look a last time.
    let mut events = client.events().await.unwrap();
    let settled = async {
        loop {
            let all: Vec<ConnectionView> = client.get("/v1/connections").await.unwrap();
            let doubt = all.iter().any(|v| v.last_error.as_deref().is_some_and(|e| e.starts_with(REFRESH_ANSWER_LOST)));
            if !doubt {
                return;
            }
            events.next().await; // a doubt ends with a transition (or a warning of a retry)
        }
    };
    tokio::time::timeout(PATIENCE, settled).await.expect("every doubt is settled");
    daemon.take().unwrap().stop().await;
    let found = w.inspect();
    assert!(found.lost.is_empty(), "stored refresh tokens the provider no longer has: {:?}", found.lost);
    let answer_lost = found.expired.iter().filter(|(_, c)| *c == Cause::RefreshAnswerLost).count();
    let other: Vec<_> = found.expired.iter().filter(|(_, c)| *c != Cause::RefreshAnswerLost).collect();
    assert!(other.is_empty(), "connections expired for another reason: {other:?}");
    let win = windows(&w.h.log());
    let pct =
        |p: f64| win.get(((win.len() as f64 * p) as usize).min(win.len().saturating_sub(1))).copied().unwrap_or(0);
    eprintln!(
        "crash torture: {kills} kills, {} connections ({TRAKT} Trakt, {OAUTH} OAuth, {PENDING} pending), \
         {refreshes} refresh calls; 0 credentials lost; {in_doubt} refreshes in doubt at a kill, \
         {answer_lost} ended as refresh_answer_lost; answer-to-commit window over {} refreshes: \
         median {} us, p99 {} us, max {} us",
        TRAKT + OAUTH + PENDING,
        win.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
    );
    assert!(!win.is_empty(), "the storm refreshed");
}
