//! Trakt: device-code flow, rotating refresh tokens, revoke, whoami via `/users/settings`.

use super::{Extras, FlowManifest, Manifest, Poll, Provider, StartError, Verdict, transport_error};
use crate::config::TraktBlock;
use crate::limits::{Gate, Kind};
use authkeeper_state::{Account, Credentials, DeviceFlow, Secret};
use chrono::{DateTime, TimeDelta, Utc};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

pub const API: &str = "https://api.trakt.tv";
/// Refresh for device-flow apps uses the out-of-band redirect URI.
const OOB: &str = "urn:ietf:wg:oauth:2.0:oob";

pub fn manifest() -> Manifest {
    Manifest {
        name: "trakt",
        label: "Trakt",
        flows: vec![FlowManifest { flow: "device_pin", fields: vec![] }],
        config: vec!["client_id", "client_secret"],
    }
}

#[derive(Clone)]
pub struct Trakt {
    http: reqwest::Client,
    gate: Arc<Gate>,
    /// Whose limits a call counts against (Trakt limits per user).
    account: String,
    app: Arc<App>,
}

/// Where a profile's API lives and its app's credentials. Profiles that inherit one app from
/// the base block can share one copy ([`Trakt::share_app`]).
#[derive(PartialEq)]
struct App {
    api: String,
    client_id: Option<String>,
    client_secret: Option<Secret>,
    /// What a token answer carries besides the token: the client id, which Trakt's API needs.
    extras: Extras,
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

impl Trakt {
    pub fn new(
        http: reqwest::Client,
        gate: Arc<Gate>,
        account: String,
        base_url: Option<&str>,
        block: &TraktBlock,
    ) -> Self {
        let client_id = block.client_id.clone().filter(|s| !s.is_empty());
        let mut extras = serde_json::Map::new();
        if let Some(id) = &client_id {
            extras.insert("client_id".into(), id.clone().into());
        }
        let app = App {
            api: base_url.unwrap_or(API).trim_end_matches('/').to_owned(),
            client_id,
            client_secret: block.client_secret.as_deref().filter(|s| !s.is_empty()).map(Secret::new),
            extras: Arc::new(extras),
        };
        Self { http, gate, account, app: Arc::new(app) }
    }

    /// Use `other`'s copy of the app when it is the same one.
    pub fn share_app(&mut self, other: &Trakt) {
        if self.app == other.app {
            self.app = other.app.clone();
        }
    }

    fn app(&self) -> Result<(&str, &Secret), String> {
        match (&self.app.client_id, &self.app.client_secret) {
            (Some(id), Some(secret)) => Ok((id, secret)),
            _ => Err("the trakt block of config.json needs client_id and client_secret".into()),
        }
    }

    fn request(&self, method: reqwest::Method, path: &str, client_id: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.app.api))
            .header("trakt-api-key", client_id)
            .header("trakt-api-version", "2")
    }

    /// Send through the provider's gate: wait for a slot under the rate limits, and honour a
    /// `Retry-After` for every later call.
    async fn send(&self, kind: Kind, req: RequestBuilder) -> Result<Response, String> {
        self.gate.acquire(&self.account, kind).await.map_err(|e| e.to_string())?;
        let resp = req.send().await.map_err(transport_error)?;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS
            && let Some(secs) = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()?.trim().parse().ok())
        {
            self.gate.pause_for(secs);
        }
        Ok(resp)
    }

    fn credentials(body: TokenResponse, now: DateTime<Utc>) -> Credentials {
        Credentials {
            access_token: Secret::new(body.access_token),
            refresh_token: body.refresh_token.map(Secret::new),
            token_type: body.token_type.unwrap_or_else(|| "bearer".into()),
            scope: body.scope,
            issued_at: now,
            expires_at: body.expires_in.map(|s| now + TimeDelta::seconds(s)),
        }
    }
}

fn unknown_status(status: StatusCode) -> String {
    match status {
        StatusCode::TOO_MANY_REQUESTS => "rate limited by Trakt (429)".into(),
        StatusCode::FORBIDDEN => "Trakt refused the API key (403): check trakt.client_id".into(),
        s => format!("Trakt answered HTTP {}", s.as_u16()),
    }
}

