//! TMDB: an app credential (a v3 API key or a v4 read-access token), or a v3 user session made
//! from a request token the user approves. With the web listener on, the approval page sends
//! the browser back to the callback and the session is made at once; otherwise `session/new`
//! is tried every 5 s. TMDB answers code 17 both before approval and after a denial, so 17
//! means "keep trying"; code 33 or the token's 60 minutes end the flow.

use super::answer::{json, status_error};
use super::{
    Adapter, Begun, Extras, FlowError, FlowManifest, Identity, Input, Manifest, Poll, Profile, Provider, Setup,
    Verdict, nonempty_secret,
};
use crate::limits::Kind;
use crate::web::CallbackQuery;
use async_trait::async_trait;
use authkeeper_state::{Account, Grant, PendingFlow, Secret};
use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::LazyLock;

pub struct Tmdb;

pub const API: &str = "https://api.themoviedb.org";
/// www.themoviedb.org: `/authenticate/{request_token}`.
const SITE: &str = "https://www.themoviedb.org";
const LABEL: &str = "TMDB";
/// How often `session/new` is tried without the web listener.
const POLL_SECS: u64 = 5;
/// A request token's life, when TMDB's `expires_at` cannot be read.
const REQUEST_TOKEN_TTL: TimeDelta = TimeDelta::minutes(60);

static MANIFEST: LazyLock<Manifest> = LazyLock::new(|| Manifest {
    name: "tmdb",
    label: LABEL,
    block: "tmdb_sync",
    flows: vec![
        FlowManifest { flow: "api_key", fields: vec!["api_key"], secret_fields: vec!["api_key"] },
        FlowManifest { flow: "request_token", fields: vec!["api_key"], secret_fields: vec!["api_key"] },
    ],
    config: vec![],
    credential_keys: &["api_key", "session_id", "account_id", "username"],
    named_profiles: false,
});

/// The `tmdb_sync` block of CrossWatch's config.json.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Block {
    pub api_key: Option<Secret>,
    pub session_id: Option<Secret>,
    pub account_id: Option<Value>,
    pub username: Option<String>,
}

#[derive(Deserialize)]
struct Status {
    status_code: Option<i64>,
    status_message: Option<String>,
}

#[derive(Deserialize)]
struct RequestToken {
    request_token: String,
    expires_at: Option<String>,
}

#[derive(Deserialize)]
struct Session {
    session_id: String,
}

#[derive(Deserialize)]
struct AccountBody {
    id: Value,
    username: Option<String>,
}

/// A v4 read-access token is a JWT, sent as a bearer; a v3 key goes in `?api_key=`.
fn with_app(req: RequestBuilder, key: &str) -> RequestBuilder {
    if key.starts_with("eyJ") && key.contains('.') { req.bearer_auth(key) } else { req.query(&[("api_key", key)]) }
}

fn request(cx: &Adapter, method: Method, path: &str, key: &str) -> RequestBuilder {
    with_app(cx.http().request(method, format!("{}{path}", cx.origin(API))), key)
}

/// The app's key: the connect body's, else the profile's `api_key`.
fn app_key<'a>(cx: &'a Adapter, input: &'a Input) -> Result<&'a str, FlowError> {
    let block: &Block = cx.profile.typed();
    input
        .get("api_key")
        .map(|k| k.expose().trim())
        .filter(|k| !k.is_empty())
        .or(nonempty_secret(&block.api_key))
        .ok_or_else(|| {
            FlowError::Input(
                "TMDB needs the app's api_key (a v3 key or a v4 read-access token, from \
                              themoviedb.org/settings/api): in the tmdb_sync block or the connect body"
                    .into(),
            )
        })
}

/// TMDB's `status_code` and message of an error answer, if readable.
async fn status(resp: reqwest::Response) -> (Option<i64>, String) {
    match json::<Status>(resp, LABEL).await {
        Ok(s) => (s.status_code, s.status_message.unwrap_or_default()),
        Err(e) => (None, e),
    }
}

fn key_grant(key: &str, now: DateTime<Utc>) -> Grant {
    Grant { token_type: "api_key".into(), ..Grant::bearer(key, now) }
}

