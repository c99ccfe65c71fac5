//! Jellyfin through the real binary and socket, against the Jellyfin emulator: Quick Connect
//! and password logins, rejection and reconnection, kill -9 while pending, a DeviceId that
//! stays the profile's, and a password that is found nowhere afterwards.

mod common;

use authkeeper::wire::{ConnectReply, ConnectionView};
use authkeeper_fixtures::{JellyfinEmulator, JellyfinOptions};
use authkeeper_state::{Cause, StateName};
use common::trackers::{Conn, failures_keep_state};
use common::*;
use serde_json::{Value, json};

const PATH: &str = "/v1/connections/jellyfin/default";

/// A harness whose config points `jellyfin` at a Jellyfin emulator.
async fn setup(opts: JellyfinOptions) -> (Harness, JellyfinEmulator) {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let jellyfin = JellyfinEmulator::start(opts).await.unwrap();
    let config = json!({
        "jellyfin": {"server": jellyfin.url(), "verify_ssl": false},
        "authkeeper": {"http_timeout_secs": 5, "backoff_base_secs": 1},
    });
    std::fs::write(h.config_path(), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    (h, jellyfin)
}

async fn state(h: &Harness) -> ConnectionView {
    h.client().get(PATH).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_connect_connects_is_rejected_when_revoked_and_connects_again() {
    let (h, jellyfin) = setup(JellyfinOptions::default()).await;
    let daemon = h.start_daemon().await;
    let client = h.client();
    let mut events = client.events().await.unwrap();
    assert_eq!(state(&h).await.state, StateName::Disconnected);

    // disconnected → pending: the user is shown a six-digit code to enter in a Jellyfin app.
    let reply: ConnectReply =
        client.post(&format!("{PATH}/connect"), Some(json!({"flow": "quick_connect"}))).await.unwrap();
    let code = reply.user_code().unwrap().to_owned();
    assert!(code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()), "{code}");
    assert_eq!(reply.connection.state, StateName::Pending);
    assert_eq!(jellyfin.pending_codes(), std::slice::from_ref(&code));

    // pending → connected once the user approves, then whose token it is.
    assert!(jellyfin.approve(&code));
    wait_for(&mut events, "jellyfin", Cause::Approved).await;
    wait_for(&mut events, "jellyfin", Cause::Validated).await;
    let view = state(&h).await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));
    assert_eq!(view.facts["user_id"], jellyfin.user_id());

    // A consumer gets what it needs to call the server.
    let token: Value = client.get(&format!("{PATH}/token")).await.unwrap();
    let access = token["access_token"].as_str().unwrap().to_owned();
    assert_eq!(token["server_url"], jellyfin.url());
    assert_eq!(token["user_id"], jellyfin.user_id());
    let device_id = token["device_id"].as_str().unwrap().to_owned();
    let header = token["authorization"]["value"].as_str().unwrap();
    assert_eq!(token["authorization"]["header"], "Authorization");
    assert!(header.starts_with("MediaBrowser Client=\"authkeeper\""), "{header}");
    assert!(header.contains(&format!("DeviceId=\"{device_id}\"")) && header.contains(&format!("Token=\"{access}\"")));
    assert!(jellyfin.live_tokens().contains(&access));

    failures_keep_state(&Conn::new(&h, "jellyfin", "default"), jellyfin.log(), "/Users/Me").await;

    // The server forgets every token → the next validation is a rejection → expired.
    jellyfin.revoke_all();
    let view: ConnectionView = client.post(&format!("{PATH}/validate"), None).await.unwrap();
    assert_eq!(view.state, StateName::Expired);
    let (status, body) = api_error(client.get::<Value>(&format!("{PATH}/token")).await.unwrap_err());
    assert_eq!((status, body["error"].as_str()), (409, Some("not_connected")));

    // And back: a new Quick Connect from expired.
    let reply: ConnectReply = client.post(&format!("{PATH}/connect"), Some(json!({}))).await.unwrap();
    assert!(jellyfin.approve(reply.user_code().unwrap()));
    wait_for(&mut events, "jellyfin", Cause::Approved).await;
    wait_for(&mut events, "jellyfin", Cause::Validated).await;
    assert_eq!(state(&h).await.state, StateName::Connected);
    assert_eq!(jellyfin.device_ids_seen(), [device_id.clone(), device_id], "one DeviceId per profile");

    // Disconnect logs the session out on the server.
    let view: ConnectionView = client.post(&format!("{PATH}/disconnect"), None).await.unwrap();
    assert_eq!(view.state, StateName::Disconnected);
    assert!(jellyfin.log().calls_to("/Sessions/Logout").iter().any(|c| c.status == 204));
    assert!(jellyfin.live_tokens().is_empty());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_quick_connect_survives_kill_9() {
    let (h, jellyfin) = setup(JellyfinOptions::default()).await;
    let daemon = h.start_daemon().await;
    let reply: ConnectReply = h.client().post(&format!("{PATH}/connect"), None).await.unwrap();
    let code = reply.user_code().unwrap().to_owned();
    jellyfin.log().wait_for_calls("/QuickConnect/Connect", 1).await;
    daemon.kill9().await;

    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let view = state(&h).await;
    assert_eq!(view.state, StateName::Pending);
    assert_eq!(view.pending.unwrap().user_code.as_deref(), Some(code.as_str()), "the same code is still shown");
    assert!(jellyfin.approve(&code));
    let (from, to, _) = wait_for(&mut events, "jellyfin", Cause::Approved).await;
    assert_eq!((from, to), (StateName::Pending, StateName::Connected));
    assert_eq!(jellyfin.log().calls_to("/QuickConnect/Initiate").len(), 1, "no second request was made");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_login_uses_the_password_once_and_keeps_it_nowhere() {
    let password = "unique-pw-9f3a7c21-do-not-store";
    let (h, jellyfin) = setup(JellyfinOptions { password: password.into(), ..JellyfinOptions::default() }).await;
    let daemon = h.start_daemon().await;

    // A wrong password: refused with a clear message, nothing changes.
    let (code, _, err) = h
        .cli_stdin(
            &["connect", "jellyfin", "--flow", "password", "--stdin"],
            r#"{"username": "sean", "password": "nope"}"#,
        )
        .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("refused the username or password"), "{err}");
    assert_eq!(state(&h).await.state, StateName::Disconnected);

    // The right one, read from standard input: connected through pending (validating).
    let body = format!(r#"{{"username": "sean", "password": "{password}"}}"#);
    let (code, out, err) = h.cli_stdin(&["connect", "jellyfin", "--flow", "password", "--stdin"], &body).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("connected as sean"), "{out}");
    let history: Vec<Value> = h.client().get(&format!("{PATH}/history")).await.unwrap();
    let causes: Vec<&str> = history.iter().map(|t| t["cause"].as_str().unwrap()).collect();
    assert_eq!(causes, ["credentials_supplied", "validated"]);

    // Rejected once the server forgets the token → expired; and back with the password.
    jellyfin.revoke_all();
    let view: ConnectionView = h.client().post(&format!("{PATH}/validate"), None).await.unwrap();
    assert_eq!(view.state, StateName::Expired);
    let (code, out, err) = h.cli_stdin(&["connect", "jellyfin", "--flow", "password", "--stdin"], &body).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(state(&h).await.state, StateName::Connected);

    // A secret on the command line is refused before anything is sent.
    let (code, _, err) = h.cli(&["connect", "jellyfin", "--flow", "password", "--field", "password=x"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("never taken from the command line"), "{err}");
    daemon.stop().await;

    // The password is in none of the database, the config or the log.
    let db = std::fs::read(h.state_dir().join("authkeeper.redb")).unwrap();
    assert!(!db.windows(password.len()).any(|w| w == password.as_bytes()), "the password is not in the database");
    assert!(!std::fs::read_to_string(h.config_path()).unwrap().contains(password));
    assert!(!h.log().contains(password), "the password is not in the log");
    // Nor is any token the emulator issued.
    for token in jellyfin.issued_tokens() {
        assert!(!h.log().contains(&token), "a token leaked into the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_passwords_lock_the_account_and_the_lockout_is_reported() {
    let (h, jellyfin) = setup(JellyfinOptions::default()).await;
    let daemon = h.start_daemon().await;
    let client = h.client();
    let wrong = json!({"flow": "password", "username": "sean", "password": "wrong"});
    for _ in 0..3 {
        let (status, body) =
            api_error(client.post::<Value>(&format!("{PATH}/connect"), Some(wrong.clone())).await.unwrap_err());
        assert_eq!((status, body["error"].as_str()), (401, Some("rejected")));
    }
    assert!(jellyfin.is_locked_out());
    let right = json!({"flow": "password", "username": "sean", "password": JellyfinOptions::default().password});
    let (status, body) = api_error(client.post::<Value>(&format!("{PATH}/connect"), Some(right)).await.unwrap_err());
    assert_eq!(status, 401);
    assert!(body["message"].as_str().unwrap().contains("locked"), "{body}");
    assert_eq!(state(&h).await.state, StateName::Disconnected);
    daemon.stop().await;
}
