//! The redb store: batched durable commits, reloads, history, flows, file mode, migrations.

use authkeeper_state::{
    Commit, ConnKey, Event, Grant, Machine, PendingFlow, Policy, Secret, StateName, Store, StoreError, Stored,
};
use chrono::{TimeDelta, TimeZone, Utc};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

fn flow() -> PendingFlow {
    let t = Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap();
    PendingFlow {
        kind: "device_pin".into(),
        user_code: Some("CODE1234".into()),
        verification_url: Some("https://trakt.tv/activate".into()),
        authorize_url: None,
        issued_at: t,
        expires_at: t + TimeDelta::seconds(600),
        interval_secs: Some(5),
        secrets: BTreeMap::from([("device_code".to_owned(), Secret::new("dev-code"))]),
    }
}

fn machines(all: Vec<Stored>) -> Vec<Machine> {
    all.into_iter().map(|s| std::sync::Arc::unwrap_or_clone(s.machine)).collect()
}

fn step(m: &mut Machine, e: Event) -> Commit {
    let s = m.handle(&e, Utc::now(), Policy::default(), 0.0);
    Commit { machine: m.clone(), transition: s.transition }
}

#[test]
fn a_batch_commits_many_connections_and_reloads_them_with_their_flows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("authkeeper.redb");
    {
        let store = Store::open(&path).unwrap();
        // Every third on a flow: the flows are read alongside the connections, in key order.
        let batch: Vec<Commit> = (0..50)
            .map(|i| {
                let mut m = Machine::new(ConnKey::new("trakt", format!("TRAKT-P{i:02}")), Utc::now());
                match i % 3 {
                    0 => step(&mut m, Event::ConnectRequested { flow: flow() }),
                    _ => step(&mut m, Event::CredentialsSupplied { grant: Grant::bearer("a", Utc::now()) }),
                }
            })
            .collect();
        store.commit(&batch).unwrap();
    }
    let store = Store::open(&path).unwrap();
    let all = machines(store.load_all().unwrap());
    assert_eq!(all.len(), 50);
    for m in &all {
        assert_eq!(m.state_name(), StateName::Pending);
        let number: u32 = m.key().profile.strip_prefix("TRAKT-P").unwrap().parse().unwrap();
        match number % 3 {
            0 => assert_eq!(m.pending_flow().unwrap().secret("device_code").unwrap().expose(), "dev-code"),
            _ => assert!(m.connection().flow.is_none(), "{} has no flow", m.key()),
        }
        let h = store.history(m.key()).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].to, StateName::Pending);
    }
}

#[test]
fn the_flow_row_goes_when_the_flow_ends() {
    let store = Store::in_memory().unwrap();
    let mut m = Machine::new(ConnKey::new("trakt", "default"), Utc::now());
    store.commit(&[step(&mut m, Event::ConnectRequested { flow: flow() })]).unwrap();
    store.commit(&[step(&mut m, Event::Cancel)]).unwrap();
    let back = machines(store.load_all().unwrap());
    assert_eq!(back[0].state_name(), StateName::Disconnected);
    assert!(back[0].connection().flow.is_none());
    let causes: Vec<_> = store.history(m.key()).unwrap().iter().map(|t| t.cause).collect();
    assert_eq!(serde_json::to_string(&causes).unwrap(), r#"["connect_requested","cancelled"]"#);
}

#[test]
fn history_is_bounded_and_keeps_the_newest() {
    let store = Store::in_memory().unwrap();
    let mut m = Machine::new(ConnKey::new("trakt", "default"), Utc::now());
    store.commit(&[step(&mut m, Event::CredentialsSupplied { grant: Grant::bearer("a", Utc::now()) })]).unwrap();
    let account = authkeeper_state::Account { name: "me".into(), id: None };
    store.commit(&[step(&mut m, Event::Validated { account: account.clone(), grant: None })]).unwrap();
    let total = authkeeper_state::store::HISTORY_LIMIT + 40;
    for _ in 2..total {
        store.commit(&[step(&mut m, Event::Validated { account: account.clone(), grant: None })]).unwrap();
    }
    let h = store.history(m.key()).unwrap();
    assert_eq!(h.len() as u64, authkeeper_state::store::HISTORY_LIMIT);
    assert!(h.windows(2).all(|w| w[0].at <= w[1].at), "oldest first");
    assert!(h.iter().all(|t| t.to == StateName::Connected), "the oldest rows were dropped");

    // Compaction drops what lies beyond the limit, and nothing else.
    let long_ago = Utc::now() - TimeDelta::days(3650);
    assert_eq!(store.compact_history(long_ago).unwrap(), 40);
    assert_eq!(store.history(m.key()).unwrap(), h);
    assert_eq!(store.compact_history(long_ago).unwrap(), 0);

    // Left to commits alone, a connection never holds more than four times the limit.
    let limit = authkeeper_state::store::HISTORY_LIMIT;
    for _ in 0..4 * limit {
        store.commit(&[step(&mut m, Event::Validated { account: account.clone(), grant: None })]).unwrap();
    }
    let removed = store.compact_history(long_ago).unwrap();
    assert!(removed < 3 * limit, "some rows were dropped by the commits themselves: {removed}");
    assert_eq!(store.history(m.key()).unwrap().len() as u64, limit);
}

#[test]
fn the_database_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    Store::open(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_new_file_is_migrated_to_the_current_schema_and_a_newer_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), authkeeper_state::store::SCHEMA_VERSION);
    drop(store);
    // Re-opening an up-to-date file is a no-op.
    assert_eq!(Store::open(&path).unwrap().schema_version().unwrap(), authkeeper_state::store::SCHEMA_VERSION);

    // Simulate a file from a future build.
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let def: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        txn.open_table(def).unwrap().insert("schema_version", 99).unwrap();
        txn.commit().unwrap();
    }
    match Store::open(&path) {
        Err(StoreError::TooNew { found: 99, supported: authkeeper_state::store::SCHEMA_VERSION }) => {}
        other => panic!("expected TooNew, got {:?}", other.err()),
    }
}

