//! Emby: username and password (used once, never kept; an empty password is legal), with the
//! `X-Emby-Authorization` header and a DeviceId stable per profile. The server may sit under an
//! `/emby` path prefix: a login that finds no API at the server's root tries there, and the
//! grant keeps the URL that answered. Tokens live until revoked and travel as `X-Emby-Token`.

use super::answer::{json, status_error};
use super::{
    Adapter, Begun, Extras, FlowError, FlowManifest, Identity, Input, Manifest, Profile, Provider, Setup, Verdict,
    nonempty, nonempty_secret,
};
use crate::limits::Kind;
use async_trait::async_trait;
use authkeeper_state::{Account, Grant, ProfileState};
use chrono::{DateTime, Utc};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::LazyLock;

pub struct Emby;

/// What the client calls itself in the header and the server's device list.
const CLIENT: &str = "authkeeper";
const LABEL: &str = "Emby";

static MANIFEST: LazyLock<Manifest> = LazyLock::new(|| Manifest {
    name: "emby",
    label: LABEL,
    block: "emby",
    flows: vec![FlowManifest {
        flow: "password",
        fields: vec!["username", "password"],
        secret_fields: vec!["password"],
    }],
    config: vec!["server"],
    credential_keys: &["access_token", "user_id", "device_id"],
    named_profiles: false,
});

/// The `emby` block of CrossWatch's config.json.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Block {
    pub server: Option<String>,
    pub access_token: Option<authkeeper_state::Secret>,
    pub user_id: Option<String>,
    pub device_id: Option<String>,
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

/// The server as configured: `base_url`, else the profile's `server`.
fn server(cx: &Setup) -> Result<String, String> {
    let block: &Block = cx.profile.typed();
    cx.profile.base_url.as_deref().or(nonempty(&block.server)).map(|s| s.trim_end_matches('/').to_owned()).ok_or_else(
        || "the emby block of config.json needs server: the Emby server's URL, e.g. http://192.168.1.10:8096".into(),
    )
}

/// The grant's API: the configured server, under `/emby` when the login found it there.
fn api(cx: &Setup, grant: &Grant) -> Result<String, String> {
    Ok(format!("{}{}", server(cx)?, grant.fact(PREFIX).unwrap_or_default()))
}

/// The fact that says the API sits under `/emby`.
const PREFIX: &str = "api_prefix";

fn device_id<'a>(cx: &'a Setup, grant: Option<&'a Grant>) -> &'a str {
    grant.and_then(|g| g.fact("device_id")).or(cx.state.fact("device_id")).unwrap_or(CLIENT)
}

/// `Emby UserId="…", Client="…", Device="…", DeviceId="…", Version="…"`.
fn authorization(device_id: &str, user_id: &str) -> String {
    format!(
        "Emby UserId=\"{user_id}\", Client=\"{CLIENT}\", Device=\"{CLIENT}\", DeviceId=\"{device_id}\", Version=\"{}\"",
        env!("CARGO_PKG_VERSION")
    )
}

fn authed(cx: &Adapter, method: Method, url: &str, grant: &Grant) -> RequestBuilder {
    let user = grant.fact("user_id").unwrap_or_default();
    cx.http()
        .request(method, url)
        .header("x-emby-authorization", authorization(device_id(cx, Some(grant)), user))
        .header("x-emby-token", grant.access_token.expose())
}

impl Emby {
    /// One `AuthenticateByName` at `base`; `None` when no Emby API answers there (404).
    async fn login(
        &self,
        cx: &Adapter,
        base: &str,
        username: &str,
        password: &str,
    ) -> Result<Option<AuthenticationResult>, FlowError> {
        let req = cx
            .http()
            .post(format!("{base}/Users/AuthenticateByName"))
            .header("x-emby-authorization", authorization(device_id(cx, None), ""))
            .json(&json!({ "Username": username, "Pw": password }));
        let resp = cx.send(Kind::Write, req).await.map_err(FlowError::Unavailable)?;
        match resp.status() {
            StatusCode::OK => json(resp, LABEL).await.map(Some).map_err(FlowError::Unavailable),
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::UNAUTHORIZED => Err(FlowError::Rejected("Emby refused the username or password (401)".into())),
            StatusCode::FORBIDDEN => {
                Err(FlowError::Rejected("Emby refused the login (403): the user is disabled or not allowed".into()))
            }
            s => Err(FlowError::Unavailable(status_error(LABEL, s))),
        }
    }
}

