//! The PostgreSQL store against a throwaway cluster: it behaves as the redb store does, call for
//! call; it migrates and refuses a newer schema; it seals; daemons sharing it never get the
//! same profile number; and a store copied from redb to PostgreSQL and back is identical.
//! Without PostgreSQL installed the tests say so and pass, unless `AUTHKEEPER_REQUIRE_POSTGRES`
//! is set (as in CI).

use authkeeper_pgstore::PgStore;
use authkeeper_pgstore::cluster::Cluster;
use authkeeper_state::history::HISTORY_LIMIT;
use authkeeper_state::{
    Account, Commit, ConnKey, ConnectionStore, Event, Grant, LinkRecord, Machine, PendingFlow, Policy, ProfileState,
    Sealer, Secret, SecretsKey, Store, StoreError, records,
};
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 2, 9, 0, 0).unwrap()
}

fn flow(at: DateTime<Utc>, code: &str) -> PendingFlow {
    PendingFlow {
        kind: "device_pin".into(),
        user_code: Some("ABCD1234".into()),
        verification_url: Some("https://trakt.tv/activate".into()),
        authorize_url: None,
        issued_at: at,
        expires_at: at + TimeDelta::minutes(10),
        interval_secs: Some(5),
        secrets: BTreeMap::from([("device_code".to_owned(), Secret::new(code))]),
    }
}

fn grant(n: u32, at: DateTime<Utc>) -> Grant {
    Grant {
        refresh_token: Some(Secret::new(format!("refresh-{n}"))),
        expires_at: Some(at + TimeDelta::hours(1)),
        ..Grant::bearer(format!("access-{n}"), at)
    }
}

fn step(m: &mut Machine, e: Event, at: DateTime<Utc>) -> Commit {
    let s = m.handle(&e, at, Policy::default(), 0.0);
    Commit { machine: m.clone(), transition: s.transition }
}

fn link(profile: &str, expires_at: DateTime<Utc>) -> LinkRecord {
    LinkRecord {
        provider: "trakt".into(),
        profile: profile.into(),
        secret_hash: [7; 32],
        expires_at,
        session_hash: None,
        started: false,
        outcome: None,
    }
}