#[test]
fn a_second_open_of_the_same_file_fails_instead_of_corrupting_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let _first = Store::open(&path).unwrap();
    assert!(Store::open(&path).is_err());
}

#[test]
fn a_version_1_file_is_migrated_and_keeps_its_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    // A file as version 1 wrote it: JSON rows in statig's encoding, no config_seen table.
    let row = r#"{"shared_storage":{"key":{"provider":"trakt","profile":"default"},"since":"2026-11-23T12:00:00Z","credentials":null,"account":null,"validated_at":null,"last_error":null,"failures":0,"next_attempt_at":null},"state":{"Pending":{"kind":"flow"}}}"#;
    let flow_row = r#"{"device_code":"dev-code","user_code":"CODE1234","verification_url":"https://trakt.tv/activate","issued_at":"2026-11-23T12:00:00Z","expires_at":"2026-11-23T12:10:00Z","interval_secs":5}"#;
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let conns: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("connections");
        let flows: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("flows");
        let history: redb::TableDefinition<(&str, u64), &[u8]> = redb::TableDefinition::new("history");
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        txn.open_table(conns).unwrap().insert("trakt/default", row.as_bytes()).unwrap();
        txn.open_table(flows).unwrap().insert("trakt/default", flow_row.as_bytes()).unwrap();
        txn.open_table(history).unwrap();
        txn.open_table(meta).unwrap().insert("schema_version", 1).unwrap();
        txn.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), authkeeper_state::store::SCHEMA_VERSION);
    let all = machines(store.load_all().unwrap());
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].state_name(), StateName::Pending);
    assert_eq!(all[0].pending_flow(), Some(&flow()));
    let key = ConnKey::new("trakt", "default");
    assert_eq!(store.config_seen(&key).unwrap(), None, "the new table exists and is empty");
    store.set_config_seen(&key, b"digest").unwrap();
    assert_eq!(store.config_seen(&key).unwrap().as_deref(), Some(&b"digest"[..]));
}

#[test]
fn profile_numbers_are_never_reused() {
    let store = Store::in_memory().unwrap();
    assert_eq!(store.allocate_profile("trakt", 0).unwrap(), 1);
    assert_eq!(store.allocate_profile("trakt", 0).unwrap(), 2);
    // The config holds TRAKT-P07 (added by hand): the next is above it.
    assert_eq!(store.allocate_profile("trakt", 7).unwrap(), 8);
    // Removing profiles from the config does not bring numbers back.
    assert_eq!(store.allocate_profile("trakt", 1).unwrap(), 9);
    store.note_profiles("simkl", 4).unwrap();
    assert_eq!(store.allocate_profile("simkl", 0).unwrap(), 5);
}

/// Found while writing the config fuzz target: a config holding `TRAKT-P18446744073709551615`
/// (u64::MAX) made the next allocation overflow (a panic in debug builds, `TRAKT-P00` and
/// numbers reused from then on in release builds).
#[test]
fn the_largest_profile_number_allocates_no_more() {
    let store = Store::in_memory().unwrap();
    let refused = store.allocate_profile("trakt", u64::MAX).unwrap_err();
    assert!(matches!(refused, StoreError::NoProfileNumber(ref p) if p == "trakt"), "{refused}");
    assert_eq!(store.allocate_profile("trakt", 3).unwrap(), 4, "nothing was recorded by the refusal");
}

