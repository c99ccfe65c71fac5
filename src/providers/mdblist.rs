//! MDBList: an API key, or the device-code OAuth login with refresh. `/user` validates either
//! and tells the daily request quota, which the connection's status shows.

use super::answer::{json, status_error};
use super::oauth2::{Client, ClientAuth};
use super::{
    Adapter, Begun, Extras, FlowError, FlowManifest, Identity, Input, Manifest, Poll, Profile, Provider, Setup,
    Verdict, nonempty, nonempty_secret,
};
use crate::limits::Kind;
use async_trait::async_trait;
use authkeeper_state::{Account, Grant, PendingFlow, Secret};
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::Value;
use std::sync::LazyLock;

pub struct MdbList;

pub const API: &str = "https://api.mdblist.com";
const LABEL: &str = "MDBList";
/// The grant type of a connection made with a key.
const API_KEY: &str = "api_key";

static MANIFEST: LazyLock<Manifest> = LazyLock::new(|| Manifest {
    name: "mdblist",
    label: LABEL,
    block: "mdblist",
    flows: vec![
        FlowManifest { flow: "api_key", fields: vec!["api_key"], secret_fields: vec!["api_key"] },
        FlowManifest { flow: "device_pin", fields: vec![], secret_fields: vec![] },
    ],
    config: vec![],
    credential_keys: &["api_key", "access_token", "refresh_token", "expires_at", "auth_method"],
    named_profiles: false,
});

/// The `mdblist` block of CrossWatch's config.json.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Block {
    pub api_key: Option<Secret>,
    pub access_token: Option<Secret>,
    pub refresh_token: Option<Secret>,
    pub expires_at: Option<f64>,
    /// `api_key` or `device_code`.
    pub auth_method: Option<String>,
    /// The OAuth app's client id (device-code login).
    pub client_id: Option<String>,
}

#[derive(Deserialize)]
struct User {
    username: Option<String>,
    user_id: Option<Value>,
    patron_status: Option<Value>,
}

fn oauth(cx: &Adapter) -> Result<Client<'_>, String> {
    let block: &Block = cx.profile.typed();
    let client_id = nonempty(&block.client_id)
        .ok_or("the device login needs client_id in the mdblist block of config.json (an MDBList OAuth app's)")?;
    let origin = cx.origin(API);
    Ok(Client {
        label: LABEL,
        client_id,
        client_secret: None,
        auth: ClientAuth::None,
        device_endpoint: format!("{origin}/oauth/device-authorization/"),
        token_endpoint: format!("{origin}/oauth/token/"),
    })
}

fn key_grant(key: &str, now: DateTime<Utc>) -> Grant {
    Grant { token_type: API_KEY.into(), ..Grant::bearer(key, now) }
}

/// The quota headers of an answer, as facts.
fn quota(grant: &Grant, headers: &HeaderMap) -> Grant {
    let mut out = grant.clone();
    let names = [
        ("x-ratelimit-remaining", "requests_remaining"),
        ("x-ratelimit-limit", "requests_limit"),
        ("x-ratelimit-reset", "requests_reset"),
    ];
    for (header, fact) in names {
        if let Some(v) = headers.get(header).and_then(|v| v.to_str().ok()) {
            out.set_fact(fact, v.trim());
        }
    }
    out
}

