//! Security checks on the real binary: peers with another uid are refused, files are private,
//! requests are held to size and time limits on both listeners, ids cannot escape, and plain
//! `http` to a public host is refused unless allowed. (Secrets in output: `tests/leaks.rs`.)

mod common;

use authkeeper::wire::WireEvent;
use authkeeper_fixtures::oauth::{OauthEmulator, OauthOptions};
use common::trackers::{Conn, free_port, harness};
use common::*;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `nobody`.
const NOBODY: u32 = 65534;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `authkeeper status` run as `uid`; (exit code, stdout, stderr).
fn status_as(h: &Harness, uid: u32) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_authkeeper"))
        .arg("status")
        .args(["--socket".into(), h.socket().display().to_string(), "--config".into(), "/nonexistent".into()])
        .args(["--state-dir", "/nonexistent"])
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_uid_is_refused_even_when_the_file_lets_it_connect() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let daemon = h.start_daemon().await;
    assert_eq!(status_as(&h, 0).0, 0, "root (the daemon's uid) is served");

    // As the daemon left it, nobody cannot even reach the socket.
    let (code, out, err) = status_as(&h, NOBODY);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.contains("not running"), "{err}");
    assert!(!h.log().contains("refused a control-socket peer"), "the file mode stopped it first");

    // Open the path and the file to everyone: the peer check still refuses nobody.
    chmod(h.dir.path(), 0o711);
    chmod(&h.dir.path().join("run"), 0o711);
    chmod(&h.socket(), 0o666);
    let (code, out, err) = status_as(&h, NOBODY);
    assert_eq!((code, out.as_str()), (1, ""), "no answer for another uid: {err}");
    assert!(!out.contains("trakt"), "{out}");
    assert_eq!(status_as(&h, 0).0, 0, "and root still is served");
    daemon.stop().await; // the whole log is written once it has stopped
    let log = h.log();
    assert!(log.contains("refused a control-socket peer with another uid"), "{log}");
    assert!(log.contains(&format!("Some({NOBODY})")), "the log names its uid: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_its_directory_the_database_and_new_configs_are_private() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    chmod(&h.config_path(), 0o644);
    let daemon = h.start_daemon().await;
    assert_eq!(mode(&h.socket()), 0o600, "the socket");
    assert_eq!(mode(h.socket().parent().unwrap()), 0o700, "the directory the daemon made for it");
    assert_eq!(mode(&h.state_dir()), 0o700, "the state directory");
    assert_eq!(mode(&h.state_dir().join("authkeeper.redb")), 0o600, "the database");

    // An existing config keeps its mode when the daemon edits it; a new one is 0600.
    let added: Value = h.client().post("/v1/providers/trakt/profiles", None).await.unwrap();
    assert_eq!(added["profile"], "TRAKT-P01");
    assert_eq!(mode(&h.config_path()), 0o644, "an edited file keeps its mode");
    daemon.stop().await;

    // A first start with no config file: the file the daemon writes is 0600.
    let h = Harness::new(fast_trakt(), json!({})).await;
    std::fs::remove_file(h.config_path()).unwrap();
    let daemon = h.start_daemon().await;
    let added: Value = h.client().post("/v1/providers/trakt/profiles", None).await.unwrap();
    assert_eq!(added["profile"], "TRAKT-P01");
    assert_eq!(mode(&h.config_path()), 0o600, "a file the daemon creates is 0600");
    daemon.stop().await;
}

