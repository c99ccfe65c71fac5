//! Secrets at rest: a sealed store holds no secret in clear text, refuses to open without its
//! key or with another one (changing nothing), and rotates to a new key.

use authkeeper_state::{
    Account, Commit, ConnKey, Event, Grant, Machine, PendingFlow, Policy, ProfileState, Sealer, Secret, SecretsKey,
    Store, StoreError,
};
use chrono::{TimeDelta, Utc};
use std::collections::BTreeMap;
use std::path::Path;

const SECRETS: [&str; 4] = ["access-7f3a9c", "refresh-2b8e41", "device-code-5d1f0e", "server-token-9a4c27"];

fn fill(store: &Store) {
    let now = Utc::now();
    let grant = Grant {
        refresh_token: Some(Secret::new(SECRETS[1])),
        expires_at: Some(now + TimeDelta::hours(1)),
        ..Grant::bearer(SECRETS[0], now)
    };
    let mut m = Machine::new(ConnKey::new("trakt", "default"), now);
    m.handle(&Event::CredentialsSupplied { grant }, now, Policy::default(), 0.0);
    let step = m.handle(
        &Event::Validated { account: Account { name: "sean".into(), id: None }, grant: None },
        now,
        Policy::default(),
        0.0,
    );
    let mut pending = Machine::new(ConnKey::new("trakt", "TRAKT-P02"), now);
    let flow = PendingFlow {
        kind: "device_pin".into(),
        user_code: Some("ABCD1234".into()),
        verification_url: None,
        authorize_url: None,
        issued_at: now,
        expires_at: now + TimeDelta::minutes(10),
        interval_secs: Some(5),
        secrets: BTreeMap::from([("device_code".to_owned(), Secret::new(SECRETS[2]))]),
    };
    let started = pending.handle(&Event::ConnectRequested { flow }, now, Policy::default(), 0.0);
    store
        .commit(&[
            Commit { machine: m, transition: step.transition },
            Commit { machine: pending, transition: started.transition },
        ])
        .unwrap();
    let mut state = ProfileState::default();
    state.secrets.insert("server_token".into(), Secret::new(SECRETS[3]));
    store.set_profile_states(&[(ConnKey::new("plex", "default"), state)]).unwrap();
    store
        .set_settings(&[(
            ConnKey::new("trakt", "default"),
            Some(br#"{"client_secret":"s3cr3t-app"}"#.as_slice().into()),
        )])
        .unwrap();
}

fn clear_text_secrets(path: &Path) -> Vec<&'static str> {
    let bytes = std::fs::read(path).unwrap();
    SECRETS.into_iter().chain(["s3cr3t-app"]).filter(|s| bytes.windows(s.len()).any(|w| w == s.as_bytes())).collect()
}

fn tokens(store: &Store) -> Vec<String> {
    let mut out: Vec<String> = store
        .load_all()
        .unwrap()
        .iter()
        .filter_map(|s| s.machine.connection().refresh_token().map(|t| t.expose().to_owned()))
        .collect();
    out.extend(store.settings().unwrap().into_iter().map(|(_, v)| String::from_utf8(v).unwrap()));
    out
}

#[test]
fn a_sealed_store_holds_no_secret_in_clear_text_and_needs_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("authkeeper.redb");
    let key = SecretsKey::generate();
    let store = Store::open_sealed(&path, Some(Sealer::new(key.clone()))).unwrap();
    fill(&store);
    let expected = tokens(&store);
    assert_eq!(store.sealed_with().unwrap(), Some(key.id()));
    drop(store);
    assert_eq!(clear_text_secrets(&path), Vec::<&str>::new(), "the file shows no secret");

    let Err(e) = Store::open(&path) else { panic!("opened without its key") };
    assert!(matches!(e, StoreError::KeyNeeded { ref id } if *id == key.id_hex()), "{e}");
    let other = SecretsKey::generate();
    let Err(e) = Store::open_sealed(&path, Some(Sealer::new(other.clone()))) else { panic!("opened with another key") };
    assert!(e.to_string().contains(&key.id_hex()) && e.to_string().contains(&other.id_hex()), "{e}");

    // Refused opens changed nothing: the right key opens everything as it was.
    let store = Store::open_sealed(&path, Some(Sealer::new(key.clone()))).unwrap();
    assert_eq!(store.sealed_with().unwrap(), Some(key.id()));
    assert_eq!(tokens(&store), expected, "everything is there with the right key");
    let states = store.profile_states().unwrap();
    assert_eq!(states[0].1.secrets["server_token"].expose(), SECRETS[3]);
}

#[test]
fn a_clear_store_is_sealed_and_a_sealed_one_rotates_to_a_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("authkeeper.redb");
    let store = Store::open(&path).unwrap();
    fill(&store);
    let expected = tokens(&store);
    drop(store);
    assert!(!clear_text_secrets(&path).is_empty(), "a clear store shows its secrets (the check sees them)");

    let old = SecretsKey::generate();
    let store = Store::open_sealed(&path, Some(Sealer::new(old.clone()))).unwrap();
    assert_eq!(tokens(&store), expected, "sealing loses nothing");
    drop(store);
    assert_eq!(clear_text_secrets(&path), Vec::<&str>::new());

    let new = SecretsKey::generate();
    let store = Store::open_sealed(&path, Some(Sealer { current: new.clone(), previous: vec![old.clone()] })).unwrap();
    assert_eq!(store.sealed_with().unwrap(), Some(new.id()));
    assert_eq!(tokens(&store), expected, "rotation loses nothing");
    drop(store);
    assert!(Store::open_sealed(&path, Some(Sealer::new(old))).is_err(), "the old key alone no longer opens it");
    let store = Store::open_sealed(&path, Some(Sealer::new(new))).unwrap();
    assert_eq!(tokens(&store), expected);
}
