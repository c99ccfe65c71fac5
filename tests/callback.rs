//! The web listener's callback, through the real binary, with Trakt's browser login: the
//! flow end to end (following the authorize URL like a browser), every refused callback
//! (wrong, used or expired state; another provider's) answering 400 with nothing changed, and
//! the warning a new public URL raises on the connections it affects, and only on those.

mod common;

use authkeeper::wire::{ConnectReply, ConnectionView, WireEvent};
use authkeeper_state::{Cause, StateName};
use common::trackers::{Conn, browse, free_port};
use common::*;
use serde_json::{Value, json};

/// A harness whose config turns the web listener on; returns its public URL.
async fn setup() -> (Harness, String, Value) {
    let (listen, public_url) = free_port();
    let h = Harness::new(fast_trakt(), json!({"web": {"listen": listen, "public_url": public_url}})).await;
    let config: Value = serde_json::from_slice(&std::fs::read(h.config_path()).unwrap()).unwrap();
    (h, public_url, config)
}

fn state_of(authorize_url: &str) -> String {
    let url = reqwest::Url::parse(authorize_url).unwrap();
    url.query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned()
}

async fn begin(conn: &Conn<'_>) -> String {
    let reply: ConnectReply = conn.connect(json!({"flow": "oauth_code"})).await.unwrap();
    reply.pending.unwrap().authorize_url.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trakts_browser_login_connects_refreshes_with_its_redirect_uri_and_recovers() {
    let (h, public_url, _) = setup().await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "trakt", "default");

    let authorize = begin(&conn).await;
    assert!(authorize.starts_with(&format!("{}/oauth/authorize?", h.emulator.url())), "{authorize}");
    assert!(authorize.contains(&format!("redirect_uri={}", urlencode(&format!("{public_url}/oauth/callback/trakt")))));
    let (status, landed, page) = browse(&authorize).await;
    assert_eq!(status, 200, "{page}");
    assert!(landed.starts_with(&format!("{public_url}/oauth/callback/trakt?")), "{landed}");
    assert!(page.contains("Connected") && !page.contains("<script"), "{page}");
    let view = conn.view().await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));

    // A refresh presents the redirect URI the grant was authorised with.
    let view: ConnectionView = h.client().post(&format!("{}/refresh", conn.path), None).await.unwrap();
    assert_eq!((view.state, view.last_error), (StateName::Connected, None));
    assert_eq!(conn.causes().await, ["connect_requested", "approved", "validated", "refreshed"]);

    // Revoked upstream: rejected, refresh refused → expired; a new browser login brings it back.
    h.emulator.revoke_all_grants();
    assert_eq!(conn.validate().await.state, StateName::Expired);
    let (status, _, _) = browse(&begin(&conn).await).await;
    assert_eq!((status, conn.view().await.state), (200, StateName::Connected));
    daemon.stop().await;
    for token in h.emulator.issued_tokens() {
        assert!(!h.log().contains(&token), "a token the emulator issued is in the log");
    }
}

