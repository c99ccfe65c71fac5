//! TMDB through the real binary and socket, against its emulator: an app credential (a v3 key or
//! a v4 read-access token), and a user session made from a request token the user approves,
//! found by polling `session/new` or, with the web listener, by the approval page sending the
//! browser back to the daemon; rejections of each, a request token that runs out, failures and
//! TMDB's own rate limit that change nothing, and no secret in the log.

mod common;

use authkeeper::wire::ConnectReply;
use authkeeper_fixtures::tmdb::{TmdbEmulator, TmdbOptions, read_access_token};
use authkeeper_state::{Cause, StateName};
use common::trackers::{Conn, assert_no_leaks, browse, failures_keep_state, free_port, harness};
use common::*;
use serde_json::{Value, json};

const SESSION_NEW: &str = "/3/authentication/session/new";

/// The v3 key the emulator accepts.
fn app_key() -> String {
    TmdbOptions::default().api_key
}

/// A TMDB emulator, and a harness whose `tmdb_sync` block is `block`, with the web listener on
/// `web` (listen address, public URL) when given.
async fn setup(block: Value, web: Option<(&str, &str)>) -> (Harness, TmdbEmulator) {
    let emu = TmdbEmulator::start(TmdbOptions::default()).await.unwrap();
    let mut authkeeper = json!({"base_url": {"tmdb": emu.url()}});
    if let Some((listen, public_url)) = web {
        authkeeper["web"] = json!({"listen": listen, "public_url": public_url});
    }
    (harness(json!({"tmdb_sync": block, "authkeeper": authkeeper})).await, emu)
}

/// The one request token the emulator has handed out and not seen decided yet.
fn pending_token(emu: &TmdbEmulator) -> String {
    let tokens = emu.pending_request_tokens();
    assert_eq!(tokens.len(), 1, "one request token is waiting for the user");
    tokens[0].clone()
}

