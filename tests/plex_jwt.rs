//! Plex's JWT authentication through the real binary and socket, against the plex.tv
//! emulator (which verifies real Ed25519 signatures): opting a legacy profile in, a new login
//! that sends the device key with the PIN, refreshes before the 7 days (here seconds) are up,
//! and each refusal — a stale nonce, a key that no longer matches, a wrong `iss` — reported.

mod common;

use authkeeper::wire::{ConnectReply, ConnectionView};
use authkeeper_fixtures::{PlexEmulator, PlexOptions};
use authkeeper_state::{Cause, ConnKey, StateName, Store};
use common::trackers::{Conn, harness};
use common::*;
use serde_json::{Value, json};

fn config(plex: &PlexEmulator, block: Value) -> Value {
    json!({"plex": block, "authkeeper": {"base_url": {"plex": plex.url()}, "refresh_margin_secs": 2}})
}

async fn connect(h: &Harness, plex: &PlexEmulator, events: &mut authkeeper::client::EventStream) {
    let reply: ConnectReply = Conn::new(h, "plex", "default").connect(json!({"flow": "device_pin"})).await.unwrap();
    assert!(plex.approve(reply.user_code().unwrap()));
    wait_for(events, "plex", Cause::Approved).await;
    wait_for(events, "plex", Cause::Validated).await;
}

/// `/api/v2/user` with `token`, as any client would call it.
async fn user_status(plex: &PlexEmulator, token: &str) -> u16 {
    authkeeper::providers::install_crypto();
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v2/user", plex.url()))
        .header("x-plex-token", token)
        .header("x-plex-client-identifier", "someone")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    resp.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opting_in_upgrades_a_legacy_token_and_the_jwt_refreshes_itself_before_it_ends() {
    let plex = PlexEmulator::start(PlexOptions::default()).await.unwrap();
    plex.set_jwt_lifetime(8);
    let h = harness(config(&plex, json!({}))).await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let conn = Conn::new(&h, "plex", "default");
    connect(&h, &plex, &mut events).await;
    assert_eq!(conn.view().await.facts["auth_mode"], "legacy");
    let legacy = conn.token().await.unwrap()["access_token"].as_str().unwrap().to_owned();

    // The user opts in: the profile gets a device key, registers it with the legacy token, and
    // the first Plex JWT replaces that token (which Plex kills then).
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(h.config_path()).unwrap()).unwrap();
    cfg["plex"]["jwt"] = json!(true);
    save_by_rename(&h.config_path(), &cfg.to_string());
    wait_for(&mut events, "plex", Cause::Validated).await;
    let view = conn.view().await;
    assert_eq!((view.state, view.facts["auth_mode"].as_str()), (StateName::Connected, "jwt"));
    let token: Value = conn.token().await.unwrap();
    let first = token["access_token"].as_str().unwrap().to_owned();
    assert_eq!(first.split('.').count(), 3, "a Plex JWT");
    let client = token["client_identifier"].as_str().unwrap().to_owned();
    assert_eq!(plex.registered_keys().iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(), [client.as_str()]);
    assert_eq!(user_status(&plex, &legacy).await, 401, "the legacy token died with the first JWT");
    assert!(view.expires_at.is_some(), "read from the JWT's own exp");

    // Its 8 s are not up before the daemon refreshes it with the device key, unasked.
    wait_for(&mut events, "plex", Cause::Refreshed).await;
    let second = conn.token().await.unwrap()["access_token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    assert_eq!(user_status(&plex, &second).await, 200);
    assert!(plex.jwt_refreshes() >= 2);

    // A stale nonce is refused by Plex; the daemon says so, keeps the connection, and the next
    // attempt (a new nonce) goes through.
    plex.hand_out_stale_nonces(1);
    let view: ConnectionView = h.client().post(&format!("{}/refresh", conn.path), None).await.unwrap();
    assert_eq!(view.state, StateName::Connected);
    assert!(view.last_error.as_deref().unwrap_or_default().contains("nonce"), "{:?}", view.last_error);
    let view: ConnectionView = h.client().post(&format!("{}/refresh", conn.path), None).await.unwrap();
    assert_eq!((view.state, view.last_error), (StateName::Connected, None));
    daemon.stop().await;
    for token in plex.issued_tokens() {
        assert!(!h.log().contains(&token), "a token Plex issued is in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_login_sends_the_key_with_the_pin_and_a_key_that_no_longer_matches_is_reported() {
    let plex = PlexEmulator::start(PlexOptions::default()).await.unwrap();
    let h = harness(config(&plex, json!({"jwt": true}))).await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let conn = Conn::new(&h, "plex", "default");
    connect(&h, &plex, &mut events).await;
    let view = conn.view().await;
    assert_eq!((view.state, view.facts["auth_mode"].as_str()), (StateName::Connected, "jwt"));
    assert_eq!(plex.registered_keys().len(), 1, "registered by the PIN");
    daemon.stop().await;

    // The profile's key is replaced behind the daemon's back: its signatures no longer verify.
    let store = Store::open(&h.state_dir().join("authkeeper.redb")).unwrap();
    let key = ConnKey::new("plex", "default");
    let (_, mut state) = store.profile_states().unwrap().into_iter().find(|(k, _)| *k == key).unwrap();
    let other = "ZmFrZS1rZXktZmFrZS1rZXktZmFrZS1rZXktZmFrZS0";
    state.secrets.insert("device_key".into(), authkeeper_state::Secret::new(other));
    store.set_profile_states(&[(key, state)]).unwrap();
    drop(store);

    let daemon = h.start_daemon().await;
    let view: ConnectionView = h.client().post(&format!("{}/refresh", conn.path), None).await.unwrap();
    assert_eq!(view.state, StateName::Expired);
    assert!(conn.last_detail().await.contains("signature or key"), "{}", conn.last_detail().await);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_imported_with_another_devices_client_id_is_refused_for_its_iss_and_kept() {
    let plex = PlexEmulator::start(PlexOptions::default()).await.unwrap();
    let first = harness(config(&plex, json!({}))).await;
    let daemon = first.start_daemon().await;
    let mut events = first.client().events().await.unwrap();
    connect(&first, &plex, &mut events).await;
    let legacy = Conn::new(&first, "plex", "default").token().await.unwrap()["access_token"].clone();
    daemon.stop().await;

    // CrossWatch's file names the wrong client id for this token, and opts in to JWT.
    let block = json!({"account_token": legacy, "client_id": "not-the-device", "jwt": true});
    let h = harness(config(&plex, block)).await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "plex", "default");
    // The upgrade is refused for its iss; the legacy token still works, so it stays, and
    // status says why it was not upgraded.
    let view = conn.validate().await;
    assert_eq!((view.state, view.facts["auth_mode"].as_str()), (StateName::Connected, "legacy"));
    let why = &view.facts["jwt_upgrade"];
    assert!(why.contains("1097") && why.contains("iss"), "{why}");
    daemon.stop().await;
}
