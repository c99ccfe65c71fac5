//! The Trakt adapter against the emulator over real HTTP: every device-token status code,
//! refresh rotation, rejection versus unknown.

use authkeeper::clock::SystemClock;
use authkeeper::limits::{Gate, Limits};
use authkeeper::providers::{
    Adapter, Begun, FlowError, Input, Poll, Profile, Reach, Setup, Verdict, find, http_client,
};
use authkeeper_fixtures::{Fault, TraktEmulator, TraktOptions};
use authkeeper_state::{Grant, PendingFlow};
use chrono::Utc;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// The adapter of `trakt/default` with `block` as its settings, reaching `url`.
fn adapter(block: Value, url: &str) -> Adapter {
    let profile = Profile::new(find("trakt").unwrap(), block.as_object().unwrap().clone(), Some(url.into())).unwrap();
    Setup {
        profile: Arc::new(profile),
        state: Arc::default(),
        reach: Arc::new(Reach {
            http: http_client(Duration::from_secs(2)),
            gate: open_gate(),
            public_url: Arc::default(),
            metrics: Arc::default(),
        }),
    }
    .bind(&authkeeper_state::ConnKey::new("trakt", "default"))
}

async fn setup(opts: TraktOptions) -> (TraktEmulator, Adapter) {
    let emulator = TraktEmulator::start(opts.clone()).await.unwrap();
    let block = json!({"client_id": opts.client_id, "client_secret": opts.client_secret});
    let trakt = adapter(block, &emulator.url());
    (emulator, trakt)
}

async fn start_flow(trakt: &Adapter) -> Result<PendingFlow, FlowError> {
    match trakt.begin("device_pin", Input::new(), Utc::now()).await? {
        Begun::Pending(flow) => Ok(flow),
        Begun::Granted(_) => panic!("a device flow waits for the user"),
    }
}

fn code(flow: &PendingFlow) -> &str {
    flow.user_code.as_deref().unwrap()
}

/// No limits worth the name: these tests provoke each answer in turn.
fn open_gate() -> std::sync::Arc<Gate> {
    let limits = Limits { per_second: 1e6, burst: 1000, account_reads: None, account_writes: None };
    std::sync::Arc::new(Gate::new(std::sync::Arc::new(SystemClock), limits))
}

fn fast() -> TraktOptions {
    // No minimum interval between polls, so each status can be provoked in turn.
    TraktOptions { interval: 0, ..TraktOptions::default() }
}

#[tokio::test]
async fn every_device_token_status_maps_to_its_outcome() {
    let (emulator, trakt) = setup(fast()).await;
    let flow = start_flow(&trakt).await.unwrap();
    assert_eq!(code(&flow).len(), 8);
    assert_eq!(flow.verification_url.as_deref(), Some("https://trakt.tv/activate"));
    assert!(flow.expires_at > Utc::now() + chrono::TimeDelta::seconds(590));

    assert!(matches!(trakt.poll(&flow, Utc::now()).await, Poll::Pending), "400 = pending");
    emulator.approve(code(&flow));
    let Poll::Approved(creds) = trakt.poll(&flow, Utc::now()).await else { panic!("200 = approved") };
    assert!(creds.refresh_token.is_some() && creds.expires_at.is_some());
    assert!(matches!(trakt.poll(&flow, Utc::now()).await, Poll::Gone(d) if d.contains("409")), "409 = already used");

    let denied = start_flow(&trakt).await.unwrap();
    emulator.deny(code(&denied));
    assert!(matches!(trakt.poll(&denied, Utc::now()).await, Poll::Denied), "418 = denied");

    let mut unknown = denied.clone();
    unknown.secrets.insert("device_code".into(), authkeeper_state::Secret::new("no-such-code"));
    assert!(matches!(trakt.poll(&unknown, Utc::now()).await, Poll::Gone(d) if d.contains("404")), "404 = invalid code");

    emulator.log().inject("/oauth/device/token", Fault::RetryAfter(1), 1);
    assert!(matches!(trakt.poll(&denied, Utc::now()).await, Poll::SlowDown), "429 = slow down");
    emulator.log().inject("/oauth/device/token", Fault::Status(502), 1);
    assert!(matches!(trakt.poll(&denied, Utc::now()).await, Poll::Unknown(_)), "5xx = unknown");
}

#[tokio::test]
async fn an_expired_code_is_410_and_polling_too_fast_is_429() {
    let (emulator, trakt) = setup(fast()).await;
    let flow = start_flow(&trakt).await.unwrap();
    emulator.expire_device_codes();
    assert!(matches!(trakt.poll(&flow, Utc::now()).await, Poll::Gone(d) if d.contains("410")));

    let (_emulator, trakt) = setup(TraktOptions { interval: 5, ..TraktOptions::default() }).await;
    let flow = start_flow(&trakt).await.unwrap();
    assert!(matches!(trakt.poll(&flow, Utc::now()).await, Poll::Pending));
    assert!(matches!(trakt.poll(&flow, Utc::now()).await, Poll::SlowDown), "a second poll inside the interval");
}

#[tokio::test]
async fn refresh_rotates_and_a_used_or_revoked_token_is_rejected() {
    let (emulator, trakt) = setup(fast()).await;
    let flow = start_flow(&trakt).await.unwrap();
    emulator.approve(code(&flow));
    let Poll::Approved(first) = trakt.poll(&flow, Utc::now()).await else { panic!() };

    let Verdict::Valid(who) = trakt.validate(&first).await else { panic!("a fresh token validates") };
    assert_eq!(who.account.name, "sean");

    let Verdict::Valid(second) = trakt.refresh(&first, Utc::now()).await else { panic!("refresh works once") };
    assert_ne!(second.refresh_token, first.refresh_token, "the refresh token rotated");
    assert!(matches!(trakt.refresh(&first, Utc::now()).await, Verdict::Rejected(_)), "the old one is dead");

    emulator.log().inject("/oauth/token", Fault::Status(503), 1);
    assert!(matches!(trakt.refresh(&second, Utc::now()).await, Verdict::Unknown(_)), "503 is not a verdict");

    trakt.revoke(&second).await.unwrap();
    assert!(matches!(trakt.validate(&second).await, Verdict::Rejected(d) if d.contains("401")));
    assert!(matches!(trakt.refresh(&second, Utc::now()).await, Verdict::Rejected(_)));
}

#[tokio::test]
async fn missing_app_credentials_are_a_config_error_not_a_rejection() {
    let emulator = TraktEmulator::start(fast()).await.unwrap();
    let url = emulator.url();
    let trakt = adapter(json!({}), &url);
    assert!(matches!(start_flow(&trakt).await, Err(FlowError::Config(m)) if m.contains("client_id")));

    let trakt_wrong = adapter(json!({"client_id": "wrong", "client_secret": "x"}), &url);
    let creds = Grant::bearer("whatever", Utc::now());
    assert!(
        matches!(trakt_wrong.validate(&creds).await, Verdict::Unknown(m) if m.contains("403")),
        "a bad API key says nothing about the user's token"
    );
}