/// A session grant keeps the app's key beside the session id.
fn session_grant(session: String, key: &str, now: DateTime<Utc>) -> Grant {
    let mut grant = Grant { token_type: "session".into(), ..Grant::bearer(session, now) };
    grant.set_secret("api_key", Secret::new(key));
    grant
}

fn grant_key(grant: &Grant) -> &str {
    grant.secret("api_key").unwrap_or(&grant.access_token).expose()
}

impl Tmdb {
    /// `session/new` for the flow's request token.
    async fn session(&self, cx: &Adapter, flow: &PendingFlow, now: DateTime<Utc>) -> Poll {
        let (Some(token), Some(key)) = (flow.secret("request_token"), flow.secret("api_key")) else {
            return Poll::Gone("the pending flow has no request token".into());
        };
        let req = request(cx, Method::POST, "/3/authentication/session/new", key.expose())
            .json(&json!({ "request_token": token.expose() }));
        let resp = match cx.send(Kind::Write, req).await {
            Ok(r) => r,
            Err(e) => return Poll::Unknown(e),
        };
        let http = resp.status();
        if http.is_success() {
            return match json::<Session>(resp, LABEL).await {
                Ok(s) => Poll::Approved(session_grant(s.session_id, key.expose(), now)),
                Err(e) => Poll::Unknown(e),
            };
        }
        if http == StatusCode::TOO_MANY_REQUESTS || http.is_server_error() {
            return Poll::Unknown(status_error(LABEL, http));
        }
        match status(resp).await {
            // Not approved yet, or denied: TMDB says the same (17) to both.
            (Some(17), _) => Poll::Pending,
            (Some(33), m) => Poll::Gone(format!("TMDB no longer takes this request token (33: {m})")),
            (Some(7), m) => Poll::Gone(format!("TMDB refused the app's API key (7: {m})")),
            (code, m) => Poll::Unknown(format!("TMDB answered HTTP {} ({code:?}: {m})", http.as_u16())),
        }
    }
}

