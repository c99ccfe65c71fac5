//! Hooks: a command told of every transition, and a signed webhook that gets every transition
//! exactly once (by event id) although it fails its first tries and the daemon restarts.

mod common;

use authkeeper::hooks::{EVENT_ID_HEADER, HookEvent, SIGNATURE_HEADER};
use authkeeper_state::{Cause, StateName, Transition};
use axum::http::{HeaderMap, StatusCode};
use common::*;
use hmac::{KeyInit, Mac};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

const PATH: &str = "/v1/connections/trakt/default";

/// The rest of a walk-through after `connect_approved`: the grant is revoked upstream, a
/// validation finds the token and its refresh rejected (→ expired: a needs-login), then a disconnect.
async fn revoke_and_disconnect(h: &Harness) {
    let client = h.client();
    h.emulator.revoke_all_grants();
    let view: authkeeper::wire::ConnectionView = client.post(&format!("{PATH}/validate"), None).await.unwrap();
    assert_eq!(view.state, StateName::Expired);
    let view: authkeeper::wire::ConnectionView = client.post(&format!("{PATH}/disconnect"), None).await.unwrap();
    assert_eq!(view.state, StateName::Disconnected);
}

fn rows(history: &[Transition]) -> Vec<(StateName, StateName, Cause)> {
    history.iter().map(|t| (t.from, t.to, t.cause)).collect()
}

async fn history(h: &Harness) -> Vec<Transition> {
    h.client().get(&format!("{PATH}/history")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_sees_each_transition_with_its_environment() {
    let scratch = tempfile::tempdir().unwrap();
    let record = scratch.path().join("record.txt");
    let fifo = scratch.path().join("ran");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let script = scratch.path().join("hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nprintf '%s|%s|%s|%s|%s|%s|%s|' \"$1\" \"$AUTHKEEPER_EVENT\" \"$AUTHKEEPER_PROVIDER\" \
             \"$AUTHKEEPER_PROFILE\" \"$AUTHKEEPER_FROM\" \"$AUTHKEEPER_TO\" \"$AUTHKEEPER_CAUSE\" >> '{record}'\n\
             cat >> '{record}'\necho ran > '{fifo}'\n",
            record = record.display(),
            fifo = fifo.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    // Held open for writing too, so that the end of one run is not the end of the pipe.
    let ran = tokio::net::unix::pipe::OpenOptions::new().read_write(true).open_receiver(&fifo).unwrap();
    let mut ran = tokio::io::BufReader::new(ran).lines();

    let settings = json!({"hooks": {
        "command": [script.display().to_string(), "first-arg"],
        "events": ["transition", "needs_login"],
    }});
    let h = Harness::new(fast_trakt(), settings).await;
    let daemon = h.start_daemon().await;
    connect_approved(&h).await;
    revoke_and_disconnect(&h).await;
    let history = history(&h).await;
    assert_eq!(
        rows(&history),
        [
            (StateName::Disconnected, StateName::Pending, Cause::ConnectRequested),
            (StateName::Pending, StateName::Connected, Cause::Approved),
            (StateName::Connected, StateName::Connected, Cause::Validated),
            (StateName::Connected, StateName::Expired, Cause::RefreshRejected),
            (StateName::Expired, StateName::Disconnected, Cause::Disconnected),
        ]
    );
    // One run per transition, and one more for the rejection, which needs a new login.
    for _ in 0..history.len() + 1 {
        let line = tokio::time::timeout(PATIENCE, ran.next_line()).await.expect("the hook ran in time");
        assert_eq!(line.unwrap().as_deref(), Some("ran"));
    }
    daemon.stop().await;

    let text = std::fs::read_to_string(&record).unwrap();
    let runs: Vec<(Vec<&str>, HookEvent)> = text
        .lines()
        .map(|line| {
            let mut fields: Vec<&str> = line.splitn(8, '|').collect();
            let event: HookEvent = serde_json::from_str(fields.pop().unwrap()).unwrap();
            (fields, event)
        })
        .collect();
    assert_eq!(runs.len(), history.len() + 1, "{text}");
    let mut transitions = runs.iter().filter(|(_, e)| e.event == authkeeper::hooks::EventKind::Transition);
    for t in &history {
        let (env, event) = transitions.next().expect("a run for every transition");
        let (from, to) = (t.from.as_str(), t.to.as_str());
        let cause = serde_json::to_value(t.cause).unwrap();
        assert_eq!(env, &["first-arg", "transition", "trakt", "default", from, to, cause.as_str().unwrap()]);
        assert_eq!((event.from, event.to, event.cause, event.at), (Some(t.from), Some(t.to), Some(t.cause), t.at));
    }
    let needs: Vec<_> = runs.iter().filter(|(_, e)| e.event == authkeeper::hooks::EventKind::NeedsLogin).collect();
    assert_eq!(needs.len(), 1, "{text}");
    assert_eq!(
        needs[0].0,
        ["first-arg", "needs_login", "trakt", "default", "connected", "expired", "refresh_rejected"]
    );
    let ids: std::collections::BTreeSet<&str> = runs.iter().map(|(_, e)| e.id.as_str()).collect();
    assert_eq!(ids.len(), runs.len(), "every event has its own id");
}

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    /// Tries per event id.
    tries: HashMap<String, u32>,
    /// Each event accepted, by id (a repeat of an accepted id is de-duplicated).
    accepted: BTreeMap<String, HookEvent>,
    bad_signatures: u32,
}

struct Receiver {
    secret: &'static str,
    seen: Mutex<Seen>,
    /// While set, every try gets 500.
    down: std::sync::atomic::AtomicBool,
    tries: mpsc::UnboundedSender<String>,
    accepted: mpsc::UnboundedSender<HookEvent>,
}

fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(header) = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()) else { return false };
    let Some((t, v1)) = header.strip_prefix("t=").and_then(|rest| rest.split_once(",v1=")) else { return false };
    let Ok(t) = t.parse::<i64>() else { return false };
    if (chrono::Utc::now().timestamp() - t).abs() > 300 {
        return false;
    }
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let Ok(v1) =
        (0..v1.len()).step_by(2).map(|i| u8::from_str_radix(&v1[i..i + 2], 16)).collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    mac.verify_slice(&v1).is_ok()
}

