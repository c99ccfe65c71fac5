//! Every (state, event) pair of the machine, table-driven, plus its invariants.

use authkeeper_state::Connection;
use authkeeper_state::machine::State;
use authkeeper_state::records::{decode_connection, encode_connection};
use authkeeper_state::{Account, ConnKey, Effect, Event, Grant, Machine, PendingFlow, Policy, Secret, StateName};
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use std::collections::BTreeMap;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
}

fn creds(expires_in: i64) -> Grant {
    Grant {
        refresh_token: Some(Secret::new("refresh-1")),
        scope: Some("public".into()),
        expires_at: Some(t0() + TimeDelta::seconds(expires_in)),
        extras: Some(Box::new(authkeeper_state::Extras {
            facts: BTreeMap::from([("server_url".to_owned(), "http://127.0.0.1:8096".to_owned())]),
            secrets: BTreeMap::from([("server_token".to_owned(), Secret::new("server-1"))]),
        })),
        ..Grant::bearer("access-1", t0())
    }
}

fn flow() -> PendingFlow {
    PendingFlow {
        kind: "device_pin".into(),
        user_code: Some("ABCD1234".into()),
        verification_url: Some("https://trakt.tv/activate".into()),
        authorize_url: None,
        issued_at: t0(),
        expires_at: t0() + TimeDelta::seconds(600),
        interval_secs: Some(5),
        secrets: BTreeMap::from([("device_code".to_owned(), Secret::new("device-1"))]),
    }
}

fn account() -> Account {
    Account { name: "sean".into(), id: Some("sean".into()) }
}

fn events() -> Vec<(&'static str, Event)> {
    vec![
        ("ConnectRequested", Event::ConnectRequested { flow: flow() }),
        ("CredentialsSupplied", Event::CredentialsSupplied { grant: creds(3600) }),
        ("Resumed", Event::Resumed),
        ("FlowPending", Event::FlowPending),
        ("FlowSlowDown", Event::FlowSlowDown { interval_secs: 10 }),
        ("Approved", Event::Approved { grant: creds(3600) }),
        ("Validated", Event::Validated { account: account(), grant: None }),
        ("Refreshed", Event::Refreshed { grant: creds(7200 * 4) }),
        ("FlowExpired", Event::FlowExpired { detail: "code expired".into() }),
        ("Denied", Event::Denied),
        ("Cancel", Event::Cancel),
        ("Rejected", Event::Rejected { detail: "401".into() }),
        ("RefreshRejected", Event::RefreshRejected { detail: "invalid_grant".into() }),
        ("ExpiryPassed", Event::ExpiryPassed),
        ("Disconnect", Event::Disconnect),
        ("Remove", Event::Remove),
        ("Unknown", Event::Unknown { error: "HTTP 503".into() }),
    ]
}

fn apply(m: &mut Machine, e: Event, at: DateTime<Utc>) {
    let step = m.handle(&e, at, Policy::default(), 0.0);
    assert!(step.refusal.is_none(), "setup event {e:?} refused");
}

/// The states the table starts from, each reached through real events.
fn start(label: &str) -> Machine {
    let mut m = Machine::new(ConnKey::new("trakt", "default"), t0());
    match label {
        "disconnected" => {}
        "pending_flow" => apply(&mut m, Event::ConnectRequested { flow: flow() }, t0()),
        "pending_validating" => apply(&mut m, Event::CredentialsSupplied { grant: creds(3600) }, t0()),
        "connected" | "expired" | "expired_retrying" => {
            apply(&mut m, Event::ConnectRequested { flow: flow() }, t0());
            apply(&mut m, Event::Approved { grant: creds(3600) }, t0());
            match label {
                "expired" => apply(&mut m, Event::Rejected { detail: "401".into() }, t0()),
                "expired_retrying" => apply(&mut m, Event::ExpiryPassed, t0() + TimeDelta::hours(1)),
                _ => {}
            }
        }
        _ => unreachable!("{label}"),
    }
    m
}

