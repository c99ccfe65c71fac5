//! Trakt: device-code flow, rotating refresh tokens, revoke, whoami via `/users/settings`.

use super::answer::json;
use super::{
    Adapter, Begun, Extras, FlowError, FlowManifest, Identity, Input, Manifest, Poll, Profile, Provider, Setup,
    Verdict, lifetime, nonempty, nonempty_secret, oauth_code, poll_interval,
};
use crate::limits::{Kind, Limits, Rate};
use crate::web::CallbackQuery;
use async_trait::async_trait;
use authkeeper_state::{Account, Grant, PendingFlow, Secret};
use chrono::{DateTime, Utc};
use reqwest::{RequestBuilder, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::LazyLock;

pub const API: &str = "https://api.trakt.tv";
/// How errors name it.
const LABEL: &str = "Trakt";
/// Where the browser authorizes an app (`/oauth/authorize`).
const AUTHORIZE_ORIGIN: &str = "https://trakt.tv";
/// Refresh for device-flow apps uses the out-of-band redirect URI.
const OOB: &str = "urn:ietf:wg:oauth:2.0:oob";

pub struct Trakt;

static MANIFEST: LazyLock<Manifest> = LazyLock::new(|| Manifest {
    name: "trakt",
    label: "Trakt",
    block: "trakt",
    flows: vec![
        FlowManifest { flow: "device_pin", fields: vec![], secret_fields: vec![] },
        FlowManifest { flow: "oauth_code", fields: vec![], secret_fields: vec![] },
    ],
    config: vec!["client_id", "client_secret"],
    credential_keys: &["access_token", "refresh_token", "scope", "token_type", "expires_at"],
    named_profiles: false,
});

/// The `trakt` block of CrossWatch's config.json.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Block {
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub access_token: Option<Secret>,
    pub refresh_token: Option<Secret>,
    pub scope: Option<String>,
    pub token_type: Option<String>,
    pub expires_at: Option<f64>,
}

#[derive(Deserialize)]
struct DeviceCodeResponse {
    device_code: String,
    user_code: String,
    verification_url: String,
    expires_in: i64,
    interval: u64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    refresh_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<i64>,
    scope: Option<String>,
}

#[derive(Deserialize)]
struct Settings {
    user: SettingsUser,
}

#[derive(Deserialize)]
struct SettingsUser {
    username: String,
    ids: Option<SettingsIds>,
}

#[derive(Deserialize)]
struct SettingsIds {
    slug: Option<String>,
}

/// The app's client id and secret, which every Trakt call needs.
fn app(cx: &Adapter) -> Result<(&str, &str), String> {
    let block: &Block = cx.profile.typed();
    match (nonempty(&block.client_id), nonempty_secret(&block.client_secret)) {
        (Some(id), Some(secret)) => Ok((id, secret)),
        _ => Err("the trakt block of config.json needs client_id and client_secret (a Trakt API app's; \
                  creating one needs a VIP account)"
            .into()),
    }
}

fn request(cx: &Adapter, method: reqwest::Method, path: &str, client_id: &str) -> RequestBuilder {
    cx.http()
        .request(method, format!("{}{path}", cx.origin(API)))
        .header("trakt-api-key", client_id)
        .header("trakt-api-version", "2")
}

fn grant(body: TokenResponse, now: DateTime<Utc>) -> Grant {
    Grant {
        refresh_token: body.refresh_token.map(Secret::new),
        token_type: body.token_type.map_or_else(|| "bearer".into(), Into::into),
        scope: body.scope.map(Into::into),
        expires_at: body.expires_in.map(|s| now + lifetime(s)),
        ..Grant::bearer(body.access_token, now)
    }
}

fn unknown_status(status: StatusCode) -> String {
    match status {
        StatusCode::TOO_MANY_REQUESTS => "rate limited by Trakt (429)".into(),
        StatusCode::FORBIDDEN => "Trakt refused the API key (403): check trakt.client_id".into(),
        s => format!("Trakt answered HTTP {}", s.as_u16()),
    }
}