/// What a caller sees of a store, call by call, through a fixed script of calls.
fn exercise(store: &dyn ConnectionStore) -> Vec<String> {
    let mut seen = Vec::new();
    let at = |s: i64| t0() + TimeDelta::seconds(s);
    let account = Account { name: "sean".into(), id: Some("42".into()) };
    // Connections in batches: pending flows, approvals, a refresh storm, a connection twice in
    // one batch, a flow cancelled.
    let mut machines: Vec<Machine> =
        (0..40).map(|i| Machine::new(ConnKey::new("trakt", format!("TRAKT-P{i:02}")), at(0))).collect();
    let batch: Vec<Commit> = machines
        .iter_mut()
        .enumerate()
        .map(|(i, m)| step(m, Event::ConnectRequested { flow: flow(at(0), &format!("dev-{i}")) }, at(1)))
        .collect();
    store.commit(&batch).unwrap();
    let batch: Vec<Commit> = machines[..30]
        .iter_mut()
        .enumerate()
        .map(|(i, m)| step(m, Event::Approved { grant: grant(i as u32, at(2)) }, at(2)))
        .collect();
    store.commit(&batch).unwrap();
    let mut batch: Vec<Commit> = machines[..30]
        .iter_mut()
        .map(|m| step(m, Event::Validated { account: account.clone(), grant: None }, at(3)))
        .collect();
    batch.push(step(&mut machines[0], Event::Refreshed { grant: grant(100, at(4)) }, at(4)));
    batch.push(step(&mut machines[39], Event::Cancel, at(4)));
    store.commit(&batch).unwrap();
    // One connection's history past its trim point.
    for n in 0..(4 * HISTORY_LIMIT as u32) {
        store.commit(&[step(&mut machines[1], Event::Refreshed { grant: grant(1000 + n, at(5)) }, at(5))]).unwrap();
    }
    let loaded = store.load_all().unwrap();
    seen.push(format!("{} connections", loaded.len()));
    for s in &loaded {
        let m = &s.machine;
        let flow = m.connection().flow.as_deref().map(records::encode_flow);
        let settings = store.settings_digests(std::slice::from_ref(m.key())).unwrap();
        seen.push(format!("{} {:?} {:?} {:?}", m.key(), records::encode_connection(m), flow, settings));
    }
    for m in [&machines[0], &machines[1], &machines[39]] {
        let history = store.history(m.key()).unwrap();
        seen.push(format!("history {} {}: {:?}", m.key(), history.len(), history.first()));
    }
    // Settings, provider state, config digests.
    let key = |p: &str| ConnKey::new("trakt", p);
    store
        .set_settings(&[
            (key("TRAKT-P00"), Some(b"one".as_slice().into())),
            (key("TRAKT-P01"), Some(b"two".as_slice().into())),
        ])
        .unwrap();
    store.set_settings(&[(key("TRAKT-P01"), None)]).unwrap();
    seen.push(format!("settings {:?}", store.settings().unwrap()));
    let asked = [key("TRAKT-P00"), key("TRAKT-P01"), key("TRAKT-P02")];
    seen.push(format!("digests {:?}", store.settings_digests(&asked).unwrap()));
    let mut state = ProfileState::default();
    state.secrets.insert("server_token".into(), Secret::new("server-token-1"));
    store.set_profile_states(&[(ConnKey::new("plex", "default"), state.clone())]).unwrap();
    seen.push(format!(
        "{:?}",
        store
            .profile_states()
            .unwrap()
            .iter()
            .map(|(k, s)| (k.to_string(), records::encode_profile_state(s)))
            .collect::<Vec<_>>()
    ));
    store.set_config_seen(&key("TRAKT-P00"), b"digest").unwrap();
    seen.push(format!(
        "seen {:?} {:?}",
        store.config_seen(&key("TRAKT-P00")).unwrap(),
        store.config_seen(&key("nope")).unwrap()
    ));
    // Profile numbers.
    seen.push(format!("allocated {}", store.allocate_profile("trakt", 3).unwrap()));
    seen.push(format!("allocated {}", store.allocate_profile("trakt", 1).unwrap()));
    store.note_profiles("trakt", 9).unwrap();
    seen.push(format!("allocated {}", store.allocate_profile("trakt", 0).unwrap()));
    seen.push(format!("{:?}", store.allocate_profile("plex", u64::MAX).map_err(|e| e.to_string())));
    // Links: a second for the same profile ends the first, a claim is used once.
    store.put_link("a", &link("discord:1", at(600))).unwrap();
    store.put_link("b", &link("discord:1", at(600))).unwrap();
    store.put_link("c", &link("discord:2", at(600))).unwrap();
    seen.push(format!("links {:?}", store.links().unwrap().iter().map(|(id, _)| id.clone()).collect::<Vec<_>>()));
    seen.push(format!("claim {:?}", store.claim_link("b", [1; 32], at(10)).unwrap()));
    seen.push(format!("claim again {:?}", store.claim_link("b", [2; 32], at(11)).unwrap()));
    seen.push(format!("claim late {:?}", store.claim_link("c", [2; 32], at(700)).unwrap()));
    seen.push(format!("progress {:?}", store.progress_link("b", true, Some("expired"), true).unwrap()));
    seen.push(format!("progress {:?}", store.progress_link("c", true, Some("failed"), false).unwrap()));
    seen.push(format!("link {:?} {:?}", store.link("c").unwrap(), store.link("zz").unwrap()));
    // The outbox.
    store.put_outbox(&[("01".into(), b"first".to_vec()), ("02".into(), b"second".to_vec())]).unwrap();
    store.remove_outbox("01").unwrap();
    seen.push(format!("outbox {:?}", store.outbox().unwrap()));
    // Forgetting keeps history; compaction keeps each connection's newest row.
    store.forget(machines[39].key()).unwrap();
    seen.push(format!(
        "after forget {} {}",
        store.load_all().unwrap().len(),
        store.history(machines[39].key()).unwrap().len()
    ));
    seen.push(format!("compacted {}", store.compact_history(at(4)).unwrap()));
    seen.push(format!("history after {}", store.history(machines[1].key()).unwrap().len()));
    seen
}

fn pg(cluster: &Cluster, db: &str) -> PgStore {
    PgStore::open(&cluster.database(db).unwrap(), None).unwrap()
}

#[test]
fn it_answers_every_call_as_the_redb_store_does() {
    let Some(cluster) = Cluster::for_tests() else { return };
    let redb = exercise(&Store::in_memory().unwrap());
    let store = pg(&cluster, "contract");
    let postgres = exercise(&store);
    for (r, p) in redb.iter().zip(&postgres) {
        assert_eq!(r, p);
    }
    assert_eq!(redb.len(), postgres.len());
    assert_eq!(
        Store::in_memory()
            .map(|s| {
                exercise(&s);
                s.export().unwrap()
            })
            .unwrap(),
        store.export().unwrap(),
        "the same rows"
    );
    // Another store on the same database (a restart, or a second daemon) reads what was
    // committed.
    let again = PgStore::open(&cluster.url("contract"), None).unwrap();
    assert_eq!(again.load_all().unwrap().len(), 39);
    assert_eq!(again.export().unwrap(), store.export().unwrap());
}

