//! Restart safety: `kill -9` loses neither a pending flow nor a rotated refresh token.

mod common;

use authkeeper::wire::{ConnectReply, ConnectionView};
use authkeeper_state::{Cause, StateName};
use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_flow_survives_kill_9_and_polling_resumes_on_the_same_code() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let daemon = h.start_daemon().await;
    let reply: ConnectReply = h.client().post("/v1/connections/trakt/default/connect", None).await.unwrap();
    // The daemon is polling: the emulator has answered "pending" at least once.
    h.emulator.log().wait_for_calls("/oauth/device/token", 1).await;
    daemon.kill9().await;
    let polls_before = h.emulator.log().calls_to("/oauth/device/token").len();

    let daemon = h.start_daemon().await;
    let client = h.client();
    let mut events = client.events().await.unwrap();
    let view: ConnectionView = client.get("/v1/connections/trakt/default").await.unwrap();
    assert_eq!(view.state, StateName::Pending);
    assert_eq!(view.pending.unwrap().user_code.as_deref(), reply.user_code(), "the same code is still shown");

    // Polling resumes by itself on the stored code; once approved, the restarted daemon connects.
    h.emulator.log().wait_for_calls("/oauth/device/token", polls_before + 1).await;
    assert!(h.emulator.approve(reply.user_code().unwrap()));
    let (from, to, _) = wait_transition(&mut events, Cause::Approved).await;
    assert_eq!((from, to), (StateName::Pending, StateName::Connected));
    assert_eq!(h.emulator.device_codes_issued(), 1, "no second code was requested");
    let slow_downs = h.emulator.log().calls_to("/oauth/device/token").iter().filter(|c| c.status == 429).count();
    assert_eq!(slow_downs, 0, "the restarted daemon kept to the poll interval");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_refresh_survives_kill_9_with_the_newest_refresh_token() {
    let h = Harness::new(
        authkeeper_fixtures::TraktOptions { token_lifetime: 4, ..fast_trakt() },
        json!({"refresh_margin_secs": 2}),
    )
    .await;
    let daemon = h.start_daemon().await;
    let mut events = connect_approved(&h).await;
    h.emulator.set_token_lifetime(3600);
    // The daemon refreshes on its own; kill it the moment the refresh is published.
    wait_transition(&mut events, Cause::Refreshed).await;
    daemon.kill9().await;
    let (newest_access, newest_refresh) = h.emulator.latest_tokens().unwrap();

    let daemon = h.start_daemon().await;
    let client = h.client();
    let token: Value = client.get("/v1/connections/trakt/default/token").await.unwrap();
    assert_eq!(token["access_token"], newest_access.as_str(), "the stored pair is the newest");
    // The stored refresh token is the rotated one: Trakt accepts it (an old one would be
    // rejected as already used).
    let view: ConnectionView = client.post("/v1/connections/trakt/default/refresh", None).await.unwrap();
    assert_eq!(view.state, StateName::Connected);
    assert_eq!(view.last_error, None);
    assert_eq!(h.emulator.refresh_token_uses(&newest_refresh), 1);
    daemon.stop().await;
}
