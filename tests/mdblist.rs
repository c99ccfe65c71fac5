//! MDBList through the real binary and socket, against its emulator: the API key and the
//! device-code login, each from disconnected to connected, through rejection to expired and
//! back; the daily quota in status; rotation on refresh; failures that change nothing.

mod common;

use authkeeper::wire::ConnectReply;
use authkeeper_fixtures::mdblist::{MdblistEmulator, MdblistOptions};
use authkeeper_state::{Cause, StateName};
use common::trackers::{Conn, assert_no_leaks, failures_keep_state, harness};
use common::*;
use serde_json::{Value, json};

async fn setup() -> (Harness, MdblistEmulator) {
    let emu = MdblistEmulator::start(MdblistOptions { interval: 1, ..MdblistOptions::default() }).await.unwrap();
    let config = json!({
        "mdblist": {"client_id": MdblistOptions::default().client_id},
        "authkeeper": {"base_url": {"mdblist": emu.url()}},
    });
    (harness(config).await, emu)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_connects_shows_the_quota_and_is_rejected_once_replaced() {
    let (h, emu) = setup().await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "mdblist", "default");
    assert_eq!(conn.view().await.state, StateName::Disconnected);

    // A wrong key is taken, checked, and refused: expired, with MDBList's reason.
    conn.connect(json!({"flow": "api_key", "api_key": "not-the-key"})).await.unwrap();
    let view = conn.view().await;
    assert_eq!(view.state, StateName::Expired);
    assert!(conn.last_detail().await.contains("rejected the API key (403)"), "{}", conn.last_detail().await);

    // The right key: connected as the key's user, with the day's quota in status.
    let reply = conn.connect(json!({"flow": "api_key", "api_key": emu.api_key()})).await.unwrap();
    assert!(reply.pending.is_none(), "a key needs no step from the user");
    let view = conn.view().await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));
    assert_eq!(view.facts["requests_remaining"], emu.remaining().to_string());
    assert_eq!(view.facts["requests_limit"], "1000");
    let token: Value = conn.token().await.unwrap();
    assert_eq!(
        (token["access_token"].as_str(), token["token_type"].as_str()),
        (Some(emu.api_key().as_str()), Some("api_key"))
    );

    // Each check spends a request, and status follows.
    let before = emu.remaining();
    let view = conn.validate().await;
    assert_eq!(view.facts["requests_remaining"], (before - 1).to_string());

    failures_keep_state(&conn, emu.log(), "/user").await;

    // The user regenerates the key: the old one is rejected → expired; and back.
    emu.revoke_all();
    assert_eq!(conn.validate().await.state, StateName::Expired);
    conn.connect(json!({"flow": "api_key", "api_key": emu.api_key()})).await.unwrap();
    assert_eq!(conn.view().await.state, StateName::Connected);

    // A spent quota is no verdict on the key; MDBList asks for quiet until its daily reset,
    // and the next call is not made before then but answered at once.
    emu.set_remaining(0);
    let view = conn.validate().await;
    assert_eq!(view.state, StateName::Connected);
    assert!(view.last_error.as_deref().unwrap_or_default().contains("quota"), "{:?}", view.last_error);
    let calls = emu.log().calls_to("/user").len();
    let view = conn.validate().await;
    assert_eq!(view.state, StateName::Connected);
    assert!(view.last_error.as_deref().unwrap_or_default().contains("no calls until"), "{:?}", view.last_error);
    assert_eq!(emu.log().calls_to("/user").len(), calls, "no call during the pause");
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_login_connects_refreshes_with_rotation_and_reconnects_after_revocation() {
    let (h, emu) = setup().await;
    let daemon = h.start_daemon().await;
    let client = h.client();
    let mut events = client.events().await.unwrap();
    let conn = Conn::new(&h, "mdblist", "default");

    // Denied by the user → back to disconnected.
    let reply: ConnectReply = conn.connect(json!({"flow": "device_pin"})).await.unwrap();
    assert!(emu.deny(reply.user_code().unwrap()));
    wait_for(&mut events, "mdblist", Cause::Denied).await;
    assert_eq!(conn.view().await.state, StateName::Disconnected);

    let reply = conn.connect(json!({"flow": "device_pin"})).await.unwrap();
    let code = reply.user_code().unwrap().to_owned();
    assert_eq!(reply.connection.state, StateName::Pending);
    assert!(reply.pending.as_ref().unwrap().verification_url.as_deref().unwrap().contains(&code), "the complete URI");
    assert!(emu.approve(&code));
    wait_for(&mut events, "mdblist", Cause::Approved).await;
    wait_for(&mut events, "mdblist", Cause::Validated).await;
    let view = conn.view().await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));
    assert!(view.expires_at.is_some());

    // A refresh rotates the refresh token; the old one is never presented again.
    let (_, first_refresh) = emu.latest_tokens().unwrap();
    let view: authkeeper::wire::ConnectionView = client.post(&format!("{}/refresh", conn.path), None).await.unwrap();
    assert_eq!(view.state, StateName::Connected);
    let (access, second_refresh) = emu.latest_tokens().unwrap();
    assert_ne!(first_refresh, second_refresh);
    assert_eq!(emu.refresh_token_uses(&first_refresh), 1);
    assert_eq!(conn.token().await.unwrap()["access_token"], access);

    // Everything revoked: the token is rejected, so is the refresh → expired; and back.
    emu.revoke_all();
    assert_eq!(conn.validate().await.state, StateName::Expired);
    let reply = conn.connect(json!({"flow": "device_pin"})).await.unwrap();
    assert!(emu.approve(reply.user_code().unwrap()));
    wait_for(&mut events, "mdblist", Cause::Approved).await;
    wait_for(&mut events, "mdblist", Cause::Validated).await;
    assert_eq!(conn.view().await.state, StateName::Connected);

    // Disconnect revokes upstream.
    assert_eq!(conn.disconnect().await.state, StateName::Disconnected);
    assert!(emu.log().calls_to("/oauth/revoke_token/").iter().any(|c| c.status == 200));
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

