//! Ways a credential or a file could be lost, each shut: a missing or broken config at
//! start-up, a crash between an approval and its validation, a store that refuses writes, a
//! `--socket` that names a regular file (a directory, a symlink, a FIFO), and connections no
//! config declared.

mod common;

use authkeeper::client::Client;
use authkeeper::wire::{ConnectionView, WireEvent};
use authkeeper_fixtures::Fault;
use authkeeper_state::{
    Account, Cause, Commit, ConnKey, ConnectionStore, Event, Grant, Machine, Policy, ProfileState, StateName, Store,
    StoreError, Stored, Transition,
};
use common::*;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const PATH: &str = "/v1/connections/trakt/default";

/// Start from a connected `trakt/default`; returns its access token.
async fn connected(h: &Harness) -> String {
    let daemon = h.start_daemon().await;
    connect_approved(h).await;
    let token: Value = h.client().get(&format!("{PATH}/token")).await.unwrap();
    daemon.stop().await;
    token["access_token"].as_str().unwrap().to_owned()
}

/// The connection is as it was: connected, with the same token, and it still validates.
async fn intact(h: &Harness, access: &str) -> ConnectionView {
    let client = h.client();
    let token: Value = client.get(&format!("{PATH}/token")).await.unwrap();
    assert_eq!(token["access_token"], access, "the credential is intact");
    let view: ConnectionView = client.post(&format!("{PATH}/validate"), None).await.unwrap();
    assert_eq!((view.state, view.last_error.as_deref()), (StateName::Connected, None), "and still validates");
    view
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_broken_config_at_start_up_changes_no_stored_connection() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let access = connected(&h).await;
    let good = std::fs::read_to_string(h.config_path()).unwrap();

    for (case, write) in [
        ("missing", None),
        ("unparseable", Some("{\"trakt\": {\"client_id\": ")),
        ("wrong type", Some("{\"trakt\": []}")),
    ] {
        match write {
            None => std::fs::remove_file(h.config_path()).unwrap(),
            Some(text) => std::fs::write(h.config_path(), text).unwrap(),
        }
        let daemon = h.start_daemon().await;
        let view = intact(&h, &access).await;
        // Each such connection says why, in status and in health.
        assert!(
            view.warnings.iter().any(|w| w.contains("settings stored from the last good config")),
            "{case}: {view:?}"
        );
        let health: Value = h.client().get("/v1/health").await.unwrap();
        assert_eq!(health["connections"]["on_stored_settings"], 1, "{case}: {health}");
        assert_eq!(health["config"]["ok"], write.is_none(), "{case}: {health}");
        let (_, out, _) = h.cli(&["status", "--json"]).await;
        assert!(out.contains("settings stored from the last good config"), "{case}: {out}");
        if write.is_none() {
            // The daemon does not write a new file that would declare nothing else.
            let (code, _, err) = h.cli(&["profiles", "add", "trakt"]).await;
            assert_eq!(code, 1, "{err}");
            assert!(err.contains("is missing; it is not recreated"), "{err}");
            assert!(!h.config_path().exists());
        }

        // The good file comes back: nothing changes, and the warning goes.
        let mut events = h.client().events().await.unwrap();
        save_by_rename(&h.config_path(), &good);
        let changed = loop {
            match events.next().await.unwrap().unwrap() {
                WireEvent::ConfigReloaded { changed, .. } => break changed,
                WireEvent::Transition { provider, .. } if provider == "trakt" => panic!("{case}: a transition"),
                _ => {}
            }
        };
        assert!(!changed.contains(&"trakt/default".to_owned()), "{case}: {changed:?}");
        let view = intact(&h, &access).await;
        assert!(view.warnings.is_empty(), "{case}: {view:?}");
        daemon.stop().await;
    }
}

