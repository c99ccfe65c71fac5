//! The control socket at its boundaries: bad input gets a clear error, files are private, and
//! an ordinary HTTP client works.

mod common;

use authkeeper::wire::ConnectReply;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let daemon = h.start_daemon().await;
    let sock = h.socket();
    let client = h.client();

    let (status, body) = raw(&sock, Method::GET, "/v1/connections/netflix/default", "").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("unknown_provider")));
    let (status, body) = raw(&sock, Method::POST, "/v1/connections/netflix/default/connect", "").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("unknown_provider")));
    let (status, body) = raw(&sock, Method::GET, "/v1/connections/trakt/TRAKT-P09", "").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("unknown_profile")));
    let (status, body) = raw(&sock, Method::GET, "/v2/nothing", "").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    // Found by the socket_request fuzz target: axum's own refusals came with an empty or
    // plain-text body; they are the API's JSON errors too.
    let (status, body) = raw(&sock, Method::PUT, "/v1/connections/trakt/default/connect", "").await;
    assert_eq!((status, body["error"].as_str()), (405, Some("method_not_allowed")));
    let (status, body) = raw(&sock, Method::GET, "/v1/connections/trakt/%FF%FE", "").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");

    let (status, body) = raw(&sock, Method::POST, "/v1/connections/trakt/default/connect", "{\"flow\": ").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    assert!(body["message"].as_str().unwrap().contains("not valid JSON"), "{body}");
    let (status, body) =
        raw(&sock, Method::POST, "/v1/connections/trakt/default/connect", r#"{"flow": "carrier_pigeon"}"#).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    assert!(body["message"].as_str().unwrap().contains("device_pin"), "names the flows that exist: {body}");
    assert_eq!(h.emulator.device_codes_issued(), 0, "nothing reached the provider");

    let (status, body) = raw(&sock, Method::GET, "/v1/connections/trakt/default/token", "").await;
    assert_eq!(
        (status, body["error"].as_str(), body["state"].as_str()),
        (409, Some("not_connected"), Some("disconnected"))
    );
    let (status, body) = raw(&sock, Method::POST, "/v1/connections/trakt/default/cancel", "").await;
    assert_eq!((status, body["error"].as_str()), (409, Some("conflict")));

    let first: ConnectReply = client.post("/v1/connections/trakt/default/connect", None).await.unwrap();
    let (status, body) =
        api_error(client.post::<Value>("/v1/connections/trakt/default/connect", None).await.unwrap_err());
    assert_eq!((status, body["error"].as_str()), (409, Some("conflict")));
    assert_eq!(h.emulator.device_codes_issued(), 1, "the second connect asked the provider for nothing");
    let view: Value = client.get("/v1/connections/trakt/default").await.unwrap();
    assert_eq!(view["pending"]["user_code"], first.user_code().unwrap(), "the pending flow is untouched");

    let (code, _, err) = h.cli(&["token", "netflix"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no provider named \"netflix\""), "{err}");
    let (code, _, err) = h.cli(&["frobnicate"]).await;
    assert_eq!(code, 2, "usage errors exit 2: {err}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_works_and_the_socket_and_database_are_private() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let daemon = h.start_daemon().await;
    assert_eq!(mode(&h.socket()), 0o600, "socket");
    assert_eq!(mode(h.socket().parent().unwrap()), 0o700, "the socket directory the daemon made");
    assert_eq!(mode(&h.state_dir().join("authkeeper.redb")), 0o600, "database");

    let out = tokio::process::Command::new("curl")
        .args(["--silent", "--fail", "--unix-socket"])
        .arg(h.socket())
        .arg("http://localhost/v1/connections")
        .output()
        .await
        .expect("curl is installed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let trakt = list.iter().find(|c| c["provider"] == "trakt").expect("trakt/default is listed");
    assert_eq!(trakt["profile"], "default");
    assert_eq!(trakt["state"], "disconnected");
    for field in ["since", "expires_at", "validated_at", "account", "last_error", "next_attempt_at", "warnings"] {
        assert!(trakt.get(field).is_some(), "connection has {field}");
    }

    let providers: Value = h.client().get("/v1/providers").await.unwrap();
    assert_eq!(providers[0]["name"], "trakt");
    assert_eq!(providers[0]["flows"][0]["flow"], "device_pin");

    // `authkeeper providers`: every provider, each flow with the fields it asks for.
    let (code, out, _) = h.cli(&["providers"]).await;
    assert_eq!(code, 0);
    for line in [
        "trakt      Trakt      device_pin; oauth_code",
        "plex       Plex       device_pin",
        "jellyfin   Jellyfin   quick_connect; password (username, password*)",
        "emby       Emby       password (username, password*)",
        "simkl      Simkl      device_pin; oauth_code",
        "anilist    AniList    oauth_code; token (access_token*)",
        "mdblist    MDBList    api_key (api_key*); device_pin",
        "tautulli   Tautulli   api_key (api_key*, server_url)",
        "tmdb       TMDB       api_key (api_key*); request_token (api_key*)",
    ] {
        assert!(out.lines().any(|l| l.starts_with(line)), "{line:?} in\n{out}");
    }

    // A second daemon on the same socket refuses to start and leaves the first one alone.
    let (code, _, err) = h.cli(&["daemon"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("already") || err.contains("another authkeeper"), "{err}");
    let health: Value = h.client().get("/v1/health").await.unwrap();
    assert_eq!(health["ok"], true);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_is_reported_with_its_position_and_the_daemon_still_answers() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    std::fs::write(h.config_path(), "{\n  \"trakt\": {\"client_id\": 42}\n}\n").unwrap();
    let daemon = h.start_daemon().await;
    let health: Value = h.client().get("/v1/health").await.unwrap();
    assert_eq!(health["ok"], true);
    assert_eq!(health["config"]["ok"], false);
    assert_eq!(health["config"]["line"], 2);
    assert!(health["config"]["error"].as_str().unwrap().contains("invalid type"), "{health}");
    assert!(h.log().contains("config not loaded"), "the log says so too");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_uid_is_refused_even_when_file_modes_would_let_it_in() {
    // Needs root to act as another user (setpriv); CI and these machines run as root.
    let is_root = std::process::Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    if !is_root {
        eprintln!("skipped: acting as another uid needs root");
        return;
    }
    let h = Harness::new(fast_trakt(), json!({})).await;
    let daemon = h.start_daemon().await;
    // Open every path wide so that only the peer-credential check stands in the way.
    for p in [h.dir.path(), h.socket().parent().unwrap()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(h.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "curl", "--silent", "--unix-socket"])
        .arg(h.socket())
        .arg("http://localhost/v1/connections")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "nobody got an answer: {}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.is_empty(), "no byte of the API reached the other user");
    // The daemon's own user still gets in.
    let health: Value = h.client().get("/v1/health").await.unwrap();
    assert_eq!(health["ok"], true);
    daemon.stop().await;
    assert!(h.log().contains("refused a control-socket peer with another uid"));
}

/// An idle connection has no task; each command starts one, which ends when its inbox is
/// empty. Commands that race with a task going to sleep are never lost: a burst of them, many
/// arriving just as the previous task ends, each gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_in_a_burst_is_answered_while_tasks_come_and_go() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let daemon = h.start_daemon().await;
    connect_approved(&h).await;
    authkeeper::providers::install_crypto();
    let http = reqwest::Client::builder().unix_socket(h.socket()).build().unwrap();
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..400 {
        let http = http.clone();
        burst.spawn(async move {
            if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
            // Connected: cancel is refused by the connection's owner, with no provider call.
            let resp = http.post("http://localhost/v1/connections/trakt/default/cancel").send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        });
    }
    let mut answers = 0;
    while let Some(answer) = burst.join_next().await {
        let (status, body) = answer.unwrap();
        assert_eq!((status, body["error"].as_str()), (409, Some("conflict")), "{body}");
        answers += 1;
    }
    assert_eq!(answers, 400);
    let view: Value = h.client().get("/v1/connections/trakt/default").await.unwrap();
    assert_eq!(view["state"], "connected");
    let history: Vec<Value> = h.client().get("/v1/connections/trakt/default/history").await.unwrap();
    let causes: Vec<&str> = history.iter().map(|t| t["cause"].as_str().unwrap()).collect();
    assert_eq!(causes, ["connect_requested", "approved", "validated"], "refused commands leave no trace");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_lookup_answers_the_same_however_its_path_is_written() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let daemon = h.start_daemon().await;
    let sock = h.socket();
    connect_approved(&h).await;

    let (status, plain) = raw(&sock, Method::GET, "/v1/connections/trakt/default/token", "").await;
    assert_eq!(status, 200, "{plain}");
    assert!(plain["access_token"].as_str().is_some_and(|t| !t.is_empty()), "{plain}");
    assert_eq!(plain["token_type"], "bearer");
    assert!(plain["expires_at"].is_string() && plain.get("scope").is_some(), "{plain}");
    assert!(plain["account"].is_string(), "{plain}");
    // Plain ids are answered beside the router; escaped ones go through it, to the same answer.
    let (status, escaped) = raw(&sock, Method::GET, "/v1/connections/trakt/%64efault/token", "").await;
    assert_eq!((status, &escaped), (200, &plain));
    let (status, plain) = raw(&sock, Method::GET, "/v1/connections/trakt/discord:42/token", "").await;
    let (status2, escaped) = raw(&sock, Method::GET, "/v1/connections/trakt/discord%3A42/token", "").await;
    assert_eq!((status, plain["error"].as_str()), (409, Some("not_connected")), "{plain}");
    assert!(plain["message"].as_str().is_some_and(|m| m.contains("log in")), "an owner is told how: {plain}");
    assert_eq!((status2, escaped), (status, plain));

    let (status, body) = raw(&sock, Method::POST, "/v1/connections/trakt/default/token", "").await;
    assert_eq!((status, body["error"].as_str()), (405, Some("method_not_allowed")));
    let (status, body) = raw(&sock, Method::GET, "/v1/connections/trakt/default/token/", "").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    for path in ["/v1/connections/netflix/default/token", "/v1/connections//default/token"] {
        let (status, body) = raw(&sock, Method::GET, path, "").await;
        assert_eq!((status, body["error"].as_str()), (404, Some("unknown_provider")), "{path}");
    }
    let (status, body) = raw(&sock, Method::GET, "/v1/connections/trakt/TRAKT-P1/token", "").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    daemon.stop().await;
}