/// From disconnected, `key` connects as the app; a wrong one is rejected → expired with TMDB's
/// code 7; and `key` connects again from expired.
async fn an_app_credential_connects(key: String, wrong: String, kind: &str) {
    let (h, emu) = setup(json!({}), None).await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "tmdb", "default");
    assert_eq!(conn.view().await.state, StateName::Disconnected);

    let reply = conn.connect(json!({"flow": "api_key", "api_key": key})).await.unwrap();
    assert!(reply.pending.is_none(), "a key needs no step from the user");
    let view = conn.view().await;
    let account = format!("TMDB app ({kind})");
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some(account.as_str())));
    assert_eq!(conn.causes().await, ["credentials_supplied", "validated"]);
    assert!(emu.log().calls_to("/3/authentication").iter().any(|c| c.status == 200), "checked with TMDB");
    let token: Value = conn.token().await.unwrap();
    assert_eq!(token["access_token"], key);
    assert_eq!(token["token_type"], "api_key");
    assert_eq!(token["api_key"], key);
    assert!(token.get("session_id").is_none(), "no user session: {token}");

    // A wrong credential is taken, checked and refused: expired, with TMDB's reason.
    assert_eq!(conn.disconnect().await.state, StateName::Disconnected);
    conn.connect(json!({"flow": "api_key", "api_key": wrong})).await.unwrap();
    assert_eq!(conn.view().await.state, StateName::Expired);
    let detail = conn.last_detail().await;
    assert!(detail.contains("(7: Invalid API key"), "{detail}");
    let (status, body) = api_error(conn.token().await.unwrap_err());
    assert_eq!((status, body["error"].as_str()), (409, Some("not_connected")));

    // And back.
    conn.connect(json!({"flow": "api_key", "api_key": key})).await.unwrap();
    assert_eq!(conn.view().await.state, StateName::Connected);
    assert_eq!(conn.token().await.unwrap()["access_token"], key);
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v3_api_key_connects_and_a_wrong_one_expires_with_code_7() {
    an_app_credential_connects(app_key(), "0123456789abcdef0123456789abcdef".into(), "v3 API key").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v4_read_access_token_connects_and_a_wrong_one_expires_with_code_7() {
    let wrong = read_access_token("0123456789abcdef0123456789abcdef");
    an_app_credential_connects(read_access_token(&app_key()), wrong, "v4 read-access token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_token_is_polled_until_approved_and_the_session_is_rejected_once_revoked() {
    let key = app_key();
    let (h, emu) = setup(json!({"api_key": key}), None).await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let conn = Conn::new(&h, "tmdb", "default");

    // The profile's key is imported at start as the app's credential; a user session needs a
    // new connect, so the key connection is disconnected first (the file's key stays there).
    let view = conn.view().await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("TMDB app (v3 API key)")));
    assert_eq!(conn.disconnect().await.state, StateName::Disconnected);

    // 202 with the page where the user approves; the app key is the profile's.
    let path = format!("{}/connect", conn.path);
    let (status, body) = raw(&h.socket(), reqwest::Method::POST, &path, r#"{"flow": "request_token"}"#).await;
    assert_eq!(status, 202, "{body}");
    let reply: ConnectReply = serde_json::from_value(body).unwrap();
    assert_eq!(reply.connection.state, StateName::Pending);
    assert_eq!(reply.interval, Some(5), "session/new is tried every 5 s");
    let request_token = pending_token(&emu);
    let pending = reply.pending.unwrap();
    assert_eq!(pending.flow, "request_token");
    assert_eq!(pending.authorize_url.unwrap(), format!("{}/authenticate/{request_token}", emu.url()));

    // Not approved yet: TMDB answers 17 and the daemon keeps trying, 5 s apart.
    let polls = emu.log().wait_for_calls(SESSION_NEW, 2).await;
    assert!(polls.iter().all(|c| c.status == 401), "{polls:?}");
    assert!(polls[1].at - polls[0].at >= chrono::TimeDelta::milliseconds(4500), "{polls:?}");
    let view = conn.view().await;
    assert_eq!((view.state, view.last_error), (StateName::Pending, None), "17 means keep trying");

    // The user approves on TMDB's page: the next try makes the session.
    assert!(emu.approve(&request_token));
    wait_for(&mut events, "tmdb", Cause::Approved).await;
    wait_for(&mut events, "tmdb", Cause::Validated).await;
    let view = conn.view().await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));
    let session = emu.live_sessions();
    assert_eq!(session.len(), 1);
    let token: Value = conn.token().await.unwrap();
    assert_eq!(token["token_type"], "session");
    assert_eq!(token["access_token"], session[0]);
    assert_eq!(token["session_id"], session[0]);
    assert_eq!(token["api_key"], key);

    // The user revokes the app on TMDB: the session is rejected (code 3) → expired.
    emu.revoke_all();
    assert_eq!(conn.validate().await.state, StateName::Expired);
    let detail = conn.last_detail().await;
    assert!(detail.contains("(3: Authentication failed"), "{detail}");
    let (status, body) = api_error(conn.token().await.unwrap_err());
    assert_eq!((status, body["error"].as_str()), (409, Some("not_connected")));

    // And back with a new request token.
    let reply = conn.connect(json!({"flow": "request_token"})).await.unwrap();
    assert_eq!(reply.connection.state, StateName::Pending);
    assert!(emu.approve(&pending_token(&emu)));
    wait_for(&mut events, "tmdb", Cause::Approved).await;
    wait_for(&mut events, "tmdb", Cause::Validated).await;
    assert_eq!(conn.view().await.state, StateName::Connected);
    let session = emu.live_sessions();
    assert_eq!(conn.token().await.unwrap()["session_id"], session[0]);

    // Disconnect deletes the session upstream.
    assert_eq!(conn.disconnect().await.state, StateName::Disconnected);
    let deleted = emu.log().calls_to("/3/authentication/session");
    assert!(deleted.iter().any(|c| c.method == "DELETE" && c.status == 200), "{deleted:?}");
    assert!(emu.live_sessions().is_empty());
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_key_can_come_with_the_connect_and_the_session_keeps_it() {
    let key = app_key();
    let (h, emu) = setup(json!({}), None).await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let conn = Conn::new(&h, "tmdb", "default");

    // No key anywhere: a clear error, nothing asked of TMDB.
    let (status, body) = api_error(conn.connect(json!({"flow": "request_token"})).await.unwrap_err());
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("api_key"), "{body}");
    assert!(emu.log().calls().is_empty());
    assert_eq!(conn.view().await.state, StateName::Disconnected);

    // A key TMDB refuses gets no request token: 401, nothing changes.
    let wrong = json!({"flow": "request_token", "api_key": "0123456789abcdef0123456789abcdef"});
    let (status, body) = api_error(conn.connect(wrong).await.unwrap_err());
    assert_eq!((status, body["error"].as_str()), (401, Some("rejected")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("Invalid API key"), "{body}");
    assert_eq!(conn.view().await.state, StateName::Disconnected);
    assert!(emu.pending_request_tokens().is_empty());

    let reply = conn.connect(json!({"flow": "request_token", "api_key": key})).await.unwrap();
    assert_eq!(reply.connection.state, StateName::Pending);
    assert!(emu.approve(&pending_token(&emu)));
    wait_for(&mut events, "tmdb", Cause::Approved).await;
    wait_for(&mut events, "tmdb", Cause::Validated).await;
    let view = conn.view().await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));
    let token: Value = conn.token().await.unwrap();
    assert_eq!(token["token_type"], "session");
    assert_eq!(token["session_id"], emu.live_sessions()[0]);
    assert_eq!(token["api_key"], key, "the session keeps the key it was made with");

    // Checked again later, with the key the session kept.
    assert_eq!(conn.validate().await.state, StateName::Connected);
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_token_that_runs_out_ends_the_flow() {
    let (h, emu) = setup(json!({}), None).await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let conn = Conn::new(&h, "tmdb", "default");
    conn.connect(json!({"flow": "request_token", "api_key": app_key()})).await.unwrap();
    let polls = emu.log().wait_for_calls(SESSION_NEW, 1).await;
    assert_eq!(polls[0].status, 401);
    assert_eq!(conn.view().await.state, StateName::Pending);

    // The token's hour is up: TMDB answers 33, and the flow ends.
    emu.expire_request_tokens();
    let (from, to, _) = wait_for(&mut events, "tmdb", Cause::FlowExpired).await;
    assert_eq!((from, to), (StateName::Pending, StateName::Disconnected));
    assert_eq!(emu.log().calls_to(SESSION_NEW).len(), 2, "no try after the end");
    let view = conn.view().await;
    assert_eq!((view.state, view.pending), (StateName::Disconnected, None));
    let detail = conn.last_detail().await;
    assert!(detail.contains("(33:"), "{detail}");
    let (status, body) = api_error(conn.token().await.unwrap_err());
    assert_eq!((status, body["error"].as_str()), (409, Some("not_connected")));
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_web_listener_the_approval_page_returns_to_the_daemon_and_connects_at_once() {
    let (listen, origin) = free_port();
    let (h, emu) = setup(json!({}), Some((&listen, &origin))).await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "tmdb", "default");
    let callback = format!("{origin}/oauth/callback/tmdb");

    // The page is told to send the browser back to the daemon; nothing is polled.
    let reply = conn.connect(json!({"flow": "request_token", "api_key": app_key()})).await.unwrap();
    assert_eq!(reply.interval, None, "a flow that ends by callback is not polled");
    let url = reqwest::Url::parse(&reply.pending.unwrap().authorize_url.unwrap()).unwrap();
    assert_eq!(url.path(), format!("/authenticate/{}", pending_token(&emu)));
    let redirect: Vec<_> = url.query_pairs().filter(|(k, _)| k == "redirect_to").map(|(_, v)| v.into_owned()).collect();
    assert_eq!(redirect, std::slice::from_ref(&callback));

    // The user approves; the browser lands on the daemon's page, and the connection is made.
    let (status, at, page) = browse(url.as_str()).await;
    assert_eq!(status, 200, "{page}");
    assert!(at.starts_with(&format!("{callback}?")), "{at}");
    assert!(page.contains("Connected") && page.contains("tmdb/default is connected as sean"), "{page}");
    let view = conn.view().await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));
    assert_eq!(conn.causes().await, ["connect_requested", "approved", "validated"]);
    assert_eq!(emu.log().calls_to(SESSION_NEW).len(), 1, "one session/new, from the callback");
    let token: Value = conn.token().await.unwrap();
    assert_eq!(token["token_type"], "session");
    assert_eq!(token["session_id"], emu.live_sessions()[0]);

    // The user denies: the page says so, and the connection is back to disconnected.
    assert_eq!(conn.disconnect().await.state, StateName::Disconnected);
    emu.deny_next();
    let reply = conn.connect(json!({"flow": "request_token", "api_key": app_key()})).await.unwrap();
    let (status, _, page) = browse(&reply.pending.unwrap().authorize_url.unwrap()).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Not connected") && page.contains("tmdb/default is disconnected"), "{page}");
    assert_eq!(conn.view().await.state, StateName::Disconnected);
    assert_eq!(conn.causes().await.last().map(String::as_str), Some("denied"));
    assert_eq!(emu.log().calls_to(SESSION_NEW).len(), 1, "a denial makes no session");
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_tmdbs_own_rate_limit_leave_a_session_connected() {
    let emu = TmdbEmulator::start(TmdbOptions::default()).await.unwrap();
    // A session CrossWatch made earlier, in its block: imported and checked at start.
    let config = json!({
        "tmdb_sync": {"api_key": app_key(), "session_id": emu.issue_session()},
        "authkeeper": {"base_url": {"tmdb": emu.url()}},
    });
    let h = harness(config).await;
    let daemon = h.start_daemon().await;
    let conn = Conn::new(&h, "tmdb", "default");
    let view = conn.view().await;
    assert_eq!((view.state, view.account.as_deref()), (StateName::Connected, Some("sean")));
    assert_eq!(conn.token().await.unwrap()["token_type"], "session");

    failures_keep_state(&conn, emu.log(), "/3/account").await;

    // TMDB's own limit: one request in 10 s. The second check is answered 429 (code 25).
    emu.set_rate_limit(Some(1));
    let view = conn.validate().await;
    assert_eq!((view.state, view.last_error), (StateName::Connected, None));
    let mut events = h.client().events().await.unwrap();
    let view = conn.validate().await;
    assert_eq!(view.state, StateName::Connected, "a 429 says nothing about the session");
    let error = view.last_error.unwrap_or_default();
    assert!(error.contains("429"), "{error}");
    assert_eq!(emu.throttled(), 1);

    // The daemon tries again by itself once TMDB's Retry-After has passed, and is let through.
    wait_for(&mut events, "tmdb", Cause::Validated).await;
    let view = conn.view().await;
    assert_eq!((view.state, view.last_error), (StateName::Connected, None));
    assert_eq!(emu.throttled(), 1, "no call during the pause");
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}
