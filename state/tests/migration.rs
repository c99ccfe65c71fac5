//! A store written by the schema-2 release (`tests/fixtures/store-v2.redb`, made at commit
//! de99b52 by that release's own `Store` and `Machine`) opens in this build with every
//! connection, state, credential, pending flow and history row as it was.

use authkeeper_state::store::SCHEMA_VERSION;
use authkeeper_state::{Cause, ConnKey, Machine, StateName, Store};
use chrono::{DateTime, TimeZone, Utc};
use std::collections::BTreeMap;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn open_copy() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("authkeeper.redb");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store-v2.redb"), &path).unwrap();
    let store = Store::open(&path).unwrap();
    (dir, store)
}

/// Every stored machine, by its profile.
fn by_profile(store: &Store) -> BTreeMap<String, Machine> {
    let all = store.load_all().unwrap().into_iter();
    all.map(|s| (s.machine.key().profile.to_string(), std::sync::Arc::unwrap_or_clone(s.machine))).collect()
}

#[test]
fn the_schema_2_store_opens_with_everything_intact() {
    let (dir, store) = open_copy();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let all = by_profile(&store);
    assert_eq!(all.keys().collect::<Vec<_>>(), ["TRAKT-P01", "TRAKT-P02", "TRAKT-P03", "default"]);

    // Connected, after a refresh, with an unknown answer waiting for its retry.
    let m = &all["default"];
    let c = m.connection();
    assert_eq!(m.state_name(), StateName::Connected);
    let g = c.grant.as_ref().unwrap();
    assert_eq!(g.access_token.expose(), "fixture-access-2");
    assert_eq!(g.refresh_token.as_ref().unwrap().expose(), "fixture-refresh-2");
    assert_eq!((g.token_type.as_str(), g.scope.as_deref()), ("bearer", Some("public")));
    assert_eq!(g.issued_at, at("2026-11-26T12:00:00Z"));
    assert_eq!(g.expires_at, Some(at("2026-12-03T12:00:00Z")));
    assert_eq!(c.account.as_ref().map(|a| (a.name.as_str(), a.id.as_deref())), Some(("sean", Some("sean"))));
    assert_eq!(c.since, at("2026-11-20T12:00:30Z"));
    assert_eq!(c.validated_at, Some(at("2026-11-26T12:00:00Z")));
    assert_eq!(c.last_error.as_deref(), Some("Trakt answered HTTP 503"));
    assert_eq!(c.failures, 1);
    assert_eq!(c.next_attempt_at, Some(at("2026-11-26T13:00:05.625Z")));

    // Pending on a device code, which survives as a generic pending flow.
    let m = &all["TRAKT-P01"];
    assert_eq!(m.state_name(), StateName::Pending);
    let f = m.pending_flow().expect("the pending flow survives");
    assert_eq!(f.kind, "device_pin");
    assert_eq!(f.user_code.as_deref(), Some("BBBB2222"));
    assert_eq!(f.verification_url.as_deref(), Some("https://trakt.tv/activate"));
    assert_eq!(f.secret("device_code").unwrap().expose(), "device-code-BBBB2222");
    assert_eq!(f.issued_at, Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap());
    assert_eq!(f.expires_at, at("2026-11-28T12:10:00Z"));
    assert_eq!(f.interval_secs, Some(5));

    // Expired after a rejection, keeping its dead credential and account.
    let m = &all["TRAKT-P02"];
    assert_eq!(m.state_name(), StateName::Expired);
    assert!(!m.retrying_refresh());
    assert_eq!(m.connection().grant.as_ref().unwrap().access_token.expose(), "fixture-access-3");
    assert_eq!(m.connection().account.as_ref().unwrap().name, "ana");

    // Disconnected, holding nothing.
    let m = &all["TRAKT-P03"];
    assert_eq!(m.state_name(), StateName::Disconnected);
    assert!(m.connection().grant.is_none());

    // History, every row, oldest first.
    let causes =
        |p: &str| -> Vec<Cause> { store.history(&ConnKey::new("trakt", p)).unwrap().iter().map(|t| t.cause).collect() };
    assert_eq!(causes("default"), [Cause::ConnectRequested, Cause::Approved, Cause::Refreshed]);
    assert_eq!(causes("TRAKT-P01"), [Cause::ConnectRequested]);
    assert_eq!(causes("TRAKT-P02"), [Cause::CredentialsSupplied, Cause::Validated, Cause::Rejected]);
    assert_eq!(causes("TRAKT-P03"), [Cause::CredentialsSupplied, Cause::Validated, Cause::Disconnected]);
    let rejected = store.history(&ConnKey::new("trakt", "TRAKT-P02")).unwrap().pop().unwrap();
    assert_eq!(rejected.detail.as_deref(), Some("Trakt rejected the access token (401)"));
    assert_eq!((rejected.from, rejected.to), (StateName::Connected, StateName::Expired));
    assert_eq!(rejected.at, at("2026-11-21T12:00:00Z"));

    // Metadata: the config digest and the profile counter.
    assert_eq!(store.config_seen(&ConnKey::new("trakt", "TRAKT-P02")).unwrap().as_deref(), Some(&b"digest-bytes"[..]));
    assert_eq!(store.allocate_profile("trakt", 0).unwrap(), 5, "profiles 1–4 were allocated before");

    // The migration rewrote every row: reopening reads the new records the same way.
    drop(store);
    let again = Store::open(&dir.path().join("authkeeper.redb")).unwrap();
    let reread = by_profile(&again);
    for (profile, m) in &all {
        assert_eq!(reread[profile].state(), m.state(), "{profile}");
        assert_eq!(reread[profile].connection(), m.connection(), "{profile}");
    }
}