#[test]
fn forgetting_a_connection_keeps_its_history() {
    let store = Store::in_memory().unwrap();
    let mut m = Machine::new(ConnKey::new("trakt", "TRAKT-P01"), Utc::now());
    store.commit(&[step(&mut m, Event::ConnectRequested { flow: flow() })]).unwrap();
    store.commit(&[step(&mut m, Event::Remove)]).unwrap();
    store.forget(m.key()).unwrap();
    assert!(machines(store.load_all().unwrap()).is_empty());
    assert_eq!(store.history(m.key()).unwrap().len(), 2);
}

#[test]
fn compacting_history_drops_old_rows_but_keeps_each_connections_newest() {
    let store = Store::in_memory().unwrap();
    let t0 = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
    let at = |days: i64| t0 + TimeDelta::days(days);
    let mut a = Machine::new(ConnKey::new("trakt", "A"), t0);
    let mut b = Machine::new(ConnKey::new("trakt", "B"), t0);
    let flow_ev = || Event::ConnectRequested { flow: flow() };
    for (m, day) in [(&mut a, 0), (&mut b, 1)] {
        let s = m.handle(&flow_ev(), at(day), Policy::default(), 0.0);
        store.commit(&[Commit { machine: m.clone(), transition: s.transition }]).unwrap();
        let s = m.handle(&Event::Cancel, at(day + 1), Policy::default(), 0.0);
        store.commit(&[Commit { machine: m.clone(), transition: s.transition }]).unwrap();
    }
    let s = a.handle(&flow_ev(), at(400), Policy::default(), 0.0);
    store.commit(&[Commit { machine: a.clone(), transition: s.transition }]).unwrap();

    let removed = store.compact_history(at(100)).unwrap();
    assert_eq!(removed, 3, "A's two old rows and B's older one");
    assert_eq!(store.history(a.key()).unwrap().len(), 1);
    let b_rows = store.history(b.key()).unwrap();
    assert_eq!(b_rows.len(), 1, "B keeps its newest row even though it is old");
    assert_eq!(b_rows[0].at, at(2));
}

/// The store remembers where each history ends so that an append does not scan; the sequence
/// must carry on across a reopen (nothing remembered), a compaction (oldest rows moved) and a
/// batch that holds the same connection twice.
#[test]
fn history_sequences_carry_on_across_reopen_compaction_and_repeats_in_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("authkeeper.redb");
    let mut m = Machine::new(ConnKey::new("trakt", "default"), Utc::now());
    let causes = |store: &Store, m: &Machine| -> String {
        let h = store.history(m.key()).unwrap();
        assert!(h.windows(2).all(|w| w[0].at <= w[1].at), "oldest first");
        serde_json::to_string(&h.iter().map(|t| t.cause).collect::<Vec<_>>()).unwrap()
    };
    {
        let store = Store::open(&path).unwrap();
        store.commit(&[step(&mut m, Event::ConnectRequested { flow: flow() })]).unwrap();
        store.commit(&[step(&mut m, Event::Cancel)]).unwrap();
    }
    let store = Store::open(&path).unwrap();
    store.commit(&[step(&mut m, Event::ConnectRequested { flow: flow() })]).unwrap();
    assert_eq!(causes(&store, &m), r#"["connect_requested","cancelled","connect_requested"]"#);

    let removed = store.compact_history(Utc::now() + TimeDelta::days(1)).unwrap();
    assert_eq!(removed, 2, "all but the newest row");
    let batch = [step(&mut m, Event::Cancel), step(&mut m, Event::ConnectRequested { flow: flow() })];
    store.commit(&batch).unwrap();
    assert_eq!(causes(&store, &m), r#"["connect_requested","cancelled","connect_requested"]"#);
    assert_eq!(
        machines(store.load_all().unwrap())[0].connection().flow.as_deref(),
        Some(&flow()),
        "the flow row is kept"
    );
}

#[test]
fn connections_committing_together_keep_their_own_history_and_a_forgotten_one_continues_it() {
    let store = Store::in_memory().unwrap();
    let account = authkeeper_state::Account { name: "me".into(), id: None };
    let mut all: Vec<Machine> =
        (0..50).map(|i| Machine::new(ConnKey::new("trakt", format!("TRAKT-P{i:02}")), Utc::now())).collect();
    let batch: Vec<Commit> =
        all.iter_mut().map(|m| step(m, Event::CredentialsSupplied { grant: Grant::bearer("a", Utc::now()) })).collect();
    store.commit(&batch).unwrap();
    // Every connection validates a different number of times, all in shared batches.
    for round in 0..10 {
        let batch: Vec<Commit> = all
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| i % 10 >= round)
            .map(|(_, m)| step(m, Event::Validated { account: account.clone(), grant: None }))
            .collect();
        store.commit(&batch).unwrap();
    }
    for (i, m) in all.iter().enumerate() {
        let h = store.history(m.key()).unwrap();
        assert_eq!(h.len(), 2 + i % 10, "{}", m.key());
        assert_eq!(h[0].from, StateName::Disconnected);
        assert_eq!(h.last().unwrap().to, StateName::Connected);
    }

    // Forgotten, then connected again: its earlier rows are still there, and the new follow.
    let m = &mut all[3];
    store.commit(&[step(m, Event::Remove)]).unwrap();
    store.forget(m.key()).unwrap();
    assert_eq!(store.history(m.key()).unwrap().len(), 6);
    let mut again = Machine::new(m.key().clone(), Utc::now());
    store.commit(&[step(&mut again, Event::CredentialsSupplied { grant: Grant::bearer("b", Utc::now()) })]).unwrap();
    let h = store.history(again.key()).unwrap();
    assert_eq!(h.len(), 7);
    assert_eq!((h[5].to, h[6].from), (StateName::Disconnected, StateName::Disconnected));
    assert_eq!(store.history(all[4].key()).unwrap().len(), 6, "its neighbour is untouched");
}

