//! Unknown answers (5xx, timeouts, garbage) never change the state; they are recorded and
//! retried with backoff.

mod common;

use authkeeper::wire::ConnectionView;
use authkeeper_fixtures::{Fault, TraktOptions};
use authkeeper_state::{Cause, StateName};
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_keeps_the_connection_connected_and_retries_with_growing_backoff() {
    let h = Harness::new(fast_trakt(), json!({"backoff_base_secs": 1})).await;
    let daemon = h.start_daemon().await;
    let mut events = connect_approved(&h).await;
    let settings_calls = h.emulator.log().calls_to("/users/settings").len();

    h.emulator.log().inject("/users/settings", Fault::Status(500), 3);
    let view: ConnectionView = h.client().post("/v1/connections/trakt/default/validate", None).await.unwrap();
    assert_eq!(view.state, StateName::Connected, "unknown is not rejected");
    assert!(view.last_error.as_deref().unwrap().contains("500"), "{view:?}");
    assert!(view.next_attempt_at.unwrap() > view.since, "a retry is scheduled");
    let (code, out, _) = h.cli(&["status"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("connected") && out.contains("HTTP 500") && out.contains("retry at"), "{out}");

    // Two more failures by themselves, then success: the gaps follow 1 s, 2 s, 4 s.
    let (from, to, _) = wait_transition(&mut events, Cause::Validated).await;
    assert_eq!((from, to), (StateName::Connected, StateName::Connected));
    let calls = h.emulator.log().calls_to("/users/settings");
    let attempts = &calls[settings_calls..];
    let statuses: Vec<u16> = attempts.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [500, 500, 500, 200]);
    let gaps: Vec<i64> = attempts.windows(2).map(|w| (w[1].at - w[0].at).num_milliseconds()).collect();
    for (gap, base) in gaps.iter().zip([1000, 2000, 4000]) {
        assert!(*gap >= base - 50, "retry gaps {gaps:?} follow the backoff curve");
    }
    assert!(gaps[0] < gaps[1] && gaps[1] < gaps[2], "backoff grows: {gaps:?}");
    let view: ConnectionView = h.client().get("/v1/connections/trakt/default").await.unwrap();
    assert_eq!(view.last_error, None, "a good answer clears the error");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_or_a_garbage_body_is_unknown_too() {
    let h = Harness::new(fast_trakt(), json!({"http_timeout_secs": 1, "backoff_base_secs": 30})).await;
    let daemon = h.start_daemon().await;
    connect_approved(&h).await;
    let client = h.client();

    for (path, fault, action, says) in [
        ("/users/settings", Fault::Hang, "validate", "timed out"),
        ("/users/settings", Fault::Garbage, "validate", "unreadable"),
        ("/oauth/token", Fault::RetryAfter(30), "refresh", "429"),
    ] {
        h.emulator.log().inject(path, fault, 1);
        let view: ConnectionView = client.post(&format!("/v1/connections/trakt/default/{action}"), None).await.unwrap();
        assert_eq!(view.state, StateName::Connected, "{says}: still connected");
        assert!(view.last_error.as_deref().unwrap().contains(says), "{view:?}");
    }

    let history: Vec<authkeeper_state::Transition> = client.get("/v1/connections/trakt/default/history").await.unwrap();
    let causes: Vec<Cause> = history.iter().map(|t| t.cause).collect();
    assert_eq!(
        causes,
        [Cause::ConnectRequested, Cause::Approved, Cause::Validated],
        "no transition was recorded for unknown answers"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_numbers_from_a_provider_are_held_to_sane_bounds() {
    // An interval of 317,000 years, a token that lives a century.
    let opts = TraktOptions { interval: 10_000_000_000_000, token_lifetime: 3_200_000_000, ..fast_trakt() };
    let h = Harness::new(opts, json!({})).await;
    let daemon = h.start_daemon().await;
    let client = h.client();
    let reply: authkeeper::wire::ConnectReply =
        client.post("/v1/connections/trakt/default/connect", None).await.unwrap();
    assert_eq!(reply.interval, Some(3600), "an hour at most between polls");
    daemon.kill9().await;
    // The pending flow, saved with its interval, does not keep the daemon from starting.
    let daemon = h.start_daemon().await;
    let view: ConnectionView = h.client().get("/v1/connections/trakt/default").await.unwrap();
    assert_eq!(view.state, StateName::Pending);
    daemon.stop().await;

    // A Retry-After of 3 million years: the provider is left alone for a day at most, and
    // calls in the meantime answer at once.
    let h = Harness::new(TraktOptions { token_lifetime: 3_200_000_000, ..fast_trakt() }, json!({})).await;
    let daemon = h.start_daemon().await;
    connect_approved(&h).await;
    let client = h.client();
    let view: ConnectionView = client.get("/v1/connections/trakt/default").await.unwrap();
    let years = (view.expires_at.unwrap() - chrono::Utc::now()).num_days() / 365;
    assert!((9..=10).contains(&years), "ten years at most: {years}");
    h.emulator.log().inject("/users/settings", Fault::RetryAfter(99_999_999_999_999), 1);
    let view: ConnectionView = client.post("/v1/connections/trakt/default/validate", None).await.unwrap();
    assert_eq!(view.state, StateName::Connected);
    let view: ConnectionView = client.post("/v1/connections/trakt/default/validate", None).await.unwrap();
    let error = view.last_error.unwrap_or_default();
    assert!(error.contains("no calls until"), "{error}");
    let tomorrow = (chrono::Utc::now() + chrono::TimeDelta::days(1)).format("%Y-%m-%d").to_string();
    assert!(error.contains(&tomorrow), "quiet until a day from now: {error}");
    daemon.stop().await;
}
