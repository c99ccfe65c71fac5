//! Simkl: a PIN the user enters at simkl.com/pin, or a browser login with PKCE. Tokens do not
//! expire and there is no refresh or revoke API. Every call carries the app's `client_id`,
//! `app-name` and `app-version`.

use super::answer::{json, status_error};
use super::{
    Adapter, Begun, Extras, FlowError, FlowManifest, Identity, Input, Manifest, Poll, Profile, Provider, Setup,
    Verdict, lifetime, nonempty, nonempty_secret, oauth_code, poll_interval,
};
use crate::limits::{Kind, Limits, Rate};
use crate::web::CallbackQuery;
use async_trait::async_trait;
use authkeeper_state::{Account, Grant, PendingFlow, Secret};
use chrono::{DateTime, Utc};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::LazyLock;

pub struct Simkl;

pub const API: &str = "https://api.simkl.com";
/// The browser's host (`/oauth/authorize`).
const SITE: &str = "https://simkl.com";
const LABEL: &str = "Simkl";

static MANIFEST: LazyLock<Manifest> = LazyLock::new(|| Manifest {
    name: "simkl",
    label: LABEL,
    block: "simkl",
    flows: vec![
        FlowManifest { flow: "device_pin", fields: vec![], secret_fields: vec![] },
        FlowManifest { flow: "oauth_code", fields: vec![], secret_fields: vec![] },
    ],
    config: vec!["client_id"],
    credential_keys: &["access_token", "refresh_token", "token_expires_at"],
    named_profiles: false,
});

/// The `simkl` block of CrossWatch's config.json.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Block {
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub access_token: Option<Secret>,
    pub refresh_token: Option<Secret>,
    pub token_expires_at: Option<f64>,
}

#[derive(Deserialize)]
struct Pin {
    result: Option<String>,
    device_code: Option<String>,
    user_code: Option<String>,
    verification_url: Option<String>,
    expires_in: Option<i64>,
    interval: Option<u64>,
    access_token: Option<String>,
}

#[derive(Deserialize)]
struct Token {
    access_token: String,
    token_type: Option<String>,
    scope: Option<String>,
    expires_in: Option<i64>,
}

#[derive(Deserialize)]
struct Settings {
    user: SettingsUser,
    account: Option<SettingsAccount>,
}

#[derive(Deserialize)]
struct SettingsUser {
    name: String,
}

#[derive(Deserialize)]
struct SettingsAccount {
    id: Option<Value>,
}

fn client_id(cx: &Setup) -> Result<&str, String> {
    let block: &Block = cx.profile.typed();
    nonempty(&block.client_id).ok_or_else(|| {
        "the simkl block of config.json needs client_id (a Simkl app's, from simkl.com/settings/developer)".into()
    })
}

/// A call to the API with the app's identity on it.
fn request(cx: &Adapter, method: Method, path: &str, client_id: &str) -> RequestBuilder {
    cx.http()
        .request(method, format!("{}{path}", cx.origin(API)))
        .query(&[("client_id", client_id), ("app-name", "authkeeper"), ("app-version", env!("CARGO_PKG_VERSION"))])
        .header("simkl-api-key", client_id)
}

/// A status with no verdict on the token; 412 is Simkl refusing the app itself.
fn simkl_error(status: StatusCode) -> String {
    match status {
        StatusCode::PRECONDITION_FAILED => {
            "Simkl refused the app's client_id (412 client_id_failed): check client_id in the simkl block".into()
        }
        s => status_error(LABEL, s),
    }
}

fn grant(token: Token, now: DateTime<Utc>) -> Grant {
    Grant {
        token_type: token.token_type.map_or_else(|| "bearer".into(), Into::into),
        scope: token.scope.map(Into::into),
        expires_at: token.expires_in.map(|s| now + lifetime(s)),
        ..Grant::bearer(token.access_token, now)
    }
}