/// Settings edited while the daemon was stopped are stored once it answers (a start compares
/// them after answering), and before it lets go of the store: a config broken after that
/// restart would run the connection on the edited settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_edited_while_stopped_are_stored_once_the_daemon_answers() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let access = connected(&h).await;
    let stored = |h: &Harness| {
        let store = Store::open(&h.state_dir().join("authkeeper.redb")).unwrap();
        let all = store.settings().unwrap();
        let (_, bytes) = all.into_iter().find(|(k, _)| *k == ConnKey::new("trakt", "default")).expect("stored");
        String::from_utf8(bytes).unwrap()
    };
    assert!(!stored(&h).contains("edited while stopped"));
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(h.config_path()).unwrap()).unwrap();
    config["trakt"]["label"] = json!("edited while stopped");
    std::fs::write(h.config_path(), config.to_string()).unwrap();

    let daemon = h.start_daemon().await;
    intact(&h, &access).await;
    daemon.stop().await;
    assert!(stored(&h).contains("edited while stopped"), "{}", stored(&h));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approval_is_on_disk_before_the_validation_call() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let daemon = h.start_daemon().await;
    let client = h.client();
    let reply: authkeeper::wire::ConnectReply = client.post(&format!("{PATH}/connect"), None).await.unwrap();
    // The validation that follows the approval will hang; kill -9 the daemon inside it.
    h.emulator.log().inject("/users/settings", Fault::Hang, 1);
    assert!(h.emulator.approve(reply.user_code().unwrap()));
    h.emulator.log().wait_for_arrivals("/users/settings", 1).await;
    daemon.kill9().await;
    let (issued, _) = h.emulator.latest_tokens().unwrap();

    let daemon = h.start_daemon().await;
    let token: Value = h.client().get(&format!("{PATH}/token")).await.unwrap();
    assert_eq!(token["access_token"], issued.as_str(), "the approved grant survived the crash");
    let history: Vec<Transition> = h.client().get(&format!("{PATH}/history")).await.unwrap();
    assert_eq!(history.last().unwrap().cause, Cause::Approved);
    // The device code was spent: only the stored grant could still connect this account.
    assert_eq!(h.emulator.device_codes_issued(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_path_that_is_a_regular_file_is_refused_and_left_alone() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    std::fs::create_dir_all(h.socket().parent().unwrap()).unwrap();
    std::fs::write(h.socket(), "precious notes\n").unwrap();
    refused_start(&h, "a regular file").await;
    assert_eq!(std::fs::read_to_string(h.socket()).unwrap(), "precious notes\n", "the file is untouched");
}

/// `authkeeper daemon` exits 1, saying the socket path is not a socket.
async fn refused_start(h: &Harness, what: &str) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_authkeeper"))
        .arg("daemon")
        .args(h.args())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{what}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a socket; refusing to replace it"), "{what}: {err}");
}

/// How a test puts something that is not a socket at the socket's path.
type Make<'a> = &'a dyn Fn(&std::path::Path);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_path_that_is_a_directory_a_symlink_or_a_fifo_is_refused_and_left_alone() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let run = h.socket().parent().unwrap().to_owned();
    let target = h.dir.path().join("precious.txt");
    std::fs::write(&target, "precious notes\n").unwrap();
    let make: [(&str, Make); 3] = [
        ("a directory", &|p| std::fs::create_dir_all(p.join("inside")).unwrap()),
        ("a symlink", &|p| std::os::unix::fs::symlink(&target, p).unwrap()),
        ("a fifo", &|p| assert!(std::process::Command::new("mkfifo").arg(p).status().unwrap().success())),
    ];
    for (what, make) in make {
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).unwrap();
        make(&h.socket());
        let kind = std::fs::symlink_metadata(h.socket()).unwrap().file_type();
        refused_start(&h, what).await;
        assert_eq!(std::fs::symlink_metadata(h.socket()).unwrap().file_type(), kind, "{what} is left as it was");
    }
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious notes\n", "the symlink's target is untouched");
}

/// A store whose commits fail while `failing` is set.
struct Flaky {
    inner: Store,
    failing: AtomicBool,
    /// While failing, this many commits still go through first.
    pass: AtomicUsize,
}

