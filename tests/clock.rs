//! Timing on the injected clock: the daemon runs in-process on a `ManualClock`, so refresh
//! ahead of expiry, backoff and expiry without a refresh are checked at exact instants.

use authkeeper::client::{Client, EventStream};
use authkeeper::clock::{Clock, ManualClock};
use authkeeper::config::Paths;
use authkeeper::daemon;
use authkeeper::wire::{ConnectReply, ConnectionView, WireEvent};
use authkeeper_fixtures::{Fault, TraktEmulator, TraktOptions};
use authkeeper_state::schedule::refresh_lead;
use authkeeper_state::{Cause, StateName};
use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const PATH: &str = "/v1/connections/trakt/default";

async fn next_transition(events: &mut EventStream) -> (Cause, StateName, chrono::DateTime<Utc>) {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let WireEvent::Transition { cause, to, at, .. } = events.next().await.unwrap().unwrap() {
                return (cause, to, at);
            }
        }
    })
    .await
    .expect("a transition in time")
}

/// The retry time announced by the next warning (a provider call with no verdict).
async fn next_warning(events: &mut EventStream) -> chrono::DateTime<Utc> {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let e = events.next().await.unwrap().unwrap();
            if let WireEvent::Warning { next_attempt_at: Some(at), .. } = e {
                return at;
            }
        }
    })
    .await
    .expect("a warning in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_runs_at_expiry_minus_lead_and_expiry_without_refresh_is_expired() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = TraktEmulator::start(TraktOptions { interval: 0, token_lifetime: 3600, ..TraktOptions::default() })
        .await
        .unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        json!({
            "trakt": {"client_id": "emulator-client-id", "client_secret": "emulator-client-secret"},
            "authkeeper": {"base_url": {"trakt": emulator.url()}, "refresh_margin_secs": 300,
                           "backoff_base_secs": 10, "validate_every_secs": 86400,
                           "rate_limits": {"trakt": {"burst": 10}}},
        })
        .to_string(),
    )
    .unwrap();
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let paths = Paths { config, state_dir: dir.path().join("state"), socket: dir.path().join("s.sock") };
    let running = daemon::start(daemon::Options::new(paths, clock.clone())).await.unwrap();
    let client = Client::new(&running.socket);
    let mut events = client.events().await.unwrap();
    let polls = || emulator.log().calls_to("/oauth/device/token").len();

    // Connect; the first poll is due one interval after the code was issued, on this clock.
    let reply: ConnectReply = client.post(&format!("{PATH}/connect"), None).await.unwrap();
    assert_eq!(next_transition(&mut events).await.0, Cause::ConnectRequested);
    emulator.approve(reply.user_code().unwrap());
    clock.advance(TimeDelta::seconds(reply.interval.unwrap() as i64));
    emulator.log().wait_for_calls("/oauth/device/token", 1).await;
    let (cause, to, _) = next_transition(&mut events).await;
    assert_eq!((cause, to), (Cause::Approved, StateName::Connected));
    assert_eq!(next_transition(&mut events).await.0, Cause::Validated, "then whose token it is");
    assert_eq!(polls(), 1);

    // The refresh is scheduled at expires_at − lead (lead = 10 % of an hour here), minus at
    // most 10 % jitter.
    let view: ConnectionView = client.get(PATH).await.unwrap();
    let expires_at = view.expires_at.unwrap();
    let lead = refresh_lead(TimeDelta::seconds(3600), TimeDelta::seconds(300));
    assert_eq!(lead, TimeDelta::seconds(360));
    let due = view.next_attempt_at.unwrap();
    assert!(
        due <= expires_at - lead && due >= expires_at - lead - lead / 10,
        "refresh due at {due}, expiry {expires_at}"
    );
    assert_eq!(emulator.log().calls_to("/oauth/token").len(), 0);

    clock.set(due);
    let (cause, to, at) = next_transition(&mut events).await;
    assert_eq!((cause, to), (Cause::Refreshed, StateName::Connected));
    assert_eq!(at, due, "refreshed exactly when due, on the injected clock");

    // Now Trakt answers 503 to every refresh: the token must not be called expired until its
    // expiry has passed, and then it is, with cause expired_unrefreshed.
    emulator.log().inject("/oauth/token", Fault::Status(503), 1000);
    let view: ConnectionView = client.get(PATH).await.unwrap();
    let (expires_at, due) = (view.expires_at.unwrap(), view.next_attempt_at.unwrap());
    clock.set(due);
    let retry = next_warning(&mut events).await;
    let view: ConnectionView = client.get(PATH).await.unwrap();
    assert_eq!(view.state, StateName::Connected, "a 503 is no verdict");
    assert!(view.last_error.as_deref().unwrap().contains("503"));
    assert_eq!(view.next_attempt_at, Some(retry));
    assert!(
        retry >= due + TimeDelta::seconds(10) && retry <= due + TimeDelta::milliseconds(12_500),
        "backoff 10 s + jitter"
    );

    clock.set(expires_at + TimeDelta::seconds(1));
    let (cause, to, at) = next_transition(&mut events).await;
    assert_eq!((cause, to), (Cause::ExpiredUnrefreshed, StateName::Expired));
    assert!(at > expires_at);
    let token = client.get::<Value>(&format!("{PATH}/token")).await;
    assert!(token.is_err(), "no token is handed out once expired");

    // Trakt recovers: refreshing goes on with backoff and brings the connection back.
    emulator.log().clear_faults();
    let view: ConnectionView = client.get(PATH).await.unwrap();
    clock.set(view.next_attempt_at.expect("refresh keeps being retried"));
    let (cause, to, _) = next_transition(&mut events).await;
    assert_eq!((cause, to), (Cause::Refreshed, StateName::Connected));
    assert!(clock.now() < Utc::now() + TimeDelta::days(1), "sanity: the clock only moved as told");
    running.stop().await.unwrap();
}
