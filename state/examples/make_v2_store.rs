//! One-off: writes a schema-2 store with today's code, for the migration test fixture.
use authkeeper_state::*;
use chrono::{TimeZone, Utc, TimeDelta};

fn main() {
    let path = std::env::args().nth(1).expect("path");
    let _ = std::fs::remove_file(&path);
    let store = Store::open(std::path::Path::new(&path)).unwrap();
    let t0 = Utc.with_ymd_and_hms(2026, 11, 20, 12, 0, 0).unwrap();
    let p = Policy::default();
    let commit = |m: &mut Machine, e: Event, at| {
        let step = m.handle(&e, at, p, 0.5);
        store.commit(&[Commit { machine: m.clone(), transition: step.transition }]).unwrap();
    };
    let flow = |at: chrono::DateTime<Utc>, code: &str| DeviceFlow {
        device_code: Secret::new(format!("device-code-{code}")),
        user_code: code.into(),
        verification_url: "https://trakt.tv/activate".into(),
        issued_at: at,
        expires_at: at + TimeDelta::seconds(600),
        interval_secs: 5,
    };
    let creds = |n: u32, at| Credentials {
        access_token: Secret::new(format!("fixture-access-{n}")),
        refresh_token: Some(Secret::new(format!("fixture-refresh-{n}"))),
        token_type: "bearer".into(),
        scope: Some("public".into()),
        issued_at: at,
        expires_at: Some(at + TimeDelta::days(7)),
    };
    // Connected after a device flow and one refresh.
    let mut a = Machine::new(ConnKey::new("trakt", "default"), t0);
    commit(&mut a, Event::ConnectRequested { flow: flow(t0, "AAAA1111") }, t0);
    commit(&mut a, Event::Approved { credentials: creds(1, t0 + TimeDelta::seconds(30)), account: Some(Account { name: "sean".into(), id: Some("sean".into()) }) }, t0 + TimeDelta::seconds(30));
    commit(&mut a, Event::Refreshed { credentials: creds(2, t0 + TimeDelta::days(6)) }, t0 + TimeDelta::days(6));
    commit(&mut a, Event::Unknown { error: "Trakt answered HTTP 503".into() }, t0 + TimeDelta::days(6) + TimeDelta::hours(1));
    // Pending on a device code.
    let t1 = t0 + TimeDelta::days(8);
    let mut b = Machine::new(ConnKey::new("trakt", "TRAKT-P01"), t1);
    commit(&mut b, Event::ConnectRequested { flow: flow(t1, "BBBB2222") }, t1);
    // Expired: a supplied credential rejected.
    let mut c = Machine::new(ConnKey::new("trakt", "TRAKT-P02"), t0);
    commit(&mut c, Event::CredentialsSupplied { credentials: creds(3, t0) }, t0);
    commit(&mut c, Event::Validated { account: Account { name: "ana".into(), id: None } }, t0 + TimeDelta::seconds(1));
    commit(&mut c, Event::Rejected { detail: "Trakt rejected the access token (401)".into() }, t0 + TimeDelta::days(1));
    // Disconnected after being connected.
    let mut d = Machine::new(ConnKey::new("trakt", "TRAKT-P03"), t0);
    commit(&mut d, Event::CredentialsSupplied { credentials: creds(4, t0) }, t0);
    commit(&mut d, Event::Validated { account: Account { name: "bo".into(), id: Some("bo".into()) } }, t0 + TimeDelta::seconds(2));
    commit(&mut d, Event::Disconnect, t0 + TimeDelta::days(2));
    store.set_config_seen(&ConnKey::new("trakt", "TRAKT-P02"), b"digest-bytes").unwrap();
    store.allocate_profile("trakt", 3).unwrap();
    for m in store.load_all().unwrap() {
        println!("{}", String::from_utf8(m.to_row()).unwrap());
    }
}
