//! Soaks on a clock that runs 60 times faster than the wall: a provider that fails 30 % of
//! calls at random, and one that answers nothing but 503 for longer than a token lives.
//!
//! `AUTHKEEPER_SOAK_MINUTES` (virtual minutes, 20 by default) sets the flaky soak's length;
//! `AUTHKEEPER_SOAK_MINUTES=60 cargo test --release --test soak -- --nocapture` is the hour
//! reported in RELIABILITY.md.

mod common;

use authkeeper::client::{Client, EventStream};
use authkeeper::clock::{Clock, ScaledClock};
use authkeeper::wire::{ConnectionView, WireEvent};
use authkeeper_fixtures::{Fault, TraktEmulator, TraktOptions};
use authkeeper_state::{Cause, StateName};
use chrono::{DateTime, TimeDelta, Utc};
use common::{connected_store, start_with};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

const SPEED: f64 = 60.0;

/// An emulator and a clock that share one (fast) time.
async fn fast_world(token_lifetime: u64) -> (Arc<ScaledClock>, TraktEmulator) {
    let clock = Arc::new(ScaledClock::new(Utc::now(), SPEED));
    let emulator =
        TraktEmulator::start(TraktOptions { token_lifetime, interval: 1, ..TraktOptions::default() }).await.unwrap();
    let c = clock.clone();
    emulator.log().set_clock(Arc::new(move || c.now()));
    (clock, emulator)
}

/// Every transition until `until` (virtual), by connection.
async fn transitions_until(
    events: &mut EventStream,
    clock: &ScaledClock,
    until: DateTime<Utc>,
) -> BTreeMap<String, Vec<(Cause, StateName, DateTime<Utc>)>> {
    let mut seen: BTreeMap<String, Vec<_>> = BTreeMap::new();
    loop {
        let Ok(left) = (until - clock.now()).to_std() else { return seen };
        let Ok(next) = tokio::time::timeout(left.div_f64(SPEED), events.next()).await else { return seen };
        if let WireEvent::Transition { profile, cause, to, at, .. } = next.unwrap().unwrap() {
            seen.entry(profile).or_default().push((cause, to, at));
        }
    }
}

/// The connections of the test's profiles (`TRAKT-P01`…).
async fn instances(client: &Client) -> Vec<ConnectionView> {
    let all: Vec<ConnectionView> = client.get("/v1/connections").await.unwrap();
    all.into_iter().filter(|v| v.profile.starts_with("TRAKT-P")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_of_calls_failing_expires_no_token_and_breaks_no_retry_after() {
    let minutes: i64 = std::env::var("AUTHKEEPER_SOAK_MINUTES").ok().and_then(|m| m.parse().ok()).unwrap_or(20);
    const N: usize = 10;
    const LIFETIME: i64 = 120; // with a 60 s margin, every refresh has a minute of lead
    let dir = tempfile::tempdir().unwrap();
    let (clock, emulator) = fast_world(LIFETIME as u64).await;
    let start = clock.now();
    let store = connected_store(&emulator, N, LIFETIME, |i| start + TimeDelta::seconds(90 + 11 * i as i64));
    let settings = json!({"refresh_margin_secs": 60, "backoff_base_secs": 5, "http_timeout_secs": 5,
                          "validate_every_secs": 300});
    let running = start_with(dir.path(), &emulator, clock.clone(), Arc::new(store), N, settings).await;
    let client = Client::new(&running.socket);
    let mut events = client.events().await.unwrap();
    emulator.log().set_flaky(30);

    let seen = transitions_until(&mut events, &clock, start + TimeDelta::minutes(minutes)).await;
    emulator.log().set_flaky(0);
    let calls = emulator.log().calls();
    let failed = calls.iter().filter(|c| c.status >= 429).count();
    let refreshes = seen.values().flatten().filter(|(c, ..)| *c == Cause::Refreshed).count();
    let expired: Vec<_> = seen.values().flatten().filter(|(_, to, _)| *to != StateName::Connected).collect();
    // Requests already on their way when a Retry-After was served may arrive after it; any
    // other arrival inside a pause broke it. Three virtual seconds is 50 real milliseconds.
    let breaches = emulator.log().arrivals_during_pauses(TimeDelta::seconds(3));
    eprintln!(
        "flaky soak: {minutes} virtual minutes, {N} connections, {} calls, {failed} failed ({:.0} %), \
         {} Retry-After pauses, {refreshes} refreshes, {} left connected, {breaches} calls inside a pause",
        calls.len(),
        100.0 * failed as f64 / calls.len().max(1) as f64,
        emulator.log().pauses_served(),
        expired.len(),
    );
    assert!(expired.is_empty(), "tokens left connected: {expired:?}");
    assert_eq!(breaches, 0, "a call arrived during a Retry-After pause");
    let views = instances(&client).await;
    assert!(views.iter().all(|v| v.state == StateName::Connected && v.expires_at.unwrap() > clock.now()));
    // Every connection refreshed at least once per (two-minute) lifetime.
    assert!(refreshes >= N * (minutes as usize * 60 / LIFETIME as usize), "{refreshes} refreshes");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_a_token_expires_it_only_at_its_end_and_recovery_needs_no_one() {
    const N: usize = 5;
    const LIFETIME: i64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let (clock, emulator) = fast_world(LIFETIME as u64).await;
    let start = clock.now();
    let store = connected_store(&emulator, N, LIFETIME, |i| start + TimeDelta::seconds(120 + 20 * i as i64));
    let settings = json!({"refresh_margin_secs": 60, "backoff_base_secs": 5, "http_timeout_secs": 5});
    // Nothing but 503 from the start, for longer than any of the tokens has left.
    emulator.log().inject("/", Fault::Status(503), usize::MAX);
    let running = start_with(dir.path(), &emulator, clock.clone(), Arc::new(store), N, settings).await;
    let client = Client::new(&running.socket);
    let mut events = client.events().await.unwrap();
    let ends: BTreeMap<String, DateTime<Utc>> = client
        .get::<Vec<ConnectionView>>("/v1/connections")
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.profile.starts_with("TRAKT-P"))
        .map(|v| (v.profile, v.expires_at.unwrap()))
        .collect();

    let outage_end = start + TimeDelta::seconds(420);
    let seen = transitions_until(&mut events, &clock, outage_end).await;
    for (profile, end) in &ends {
        let t = seen.get(profile).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(t.len(), 1, "{profile}: exactly one transition during the outage: {t:?}");
        let (cause, to, at) = t[0];
        assert_eq!((cause, to), (Cause::ExpiredUnrefreshed, StateName::Expired), "{profile}");
        assert!(at >= *end, "{profile}: expired at {at}, before its end {end}");
    }
    for v in &instances(&client).await {
        let error = v.last_error.as_deref().unwrap_or_default();
        assert!(error.contains("503"), "{}: last_error says why: {error:?}", v.profile);
    }
    let calls_in_outage = emulator.log().calls().len();

    // The provider comes back: every connection returns to connected by itself.
    emulator.log().clear_faults();
    let back = clock.now();
    let mut recovered = 0;
    while recovered < N {
        let event = tokio::time::timeout(common::PATIENCE, events.next()).await.unwrap().unwrap().unwrap();
        if let WireEvent::Transition { cause: Cause::Refreshed, to: StateName::Connected, .. } = event {
            recovered += 1;
        }
    }
    eprintln!(
        "long outage: {N} connections, 503s for 420 virtual s over {LIFETIME} s tokens, \
         {calls_in_outage} calls during the outage, all connected again {} virtual s after it ended",
        (clock.now() - back).num_seconds()
    );
    running.stop().await.unwrap();
}
