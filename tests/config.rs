//! config.json as the user edits it: live reload by every editor's way of saving, import of
//! CrossWatch credentials, profiles, write-back, and files that must change nothing.

mod common;

use authkeeper::client::EventStream;
use authkeeper::wire::{ConnectionView, WireEvent};
use authkeeper_state::{Cause, StateName, Transition};
use common::*;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The events up to and including the next `config_reloaded` (or `config_error`).
async fn until_reload(events: &mut EventStream) -> Vec<WireEvent> {
    tokio::time::timeout(PATIENCE, async {
        let mut seen = Vec::new();
        loop {
            let e = events.next().await.expect("stream open").expect("event");
            let last = matches!(e, WireEvent::ConfigReloaded { .. } | WireEvent::ConfigError { .. });
            seen.push(e);
            if last {
                return seen;
            }
        }
    })
    .await
    .expect("the edit was seen in time")
}

fn transitions(events: &[WireEvent]) -> Vec<(String, StateName, StateName, Cause)> {
    events
        .iter()
        .filter_map(|e| match e {
            WireEvent::Transition { profile, from, to, cause, .. } => Some((profile.clone(), *from, *to, *cause)),
            _ => None,
        })
        .collect()
}

fn config_with(h: &Harness, trakt: Value, extra: Value) -> String {
    let mut v = json!({
        "pairs": [{"source": "plex", "target": "trakt", "mode": "two-way", "enabled": true}],
        "plex": {"server_url": "http://192.168.1.10:32400", "machine_id": "abc"},
        "trakt": trakt,
        "sync": {"interval_minutes": 60, "dry_run": false},
        "ui": {"theme": "dark"},
        "authkeeper": {"base_url": {"trakt": h.emulator.url()}, "backoff_base_secs": 1},
    });
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    serde_json::to_string_pretty(&v).unwrap() + "\n"
}

fn app() -> Value {
    json!({"client_id": "emulator-client-id", "client_secret": "emulator-client-secret"})
}