fn urlencode(s: &str) -> String {
    reqwest::Url::parse_with_params("http://x/", [("v", s)]).unwrap().query().unwrap()[2..].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_callbacks_answer_400_and_change_nothing() {
    let (h, public_url, _) = setup().await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "trakt", "default");
    let authorize = begin(&conn).await;
    let state = state_of(&authorize);
    let before = conn.view().await;
    let callback =
        |provider: &str, state: &str| format!("{public_url}/oauth/callback/{provider}?code=c0de&state={state}");

    for (url, says) in [
        (callback("trakt", "not-the-state"), "unknown"),
        (callback("trakt", ""), "unknown"),
        (format!("{public_url}/oauth/callback/trakt?code=c0de"), "unknown"),
        (callback("simkl", &state), "belongs to a trakt login"),
    ] {
        let (status, _, page) = browse(&url).await;
        assert_eq!(status, 400, "{url}: {page}");
        assert!(page.contains(says) && page.contains("Nothing was changed"), "{url}: {page}");
        assert_eq!(conn.view().await, before, "{url} changed nothing");
    }
    assert!(h.emulator.log().calls_to("/oauth/token").is_empty(), "no code was exchanged");

    // The right one connects; the same answer again is refused as used.
    let (status, landed, _) = browse(&authorize).await;
    assert_eq!((status, conn.view().await.state), (200, StateName::Connected));
    let connected = conn.view().await;
    let (status, _, page) = browse(&landed).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("already used"), "{page}");
    assert_eq!(conn.view().await, connected);

    // A flow that has ended (cancelled here) takes its state with it.
    conn.disconnect().await;
    let state = state_of(&begin(&conn).await);
    h.client().post::<ConnectionView>(&format!("{}/cancel", conn.path), None).await.unwrap();
    let (status, _, _) = browse(&callback("trakt", &state)).await;
    assert_eq!((status, conn.view().await.state), (400, StateName::Disconnected));

    // The listener serves nothing of the control API.
    let (status, _, _) = browse(&format!("{public_url}/v1/connections")).await;
    assert_eq!(status, 404);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_public_url_warns_the_connections_authorised_with_the_old_one_and_only_those() {
    let (h, public_url, mut config) = setup().await;
    config["trakt"]["instances"] = json!({"TRAKT-P01": {}});
    std::fs::write(h.config_path(), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let daemon = h.start_daemon().await;
    let client = h.client();
    let mut events = client.events().await.unwrap();
    let by_browser = Conn::new(&h, "trakt", "default");
    let by_code = Conn::new(&h, "trakt", "TRAKT-P01");
    browse(&begin(&by_browser).await).await;
    let reply = by_code.connect(json!({"flow": "device_pin"})).await.unwrap();
    assert!(h.emulator.approve(reply.user_code().unwrap()));
    wait_for(&mut events, "trakt", Cause::Validated).await;
    wait_for(&mut events, "trakt", Cause::Validated).await;
    assert!(by_browser.view().await.warnings.is_empty());

    // http → https, same host: the browser login's redirect URI no longer matches.
    let https = public_url.replacen("http://", "https://", 1);
    config["authkeeper"]["web"]["public_url"] = json!(https);
    save_by_rename(&h.config_path(), &serde_json::to_string_pretty(&config).unwrap());
    let warning = tokio::time::timeout(PATIENCE, async {
        loop {
            match events.next().await {
                Some(Ok(WireEvent::Warning { message, profile, .. })) if message.contains("redirect URI") => {
                    return (profile, message);
                }
                Some(Ok(WireEvent::ConfigReloaded { .. })) => panic!("reloaded without a redirect warning"),
                Some(Ok(_)) => continue,
                other => panic!("events ended: {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(warning.0.as_deref(), Some("default"));
    assert!(warning.1.contains(&format!("{https}/oauth/callback/trakt")), "{}", warning.1);
    let warned = by_browser.view().await.warnings;
    assert!(warned.iter().any(|w| w.contains(&format!("{public_url}/oauth/callback/trakt"))), "{warned:?}");
    assert!(by_code.view().await.warnings.is_empty(), "a device login has no redirect URI to break");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_after_the_flow_expired_is_refused_and_changes_nothing() {
    let t0 = chrono::Utc::now();
    let clock = std::sync::Arc::new(authkeeper::clock::ManualClock::new(t0));
    let emulator = authkeeper_fixtures::TraktEmulator::start(fast_trakt()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (listen, public_url) = free_port();
    let store = authkeeper_state::Store::open(&dir.path().join("store.redb")).unwrap();
    let settings = json!({"web": {"listen": listen, "public_url": public_url}});
    let running = start_in_process(dir.path(), &emulator, clock.clone(), store, 0, settings).await;
    let client = authkeeper::client::Client::new(&running.socket);
    let path = "/v1/connections/trakt/default";

    let reply: ConnectReply =
        client.post(&format!("{path}/connect"), Some(json!({"flow": "oauth_code"}))).await.unwrap();
    let authorize = reply.pending.unwrap().authorize_url.unwrap();
    let state = state_of(&authorize);
    clock.advance(chrono::TimeDelta::minutes(16)); // a browser login lives 15 minutes
    let (status, _, page) = browse(&format!("{public_url}/oauth/callback/trakt?code=c0de&state={state}")).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("Nothing was changed"), "{page}");
    assert!(emulator.log().calls_to("/oauth/token").is_empty(), "no code was exchanged");
    let view: ConnectionView = client.get(path).await.unwrap();
    assert_ne!(view.state, StateName::Connected);
    let history: Vec<Value> = client.get(&format!("{path}/history")).await.unwrap();
    assert!(history.iter().all(|t| t["cause"] != "approved"), "{history:?}");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_login_pending_across_kill_9_still_comes_back() {
    let (h, _, _) = setup().await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "trakt", "default");
    let authorize = begin(&conn).await;
    daemon.kill9().await;

    let daemon = h.start_daemon().await;
    assert_eq!(conn.view().await.state, StateName::Pending, "the flow and its state were on disk");
    let (status, _, page) = browse(&authorize).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(conn.view().await.state, StateName::Connected);
    daemon.stop().await;
}
