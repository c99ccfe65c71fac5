//! How two configs differ, profile by profile, and whether the credential in the file changed
//! since the daemon last read or wrote it.

use crate::config::Config;
use authkeeper_state::{ConnKey, Grant};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// How one profile differs between two configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Added,
    Removed,
    /// `app`: settings that decide how the provider is reached (client id, base URL, timeout);
    /// `credential`: the token fields.
    Changed {
        app: bool,
        credential: bool,
    },
}

/// The profiles that differ between `old` and `new`, in key order. Cost: one pass over both.
pub fn diff(old: &Config, new: &Config) -> Vec<(ConnKey, Change)> {
    use std::cmp::Ordering;
    let timeout_changed = old.settings.http_timeout() != new.settings.http_timeout();
    let mut out = Vec::new();
    let (mut a, mut b) = (old.profiles.iter().peekable(), new.profiles.iter().peekable());
    loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
        };
        match order {
            Ordering::Less => out.push((a.next().unwrap().0.clone(), Change::Removed)),
            Ordering::Greater => out.push((b.next().unwrap().0.clone(), Change::Added)),
            Ordering::Equal => {
                let ((key, before), (_, after)) = (a.next().unwrap(), b.next().unwrap());
                let same = Arc::ptr_eq(before, after) || before == after;
                if same && !timeout_changed {
                    continue;
                }
                let app = timeout_changed || before.app_differs(after);
                let credential = before.credential_differs(after);
                if app || credential {
                    out.push((key.clone(), Change::Changed { app, credential }));
                }
            }
        }
    }
    out
}

/// A digest of a credential, to tell whether the user changed the one in the file since the
/// daemon last read or wrote it. Empty when there is no credential.
pub fn credential_digest(g: Option<&Grant>) -> Vec<u8> {
    let Some(g) = g else { return Vec::new() };
    let mut h = Sha256::new();
    h.update(g.access_token.expose());
    h.update([0]);
    h.update(g.refresh_token.as_ref().map_or("", |t| t.expose()));
    h.update([0]);
    h.update(g.expires_at.map_or(0, |t| t.timestamp()).to_le_bytes());
    for (name, secret) in g.secrets() {
        h.update([0]);
        h.update(name);
        h.update([0]);
        h.update(secret.expose());
    }
    h.finalize().to_vec()
}
