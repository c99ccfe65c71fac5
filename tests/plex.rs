//! Plex through the real binary and socket, against the plex.tv emulator: a strong PIN,
//! approval, server discovery (local, then remote, then relay), rejection and reconnection,
//! kill -9 while pending, a client identifier that stays the profile's.

mod common;

use authkeeper::wire::{ConnectReply, ConnectionView};
use authkeeper_fixtures::plex::{PlexConnection, PlexServer};
use authkeeper_fixtures::{PlexEmulator, PlexOptions};
use authkeeper_state::{Cause, StateName};
use common::trackers::{Conn, failures_keep_state};
use common::*;
use serde_json::{Value, json};

const PATH: &str = "/v1/connections/plex/default";

/// A harness whose config points `plex` at a plex.tv emulator.
async fn setup(opts: PlexOptions) -> (Harness, PlexEmulator) {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let plex = PlexEmulator::start(opts).await.unwrap();
    let config = json!({
        "plex": {},
        "authkeeper": {"base_url": {"plex": plex.url()}, "http_timeout_secs": 5, "backoff_base_secs": 1},
    });
    std::fs::write(h.config_path(), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    (h, plex)
}

async fn state(h: &Harness) -> ConnectionView {
    h.client().get(PATH).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_connects_discovers_the_server_is_rejected_when_revoked_and_connects_again() {
    let (h, plex) = setup(PlexOptions::default()).await;
    let daemon = h.start_daemon().await;
    let client = h.client();
    let mut events = client.events().await.unwrap();

    // disconnected → pending on a strong PIN, linked at plex.tv.
    let reply: ConnectReply = client.post(&format!("{PATH}/connect"), None).await.unwrap();
    let code = reply.user_code().unwrap().to_owned();
    assert!(code.len() >= 20, "a strong PIN: {code}");
    let url = reply.pending.as_ref().unwrap().verification_url.clone().unwrap();
    assert!(url.starts_with("https://app.plex.tv/auth#?clientID=") && url.contains(&code), "{url}");
    assert_eq!(reply.interval, Some(1), "polled about once a second");

    // pending → connected; validation names the account and finds the server.
    assert!(plex.approve(&code));
    wait_for(&mut events, "plex", Cause::Approved).await;
    wait_for(&mut events, "plex", Cause::Validated).await;
    let view = state(&h).await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));
    assert_eq!(view.facts["server_name"], "Living Room");

    // The token payload: the account token and the chosen server, by its local connection.
    let token: Value = client.get(&format!("{PATH}/token")).await.unwrap();
    let server = &plex.servers()[0];
    let local = &server.connections[0];
    assert!(local.local && !local.relay);
    assert_eq!(token["server"]["name"], "Living Room");
    assert_eq!(token["server"]["machine_id"], server.machine_id);
    assert_eq!(token["server"]["url"], local.uri);
    assert_eq!(token["server"]["access_token"].as_str(), server.access_token.as_deref());
    let account = token["access_token"].as_str().unwrap().to_owned();
    assert!(plex.issued_tokens().contains(&account));
    let cid = token["client_identifier"].as_str().unwrap().to_owned();
    assert!(url.contains(&cid), "the PIN was asked for with the profile's client identifier");

    failures_keep_state(&Conn::new(&h, "plex", "default"), plex.log(), "/api/v2/user").await;

    // Plex forgets the token → the next validation is a rejection → expired, no token.
    plex.revoke_all();
    let view: ConnectionView = client.post(&format!("{PATH}/validate"), None).await.unwrap();
    assert_eq!(view.state, StateName::Expired);
    let (status, _) = api_error(client.get::<Value>(&format!("{PATH}/token")).await.unwrap_err());
    assert_eq!(status, 409);

    // And back, with the same client identifier.
    let reply: ConnectReply = client.post(&format!("{PATH}/connect"), None).await.unwrap();
    assert!(plex.approve(reply.user_code().unwrap()));
    wait_for(&mut events, "plex", Cause::Approved).await;
    wait_for(&mut events, "plex", Cause::Validated).await;
    let token: Value = client.get(&format!("{PATH}/token")).await.unwrap();
    assert_eq!(token["client_identifier"], cid.as_str());
    assert_ne!(token["access_token"], account.as_str());
    daemon.stop().await;

    for t in plex.issued_tokens() {
        assert!(!h.log().contains(&t), "a Plex token leaked into the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_prefers_remote_to_relay_and_an_expired_pin_ends_the_flow() {
    let only_far = PlexServer {
        connections: vec![
            PlexConnection::plex_direct("198.51.100.9", 8443, false, true),
            PlexConnection::plex_direct("203.0.113.7", 32400, false, false),
        ],
        ..PlexServer::living_room()
    };
    let (h, plex) = setup(PlexOptions { servers: vec![only_far], ..PlexOptions::default() }).await;
    let daemon = h.start_daemon().await;
    let client = h.client();
    let mut events = client.events().await.unwrap();

    // A PIN nobody links runs out: pending → disconnected.
    let _: ConnectReply = client.post(&format!("{PATH}/connect"), None).await.unwrap();
    plex.expire_pins();
    let (from, to, _) = wait_for(&mut events, "plex", Cause::FlowExpired).await;
    assert_eq!((from, to), (StateName::Pending, StateName::Disconnected));

    let reply: ConnectReply = client.post(&format!("{PATH}/connect"), None).await.unwrap();
    assert!(plex.approve(reply.user_code().unwrap()));
    wait_for(&mut events, "plex", Cause::Approved).await;
    wait_for(&mut events, "plex", Cause::Validated).await;
    let token: Value = client.get(&format!("{PATH}/token")).await.unwrap();
    assert_eq!(token["server"]["url"], plex.servers()[0].connections[1].uri, "remote before relay");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_pin_survives_kill_9() {
    let (h, plex) = setup(PlexOptions::default()).await;
    let daemon = h.start_daemon().await;
    let reply: ConnectReply = h.client().post(&format!("{PATH}/connect"), None).await.unwrap();
    let code = reply.user_code().unwrap().to_owned();
    plex.log().wait_for_calls_prefix("/api/v2/pins/", 1).await;
    daemon.kill9().await;

    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let view = state(&h).await;
    assert_eq!(view.state, StateName::Pending);
    assert_eq!(view.pending.unwrap().user_code.as_deref(), Some(code.as_str()));
    assert!(plex.approve(&code));
    wait_for(&mut events, "plex", Cause::Approved).await;
    assert_eq!(plex.log().calls_to("/api/v2/pins").len(), 1, "no second PIN was asked for");
    daemon.stop().await;
}
