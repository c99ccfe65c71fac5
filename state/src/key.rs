//! Who a connection is: its provider and profile, and the account behind its credential.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use std::fmt;

/// One provider account under one profile: `trakt/default`, `trakt/TRAKT-P01`.
///
/// Its names are kept inline up to 24 bytes (nearly all are), so that the many copies a daemon
/// holds of each key (its slot, its machine, its deadline) cost no allocation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnKey {
    pub provider: CompactString,
    pub profile: CompactString,
}

impl ConnKey {
    pub fn new(provider: impl Into<CompactString>, profile: impl Into<CompactString>) -> Self {
        Self { provider: provider.into(), profile: profile.into() }
    }
}

impl fmt::Display for ConnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.provider, self.profile)
    }
}

/// Who the credential belongs to, as the provider's whoami call reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Account {
    pub name: CompactString,
    pub id: Option<String>,
}
