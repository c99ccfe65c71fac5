//! The fault matrix: every provider's emulator serves every fault (a 5xx, a 429 with
//! `Retry-After`, a hang, garbage, a connection reset, a body cut short, an HTML page, a huge
//! body, a drip-fed one) to a connected connection's next call: a validation through the
//! socket and, for the providers that refresh, a refresh. Each must leave the connection
//! connected with the same token and a `last_error` that says what happened; once the fault
//! clears, the connection recovers by itself. No transition to `expired` happens anywhere, and
//! the daemon's memory (read from /proc) stays bounded through the huge bodies.
//!
//! The CI version serves each fault once per call, with 64 MiB bodies, all providers at once
//! against one daemon. `AUTHKEEPER_FAULTS_FULL=1` serves each fault three times in a row (the
//! daemon's own retries meet it too, so that recovery comes through the backoff curve), with
//! 1 GiB bodies. Figures are printed (`-- --nocapture`).

mod common;

use authkeeper::client::EventStream;
use authkeeper::wire::{ConnectionView, WireEvent};
use authkeeper_fixtures::{Account, EMULATORS, Emulator, Fault};
use authkeeper_state::{Cause, StateName};
use common::trackers::{Conn, assert_fault_kept_state, browse, faults, free_port, harness};
use common::*;
use futures_util::future::join_all;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// The providers whose grants refresh (with a connect that gives them a refreshable grant).
const REFRESHING: [&str; 4] = ["trakt", "plex", "mdblist", "oauth"];

/// How much the daemon's peak RSS may grow, per provider, through the huge bodies: the huge
/// calls of all providers are in flight at once, and each may hold up to 1 MiB of body plus
/// the HTTP client's buffers. Ten providers: 30 MiB, under half of one 64 MiB body.
const RSS_GROWTH_PER_PROVIDER_KIB: u64 = 3 << 10;

/// One provider under test: its emulator and its connection.
struct Target {
    provider: &'static str,
    profile: &'static str,
    emulator: Box<dyn Emulator>,
}

impl Target {
    fn conn<'a>(&self, h: &'a Harness) -> Conn<'a> {
        Conn::new(h, self.provider, self.profile)
    }

    /// What one of the emulator's accounts accepts, by the name `emulate` prints.
    fn accepts(&self, name: &str) -> String {
        let value = self.emulator.accepts().into_iter().find(|(k, _)| *k == name).map(|(_, v)| v);
        let value = value.unwrap_or_else(|| panic!("{} accepts no {name:?}", self.provider));
        if value.starts_with("(none") { String::new() } else { value }
    }

    /// The connect body a user would send: a device flow, a browser login, a key or a password.
    fn connect_body(&self) -> Value {
        match self.provider {
            "jellyfin" | "emby" => {
                json!({"flow": "password", "username": self.accepts("user"), "password": self.accepts("password")})
            }
            "tautulli" => json!({"flow": "api_key", "api_key": self.accepts("api key")}),
            "tmdb" => json!({"flow": "request_token", "api_key": self.accepts("api key (v3)")}),
            "anilist" => json!({"flow": "oauth_code"}),
            _ => json!({"flow": "device_pin"}),
        }
    }

    /// POST to the emulator's scripting API.
    async fn script(&self, path_and_query: &str) {
        authkeeper::providers::install_crypto();
        let url = format!("{}/_emulator/{path_and_query}", self.emulator.url());
        let resp = reqwest::Client::new().post(url).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path_and_query}: {}", resp.text().await.unwrap_or_default());
    }
}

/// Every emulator, each with its default account.
async fn targets() -> Vec<Target> {
    let mut out = Vec::new();
    for (provider, start) in EMULATORS {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let emulator = start(Account::default(), listener).await.unwrap();
        let profile = if *provider == "oauth" { "emulator" } else { "default" };
        out.push(Target { provider, profile, emulator });
    }
    assert_eq!(out.len(), authkeeper::providers::REGISTRY.len(), "an emulator for every provider");
    out
}

/// `extra` merged into `base`, objects key by key.
fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

/// A config that points the daemon at every emulator, with short timeouts and backoff, the
/// web listener for browser logins, Plex in JWT mode (so that it refreshes), and no
/// credential: each connection is made through the socket.
fn config(targets: &[Target]) -> Value {
    let (listen, public_url) = free_port();
    let mut config = json!({
        "authkeeper": {
            "http_timeout_secs": 1,
            "backoff_base_secs": 1,
            "web": {"listen": listen, "public_url": public_url},
        },
        "plex": {"jwt": true},
    });
    for t in targets {
        merge(&mut config, t.emulator.config());
    }
    for block in ["tautulli", "mdblist", "tmdb_sync"] {
        config[block].as_object_mut().unwrap().remove("api_key");
    }
    config
}

/// Connect `t` the way its user would, and wait until it is validated.
async fn connect(h: &Harness, t: &Target) {
    let conn = t.conn(h);
    let mut events = h.client().events().await.unwrap();
    let reply = conn.connect(t.connect_body()).await.unwrap_or_else(|e| panic!("{}: {e}", t.provider));
    if reply.connection.state != StateName::Connected {
        let pending = reply.pending.unwrap_or_else(|| panic!("{}: neither connected nor pending", t.provider));
        match (pending.authorize_url, pending.user_code) {
            (Some(url), _) => {
                let (status, _, page) = browse(&url).await;
                assert_eq!(status, 200, "{}: {page}", t.provider);
            }
            (None, Some(code)) => t.script(&format!("approve?code={code}")).await,
            (None, None) => panic!("{}: a pending flow with nothing to do", t.provider),
        }
        recovered(&mut events, t).await;
    }
    let view = conn.view().await;
    assert_eq!(view.state, StateName::Connected, "{}: {view:?}", t.provider);
    assert!(view.account.is_some(), "{}: validated", t.provider);
}