/// The next `config_written` event.
async fn written(events: &mut authkeeper::client::EventStream) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match events.next().await {
                Some(Ok(authkeeper::wire::WireEvent::ConfigWritten { .. })) => return,
                Some(Ok(_)) => continue,
                other => panic!("events ended: {other:?}"),
            }
        }
    })
    .await
    .expect("the config was written in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_mirrors_the_device_login_and_never_removes_the_users_key() {
    let emu = MdblistEmulator::start(MdblistOptions { interval: 1, ..MdblistOptions::default() }).await.unwrap();
    let config = json!({
        "mdblist": {"client_id": MdblistOptions::default().client_id, "api_key": emu.api_key()},
        "authkeeper": {"base_url": {"mdblist": emu.url()}, "write_back": true},
    });
    let h = harness(config).await;
    // A file that will hold secrets must be the user's alone, or nothing is written into it.
    std::fs::set_permissions(h.config_path(), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let conn = Conn::new(&h, "mdblist", "default");
    assert_eq!(conn.view().await.state, StateName::Connected, "the key in the file connects by itself");
    let file = || -> Value { serde_json::from_slice(&std::fs::read(h.config_path()).unwrap()).unwrap() };

    conn.disconnect().await;
    let reply = conn.connect(json!({"flow": "device_pin"})).await.unwrap();
    assert!(emu.approve(reply.user_code().unwrap()));
    written(&mut events).await;
    let (access, _) = emu.latest_tokens().unwrap();
    let block = &file()["mdblist"];
    assert_eq!(
        (block["access_token"].as_str(), block["auth_method"].as_str()),
        (Some(access.as_str()), Some("device_code"))
    );
    assert_eq!(block["api_key"], emu.api_key(), "the user's key stays");

    conn.disconnect().await;
    written(&mut events).await;
    let block = &file()["mdblist"];
    assert!(block.get("access_token").is_none() && block.get("refresh_token").is_none(), "{block}");
    assert_eq!(block["api_key"], emu.api_key(), "a disconnect never removes the user's key");
    daemon.stop().await;
}
