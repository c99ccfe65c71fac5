//! Several daemons on one store: leases go to one member at a time, pass on when a member's
//! lease lapses or it lets go, fence every write, and members read what the others changed.
//! Without PostgreSQL installed the tests say so and pass, unless
//! `AUTHKEEPER_REQUIRE_POSTGRES` is set (as in CI).

use authkeeper_pgstore::PgStore;
use authkeeper_pgstore::cluster::Cluster;
use authkeeper_state::{Account, Commit, ConnKey, ConnectionStore, Event, Grant, Machine, Policy, Secret, StoreError};
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use std::time::Duration;

const LEASE: Duration = Duration::from_secs(15);

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 2, 9, 0, 0).unwrap()
}

fn connected(profile: &str, refresh: &str) -> Commit {
    let mut m = Machine::new(ConnKey::new("trakt", profile), t0());
    let grant = Grant {
        refresh_token: Some(Secret::new(refresh)),
        expires_at: Some(t0() + TimeDelta::hours(1)),
        ..Grant::bearer(format!("access-{refresh}"), t0())
    };
    m.handle(&Event::CredentialsSupplied { grant }, t0(), Policy::default(), 0.0);
    let s = m.handle(
        &Event::Validated { account: Account { name: "u".into(), id: None }, grant: None },
        t0(),
        Policy::default(),
        0.0,
    );
    Commit { machine: m, transition: s.transition }
}

fn refreshed(m: &Machine, refresh: &str) -> Commit {
    let mut m = m.clone();
    let grant = Grant {
        refresh_token: Some(Secret::new(refresh)),
        expires_at: Some(t0() + TimeDelta::hours(2)),
        ..Grant::bearer(format!("access-{refresh}"), t0())
    };
    let s = m.handle(&Event::Refreshed { grant }, t0(), Policy::default(), 0.0);
    Commit { machine: m, transition: s.transition }
}

fn refresh_token(m: &Machine) -> String {
    m.connection().refresh_token().unwrap().expose().to_owned()
}

fn two_members(cluster: &Cluster, db: &str) -> (PgStore, PgStore) {
    let url = cluster.database(db).unwrap();
    let (a, b) = (PgStore::open(&url, None).unwrap(), PgStore::open(&url, None).unwrap());
    a.join(LEASE).unwrap();
    b.join(LEASE).unwrap();
    (a, b)
}

#[test]
fn a_lease_is_one_members_at_a_time_and_fences_every_write() {
    let Some(cluster) = Cluster::for_tests() else { return };
    let (a, b) = two_members(&cluster, "fences");
    assert_eq!(a.members().unwrap().len(), 2);
    // The member that makes a connection holds it.
    a.commit(&[connected("P1", "r1"), connected("P2", "r2")]).unwrap();
    let keys = ["trakt/P1".to_owned(), "trakt/P2".to_owned()];
    assert_eq!(a.held().unwrap(), keys);
    assert!(b.acquire(&keys).unwrap().is_empty(), "a live member's leases are not taken");

    // B's batch writes what B holds and nothing of A's.
    let p1 = &a.load_all().unwrap()[0].machine;
    let err = b.commit(&[refreshed(p1, "r1-by-b"), connected("P3", "r3")]).unwrap_err();
    assert!(matches!(&err, StoreError::NotOwnerOf(k) if k == &["trakt/P1".to_owned()]), "{err}");
    let all = a.load_all().unwrap();
    assert_eq!(all.iter().map(|s| refresh_token(&s.machine)).collect::<Vec<_>>(), ["r1", "r2", "r3"]);

    // B asks for P1; A lets go; B takes it with the connection as A left it.
    b.want("trakt/P1").unwrap();
    assert_eq!(a.wanted().unwrap(), ["trakt/P1".to_owned()]);
    a.release(&keys[..1]).unwrap();
    let taken = b.acquire(&keys[..1]).unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(refresh_token(taken[0].1.as_ref().unwrap()), "r1");
    b.commit(&[refreshed(taken[0].1.as_ref().unwrap(), "r1-by-b")]).unwrap();
    assert!(matches!(a.commit(&[refreshed(p1, "r1-stale")]), Err(StoreError::NotOwnerOf(_))));
    assert_eq!(refresh_token(&a.load_all().unwrap()[0].machine), "r1-by-b");
}

