//! What crosses the control socket: the connection view, events, errors. Shared by the daemon
//! and the CLI so the two cannot drift. Errors are mapped to statuses here and only here.

use crate::config_edit::EditError;
use crate::daemon::DaemonError;
use crate::providers::FlowError;
use authkeeper_state::schedule::next_action;
use authkeeper_state::{Cause, Machine, PendingFlow, Policy, StateName};
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    /// Provider facts that are not secret: a server's name and URL, a user id.
    #[serde(default)]
    pub facts: BTreeMap<String, String>,
    /// While pending on a flow: what the user must do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingView>,
}

/// What the user must do to finish a pending flow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingView {
    pub flow: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorize_url: Option<String>,
    pub expires_at: DateTime<Utc>,
}

impl PendingView {
    pub fn of(f: &PendingFlow) -> Self {
        Self {
            flow: f.kind.clone(),
            user_code: f.user_code.clone(),
            verification_url: f.verification_url.clone(),
            authorize_url: f.authorize_url.clone(),
            expires_at: f.expires_at,
        }
    }
}

impl ConnectionView {
    /// The view of `machine`, with what the user should know about it.
    pub fn with_warnings(machine: &Machine, policy: &Policy, warnings: Vec<String>) -> Self {
        Self { warnings, ..Self::of(machine, policy) }
    }

    pub fn of(machine: &Machine, policy: &Policy) -> Self {
        let c = machine.connection();
        Self {
            provider: c.key.provider.to_string(),
            profile: c.key.profile.to_string(),
            state: machine.state_name(),
            since: c.since,
            expires_at: c.grant.as_ref().and_then(|c| c.expires_at),
            validated_at: c.validated_at,
            account: c.account.as_ref().map(|a| a.name.to_string()),
            last_error: c.last_error.clone(),
            next_attempt_at: next_action(machine, policy).map(|(at, _)| at),
            warnings: Vec::new(),
            facts: c.grant.as_ref().map(|g| g.facts().clone()).unwrap_or_default(),
            pending: machine.pending_flow().map(PendingView::of),
        }
    }
}

/// The 202 answer to `connect`: what the user must do (nothing more for a flow that exchanged
/// its input at once), and the connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectReply {
    /// `user_code`, `verification_url`, `authorize_url`, `expires_at`, at the top level.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<u64>,
    pub connection: ConnectionView,
}

impl ConnectReply {
    /// The code the user enters, for flows that have one.
    pub fn user_code(&self) -> Option<&str> {
        self.pending.as_ref()?.user_code.as_deref()
    }
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
    /// A one-time link was opened in a browser.
    LinkOpened { provider: String, owner: String, at: DateTime<Utc> },
    /// The login behind a link connected.
    Linked { provider: String, owner: String, at: DateTime<Utc> },
    /// A link ran out before it was used.
    LinkExpired { provider: String, owner: String, at: DateTime<Utc> },
    /// The login behind a link ended without connecting.
    LinkFailed {
        provider: String,
        owner: String,
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
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see the API in ARCHITECTURE.md")
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    pub fn rejected(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "rejected", message)
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
    /// An error axum answered by itself (a wrong method, a path or body it could not read).
    pub fn of_status(status: StatusCode, message: impl Into<String>) -> Self {
        let code = match status {
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            s if s.is_server_error() => "internal",
            _ => "bad_request",
        };
        Self::new(status, code, message)
    }
}

/// The one place where the daemon's errors become HTTP statuses.
impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> Self {
        use DaemonError as E;
        let message = e.to_string();
        match e {
            E::UnknownProvider(_) => Self::new(StatusCode::NOT_FOUND, "unknown_provider", message),
            E::UnknownProfile { .. } => Self::new(StatusCode::NOT_FOUND, "unknown_profile", message),
            E::Conflict(_) | E::ConfigBroken(_) => Self::conflict(message),
            E::NotConnected(view) | E::LoginFirst { view, .. } => {
                let mut err = Self::new(StatusCode::CONFLICT, "not_connected", message);
                err.extra.insert("state".into(), view.state.as_str().into());
                err
            }
            E::BadRequest(_) | E::Flow(FlowError::Input(_) | FlowError::Config(_)) => Self::bad_request(message),
            E::Flow(FlowError::Rejected(_)) => Self::rejected(message),
            E::Flow(FlowError::Unavailable(_)) => Self::provider_unavailable(message),
            E::Edit(EditError::Io(..)) | E::Store(_) | E::OwnerGone | E::Internal(_) => Self::internal(message),
            E::Edit(EditError::Locked(..)) => Self::unavailable(message),
            E::Edit(_) => Self::conflict(message),
            E::StoreUnwritable(_) | E::ShuttingDown | E::Busy | E::NotHolder(_) => Self::unavailable(message),
        }
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
