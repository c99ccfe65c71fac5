//! AniList: a browser login whose redirect URI must match the app's exactly, or a pasted token
//! (from the app's "pin" redirect page). Tokens live a year and cannot be refreshed: the user is
//! warned 30, 7 and 1 days ahead, then the connection expires. Validation is the GraphQL
//! `Viewer` query; `400 "Invalid token"` is a rejection.

use super::answer::{json, status_error};
use super::{
    Adapter, Begun, Extras, FlowError, FlowManifest, Identity, Input, Manifest, Poll, Profile, Provider, Setup,
    Verdict, jwt_expiry, lifetime, nonempty, nonempty_secret, oauth_code,
};
use crate::limits::{Kind, Limits};
use crate::web::CallbackQuery;
use async_trait::async_trait;
use authkeeper_state::{Account, Grant, PendingFlow, Secret};
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::LazyLock;

pub struct AniList;

/// anilist.co: `/api/v2/oauth/authorize` and `/api/v2/oauth/token`.
const SITE: &str = "https://anilist.co";
/// graphql.anilist.co: the API, at `/`.
pub const GRAPHQL: &str = "https://graphql.anilist.co";
const LABEL: &str = "AniList";

static MANIFEST: LazyLock<Manifest> = LazyLock::new(|| Manifest {
    name: "anilist",
    label: LABEL,
    block: "anilist",
    flows: vec![
        FlowManifest { flow: "oauth_code", fields: vec![], secret_fields: vec![] },
        FlowManifest { flow: "token", fields: vec!["access_token"], secret_fields: vec!["access_token"] },
    ],
    config: vec!["client_id", "client_secret"],
    credential_keys: &["access_token"],
    named_profiles: false,
});

/// The `anilist` block of CrossWatch's config.json (its `user` object is kept as it is).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Block {
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub access_token: Option<Secret>,
}

#[derive(Deserialize)]
struct Token {
    access_token: String,
    expires_in: Option<i64>,
}

#[derive(Deserialize)]
struct Answer {
    data: Option<Data>,
    #[serde(default)]
    errors: Vec<GraphqlError>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "Viewer")]
    viewer: Option<Viewer>,
}

#[derive(Deserialize)]
struct Viewer {
    id: i64,
    name: String,
}

#[derive(Deserialize)]
struct GraphqlError {
    message: String,
}

fn app(cx: &Adapter) -> Result<(&str, &str), String> {
    let block: &Block = cx.profile.typed();
    match (nonempty(&block.client_id), nonempty_secret(&block.client_secret)) {
        (Some(id), Some(secret)) => Ok((id, secret)),
        _ => Err("the anilist block of config.json needs client_id and client_secret (an AniList API client's, \
                  from anilist.co/settings/developer)"
            .into()),
    }
}

/// A token's grant: its end from `expires_in`, else from the token itself (AniList's are JWTs).
fn grant(token: String, expires_in: Option<i64>, now: DateTime<Utc>) -> Grant {
    let expires_at = expires_in.map(|s| now + lifetime(s)).or_else(|| jwt_expiry(&token));
    Grant { token_type: "Bearer".into(), expires_at, ..Grant::bearer(token, now) }
}

#[async_trait]
impl Provider for AniList {
    fn manifest(&self) -> &'static Manifest {
        &MANIFEST
    }

    fn limits(&self) -> Limits {
        // 90 requests a minute nominally, 30 at times.
        Limits { per_second: 0.5, burst: 5, account_reads: None, account_writes: None }
    }

    typed_block!(Block);

    fn import(&self, profile: &Profile, now: DateTime<Utc>) -> Option<Grant> {
        let b: &Block = profile.typed();
        Some(grant(nonempty_secret(&b.access_token)?.to_owned(), None, now))
    }

    fn export(&self, grant: Option<&Grant>) -> Vec<(&'static str, Option<Value>)> {
        vec![("access_token", grant.map(|g| g.access_token.expose().into()))]
    }

    async fn begin(&self, cx: &Adapter, flow: &str, input: Input, now: DateTime<Utc>) -> Result<Begun, FlowError> {
        if flow == "token" {
            let token = input.get("access_token").map(|t| t.expose().trim()).filter(|t| !t.is_empty());
            let token = token.ok_or_else(|| FlowError::Input("the token flow needs access_token".into()))?;
            return Ok(Begun::Granted(grant(token.to_owned(), None, now)));
        }
        let (client_id, _) = app(cx).map_err(FlowError::Config)?;
        let endpoint = format!("{}/api/v2/oauth/authorize", cx.origin(SITE));
        let authorize =
            oauth_code::Authorize { endpoint, client_id, scope: None, pkce: false, nonce: false, extra: Vec::new() };
        oauth_code::begin(cx, authorize, now).map(Begun::Pending)
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
        let req =
            cx.http().post(format!("{}/api/v2/oauth/token", cx.origin(SITE))).header("accept", "application/json");
        let resp = match cx.send(Kind::Write, req.json(&body)).await {
            Ok(r) => r,
            Err(e) => return Poll::Unknown(e),
        };
        match resp.status() {
            // The refresh token AniList hands out cannot be used: it is not kept.
            StatusCode::OK => match json::<Token>(resp, LABEL).await {
                Ok(t) => Poll::Approved(oauth_code::authorised(grant(t.access_token, t.expires_in, now), flow)),
                Err(e) => Poll::Unknown(e),
            },
            s @ (StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED) => Poll::Gone(format!(
                "AniList refused the authorization code ({}); is {} the app's redirect URI, exactly?",
                s.as_u16(),
                flow.secret("redirect_uri").map_or("the redirect URI", |u| u.expose())
            )),
            s => Poll::Unknown(status_error(LABEL, s)),
        }
    }

    async fn validate(&self, cx: &Adapter, grant: &Grant) -> Verdict<Identity> {
        let req = cx
            .http()
            .post(format!("{}/", cx.origin(GRAPHQL)))
            .header("accept", "application/json")
            .bearer_auth(grant.access_token.expose())
            .json(&json!({ "query": "query{Viewer{id name}}" }));
        let resp = match cx.send(Kind::Read, req).await {
            Ok(r) => r,
            Err(e) => return Verdict::Unknown(e),
        };
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Verdict::Unknown(status_error(LABEL, status));
        }
        let answer = match json::<Answer>(resp, LABEL).await {
            Ok(a) => a,
            Err(_) if status == StatusCode::UNAUTHORIZED => {
                return Verdict::Rejected("AniList rejected the access token (401)".into());
            }
            Err(e) => return Verdict::Unknown(e),
        };
        let messages: Vec<&str> = answer.errors.iter().map(|e| e.message.as_str()).collect();
        if let Some(viewer) = answer.data.and_then(|d| d.viewer).filter(|_| status.is_success()) {
            return Verdict::Valid(Identity {
                account: Account { name: viewer.name.into(), id: Some(viewer.id.to_string()) },
                grant: None,
            });
        }
        let said = messages.join("; ");
        match status {
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED
                if messages.iter().any(|m| m.eq_ignore_ascii_case("invalid token") || m.contains("Unauthorized")) =>
            {
                Verdict::Rejected(format!("AniList rejected the access token ({}: {said})", status.as_u16()))
            }
            s => Verdict::Unknown(format!("AniList answered HTTP {} without a viewer ({said})", s.as_u16())),
        }
    }

    fn token(&self, _cx: &Setup, _grant: &Grant, _out: &mut Extras) {}
}