/// Above the size read by one thread and decoded by another, and not a whole number of their batches.
const LARGE: usize = 9_001;

fn large_key(i: usize) -> ConnKey {
    ConnKey::new("trakt", format!("TRAKT-P{i:05}"))
}

/// A store of [`LARGE`] connections, every third with a pending flow, the others connected with
/// token `a{i}`; every fifth declared by a config, with settings naming it.
fn large_store(path: &std::path::Path) {
    let store = Store::open(path).unwrap();
    let batch: Vec<Commit> = (0..LARGE)
        .map(|i| {
            let mut m = Machine::new(large_key(i), Utc::now());
            match i % 3 {
                0 => step(&mut m, Event::ConnectRequested { flow: flow() }),
                _ => step(&mut m, Event::CredentialsSupplied { grant: Grant::bearer(format!("a{i}"), Utc::now()) }),
            }
        })
        .collect();
    store.commit(&batch).unwrap();
    let rows: Vec<_> = (0..LARGE)
        .step_by(5)
        .map(|i| (large_key(i), Some(std::sync::Arc::from(large_key(i).to_string().into_bytes()))))
        .collect();
    store.set_settings(&rows).unwrap();
}

#[test]
fn a_large_store_read_and_decoded_apart_gives_each_connection_once_with_its_own_flow_and_its_settings_apart() {
    let (n, key) = (LARGE, large_key);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("authkeeper.redb");
    large_store(&path);
    let store = Store::open(&path).unwrap();
    let all = store.load_all().unwrap();
    let keys: Vec<ConnKey> = all.iter().map(|s| s.machine.key().clone()).collect();
    assert_eq!(keys, (0..n).map(key).collect::<Vec<_>>(), "each once, in key order");
    for (i, s) in all.iter().enumerate() {
        let m = &s.machine;
        match i % 3 {
            0 => assert_eq!(m.pending_flow().unwrap().secret("device_code").unwrap().expose(), "dev-code"),
            _ => {
                assert!(m.connection().flow.is_none(), "{} has no flow", m.key());
                assert_eq!(m.connection().grant.as_ref().unwrap().access_token.expose(), format!("a{i}"));
            }
        }
    }
    let declared =
        |i: usize| i.is_multiple_of(5).then(|| authkeeper_state::store::declared_digest(key(i).to_string().as_bytes()));
    let digests = store.settings_digests(&keys).unwrap();
    assert_eq!(digests, (0..n).map(declared).collect::<Vec<_>>(), "each key's settings, in the order asked");
}

#[test]
fn an_undecodable_row_in_a_large_store_fails_the_load_naming_it_and_stays_stored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("authkeeper.redb");
    large_store(&path);
    // One row in the middle as no build writes it: a history reference, then format 255.
    let broken = large_key(4_500).to_string();
    let garbage = [&[0u8; 12][..], &[255, 1, 2, 3]].concat();
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let conns: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("connections");
        txn.open_table(conns).unwrap().insert(broken.as_str(), garbage.as_slice()).unwrap();
        txn.commit().unwrap();
    }
    for _ in 0..2 {
        let store = Store::open(&path).unwrap();
        match store.load_all() {
            Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, broken),
            Err(other) => panic!("expected the row named as corrupt, got {other}"),
            Ok(all) => panic!("expected an error, got {} connections", all.len()),
        }
        // Nothing was removed: its neighbours and the row itself are as they were.
        assert_eq!(store.scan_rows().unwrap().0, LARGE as u64);
    }
}
