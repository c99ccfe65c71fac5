//! 10,000 Trakt tokens that expire within the same minute: on the injected clock, every one is
//! refreshed before it expires, and the emulator's rate limit is never exceeded (no 429).

mod common;

use authkeeper::client::Client;
use authkeeper::clock::{Clock, ManualClock};
use authkeeper::wire::WireEvent;
use authkeeper_fixtures::{TraktEmulator, TraktOptions};
use authkeeper_state::Cause;
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use common::*;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const N: usize = 10_000;
const LIFETIME: i64 = 7200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tokens_expiring_in_one_minute_are_all_refreshed_in_time_without_a_429() {
    let expiry_minute = Utc.with_ymd_and_hms(2026, 11, 23, 18, 0, 0).unwrap();
    let expires = |i: usize| expiry_minute + TimeDelta::seconds((i % 60) as i64);
    let start = expiry_minute - TimeDelta::seconds(LIFETIME) + TimeDelta::seconds(60);
    let clock = Arc::new(ManualClock::new(start));

    let emulator = TraktEmulator::start(TraktOptions { token_lifetime: LIFETIME as u64, ..TraktOptions::default() })
        .await
        .unwrap();
    let c = clock.clone();
    emulator.log().set_clock(Arc::new(move || c.now()));
    emulator.log().set_rate_limit(10); // what the daemon's default Trakt cap allows

    // 10,000 connected accounts, each with a live token expiring in the same minute.
    let store = connected_store(&emulator, N, LIFETIME, expires);
    let dir = tempfile::tempdir().unwrap();
    let settings = json!({"validate_every_secs": 7 * 86_400});
    let running = start_in_process(dir.path(), &emulator, clock.clone(), store, N, settings).await;
    let client = Client::new(&running.socket);
    let mut events = client.events().await.unwrap();

    // Walk the clock from one deadline to the next; each is one refresh.
    let horizon = expiry_minute + TimeDelta::hours(1);
    let mut refreshed = 0;
    let (mut first, mut tightest) = (None::<DateTime<Utc>>, TimeDelta::days(1));
    while let Some(next) = next_deadline(&client).await {
        if next > horizon {
            break;
        }
        clock.set(next.max(clock.now()));
        let event = tokio::time::timeout(Duration::from_secs(30), events.next()).await.expect("a refresh in time");
        match event.unwrap().unwrap() {
            WireEvent::Transition { profile: p, cause: Cause::Refreshed, at, .. } => {
                let i: usize = p.trim_start_matches("TRAKT-P").parse::<usize>().unwrap() - 1;
                assert!(at < expires(i), "{p} refreshed at {at}, after its expiry {}", expires(i));
                tightest = tightest.min(expires(i) - at);
                first.get_or_insert(at);
                refreshed += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(refreshed, N, "every token was refreshed");
    assert_eq!(emulator.log().throttled(), 0, "the emulator's rate limit was never exceeded");
    assert!(emulator.log().calls().iter().all(|c| c.status == 200), "no 429, no error");
    let spread = expiry_minute - first.unwrap();
    eprintln!("{N} refreshes began {spread} before the expiry minute; the closest was {tightest} before its expiry");
    running.stop().await.unwrap();
}
