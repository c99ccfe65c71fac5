//! An OAuth 2.0 client that follows the RFCs, for the providers that do: the device
//! authorization grant (RFC 8628), the code exchange (RFC 6749 §4.1.3, PKCE), refresh (§6),
//! revocation (RFC 7009) and introspection (RFC 7662), all form-encoded, with client
//! authentication per §2.3 (`client_secret_basic`, `client_secret_post`, or none). It reads
//! what real servers send leniently: `token_type` in any case, `expires_in` as a string or
//! missing (then a JWT access token's own `exp`).
//!
//! A refresh whose answer is lost (the request went out; no answer came back) is reported with
//! [`REFRESH_ANSWER_LOST`] at the start of its error. The server may or may not have rotated,
//! so the next attempt presents the same refresh token once more: if the server never saw
//! the request, that succeeds; if it had rotated, it is refused, and the connection ends with
//! the cause saying so. Nothing is lost that could have been kept: the new pair never reached
//! the daemon, and the old refresh token is the only credential left to try.

use super::answer::{json, status_error};
use super::{Adapter, FlowError, Poll, Verdict, jwt_expiry, lifetime, poll_interval};
use crate::limits::Kind;
use authkeeper_state::{Grant, PendingFlow, REFRESH_ANSWER_LOST, Secret};
use base64::Engine;
use chrono::{DateTime, Utc};
use reqwest::{RequestBuilder, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// The interval when the server gives none (RFC 8628 §3.2).
const DEFAULT_INTERVAL: u64 = 5;

/// How the client proves itself at the token endpoint (RFC 6749 §2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// A public client: `client_id` in the form, no secret.
    None,
    /// HTTP Basic with the form-urlencoded id and secret.
    Basic,
    /// `client_id` and `client_secret` in the form.
    Post,
}

/// One provider's endpoints and client.
pub struct Client<'a> {
    pub label: &'a str,
    pub client_id: &'a str,
    pub client_secret: Option<&'a str>,
    pub auth: ClientAuth,
    pub device_endpoint: String,
    pub token_endpoint: String,
}

#[derive(Deserialize)]
struct DeviceAuthorization {
    device_code: String,
    user_code: String,
    #[serde(alias = "verification_url")]
    verification_uri: String,
    verification_uri_complete: Option<String>,
    expires_in: Value,
    interval: Option<Value>,
}

/// A token endpoint's answer, read leniently.
#[derive(Deserialize)]
pub struct TokenBody {
    pub access_token: String,
    pub token_type: Option<String>,
    pub expires_in: Option<Value>,
    pub refresh_token: Option<String>,
    pub scope: Option<String>,
    pub id_token: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    error_description: Option<String>,
}

/// A number, or a string holding one.
pub fn seconds(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.trim().parse().ok())
}

impl TokenBody {
    /// The grant it describes, received `now`.
    pub fn grant(self, now: DateTime<Utc>) -> Grant {
        let expires_at = self
            .expires_in
            .as_ref()
            .and_then(seconds)
            .map(|s| now + lifetime(s))
            .or_else(|| jwt_expiry(&self.access_token));
        let mut grant = Grant {
            refresh_token: self.refresh_token.filter(|t| !t.is_empty()).map(Secret::new),
            token_type: self.token_type.map_or_else(|| "Bearer".into(), |t| normalise_type(&t).into()),
            scope: self.scope.map(Into::into),
            expires_at,
            ..Grant::bearer(self.access_token, now)
        };
        if let Some(id_token) = self.id_token {
            grant.set_secret("id_token", Secret::new(id_token));
        }
        grant
    }
}

/// `bearer`, `BEARER` → `Bearer`; other types as sent.
fn normalise_type(t: &str) -> String {
    if t.eq_ignore_ascii_case("bearer") { "Bearer".into() } else { t.to_owned() }
}

/// RFC 6749 Appendix B: what Basic authentication carries is form-urlencoded first.
fn form_encode(s: &str) -> String {
    reqwest::Url::parse_with_params("x:", [("", s)])
        .ok()
        .and_then(|u| u.query().map(|q| q[1..].to_owned()))
        .unwrap_or_default()
}