#[test]
fn a_lapsed_members_leases_pass_on_and_its_late_writes_are_refused() {
    let Some(cluster) = Cluster::for_tests() else { return };
    let (a, b) = two_members(&cluster, "lapse");
    a.commit(&[connected("P1", "r1")]).unwrap();
    let p1 = a.load_all().unwrap()[0].machine.clone();
    // A stops renewing (paused, or cut off) and its lease lapses on the database's clock.
    cluster.psql("lapse", "UPDATE authkeeper.members SET expires_at = now() - interval '1 second' WHERE id = (SELECT holder FROM authkeeper.leases)").unwrap();
    assert_eq!(b.members().unwrap().len(), 1);
    let taken = b.acquire(&["trakt/P1".to_owned()]).unwrap();
    assert_eq!(taken.len(), 1, "a lapsed member's lease is free");
    b.commit(&[refreshed(taken[0].1.as_ref().unwrap(), "r2")]).unwrap();
    // A wakes up: its write is refused, and it learns it is no member any more.
    assert!(matches!(a.commit(&[refreshed(&p1, "r1-late")]), Err(StoreError::NotOwnerOf(_))));
    assert!(!a.renew(LEASE).unwrap());
    assert_eq!(refresh_token(&b.load_all().unwrap()[0].machine), "r2");
    // A clean leave hands every lease back at once.
    b.leave().unwrap();
    let c = PgStore::open(&cluster.url("lapse"), None).unwrap();
    c.join(LEASE).unwrap();
    assert_eq!(c.acquire(&["trakt/P1".to_owned()]).unwrap().len(), 1);
}

#[test]
fn members_read_what_the_others_changed_and_are_told_of_it() {
    let Some(cluster) = Cluster::for_tests() else { return };
    let (a, b) = two_members(&cluster, "changes");
    let (version, seq) = a.position().unwrap();
    let mut told = a.notifications().unwrap();
    b.commit(&[connected("P1", "r1")]).unwrap();
    assert_eq!(told.blocking_recv().as_deref(), Some("authkeeper_commits/"));
    let changes = a.changes(version, seq).unwrap();
    assert_eq!(changes.connections.len(), 1);
    assert_eq!(refresh_token(&changes.connections[0]), "r1");
    assert_eq!(changes.transitions.len(), 1, "B's transition, once");
    assert_eq!(changes.transitions[0].0, ConnKey::new("trakt", "P1"));
    // Nothing new since; and a member's own rows are not handed back to it.
    let again = a.changes(changes.version, changes.seq).unwrap();
    assert!(again.connections.is_empty() && again.transitions.is_empty());
    let (version, seq) = b.position().unwrap();
    let p1 = changes.connections[0].clone();
    b.commit(&[refreshed(&p1, "r2")]).unwrap();
    let mine = b.changes(version, seq).unwrap();
    assert_eq!((mine.connections.len(), mine.transitions.len()), (1, 0));
}

#[test]
fn a_version_1_store_is_migrated_with_everything_in_it() {
    let Some(cluster) = Cluster::for_tests() else { return };
    let url = cluster.database("v1").unwrap();
    let redb = authkeeper_state::Store::in_memory().unwrap();
    redb.commit(&[connected("P1", "r1"), connected("P2", "r2")]).unwrap();
    let dump = redb.export().unwrap();
    let old = PgStore::migrate_to(&url, 1).unwrap();
    assert_eq!(old.schema_version().unwrap(), 1);
    old.import(&dump).unwrap();
    drop(old);
    let store = PgStore::open(&url, None).unwrap();
    assert_eq!(store.schema_version().unwrap(), 2);
    assert_eq!(store.export().unwrap(), dump);
    store.join(LEASE).unwrap();
    assert_eq!(store.acquire(&["trakt/P1".to_owned(), "trakt/P2".to_owned()]).unwrap().len(), 2);
}
