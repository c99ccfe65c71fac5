//! The generic `oauth` provider through the real binary and socket, against an emulator that
//! follows the RFCs strictly: the device grant and the code flow with PKCE, for a public and a
//! confidential client, discovery from the issuer alone, 100 rotating refreshes with no refresh
//! token presented twice, and a lost refresh answer in both of its forms.

mod common;

use authkeeper::wire::{ConnectReply, ConnectionView};
use authkeeper_fixtures::oauth::{OauthEmulator, OauthOptions};
use authkeeper_state::{Cause, StateName};
use common::trackers::{Conn, assert_no_leaks, browse, failures_keep_state, free_port, harness};
use common::*;
use serde_json::{Value, json};

/// An instance named `home` with only `issuer`, `client_id`, `scope` (and the secret, if any).
fn instance(emu: &OauthEmulator, opts: &OauthOptions) -> Value {
    let mut i = json!({"issuer": emu.issuer(), "client_id": opts.client_id, "scope": "openid profile offline_access"});
    if let Some(secret) = &opts.client_secret {
        i["client_secret"] = json!(secret);
    }
    i
}

async fn setup(opts: OauthOptions) -> (Harness, OauthEmulator) {
    let emu = OauthEmulator::start(opts.clone()).await.unwrap();
    let (listen, public_url) = free_port();
    let config = json!({
        "oauth": {"instances": {"home": instance(&emu, &opts), "other": instance(&emu, &opts)}},
        "authkeeper": {"web": {"listen": listen, "public_url": public_url}},
    });
    (harness(config).await, emu)
}

fn public() -> OauthOptions {
    OauthOptions { client_secret: None, interval: 1, ..OauthOptions::default() }
}

fn confidential() -> OauthOptions {
    OauthOptions { interval: 1, ..OauthOptions::default() }
}

async fn device_login(h: &Harness, emu: &OauthEmulator, conn: &Conn<'_>, events: &mut authkeeper::client::EventStream) {
    let reply: ConnectReply = conn.connect(json!({"flow": "device_pin"})).await.unwrap();
    let code = reply.user_code().unwrap().to_owned();
    let url = reply.pending.as_ref().unwrap().verification_url.clone().unwrap();
    assert!(url.contains("user_code="), "verification_uri_complete is shown: {url}");
    assert!(emu.approve(&code));
    wait_for(events, "oauth", Cause::Approved).await;
    wait_for(events, "oauth", Cause::Validated).await;
    assert_eq!(h.client().get::<ConnectionView>(&conn.path).await.unwrap().state, StateName::Connected);
}

async fn browser_login(conn: &Conn<'_>) -> (u16, String) {
    let reply = conn.connect(json!({"flow": "oauth_code"})).await.unwrap();
    let url = reply.pending.unwrap().authorize_url.unwrap();
    assert!(url.contains("code_challenge_method=S256") && url.contains("nonce="), "{url}");
    let (status, _, page) = browse(&url).await;
    (status, page)
}