/// A raw HTTP/1.1 exchange on a unix socket or TCP: write `request`, read until the peer
/// closes (or `PATIENCE`); what came back.
async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, parts: &[&[u8]]) -> String {
    for part in parts {
        if s.write_all(part).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let read = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await.expect("the server ends it in time");
    let _ = read;
    String::from_utf8_lossy(&out).into_owned()
}

/// A client that sends part of a request and then nothing: cut off by the server, with no
/// sleep here (the read waits for the server to close).
async fn stalled_unix(h: &Harness, part: &str) -> (String, std::time::Duration) {
    let t = std::time::Instant::now();
    let s = tokio::net::UnixStream::connect(h.socket()).await.unwrap();
    (exchange(s, &[part.as_bytes()]).await, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_size_and_time_limits_hold_on_the_socket() {
    let h = Harness::new(fast_trakt(), json!({"request_timeout_secs": 1})).await;
    let daemon = h.start_daemon().await;
    let before: Value = h.client().get("/v1/connections/trakt/default").await.unwrap();

    // A body over the limit: 413 in the API's shape, and the connect never happened.
    let big = format!(r#"{{"flow": "device_pin", "pad": "{}"}}"#, "x".repeat(authkeeper::serve::MAX_BODY));
    let (status, body) = raw_owned(&h.socket(), "/v1/connections/trakt/default/connect", big).await;
    assert_eq!((status, body["error"].as_str()), (413, Some("payload_too_large")), "{body}");
    let after: Value = h.client().get("/v1/connections/trakt/default").await.unwrap();
    assert_eq!(after["state"], before["state"], "nothing was kept");
    assert_eq!(h.emulator.device_codes_issued(), 0, "nor sent");

    // Headers at a drip that never end: the connection is closed after the limit.
    let (answer, took) = stalled_unix(&h, "GET /v1/health HTTP/1.1\r\nHost: x\r\n").await;
    assert!(!answer.contains("200 OK"), "{answer}");
    assert!(took < std::time::Duration::from_secs(5), "cut off after about 1 s, took {took:?}");

    // On a kept-alive connection every head has the limit again: two requests are answered,
    // the third's headers never end, and the connection is closed. One left idle after an
    // answer is closed after the limit too.
    let health = "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n";
    let (answer, took) = stalled_unix(&h, &format!("{health}{health}GET /v1/health HTTP/1.1\r\nHost")).await;
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    assert!(took < std::time::Duration::from_secs(5), "cut off after about 1 s, took {took:?}");
    let (answer, took) = stalled_unix(&h, health).await;
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 1, "{answer}");
    assert!(took < std::time::Duration::from_secs(5), "closed after about 1 s, took {took:?}");

    // A body that never finishes: 408, and again nothing happened.
    let head = "POST /v1/connections/trakt/default/connect HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"fl";
    let (answer, took) = stalled_unix(&h, head).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    assert_eq!(h.emulator.device_codes_issued(), 0);

    // A malformed path is refused in the API's shape too.
    let (status, body) = raw_http(&h, "GET", "/v1/connections/trakt/%ff/token").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")), "{body}");
    daemon.stop().await;
}

/// POST `body` (owned) over the socket.
async fn raw_owned(socket: &std::path::Path, path: &str, body: String) -> (u16, Value) {
    authkeeper::providers::install_crypto();
    let http = reqwest::Client::builder().unix_socket(socket).build().unwrap();
    let resp = http.post(format!("http://localhost{path}")).body(body).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_size_and_time_limits_hold_on_the_web_listener() {
    let (listen, public_url) = free_port();
    let h = harness(json!({"authkeeper": {"web": {"listen": listen, "public_url": public_url},
                                          "request_timeout_secs": 1}}))
    .await;
    let daemon = h.start_daemon().await;
    let big = "x".repeat(authkeeper::serve::MAX_BODY + 1);
    authkeeper::providers::install_crypto();
    let resp = reqwest::Client::new().post(format!("{public_url}/login/open")).body(big).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 413);

    let t = std::time::Instant::now();
    let s = tokio::net::TcpStream::connect(&listen).await.unwrap();
    let answer = exchange(s, &[b"GET /oauth/callback/trakt?state=x HTTP/1.1\r\nHo"]).await;
    assert!(!answer.contains("400"), "{answer}");
    assert!(t.elapsed() < std::time::Duration::from_secs(5), "cut off after the limit: {:?}", t.elapsed());

    let s = tokio::net::TcpStream::connect(&listen).await.unwrap();
    let answer = exchange(s, &[b"POST /login/open HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\ntoken="]).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_and_owner_ids_cannot_escape() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let daemon = h.start_daemon().await;
    let config = std::fs::read(h.config_path()).unwrap();
    let files = |dir: &std::path::Path| {
        let mut names: Vec<_> = walk(dir);
        names.sort();
        names
    };
    let before = files(h.dir.path());
    let long = "A".repeat(5000);
    let bad = [
        "..",
        "%2e%2e",
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2fstate",
        "TRAKT-P01%00",
        "discord:1%00",
        "discord:..%2F..",
        ".hidden:1",
        "x%0Ay",
        "%C3%A9t%C3%A9",
        long.as_str(),
    ];
    for id in bad {
        for (method, path) in [
            (reqwest::Method::GET, format!("/v1/connections/trakt/{id}")),
            (reqwest::Method::GET, format!("/v1/connections/trakt/{id}/token")),
            (reqwest::Method::POST, format!("/v1/connections/trakt/{id}/connect")),
            (reqwest::Method::GET, format!("/v1/connections/trakt/{id}/history")),
            (reqwest::Method::DELETE, format!("/v1/providers/trakt/profiles/{id}")),
        ] {
            let (status, body) = raw_http(&h, method.as_str(), &path).await;
            let shown = &path[..path.len().min(80)];
            assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")), "{method} {shown}: {body}");
            let message = body["message"].as_str().unwrap();
            assert!(message.len() < 400, "the id is not echoed whole: {}", message.len());
        }
    }
    for owner in ["../../etc", "discord:\u{0}", "discord:a/b", &format!("discord:{long}"), "no-colon"] {
        let (status, body) = raw_json(&h, "/v1/links", json!({"provider": "trakt", "owner": owner})).await;
        assert_eq!(status, 400, "{body}");
    }
    let (status, body) = raw_json(&h, "/v1/links", json!({"provider": "trakt", "profile": "../x"})).await;
    assert_eq!(status, 400, "{body}");

    let list: Vec<Value> = h.client().get("/v1/connections").await.unwrap();
    assert!(list.iter().all(|c| c["provider"] != "trakt" || c["profile"] == "default"), "nothing in the store");
    assert_eq!(std::fs::read(h.config_path()).unwrap(), config, "nothing in the config");
    assert_eq!(files(h.dir.path()), before, "nothing on disk");
    daemon.stop().await;
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        // The log grows and redb may add its own files; names are what matter.
        out.push(path.display().to_string());
        if path.is_dir() {
            out.extend(walk(&path));
        }
    }
    out
}

/// A request written byte for byte (an HTTP client would normalise `..` and `%2e%2e`); the
/// status and JSON body of the answer.
async fn raw_http(h: &Harness, method: &str, path: &str) -> (u16, Value) {
    let s = tokio::net::UnixStream::connect(h.socket()).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let answer = exchange(s, &[request.as_bytes()]).await;
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn raw_json(h: &Harness, path: &str, body: Value) -> (u16, Value) {
    raw_owned(&h.socket(), path, body.to_string()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_a_public_host_is_refused_unless_allowed() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let daemon = h.start_daemon().await;
    let client = h.client();
    let mut events = client.events().await.unwrap();
    let good = std::fs::read_to_string(h.config_path()).unwrap();
    let mut config: Value = serde_json::from_str(&good).unwrap();

    // Each kind of URL that carries secrets: base_url, a server, an OAuth endpoint.
    let cases = [
        ("authkeeper.base_url.trakt", json!({"authkeeper": {"base_url": {"trakt": "http://api.trakt.example"}}})),
        ("jellyfin.default.server", json!({"jellyfin": {"server": "http://203.0.113.7:8096"}})),
        (
            "oauth.home.token_endpoint",
            json!({"oauth": {"instances": {"home": {"client_id": "c",
            "token_endpoint": "http://auth.example.org/token"}}}}),
        ),
    ];
    for (setting, block) in cases {
        let mut bad = config.clone();
        merge(&mut bad, &block);
        save_by_rename(&h.config_path(), &bad.to_string());
        let error = config_error(&mut events).await;
        assert!(error.contains(setting) && error.contains("allow_insecure_http"), "{error}");
        let health: Value = client.get("/v1/health").await.unwrap();
        assert_eq!(health["config"]["ok"], false, "the last good config stays in force");

        bad["authkeeper"]["allow_insecure_http"] = json!(true);
        save_by_rename(&h.config_path(), &bad.to_string());
        reloaded(&mut events).await;
        save_by_rename(&h.config_path(), &good);
        reloaded(&mut events).await;
    }

    // Home hosts stay fine: private addresses, names with no dot.
    merge(
        &mut config,
        &json!({"jellyfin": {"server": "http://192.168.1.10:8096"}, "emby": {"server": "http://nas:8096"}}),
    );
    save_by_rename(&h.config_path(), &config.to_string());
    reloaded(&mut events).await;

    // A Tautulli server given with a connect is held to the same rule.
    let body = json!({"flow": "api_key", "api_key": "k", "server_url": "http://tautulli.example.net"});
    let err = Conn::new(&h, "tautulli", "default").connect(body).await.unwrap_err();
    let (status, body) = api_error(err);
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("allow_insecure_http"), "{body}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_a_server_publishes_over_plain_http_to_a_public_host_are_refused() {
    let opts = OauthOptions {
        client_secret: Some("published-secret-1234".into()),
        published_origin: Some("http://auth.example.org".into()),
        ..OauthOptions::default()
    };
    let emu = OauthEmulator::start(opts.clone()).await.unwrap();
    let h = harness(json!({"oauth": {"instances": {"home": {"issuer": emu.issuer(), "client_id": opts.client_id,
        "client_secret": "published-secret-1234"}}}}))
    .await;
    let daemon = h.start_daemon().await;
    let err = Conn::new(&h, "oauth", "home").connect(json!({"flow": "device_pin"})).await.unwrap_err();
    let (_, body) = api_error(err);
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("http://auth.example.org/") && message.contains("allow_insecure_http"), "{message}");
    let calls = emu.log().calls();
    assert!(calls.iter().all(|c| c.path.contains("well-known")), "only discovery was asked: {calls:?}");
    daemon.stop().await;
}

fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (into, from) => *into = from.clone(),
    }
}

async fn config_error(events: &mut authkeeper::client::EventStream) -> String {
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(Ok(WireEvent::ConfigError { error, .. })) = events.next().await {
                return error;
            }
        }
    })
    .await
    .expect("a config_error event")
}

async fn reloaded(events: &mut authkeeper::client::EventStream) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match events.next().await {
                Some(Ok(WireEvent::ConfigReloaded { .. })) => return,
                Some(Ok(WireEvent::ConfigError { error, .. })) => panic!("refused: {error}"),
                _ => {}
            }
        }
    })
    .await
    .expect("a config_reloaded event")
}
