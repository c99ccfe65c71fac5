//! The OAuth 2.0 device authorization grant (RFC 8628) and refresh (RFC 6749 §6), form-encoded,
//! for providers that follow the RFCs, and tolerant of what real servers send: `token_type` in
//! any case, `expires_in` as a string or missing (then a JWT's own `exp`).

use super::answer::{json, status_error};
use super::{Adapter, FlowError, Poll, Verdict, jwt_expiry};
use crate::limits::Kind;
use authkeeper_state::{Grant, PendingFlow, Secret};
use chrono::{DateTime, TimeDelta, Utc};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// The interval when the server gives none (RFC 8628 §3.2).
const DEFAULT_INTERVAL: u64 = 5;

/// One provider's endpoints and client.
pub struct Client<'a> {
    pub label: &'a str,
    pub client_id: &'a str,
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
fn seconds(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.trim().parse().ok())
}

impl TokenBody {
    /// The grant it describes, received `now`.
    pub fn grant(self, now: DateTime<Utc>) -> Grant {
        let expires_at = self
            .expires_in
            .as_ref()
            .and_then(seconds)
            .map(|s| now + TimeDelta::seconds(s))
            .or_else(|| jwt_expiry(&self.access_token));
        let mut grant = Grant {
            refresh_token: self.refresh_token.filter(|t| !t.is_empty()).map(Secret::new),
            token_type: self.token_type.map_or_else(|| "Bearer".into(), |t| normalise_type(&t)),
            scope: self.scope,
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

impl Client<'_> {
    /// Ask for a device code: the pending flow shows the user code and where to enter it.
    pub async fn begin(&self, cx: &Adapter, scope: Option<&str>, now: DateTime<Utc>) -> Result<PendingFlow, FlowError> {
        let mut form = vec![("client_id", self.client_id)];
        form.extend(scope.map(|s| ("scope", s)));
        let req = cx.http.post(&self.device_endpoint).header("accept", "application/json").form(&form);
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
            expires_at: now + TimeDelta::seconds(expires_in),
            interval_secs: Some(d.interval.as_ref().and_then(seconds).map_or(DEFAULT_INTERVAL, |i| i.max(1) as u64)),
            secrets: BTreeMap::from([("device_code".to_owned(), Secret::new(d.device_code))]),
        })
    }

    /// Ask whether the user approved the device code.
    pub async fn poll(&self, cx: &Adapter, flow: &PendingFlow, now: DateTime<Utc>) -> Poll {
        let Some(code) = flow.secret("device_code") else {
            return Poll::Gone("the pending flow has no device code".into());
        };
        let form = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", code.expose()),
            ("client_id", self.client_id),
        ];
        let resp = match self.token_call(cx, &form).await {
            Ok(resp) => resp,
            Err(e) => return Poll::Unknown(e),
        };
        match resp.status() {
            s if s.is_success() => match json::<TokenBody>(resp, self.label).await {
                Ok(body) => Poll::Approved(body.grant(now)),
                Err(e) => Poll::Unknown(e),
            },
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED => match json::<ErrorBody>(resp, self.label).await {
                Ok(e) => match e.error.as_str() {
                    "authorization_pending" => Poll::Pending,
                    "slow_down" => Poll::SlowDown,
                    "access_denied" => Poll::Denied,
                    "expired_token" => Poll::Gone("the code expired before it was approved".into()),
                    other => Poll::Gone(self.described(other, e.error_description.as_deref())),
                },
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
        let form =
            [("grant_type", "refresh_token"), ("refresh_token", refresh.expose()), ("client_id", self.client_id)];
        let resp = match self.token_call(cx, &form).await {
            Ok(resp) => resp,
            Err(e) => return Verdict::Unknown(e),
        };
        match resp.status() {
            s if s.is_success() => match json::<TokenBody>(resp, self.label).await {
                Ok(body) => {
                    let mut fresh = body.grant(now);
                    if fresh.refresh_token.is_none() {
                        fresh.refresh_token = grant.refresh_token.clone();
                    }
                    Verdict::Valid(fresh)
                }
                Err(e) => Verdict::Unknown(e),
            },
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED => match json::<ErrorBody>(resp, self.label).await {
                Ok(e) if e.error == "invalid_grant" => Verdict::Rejected(self.described("invalid_grant", None)),
                Ok(e) => Verdict::Unknown(self.described(&e.error, e.error_description.as_deref())),
                Err(_) => Verdict::Rejected(format!("{} refused the refresh token", self.label)),
            },
            s => Verdict::Unknown(status_error(self.label, s)),
        }
    }

    async fn token_call(&self, cx: &Adapter, form: &[(&str, &str)]) -> Result<reqwest::Response, String> {
        let req = cx.http.post(&self.token_endpoint).header("accept", "application/json").form(form);
        cx.send(Kind::Write, req).await
    }

    fn described(&self, error: &str, description: Option<&str>) -> String {
        match description {
            Some(d) => format!("{} answered {error}: {d}", self.label),
            None => format!("{} answered {error}", self.label),
        }
    }
}

/// RFC 7009: revoke `token` (200 even when the server does not know it).
pub async fn revoke(cx: &Adapter, endpoint: &str, client_id: &str, token: &str, label: &str) -> Result<(), String> {
    let req = cx.http.post(endpoint).form(&[("token", token), ("client_id", client_id)]);
    let resp = cx.send(Kind::Write, req).await?;
    if resp.status().is_success() { Ok(()) } else { Err(status_error(label, resp.status())) }
}