/// Wait for the next validation or refresh of `t`'s connection that succeeded.
async fn recovered(events: &mut EventStream, t: &Target) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match events.next().await {
                Some(Ok(WireEvent::Transition { provider, profile, to, cause, .. }))
                    if provider == t.provider
                        && profile == t.profile
                        && to == StateName::Connected
                        && matches!(cause, Cause::Validated | Cause::Refreshed) =>
                {
                    return;
                }
                Some(Ok(_)) => continue,
                other => panic!("{}: the events stream ended: {other:?}", t.provider),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{}: no recovery in time", t.provider));
}

/// The access token a consumer gets now.
async fn access_token(conn: &Conn<'_>) -> String {
    conn.token().await.unwrap()["access_token"].as_str().unwrap().to_owned()
}

/// One case: `fault` served `count` times from the next call on; `action` (`validate` or
/// `refresh`) through the socket meets it. Returns the number of cases run (1).
async fn case(
    h: &Harness,
    t: &Target,
    events: &mut EventStream,
    action: &str,
    fault: &Fault,
    says: &str,
    count: usize,
) {
    let conn = t.conn(h);
    let before = access_token(&conn).await;
    t.script(&format!("fail?path=/&count={count}&{}", fault.query())).await;
    let view: ConnectionView = h.client().post(&format!("{}/{action}", conn.path), None).await.unwrap();
    eprintln!(
        "{:<9} {action:<8} {:<20} → {}",
        t.provider,
        format!("{fault:?}"),
        view.last_error.as_deref().unwrap_or("-")
    );
    assert_fault_kept_state(&view, fault, says);
    assert!(
        !view.last_error.as_deref().unwrap_or_default().contains(&before),
        "{}: the token in last_error",
        t.provider
    );
    assert_eq!(access_token(&conn).await, before, "{} {action} {fault:?}: the token is unchanged", t.provider);
    recovered(events, t).await;
    let view = conn.view().await;
    assert_eq!((view.state, view.last_error), (StateName::Connected, None), "{} {action} {fault:?}", t.provider);
}

/// Every case of `faults` for `t`: a validation, and a refresh when it refreshes. Returns how
/// many cases ran.
async fn run(h: &Harness, t: &Target, faults: &[(Fault, &'static str)], count: usize) -> usize {
    let mut events = h.client().events().await.unwrap();
    let mut actions = vec!["validate"];
    if REFRESHING.contains(&t.provider) {
        actions.push("refresh");
    }
    let mut n = 0;
    for action in actions {
        for (fault, says) in faults {
            case(h, t, &mut events, action, fault, says, count).await;
            n += 1;
        }
    }
    n
}

/// (VmRSS, VmHWM) of `pid`, in KiB.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find_map(|l| l.strip_prefix(name)).unwrap();
        line.trim().trim_end_matches("kB").trim().parse().unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_survives_every_fault() {
    let full = std::env::var_os("AUTHKEEPER_FAULTS_FULL").is_some_and(|v| v != "0");
    let (count, huge) = if full { (3, 1u64 << 30) } else { (1, 64u64 << 20) };
    let started = Instant::now();
    let targets = targets().await;
    let h = harness(config(&targets)).await;
    let daemon = h.start_daemon().await;

    // Every transition into `expired`, wherever it happens, counted from the start.
    let expired = Arc::new(AtomicUsize::new(0));
    let mut all = h.client().events().await.unwrap();
    let watcher = tokio::spawn({
        let expired = expired.clone();
        async move {
            while let Some(Ok(event)) = all.next().await {
                if let WireEvent::Transition { to: StateName::Expired, provider, cause, .. } = event {
                    eprintln!("FALSE EXPIRED: {provider} {cause:?}");
                    expired.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    });

    join_all(targets.iter().map(|t| connect(&h, t))).await;
    let connected = started.elapsed();

    let (small, big): (Vec<_>, Vec<_>) = faults(huge).into_iter().partition(|(f, _)| !matches!(f, Fault::Huge(_)));
    let ran: usize = join_all(targets.iter().map(|t| run(&h, t, &small, count))).await.into_iter().sum();
    let (rss_before, hwm_before) = memory(daemon.pid());
    let huge_ran: usize = join_all(targets.iter().map(|t| run(&h, t, &big, count))).await.into_iter().sum();
    let (rss_after, hwm_after) = memory(daemon.pid());

    let false_expired = expired.load(Ordering::SeqCst);
    eprintln!(
        "fault matrix ({}): {} providers, {} cases ({} with {} MiB bodies), each fault served {count}× in a row; \
         false expired: {false_expired}; daemon RSS before the huge bodies {rss_before} KiB (peak {hwm_before} KiB), \
         after {rss_after} KiB (peak {hwm_after} KiB); connects {:.1} s, total {:.1} s",
        if full { "full" } else { "CI" },
        targets.len(),
        ran + huge_ran,
        huge_ran,
        huge >> 20,
        connected.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    assert_eq!(false_expired, 0, "no fault ever expires a connection");
    assert_eq!(ran + huge_ran, targets.len() * 9 + REFRESHING.len() * 9, "every provider × fault × call");
    assert!(
        hwm_after.saturating_sub(hwm_before) < RSS_GROWTH_PER_PROVIDER_KIB * targets.len() as u64,
        "{huge_ran} bodies of {} MiB grew the daemon's peak RSS from {hwm_before} to {hwm_after} KiB",
        huge >> 20
    );
    for t in &targets {
        let view = t.conn(&h).view().await;
        assert_eq!((view.state, view.last_error), (StateName::Connected, None), "{}", t.provider);
    }
    watcher.abort();
    daemon.stop().await;
}