async fn receive(
    axum::extract::State(r): axum::extract::State<Arc<Receiver>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    if !verify(r.secret, &headers, &body) {
        r.seen.lock().unwrap().bad_signatures += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let event: HookEvent = serde_json::from_slice(&body).unwrap();
    assert_eq!(headers.get(EVENT_ID_HEADER).unwrap().to_str().unwrap(), event.id);
    let mut seen = r.seen.lock().unwrap();
    let tries = seen.tries.entry(event.id.clone()).or_default();
    *tries += 1;
    let _ = r.tries.send(event.id.clone());
    // The first two tries of every event fail, and every try while the receiver is down.
    if *tries <= 2 || r.down.load(std::sync::atomic::Ordering::SeqCst) {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    if !seen.accepted.contains_key(&event.id) {
        seen.accepted.insert(event.id.clone(), event.clone());
        let _ = r.accepted.send(event);
    }
    StatusCode::NO_CONTENT
}

type Received = (mpsc::UnboundedReceiver<String>, mpsc::UnboundedReceiver<HookEvent>);

/// A receiver on 127.0.0.1 (down or not at first); its URL, and its tries and acceptances.
async fn start_receiver(down: bool) -> (Arc<Receiver>, String, Received) {
    let (tries_tx, tries) = mpsc::unbounded_channel();
    let (accepted_tx, accepted) = mpsc::unbounded_channel();
    let receiver = Arc::new(Receiver {
        secret: "whsec-test-secret",
        seen: Mutex::default(),
        down: down.into(),
        tries: tries_tx,
        accepted: accepted_tx,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (receiver, url, (tries, accepted))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_every_transition_once_across_a_restart() {
    let (receiver, url, (mut tries, mut accepted)) = start_receiver(true).await;

    let settings = json!({"hooks": {
        "webhooks": [{"url": url, "secret": receiver.secret, "events": ["transition"]}],
        "retry_base_ms": 50,
        "retry_max_secs": 1,
    }});
    let h = Harness::new(fast_trakt(), settings).await;
    let daemon = h.start_daemon().await;
    connect_approved(&h).await;
    // The receiver is down: each of the three transitions so far is tried (and fails) before
    // the daemon stops; they wait in the outbox.
    let mut tried = std::collections::BTreeSet::new();
    while tried.len() < 3 {
        tried.insert(tokio::time::timeout(PATIENCE, tries.recv()).await.expect("tried in time").unwrap());
    }
    assert!(receiver.seen.lock().unwrap().accepted.is_empty());
    assert_eq!(daemon.stop().await, 0);

    receiver.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let daemon = h.start_daemon().await;
    revoke_and_disconnect(&h).await;
    let history = history(&h).await;
    assert_eq!(history.len(), 5);
    let mut got = Vec::new();
    while got.len() < history.len() {
        got.push(tokio::time::timeout(PATIENCE, accepted.recv()).await.expect("delivered in time").unwrap());
    }
    got.sort_by_key(|e| e.id.clone());
    let delivered: Vec<Transition> = got
        .iter()
        .map(|e| Transition {
            at: e.at,
            from: e.from.unwrap(),
            to: e.to.unwrap(),
            cause: e.cause.unwrap(),
            detail: e.detail.clone(),
        })
        .collect();
    assert_eq!(delivered, history, "every transition once, in order");
    assert!(got.iter().all(|e| e.provider.as_deref() == Some("trakt") && e.profile.as_deref() == Some("default")));
    daemon.stop().await;

    let seen = receiver.seen.lock().unwrap();
    assert_eq!(seen.bad_signatures, 0);
    assert_eq!(seen.accepted.len(), history.len(), "no other event was accepted");
    assert!(seen.tries.values().all(|&n| n >= 3), "every event failed twice first: {:?}", seen.tries);
    assert!(!h.log().contains(receiver.secret), "the webhook secret is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_needs_login_event_carries_a_fresh_login_link_when_the_web_listener_is_on() {
    let (receiver, url, (_tries, mut accepted)) = start_receiver(false).await;
    let (listen, public_url) = common::trackers::free_port();
    let settings = json!({
        "web": {"listen": listen, "public_url": public_url},
        "hooks": {
            "webhooks": [{"url": url, "secret": receiver.secret, "events": ["needs_login"]}],
            "retry_base_ms": 50,
        },
    });
    let h = Harness::new(fast_trakt(), settings).await;
    let daemon = h.start_daemon().await;
    connect_approved(&h).await;
    h.emulator.revoke_all_grants();
    let view: authkeeper::wire::ConnectionView = h.client().post(&format!("{PATH}/validate"), None).await.unwrap();
    assert_eq!(view.state, StateName::Expired);

    let event = tokio::time::timeout(PATIENCE, accepted.recv()).await.expect("delivered in time").unwrap();
    assert_eq!(event.event, authkeeper::hooks::EventKind::NeedsLogin);
    assert_eq!((event.to, event.cause), (Some(StateName::Expired), Some(Cause::RefreshRejected)));
    let link = event.login_url.expect("a login link").expose().to_owned();
    assert!(link.starts_with(&format!("{public_url}/login?token=")), "{link}");
    assert!(event.login_url_expires_at.unwrap() > event.at);
    // The link opens the login page, and its one use trades it for a session.
    authkeeper::providers::install_crypto();
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let page = browser.get(&link).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap().contains("It works once"));
    let token = link.split_once("token=").unwrap().1;
    let opened = browser.post(format!("{public_url}/login/open")).form(&[("token", token)]).send().await.unwrap();
    assert_eq!(opened.status().as_u16(), 303);
    daemon.stop().await;
    assert!(!h.log().contains(&link), "the link is never logged");
    assert_eq!(receiver.seen.lock().unwrap().accepted.len(), 1, "only needs_login was asked for");
}
