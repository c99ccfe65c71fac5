//! `authkeeper emulate PROVIDER`: the real binary serves one emulator in the foreground,
//! prints its origin and config snippet, and answers the provider's protocol and the
//! `/_emulator` scripting API.

use serde_json::{Value, json};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const PATIENCE: Duration = Duration::from_secs(60);

/// Start `authkeeper emulate <args>`; returns the child, its origin and everything it printed
/// up to "Ctrl-C stops it."
async fn emulate(args: &[&str]) -> (Child, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_authkeeper"))
        .arg("emulate")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            printed.push_str(&line);
            printed.push('\n');
            if line.contains("Ctrl-C stops it.") {
                break;
            }
        }
    })
    .await
    .expect("the emulator started in time");
    let origin = printed.split_whitespace().find(|w| w.starts_with("http://127.0.0.1:")).unwrap().to_owned();
    (child, origin, printed)
}

fn http() -> reqwest::Client {
    authkeeper::providers::install_crypto();
    reqwest::Client::new()
}

#[tokio::test]
async fn trakt_prints_its_snippet_and_is_scriptable() {
    let (_child, url, printed) = emulate(&["trakt", "--client-id", "my-app", "--client-secret", "shh"]).await;
    assert!(printed.contains(&format!("\"trakt\": \"{url}\"")), "the base_url snippet:\n{printed}");
    assert!(printed.contains("\"client_id\": \"my-app\""), "{printed}");
    let http = http();
    let code: Value = http
        .post(format!("{url}/oauth/device/code"))
        .json(&json!({"client_id": "my-app"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let user_code = code["user_code"].as_str().unwrap();
    let approve = http.post(format!("{url}/_emulator/approve?code={user_code}")).send().await.unwrap();
    assert_eq!(approve.status(), 200);
    let again = http.post(format!("{url}/_emulator/approve?code=NOPE")).send().await.unwrap();
    assert_eq!(again.status(), 404, "no such code");
    let poll = json!({"code": code["device_code"], "client_id": "my-app", "client_secret": "shh"});
    let token = http.post(format!("{url}/oauth/device/token")).json(&poll).send().await.unwrap();
    assert_eq!(token.status(), 200, "approved through the scripting API");

    // Inject a failure, see it served, see both in the call log.
    let fail = http.post(format!("{url}/_emulator/fail?path=/users/settings&status=503&count=1")).send().await.unwrap();
    assert_eq!(fail.status(), 200);
    let settings = http.get(format!("{url}/users/settings")).send().await.unwrap();
    assert_eq!(settings.status(), 503);
    let calls: Vec<Value> = http.get(format!("{url}/_emulator/calls")).send().await.unwrap().json().await.unwrap();
    let seen: Vec<(&str, u64)> =
        calls.iter().map(|c| (c["path"].as_str().unwrap(), c["status"].as_u64().unwrap())).collect();
    assert_eq!(seen, [("/oauth/device/code", 200), ("/oauth/device/token", 200), ("/users/settings", 503)]);

    // A reset is a TCP RST, not a status: the client's read fails with ECONNRESET.
    let fail = http.post(format!("{url}/_emulator/fail?path=/users/settings&fault=reset")).send().await.unwrap();
    assert_eq!(fail.status(), 200);
    let err = http.get(format!("{url}/users/settings")).send().await.unwrap_err();
    let reset = std::iter::successors(std::error::Error::source(&err), |e| e.source())
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::ConnectionReset);
    assert!(reset, "{err:?}");
    let calls: Vec<Value> = http.get(format!("{url}/_emulator/calls")).send().await.unwrap().json().await.unwrap();
    assert_eq!(calls.last().unwrap()["status"], 0, "nothing was answered");
    let bad = http.post(format!("{url}/_emulator/fail?path=/&fault=teapot")).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("reset, truncated, html, huge or drip"), "{body}");
}

#[tokio::test]
async fn jellyfin_takes_the_given_account() {
    let (_child, url, printed) = emulate(&["jellyfin", "--user", "ana", "--password", "pw1"]).await;
    assert!(printed.contains(&format!("\"server\": \"{url}\"")), "{printed}");
    let http = http();
    let info: Value = http.get(format!("{url}/System/Info/Public")).send().await.unwrap().json().await.unwrap();
    assert_eq!(info["ProductName"], "Jellyfin Server");
    let auth = r#"MediaBrowser Client="test", Device="test", DeviceId="dev-1", Version="1""#;
    let login = http
        .post(format!("{url}/Users/AuthenticateByName"))
        .header("authorization", auth)
        .json(&json!({"Username": "ana", "Pw": "pw1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let body: Value = login.json().await.unwrap();
    assert_eq!(body["User"]["Name"], "ana");
    let revoke = http.post(format!("{url}/_emulator/revoke_all")).send().await.unwrap();
    assert_eq!(revoke.status(), 200);
    let token = body["AccessToken"].as_str().unwrap();
    let me = http.get(format!("{url}/Users/Me")).header("authorization", format!("{auth}, Token=\"{token}\"")).send();
    assert_eq!(me.await.unwrap().status(), 401, "revoked by the scripting API");
}

#[tokio::test]
async fn plex_answers_xml_unless_asked_for_json() {
    let (_child, url, printed) = emulate(&["plex"]).await;
    assert!(printed.contains(&format!("\"plex\": \"{url}\"")), "{printed}");
    let http = http();
    let xml = http.post(format!("{url}/api/v2/pins?strong=true")).header("x-plex-client-identifier", "c1");
    let xml = xml.send().await.unwrap().text().await.unwrap();
    assert!(xml.starts_with("<?xml") && xml.contains("<pin "), "{xml}");
    let json: Value = http
        .post(format!("{url}/api/v2/pins?strong=true"))
        .header("x-plex-client-identifier", "c1")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(json["code"].as_str().unwrap().len() >= 20 && json["authToken"].is_null());
}

#[tokio::test]
async fn an_unknown_provider_is_refused_with_the_list() {
    let out = Command::new(env!("CARGO_BIN_EXE_authkeeper")).args(["emulate", "netflix"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no emulator named \"netflix\""), "{err}");
    for (name, _) in authkeeper_fixtures::EMULATORS {
        assert!(err.contains(name), "the list names {name}: {err}");
    }
}
