//! Jellyfin: Quick Connect (a code the user enters in a signed-in app) and username/password
//! (used once, never kept). Every call carries `Authorization: MediaBrowser …` with a DeviceId
//! that is stable per profile (Jellyfin 12 turns the legacy headers off; a new login on the
//! same DeviceId revokes that device's earlier token). Tokens live until revoked.

use super::answer::json;
use super::{
    Adapter, Begun, Extras, FlowError, FlowManifest, Identity, Input, Manifest, Poll, Profile, Provider, Setup,
    Verdict, nonempty, nonempty_secret,
};
use crate::limits::Kind;
use async_trait::async_trait;
use authkeeper_state::{Account, Grant, PendingFlow, ProfileState, Secret};
use chrono::{DateTime, TimeDelta, Utc};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::LazyLock;

pub struct Jellyfin;

/// How errors name it.
const LABEL: &str = "Jellyfin";
/// What the client calls itself in the `Authorization` header and the server's device list.
const CLIENT: &str = "authkeeper";
/// Quick Connect requests live ten minutes on the server.
const QUICK_CONNECT_TTL: TimeDelta = TimeDelta::minutes(10);
/// How often a pending Quick Connect is asked about (Jellyfin's web client: every 5 s).
const QUICK_CONNECT_POLL_SECS: u64 = 5;

static MANIFEST: LazyLock<Manifest> = LazyLock::new(|| Manifest {
    name: "jellyfin",
    label: "Jellyfin",
    block: "jellyfin",
    flows: vec![
        FlowManifest { flow: "quick_connect", fields: vec![], secret_fields: vec![] },
        FlowManifest { flow: "password", fields: vec!["username", "password"], secret_fields: vec!["password"] },
    ],
    config: vec!["server"],
    credential_keys: &["access_token", "user_id", "username", "device_id"],
    named_profiles: false,
});