impl Client<'_> {
    /// A form POST to `endpoint` with the client's authentication.
    fn post(&self, cx: &Adapter, endpoint: &str, mut form: Vec<(&str, String)>) -> RequestBuilder {
        let mut req = cx.http().post(endpoint).header("accept", "application/json");
        match (self.auth, self.client_secret) {
            (ClientAuth::Basic, Some(secret)) => {
                let pair = format!("{}:{}", form_encode(self.client_id), form_encode(secret));
                let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
                req = req.header("authorization", format!("Basic {encoded}"));
            }
            (ClientAuth::Post, Some(secret)) => {
                form.push(("client_id", self.client_id.to_owned()));
                form.push(("client_secret", secret.to_owned()));
            }
            _ => form.push(("client_id", self.client_id.to_owned())),
        }
        req.form(&form)
    }

    fn described(&self, error: &str, description: Option<&str>) -> String {
        match description {
            Some(d) => format!("{} answered {error}: {d}", self.label),
            None => format!("{} answered {error}", self.label),
        }
    }

    /// Ask for a device code: the pending flow shows the user code and where to enter it.
    pub async fn begin(
        &self,
        cx: &Adapter,
        scope: Option<&str>,
        extra: &[(&str, String)],
        now: DateTime<Utc>,
    ) -> Result<PendingFlow, FlowError> {
        let mut form = extra.to_vec();
        form.extend(scope.map(|s| ("scope", s.to_owned())));
        let req = self.post(cx, &self.device_endpoint, form);
        let resp = cx.send(Kind::Write, req).await.map_err(FlowError::Unavailable)?;
        match resp.status() {
            s if s.is_success() => {}
            s @ (StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED) => {
                let why = json::<ErrorBody>(resp, self.label).await.map(|e| e.error).unwrap_or_default();
                return Err(FlowError::Rejected(format!(
                    "{} refused the device login ({} {why}): check client_id",
                    self.label,
                    s.as_u16()
                )));
            }
            s => return Err(FlowError::Unavailable(status_error(self.label, s))),
        }
        let d: DeviceAuthorization = json(resp, self.label).await.map_err(FlowError::Unavailable)?;
        let expires_in = seconds(&d.expires_in).unwrap_or(600);
        Ok(PendingFlow {
            kind: "device_pin".into(),
            user_code: Some(d.user_code),
            verification_url: Some(d.verification_uri_complete.unwrap_or(d.verification_uri)),
            authorize_url: None,
            issued_at: now,
            expires_at: now + lifetime(expires_in),
            interval_secs: Some(
                d.interval.as_ref().and_then(seconds).map_or(DEFAULT_INTERVAL, |i| poll_interval(i.max(0) as u64)),
            ),
            secrets: BTreeMap::from([("device_code".to_owned(), Secret::new(d.device_code))]),
        })
    }

    /// Ask whether the user approved the device code.
    pub async fn poll(&self, cx: &Adapter, flow: &PendingFlow, now: DateTime<Utc>) -> Poll {
        let Some(code) = flow.secret("device_code") else {
            return Poll::Gone("the pending flow has no device code".into());
        };
        let form = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code".to_owned()),
            ("device_code", code.expose().to_owned()),
        ];
        self.token_answer(cx, form, now, |e| match e.error.as_str() {
            "authorization_pending" => Poll::Pending,
            "slow_down" => Poll::SlowDown,
            "access_denied" => Poll::Denied,
            "expired_token" => Poll::Gone("the code expired before it was approved".into()),
            other => Poll::Gone(self.described(other, e.error_description.as_deref())),
        })
        .await
    }

    /// Exchange the code a callback brought back (with the flow's PKCE verifier).
    pub async fn exchange(&self, cx: &Adapter, fields: Vec<(&'static str, String)>, now: DateTime<Utc>) -> Poll {
        let form = fields.into_iter().filter(|(k, _)| *k != "client_id").collect();
        self.token_answer(cx, form, now, |e| Poll::Gone(self.described(&e.error, e.error_description.as_deref()))).await
    }

    async fn token_answer(
        &self,
        cx: &Adapter,
        form: Vec<(&str, String)>,
        now: DateTime<Utc>,
        refused: impl FnOnce(ErrorBody) -> Poll,
    ) -> Poll {
        let resp = match cx.send(Kind::Write, self.post(cx, &self.token_endpoint, form)).await {
            Ok(resp) => resp,
            Err(e) => return Poll::Unknown(e),
        };
        match resp.status() {
            s if s.is_success() => match json::<TokenBody>(resp, self.label).await {
                Ok(body) => Poll::Approved(body.grant(now)),
                Err(e) => Poll::Unknown(e),
            },
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED => match json::<ErrorBody>(resp, self.label).await {
                Ok(e) => refused(e),
                Err(e) => Poll::Unknown(e),
            },
            s => Poll::Unknown(status_error(self.label, s)),
        }
    }

    /// Exchange the refresh token. A server that rotates sends a new one; one that does not
    /// keeps the old one valid, so the old one is kept.
    pub async fn refresh(&self, cx: &Adapter, grant: &Grant, now: DateTime<Utc>) -> Verdict<Grant> {
        let Some(refresh) = &grant.refresh_token else {
            return Verdict::Rejected("no refresh token".into());
        };
        let form = vec![("grant_type", "refresh_token"), ("refresh_token", refresh.expose())];
        let form = form.into_iter().map(|(k, v)| (k, v.to_owned())).collect();
        let resp = match cx.send_once(Kind::Write, self.post(cx, &self.token_endpoint, form)).await {
            Ok(resp) => resp,
            Err(super::Unsent::NotSent(e)) => return Verdict::Unknown(e),
            Err(super::Unsent::Lost(e)) => return Verdict::Unknown(format!("{REFRESH_ANSWER_LOST} ({e})")),
        };
        match resp.status() {
            s if s.is_success() => match json::<TokenBody>(resp, self.label).await {
                Ok(body) => {
                    let mut fresh = body.grant(now);
                    if fresh.refresh_token.is_none() {
                        fresh.refresh_token = grant.refresh_token.clone();
                    }
                    for (name, secret) in grant.secrets() {
                        if fresh.secret(name).is_none() {
                            fresh.set_secret(name.clone(), secret.clone());
                        }
                    }
                    // What the grant knew (its redirect URI, say) outlives the refresh.
                    for (name, value) in grant.facts() {
                        if fresh.fact(name).is_none() {
                            fresh.set_fact(name.clone(), value.clone());
                        }
                    }
                    Verdict::Valid(fresh)
                }
                Err(e) => Verdict::Unknown(format!("{REFRESH_ANSWER_LOST} ({e})")),
            },
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED => match json::<ErrorBody>(resp, self.label).await {
                Ok(e) if e.error == "invalid_grant" => {
                    Verdict::Rejected(self.described("invalid_grant", e.error_description.as_deref()))
                }
                Ok(e) => Verdict::Unknown(self.described(&e.error, e.error_description.as_deref())),
                Err(_) => Verdict::Rejected(format!("{} refused the refresh token", self.label)),
            },
            s => Verdict::Unknown(status_error(self.label, s)),
        }
    }

    /// RFC 7009: revoke `token` (200 even when the server does not know it).
    pub async fn revoke(&self, cx: &Adapter, endpoint: &str, token: &str) -> Result<(), String> {
        let resp = cx.send(Kind::Write, self.post(cx, endpoint, vec![("token", token.to_owned())])).await?;
        if resp.status().is_success() { Ok(()) } else { Err(status_error(self.label, resp.status())) }
    }

    /// RFC 7662: whether `token` is active; `Err` when the server gave no verdict.
    pub async fn introspect(&self, cx: &Adapter, endpoint: &str, token: &str) -> Result<Value, String> {
        let resp = cx.send(Kind::Read, self.post(cx, endpoint, vec![("token", token.to_owned())])).await?;
        if !resp.status().is_success() {
            return Err(status_error(self.label, resp.status()));
        }
        json::<Value>(resp, self.label).await
    }
}
