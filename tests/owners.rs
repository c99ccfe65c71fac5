//! Consumer gating for owners' profiles (`discord:123456`): a token for an owner who is not
//! connected, linked before or not, is a 409 with the provider's "log in first" message, which
//! the config can change; the CLI prints it and exits 1.

mod common;

use common::trackers::harness;
use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_who_never_linked_is_told_to_log_in_first() {
    let h = harness(json!({"jellyfin": {"server": "http://127.0.0.1:9"},
        "authkeeper": {"login_messages": {"plex": "Link Plex first: /link plex"}}}))
    .await;
    let daemon = h.start_daemon().await;
    let client = h.client();

    let err = client.get::<Value>("/v1/connections/jellyfin/discord:123456/token").await.unwrap_err();
    let (status, body) = api_error(err);
    assert_eq!(
        (status, body["error"].as_str(), body["state"].as_str()),
        (409, Some("not_connected"), Some("disconnected"))
    );
    assert_eq!(body["message"], "Please log in first: /login jellyfin");
    let (status, body) = api_error(client.get::<Value>("/v1/connections/plex/discord:123456/token").await.unwrap_err());
    assert_eq!(
        (status, body["message"].as_str()),
        (409, Some("Link Plex first: /link plex")),
        "configured per provider"
    );

    // Not an owner id: an unknown profile, as before; no profile id at all: a bad request.
    let (status, body) =
        api_error(client.get::<Value>("/v1/connections/jellyfin/JELLYFIN-P07/token").await.unwrap_err());
    assert_eq!((status, body["error"].as_str()), (404, Some("unknown_profile")));
    let (status, body) = api_error(client.get::<Value>("/v1/connections/jellyfin/nobody/token").await.unwrap_err());
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));

    // The CLI: the message on stderr, exit 1, nothing on stdout.
    let (code, out, err) = h.cli(&["token", "jellyfin", "--owner", "discord:123456"]).await;
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains("Please log in first: /login jellyfin"), "{err}");

    // One owner's connections: none yet.
    let mine: Vec<Value> = client.get("/v1/connections?owner=discord:123456").await.unwrap();
    assert!(mine.is_empty());
    let all: Vec<Value> = client.get("/v1/connections").await.unwrap();
    assert!(!all.is_empty());
    daemon.stop().await;
}

#[test]
fn owner_ids_follow_the_contract() {
    use authkeeper_state::is_owner_id;
    for ok in ["discord:123456", "matrix:@sean:example.org", "a:b", "x:y-z_1.2"] {
        assert!(is_owner_id(ok), "{ok}");
    }
    for bad in ["default", "TRAKT-P01", "authentik", ".a:b", "a b:c", "", &format!("a:{}", "x".repeat(127))] {
        assert!(!is_owner_id(bad), "{bad}");
    }
}
