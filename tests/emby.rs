//! Emby through the real binary and socket, against its emulator: a password login (used once,
//! kept nowhere; empty for a user without one), a server that answers only under `/emby`, a
//! revoked token that expires and a new login that reconnects, logout on disconnect, a DeviceId
//! that stays the profile's, failures that change nothing, and no token in the log.

mod common;

use authkeeper_fixtures::emby::{EmbyEmulator, EmbyOptions, Prefixes};
use authkeeper_state::StateName;
use common::trackers::{Conn, assert_no_leaks, failures_keep_state, harness};
use common::*;
use serde_json::{Value, json};

const LOGIN: &str = "/Users/AuthenticateByName";

/// An Emby emulator, and a harness whose `emby` block names it as the `server`.
async fn setup(opts: EmbyOptions) -> (Harness, EmbyEmulator) {
    let emu = EmbyEmulator::start(opts).await.unwrap();
    let h = harness(json!({"emby": {"server": emu.url()}})).await;
    (h, emu)
}

fn login(password: &str) -> Value {
    json!({"flow": "password", "username": "sean", "password": password})
}

/// The default user's password.
fn password() -> String {
    EmbyOptions::default().password
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_login_connects_and_the_password_is_kept_nowhere() {
    let password = "unique-emby-pw-4c1d9e07-do-not-store";
    let (h, emu) = setup(EmbyOptions { password: password.into(), ..EmbyOptions::default() }).await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "emby", "default");
    assert_eq!(conn.view().await.state, StateName::Disconnected);

    // A wrong password: refused with a clear message, nothing changes.
    let (status, body) = api_error(conn.connect(login("nope")).await.unwrap_err());
    assert_eq!((status, body["error"].as_str()), (401, Some("rejected")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("refused the username or password"), "{body}");
    assert_eq!(conn.view().await.state, StateName::Disconnected);
    assert!(conn.causes().await.is_empty());

    // The right one: connected through pending (validating), as the user.
    let reply = conn.connect(login(password)).await.unwrap();
    assert!(reply.pending.is_none());
    let view = conn.view().await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));
    assert_eq!(view.facts["user_id"], emu.user_id());
    assert_eq!(conn.causes().await, ["credentials_supplied", "validated"]);

    // A consumer gets what it needs to call the server.
    let token: Value = conn.token().await.unwrap();
    let access = token["access_token"].as_str().unwrap().to_owned();
    assert_eq!(emu.live_tokens(), std::slice::from_ref(&access));
    assert_eq!(token["server_url"], emu.url());
    assert_eq!(token["user_id"], emu.user_id());
    let device_id = token["device_id"].as_str().unwrap().to_owned();
    assert_eq!(emu.device_ids_seen(), std::slice::from_ref(&device_id), "the DeviceId the server saw");
    assert_eq!(token["authorization"], json!({"header": "X-Emby-Token", "value": access}));
    daemon.stop().await;

    // The password is in none of the database, the config or the log.
    let db = std::fs::read(h.state_dir().join("authkeeper.redb")).unwrap();
    assert!(!db.windows(password.len()).any(|w| w == password.as_bytes()), "the password is not in the database");
    assert!(!std::fs::read_to_string(h.config_path()).unwrap().contains(password), "nor in the config");
    assert!(!h.log().contains(password), "nor in the log");
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_a_password_logs_in_with_an_empty_one() {
    let (h, emu) = setup(EmbyOptions { password: String::new(), ..EmbyOptions::default() }).await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "emby", "default");

    // A password is refused for a user who has none…
    let (status, _) = api_error(conn.connect(login("something")).await.unwrap_err());
    assert_eq!(status, 401);
    // …and an empty one logs in.
    conn.connect(login("")).await.unwrap();
    let view = conn.view().await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));
    assert_eq!(conn.token().await.unwrap()["access_token"], emu.live_tokens()[0]);
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_behind_an_emby_prefix_is_found_there_and_kept() {
    let (h, emu) = setup(EmbyOptions { prefixes: Prefixes::EmbyOnly, ..EmbyOptions::default() }).await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "emby", "default");

    // The bare origin answers 404; the login is tried again under /emby.
    conn.connect(login(&password())).await.unwrap();
    let view = conn.view().await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));
    let statuses = |path: &str| emu.log().calls_to(path).iter().map(|c| c.status).collect::<Vec<_>>();
    assert_eq!(statuses(LOGIN), [404]);
    assert_eq!(statuses(&format!("/emby{LOGIN}")), [200]);
    let token: Value = conn.token().await.unwrap();
    let server_url = token["server_url"].as_str().unwrap();
    assert!(server_url.ends_with("/emby"), "{server_url}");
    assert_eq!(server_url, format!("{}/emby", emu.url()));

    // Later calls go there straight away.
    assert_eq!(conn.validate().await.state, StateName::Connected);
    let user = format!("/Users/{}", emu.user_id());
    let checks = statuses(&format!("/emby{user}"));
    assert!(!checks.is_empty() && checks.iter().all(|s| *s == 200), "{checks:?}");
    assert!(statuses(&user).is_empty(), "nothing is asked at the bare path");
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_expires_a_new_login_reconnects_and_disconnect_logs_out() {
    let (h, emu) = setup(EmbyOptions::default()).await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "emby", "default");
    conn.connect(login(&password())).await.unwrap();
    let first = conn.token().await.unwrap()["access_token"].as_str().unwrap().to_owned();

    // The device is removed on the server: the token is rejected (401) → expired.
    emu.revoke_all();
    assert_eq!(conn.validate().await.state, StateName::Expired);
    let detail = conn.last_detail().await;
    assert!(detail.contains("401"), "{detail}");
    let (status, body) = api_error(conn.token().await.unwrap_err());
    assert_eq!((status, body["error"].as_str()), (409, Some("not_connected")));

    // And back with the password.
    conn.connect(login(&password())).await.unwrap();
    assert_eq!(conn.view().await.state, StateName::Connected);
    let second = conn.token().await.unwrap()["access_token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    assert_eq!(emu.live_tokens(), std::slice::from_ref(&second));

    // Disconnect logs the session out on the server: the token is dead there.
    assert_eq!(conn.disconnect().await.state, StateName::Disconnected);
    let logouts = emu.log().calls_to("/Sessions/Logout");
    assert!(logouts.iter().any(|c| c.method == "POST" && c.status == 204), "{logouts:?}");
    assert!(!emu.live_tokens().contains(&second));
    let (status, _) = api_error(conn.token().await.unwrap_err());
    assert_eq!(status, 409);
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_id_is_the_profiles_across_logins_and_restarts() {
    let emu = EmbyEmulator::start(EmbyOptions::default()).await.unwrap();
    let h = harness(json!({"emby": {"server": emu.url(), "instances": {"EMBY-P01": {}}}})).await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "emby", "default");
    conn.connect(login(&password())).await.unwrap();
    let device_id = conn.token().await.unwrap()["device_id"].as_str().unwrap().to_owned();
    conn.disconnect().await;
    conn.connect(login(&password())).await.unwrap();
    daemon.stop().await;

    let daemon = h.start_daemon().await;
    assert_eq!(conn.view().await.state, StateName::Connected);
    conn.disconnect().await;
    conn.connect(login(&password())).await.unwrap();
    assert_eq!(conn.token().await.unwrap()["device_id"], device_id);
    assert_eq!(emu.device_ids_seen(), [device_id.clone(), device_id.clone(), device_id.clone()]);
    let header = format!("DeviceId=\"{device_id}\"");
    assert!(emu.authorization_headers().iter().all(|a| a.contains(&header)), "{:?}", emu.authorization_headers());

    // Another profile is another device.
    let other = Conn::new(&h, "emby", "EMBY-P01");
    other.connect(login(&password())).await.unwrap();
    let other_id = other.token().await.unwrap()["device_id"].as_str().unwrap().to_owned();
    assert_ne!(other_id, device_id);
    assert_eq!(emu.device_ids_seen().last(), Some(&other_id));
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_on_the_user_check_leave_the_connection_connected() {
    let (h, emu) = setup(EmbyOptions::default()).await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "emby", "default");
    conn.connect(login(&password())).await.unwrap();
    assert_eq!(conn.view().await.state, StateName::Connected);
    // The validating call is GET {server}/Users/{id}; the prefix hits it and nothing else.
    let user = format!("/Users/{}", emu.user_id());
    let checks = emu.log().calls_to(&user).len();
    assert!(checks >= 1, "the login was checked at {user}");
    failures_keep_state(&conn, emu.log(), &user).await;
    assert_eq!(conn.view().await.account.as_deref(), Some("sean"));
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}