#[async_trait]
impl Provider for MdbList {
    fn manifest(&self) -> &'static Manifest {
        &MANIFEST
    }

    typed_block!(Block);

    fn import(&self, profile: &Profile, now: DateTime<Utc>) -> Option<Grant> {
        let b: &Block = profile.typed();
        let oauth = b.auth_method.as_deref() != Some(API_KEY);
        match nonempty_secret(&b.access_token).filter(|_| oauth) {
            Some(token) => Some(Grant {
                refresh_token: nonempty_secret(&b.refresh_token).map(Secret::new),
                expires_at: b.expires_at.and_then(|s| DateTime::from_timestamp(s as i64, 0)),
                token_type: "Bearer".into(),
                ..Grant::bearer(token, now)
            }),
            None => Some(key_grant(nonempty_secret(&b.api_key)?, now)),
        }
    }

    fn export(&self, grant: Option<&Grant>) -> Vec<(&'static str, Option<Value>)> {
        let by_key = grant.is_some_and(|g| g.token_type == API_KEY);
        let oauth = grant.filter(|_| !by_key);
        let mut out = vec![
            ("access_token", oauth.map(|g| g.access_token.expose().into())),
            ("refresh_token", oauth.and_then(|g| g.refresh_token.as_ref()).map(|t| t.expose().into())),
            ("expires_at", oauth.and_then(|g| g.expires_at).map(|t| t.timestamp().into())),
        ];
        // A key is the user's to keep: written when in use, never removed.
        if let Some(g) = grant {
            out.push(("auth_method", Some(if by_key { API_KEY } else { "device_code" }.into())));
            if by_key {
                out.push(("api_key", Some(g.access_token.expose().into())));
            }
        }
        out
    }

    async fn begin(&self, cx: &Adapter, flow: &str, input: Input, now: DateTime<Utc>) -> Result<Begun, FlowError> {
        if flow == "device_pin" {
            let client = oauth(cx).map_err(FlowError::Config)?;
            return client.begin(cx, None, &[], now).await.map(Begun::Pending);
        }
        let key = input.get("api_key").map(|k| k.expose().trim()).filter(|k| !k.is_empty());
        let key =
            key.ok_or_else(|| FlowError::Input("the api_key flow needs api_key (mdblist.com/preferences)".into()))?;
        Ok(Begun::Granted(key_grant(key, now)))
    }

    async fn poll(&self, cx: &Adapter, flow: &PendingFlow, now: DateTime<Utc>) -> Poll {
        match oauth(cx) {
            Ok(client) => client.poll(cx, flow, now).await,
            Err(e) => Poll::Unknown(e),
        }
    }

    async fn validate(&self, cx: &Adapter, grant: &Grant) -> Verdict<Identity> {
        let req = cx.http().get(format!("{}/user", cx.origin(API)));
        let req = if grant.token_type == API_KEY {
            req.query(&[("apikey", grant.access_token.expose())])
        } else {
            req.bearer_auth(grant.access_token.expose())
        };
        let resp = match cx.send(Kind::Read, req).await {
            Ok(r) => r,
            Err(e) => return Verdict::Unknown(e),
        };
        let status = resp.status();
        let updated = quota(grant, resp.headers());
        match status {
            StatusCode::OK => match json::<User>(resp, LABEL).await {
                Ok(user) => {
                    let name = user.username.unwrap_or_else(|| "(unnamed)".into());
                    let id = user.user_id.map(|id| id.to_string().trim_matches('"').to_owned());
                    let mut updated = updated;
                    if let Some(patron) = user.patron_status {
                        updated.set_fact("patron_status", patron.to_string().trim_matches('"'));
                    }
                    let grant = (updated != *grant).then_some(updated);
                    Verdict::Valid(Identity { account: Account { name: name.into(), id }, grant })
                }
                Err(e) => Verdict::Unknown(e),
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let what = if grant.token_type == API_KEY { "API key" } else { "access token" };
                Verdict::Rejected(format!("MDBList rejected the {what} ({})", status.as_u16()))
            }
            StatusCode::TOO_MANY_REQUESTS => Verdict::Unknown(
                "rate limited by MDBList (429): when the daily request quota is spent, it comes back at the reset"
                    .into(),
            ),
            s => Verdict::Unknown(status_error(LABEL, s)),
        }
    }

    async fn refresh(&self, cx: &Adapter, grant: &Grant, now: DateTime<Utc>) -> Verdict<Grant> {
        match oauth(cx) {
            Ok(client) => client.refresh(cx, grant, now).await,
            Err(e) => Verdict::Unknown(e),
        }
    }

    async fn revoke(&self, cx: &Adapter, grant: &Grant) -> Result<(), String> {
        if grant.token_type == API_KEY {
            return Ok(()); // a key is the user's to delete on mdblist.com
        }
        let client = oauth(cx)?;
        let endpoint = format!("{}/oauth/revoke_token/", cx.origin(API));
        let token = grant.refresh_token.as_ref().unwrap_or(&grant.access_token);
        client.revoke(cx, &endpoint, token.expose()).await
    }

    fn token(&self, _cx: &Setup, _grant: &Grant, _out: &mut Extras) {}
}