#[async_trait]
impl Provider for Simkl {
    fn manifest(&self) -> &'static Manifest {
        &MANIFEST
    }

    fn limits(&self) -> Limits {
        Limits {
            per_second: 10.0,
            burst: 1,
            account_reads: None,
            account_writes: Some(Rate { count: 1, per_secs: 1.0 }),
        }
    }

    typed_block!(Block);

    fn import(&self, profile: &Profile, now: DateTime<Utc>) -> Option<Grant> {
        let b: &Block = profile.typed();
        Some(Grant {
            refresh_token: nonempty_secret(&b.refresh_token).map(Secret::new),
            expires_at: b.token_expires_at.and_then(|s| DateTime::from_timestamp(s as i64, 0)),
            ..Grant::bearer(nonempty_secret(&b.access_token)?, now)
        })
    }

    fn export(&self, grant: Option<&Grant>) -> Vec<(&'static str, Option<Value>)> {
        vec![
            ("access_token", grant.map(|g| g.access_token.expose().into())),
            ("token_expires_at", grant.and_then(|g| g.expires_at).map(|t| t.timestamp().into())),
        ]
    }

    async fn begin(&self, cx: &Adapter, flow: &str, _input: Input, now: DateTime<Utc>) -> Result<Begun, FlowError> {
        let client_id = client_id(cx).map_err(FlowError::Config)?;
        if flow == "oauth_code" {
            let endpoint = format!("{}/oauth/authorize", cx.origin(SITE));
            let authorize =
                oauth_code::Authorize { endpoint, client_id, scope: None, pkce: true, nonce: false, extra: Vec::new() };
            return oauth_code::begin(cx, authorize, now).map(Begun::Pending);
        }
        let resp = cx.send(Kind::Read, request(cx, Method::GET, "/oauth/pin", client_id)).await;
        let resp = resp.map_err(FlowError::Unavailable)?;
        if !resp.status().is_success() {
            return Err(FlowError::Unavailable(simkl_error(resp.status())));
        }
        let pin: Pin = json(resp, LABEL).await.map_err(FlowError::Unavailable)?;
        let (Some(device_code), Some(user_code)) = (pin.device_code, pin.user_code) else {
            return Err(FlowError::Unavailable("Simkl's PIN answer has no code".into()));
        };
        Ok(Begun::Pending(PendingFlow {
            kind: "device_pin".into(),
            user_code: Some(user_code),
            verification_url: Some(pin.verification_url.unwrap_or_else(|| "https://simkl.com/pin".into())),
            authorize_url: None,
            issued_at: now,
            expires_at: now + lifetime(pin.expires_in.unwrap_or(900)),
            interval_secs: Some(poll_interval(pin.interval.unwrap_or(5))),
            secrets: BTreeMap::from([("device_code".to_owned(), Secret::new(device_code))]),
        }))
    }

    async fn poll(&self, cx: &Adapter, flow: &PendingFlow, now: DateTime<Utc>) -> Poll {
        let (client_id, Some(code)) = (client_id(cx), flow.user_code.as_deref()) else {
            return Poll::Gone("the pending flow has no PIN".into());
        };
        let client_id = match client_id {
            Ok(id) => id,
            Err(e) => return Poll::Unknown(e),
        };
        let req = request(cx, Method::GET, &format!("/oauth/pin/{code}"), client_id);
        let resp = match cx.send(Kind::Read, req).await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => return Poll::Unknown(simkl_error(r.status())),
            Err(e) => return Poll::Unknown(e),
        };
        match json::<Pin>(resp, LABEL).await {
            Ok(Pin { access_token: Some(token), .. }) if !token.is_empty() => Poll::Approved(Grant::bearer(token, now)),
            // Simkl's quirk: a code it no longer knows is answered with a fresh PIN.
            Ok(Pin { device_code: Some(_), .. }) => {
                Poll::Gone("Simkl no longer knows this PIN (it answered with a new one)".into())
            }
            Ok(Pin { result: Some(r), .. }) if r == "KO" => Poll::Pending,
            Ok(_) => Poll::Unknown("Simkl's PIN answer was neither pending nor approved".into()),
            Err(e) => Poll::Unknown(e),
        }
    }

    async fn complete(&self, cx: &Adapter, flow: &PendingFlow, query: &CallbackQuery, now: DateTime<Utc>) -> Poll {
        let client_id = match client_id(cx) {
            Ok(id) => id,
            Err(e) => return Poll::Unknown(e),
        };
        let code = match oauth_code::code(query) {
            Ok(code) => code,
            Err(end) => return *end,
        };
        let mut body = oauth_code::as_json(&oauth_code::exchange_fields(flow, code, client_id));
        let block: &Block = cx.profile.typed();
        if let Some(secret) = nonempty_secret(&block.client_secret) {
            body["client_secret"] = secret.into();
        }
        let req = request(cx, Method::POST, "/oauth/token", client_id).json(&body);
        let resp = match cx.send(Kind::Write, req).await {
            Ok(r) => r,
            Err(e) => return Poll::Unknown(e),
        };
        match resp.status() {
            StatusCode::OK => match json::<Token>(resp, LABEL).await {
                Ok(token) => Poll::Approved(oauth_code::authorised(grant(token, now), flow)),
                Err(e) => Poll::Unknown(e),
            },
            s @ (StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED) => {
                Poll::Gone(format!("Simkl refused the authorization code ({})", s.as_u16()))
            }
            s => Poll::Unknown(status_error(LABEL, s)),
        }
    }

    async fn validate(&self, cx: &Adapter, grant: &Grant) -> Verdict<Identity> {
        let client_id = match client_id(cx) {
            Ok(id) => id,
            Err(e) => return Verdict::Unknown(e),
        };
        let req = request(cx, Method::POST, "/users/settings", client_id)
            .bearer_auth(grant.access_token.expose())
            .json(&json!({}));
        let resp = match cx.send(Kind::Write, req).await {
            Ok(r) => r,
            Err(e) => return Verdict::Unknown(e),
        };
        match resp.status() {
            StatusCode::OK => match json::<Settings>(resp, LABEL).await {
                Ok(s) => {
                    let id = s.account.and_then(|a| a.id).map(|id| id.to_string().trim_matches('"').to_owned());
                    Verdict::Valid(Identity { account: Account { name: s.user.name.into(), id }, grant: None })
                }
                Err(e) => Verdict::Unknown(e),
            },
            StatusCode::UNAUTHORIZED => Verdict::Rejected("Simkl rejected the access token (401)".into()),
            s => Verdict::Unknown(simkl_error(s)),
        }
    }

    fn token(&self, cx: &Setup, _grant: &Grant, out: &mut Extras) {
        if let Ok(id) = client_id(cx) {
            out.put("client_id", id);
        }
    }
}
