//! No secret in anything the daemon shows: its log, status, history, events, the error bodies
//! of bad requests that carry one, and the `Debug` output of its types (config blocks of every
//! provider included). The daemon installs no panic hook of its own; the standard one prints a
//! panic's message, and messages are built from these same redacted types.

mod common;

use authkeeper_fixtures::{JellyfinEmulator, JellyfinOptions};
use common::trackers::{Conn, assert_no_leaks};
use common::*;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};

const PASSWORD: &str = "pw-5a1c9e77-never-shown";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_status_history_events_or_error_bodies() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let jellyfin =
        JellyfinEmulator::start(JellyfinOptions { password: PASSWORD.into(), ..Default::default() }).await.unwrap();
    let mut config: Value = serde_json::from_slice(&std::fs::read(h.config_path()).unwrap()).unwrap();
    config["jellyfin"] = json!({"server": jellyfin.url()});
    std::fs::write(h.config_path(), config.to_string()).unwrap();
    let daemon = h.start_daemon().await;

    // Every event line, as a subscriber sees it.
    let seen = Arc::new(Mutex::new(String::new()));
    let mut events = h.client().events().await.unwrap();
    let lines = seen.clone();
    tokio::spawn(async move {
        while let Some(Ok(line)) = events.next_line().await {
            lines.lock().unwrap().push_str(&line);
        }
    });

    // Trakt: a device login and a refresh (the refresh token rotates).
    connect_approved(&h).await;
    let trakt = Conn::new(&h, "trakt", "default");
    let _: Value = h.client().post(&format!("{}/refresh", trakt.path), None).await.unwrap();
    // Jellyfin: a wrong password, then the right one.
    let jf = Conn::new(&h, "jellyfin", "default");
    let wrong = json!({"flow": "password", "username": "sean", "password": "wrong-pw-0b2e"});
    let mut shown = format!("{:?}", jf.connect(wrong).await.unwrap_err());
    let right = json!({"flow": "password", "username": "sean", "password": PASSWORD});
    jf.connect(right).await.unwrap();

    // Bad requests that carry a secret: each refused, none echoing it.
    let secret = h.emulator.issued_tokens()[0].clone();
    let bodies = [
        json!({"flow": "device_pin", "client_secret": secret}).to_string(),
        json!({"flow": secret, "password": PASSWORD}).to_string(),
        json!({"flow": "password", "username": "sean", "password": {"nested": PASSWORD}}).to_string(),
        json!({"flow": "password", "username": 5, "password": PASSWORD}).to_string(),
        format!(r#"{{"flow": "password", "password": "{PASSWORD}""#),
        format!(r#"{{"flow": "password", "password": "{PASSWORD}", "pad": "{}"}}"#, "x".repeat(70_000)),
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let conn = if i == 0 { &trakt } else { &jf };
        let http = reqwest::Client::builder().unix_socket(h.socket()).build().unwrap();
        let url = format!("http://localhost{}/connect", conn.path);
        let resp = http.post(url).body(body).send().await.unwrap();
        assert!(resp.status().is_client_error(), "request {i} is refused: {}", resp.status());
        shown += &resp.text().await.unwrap();
    }

    // Everything a user or a script can see.
    let client = h.client();
    for path in ["/v1/connections", "/v1/health", "/v1/providers"] {
        shown += &client.get::<Value>(path).await.unwrap().to_string();
    }
    for conn in [&trakt, &jf] {
        shown += &client.get::<Value>(&format!("{}/history", conn.path)).await.unwrap().to_string();
        shown += &format!("{:?}", conn.view().await);
    }
    shown += &h.cli(&["status", "--json"]).await.1;
    shown += &h.cli(&["history", "jellyfin", "--json"]).await.1;
    daemon.stop().await;
    shown += &seen.lock().unwrap();
    shown += &h.log();

    let mut secrets = h.emulator.issued_tokens();
    secrets.extend(jellyfin.issued_tokens());
    secrets.extend(["emulator-client-secret".to_owned(), PASSWORD.to_owned(), "wrong-pw-0b2e".to_owned()]);
    assert!(secrets.len() > 5, "{secrets:?}");
    for secret in &secrets {
        assert!(!shown.contains(secret.as_str()), "a secret is shown ({} chars)", secret.len());
    }
    assert_no_leaks(&h, &secrets);
}

#[test]
fn no_secret_in_the_debug_output_of_any_providers_config_block_or_a_grant() {
    let secrets = [
        "trakt-cs-1",
        "trakt-at-2",
        "trakt-rt-3",
        "plex-at-4",
        "plex-pms-5",
        "jf-at-6",
        "emby-at-7",
        "simkl-cs-8",
        "simkl-at-9",
        "anilist-cs-10",
        "anilist-at-11",
        "mdb-key-12",
        "taut-key-13",
        "tmdb-key-14",
        "tmdb-sess-15",
        "oauth-cs-16",
        "oauth-at-17",
        "oauth-rt-18",
        "tmdb-v4-19",
    ];
    let text = json!({
        "trakt": {"client_id": "c", "client_secret": secrets[0], "access_token": secrets[1], "refresh_token": secrets[2],
                  "instances": {"TRAKT-P01": {"client_secret": secrets[0], "access_token": secrets[1]}}},
        "plex": {"account_token": secrets[3], "pms_token": secrets[4]},
        "jellyfin": {"server": "http://127.0.0.1:1", "access_token": secrets[5]},
        "emby": {"server": "http://127.0.0.1:1", "access_token": secrets[6]},
        "simkl": {"client_id": "c", "client_secret": secrets[7], "access_token": secrets[8]},
        "anilist": {"client_id": "c", "client_secret": secrets[9], "access_token": secrets[10]},
        "mdblist": {"api_key": secrets[11]},
        "tautulli": {"server_url": "http://127.0.0.1:1", "api_key": secrets[12]},
        "tmdb_sync": {"api_key": secrets[13], "session_id": secrets[14], "access_token": secrets[18]},
        "oauth": {"instances": {"home": {"issuer": "https://id.example", "client_id": "c", "client_secret": secrets[15],
                  "access_token": secrets[16], "refresh_token": secrets[17]}}},
    })
    .to_string();
    let config = authkeeper::config::Config::parse(&text).unwrap();
    let mut shown = format!("{config:?}");
    for (key, profile) in &config.profiles {
        shown += &format!("{key:?} {profile:?}");
        if let Some(grant) = profile.provider.import(profile, chrono::Utc::now()) {
            shown += &format!("{grant:?}");
        }
    }
    assert!(shown.contains("trakt") && shown.contains("tmdb"), "{shown}");
    for secret in secrets {
        assert!(!shown.contains(secret), "{secret} in Debug output");
    }
}