/// Four ways editors save a file. Tests about something else save with "rename", so that the
/// watcher can never catch a file that is half written by the test itself.
fn save(style: &str, path: &Path, text: &str) {
    let backup = path.with_extension("json~");
    match style {
        "in-place" => std::fs::write(path, text).unwrap(),
        "rename" => save_by_rename(path, text),
        "delete-recreate" => {
            std::fs::remove_file(path).unwrap();
            std::fs::write(path, text).unwrap();
        }
        "vim" => {
            std::fs::rename(path, &backup).unwrap();
            std::fs::write(path, text).unwrap();
            std::fs::remove_file(&backup).unwrap();
        }
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_of_saving_is_seen_and_changes_exactly_the_edited_profile() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    std::fs::write(h.config_path(), config_with(&h, app(), json!({}))).unwrap();
    let daemon = h.start_daemon().await;
    let client = h.client();
    let mut events = client.events().await.unwrap();
    let mut instances = serde_json::Map::new();
    for (i, style) in ["in-place", "rename", "delete-recreate", "vim"].iter().enumerate() {
        let id = format!("TRAKT-P{:02}", i + 1);
        let (access, refresh) = h.emulator.issue_grant();
        instances.insert(id.clone(), json!({"access_token": access, "refresh_token": refresh}));
        let mut trakt = app();
        trakt["instances"] = Value::Object(instances.clone());
        save(style, &h.config_path(), &config_with(&h, trakt, json!({})));

        let mut seen = until_reload(&mut events).await;
        while matches!(seen.last(), Some(WireEvent::ConfigError { .. })) {
            // The file was briefly missing between the editor's steps: reported, nothing changed.
            assert!(transitions(&seen).is_empty(), "{style}: {seen:?}");
            seen = until_reload(&mut events).await;
        }
        let Some(WireEvent::ConfigReloaded { changed, .. }) = seen.last() else { unreachable!() };
        assert_eq!(changed, &[format!("trakt/{id}")], "{style}: only the new profile changed");
        assert_eq!(
            transitions(&seen),
            [
                (id.clone(), StateName::Disconnected, StateName::Pending, Cause::CredentialsSupplied),
                (id.clone(), StateName::Pending, StateName::Connected, Cause::Validated),
            ],
            "{style}"
        );
    }
    // Nothing else happened to any connection: each history holds exactly its own two rows.
    let all: Vec<ConnectionView> = client.get("/v1/connections").await.unwrap();
    let all: Vec<ConnectionView> = all.into_iter().filter(|c| c.provider == "trakt").collect();
    assert_eq!(all.len(), 5);
    for c in &all {
        let history: Vec<Transition> =
            client.get(&format!("/v1/connections/trakt/{}/history", c.profile)).await.unwrap();
        let expected = if c.profile == "default" { 0 } else { 2 };
        assert_eq!(history.len(), expected, "{}: {history:?}", c.profile);
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crosswatch_tokens_are_imported_once_and_end_in_their_true_state() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let (good_access, good_refresh) = h.emulator.issue_grant();
    let (dead_access, dead_refresh) = h.emulator.issue_grant();
    h.emulator.revoke_all_grants();
    let (good_access, good_refresh) = {
        // Revocation took both grants; the user connected again in CrossWatch since.
        let _ = (good_access, good_refresh);
        h.emulator.issue_grant()
    };
    let mut trakt = app();
    trakt["access_token"] = good_access.clone().into();
    trakt["refresh_token"] = good_refresh.into();
    trakt["expires_at"] = (chrono::Utc::now().timestamp() + 86_400).into();
    trakt["instances"] = json!({"TRAKT-P01": {"access_token": dead_access, "refresh_token": dead_refresh}});
    std::fs::write(h.config_path(), config_with(&h, trakt, json!({}))).unwrap();

    let daemon = h.start_daemon().await;
    let client = h.client();
    let good: ConnectionView = client.get("/v1/connections/trakt/default").await.unwrap();
    assert_eq!(good.state, StateName::Connected, "a valid CrossWatch token needs no user action");
    assert_eq!(good.account.as_deref(), Some("sean"));
    let token: Value = client.get("/v1/connections/trakt/default/token").await.unwrap();
    assert_eq!(token["access_token"], good_access.as_str());
    let dead: ConnectionView = client.get("/v1/connections/trakt/TRAKT-P01").await.unwrap();
    assert_eq!(dead.state, StateName::Expired, "a revoked token ends expired");
    daemon.stop().await;

    // From now on the store is the truth: a restart with the same file imports nothing again.
    let daemon = h.start_daemon().await;
    let history: Vec<Transition> = h.client().get("/v1/connections/trakt/default/history").await.unwrap();
    assert_eq!(history.len(), 2, "credentials_supplied, validated — and nothing on restart: {history:?}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_allocated_in_order_never_reused_and_the_file_is_otherwise_untouched() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let before = config_with(&h, app(), json!({"kodi": {"host": "10.0.0.5", "port": 8080}, "x-unknown": [1, 2, 3]}));
    std::fs::write(h.config_path(), &before).unwrap();
    let daemon = h.start_daemon().await;

    let (code, out, err) = h.cli(&["profiles", "add", "trakt"]).await;
    assert_eq!((code, out.trim()), (0, "TRAKT-P01"), "{err}");
    let (_, out, _) = h.cli(&["profiles", "add", "trakt"]).await;
    assert_eq!(out.trim(), "TRAKT-P02");
    let after = std::fs::read_to_string(h.config_path()).unwrap();

    // A pure insertion inside the trakt block: the bytes before and after it are unchanged.
    let p = before.bytes().zip(after.bytes()).take_while(|(a, b)| a == b).count();
    let q = before.bytes().rev().zip(after.bytes().rev()).take_while(|(a, b)| a == b).count().min(before.len() - p);
    assert_eq!(p + q, before.len(), "nothing of the original was removed or rewritten");
    let (trakt_start, trakt_end) = (before.find("\"trakt\": {").unwrap(), before.find("\"ui\": {").unwrap());
    assert!(p > trakt_start && p < trakt_end, "the insertion is inside the trakt block");
    let inserted = &after[p..after.len() - q];
    assert!(inserted.contains("TRAKT-P01") && inserted.contains("TRAKT-P02"), "{inserted}");
    let v: Value = serde_json::from_str(&after).unwrap();
    assert_eq!(v["kodi"]["port"], 8080);

    let (_, status, _) = h.cli(&["status", "trakt"]).await;
    assert!(status.contains("trakt/TRAKT-P01") && status.contains("trakt/TRAKT-P02"), "{status}");

    let (code, _, _) = h.cli(&["profiles", "remove", "trakt", "TRAKT-P02"]).await;
    assert_eq!(code, 0);
    let (status_code, body) = raw(&h.socket(), reqwest::Method::GET, "/v1/connections/trakt/TRAKT-P02", "").await;
    assert_eq!((status_code, body["error"].as_str()), (404, Some("unknown_profile")), "forgotten");
    let (_, out, _) = h.cli(&["profiles", "add", "trakt"]).await;
    assert_eq!(out.trim(), "TRAKT-P03", "an id is never reused");
    let (status_code, body) = raw(&h.socket(), reqwest::Method::POST, "/v1/providers/netflix/profiles", "").await;
    assert_eq!((status_code, body["error"].as_str()), (404, Some("unknown_provider")));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_puts_refreshed_tokens_in_the_file_and_its_own_write_triggers_nothing() {
    let h = Harness::new(authkeeper_fixtures::TraktOptions { token_lifetime: 4, ..fast_trakt() }, json!({})).await;
    let path = h.config_path();
    let extra = json!({"authkeeper": {"base_url": {"trakt": h.emulator.url()}, "write_back": true,
                                      "refresh_margin_secs": 2, "backoff_base_secs": 1}});
    std::fs::write(&path, config_with(&h, app(), extra.clone())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let daemon = h.start_daemon().await;
    let client = h.client();
    let mut events = connect_approved(&h).await;
    h.emulator.set_token_lifetime(3600);

    // connect was written back; then the daemon refreshes on its own and writes that too.
    let mut refreshed_at = None;
    let written = tokio::time::timeout(PATIENCE, async {
        loop {
            match events.next().await.unwrap().unwrap() {
                WireEvent::Transition { cause: Cause::Refreshed, .. } => refreshed_at = Some(std::time::Instant::now()),
                WireEvent::ConfigWritten { .. } if refreshed_at.is_some() => return std::time::Instant::now(),
                WireEvent::Transition { cause, .. } if cause != Cause::Refreshed => panic!("unexpected {cause:?}"),
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    let lag = written - refreshed_at.unwrap();
    assert!(lag < std::time::Duration::from_secs(1), "written {lag:?} after the refresh");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let (access, refresh) = h.emulator.latest_tokens().unwrap();
    assert_eq!(v["trakt"]["access_token"], access.as_str());
    assert_eq!(v["trakt"]["refresh_token"], refresh.as_str());
    assert!(v["trakt"]["expires_at"].as_i64().unwrap() > chrono::Utc::now().timestamp());
    assert_eq!(v["sync"]["interval_minutes"], 60, "the rest is kept");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "mode kept");

    // The watcher sees the daemon's own write and does nothing; a user's edit after it is the
    // next thing to be reloaded, with no transition before it.
    let mut edited = v.clone();
    edited["ui"]["theme"] = "light".into();
    save("rename", &path, &serde_json::to_string_pretty(&edited).unwrap());
    let seen = until_reload(&mut events).await;
    assert!(transitions(&seen).is_empty(), "{seen:?}");
    let Some(WireEvent::ConfigReloaded { changed, .. }) = seen.last() else { panic!("{seen:?}") };
    assert!(changed.is_empty(), "a theme change touches no connection: {changed:?}");

    // A file others can read gets no token: refused with a clear warning, the file untouched.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let untouched = std::fs::read_to_string(&path).unwrap();
    let _: ConnectionView = client.post("/v1/connections/trakt/default/refresh", None).await.unwrap();
    let warning = tokio::time::timeout(PATIENCE, async {
        loop {
            if let WireEvent::Warning { message, .. } = events.next().await.unwrap().unwrap() {
                return message;
            }
        }
    })
    .await
    .unwrap();
    assert!(warning.contains("group or others can read it"), "{warning}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), untouched);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_changes_nothing_and_is_reported_with_its_position() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let path = h.config_path();
    let good = config_with(&h, app(), json!({}));
    std::fs::write(&path, &good).unwrap();
    let daemon = h.start_daemon().await;
    let client = h.client();
    let mut events = connect_approved(&h).await;
    let before: Vec<ConnectionView> = client.get("/v1/connections").await.unwrap();

    let wrong_type = good.replace("\"client_id\": \"emulator-client-id\"", "\"client_id\": 42");
    let bad_cases = [
        ("invalid JSON", good.replace("\"ui\"", "ui"), Some(true)),
        ("half written", good[..good.len() / 2].to_owned(), Some(true)),
        ("wrong type in a known block", wrong_type, Some(true)),
        (
            "unknown provider under authkeeper",
            good.replace("\"base_url\": {", "\"base_url\": {\"netflix\": \"http://x\", "),
            None,
        ),
        ("malformed profile id", good.replace("\"client_id\"", "\"instances\": {\"P1\": {}}, \"client_id\""), None),
    ];
    for (what, text, positioned) in bad_cases {
        assert_ne!(text, good, "{what}: the case changes the file");
        save("rename", &path, &text);
        let seen = until_reload(&mut events).await;
        let Some(WireEvent::ConfigError { error, line, column, .. }) = seen.last() else { panic!("{what}: {seen:?}") };
        assert!(!error.is_empty());
        if positioned.is_some() {
            assert!(line.unwrap() > 0 && column.is_some(), "{what}: has a position");
        }
        assert!(transitions(&seen).is_empty(), "{what}");
        let health: Value = client.get("/v1/health").await.unwrap();
        assert_eq!(health["config"]["ok"], false, "{what}");
        let now: Vec<ConnectionView> = client.get("/v1/connections").await.unwrap();
        assert_eq!(now, before, "{what}: every connection is as it was");
        let token: Value = client.get("/v1/connections/trakt/default/token").await.unwrap();
        assert!(token["access_token"].is_string(), "{what}: tokens are still served");
    }
    std::fs::remove_file(&path).unwrap();
    let seen = until_reload(&mut events).await;
    assert!(matches!(seen.last(), Some(WireEvent::ConfigError { error, .. }) if error.contains("disappeared")));
    let now: Vec<ConnectionView> = client.get("/v1/connections").await.unwrap();
    assert_eq!(now, before, "a vanished file removes nothing");

    save("rename", &path, &good);
    let seen = until_reload(&mut events).await;
    assert!(matches!(seen.last(), Some(WireEvent::ConfigReloaded { .. })), "{seen:?}");
    let health: Value = client.get("/v1/health").await.unwrap();
    assert_eq!(health["config"]["ok"], true);
    assert!(h.log().contains("the last good config stays in force"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_id_revalidates_and_a_removed_profile_is_disconnected_with_its_history_kept() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let (access, refresh) = h.emulator.issue_grant();
    let mut trakt = app();
    trakt["instances"] = json!({"TRAKT-P01": {"access_token": access, "refresh_token": refresh}});
    std::fs::write(h.config_path(), config_with(&h, trakt.clone(), json!({}))).unwrap();
    let daemon = h.start_daemon().await;
    let client = h.client();
    let mut events = client.events().await.unwrap();
    let view: ConnectionView = client.get("/v1/connections/trakt/TRAKT-P01").await.unwrap();
    assert_eq!(view.state, StateName::Connected);

    // The user points the profile at another app id that Trakt does not know: revalidation
    // runs; a 403 on the API key is no verdict on the user's token, so it stays connected.
    trakt["instances"]["TRAKT-P01"]["client_id"] = "another-app".into();
    save("rename", &h.config_path(), &config_with(&h, trakt.clone(), json!({})));
    let seen = until_reload(&mut events).await;
    let Some(WireEvent::ConfigReloaded { changed, .. }) = seen.last() else { panic!("{seen:?}") };
    assert_eq!(changed, &["trakt/TRAKT-P01"]);
    let view: ConnectionView = client.get("/v1/connections/trakt/TRAKT-P01").await.unwrap();
    assert_eq!(view.state, StateName::Connected);
    assert!(view.last_error.as_deref().unwrap_or("").contains("403"), "{view:?}");

    // Back to the right id: revalidation succeeds (a `validated` row).
    trakt["instances"]["TRAKT-P01"]["client_id"] = "emulator-client-id".into();
    save("rename", &h.config_path(), &config_with(&h, trakt.clone(), json!({})));
    let seen = until_reload(&mut events).await;
    assert_eq!(
        transitions(&seen),
        [("TRAKT-P01".to_owned(), StateName::Connected, StateName::Connected, Cause::Validated)]
    );

    // Removed from the file: disconnected (cause removed), forgotten, history kept.
    trakt.as_object_mut().unwrap().remove("instances");
    save("rename", &h.config_path(), &config_with(&h, trakt, json!({})));
    let seen = until_reload(&mut events).await;
    assert_eq!(
        transitions(&seen),
        [("TRAKT-P01".to_owned(), StateName::Connected, StateName::Disconnected, Cause::Removed)]
    );
    let all: Vec<ConnectionView> = client.get("/v1/connections").await.unwrap();
    let trakt: Vec<&ConnectionView> = all.iter().filter(|c| c.provider == "trakt").collect();
    assert_eq!(trakt.len(), 1, "only trakt/default is left");
    let history: Vec<Transition> = client.get("/v1/connections/trakt/TRAKT-P01/history").await.unwrap();
    let causes: Vec<Cause> = history.iter().map(|t| t.cause).collect();
    assert_eq!(causes, [Cause::CredentialsSupplied, Cause::Validated, Cause::Validated, Cause::Removed]);
    assert_eq!(h.emulator.log().calls_to("/oauth/revoke").len(), 0, "removal is not a logout");
    daemon.stop().await;
}

/// Another editor holding config.json's lock (a second daemon mid-edit, a script, a daemon
/// stopped with `SIGSTOP`): the daemon's edit waits for it and then builds on what it wrote, and
/// gives up with a clear 503, the file untouched, once the request time limit has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_waits_for_another_editors_lock_builds_on_its_change_and_gives_up_clearly() {
    let h = Harness::new(fast_trakt(), json!({"request_timeout_secs": 1})).await;
    let daemon = h.start_daemon().await;
    let path = h.config_path();
    let read = |path: &Path| -> Value { serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap() };

    // Held past the limit.
    let before = std::fs::read(&path).unwrap();
    let held = authkeeper::config_edit::lock(&path, std::time::Duration::ZERO).await.unwrap();
    let refused = h.client().post::<Value>("/v1/providers/trakt/profiles", None).await.unwrap_err();
    let (status, body) = api_error(refused);
    assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")), "{body}");
    assert!(body["message"].as_str().unwrap_or_default().contains("being edited by another process"), "{body}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing was changed");

    // Held for a moment, in which the other editor reads the file and writes its own change.
    let client = h.client();
    let adding = tokio::spawn(async move { client.post::<Value>("/v1/providers/trakt/profiles", None).await });
    let mut theirs = read(&path);
    theirs["trakt"]["instances"]["TRAKT-P07"] = json!({});
    // Time for an editor that ignored the lock to write first (and be overwritten below).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    save_by_rename(&path, &theirs.to_string());
    drop(held);
    let added = adding.await.unwrap().expect("the edit went through once the lock was free");
    let profile = added["profile"].as_str().unwrap_or_default().to_owned();
    let instances = read(&path)["trakt"]["instances"].clone();
    assert!(instances.get("TRAKT-P07").is_some(), "the other editor's change is kept: {instances}");
    assert!(instances.get(&profile).is_some(), "and the daemon's ({profile}) is there too: {instances}");
    daemon.stop().await;
}
