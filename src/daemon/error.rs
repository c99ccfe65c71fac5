//! The daemon's own errors. They say what went wrong in the daemon's terms; the control API
//! maps them to HTTP statuses in one place (`wire`).

use crate::config::ConfigError;
use crate::config_edit::EditError;
use crate::providers::FlowError;
use crate::wire::ConnectionView;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    #[error("no provider named {0:?}; see `authkeeper providers`")]
    UnknownProvider(String),
    #[error(
        "{provider} has no profile {profile:?}; profiles live under \"{provider}\": {{\"instances\": …}} in config.json"
    )]
    UnknownProfile { provider: String, profile: String },
    /// The request does not fit the connection's state.
    #[error("{0}")]
    Conflict(String),
    /// A token or a call that needs a live credential, on a connection without one.
    #[error(
        "{}/{} is {}: log in first with `authkeeper connect {} --profile {}`",
        .0.provider, .0.profile, .0.state.as_str(), .0.provider, .0.profile
    )]
    NotConnected(Box<ConnectionView>),
    /// An owner's connection that is not connected: the provider's "log in first" message.
    #[error("{message}")]
    LoginFirst { view: Box<ConnectionView>, message: String },
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Flow(#[from] FlowError),
    /// The store refused a write; the change was not made.
    #[error("could not save the change: {0}")]
    Store(String),
    /// The store has refused writes for a while: new work is refused rather than done on a
    /// state that is not saved.
    #[error("the store cannot be written ({0}); no new work is taken until it can")]
    StoreUnwritable(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("this connection is busy; try again")]
    Busy,
    #[error("this connection's owner stopped unexpectedly; see the daemon's log")]
    OwnerGone,
    #[error("config.json does not load, so it was not edited: {0}")]
    ConfigBroken(#[source] ConfigError),
    #[error(transparent)]
    Edit(#[from] EditError),
    #[error("{0}")]
    Internal(String),
    /// Another daemon sharing the store holds the connection (or this one's lease lapsed).
    #[error("another authkeeper daemon holds this connection: {0}; try again")]
    NotHolder(String),
}

impl DaemonError {
    pub fn unknown_profile(provider: &str, profile: &str) -> Self {
        Self::UnknownProfile { provider: provider.to_owned(), profile: profile.to_owned() }
    }

    pub fn not_connected(view: ConnectionView) -> Self {
        Self::NotConnected(Box::new(view))
    }
}

/// Why a browser's return to `/oauth/callback/{provider}` was refused. A refused callback
/// changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("this login is unknown, or its answer was already used")]
    UnknownState,
    #[error("this answer belongs to a {expected} login, not {got}")]
    WrongProvider { expected: String, got: String },
    #[error("this login expired before the answer came back")]
    Expired,
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}
