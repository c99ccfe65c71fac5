//! What the config owner keeps in the store besides connections: the settings profiles were
//! declared with, their provider state, the credential digests it read or wrote, and the
//! highest profile numbers.

use super::ConfigOwner;
use crate::providers::{self, Profile};
use authkeeper_state::ConnKey;
use std::sync::Arc;
use tracing::{error, warn};

impl ConfigOwner {
    /// Keep the settings of `keys` in the store, so that they can run while no good config is
    /// read.
    pub(super) fn save_settings(&mut self, keys: Vec<ConnKey>) {
        let mut bytes = SharedBytes::default();
        let rows = keys
            .into_iter()
            .filter_map(|key| {
                let b = bytes.of(self.config.profile(&key)?);
                Some((key, Some(b)))
            })
            .collect();
        self.write_settings(rows);
    }

    /// Keep in the store the settings of each profile the good config in force declares, where
    /// it holds other settings or none: at start-up, once the daemon answers. The store is
    /// asked about a few thousand profiles at a time, so that the comparison's own memory stays
    /// small (a map of every stored digest had kept 200 bytes of RSS per connection), and what
    /// it freed is given back to the system after.
    pub(super) async fn store_declared_settings(&mut self) {
        const AT_A_TIME: usize = 4096;
        if self.from_store {
            return;
        }
        let mut rows = Vec::new();
        let mut profiles = self.config.profiles.iter();
        loop {
            let asked: Vec<_> = profiles.by_ref().take(AT_A_TIME).map(|(k, p)| (k.clone(), p.clone())).collect();
            if asked.is_empty() {
                break;
            }
            let store = self.shared.store.clone();
            let found = tokio::task::spawn_blocking(move || {
                let keys: Vec<_> = asked.iter().map(|(k, _)| k.clone()).collect();
                store.settings_digests(&keys).map(|found| (asked, found))
            })
            .await;
            let (asked, found) = match found {
                Ok(Ok(found)) => found,
                Ok(Err(e)) => return error!(error = %e, "cannot read the stored settings; they are not compared"),
                Err(e) => return error!(error = %e, "reading the stored settings failed"),
            };
            let mut bytes = SharedBytes::default();
            for ((key, profile), stored) in asked.into_iter().zip(found) {
                let (b, digest) = bytes.with_digest(&profile);
                if stored != Some(digest) {
                    rows.push((key, Some(b)));
                }
            }
        }
        self.write_settings(rows);
        crate::daemon::return_free_memory();
    }

    pub(super) fn write_settings(&mut self, rows: Vec<(ConnKey, Option<Arc<[u8]>>)>) {
        if rows.is_empty() {
            return;
        }
        let store = self.shared.store.clone();
        let before = self.settings_write.take();
        // In the background, in order: a daemon with many profiles is ready before they are
        // all saved.
        self.settings_write = Some(tokio::spawn(async move {
            if let Some(before) = before {
                let _ = before.await;
            }
            let written = tokio::task::spawn_blocking(move || store.set_settings(&rows)).await;
            if let Ok(Err(e)) = written {
                error!(error = %e, "could not keep the profiles' settings in the store");
            }
        }));
    }

    /// Save the provider state made since the last save, in one durable transaction.
    pub(super) async fn save_states(&mut self) {
        if self.unsaved.is_empty() {
            return;
        }
        let (store, states) = (self.shared.store.clone(), std::mem::take(&mut self.unsaved));
        match tokio::task::spawn_blocking(move || store.set_profile_states(&states)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "could not save the profiles' provider state; new device ids may change"),
            Err(e) => error!(error = %e, "saving the profiles' provider state failed"),
        }
    }

    pub(super) async fn remember(&self, key: &ConnKey, digest: Vec<u8>) {
        let store = self.shared.store.clone();
        let key = key.clone();
        let result = tokio::task::spawn_blocking(move || store.set_config_seen(&key, &digest)).await;
        if let Ok(Err(e)) = result {
            warn!(error = %e, "could not record the config credential digest");
        }
    }

    pub(super) fn note_profiles(&self) {
        for provider in providers::manifests().iter().map(|m| m.name) {
            let highest = self.config.highest_profile(provider);
            if highest > 0
                && let Err(e) = self.shared.store.note_profiles(provider, highest)
            {
                warn!(error = %e, "could not record profile numbers");
            }
        }
    }
}

/// A profile's stored form and its digest, made once for the many profiles that share one
/// `Profile`.
#[derive(Default)]
pub(super) struct SharedBytes(Option<(*const Profile, Arc<[u8]>, u64)>);

impl SharedBytes {
    pub(super) fn of(&mut self, profile: &Arc<Profile>) -> Arc<[u8]> {
        self.with_digest(profile).0
    }

    pub(super) fn with_digest(&mut self, profile: &Arc<Profile>) -> (Arc<[u8]>, u64) {
        match &self.0 {
            Some((ptr, bytes, digest)) if std::ptr::eq(*ptr, Arc::as_ptr(profile)) => (bytes.clone(), *digest),
            _ => {
                let bytes: Arc<[u8]> = Arc::from(profile.to_stored());
                let digest = authkeeper_state::store::declared_digest(&bytes);
                self.0 = Some((Arc::as_ptr(profile), bytes.clone(), digest));
                (bytes, digest)
            }
        }
    }
}