/// The whole walk for one kind of client: device grant, rejection, browser login, failures.
async fn walk(opts: OauthOptions) {
    let (h, emu) = setup(opts).await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let conn = Conn::new(&h, "oauth", "home");
    assert_eq!(conn.view().await.state, StateName::Disconnected);

    device_login(&h, &emu, &conn, &mut events).await;
    let view = conn.view().await;
    assert_eq!(view.account.as_deref(), Some("sean"), "from userinfo");
    let token: Value = conn.token().await.unwrap();
    assert!(token["id_token"].as_str().is_some_and(|t| t.split('.').count() == 3), "{token}");
    assert_eq!(token["token_type"], "Bearer");

    // Everything revoked: userinfo says 401, the refresh is refused → expired.
    emu.revoke_all();
    assert_eq!(conn.validate().await.state, StateName::Expired);
    assert_eq!(conn.causes().await.last().map(String::as_str), Some("refresh_rejected"));

    // Back through the browser: code + PKCE + nonce, through the callback.
    let (status, page) = browser_login(&conn).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(conn.view().await.state, StateName::Connected);
    failures_keep_state(&conn, emu.log(), "/userinfo").await;

    // Disconnect revokes the refresh token, then the access token.
    conn.disconnect().await;
    let revokes = emu.log().calls_to("/revoke");
    assert_eq!(revokes.len(), 2, "{revokes:?}");
    daemon.stop().await;
    assert_no_leaks(&h, &emu.issued_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_client_connects_by_device_grant_and_browser_and_recovers() {
    walk(public()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confidential_client_connects_by_device_grant_and_browser_and_recovers() {
    walk(confidential()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_rotating_refreshes_present_each_refresh_token_once() {
    let (h, emu) = setup(confidential()).await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let conn = Conn::new(&h, "oauth", "home");
    device_login(&h, &emu, &conn, &mut events).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..100 {
        let (_, refresh) = emu.latest_tokens().unwrap();
        assert!(seen.insert(refresh.clone()), "a new refresh token each time");
        let view: ConnectionView = h.client().post(&format!("{}/refresh", conn.path), None).await.unwrap();
        assert_eq!((view.state, view.last_error.as_deref()), (StateName::Connected, None));
        assert_eq!(emu.refresh_token_uses(&refresh), 1);
    }
    assert_eq!(emu.refresh_tokens_presented_twice(), 0);
    assert_eq!(conn.token().await.unwrap()["access_token"], emu.latest_tokens().unwrap().0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_answer_lost_after_the_server_rotated_ends_honestly_and_alone() {
    let (h, emu) = setup(confidential()).await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let (conn, other) = (Conn::new(&h, "oauth", "home"), Conn::new(&h, "oauth", "other"));
    device_login(&h, &emu, &conn, &mut events).await;
    device_login(&h, &emu, &other, &mut events).await;

    emu.lose_next_refresh_answers(1);
    let view: ConnectionView = h.client().post(&format!("{}/refresh", conn.path), None).await.unwrap();
    assert_eq!(view.state, StateName::Connected, "no verdict yet");
    assert!(view.last_error.as_deref().unwrap_or_default().contains("refresh answer was lost"), "{view:?}");

    // The next attempt presents the same refresh token once more: the server had rotated.
    let (from, to, _) = wait_for(&mut events, "oauth", Cause::RefreshAnswerLost).await;
    assert_eq!((from, to), (StateName::Connected, StateName::Expired));
    assert_eq!(conn.view().await.state, StateName::Expired);
    assert_eq!(emu.refresh_tokens_presented_twice(), 1, "only the one retry that could tell");
    assert_eq!(other.validate().await.state, StateName::Connected, "no other connection is affected");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_dropped_before_the_server_acted_succeeds_on_the_next_attempt() {
    let (h, emu) = setup(confidential()).await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let conn = Conn::new(&h, "oauth", "home");
    device_login(&h, &emu, &conn, &mut events).await;

    emu.drop_next_refresh_requests(1);
    let view: ConnectionView = h.client().post(&format!("{}/refresh", conn.path), None).await.unwrap();
    assert!(view.last_error.as_deref().unwrap_or_default().contains("refresh answer was lost"), "{view:?}");
    wait_for(&mut events, "oauth", Cause::Refreshed).await;
    let view = conn.view().await;
    assert_eq!((view.state, view.last_error), (StateName::Connected, None));
    assert_eq!(emu.refresh_tokens_presented_twice(), 0, "the server never saw the first one");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth_2_server_without_userinfo_is_found_by_rfc_8414_and_validated_by_expiry() {
    let opts = OauthOptions { oidc: false, userinfo: false, ..public() };
    let emu = OauthEmulator::start(opts.clone()).await.unwrap();
    let block = json!({"issuer": emu.issuer(), "client_id": opts.client_id, "scope": "profile offline_access"});
    let h = harness(json!({"oauth": {"instances": {"plain": block}}})).await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let conn = Conn::new(&h, "oauth", "plain");
    device_login(&h, &emu, &conn, &mut events).await;
    assert!(emu.log().calls_to("/.well-known/oauth-authorization-server").iter().any(|c| c.status == 200));
    assert!(conn.view().await.expires_at.is_some());
    daemon.stop().await;
}

#[test]
fn oauth_instances_are_named_and_have_no_default() {
    let ok =
        authkeeper::config::Config::parse(r#"{"oauth": {"instances": {"auth-entik_2": {"issuer": "https://a"}}}}"#)
            .unwrap();
    let keys: Vec<String> = ok.profiles.keys().filter(|k| k.provider == "oauth").map(ToString::to_string).collect();
    assert_eq!(keys, ["oauth/auth-entik_2"]);
    for bad in ["Authentik", "a b", "", "x.y"] {
        let text = format!(r#"{{"oauth": {{"instances": {{"{bad}": {{}}}}}}}}"#);
        let e = authkeeper::config::Config::parse(&text).unwrap_err();
        assert!(e.to_string().contains("lowercase letters"), "{bad}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_takes_only_client_secret_post_is_sent_the_secret_in_the_form() {
    let methods = vec!["client_secret_post".to_owned()];
    walk(OauthOptions { token_endpoint_auth_methods: methods, ..confidential() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loose_token_answers_are_read_and_introspection_validates_when_asked() {
    // `bearer` in lower case, `expires_in` missing (the access token is a JWT with `exp`).
    let opts = OauthOptions { token_type_case: "bearer".into(), omit_expires_in: true, ..confidential() };
    let emu = OauthEmulator::start(opts.clone()).await.unwrap();
    let mut block = instance(&emu, &opts);
    block["introspect"] = json!(true);
    let h = harness(json!({"oauth": {"instances": {"home": block}}})).await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let conn = Conn::new(&h, "oauth", "home");
    device_login(&h, &emu, &conn, &mut events).await;
    let view = conn.view().await;
    assert!(view.expires_at.is_some(), "read from the JWT access token's exp");
    assert_eq!(conn.token().await.unwrap()["token_type"], "Bearer");
    assert!(!emu.log().calls_to("/introspect").is_empty(), "validated by introspection");
    assert!(emu.log().calls_to("/userinfo").is_empty());

    // Inactive by introspection, refresh refused → expired.
    emu.revoke_all();
    assert_eq!(conn.validate().await.state, StateName::Expired);
    daemon.stop().await;

    // The string form of expires_in is read too.
    let opts = OauthOptions { expires_in_as_string: true, ..public() };
    let emu = OauthEmulator::start(opts.clone()).await.unwrap();
    let h = harness(json!({"oauth": {"instances": {"home": instance(&emu, &opts)}}})).await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let conn = Conn::new(&h, "oauth", "home");
    device_login(&h, &emu, &conn, &mut events).await;
    let left = conn.view().await.expires_at.unwrap() - chrono::Utc::now();
    assert!(left > chrono::TimeDelta::seconds(250) && left <= chrono::TimeDelta::seconds(300), "{left}");
    daemon.stop().await;
}