impl ConnectionStore for Flaky {
    fn load_all(&self) -> Result<Vec<Stored>, StoreError> {
        self.inner.load_all()
    }
    fn commit(&self, batch: &[Commit]) -> Result<(), StoreError> {
        let passes = || self.pass.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if self.failing.load(Ordering::SeqCst) && !passes() {
            let source = std::io::Error::other("disk full");
            return Err(StoreError::File { path: "flaky.redb".into(), source });
        }
        self.inner.commit(batch)
    }
    fn history(&self, key: &ConnKey) -> Result<Vec<Transition>, StoreError> {
        self.inner.history(key)
    }
    fn forget(&self, key: &ConnKey) -> Result<(), StoreError> {
        self.inner.forget(key)
    }
    fn settings(&self) -> Result<Vec<(ConnKey, Vec<u8>)>, StoreError> {
        self.inner.settings()
    }
    fn settings_digests(&self, keys: &[ConnKey]) -> Result<Vec<Option<u64>>, StoreError> {
        self.inner.settings_digests(keys)
    }
    fn set_settings(&self, rows: &[(ConnKey, Option<Arc<[u8]>>)]) -> Result<(), StoreError> {
        self.inner.set_settings(rows)
    }
    fn profile_states(&self) -> Result<Vec<(ConnKey, ProfileState)>, StoreError> {
        self.inner.profile_states()
    }
    fn set_profile_states(&self, states: &[(ConnKey, ProfileState)]) -> Result<(), StoreError> {
        self.inner.set_profile_states(states)
    }
    fn config_seen(&self, key: &ConnKey) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.config_seen(key)
    }
    fn set_config_seen(&self, key: &ConnKey, digest: &[u8]) -> Result<(), StoreError> {
        self.inner.set_config_seen(key, digest)
    }
    fn allocate_profile(&self, provider: &str, in_use: u64) -> Result<u64, StoreError> {
        self.inner.allocate_profile(provider, in_use)
    }
    fn note_profiles(&self, provider: &str, in_use: u64) -> Result<(), StoreError> {
        self.inner.note_profiles(provider, in_use)
    }
    fn compact_history(&self, cutoff: chrono::DateTime<chrono::Utc>) -> Result<u64, StoreError> {
        self.inner.compact_history(cutoff)
    }
    fn put_link(&self, id: &str, record: &authkeeper_state::LinkRecord) -> Result<(), StoreError> {
        self.inner.put_link(id, record)
    }
    fn link(&self, id: &str) -> Result<Option<authkeeper_state::LinkRecord>, StoreError> {
        self.inner.link(id)
    }
    fn links(&self) -> Result<Vec<(String, authkeeper_state::LinkRecord)>, StoreError> {
        self.inner.links()
    }
    fn claim_link(
        &self,
        id: &str,
        hash: [u8; 32],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<authkeeper_state::LinkRecord>, StoreError> {
        self.inner.claim_link(id, hash, now)
    }
    fn progress_link(
        &self,
        id: &str,
        started: bool,
        outcome: Option<&str>,
        only_unopened: bool,
    ) -> Result<Option<authkeeper_state::LinkRecord>, StoreError> {
        self.inner.progress_link(id, started, outcome, only_unopened)
    }
    fn put_outbox(&self, rows: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        self.inner.put_outbox(rows)
    }
    fn outbox(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.outbox()
    }
    fn remove_outbox(&self, id: &str) -> Result<(), StoreError> {
        self.inner.remove_outbox(id)
    }
    fn export(&self) -> Result<authkeeper_state::dump::Dump, StoreError> {
        self.inner.export()
    }
    fn import(&self, dump: &authkeeper_state::dump::Dump) -> Result<(), StoreError> {
        self.inner.import(dump)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_commit_is_retried_and_the_replaced_refresh_token_is_never_used_again() {
    let emulator = authkeeper_fixtures::TraktEmulator::start(fast_trakt()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now();
    // Validated just now: nothing is due while the test runs but what it asks for.
    let store = connected_store(&emulator, 2, 7 * 86_400, |_| now + chrono::TimeDelta::days(7));
    let flaky = Arc::new(Flaky { inner: store, failing: AtomicBool::new(false), pass: AtomicUsize::new(0) });
    let clock = Arc::new(authkeeper::clock::ManualClock::new(now));
    let running = start_with_store(dir.path(), &emulator, clock.clone(), flaky.clone(), 2).await;
    let client = Client::new(&running.socket);
    let mut events = client.events().await.unwrap();
    let (p1, p2) = ("/v1/connections/trakt/TRAKT-P01", "/v1/connections/trakt/TRAKT-P02");

    // The disk is full: a refresh cannot write that it is under way, so it is refused at once
    // and Trakt is not called.
    flaky.failing.store(true, Ordering::SeqCst);
    let (status, body) = api_error(client.post::<Value>(&format!("{p1}/refresh"), None).await.unwrap_err());
    assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")), "{body}");
    assert!(emulator.log().calls_to("/oauth/token").is_empty(), "Trakt was not called");
    // Freed, it is noticed without any work asking (an empty commit tries it every 5 s).
    flaky.failing.store(false, Ordering::SeqCst);
    wait_health(&client, |h| h["store"]["ok"] == true).await;

    // The disk fills up right after the refresh wrote that it is under way: it rotates P01's
    // token at Trakt, and the commit of the new pair is refused.
    flaky.pass.store(1, Ordering::SeqCst);
    flaky.failing.store(true, Ordering::SeqCst);
    let refresh = tokio::spawn({
        let client = Client::new(&running.socket);
        async move { client.post::<ConnectionView>(&format!("{p1}/refresh"), None).await }
    });
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let WireEvent::Warning { message, .. } = events.next().await.unwrap().unwrap()
                && message.contains("the store refused a change")
            {
                break;
            }
        }
    })
    .await
    .expect("the refused commit is reported");
    // Health says so, and new work is refused rather than done on a state that is not saved.
    let health: Value = client.get("/v1/health").await.unwrap();
    assert_eq!(health["store"]["ok"], false, "{health}");
    assert!(health["store"]["error"].as_str().unwrap().contains("disk full"));
    let (status, body) = api_error(client.post::<Value>(&format!("{p2}/validate"), None).await.unwrap_err());
    assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")), "{body}");

    // The disk is freed: the retried commit goes through, with the rotated pair.
    flaky.failing.store(false, Ordering::SeqCst);
    let view =
        tokio::time::timeout(PATIENCE, refresh).await.expect("the retried commit goes through").unwrap().unwrap();
    assert_eq!((view.state, view.last_error), (StateName::Connected, None));
    let (newest, newest_refresh) = emulator.latest_tokens().unwrap();
    let token: Value = client.get(&format!("{p1}/token")).await.unwrap();
    assert_eq!(token["access_token"], newest.as_str());
    // The next refresh presents the new refresh token (the replaced one would be rejected),
    // once Trakt's one write a second per account allows it.
    clock.advance(chrono::TimeDelta::seconds(2));
    let view: ConnectionView = client.post(&format!("{p1}/refresh"), None).await.unwrap();
    assert_eq!((view.state, view.last_error), (StateName::Connected, None));
    assert_eq!(emulator.refresh_token_uses(&newest_refresh), 1);
    let health: Value = client.get("/v1/health").await.unwrap();
    assert_eq!(health["store"]["ok"], true);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_no_config_declared_are_never_touched_by_config_changes() {
    let emulator = authkeeper_fixtures::TraktEmulator::start(fast_trakt()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now();
    // trakt/TRAKT-P01 is declared; trakt/discord:42 belongs to a chat user, never to the file.
    let store = connected_store(&emulator, 1, 7 * 86_400, |_| now + chrono::TimeDelta::days(6));
    let (access, _) = emulator.issue_grant();
    let mut owner = Machine::new(ConnKey::new("trakt", "discord:42"), now);
    owner.handle(
        &Event::CredentialsSupplied { grant: Grant::bearer(access.clone(), now) },
        now,
        Policy::default(),
        0.0,
    );
    let account = Account { name: "chat-user".into(), id: None };
    let step = owner.handle(&Event::Validated { account, grant: None }, now, Policy::default(), 0.0);
    store.commit(&[Commit { machine: owner, transition: step.transition }]).unwrap();

    let clock = Arc::new(authkeeper::clock::ManualClock::new(now));
    let running = start_with_store(dir.path(), &emulator, clock, Arc::new(store), 1).await;
    let client = Client::new(&running.socket);
    let owner_path = "/v1/connections/trakt/discord:42";
    let view: ConnectionView = client.get(owner_path).await.unwrap();
    assert_eq!(view.state, StateName::Connected, "kept at a start with a good config that does not name it");

    // A good config that drops every profile: the declared one goes, the owner's stays.
    let mut events = client.events().await.unwrap();
    save_by_rename(
        &dir.path().join("config.json"),
        "{\"authkeeper\": {\"base_url\": {\"trakt\": \"http://127.0.0.1:9\"}}}",
    );
    loop {
        if let WireEvent::ConfigReloaded { changed, .. } = events.next().await.unwrap().unwrap() {
            assert!(changed.contains(&"trakt/TRAKT-P01".to_owned()), "{changed:?}");
            assert!(!changed.iter().any(|c| c.contains("discord")), "{changed:?}");
            break;
        }
    }
    let (status, _) = api_error(client.get::<Value>("/v1/connections/trakt/TRAKT-P01").await.unwrap_err());
    assert_eq!(status, 404, "the profile the config stopped declaring is removed");
    let token: Value = client.get(&format!("{owner_path}/token")).await.unwrap();
    assert_eq!(token["access_token"], access.as_str(), "the owner's connection is untouched");
    running.stop().await.unwrap();
}
