//! What crosses the control socket: the connection view, events, errors. Shared by the daemon
//! and the CLI so the two cannot drift. Errors are mapped to statuses here and only here.

use authkeeper_state::schedule::next_action;
use authkeeper_state::{Cause, Machine, Policy, StateName};
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A connection as status output shows it. Never carries a secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionView {
    pub provider: String,
    pub profile: String,
    pub state: StateName,
    pub since: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub validated_at: Option<DateTime<Utc>>,
    pub account: Option<String>,
    pub last_error: Option<String>,
    /// When the daemon next calls the provider for this connection (poll, refresh, validation
    /// or a retry after backoff).
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub warnings: Vec<String>,
    /// While pending on a flow: what the user must do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingView {
    pub user_code: String,
    pub verification_url: String,
    pub expires_at: DateTime<Utc>,
}

impl ConnectionView {
    pub fn of(machine: &Machine, policy: &Policy) -> Self {
        let c = machine.connection();
        Self {
            provider: c.key.provider.clone(),
            profile: c.key.profile.clone(),
            state: machine.state_name(),
            since: c.since,
            expires_at: c.credentials.as_ref().and_then(|c| c.expires_at),
            validated_at: c.validated_at,
            account: c.account.as_ref().map(|a| a.name.clone()),
            last_error: c.last_error.clone(),
            next_attempt_at: next_action(machine, policy).map(|(at, _)| at),
            warnings: Vec::new(),
            pending: machine.pending_flow().map(|f| PendingView {
                user_code: f.user_code.clone(),
                verification_url: f.verification_url.clone(),
                expires_at: f.expires_at,
            }),
        }
    }
}

/// The 202 answer to `connect`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectReply {
    pub user_code: String,
    pub verification_url: String,
    pub expires_at: DateTime<Utc>,
    pub interval: u64,
    pub connection: ConnectionView,
}

/// One line of `GET /v1/events`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WireEvent {
    Transition {
        provider: String,
        profile: String,
        from: StateName,
        to: StateName,
        cause: Cause,
        at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// A config change was applied; `changed` lists the connections it touched.
    ConfigReloaded { changed: Vec<String>, at: DateTime<Utc> },
    /// The daemon wrote credentials back into the config file (`write_back`).
    ConfigWritten { changed: Vec<String>, at: DateTime<Utc> },
    /// A declared schedule ran.
    ScheduleRan { schedule: String, detail: String, at: DateTime<Utc> },
    /// A config change was not applied; the last good config stays in force.
    ConfigError { error: String, line: Option<usize>, column: Option<usize>, at: DateTime<Utc> },
    /// Something the user may want to know that changed no state: a provider call with no
    /// verdict (and when it will be retried), a reader that fell behind.
    Warning {
        message: String,
        at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        provider: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        profile: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_attempt_at: Option<DateTime<Utc>>,
    },
}

/// An error answer: `{"error": "<code>", "message": "…"}` plus optional fields.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), extra: Default::default() }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn unknown_provider(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_provider",
            format!("no provider named {name:?}; see `authkeeper providers`"),
        )
    }
    pub fn unknown_profile(provider: &str, profile: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_profile",
            format!(
                "{provider} has no profile {profile:?}; profiles live under \"{provider}\": {{\"instances\": …}} in config.json"
            ),
        )
    }
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see the API in ARCHITECTURE.md")
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    pub fn not_connected(view: &ConnectionView) -> Self {
        let mut e = Self::new(
            StatusCode::CONFLICT,
            "not_connected",
            format!(
                "{}/{} is {}: log in first with `authkeeper connect {} --profile {}`",
                view.provider,
                view.profile,
                view.state.as_str(),
                view.provider,
                view.profile
            ),
        );
        e.extra.insert("state".into(), view.state.as_str().into());
        e
    }
    pub fn provider_unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "provider_unavailable", message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.extra;
        body.insert("error".into(), self.code.into());
        body.insert("message".into(), self.message.into());
        (self.status, Json(body)).into_response()
    }
}
