//! Simkl through the real binary and socket, against its emulator: the PIN flow with its
//! quirk (a forgotten code is answered with a fresh PIN), the browser login with PKCE through
//! the web listener, rejection and reconnection, the app's identity on every call.

mod common;

use authkeeper::wire::ConnectReply;
use authkeeper_fixtures::simkl::{SimklEmulator, SimklOptions};
use authkeeper_state::{Cause, StateName};
use common::trackers::{Conn, assert_no_leaks, browse, failures_keep_state, free_port, harness};
use common::*;
use serde_json::{Value, json};

async fn setup() -> (Harness, SimklEmulator, String) {
    let emu = SimklEmulator::start(SimklOptions { interval: 1, ..SimklOptions::default() }).await.unwrap();
    let (listen, public_url) = free_port();
    let config = json!({
        "simkl": {"client_id": SimklOptions::default().client_id, "client_secret": SimklOptions::default().client_secret},
        "authkeeper": {"base_url": {"simkl": emu.url()}, "web": {"listen": listen, "public_url": public_url}},
    });
    (harness(config).await, emu, public_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pin_connects_is_rejected_once_revoked_and_connects_again() {
    let (h, emu, _) = setup().await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let conn = Conn::new(&h, "simkl", "default");

    let reply: ConnectReply = conn.connect(json!({"flow": "device_pin"})).await.unwrap();
    let code = reply.user_code().unwrap().to_owned();
    assert_eq!(reply.pending.as_ref().unwrap().verification_url.as_deref(), Some("https://simkl.com/pin"));
    assert_eq!(emu.pending_user_codes(), std::slice::from_ref(&code));
    emu.log().wait_for_calls(&format!("/oauth/pin/{code}"), 1).await; // polled while pending
    assert!(emu.approve(&code));
    wait_for(&mut events, "simkl", Cause::Approved).await;
    wait_for(&mut events, "simkl", Cause::Validated).await;
    let view = conn.view().await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));
    let token: Value = conn.token().await.unwrap();
    assert_eq!(token["client_id"], SimklOptions::default().client_id);
    assert!(emu.calls_without_app_info().is_empty(), "app-name and app-version on every call");

    failures_keep_state(&conn, emu.log(), "/users/settings").await;

    // Simkl has no refresh: a revoked token is rejected → expired; a new PIN brings it back.
    emu.revoke_all();
    assert_eq!(conn.validate().await.state, StateName::Expired);
    assert!(conn.last_detail().await.contains("401"), "{}", conn.last_detail().await);
    let reply = conn.connect(json!({"flow": "device_pin"})).await.unwrap();
    assert!(emu.approve(reply.user_code().unwrap()));
    wait_for(&mut events, "simkl", Cause::Approved).await;
    wait_for(&mut events, "simkl", Cause::Validated).await;
    assert_eq!(conn.view().await.state, StateName::Connected);
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_simkl_forgot_is_answered_with_a_fresh_pin_and_ends_the_flow() {
    let (h, emu, _) = setup().await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let conn = Conn::new(&h, "simkl", "default");
    let reply = conn.connect(json!({"flow": "device_pin"})).await.unwrap();
    let code = reply.user_code().unwrap().to_owned();
    emu.expire_codes();
    let (from, to, _) = wait_for(&mut events, "simkl", Cause::FlowExpired).await;
    assert_eq!((from, to), (StateName::Pending, StateName::Disconnected));
    assert!(conn.last_detail().await.contains("no longer knows this PIN"), "{}", conn.last_detail().await);
    assert!(!emu.pending_user_codes().is_empty(), "Simkl's fresh PIN was never shown as ours");
    assert!(conn.view().await.pending.is_none(), "{code} is no longer shown");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_login_uses_pkce_and_comes_back_through_the_callback() {
    let (h, emu, public_url) = setup().await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "simkl", "default");

    let reply = conn.connect(json!({"flow": "oauth_code"})).await.unwrap();
    let url = reqwest::Url::parse(reply.pending.as_ref().unwrap().authorize_url.as_deref().unwrap()).unwrap();
    let query: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(query["redirect_uri"], format!("{public_url}/oauth/callback/simkl"));
    assert_eq!(query["code_challenge_method"], "S256");
    assert_eq!(query["state"].len(), 43, "32 random bytes");
    assert_eq!(reply.interval, None, "a browser login is not polled");

    let (status, _, page) = browse(url.as_str()).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Connected") && page.contains("sean"), "{page}");
    let view = conn.view().await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));
    assert_eq!(view.facts["redirect_uri"], format!("{public_url}/oauth/callback/simkl"));
    assert_eq!(conn.causes().await, ["connect_requested", "approved", "validated"]);

    // Rejected once revoked → expired; a new browser login brings it back.
    emu.revoke_all();
    assert_eq!(conn.validate().await.state, StateName::Expired);
    let reply = conn.connect(json!({"flow": "oauth_code"})).await.unwrap();
    let (status, _, _) = browse(reply.pending.unwrap().authorize_url.as_deref().unwrap()).await;
    assert_eq!((status, conn.view().await.state), (200, StateName::Connected));

    // Denied in the browser: back to disconnected.
    conn.disconnect().await;
    emu.deny_next_authorize();
    let reply = conn.connect(json!({"flow": "oauth_code"})).await.unwrap();
    let (_, _, page) = browse(reply.pending.unwrap().authorize_url.as_deref().unwrap()).await;
    assert!(page.contains("Not connected"), "{page}");
    assert_eq!(conn.view().await.state, StateName::Disconnected);
    assert_eq!(conn.causes().await.last().map(String::as_str), Some("denied"));
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_simkl_does_not_know_is_named_as_the_cause() {
    let emu = SimklEmulator::start(SimklOptions::default()).await.unwrap();
    let config = json!({"simkl": {"client_id": "not-our-app"}, "authkeeper": {"base_url": {"simkl": emu.url()}}});
    let h = harness(config).await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "simkl", "default");
    let err = conn.connect(json!({"flow": "device_pin"})).await.unwrap_err();
    assert!(err.to_string().contains("client_id_failed"), "{err}");
    assert_eq!(conn.view().await.state, StateName::Disconnected);
    daemon.stop().await;
}