#[async_trait]
impl Provider for Emby {
    fn manifest(&self) -> &'static Manifest {
        &MANIFEST
    }

    fn urls(&self, profile: &Profile) -> Vec<(&'static str, String)> {
        nonempty(&profile.typed::<Block>().server).map(|u| ("server", u.to_owned())).into_iter().collect()
    }

    typed_block!(Block);

    fn import(&self, profile: &Profile, now: DateTime<Utc>) -> Option<Grant> {
        let b: &Block = profile.typed();
        let mut grant = Grant { token_type: "Emby".into(), ..Grant::bearer(nonempty_secret(&b.access_token)?, now) };
        for (name, value) in [("user_id", &b.user_id), ("device_id", &b.device_id)] {
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
            ("device_id", fact("device_id")),
        ]
    }

    /// A DeviceId made once per profile and kept.
    fn prepare(&self, _profile: &Profile, state: &mut ProfileState) -> bool {
        super::stable_device_id(state)
    }

    /// The password goes in this one request and is dropped with `input`.
    async fn begin(&self, cx: &Adapter, _flow: &str, input: Input, now: DateTime<Utc>) -> Result<Begun, FlowError> {
        let server = server(cx).map_err(FlowError::Config)?;
        let username = input.get("username").map(|u| u.expose().trim()).filter(|u| !u.is_empty());
        let username = username.ok_or_else(|| FlowError::Input("the password flow needs a username".into()))?;
        let password = input.get("password").map_or("", |p| p.expose()); // empty is legal
        let mut base = server.clone();
        let mut result = self.login(cx, &base, username, password).await?;
        if result.is_none() && !server.ends_with("/emby") {
            base = format!("{server}/emby");
            result = self.login(cx, &base, username, password).await?;
        }
        let body = result.ok_or_else(|| FlowError::Unavailable(format!("no Emby API answers at {server}")))?;
        let mut grant = Grant { token_type: "Emby".into(), ..Grant::bearer(body.access_token, now) };
        if base != server {
            grant.set_fact(PREFIX, "/emby");
        }
        grant.set_fact("server_url", base);
        grant.set_fact("user_id", body.user.id);
        grant.set_fact("username", body.user.name);
        grant.set_fact("device_id", device_id(cx, None));
        if let Some(id) = body.server_id {
            grant.set_fact("server_id", id);
        }
        Ok(Begun::Granted(grant))
    }

    async fn validate(&self, cx: &Adapter, grant: &Grant) -> Verdict<Identity> {
        let (base, Some(user_id)) = (api(cx, grant), grant.fact("user_id")) else {
            return Verdict::Rejected("the Emby credential has no user id: log in again".into());
        };
        let base = match base {
            Ok(b) => b,
            Err(e) => return Verdict::Unknown(e),
        };
        let user = |base: String| async move {
            cx.send(Kind::Read, authed(cx, Method::GET, &format!("{base}/Users/{user_id}"), grant)).await
        };
        let mut resp = match user(base.clone()).await {
            Ok(r) => r,
            Err(e) => return Verdict::Unknown(e),
        };
        // A token imported without knowing the server's `/emby` prefix: look there once.
        let mut prefix = None;
        if resp.status() == StatusCode::NOT_FOUND && grant.fact(PREFIX).is_none() && !base.ends_with("/emby") {
            match user(format!("{base}/emby")).await {
                Ok(r) if r.status() != StatusCode::NOT_FOUND => (resp, prefix) = (r, Some("/emby")),
                Ok(_) => {}
                Err(e) => return Verdict::Unknown(e),
            }
        }
        let base = format!("{base}{}", prefix.unwrap_or_default());
        match resp.status() {
            StatusCode::OK => match json::<User>(resp, LABEL).await {
                Ok(user) => {
                    let mut updated = grant.clone();
                    if let Some(prefix) = prefix {
                        updated.set_fact(PREFIX, prefix);
                    }
                    updated.set_fact("username", user.name.clone());
                    updated.set_fact("server_url", base);
                    let grant = (updated != *grant).then_some(updated);
                    Verdict::Valid(Identity { account: Account { name: user.name.into(), id: Some(user.id) }, grant })
                }
                Err(e) => Verdict::Unknown(e),
            },
            StatusCode::UNAUTHORIZED => Verdict::Rejected("Emby rejected the access token (401)".into()),
            StatusCode::FORBIDDEN => Verdict::Rejected("Emby refused the account (403): disabled?".into()),
            // A proxy with the wrong path answers 404 too: no verdict on the token.
            StatusCode::NOT_FOUND => {
                Verdict::Unknown(format!("Emby answered 404 for the user at {base}: is the server URL right?"))
            }
            s => Verdict::Unknown(status_error(LABEL, s)),
        }
    }

    async fn revoke(&self, cx: &Adapter, grant: &Grant) -> Result<(), String> {
        let base = api(cx, grant)?;
        let resp = cx.send(Kind::Write, authed(cx, Method::POST, &format!("{base}/Sessions/Logout"), grant)).await?;
        if resp.status().is_success() { Ok(()) } else { Err(status_error(LABEL, resp.status())) }
    }

    fn token(&self, cx: &Setup, grant: &Grant, out: &mut Extras) {
        out.put("authorization", json!({"header": "X-Emby-Token", "value": grant.access_token.expose()}));
        out.put("device_id", device_id(cx, Some(grant)));
        out.put("server_url", api(cx, grant).ok());
        out.put("user_id", grant.fact("user_id"));
    }
}
