//! Load, small enough for CI (`bench load` runs the full size): 200 concurrent socket clients
//! and 8 `/v1/events` subscribers on a daemon whose connections validate every second. Every
//! client is answered; a subscriber that reads nothing is told it fell behind and blocks
//! nothing, while the others see every transition.

mod common;

use authkeeper::client::{Client, EventStream};
use authkeeper::wire::WireEvent;
use common::*;
use serde_json::json;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECTIONS: usize = 500;
const CLIENTS: usize = 200;
const SUBSCRIBERS: usize = 8;
/// Requests each client makes, alternating a token lookup and a status call.
const EACH: usize = 20;
/// Transitions the slow subscriber lets pass unread: more than the daemon's buffer (4,096
/// events) and the socket's together.
const UNREAD: usize = 9_000;

/// The transitions a subscriber saw between the first `config_reloaded` and the next;
/// `counted` hears each one.
async fn record(mut events: EventStream, counted: tokio::sync::mpsc::UnboundedSender<()>) -> Vec<String> {
    let (mut seen, mut open) = (Vec::new(), false);
    loop {
        match events.next().await.expect("the stream stays open").unwrap() {
            WireEvent::ConfigReloaded { .. } if open => return seen,
            WireEvent::ConfigReloaded { .. } => open = true,
            WireEvent::Transition { profile, at, cause, .. } if open => {
                seen.push(format!("{profile} {cause:?} {at}"));
                let _ = counted.send(());
            }
            WireEvent::Warning { message, .. } => {
                assert!(!message.contains("fell behind"), "a reader that reads lagged")
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_are_answered_and_a_slow_subscriber_blocks_nothing() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let store = connected_store(&h.emulator, CONNECTIONS, 86_400, |_| chrono::Utc::now() + chrono::TimeDelta::days(1));
    let instances: serde_json::Map<String, serde_json::Value> =
        (0..CONNECTIONS).map(|i| (profile(i), json!({}))).collect();
    let config = |marker: u32| {
        json!({
            "trakt": {"client_id": "emulator-client-id", "client_secret": "emulator-client-secret", "instances": instances},
            "authkeeper": {"base_url": {"trakt": h.emulator.url()}, "validate_every_secs": 1, "request_timeout_secs": 2,
                           "rate_limits": {"trakt": {"per_second": 100_000, "burst": 10_000}}},
            "marker": marker,
        })
        .to_string()
    };
    std::fs::write(h.config_path(), config(0)).unwrap();
    let paths = authkeeper::config::Paths { config: h.config_path(), state_dir: h.state_dir(), socket: h.socket() };
    let mut opts = authkeeper::daemon::Options::new(paths, Arc::new(authkeeper::clock::SystemClock));
    opts.store = Some(Arc::new(store));
    let running = authkeeper::daemon::start(opts).await.unwrap();

    // The slow subscriber asks for the stream and reads nothing.
    let mut slow = tokio::net::UnixStream::connect(h.socket()).await.unwrap();
    slow.write_all(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (counted, mut counts) = tokio::sync::mpsc::unbounded_channel();
    let mut readers = tokio::task::JoinSet::new();
    for i in 1..SUBSCRIBERS {
        let events = Client::new(&h.socket()).events().await.unwrap();
        let counted = counted.clone();
        readers.spawn(async move {
            record(events, if i == 1 { counted } else { tokio::sync::mpsc::unbounded_channel().0 }).await
        });
    }
    drop(counted);
    save_by_rename(&h.config_path(), &config(1));

    // The clients, all at once.
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let socket = h.socket();
        clients.spawn(async move {
            let client = Client::new(&socket);
            let path = format!("/v1/connections/trakt/{}", profile(i % CONNECTIONS));
            for k in 0..EACH {
                let answer = if k % 2 == 0 {
                    client
                        .get::<serde_json::Value>(&format!("{path}/token"))
                        .await
                        .map(|t| t["access_token"].is_string())
                } else {
                    client.get::<serde_json::Value>(&path).await.map(|v| v["state"] == "connected")
                };
                assert!(answer.expect("every client is answered"), "client {i} got a live answer");
            }
        });
    }
    let mut answered = 0;
    while let Some(done) = clients.join_next().await {
        done.unwrap();
        answered += 1;
    }
    assert_eq!(answered, CLIENTS);

    // Transitions keep flowing while the slow subscriber reads nothing.
    tokio::time::timeout(PATIENCE * 2, async {
        for _ in 0..UNREAD {
            counts.recv().await.expect("the first reader counts");
        }
    })
    .await
    .expect("the schedule kept going while a reader stalled");

    // The slow subscriber reads at last: it is told it fell behind.
    let told = tokio::time::timeout(PATIENCE, async {
        let mut buf = vec![0u8; 1 << 16];
        let mut text = String::new();
        loop {
            let n = slow.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended before the notice");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            if let Some(at) = text.find("fell behind") {
                return text[text[..at].rfind('{').unwrap_or(0)..].lines().next().unwrap_or_default().to_owned();
            }
            let keep = text.len().saturating_sub(256);
            text.drain(..keep);
        }
    })
    .await
    .expect("the slow reader is told in time");
    assert!(told.contains("\"type\":\"warning\"") && told.contains("missed"), "{told}");

    // Every other subscriber saw the same transitions, none lost.
    save_by_rename(&h.config_path(), &config(2));
    let mut all = Vec::new();
    while let Some(seen) = readers.join_next().await {
        all.push(seen.unwrap());
    }
    assert!(all[0].len() >= UNREAD, "{}", all[0].len());
    assert!(all.iter().all(|s| *s == all[0]), "every fast reader saw every transition, in order");
    // The slow reader stops reading again: it does not hold the daemon's shutdown up.
    tokio::time::timeout(PATIENCE, running.stop()).await.expect("stops despite a stalled reader").unwrap();
    drop(slow);
}