#[async_trait]
impl Provider for Tmdb {
    fn manifest(&self) -> &'static Manifest {
        &MANIFEST
    }

    typed_block!(Block);

    fn import(&self, profile: &Profile, now: DateTime<Utc>) -> Option<Grant> {
        let b: &Block = profile.typed();
        let key = nonempty_secret(&b.api_key);
        match (nonempty_secret(&b.session_id), key) {
            (Some(session), Some(key)) => Some(session_grant(session.to_owned(), key, now)),
            (_, key) => Some(key_grant(key?, now)),
        }
    }

    fn export(&self, grant: Option<&Grant>) -> Vec<(&'static str, Option<Value>)> {
        let session = grant.filter(|g| g.token_type == "session");
        let fact = |name: &str| session.and_then(|g| g.fact(name)).map(Value::from);
        let mut out = vec![
            ("session_id", session.map(|g| g.access_token.expose().into())),
            ("account_id", fact("account_id")),
            ("username", fact("username")),
        ];
        // The app's key is the user's to keep: written when in use, never removed.
        out.extend(grant.map(|g| ("api_key", Some(grant_key(g).into()))));
        out
    }

    async fn begin(&self, cx: &Adapter, flow: &str, input: Input, now: DateTime<Utc>) -> Result<Begun, FlowError> {
        let key = app_key(cx, &input)?;
        if flow == "api_key" {
            return Ok(Begun::Granted(key_grant(key, now)));
        }
        let resp = cx.send(Kind::Read, request(cx, Method::GET, "/3/authentication/token/new", key)).await;
        let resp = resp.map_err(FlowError::Unavailable)?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED => {
                let (_, m) = status(resp).await;
                return Err(FlowError::Rejected(format!("TMDB refused the app's API key: {m}")));
            }
            s => return Err(FlowError::Unavailable(status_error(LABEL, s))),
        }
        let token: RequestToken = json(resp, LABEL).await.map_err(FlowError::Unavailable)?;
        let expires_at = token
            .expires_at
            .as_deref()
            .and_then(|t| NaiveDateTime::parse_from_str(t.trim_end_matches(" UTC"), "%Y-%m-%d %H:%M:%S").ok())
            .map_or(now + REQUEST_TOKEN_TTL, |t| t.and_utc());
        let redirect = cx.redirect_uri();
        let mut url = reqwest::Url::parse(&format!("{}/authenticate/{}", cx.origin(SITE), token.request_token))
            .map_err(|e| FlowError::Config(format!("bad TMDB origin: {e}")))?;
        if let Some(redirect) = &redirect {
            url.query_pairs_mut().append_pair("redirect_to", redirect);
        }
        let secrets = BTreeMap::from([
            ("request_token".to_owned(), Secret::new(token.request_token.clone())),
            // The callback finds the flow by its request token.
            ("state".to_owned(), Secret::new(token.request_token)),
            ("api_key".to_owned(), Secret::new(key)),
        ]);
        Ok(Begun::Pending(PendingFlow {
            kind: "request_token".into(),
            user_code: None,
            verification_url: None,
            authorize_url: Some(url.into()),
            issued_at: now,
            expires_at,
            interval_secs: redirect.is_none().then_some(POLL_SECS),
            secrets,
        }))
    }

    async fn poll(&self, cx: &Adapter, flow: &PendingFlow, now: DateTime<Utc>) -> Poll {
        self.session(cx, flow, now).await
    }

    async fn complete(&self, cx: &Adapter, flow: &PendingFlow, query: &CallbackQuery, now: DateTime<Utc>) -> Poll {
        if query.get("denied").is_some_and(|d| d == "true") || query.get("approved").is_some_and(|a| a == "false") {
            return Poll::Denied;
        }
        match self.session(cx, flow, now).await {
            // Back from the page but not approved: the user did not approve.
            Poll::Pending => Poll::Denied,
            other => other,
        }
    }

    async fn validate(&self, cx: &Adapter, grant: &Grant) -> Verdict<Identity> {
        let key = grant_key(grant);
        let session = grant.token_type == "session";
        let req = if session {
            request(cx, Method::GET, "/3/account", key).query(&[("session_id", grant.access_token.expose())])
        } else {
            request(cx, Method::GET, "/3/authentication", key)
        };
        let resp = match cx.send(Kind::Read, req).await {
            Ok(r) => r,
            Err(e) => return Verdict::Unknown(e),
        };
        let http = resp.status();
        if http.is_success() && !session {
            let kind = if key.starts_with("eyJ") { "v4 read-access token" } else { "v3 API key" };
            return Verdict::Valid(Identity {
                account: Account { name: compact_str::format_compact!("TMDB app ({kind})"), id: None },
                grant: None,
            });
        }
        if http.is_success() {
            return match json::<AccountBody>(resp, LABEL).await {
                Ok(a) => {
                    let id = a.id.to_string().trim_matches('"').to_owned();
                    let name = a.username.unwrap_or_else(|| id.clone());
                    let mut updated = grant.clone();
                    updated.set_fact("account_id", &id);
                    updated.set_fact("username", &name);
                    let grant = (updated != *grant).then_some(updated);
                    Verdict::Valid(Identity { account: Account { name: name.into(), id: Some(id) }, grant })
                }
                Err(e) => Verdict::Unknown(e),
            };
        }
        if http != StatusCode::UNAUTHORIZED {
            return Verdict::Unknown(status_error(LABEL, http));
        }
        match status(resp).await {
            (Some(3), m) => Verdict::Rejected(format!("TMDB rejected the session (3: {m})")),
            (Some(7), m) => Verdict::Rejected(format!("TMDB rejected the API key (7: {m})")),
            (code, m) => Verdict::Unknown(format!("TMDB answered 401 ({code:?}: {m})")),
        }
    }

    async fn revoke(&self, cx: &Adapter, grant: &Grant) -> Result<(), String> {
        if grant.token_type != "session" {
            return Ok(());
        }
        let req = request(cx, Method::DELETE, "/3/authentication/session", grant_key(grant))
            .json(&json!({ "session_id": grant.access_token.expose() }));
        let resp = cx.send(Kind::Write, req).await?;
        if resp.status().is_success() { Ok(()) } else { Err(status_error(LABEL, resp.status())) }
    }

    fn token(&self, _cx: &Setup, grant: &Grant, out: &mut Extras) {
        out.put("api_key", grant_key(grant));
        if grant.token_type == "session" {
            out.put("session_id", grant.access_token.expose());
        }
    }
}
