//! Scheduling on the injected clock: a clock that jumps days ahead, an hour of 503s, and a
//! provider's Retry-After. The daemon runs in-process; the test moves time from one deadline
//! to the next and waits on the events each one produces.

mod common;

use authkeeper::client::{Client, EventStream};
use authkeeper::clock::{Clock, ManualClock};
use authkeeper::wire::{ConnectionView, WireEvent};
use authkeeper_fixtures::{Fault, TraktEmulator, TraktOptions};
use authkeeper_state::{Cause, StateName};
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use common::*;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
}

async fn emulator_on(clock: &Arc<ManualClock>) -> TraktEmulator {
    let emulator = TraktEmulator::start(TraktOptions::default()).await.unwrap();
    let c = clock.clone();
    emulator.log().set_clock(Arc::new(move || c.now()));
    emulator
}

async fn next_event(events: &mut EventStream) -> WireEvent {
    tokio::time::timeout(Duration::from_secs(30), events.next()).await.expect("an event in time").unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_three_day_clock_jump_overdue_refreshes_happen_at_once_and_nothing_shows_expired() {
    const N: usize = 20;
    let clock = Arc::new(ManualClock::new(t0()));
    let emulator = emulator_on(&clock).await;
    let store = connected_store(&emulator, N, 3600, |i| t0() + TimeDelta::minutes(30 + i as i64));
    let dir = tempfile::tempdir().unwrap();
    let settings = json!({"validate_every_secs": 7 * 86_400});
    let running = start_in_process(dir.path(), &emulator, clock.clone(), store, N, settings).await;
    let client = Client::new(&running.socket);
    let mut events = client.events().await.unwrap();

    // The machine slept through every expiry. Overdue refreshes go at once, one rate-limit
    // slot (125 ms at Trakt's default 10/s, 80 % kept for refreshes) after another.
    let woke = t0() + TimeDelta::days(3);
    clock.set(woke);
    let mut refreshed = 0;
    while refreshed < N {
        match next_event(&mut events).await {
            WireEvent::Transition { cause: Cause::Refreshed, from: StateName::Connected, at, .. } => {
                assert!(at < woke + TimeDelta::seconds(3), "{refreshed} refreshed at {at}: at once, in slot order");
                refreshed += 1;
                clock.advance(TimeDelta::milliseconds(125));
            }
            other => panic!("only refreshes, never expired: {other:?}"),
        }
    }
    let all: Vec<ConnectionView> = client.get("/v1/connections").await.unwrap();
    assert!(all.iter().filter(|c| c.profile != "default").all(|c| c.state == StateName::Connected));
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_of_503s_keeps_a_valid_token_connected_and_retries_follow_the_backoff_curve() {
    let clock = Arc::new(ManualClock::new(t0()));
    let emulator = emulator_on(&clock).await;
    let store = connected_store(&emulator, 1, 86_400, |_| t0() + TimeDelta::hours(20));
    let dir = tempfile::tempdir().unwrap();
    let settings = json!({"backoff_base_secs": 5, "validate_every_secs": 7 * 86_400});
    let running = start_in_process(dir.path(), &emulator, clock.clone(), store, 1, settings).await;
    let client = Client::new(&running.socket);
    let mut events = client.events().await.unwrap();

    emulator.log().inject("/users/settings", Fault::Status(503), 10_000);
    let view: ConnectionView = client.post("/v1/connections/trakt/TRAKT-P01/validate", None).await.unwrap();
    assert_eq!(view.state, StateName::Connected);
    assert!(matches!(next_event(&mut events).await, WireEvent::Warning { .. }), "the first 503");
    let end = t0() + TimeDelta::hours(1);
    while let Some(next) = next_deadline(&client).await.filter(|n| *n < end) {
        clock.set(next);
        match next_event(&mut events).await {
            WireEvent::Warning { next_attempt_at: Some(_), .. } => {}
            other => panic!("only retries for an hour, no transition: {other:?}"),
        }
    }
    let view: ConnectionView = client.get("/v1/connections/trakt/TRAKT-P01").await.unwrap();
    assert_eq!(view.state, StateName::Connected, "the token is still valid: still connected");
    assert!(view.last_error.as_deref().unwrap().contains("503"));

    // The call log against the curve 5 s × 2^min(n−1, 4), each stretched by at most 25 %.
    let calls = emulator.log().calls_to("/users/settings");
    assert!(calls.len() > 40, "an hour of retries: {}", calls.len());
    for (n, pair) in calls.windows(2).enumerate() {
        let gap = (pair[1].at - pair[0].at).num_milliseconds();
        let base = 5_000 * (1i64 << n.min(4));
        assert!(
            gap >= base && gap <= base * 5 / 4,
            "retry {} came {gap} ms after the last; curve says {base} ms",
            n + 1
        );
    }

    // Trakt recovers: the next retry validates.
    emulator.log().clear_faults();
    clock.set(next_deadline(&client).await.unwrap());
    assert!(matches!(next_event(&mut events).await, WireEvent::Transition { cause: Cause::Validated, .. }));
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_holds_every_call_to_the_provider_until_it_passes() {
    let clock = Arc::new(ManualClock::new(t0()));
    let emulator = emulator_on(&clock).await;
    // Two accounts; the second's refresh falls due 9 to 15 s in (a 60 s lead, 10 % jitter).
    let store = connected_store(&emulator, 2, 600, |i| t0() + TimeDelta::seconds(if i == 0 { 500 } else { 75 }));
    let dir = tempfile::tempdir().unwrap();
    let settings = json!({"validate_every_secs": 7 * 86_400, "refresh_margin_secs": 60});
    let running = start_in_process(dir.path(), &emulator, clock.clone(), store, 2, settings).await;
    let client = Client::new(&running.socket);
    let mut events = client.events().await.unwrap();

    emulator.log().inject("/users/settings", Fault::RetryAfter(30), 1);
    let view: ConnectionView = client.post("/v1/connections/trakt/TRAKT-P01/validate", None).await.unwrap();
    assert!(view.last_error.as_deref().unwrap().contains("429"));
    assert!(matches!(next_event(&mut events).await, WireEvent::Warning { .. }), "the 429 itself");
    let calls_before = emulator.log().calls().len();

    // The other account's refresh falls due ten seconds in, inside the pause: it waits.
    let due = next_deadline(&client).await.unwrap();
    assert!(due > t0() && due < t0() + TimeDelta::seconds(30), "{due}");
    clock.set(due);
    match next_event(&mut events).await {
        WireEvent::Warning { profile, next_attempt_at, .. } => {
            assert_eq!(profile.as_deref(), Some("TRAKT-P02"));
            assert_eq!(next_attempt_at, Some(t0() + TimeDelta::seconds(30)));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(emulator.log().calls().len(), calls_before, "no call reached Trakt during the pause");

    // Once the pause is over, calls resume.
    clock.set(t0() + TimeDelta::seconds(30));
    loop {
        match next_event(&mut events).await {
            WireEvent::Transition { profile, cause: Cause::Refreshed, .. } if profile == "TRAKT-P02" => break,
            // The retry of the first account took the global slot; the refresh goes 100 ms on.
            _ => clock.advance(TimeDelta::milliseconds(100)),
        }
    }
    let after: Vec<_> = emulator.log().calls()[calls_before..].iter().map(|c| c.at).collect();
    assert_eq!(after.iter().min(), Some(&(t0() + TimeDelta::seconds(30))), "calls resumed when the pause ended");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_of_many_connections_streams_each_once_in_key_order() {
    // More than two of the list's 256-view chunks.
    const N: usize = 600;
    let clock = Arc::new(ManualClock::new(t0()));
    let emulator = emulator_on(&clock).await;
    let store = connected_store(&emulator, N, 86_400, |_| t0() + TimeDelta::days(1));
    let dir = tempfile::tempdir().unwrap();
    let settings = json!({"validate_every_secs": 86_400});
    let running = start_in_process(dir.path(), &emulator, clock.clone(), store, N, settings).await;
    let client = Client::new(&running.socket);
    let all: Vec<ConnectionView> = client.get("/v1/connections").await.unwrap();
    let keys: Vec<(String, String)> = all.iter().map(|c| (c.provider.clone(), c.profile.clone())).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys, sorted, "each once, in key order");
    assert_eq!(all.iter().filter(|c| c.profile.starts_with("TRAKT-P")).count(), N);
    assert!(all.iter().filter(|c| c.profile.starts_with("TRAKT-P")).all(|c| c.state == StateName::Connected));
    let none: Vec<ConnectionView> = client.get("/v1/connections?owner=discord:404").await.unwrap();
    assert!(none.is_empty());
    running.stop().await.unwrap();
}