#[async_trait]
impl Provider for Trakt {
    fn manifest(&self) -> &'static Manifest {
        &MANIFEST
    }

    fn limits(&self) -> Limits {
        Limits {
            per_second: 10.0,
            burst: 1,
            account_reads: Some(Rate { count: 1000, per_secs: 300.0 }),
            account_writes: Some(Rate { count: 1, per_secs: 1.0 }),
        }
    }

    typed_block!(Block);

    fn import(&self, profile: &Profile, now: DateTime<Utc>) -> Option<Grant> {
        let b: &Block = profile.typed();
        Some(Grant {
            refresh_token: nonempty_secret(&b.refresh_token).map(Secret::new),
            token_type: b.token_type.as_deref().unwrap_or("bearer").into(),
            scope: b.scope.as_deref().map(Into::into),
            expires_at: b.expires_at.and_then(|s| DateTime::from_timestamp(s as i64, 0)),
            ..Grant::bearer(nonempty_secret(&b.access_token)?, now)
        })
    }

    fn export(&self, grant: Option<&Grant>) -> Vec<(&'static str, Option<Value>)> {
        let g = grant;
        vec![
            ("access_token", g.map(|g| g.access_token.expose().into())),
            ("refresh_token", g.and_then(|g| g.refresh_token.as_ref()).map(|t| t.expose().into())),
            ("token_type", g.map(|g| g.token_type.as_str().into())),
            ("scope", g.and_then(|g| g.scope.as_deref()).map(Into::into)),
            ("expires_at", g.and_then(|g| g.expires_at).map(|t| t.timestamp().into())),
        ]
    }

    async fn begin(&self, cx: &Adapter, flow: &str, _input: Input, now: DateTime<Utc>) -> Result<Begun, FlowError> {
        let (client_id, _) = app(cx).map_err(FlowError::Config)?;
        if flow == "oauth_code" {
            let authorize = oauth_code::Authorize {
                endpoint: format!("{}/oauth/authorize", cx.origin(AUTHORIZE_ORIGIN)),
                client_id,
                scope: None,
                pkce: false,
                nonce: false,
                extra: Vec::new(),
            };
            return oauth_code::begin(cx, authorize, now).map(Begun::Pending);
        }
        let req = request(cx, reqwest::Method::POST, "/oauth/device/code", client_id)
            .json(&json!({ "client_id": client_id }));
        let resp = cx.send(Kind::Write, req).await.map_err(FlowError::Unavailable)?;
        if !resp.status().is_success() {
            return Err(FlowError::Unavailable(unknown_status(resp.status())));
        }
        let body: DeviceCodeResponse = json(resp, LABEL).await.map_err(FlowError::Unavailable)?;
        Ok(Begun::Pending(PendingFlow {
            kind: "device_pin".into(),
            user_code: Some(body.user_code),
            verification_url: Some(body.verification_url),
            authorize_url: None,
            issued_at: now,
            expires_at: now + lifetime(body.expires_in),
            interval_secs: Some(poll_interval(body.interval)),
            secrets: BTreeMap::from([("device_code".to_owned(), Secret::new(body.device_code))]),
        }))
    }

    async fn poll(&self, cx: &Adapter, flow: &PendingFlow, now: DateTime<Utc>) -> Poll {
        let (client_id, secret) = match app(cx) {
            Ok(app) => app,
            Err(e) => return Poll::Unknown(e),
        };
        let Some(code) = flow.secret("device_code") else {
            return Poll::Gone("the pending flow has no device code".into());
        };
        let req = request(cx, reqwest::Method::POST, "/oauth/device/token", client_id)
            .json(&json!({ "code": code.expose(), "client_id": client_id, "client_secret": secret }));
        let resp = match cx.send(Kind::Write, req).await {
            Ok(r) => r,
            Err(e) => return Poll::Unknown(e),
        };
        match resp.status().as_u16() {
            200 => match json::<TokenResponse>(resp, LABEL).await {
                Ok(body) => Poll::Approved(grant(body, now)),
                Err(e) => Poll::Unknown(e),
            },
            400 => Poll::Pending,
            404 => Poll::Gone("Trakt does not know this code (404)".into()),
            409 => Poll::Gone("the code was already used (409)".into()),
            410 => Poll::Gone("the code expired before it was approved (410)".into()),
            418 => Poll::Denied,
            429 => Poll::SlowDown,
            _ => Poll::Unknown(unknown_status(resp.status())),
        }
    }

    async fn complete(&self, cx: &Adapter, flow: &PendingFlow, query: &CallbackQuery, now: DateTime<Utc>) -> Poll {
        let (client_id, secret) = match app(cx) {
            Ok(app) => app,
            Err(e) => return Poll::Unknown(e),
        };
        let code = match oauth_code::code(query) {
            Ok(code) => code,
            Err(end) => return *end,
        };
        let mut body = oauth_code::as_json(&oauth_code::exchange_fields(flow, code, client_id));
        body["client_secret"] = secret.into();
        let req = request(cx, reqwest::Method::POST, "/oauth/token", client_id).json(&body);
        let resp = match cx.send(Kind::Write, req).await {
            Ok(r) => r,
            Err(e) => return Poll::Unknown(e),
        };
        match resp.status() {
            StatusCode::OK => match json::<TokenResponse>(resp, LABEL).await {
                Ok(body) => Poll::Approved(oauth_code::authorised(grant(body, now), flow)),
                Err(e) => Poll::Unknown(e),
            },
            s @ (StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED) => {
                Poll::Gone(format!("Trakt refused the authorization code ({})", s.as_u16()))
            }
            s => Poll::Unknown(unknown_status(s)),
        }
    }

    async fn validate(&self, cx: &Adapter, grant: &Grant) -> Verdict<Identity> {
        let (client_id, _) = match app(cx) {
            Ok(app) => app,
            Err(e) => return Verdict::Unknown(e),
        };
        let req =
            request(cx, reqwest::Method::GET, "/users/settings", client_id).bearer_auth(grant.access_token.expose());
        let resp = match cx.send(Kind::Read, req).await {
            Ok(r) => r,
            Err(e) => return Verdict::Unknown(e),
        };
        match resp.status() {
            StatusCode::OK => match json::<Settings>(resp, LABEL).await {
                Ok(s) => {
                    let id = s.user.ids.and_then(|i| i.slug);
                    Verdict::Valid(Identity { account: Account { name: s.user.username.into(), id }, grant: None })
                }
                Err(e) => Verdict::Unknown(e),
            },
            StatusCode::UNAUTHORIZED => Verdict::Rejected("Trakt rejected the access token (401)".into()),
            StatusCode::LOCKED => Verdict::Rejected("the Trakt account is locked (423)".into()),
            s => Verdict::Unknown(unknown_status(s)),
        }
    }

    async fn refresh(&self, cx: &Adapter, grant: &Grant, now: DateTime<Utc>) -> Verdict<Grant> {
        let (client_id, secret) = match app(cx) {
            Ok(app) => app,
            Err(e) => return Verdict::Unknown(e),
        };
        let Some(refresh_token) = &grant.refresh_token else {
            return Verdict::Rejected("no refresh token".into());
        };
        let req = request(cx, reqwest::Method::POST, "/oauth/token", client_id).json(&json!({
            "refresh_token": refresh_token.expose(),
            "client_id": client_id,
            "client_secret": secret,
            // The redirect URI the grant was authorised with; device grants use the out-of-band one.
            "redirect_uri": grant.fact("redirect_uri").unwrap_or(OOB),
            "grant_type": "refresh_token",
        }));
        let resp = match cx.send(Kind::Write, req).await {
            Ok(r) => r,
            Err(e) => return Verdict::Unknown(e),
        };
        match resp.status() {
            StatusCode::OK => match json::<TokenResponse>(resp, LABEL).await {
                Ok(body) => Verdict::Valid(self::grant(body, now)),
                Err(e) => Verdict::Unknown(e),
            },
            // A dead refresh token: 401 invalid_grant, or lately a bare 400.
            StatusCode::UNAUTHORIZED | StatusCode::BAD_REQUEST => {
                Verdict::Rejected(format!("Trakt rejected the refresh token ({})", resp.status().as_u16()))
            }
            s => Verdict::Unknown(unknown_status(s)),
        }
    }

    async fn revoke(&self, cx: &Adapter, grant: &Grant) -> Result<(), String> {
        let (client_id, secret) = app(cx)?;
        let req = request(cx, reqwest::Method::POST, "/oauth/revoke", client_id)
            .json(&json!({ "token": grant.access_token.expose(), "client_id": client_id, "client_secret": secret }));
        let resp = cx.send(Kind::Write, req).await?;
        if resp.status().is_success() { Ok(()) } else { Err(unknown_status(resp.status())) }
    }

    fn token(&self, cx: &Setup, _grant: &Grant, out: &mut Extras) {
        let block: &Block = cx.profile.typed();
        if let Some(id) = nonempty(&block.client_id) {
            out.put("client_id", id);
        }
    }
}