/// Expected outcome per event, in the order of `events()`:
/// `state:cause` = a recorded transition; `-` = nothing recorded, state unchanged;
/// `409` = refused, nothing changed; `expired` = the state's data changed, nothing recorded.
const TABLE: &[(&str, &str)] = &[
    ("disconnected", "pending:connect_requested pending:credentials_supplied - - - - - - - - 409 - - - - - -"),
    (
        "pending_flow",
        "409 409 - - - connected:approved - - disconnected:flow_expired disconnected:denied disconnected:cancelled - - - disconnected:disconnected disconnected:removed -",
    ),
    (
        "pending_validating",
        "409 409 - - - - connected:validated connected:refreshed - - disconnected:cancelled expired:rejected expired:refresh_rejected - disconnected:disconnected disconnected:removed -",
    ),
    (
        "connected",
        "409 pending:credentials_supplied - - - - connected:validated connected:refreshed - - 409 expired:rejected expired:refresh_rejected expired:expired_unrefreshed disconnected:disconnected disconnected:removed -",
    ),
    (
        "expired",
        "pending:connect_requested pending:credentials_supplied - - - - connected:validated connected:refreshed - - 409 - - - disconnected:disconnected disconnected:removed -",
    ),
    (
        "expired_retrying",
        "pending:connect_requested pending:credentials_supplied - - - - connected:validated connected:refreshed - - 409 expired expired - disconnected:disconnected disconnected:removed -",
    ),
];

#[test]
fn every_state_event_pair_matches_the_table() {
    let at = t0() + TimeDelta::hours(2);
    let mut checked = 0;
    for (label, row) in TABLE {
        let cells: Vec<&str> = row.split_whitespace().collect();
        let evs = events();
        assert_eq!(cells.len(), evs.len(), "row {label} has a cell per event");
        for (cell, (ename, event)) in cells.iter().zip(evs) {
            let mut m = start(label);
            let before_state = m.state().clone();
            let before_row = encode_connection(&m);
            let from = m.state_name();
            let step = m.handle(&event, at, Policy::default(), 0.0);
            let ctx = format!("{label} + {ename}");
            match *cell {
                "409" => {
                    assert!(step.refusal.is_some(), "{ctx}: expected a refusal");
                    assert!(step.transition.is_none(), "{ctx}");
                    assert_eq!(m.state(), &before_state, "{ctx}: a refusal changes nothing");
                    assert_eq!(encode_connection(&m), before_row, "{ctx}: a refusal changes nothing");
                }
                "-" => {
                    assert!(step.refusal.is_none() && step.transition.is_none(), "{ctx}: {step:?}");
                    assert_eq!(m.state(), &before_state, "{ctx}: state unchanged");
                }
                "expired" => {
                    assert!(step.refusal.is_none() && step.transition.is_none(), "{ctx}: {step:?}");
                    assert_eq!(m.state(), &State::Expired { retry_refresh: false }, "{ctx}");
                }
                expected => {
                    let (to, cause) = expected.split_once(':').unwrap();
                    let t = step.transition.unwrap_or_else(|| panic!("{ctx}: expected a transition"));
                    assert_eq!(t.from, from, "{ctx}");
                    assert_eq!(t.to.as_str(), to, "{ctx}");
                    assert_eq!(m.state_name().as_str(), to, "{ctx}");
                    assert_eq!(serde_json::to_value(t.cause).unwrap(), cause, "{ctx}");
                    assert_eq!(t.at, at, "{ctx}: transitions carry the event's time");
                }
            }
            invariants(&m, &ctx);
            checked += 1;
        }
    }
    assert_eq!(checked, 6 * 17);
}

fn invariants(m: &Machine, ctx: &str) {
    let c = m.connection();
    // A flow is stored exactly while pending on one.
    assert_eq!(c.flow.is_some(), m.pending_flow().is_some(), "{ctx}: flow iff pending on a flow");
    match m.state_name() {
        StateName::Disconnected => {
            assert!(c.grant.is_none() && c.account.is_none(), "{ctx}: disconnected holds nothing")
        }
        StateName::Connected => {
            assert!(c.grant.is_some() && c.validated_at.is_some(), "{ctx}: connected means validated")
        }
        _ => {}
    }
    // Restoring from the stored row and flow gives back the same machine.
    let key = m.key().to_string();
    let restored = decode_connection(&key, &encode_connection(m), c.flow.as_deref().cloned()).unwrap();
    assert_eq!(restored.state(), m.state(), "{ctx}: restore keeps the state");
    assert_eq!(restored.connection(), &Connection { last_poll_at: None, ..c.clone() }, "{ctx}: restore keeps the data");
}

