//! The daemon's own edits to config.json: profiles added and removed, and credentials written
//! back. Each touches only its block and keeps the rest of the file as the user wrote it.

use super::ConfigOwner;
use crate::config::{Config, credential_digest, profile_number};
use crate::config_edit::{self, EditError};
use crate::daemon::DaemonError;
use crate::providers;
use crate::wire::WireEvent;
use authkeeper_state::{ConnKey, StoreError};
use tracing::{error, info, warn};

impl ConfigOwner {
    /// Bring `self.text` up to date with the file before editing it, so a user's edit that the
    /// watcher has not delivered yet is applied, not overwritten.
    /// The file as it is now, applied if it changed, and the lock to hold until it is written.
    async fn catch_up(&mut self) -> Result<(String, config_edit::EditLock), DaemonError> {
        // An edit waits for another editor as long as a request may take to arrive.
        let lock = config_edit::lock(&self.path, self.config.settings.request_timeout()).await?;
        self.read_current().await.map(|text| (text, lock))
    }

    async fn read_current(&mut self) -> Result<String, DaemonError> {
        match std::fs::read_to_string(&self.path) {
            Ok(current) => {
                if self.text.as_deref() != Some(current.as_str()) {
                    self.apply_text(current.clone()).await.map_err(DaemonError::ConfigBroken)?;
                }
                Ok(current)
            }
            // Writing a file from nothing would declare nothing else, and the connections the
            // missing file declared would go: refused until the file is back.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && (self.text.is_some() || self.stored_declared) => {
                Err(DaemonError::Conflict(format!(
                    "{} is missing; it is not recreated, so that the connections it declared stay: restore it first",
                    self.path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(DaemonError::Edit(EditError::Io(self.path.display().to_string(), e))),
        }
    }

    pub(super) async fn add_profile(&mut self, provider: &str) -> Result<String, DaemonError> {
        let Some(p) = providers::find(provider) else {
            return Err(DaemonError::UnknownProvider(crate::daemon::shown(provider)));
        };
        if p.manifest().named_profiles {
            return Err(DaemonError::BadRequest(format!(
                "{provider} profiles are named: add one under \"{}\": {{\"instances\": {{\"NAME\": {{…}}}}}} in config.json",
                p.manifest().block
            )));
        }
        let (text, _lock) = self.catch_up().await?;
        let store = self.shared.store.clone();
        let (name, in_use) = (provider.to_owned(), self.config.highest_profile(provider));
        let number = tokio::task::spawn_blocking(move || store.allocate_profile(&name, in_use))
            .await
            .map_err(|e| DaemonError::Internal(e.to_string()))?
            .map_err(|e| match e {
                StoreError::NoProfileNumber(_) => DaemonError::Conflict(e.to_string()),
                e => DaemonError::Store(e.to_string()),
            })?;
        let id = format!("{}-P{number:02}", provider.to_ascii_uppercase());
        let edited = config_edit::add_profile(&text, p.manifest().block, &id)?;
        config_edit::write_atomically(&self.path, &edited, false)?;
        self.apply_text(edited).await.map_err(|e| DaemonError::Internal(e.to_string()))?;
        info!(provider, profile = %id, "profile added");
        Ok(id)
    }

    /// An owner's connection, made on demand: disconnected, on the provider's base block.
    pub(super) async fn add_owner(&mut self, key: ConnKey) -> Result<(), DaemonError> {
        if self.shared.lookup(&key.provider, &key.profile, |_| ()).is_ok() {
            return Ok(());
        }
        let profile = self.owner_profile(&key).ok_or_else(|| DaemonError::UnknownProvider(key.provider.to_string()))?;
        let setup = self.setup(&key, &profile);
        self.save_states().await;
        let machine = authkeeper_state::Machine::new(key.clone(), self.shared.clock.now());
        self.shared.add_connection(machine, setup, None);
        info!(connection = %key, "owner connection made");
        Ok(())
    }

    pub(super) async fn remove_profile(&mut self, provider: &str, profile: &str) -> Result<String, DaemonError> {
        let Some(p) = providers::find(provider) else {
            return Err(DaemonError::UnknownProvider(crate::daemon::shown(provider)));
        };
        if !crate::config::is_profile_id(p.manifest(), profile) {
            return Err(DaemonError::BadRequest(format!("{:?} is not a profile id", crate::daemon::shown(profile))));
        }
        if profile == "default" {
            return Err(DaemonError::BadRequest(
                "the default profile is the provider's base block; it cannot be removed".into(),
            ));
        }
        let (text, _lock) = self.catch_up().await?;
        let named = p.manifest().named_profiles || profile_number(profile).is_some();
        if !named || !self.config.profiles.contains_key(&ConnKey::new(provider, profile)) {
            return Err(DaemonError::unknown_profile(provider, profile));
        }
        let edited = config_edit::remove_profile(&text, p.manifest().block, profile)?;
        config_edit::write_atomically(&self.path, &edited, false)?;
        self.apply_text(edited).await.map_err(|e| DaemonError::Internal(e.to_string()))?;
        info!(provider, profile, "profile removed");
        Ok(profile.to_owned())
    }

    /// Mirror every queued credential into the file when `write_back` is on: each
    /// connection's latest, in one write.
    pub(super) async fn write_back(&mut self) {
        let queued = self.shared.write_backs.take();
        if queued.is_empty() {
            return;
        }
        tracing::debug!(
            connections = queued.len(),
            from_store = self.from_store,
            enabled = self.config.settings.write_back,
            "write-back"
        );
        if self.from_store {
            // No good config yet, so whether to write back is not known: kept until one is read.
            self.shared.write_backs.keep(queued);
            return;
        }
        if !self.config.settings.write_back {
            return;
        }
        if let Err(e) = self.write_back_all(&queued).await {
            error!(error = %e, "write-back to the config file failed; it is tried again with the next change");
            self.shared.publish_warning(None, format!("config write-back failed: {e}"), None);
            self.shared.write_backs.keep(queued);
        }
    }

    async fn write_back_all(
        &mut self,
        queued: &std::collections::BTreeMap<ConnKey, Option<authkeeper_state::Grant>>,
    ) -> Result<(), DaemonError> {
        let (text, _lock) = self.catch_up().await?;
        let mut edited = text.clone();
        let mut written = Vec::new();
        for (key, grant) in queued {
            let Some(profile) = self.config.profile(key) else {
                tracing::debug!(connection = %key, "not written back: the config does not declare it");
                continue;
            };
            let provider = profile.provider;
            let mut keys = provider.export(grant.as_ref());
            let block = provider.manifest().block;
            // A file that keeps its secrets encrypted gets them encrypted the same way.
            if crate::cw_crypt::uses_encryption(&text)
                && let Some(cw) = crate::cw_crypt::CwKey::find(&self.path).map_err(DaemonError::ConfigBroken)?
            {
                keys = crate::cw_crypt::seal_keys(&edited, block, &key.profile, &keys, &cw);
            }
            edited = config_edit::write_keys(&edited, block, &key.profile, &keys)?;
            written.push(key.clone());
        }
        if edited == text {
            return Ok(());
        }
        config_edit::write_atomically(&self.path, &edited, true)?;
        match Config::parse_file(&self.path, &edited) {
            Ok(config) => self.config = config,
            Err(e) => warn!(error = %e, "the written config does not load"),
        }
        self.text = Some(edited);
        for key in &written {
            self.remember(key, credential_digest(queued[key].as_ref())).await;
        }
        let _ = self.shared.events.send(WireEvent::ConfigWritten {
            changed: written.iter().map(ToString::to_string).collect(),
            at: self.shared.clock.now(),
        });
        Ok(())
    }
}