#[test]
fn a_new_database_is_migrated_and_a_newer_schema_is_refused_with_nothing_changed() {
    let Some(cluster) = Cluster::for_tests() else { return };
    let url = cluster.database("schema").unwrap();
    let old = PgStore::migrate_to(&url, 0).unwrap();
    assert_eq!(old.schema_version().unwrap(), 0);
    let store = PgStore::open(&url, None).unwrap();
    assert_eq!(store.schema_version().unwrap(), authkeeper_pgstore::schema::SCHEMA_VERSION);
    let mut m = Machine::new(ConnKey::new("trakt", "default"), t0());
    store.commit(&[step(&mut m, Event::CredentialsSupplied { grant: grant(1, t0()) }, t0())]).unwrap();
    // Opening again migrates nothing and loses nothing.
    let again = PgStore::open(&url, None).unwrap();
    assert_eq!(again.load_all().unwrap().len(), 1);

    // Daemons starting together take turns at the migration.
    let fresh = cluster.database("together").unwrap();
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = fresh.clone();
            std::thread::spawn(move || PgStore::open(&url, None).map(|_| ()))
        })
        .collect();
    for open in opens {
        open.join().unwrap().unwrap();
    }

    // A database a newer build wrote is refused.
    cluster.psql("schema", "UPDATE authkeeper.meta SET value = 99 WHERE name = 'schema_version'").unwrap();
    match PgStore::open(&url, None) {
        Err(StoreError::TooNew { found: 99, supported }) => {
            assert_eq!(supported, authkeeper_pgstore::schema::SCHEMA_VERSION)
        }
        other => panic!("expected TooNew, got {:?}", other.map(|_| ())),
    }
    let back = format!(
        "UPDATE authkeeper.meta SET value = {} WHERE name = 'schema_version'",
        authkeeper_pgstore::schema::SCHEMA_VERSION
    );
    cluster.psql("schema", &back).unwrap();
    assert_eq!(PgStore::open(&url, None).unwrap().load_all().unwrap().len(), 1, "nothing was changed");
}

#[test]
fn a_sealed_store_holds_no_secret_in_clear_text_and_needs_its_key() {
    let Some(cluster) = Cluster::for_tests() else { return };
    let url = cluster.database("sealed").unwrap();
    // Clear first, then sealed at open with a key.
    let clear = PgStore::open(&url, None).unwrap();
    let mut m = Machine::new(ConnKey::new("trakt", "default"), t0());
    clear.commit(&[step(&mut m, Event::CredentialsSupplied { grant: grant(7, t0()) }, t0())]).unwrap();
    clear.put_outbox(&[("01".into(), b"link-secret-9".to_vec())]).unwrap();
    drop(clear);
    let key = SecretsKey::generate();
    let sealed = PgStore::open(&url, Some(Sealer::new(key.clone()))).unwrap();
    assert_eq!(sealed.sealed_with().unwrap(), Some(key.id()));
    let dump = format!("{:?}", sealed.export().unwrap().tables);
    for secret in ["access-7", "refresh-7", "link-secret-9"] {
        let bytes: Vec<String> = secret.bytes().map(|b| b.to_string()).collect();
        assert!(!dump.contains(&bytes.join(", ")), "{secret} is not stored in clear text");
    }
    let all = sealed.load_all().unwrap();
    assert_eq!(all[0].machine.connection().refresh_token().unwrap().expose(), "refresh-7");
    assert_eq!(sealed.outbox().unwrap()[0].1, b"link-secret-9");
    match PgStore::open(&url, None) {
        Err(StoreError::KeyNeeded { id }) => assert_eq!(id, key.id_hex()),
        other => panic!("expected KeyNeeded, got {:?}", other.map(|_| ())),
    }
    match PgStore::open(&url, Some(Sealer::new(SecretsKey::generate()))) {
        Err(StoreError::WrongKey { .. }) => {}
        other => panic!("expected WrongKey, got {:?}", other.map(|_| ())),
    }
    // Rotation: the previous key opens, the new one seals.
    let next = SecretsKey::generate();
    let rotated = PgStore::open(&url, Some(Sealer { current: next.clone(), previous: vec![key] })).unwrap();
    assert_eq!(rotated.sealed_with().unwrap(), Some(next.id()));
    let only_new = PgStore::open(&url, Some(Sealer::new(next))).unwrap();
    assert_eq!(only_new.load_all().unwrap()[0].machine.connection().refresh_token().unwrap().expose(), "refresh-7");
}

#[test]
fn daemons_sharing_a_store_never_get_the_same_profile_number() {
    let Some(cluster) = Cluster::for_tests() else { return };
    let url = cluster.database("numbers").unwrap();
    let stores: Vec<Arc<PgStore>> = (0..2).map(|_| Arc::new(PgStore::open(&url, None).unwrap())).collect();
    let workers: Vec<_> = (0..8)
        .map(|i| {
            let store = stores[i % 2].clone();
            std::thread::spawn(move || (0..25).map(|_| store.allocate_profile("trakt", 0).unwrap()).collect::<Vec<_>>())
        })
        .collect();
    let mut all: Vec<u64> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    all.sort_unstable();
    assert_eq!(all, (1..=200).collect::<Vec<_>>(), "each number once");
}