#[test]
fn effects_ask_for_validation_and_revocation() {
    let mut m = start("disconnected");
    let step = m.handle(&Event::CredentialsSupplied { grant: creds(60) }, t0(), Policy::default(), 0.0);
    assert_eq!(step.effects, vec![Effect::Validate]);

    let mut m = start("connected");
    let step = m.handle(&Event::Disconnect, t0(), Policy::default(), 0.0);
    assert_eq!(step.effects, vec![Effect::Revoke(creds(3600))]);

    let mut m = start("connected");
    let step = m.handle(&Event::Remove, t0(), Policy::default(), 0.0);
    assert!(step.effects.is_empty(), "removal from the config does not revoke");

    let mut m = start("pending_flow");
    let step = m.handle(&Event::Disconnect, t0(), Policy::default(), 0.0);
    assert!(step.effects.is_empty(), "nothing to revoke while a flow is pending");
}

#[test]
fn unknown_answers_record_the_error_and_back_off_without_changing_state() {
    let policy = Policy { backoff_base: TimeDelta::seconds(5), ..Policy::default() };
    let mut m = start("connected");
    for (n, delay) in [(1, 5), (2, 10), (3, 20)] {
        let at = t0() + TimeDelta::minutes(n);
        let step = m.handle(&Event::Unknown { error: "HTTP 500".into() }, at, policy, 0.0);
        assert!(step.transition.is_none());
        assert_eq!(m.state_name(), StateName::Connected);
        assert_eq!(m.connection().last_error.as_deref(), Some("HTTP 500"));
        assert_eq!(m.connection().next_attempt_at, Some(at + TimeDelta::seconds(delay)));
    }
    // A good answer clears it.
    m.handle(&Event::Validated { account: account(), grant: None }, t0() + TimeDelta::minutes(5), policy, 0.0);
    assert_eq!(m.connection().last_error, None);
    assert_eq!(m.connection().next_attempt_at, None);
}

#[test]
fn backoff_near_expiry_leaves_room_for_several_more_attempts() {
    // The token (1 h) has 80 s left; plain backoff would wait 80 s and miss it.
    let policy = Policy { backoff_base: TimeDelta::seconds(5), ..Policy::default() };
    let mut m = start("connected");
    let end = m.connection().grant.as_ref().unwrap().expires_at.unwrap();
    let mut at = end - TimeDelta::seconds(80);
    let mut attempts = 0;
    while at < end {
        attempts += 1;
        m.handle(&Event::Unknown { error: "HTTP 503".into() }, at, policy, 0.999);
        let next = m.connection().next_attempt_at.unwrap();
        let left = end - at;
        assert!(next - at <= (left / 4).max(TimeDelta::seconds(1)), "{attempts}: waited {} of {left}", next - at);
        assert_eq!(m.state_name(), StateName::Connected, "an unknown answer never ends a token");
        at = next;
    }
    assert!(attempts >= 8, "only {attempts} attempts fitted in the last 80 s");
}

#[test]
fn since_moves_only_when_the_state_changes() {
    let mut m = start("connected");
    let since = m.connection().since;
    m.handle(&Event::Validated { account: account(), grant: None }, t0() + TimeDelta::hours(3), Policy::default(), 0.0);
    assert_eq!(m.connection().since, since);
    m.handle(&Event::Disconnect, t0() + TimeDelta::hours(4), Policy::default(), 0.0);
    assert_eq!(m.connection().since, t0() + TimeDelta::hours(4));
}

#[test]
fn debug_output_never_shows_a_credential() {
    let m = start("connected");
    let dump = format!("{m:?}");
    assert!(dump.contains("connected") || dump.contains("Connected"));
    for secret in ["access-1", "refresh-1", "device-1"] {
        assert!(!dump.contains(secret), "{secret} leaked in {dump}");
    }
    let dump = format!("{:?}", start("pending_flow"));
    assert!(!dump.contains("device-1"));
}
