//! AniList through the real binary and socket, against its emulator: the browser login whose
//! redirect URI must match exactly, the pasted token, rejection ("Invalid token") and
//! reconnection; and, on an injected clock, the warnings ahead of the end of a token that
//! cannot be refreshed, then expiry.

mod common;

use authkeeper::client::Client;
use authkeeper::clock::ManualClock;
use authkeeper::wire::{ConnectionView, WireEvent};
use authkeeper_fixtures::anilist::{AniListEmulator, AniListOptions};
use authkeeper_state::{Cause, StateName};
use chrono::{TimeDelta, TimeZone, Utc};
use common::trackers::{Conn, assert_no_leaks, browse, failures_keep_state, free_port, harness};
use common::*;
use serde_json::json;
use std::sync::Arc;

fn app() -> serde_json::Value {
    let d = AniListOptions::default();
    json!({"client_id": d.client_id, "client_secret": d.client_secret})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_login_needs_the_exact_redirect_uri_and_lasts_a_year() {
    let (listen, public_url) = free_port();
    let redirect = format!("{public_url}/oauth/callback/anilist");
    let emu =
        AniListEmulator::start(AniListOptions { redirect_uri: Some(redirect.clone()), ..AniListOptions::default() })
            .await
            .unwrap();
    let config = json!({"anilist": app(), "authkeeper": {"base_url": {"anilist": emu.url()},
        "web": {"listen": listen, "public_url": public_url}}});
    let h = harness(config).await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "anilist", "default");

    let reply = conn.connect(json!({"flow": "oauth_code"})).await.unwrap();
    let (status, _, page) = browse(reply.pending.unwrap().authorize_url.as_deref().unwrap()).await;
    assert_eq!(status, 200, "{page}");
    let view = conn.view().await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));
    let year = view.expires_at.unwrap() - Utc::now();
    assert!(year > TimeDelta::days(364) && year <= TimeDelta::days(365), "expires_in: a year ({year})");
    assert!(view.warnings.is_empty(), "{:?}", view.warnings);
    assert_eq!(conn.token().await.unwrap()["token_type"], "Bearer");

    failures_keep_state(&conn, emu.log(), "/").await;

    // Rejected: AniList's 400 "Invalid token" → expired, no refresh attempted.
    emu.revoke_all();
    let view = conn.validate().await;
    assert_eq!(view.state, StateName::Expired);
    assert!(conn.last_detail().await.contains("Invalid token"), "{}", conn.last_detail().await);

    // The app's registered redirect URI no longer matches: AniList refuses before any code,
    // and the login stays pending until cancelled; nothing else changes.
    emu.set_registered_redirect_uri(Some("https://elsewhere.example/cb".into()));
    let reply = conn.connect(json!({"flow": "oauth_code"})).await.unwrap();
    let (status, _, _) = browse(reply.pending.unwrap().authorize_url.as_deref().unwrap()).await;
    assert_ne!(status, 200);
    assert_eq!(conn.view().await.state, StateName::Pending);
    h.client().post::<ConnectionView>(&format!("{}/cancel", conn.path), None).await.unwrap();

    // And back, by pasting a token from the pin page.
    let token = emu.issue_token();
    conn.connect(json!({"flow": "token", "access_token": token})).await.unwrap();
    let view = conn.view().await;
    assert_eq!(view.state, StateName::Connected);
    assert!(view.expires_at.is_some(), "a pasted token's end is read from the token itself");

    // A pasted token is rejected like any other once revoked → expired; a new paste, and back.
    emu.revoke_all();
    assert_eq!(conn.validate().await.state, StateName::Expired);
    conn.connect(json!({"flow": "token", "access_token": emu.issue_token()})).await.unwrap();
    assert_eq!(conn.view().await.state, StateName::Connected);
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

/// The next warning on `events` about anilist.
async fn next_warning(events: &mut authkeeper::client::EventStream) -> String {
    loop {
        match tokio::time::timeout(PATIENCE, events.next()).await.expect("a warning in time") {
            Some(Ok(WireEvent::Warning { message, provider: Some(p), .. })) if p == "anilist" => return message,
            Some(Ok(_)) => continue,
            other => panic!("events ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_no_refresh_is_announced_30_7_and_1_days_ahead_then_expires() {
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
    let clock = Arc::new(ManualClock::new(t0));
    let emu = AniListEmulator::start(AniListOptions { token_lifetime: 40 * 86_400, ..AniListOptions::default() })
        .await
        .unwrap();
    let c = clock.clone();
    emu.log().set_clock(Arc::new(move || authkeeper::clock::Clock::now(&*c)));
    let dir = tempfile::tempdir().unwrap();
    let config = json!({"anilist": app(), "authkeeper": {"base_url": {"anilist": emu.url()},
        "validate_every_secs": 86_400 * 365}});
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let paths = authkeeper::config::Paths {
        config: dir.path().join("config.json"),
        state_dir: dir.path().join("state"),
        socket: dir.path().join("s.sock"),
    };
    let running = authkeeper::daemon::start(authkeeper::daemon::Options::new(paths, clock.clone())).await.unwrap();
    let client = Client::new(&running.socket);
    let mut events = client.events().await.unwrap();
    let path = "/v1/connections/anilist/default";

    let token = emu.issue_token(); // lives 40 days from t0
    client
        .post::<serde_json::Value>(&format!("{path}/connect"), Some(json!({"flow": "token", "access_token": token})))
        .await
        .unwrap();
    let view: ConnectionView = client.get(path).await.unwrap();
    assert_eq!(view.state, StateName::Connected);
    assert!(view.warnings.is_empty(), "40 days left: nothing to say yet");

    for (day, left) in [(10, "29 days"), (33, "6 days"), (39, "23 hours")] {
        clock.set(t0 + TimeDelta::days(day) + TimeDelta::hours(1));
        let view: ConnectionView = client.post(&format!("{path}/validate"), None).await.unwrap();
        let message = next_warning(&mut events).await;
        assert!(message.contains(&format!("in {left}")) && message.contains("log in again"), "{message}");
        assert!(view.warnings.iter().any(|w| w.contains("cannot refresh")), "{:?}", view.warnings);
    }
    clock.set(t0 + TimeDelta::days(40) + TimeDelta::seconds(1));
    let (from, to, _) = wait_for(&mut events, "anilist", Cause::ExpiredUnrefreshed).await;
    assert_eq!((from, to), (StateName::Connected, StateName::Expired));
    running.stop().await.unwrap();
}