#[test]
fn a_redb_store_copied_to_postgresql_and_back_is_identical() {
    let Some(cluster) = Cluster::for_tests() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = SecretsKey::generate();
    let from = Store::open_sealed(&dir.path().join("from.redb"), Some(Sealer::new(key.clone()))).unwrap();
    exercise(&from);
    let before = from.export().unwrap();
    let pg = PgStore::open_as_is(&cluster.database("copy").unwrap()).unwrap();
    pg.import(&before).unwrap();
    assert!(matches!(pg.import(&before), Err(StoreError::NotEmpty)), "a second copy into it is refused");
    let back = Store::open_as_is(&dir.path().join("back.redb")).unwrap();
    back.import(&pg.export().unwrap()).unwrap();
    let after = back.export().unwrap();
    assert_eq!(after, before, "connections, credentials, history, flows, links, outbox and meta");
    assert!(before.table("flows").len() == 9 && before.history.len() > 100, "{before:?}");
    // Both copies open with the key and hand out the same credentials.
    let sealer = Some(Sealer::new(key));
    drop(back);
    let back = Store::open_sealed(&dir.path().join("back.redb"), sealer.clone()).unwrap();
    let pg = PgStore::open(&cluster.url("copy"), sealer).unwrap();
    let tokens = |all: Vec<authkeeper_state::Stored>| -> Vec<Option<String>> {
        all.iter().map(|s| s.machine.connection().refresh_token().map(|t| t.expose().to_owned())).collect()
    };
    assert_eq!(tokens(back.load_all().unwrap()), tokens(pg.load_all().unwrap()));
    assert_eq!(
        back.history(&ConnKey::new("trakt", "TRAKT-P39")).unwrap(),
        pg.history(&ConnKey::new("trakt", "TRAKT-P39")).unwrap()
    );
}

#[test]
fn a_bad_url_or_an_unreachable_server_is_a_clear_error_that_shows_no_password() {
    let err = PgStore::open("mysql://root@localhost/x", None).unwrap_err().to_string();
    assert!(err.contains("not a PostgreSQL connection URL"), "{err}");
    let url = "postgresql://bob:hunter2@%2Fnonexistent%2Fdir/db";
    let err = PgStore::open(url, None).unwrap_err().to_string();
    assert!(err.contains("cannot reach PostgreSQL"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    assert_eq!(authkeeper_pgstore::redacted(url), "postgresql://bob:***@%2Fnonexistent%2Fdir/db");
    assert_eq!(
        authkeeper_pgstore::redacted("postgresql://h/db?user=a&password=pw"),
        "postgresql://h/db?user=a&password=***"
    );
}

#[test]
fn a_store_is_claimed_by_one_process_and_a_lost_claim_writes_nothing_over_the_next_owner() {
    let Some(cluster) = Cluster::for_tests() else { return };
    let url = cluster.database("claims").unwrap();
    let first = PgStore::open(&url, None).unwrap();
    first.claim().unwrap();
    let mut m = Machine::new(ConnKey::new("trakt", "default"), t0());
    first.commit(&[step(&mut m, Event::CredentialsSupplied { grant: grant(1, t0()) }, t0())]).unwrap();
    let second = PgStore::open(&url, None).unwrap();
    assert!(matches!(second.claim(), Err(StoreError::InUse)), "one process at a time");

    // The first one's claim is lost (as when the server ends its session); the second claims.
    cluster
        .psql(
            "claims",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_try_advisory_lock%' \
             AND pid <> pg_backend_pid()",
        )
        .unwrap();
    let claimed = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        second.claim().is_ok()
    });
    assert!(claimed, "the lock went with the session");
    let mut newer = m.clone();
    second.commit(&[step(&mut newer, Event::Refreshed { grant: grant(2, t0()) }, t0())]).unwrap();

    // The first one wakes up with a rotated credential of its own: refused, nothing written.
    let stale = step(&mut m, Event::Refreshed { grant: grant(3, t0()) }, t0());
    assert!(matches!(first.commit(&[stale]), Err(StoreError::NotOwner)));
    let settings = [(ConnKey::new("trakt", "default"), Some(b"x".as_slice().into()))];
    assert!(matches!(first.set_settings(&settings), Err(StoreError::NotOwner)));
    let all = second.load_all().unwrap();
    assert_eq!(all[0].machine.connection().refresh_token().unwrap().expose(), "refresh-2", "the newer one stays");
}