/// The `jellyfin` block of CrossWatch's config.json.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Block {
    pub server: Option<String>,
    pub access_token: Option<Secret>,
    pub user_id: Option<String>,
    pub username: Option<String>,
    pub device_id: Option<String>,
    pub verify_ssl: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct QuickConnect {
    secret: String,
    code: String,
    #[serde(default)]
    authenticated: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AuthenticationResult {
    user: User,
    access_token: String,
    server_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct User {
    name: String,
    id: String,
}

/// The server's URL: `base_url` when set, else the profile's `server`.
fn server(cx: &Setup) -> Result<String, String> {
    let block: &Block = cx.profile.typed();
    match (&cx.profile.base_url, nonempty(&block.server)) {
        (Some(url), _) => Ok(url.trim_end_matches('/').to_owned()),
        (None, Some(url)) => Ok(url.trim_end_matches('/').to_owned()),
        (None, None) => Err("the jellyfin block of config.json needs server: the Jellyfin server's URL, \
                             e.g. http://192.168.1.10:8096"
            .into()),
    }
}

fn device_id(cx: &Setup) -> &str {
    cx.state.fact("device_id").unwrap_or(CLIENT)
}

/// `MediaBrowser Client="…", Device="…", DeviceId="…", Version="…"[, Token="…"]`.
fn authorization(device_id: &str, token: Option<&str>) -> String {
    let mut value = format!(
        "MediaBrowser Client=\"{CLIENT}\", Device=\"{CLIENT}\", DeviceId=\"{device_id}\", Version=\"{}\"",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(token) = token {
        value.push_str(&format!(", Token=\"{token}\""));
    }
    value
}

fn request(cx: &Adapter, method: Method, url: &str, token: Option<&str>) -> RequestBuilder {
    cx.http().request(method, url).header("authorization", authorization(device_id(cx), token))
}

/// A call with `grant`'s token, from the device the token was issued to (one imported from
/// CrossWatch keeps its DeviceId).
fn authed(cx: &Adapter, method: Method, url: &str, grant: &Grant) -> RequestBuilder {
    let device = grant.fact("device_id").unwrap_or_else(|| device_id(cx));
    cx.http().request(method, url).header("authorization", authorization(device, Some(grant.access_token.expose())))
}

fn grant(cx: &Adapter, server: &str, body: AuthenticationResult, now: DateTime<Utc>) -> Grant {
    let mut grant = Grant { token_type: "MediaBrowser".into(), ..Grant::bearer(body.access_token, now) };
    grant.set_fact("server_url", server);
    grant.set_fact("user_id", body.user.id);
    grant.set_fact("username", body.user.name);
    grant.set_fact("device_id", device_id(cx));
    if let Some(id) = body.server_id {
        grant.set_fact("server_id", id);
    }
    grant
}

fn unknown_status(status: StatusCode) -> String {
    format!("Jellyfin answered HTTP {}", status.as_u16())
}

impl Jellyfin {
    async fn quick_connect(&self, cx: &Adapter, now: DateTime<Utc>) -> Result<Begun, FlowError> {
        let server = server(cx).map_err(FlowError::Config)?;
        let resp = cx
            .send(Kind::Read, request(cx, Method::GET, &format!("{server}/QuickConnect/Enabled"), None))
            .await
            .map_err(FlowError::Unavailable)?;
        if !resp.status().is_success() {
            return Err(FlowError::Unavailable(unknown_status(resp.status())));
        }
        if !json::<bool>(resp, LABEL).await.map_err(FlowError::Unavailable)? {
            return Err(FlowError::Rejected(
                "Quick Connect is disabled on this Jellyfin server: enable it in the dashboard \
                 (General → Quick Connect), or use --flow password"
                    .into(),
            ));
        }
        let resp = cx
            .send(Kind::Write, request(cx, Method::POST, &format!("{server}/QuickConnect/Initiate"), None))
            .await
            .map_err(FlowError::Unavailable)?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => {
                return Err(FlowError::Rejected("Quick Connect is disabled on this Jellyfin server".into()));
            }
            s => return Err(FlowError::Unavailable(unknown_status(s))),
        }
        let qc: QuickConnect = json(resp, LABEL).await.map_err(FlowError::Unavailable)?;
        Ok(Begun::Pending(PendingFlow {
            kind: "quick_connect".into(),
            user_code: Some(qc.code),
            verification_url: Some(format!("{server}/web/#/quickconnect")),
            authorize_url: None,
            issued_at: now,
            expires_at: now + QUICK_CONNECT_TTL,
            interval_secs: Some(QUICK_CONNECT_POLL_SECS),
            secrets: BTreeMap::from([("secret".to_owned(), Secret::new(qc.secret))]),
        }))
    }

    /// `AuthenticateByName`: the password goes in this one request and is dropped with `input`.
    async fn password(&self, cx: &Adapter, input: Input, now: DateTime<Utc>) -> Result<Begun, FlowError> {
        let server = server(cx).map_err(FlowError::Config)?;
        let username = input.get("username").map(|u| u.expose().trim()).filter(|u| !u.is_empty());
        let Some(username) = username else {
            return Err(FlowError::Input("the password flow needs a username".into()));
        };
        let password = input.get("password").map_or("", |p| p.expose()); // empty is legal
        let req = request(cx, Method::POST, &format!("{server}/Users/AuthenticateByName"), None)
            .json(&json!({ "Username": username, "Pw": password }));
        let resp = cx.send(Kind::Write, req).await.map_err(FlowError::Unavailable)?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => {
                return Err(FlowError::Rejected("Jellyfin refused the username or password (401)".into()));
            }
            StatusCode::FORBIDDEN => {
                return Err(FlowError::Rejected(
                    "Jellyfin refused the login (403): the account is disabled, locked after too many wrong \
                     passwords, or not allowed from this device"
                        .into(),
                ));
            }
            StatusCode::BAD_REQUEST => return Err(FlowError::Input("Jellyfin found the login malformed (400)".into())),
            s => return Err(FlowError::Unavailable(unknown_status(s))),
        }
        let body: AuthenticationResult = json(resp, LABEL).await.map_err(FlowError::Unavailable)?;
        Ok(Begun::Granted(grant(cx, &server, body, now)))
    }
}

#[async_trait]
impl Provider for Jellyfin {
    fn manifest(&self) -> &'static Manifest {
        &MANIFEST
    }

    fn urls(&self, profile: &Profile) -> Vec<(&'static str, String)> {
        nonempty(&profile.typed::<Block>().server).map(|u| ("server", u.to_owned())).into_iter().collect()
    }

    typed_block!(Block);

    fn import(&self, profile: &Profile, now: DateTime<Utc>) -> Option<Grant> {
        let b: &Block = profile.typed();
        let mut grant =
            Grant { token_type: "MediaBrowser".into(), ..Grant::bearer(nonempty_secret(&b.access_token)?, now) };
        let fields = [
            ("user_id", &b.user_id),
            ("username", &b.username),
            ("server_url", &b.server),
            ("device_id", &b.device_id),
        ];
        for (name, value) in fields {
            if let Some(v) = nonempty(value) {
                grant.set_fact(name, v);
            }
        }
        Some(grant)
    }

    fn export(&self, grant: Option<&Grant>) -> Vec<(&'static str, Option<Value>)> {
        let fact = |name: &str| grant.and_then(|g| g.fact(name)).map(Value::from);
        vec![
            ("access_token", grant.map(|g| g.access_token.expose().into())),
            ("user_id", fact("user_id")),
            ("username", fact("username")),
            ("device_id", fact("device_id")),
        ]
    }

    /// A DeviceId made once per profile and kept: a login on it revokes only its own token.
    fn prepare(&self, _profile: &Profile, state: &mut ProfileState) -> bool {
        super::stable_device_id(state)
    }

    async fn begin(&self, cx: &Adapter, flow: &str, input: Input, now: DateTime<Utc>) -> Result<Begun, FlowError> {
        match flow {
            "password" => self.password(cx, input, now).await,
            _ => self.quick_connect(cx, now).await,
        }
    }

    async fn poll(&self, cx: &Adapter, flow: &PendingFlow, now: DateTime<Utc>) -> Poll {
        let (Ok(server), Some(secret)) = (server(cx), flow.secret("secret")) else {
            return Poll::Gone("the Quick Connect request has no server or secret".into());
        };
        let url = format!("{server}/QuickConnect/Connect?secret={}", secret.expose());
        let resp = match cx.send(Kind::Read, request(cx, Method::GET, &url, None)).await {
            Ok(r) => r,
            Err(e) => return Poll::Unknown(e),
        };
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Poll::Gone("Jellyfin no longer knows this Quick Connect request".into()),
            StatusCode::UNAUTHORIZED => return Poll::Gone("Quick Connect was disabled on the server".into()),
            s => return Poll::Unknown(unknown_status(s)),
        }
        match json::<QuickConnect>(resp, LABEL).await {
            Ok(qc) if !qc.authenticated => return Poll::Pending,
            Ok(_) => {}
            Err(e) => return Poll::Unknown(e),
        }
        let req = request(cx, Method::POST, &format!("{server}/Users/AuthenticateWithQuickConnect"), None)
            .json(&json!({ "Secret": secret.expose() }));
        let resp = match cx.send(Kind::Write, req).await {
            Ok(r) => r,
            Err(e) => return Poll::Unknown(e),
        };
        match resp.status() {
            StatusCode::OK => match json::<AuthenticationResult>(resp, LABEL).await {
                Ok(body) => Poll::Approved(grant(cx, &server, body, now)),
                Err(e) => Poll::Unknown(e),
            },
            StatusCode::NOT_FOUND => Poll::Pending,
            s => Poll::Unknown(unknown_status(s)),
        }
    }

    async fn validate(&self, cx: &Adapter, grant: &Grant) -> Verdict<Identity> {
        let server = match server(cx) {
            Ok(s) => s,
            Err(e) => return Verdict::Unknown(e),
        };
        let req = authed(cx, Method::GET, &format!("{server}/Users/Me"), grant);
        let resp = match cx.send(Kind::Read, req).await {
            Ok(r) => r,
            Err(e) => return Verdict::Unknown(e),
        };
        match resp.status() {
            StatusCode::OK => match json::<User>(resp, LABEL).await {
                Ok(user) => {
                    let mut updated = grant.clone();
                    updated.set_fact("user_id", user.id.clone());
                    updated.set_fact("username", user.name.clone());
                    updated.set_fact("server_url", server);
                    let grant = (updated != *grant).then_some(updated);
                    Verdict::Valid(Identity { account: Account { name: user.name.into(), id: Some(user.id) }, grant })
                }
                Err(e) => Verdict::Unknown(e),
            },
            StatusCode::UNAUTHORIZED => Verdict::Rejected("Jellyfin rejected the access token (401)".into()),
            StatusCode::FORBIDDEN => Verdict::Rejected("Jellyfin refused the account (403): disabled?".into()),
            s => Verdict::Unknown(unknown_status(s)),
        }
    }

    async fn revoke(&self, cx: &Adapter, grant: &Grant) -> Result<(), String> {
        let server = server(cx)?;
        let req = authed(cx, Method::POST, &format!("{server}/Sessions/Logout"), grant);
        let resp = cx.send(Kind::Write, req).await?;
        if resp.status().is_success() { Ok(()) } else { Err(unknown_status(resp.status())) }
    }

    fn token(&self, cx: &Setup, grant: &Grant, out: &mut Extras) {
        let device = grant.fact("device_id").unwrap_or_else(|| device_id(cx));
        let value = authorization(device, Some(grant.access_token.expose()));
        out.put("authorization", json!({"header": "Authorization", "value": value}));
        out.put("device_id", device);
        out.put("server_url", server(cx).ok().or_else(|| grant.fact("server_url").map(Into::into)));
        out.put("user_id", grant.fact("user_id"));
    }
}
