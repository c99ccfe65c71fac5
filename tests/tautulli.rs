//! Tautulli through the real binary and socket, against its emulator: a key and a server URL,
//! from the connect body or the profile; the verdict follows the envelope, so a wrong key, a
//! disabled API and an unreachable server each read differently.

mod common;

use authkeeper_fixtures::tautulli::{TautulliEmulator, TautulliOptions};
use authkeeper_state::StateName;
use common::trackers::{Conn, assert_no_leaks, failures_keep_state, harness};
use serde_json::{Value, json};

async fn emulator() -> TautulliEmulator {
    let opts = TautulliOptions { http_root: "/tautulli".into(), ..TautulliOptions::default() };
    TautulliEmulator::start(opts).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_the_server_in_the_body_connects_and_a_wrong_key_expires() {
    let emu = emulator().await;
    let h = harness(json!({"tautulli": {}})).await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "tautulli", "default");

    // No server anywhere: a clear error before anything is stored.
    let err = conn.connect(json!({"flow": "api_key", "api_key": emu.api_key()})).await.unwrap_err();
    assert!(err.to_string().contains("server URL"), "{err}");
    assert_eq!(conn.view().await.state, StateName::Disconnected);

    let body = json!({"flow": "api_key", "api_key": emu.api_key(), "server_url": emu.server_url()});
    conn.connect(body).await.unwrap();
    let view = conn.view().await;
    assert_eq!(view.state, StateName::Connected);
    assert_eq!(view.account.as_deref(), Some("Tautulli for Emulated Plex"));
    assert_eq!(view.facts["server_url"], emu.server_url());
    let token: Value = conn.token().await.unwrap();
    assert_eq!(token["access_token"], emu.api_key());
    assert_eq!(
        (token["token_type"].as_str(), token["server_url"].as_str()),
        (Some("api_key"), Some(emu.server_url().as_str()))
    );

    failures_keep_state(&conn, emu.log(), "/tautulli/api/v2").await;

    // The API turned off: no verdict on the key, said plainly, state kept.
    emu.set_api_enabled(false);
    let view = conn.validate().await;
    assert_eq!(view.state, StateName::Connected);
    assert!(view.last_error.as_deref().unwrap().contains("API is not enabled"), "{:?}", view.last_error);
    emu.set_api_enabled(true);

    // A new key on the server: the old one is rejected → expired, with Tautulli's words.
    emu.revoke_all();
    assert_eq!(conn.validate().await.state, StateName::Expired);
    assert!(conn.last_detail().await.contains("Invalid apikey"), "{}", conn.last_detail().await);
    conn.connect(json!({"flow": "api_key", "api_key": emu.api_key(), "server_url": emu.server_url()})).await.unwrap();
    assert_eq!(conn.view().await.state, StateName::Connected);
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_profiles_server_url_is_used_and_an_unreachable_server_changes_nothing() {
    let emu = emulator().await;
    let h = harness(json!({"tautulli": {"server_url": emu.server_url()}})).await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "tautulli", "default");
    conn.connect(json!({"flow": "api_key", "api_key": emu.api_key()})).await.unwrap();
    assert_eq!(conn.view().await.state, StateName::Connected);

    let log = emu.log().clone();
    drop(emu); // the server goes away
    let view = conn.validate().await;
    assert_eq!(view.state, StateName::Connected);
    assert!(view.last_error.as_deref().unwrap().contains("cannot reach"), "{:?}", view.last_error);
    assert!(!log.calls().is_empty());
    daemon.stop().await;
}

/// Found by the provider_answers fuzz target: a 401 (or a 5xx) whose body was a success
/// envelope validated the key. A contradictory answer is no verdict: unknown, with the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_envelope_under_an_error_status_is_no_verdict() {
    use authkeeper::clock::SystemClock;
    use authkeeper::limits::{Gate, Limits};
    use authkeeper::providers::{Profile, Reach, Setup, Verdict, find, http_client};
    use std::sync::Arc;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let envelope = json!({"response": {"result": "success", "message": null, "data": {"version": "2.13"}}});
    let app = axum::Router::new().fallback(move || {
        let body = envelope.to_string();
        async move { (axum::http::StatusCode::UNAUTHORIZED, [("content-type", "application/json")], body) }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let block = json!({"server_url": url, "api_key": "k-1"});
    let limits = Limits { per_second: 1e6, burst: 1000, account_reads: None, account_writes: None };
    let cx = Setup {
        profile: Arc::new(Profile::new(find("tautulli").unwrap(), block.as_object().unwrap().clone(), None).unwrap()),
        state: Arc::default(),
        reach: Arc::new(Reach {
            http: http_client(std::time::Duration::from_secs(2)),
            gate: Arc::new(Gate::new(Arc::new(SystemClock), limits)),
            public_url: Arc::default(),
            metrics: Arc::default(),
        }),
    }
    .bind(&authkeeper_state::ConnKey::new("tautulli", "default"));
    let grant = authkeeper_state::Grant::bearer("k-1", chrono::Utc::now());
    match cx.validate(&grant).await {
        Verdict::Unknown(e) => assert!(e.contains("401"), "{e}"),
        Verdict::Valid(_) => panic!("a 401 validated the key"),
        Verdict::Rejected(e) => panic!("rejected: {e}"),
    }
}
