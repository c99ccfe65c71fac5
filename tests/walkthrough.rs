//! The full life of a Trakt connection through the real binary and the real socket.

mod common;

use authkeeper::wire::{ConnectReply, ConnectionView};
use authkeeper_state::{Cause, StateName, Transition};
use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refresh_revoke_disconnect_and_history() {
    let h = Harness::new(
        authkeeper_fixtures::TraktOptions { token_lifetime: 6, ..fast_trakt() },
        json!({"refresh_margin_secs": 2}),
    )
    .await;
    let daemon = h.start_daemon().await;
    let client = h.client();
    let mut events = client.events().await.unwrap();
    let path = "/v1/connections/trakt/default";

    // 1. connect → pending, with what the user must do.
    let reply: ConnectReply =
        client.post(&format!("{path}/connect"), Some(json!({"flow": "device_pin"}))).await.unwrap();
    assert_eq!(reply.user_code().unwrap().len(), 8);
    assert_eq!(reply.pending.as_ref().unwrap().verification_url.as_deref().unwrap(), "https://trakt.tv/activate");
    assert_eq!(reply.connection.state, StateName::Pending);
    let (from, to, _) = wait_transition(&mut events, Cause::ConnectRequested).await;
    assert_eq!((from, to), (StateName::Disconnected, StateName::Pending));
    let view: ConnectionView = client.get(path).await.unwrap();
    assert_eq!(view.pending.as_ref().unwrap().user_code.as_deref(), reply.user_code());

    // 2. The user approves → connected; the approval is saved first, then the new token is
    //    validated, which tells whose account it is.
    assert!(h.emulator.approve(reply.user_code().unwrap()));
    let (from, to, _) = wait_transition(&mut events, Cause::Approved).await;
    assert_eq!((from, to), (StateName::Pending, StateName::Connected));
    let (from, to, _) = wait_transition(&mut events, Cause::Validated).await;
    assert_eq!((from, to), (StateName::Connected, StateName::Connected));
    h.emulator.set_token_lifetime(3600); // only the first token is short-lived
    let view: ConnectionView = client.get(path).await.unwrap();
    assert_eq!(view.state, StateName::Connected);
    assert_eq!(view.account.as_deref(), Some("sean"));
    let first_expiry = view.expires_at.unwrap();

    // 3. token returns the access token, and what a consumer needs to call Trakt.
    let (first_access, first_refresh) = h.emulator.latest_tokens().unwrap();
    let token: Value = client.get(&format!("{path}/token")).await.unwrap();
    assert_eq!(token["access_token"], first_access.as_str());
    assert_eq!(token["token_type"], "bearer");
    assert_eq!(token["client_id"], "emulator-client-id");
    let (code, out, _) = h.cli(&["token", "trakt"]).await;
    assert_eq!((code, out.trim()), (0, first_access.as_str()), "`authkeeper token trakt` prints the bare token");

    // 4. The short-lived token is refreshed before it expires, with no command.
    let (from, to, at) = wait_transition(&mut events, Cause::Refreshed).await;
    assert_eq!((from, to), (StateName::Connected, StateName::Connected));
    assert!(at < first_expiry, "refreshed at {at}, after the expiry {first_expiry}");
    assert_eq!(h.emulator.refresh_token_uses(&first_refresh), 1, "the old refresh token was used exactly once");
    let (new_access, _) = h.emulator.latest_tokens().unwrap();
    let token: Value = client.get(&format!("{path}/token")).await.unwrap();
    assert_eq!(token["access_token"], new_access.as_str());

    // 5. The grant is revoked upstream; validate → expired; token → 409 "log in first".
    h.emulator.revoke_all_grants();
    let view: ConnectionView = client.post(&format!("{path}/validate"), None).await.unwrap();
    assert_eq!(view.state, StateName::Expired);
    let (status, body) = api_error(client.get::<Value>(&format!("{path}/token")).await.unwrap_err());
    assert_eq!(status, 409);
    assert_eq!(body["error"], "not_connected");
    assert_eq!(body["state"], "expired");
    assert!(body["message"].as_str().unwrap().contains("log in first"), "{body}");
    let (code, _, err) = h.cli(&["token", "trakt"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("log in first"), "{err}");

    // 6. disconnect → disconnected, revoked upstream.
    let revokes_before = h.emulator.log().calls_to("/oauth/revoke").len();
    let view: ConnectionView = client.post(&format!("{path}/disconnect"), None).await.unwrap();
    assert_eq!(view.state, StateName::Disconnected);
    assert_eq!(h.emulator.log().calls_to("/oauth/revoke").len(), revokes_before + 1);

    // 7. history lists every transition with its cause.
    let history: Vec<Transition> = client.get(&format!("{path}/history")).await.unwrap();
    let rows: Vec<(StateName, StateName, Cause)> = history.iter().map(|t| (t.from, t.to, t.cause)).collect();
    use StateName::*;
    assert_eq!(
        rows,
        [
            (Disconnected, Pending, Cause::ConnectRequested),
            (Pending, Connected, Cause::Approved),
            (Connected, Connected, Cause::Validated),
            (Connected, Connected, Cause::Refreshed),
            (Connected, Expired, Cause::RefreshRejected),
            (Expired, Disconnected, Cause::Disconnected),
        ]
    );
    let (code, out, _) = h.cli(&["history", "trakt"]).await;
    assert_eq!(code, 0);
    for cause in ["connect_requested", "approved", "refreshed", "refresh_rejected", "disconnected"] {
        assert!(out.contains(cause), "`authkeeper history` shows {cause}:\n{out}");
    }

    // Status output carries no secret either.
    let (code, status_out, _) = h.cli(&["status", "--json"]).await;
    assert_eq!(code, 0);
    assert_eq!(daemon.stop().await, 0, "SIGTERM stops the daemon cleanly");
    assert!(!h.socket().exists(), "the socket file is removed on shutdown");

    // No token the emulator ever issued (nor the device code, nor the client secret) is in
    // the daemon's log, even at debug level, or in status output.
    let log = h.log();
    assert!(log.contains("transition"), "the log is being captured");
    let mut secrets = h.emulator.issued_tokens();
    secrets.push("emulator-client-secret".into());
    assert!(secrets.len() >= 5);
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "a secret leaked into the daemon log");
        assert!(!status_out.contains(secret.as_str()), "a secret leaked into status output");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_connect_prints_the_code_and_waits_for_the_outcome() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let daemon = h.start_daemon().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_authkeeper"))
        .args(["connect", "trakt"])
        .args(h.args())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Read the CLI's instructions as a user would, and approve the code it shows.
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut shown = String::new();
    let code = tokio::time::timeout(PATIENCE, async {
        loop {
            let line = lines.next_line().await.unwrap().expect("the CLI prints the code");
            shown.push_str(&line);
            shown.push('\n');
            if let Some(code) = line.trim().strip_prefix("2. enter") {
                return code.trim().to_owned();
            }
        }
    })
    .await
    .unwrap();
    assert!(shown.contains("https://trakt.tv/activate"), "{shown}");
    assert!(h.emulator.approve(&code), "the CLI showed the emulator's code {code:?}");
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "connected as sean");
    daemon.stop().await;
}
