//! The daemon on PostgreSQL (a throwaway cluster on a unix socket): a connect, a refresh that
//! survives `kill -9`, a copy refused while a daemon uses the store, and `store copy` from
//! redb to PostgreSQL and back. Without PostgreSQL installed the tests say so and pass, unless
//! `AUTHKEEPER_REQUIRE_POSTGRES` is set (as in CI).

mod common;

use authkeeper::client::ClientError;
use authkeeper::wire::ConnectionView;
use authkeeper_pgstore::cluster::Cluster;
use authkeeper_state::{Cause, StateName};
use common::*;
use serde_json::{Value, json};

/// A URL with a password the trusting cluster ignores, so that the logs can be searched for it.
fn with_password(url: &str) -> String {
    url.replacen("postgresql://authkeeper@", "postgresql://authkeeper:pg-pass-5e3c@", 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_on_postgresql_connects_refreshes_and_survives_kill_9() {
    let Some(cluster) = Cluster::for_tests() else { return };
    let url = with_password(&cluster.database("daemon").unwrap());
    let h = Harness::new(
        authkeeper_fixtures::TraktOptions { token_lifetime: 4, ..fast_trakt() },
        json!({"refresh_margin_secs": 2}),
    )
    .await;
    let daemon = h.start_daemon_with(&["--store", &url]).await;
    let mut events = connect_approved(&h).await;
    h.emulator.set_token_lifetime(3600);
    wait_transition(&mut events, Cause::Refreshed).await;
    daemon.kill9().await;
    let (newest_access, newest_refresh) = h.emulator.latest_tokens().unwrap();
    assert!(!h.state_dir().join("authkeeper.redb").exists(), "no redb file was made");

    // The store named in the config instead of on the command line.
    let config: Value = serde_json::from_slice(&std::fs::read(h.config_path()).unwrap()).unwrap();
    let mut config = config;
    config["authkeeper"]["store"] = json!({"postgres": url});
    save_by_rename(&h.config_path(), &serde_json::to_string_pretty(&config).unwrap());
    let daemon = h.start_daemon().await;
    let client = h.client();
    let token: Value = client.get("/v1/connections/trakt/default/token").await.unwrap();
    assert_eq!(token["access_token"], newest_access.as_str(), "the committed refresh is the one stored");
    let view: ConnectionView = client.post("/v1/connections/trakt/default/refresh", None).await.unwrap();
    assert_eq!((view.state, view.last_error), (StateName::Connected, None));
    assert_eq!(h.emulator.refresh_token_uses(&newest_refresh), 1, "the stored refresh token was the newest");
    let history: Value = client.get("/v1/connections/trakt/default/history").await.unwrap();
    let causes: Vec<&str> = history.as_array().unwrap().iter().filter_map(|t| t["cause"].as_str()).collect();
    assert_eq!(causes.first(), Some(&"connect_requested"), "{causes:?}");

    // A copy out of the store while a daemon uses it is refused.
    let copy = format!("redb:{}", h.dir.path().join("copy.redb").display());
    let (code, _, stderr) = h.cli(&["store", "copy", "--from", &url, "--to", &copy]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("another authkeeper is using the store"), "{stderr}");
    assert!(stderr.contains("authkeeper:***@"), "the URL is shown without its password: {stderr}");
    assert!(!h.dir.path().join("copy.redb").exists(), "nothing was made");
    daemon.stop().await;
    let log = h.log() + &stderr;
    assert!(!log.contains("pg-pass-5e3c"), "the store's password is never logged");
    for secret in [newest_access.as_str(), newest_refresh.as_str()] {
        assert!(!log.contains(secret), "a token was logged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_a_redb_store_to_postgresql_and_back_and_refuses_to_overwrite() {
    let Some(cluster) = Cluster::for_tests() else { return };
    let url = cluster.database("copy").unwrap();
    let h = Harness::new(fast_trakt(), json!({})).await;
    let daemon = h.start_daemon().await;
    connect_approved(&h).await;
    let client = h.client();
    let token: Value = client.get("/v1/connections/trakt/default/token").await.unwrap();
    let history: Value = client.get("/v1/connections/trakt/default/history").await.unwrap();
    let redb = format!("redb:{}", h.state_dir().join("authkeeper.redb").display());

    // While the daemon runs, its store is in use.
    let (code, _, err) = h.cli(&["store", "copy", "--from", &redb, "--to", &url]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot open redb:"), "{err}");
    daemon.stop().await;

    let (code, out, err) = h.cli(&["store", "copy", "--from", &redb, "--to", &url]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("read 1 connections, 0 pending flows"), "progress is shown: {err}");
    assert!(out.contains("read them back the same"), "{out}");
    // Copying again into the same database would mix two stores.
    let (code, _, err) = h.cli(&["store", "copy", "--from", &redb, "--to", &url]).await;
    assert_eq!(code, 1);
    assert!(err.contains("not empty: nothing was changed"), "{err}");

    // The daemon on the copy hands out the same token and history.
    let daemon = h.start_daemon_with(&["--store", &url]).await;
    let again: Value = client.get("/v1/connections/trakt/default/token").await.unwrap();
    assert_eq!(again, token);
    let history_again: Value = client.get("/v1/connections/trakt/default/history").await.unwrap();
    assert_eq!(history_again, history);
    daemon.stop().await;

    // And back: into a new redb file only.
    let back = h.dir.path().join("back.redb");
    let back_spec = format!("redb:{}", back.display());
    let (code, _, err) = h.cli(&["store", "copy", "--from", &url, "--to", &redb]).await;
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    let (code, _, err) = h.cli(&["store", "copy", "--from", &url, "--to", &back_spec]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::metadata(&back).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777).unwrap(),
        0o600
    );
    let (code, _, err) = h.cli(&["store", "copy", "--from", "redb:/nonexistent/x.redb", "--to", &back_spec]).await;
    assert_eq!(code, 1);
    assert!(err.contains("does not exist: nothing to copy"), "{err}");
    let (code, _, err) = h.cli(&["store", "copy", "--from", "mysql://x", "--to", &back_spec]).await;
    assert_eq!(code, 2, "a usage error: {err}");
    assert!(err.contains("neither redb:PATH nor a postgresql:// URL"), "{err}");

    std::fs::rename(&back, h.state_dir().join("authkeeper.redb")).unwrap();
    let daemon = h.start_daemon().await;
    let back_token: Value = client.get("/v1/connections/trakt/default/token").await.unwrap();
    assert_eq!(back_token, token);
    daemon.stop().await;
}

/// PostgreSQL goes away and comes back. While it is away the daemon keeps handing out the token
/// it holds and refuses a refresh it could not save, saying why; once it is back the daemon
/// refreshes again. Away past the daemon's lease, the daemon stops acting when the lease ends
/// and, when it hears the lease lapsed, exits with an error rather than act on connections
/// another daemon may hold now; restarted, it has lost nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_loses_postgresql_serves_its_token_and_refreshes_again_when_it_is_back() {
    let Some(cluster) = Cluster::for_tests() else { return };
    let url = cluster.database("outage").unwrap();
    let h = Harness::new(fast_trakt(), json!({"store": {"lease_secs": 9}})).await;
    let daemon = h.start_daemon_with(&["--store", &url]).await;
    drop(connect_approved(&h).await);
    let client = h.client();
    let path = "/v1/connections/trakt/default";
    let before: Value = client.get(&format!("{path}/token")).await.unwrap();

    cluster.halt().unwrap();
    let during: Value = client.get(&format!("{path}/token")).await.unwrap();
    assert_eq!(during["access_token"], before["access_token"], "the held token is still handed out");
    match client.post::<ConnectionView>(&format!("{path}/refresh"), None).await.unwrap_err() {
        ClientError::Api { status, message, .. } => {
            assert_eq!(status, 503, "{message}");
            assert!(message.contains("the store cannot be written (cannot reach PostgreSQL"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let health = wait_health(&client, |h| h["store"]["ok"] == false).await;
    assert_eq!(health["store"]["lease"], "held", "{health}");
    let (code, doctor, _) = h.cli(&["doctor", "--store", &url]).await;
    assert_eq!(code, 1, "{doctor}");
    assert!(doctor.contains("PROBLEM cannot use the store postgresql://authkeeper@"), "{doctor}");
    cluster.resume().unwrap();
    wait_health(&client, |h| h["store"]["ok"] == true).await;
    let view: ConnectionView = client.post(&format!("{path}/refresh"), None).await.unwrap();
    assert_eq!((view.state, view.last_error), (StateName::Connected, None));
    let after: Value = client.get(&format!("{path}/token")).await.unwrap();
    assert_ne!(after["access_token"], before["access_token"], "refreshed once the store is back");
    let (code, doctor, _) = h.cli(&["doctor", "--store", &url]).await;
    assert!(doctor.contains("schema 2, 1 connections, 1 daemon(s) sharing it now"), "{doctor}");
    assert_eq!(code, 0, "{doctor}");

    // Away for longer than the lease.
    cluster.halt().unwrap();
    wait_health(&client, |h| h["store"]["lease"] == "lapsed").await;
    // The lease's end on the database's clock, a little after the daemon stopped acting.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    cluster.resume().unwrap();
    assert_eq!(daemon.exited().await, 1);
    assert!(h.log().contains("lease on the shared store lapsed"), "{}", h.log());
    let daemon = h.start_daemon_with(&["--store", &url]).await;
    let token: Value = client.get(&format!("{path}/token")).await.unwrap();
    assert_eq!(token["access_token"], after["access_token"], "nothing lost");
    assert_eq!(h.emulator.reused_refresh_tokens(), 0);
    daemon.stop().await;
}