impl Provider for Trakt {
    async fn start_flow(&self, now: DateTime<Utc>) -> Result<DeviceFlow, StartError> {
        let (client_id, _) = self.app().map_err(StartError::Config)?;
        let resp = self
            .send(
                Kind::Write,
                self.request(reqwest::Method::POST, "/oauth/device/code", client_id)
                    .json(&json!({ "client_id": client_id })),
            )
            .await
            .map_err(StartError::Unavailable)?;
        if !resp.status().is_success() {
            return Err(StartError::Unavailable(unknown_status(resp.status())));
        }
        let body: DeviceCodeResponse =
            resp.json().await.map_err(|_| StartError::Unavailable("unreadable device code from Trakt".into()))?;
        Ok(DeviceFlow {
            device_code: Secret::new(body.device_code),
            user_code: body.user_code,
            verification_url: body.verification_url,
            issued_at: now,
            expires_at: now + TimeDelta::seconds(body.expires_in),
            interval_secs: body.interval.max(1),
        })
    }

    async fn poll(&self, flow: &DeviceFlow, now: DateTime<Utc>) -> Poll {
        let (client_id, secret) = match self.app() {
            Ok(app) => app,
            Err(e) => return Poll::Unknown(e),
        };
        let resp = self.send(
            Kind::Write,
            self.request(reqwest::Method::POST, "/oauth/device/token", client_id)
            .json(
                &json!({ "code": flow.device_code.expose(), "client_id": client_id, "client_secret": secret.expose() }),
            )
            )
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return Poll::Unknown(e),
        };
        match resp.status().as_u16() {
            200 => match resp.json::<TokenResponse>().await {
                Ok(body) => Poll::Approved(Self::credentials(body, now)),
                Err(_) => Poll::Unknown("unreadable token from Trakt".into()),
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

    async fn validate(&self, credentials: &Credentials) -> Verdict<Account> {
        let (client_id, _) = match self.app() {
            Ok(app) => app,
            Err(e) => return Verdict::Unknown(e),
        };
        let resp = self
            .send(
                Kind::Read,
                self.request(reqwest::Method::GET, "/users/settings", client_id)
                    .bearer_auth(credentials.access_token.expose()),
            )
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return Verdict::Unknown(e),
        };
        match resp.status() {
            StatusCode::OK => match resp.json::<Settings>().await {
                Ok(s) => {
                    let id = s.user.ids.and_then(|i| i.slug);
                    Verdict::Valid(Account { name: s.user.username, id })
                }
                Err(_) => Verdict::Unknown("unreadable /users/settings answer from Trakt".into()),
            },
            StatusCode::UNAUTHORIZED => Verdict::Rejected("Trakt rejected the access token (401)".into()),
            StatusCode::LOCKED => Verdict::Rejected("the Trakt account is locked (423)".into()),
            s => Verdict::Unknown(unknown_status(s)),
        }
    }

    async fn refresh(&self, credentials: &Credentials, now: DateTime<Utc>) -> Verdict<Credentials> {
        let (client_id, secret) = match self.app() {
            Ok(app) => app,
            Err(e) => return Verdict::Unknown(e),
        };
        let Some(refresh_token) = &credentials.refresh_token else {
            return Verdict::Rejected("no refresh token".into());
        };
        let resp = self
            .send(
                Kind::Write,
                self.request(reqwest::Method::POST, "/oauth/token", client_id).json(&json!({
                    "refresh_token": refresh_token.expose(),
                    "client_id": client_id,
                    "client_secret": secret.expose(),
                    "redirect_uri": OOB,
                    "grant_type": "refresh_token",
                })),
            )
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return Verdict::Unknown(e),
        };
        match resp.status() {
            StatusCode::OK => match resp.json::<TokenResponse>().await {
                Ok(body) => Verdict::Valid(Self::credentials(body, now)),
                Err(_) => Verdict::Unknown("unreadable token from Trakt".into()),
            },
            // A dead refresh token: 401 invalid_grant, or lately a bare 400.
            StatusCode::UNAUTHORIZED | StatusCode::BAD_REQUEST => {
                Verdict::Rejected(format!("Trakt rejected the refresh token ({})", resp.status().as_u16()))
            }
            s => Verdict::Unknown(unknown_status(s)),
        }
    }

    async fn revoke(&self, credentials: &Credentials) -> Result<(), String> {
        let (client_id, secret) = self.app()?;
        let resp = self.send(
            Kind::Write,
            self.request(reqwest::Method::POST, "/oauth/revoke", client_id)
            .json(&json!({ "token": credentials.access_token.expose(), "client_id": client_id, "client_secret": secret.expose() }))
            )
            .await?;
        if resp.status().is_success() { Ok(()) } else { Err(unknown_status(resp.status())) }
    }

    fn token_extras(&self) -> Extras {
        self.app.extras.clone()
    }
}
