//! What providers hand out and what a login in progress keeps: data, not a type per provider.
//!
//! - [`Grant`]: an access token, an optional refresh token, an expiry, and named extras —
//!   secret ones (a per-server token, a session id) and plain facts (a server URL, a user id).
//! - [`PendingFlow`]: a login waiting for the user — its kind, what the user must do, when it
//!   ends, how often to poll it, and its secrets (device code, PIN id, Quick Connect secret).
//! - [`ProfileState`]: what a provider keeps per profile across connections (stable device ids).

use crate::secret::Secret;
use chrono::{DateTime, Utc};
use compact_str::CompactString;
use std::collections::BTreeMap;

/// What a provider handed out. Lifetimes always come from the provider's `expires_in`.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    pub access_token: Secret,
    pub refresh_token: Option<Secret>,
    pub token_type: CompactString,
    pub scope: Option<CompactString>,
    /// When the daemon received it; with `expires_at` this gives the lifetime.
    pub issued_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Named secrets and facts besides the tokens; boxed, because most grants have none and
    /// a daemon holds many.
    pub extras: Option<Box<Extras>>,
}

/// What a grant holds besides its tokens.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Extras {
    /// Named secrets: a per-server token, a session id, an API key.
    pub secrets: BTreeMap<String, Secret>,
    /// Named facts that are not secret: a server URL, a user id, a machine id.
    pub facts: BTreeMap<String, String>,
}

static NO_FACTS: BTreeMap<String, String> = BTreeMap::new();
static NO_SECRETS: BTreeMap<String, Secret> = BTreeMap::new();

impl Grant {
    /// A bearer grant with no extras.
    pub fn bearer(access_token: impl Into<String>, issued_at: DateTime<Utc>) -> Self {
        Self {
            access_token: Secret::new(access_token),
            refresh_token: None,
            token_type: "bearer".into(),
            scope: None,
            issued_at,
            expires_at: None,
            extras: None,
        }
    }

    pub fn fact(&self, name: &str) -> Option<&str> {
        self.facts().get(name).map(String::as_str)
    }

    pub fn secret(&self, name: &str) -> Option<&Secret> {
        self.secrets().get(name)
    }

    pub fn facts(&self) -> &BTreeMap<String, String> {
        self.extras.as_ref().map_or(&NO_FACTS, |e| &e.facts)
    }

    pub fn secrets(&self) -> &BTreeMap<String, Secret> {
        self.extras.as_ref().map_or(&NO_SECRETS, |e| &e.secrets)
    }

    pub fn set_fact(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.extras.get_or_insert_default().facts.insert(name.into(), value.into());
    }

    pub fn set_secret(&mut self, name: impl Into<String>, value: Secret) {
        self.extras.get_or_insert_default().secrets.insert(name.into(), value);
    }
}

/// A login in progress. Persisted in the store's `flows` table, so that every pending flow
/// survives a restart.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingFlow {
    /// The flow on the wire: `device_pin`, `quick_connect`, `oauth_code`, `request_token`.
    pub kind: String,
    /// What the user types or confirms (a device code, a PIN, a Quick Connect code).
    pub user_code: Option<String>,
    /// Where the user goes to enter `user_code`.
    pub verification_url: Option<String>,
    /// Where the user's browser goes (redirect flows).
    pub authorize_url: Option<String>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// How often to ask the provider, for polled flows; `None` for flows that end by callback.
    pub interval_secs: Option<u64>,
    /// The flow's secrets: a device code, a PIN id, a Quick Connect secret, a PKCE verifier.
    pub secrets: BTreeMap<String, Secret>,
}

impl PendingFlow {
    pub fn secret(&self, name: &str) -> Option<&Secret> {
        self.secrets.get(name)
    }
}

/// What a provider keeps for one profile, across connects and disconnects: a stable device or
/// client id (Plex's `X-Plex-Client-Identifier`, Jellyfin's `DeviceId`), later a device key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProfileState {
    pub facts: BTreeMap<String, String>,
    pub secrets: BTreeMap<String, Secret>,
}

impl ProfileState {
    pub fn fact(&self, name: &str) -> Option<&str> {
        self.facts.get(name).map(String::as_str)
    }
}
