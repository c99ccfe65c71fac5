//! The one owner of config.json: it loads it, watches it, diffs each change into events for
//! just the connections it affects, and makes the daemon's own edits (profiles, write-back).
//! A file that does not load changes nothing: the last good config stays in force.

use super::schedules::Schedules;
use super::{Command, Shared};
use crate::config::{self, Change, Config, ConfigError, ProfileSettings, credential_digest, profile_number};
use crate::config_edit::{self, EditError};
use crate::providers::{self, Adapter, Provider};
use crate::wire::{ApiError, WireEvent};
use authkeeper_state::{ConnKey, Credentials, Machine};
use notify_debouncer_mini::{DebounceEventResult, new_debouncer, notify::RecursiveMode};
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

/// How long the file must be quiet before a change is read (editors write in several steps).
const DEBOUNCE: Duration = Duration::from_millis(100);

/// What the rest of the daemon asks of the config owner.
pub enum ConfigCommand {
    AddProfile {
        provider: String,
        reply: oneshot::Sender<Result<String, ApiError>>,
    },
    RemoveProfile {
        provider: String,
        profile: String,
        reply: oneshot::Sender<Result<String, ApiError>>,
    },
    /// A connection's credential changed (connect, refresh, disconnect): mirror it into the
    /// file when `write_back` is on.
    WriteBack {
        key: ConnKey,
        credentials: Option<Credentials>,
    },
}

pub struct ConfigOwner {
    path: PathBuf,
    /// The text last loaded or written (`None`: no file). Equal text on disk means no change,
    /// which is how the daemon's own writes are told from the user's.
    text: Option<String>,
    /// The last good config.
    config: Config,
    shared: Arc<Shared>,
    http: reqwest::Client,
    /// The file is missing and that has been reported.
    gone: bool,
    /// The bad text last reported: seeing it again (one save can wake the watcher twice) is
    /// not a new error.
    rejected: Option<String>,
    /// The adapter made last, whose immutable settings the next one shares if they are equal.
    last_adapter: Option<Adapter>,
    schedules: Schedules,
}

impl ConfigOwner {
    /// Load the config, start an actor for every stored or configured connection, and import
    /// credentials the user put in the file.
    pub async fn start(path: PathBuf, shared: Arc<Shared>, stored: Vec<Machine>) -> Self {
        let text = std::fs::read_to_string(&path).ok();
        let loaded = match &text {
            Some(t) => Config::parse(t),
            None => Config::load(&path), // missing: empty; unreadable: an error
        };
        let (config, good) = match loaded {
            Ok(c) => (c, true),
            Err(e) => {
                error!(path = %path.display(), error = %e, "config not loaded; starting with an empty config");
                shared.config.write().unwrap().error = Some((e.message(), e.position()));
                (Config::default(), false)
            }
        };
        shared.set_policy(config.settings.policy());
        for (provider, gate) in &shared.gates {
            gate.set_limits(config.settings.limits(provider));
            shared.planners[provider].set_rate(config.settings.limits(provider).per_second * super::REFRESH_SHARE);
        }
        let http = providers::http_client(config.settings.http_timeout());
        let schedules = Schedules::new().await;
        let (text, rejected) = if good { (text, None) } else { (None, text) };
        let mut owner = Self { path, text, config, shared, http, gone: false, rejected, last_adapter: None, schedules };
        owner.schedules.apply(&owner.config.settings, &owner.shared).await;

        let now = owner.shared.clock.now();
        let mut machines: BTreeMap<ConnKey, Machine> = stored.into_iter().map(|m| (m.key().clone(), m)).collect();
        for key in owner.config.profiles.keys() {
            machines.entry(key.clone()).or_insert_with(|| Machine::new(key.clone(), now));
        }
        let mut gone = Vec::new();
        for (key, machine) in machines {
            let profile = match owner.config.profiles.get(&key) {
                Some(p) => p.clone(),
                None if providers::manifests().iter().any(|m| m.name == key.provider) => {
                    if good {
                        gone.push(key.clone()); // removed from the config while the daemon was down
                    }
                    Arc::new(ProfileSettings::Trakt(Default::default()))
                }
                None => {
                    warn!(connection = %key, "stored connection for a provider this build does not know; left alone");
                    continue;
                }
            };
            let adapter = owner.adapter(&key, &profile);
            owner.shared.add_connection(machine, adapter);
        }
        for key in gone {
            owner.remove(&key).await;
        }
        let keys: Vec<ConnKey> = owner.config.profiles.keys().cloned().collect();
        for key in keys {
            owner.import(&key).await;
        }
        owner.note_profiles();
        owner
    }

    pub async fn run(mut self, mut commands: mpsc::Receiver<ConfigCommand>, mut shutdown: watch::Receiver<bool>) {
        let (tx, mut changes) = mpsc::unbounded_channel();
        let name = self.path.file_name().map(|n| n.to_owned());
        let watcher = new_debouncer(DEBOUNCE, move |res: DebounceEventResult| {
            if let Ok(events) = res
                && events.iter().any(|e| e.path.file_name() == name.as_deref())
            {
                let _ = tx.send(());
            }
        });
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
        let _watcher = match watcher {
            Ok(mut w) => match w.watcher().watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    error!(dir = %dir.display(), error = %e, "cannot watch the config directory; edits need a restart");
                    None
                }
            },
            Err(e) => {
                error!(error = %e, "cannot start the config watcher; edits need a restart");
                None
            }
        };
        loop {
            tokio::select! {
                biased;
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
                Some(command) = commands.recv() => self.on_command(command).await,
                Some(()) = changes.recv() => self.reload().await,
            }
        }
        self.schedules.stop().await;
    }

    async fn on_command(&mut self, command: ConfigCommand) {
        match command {
            ConfigCommand::AddProfile { provider, reply } => {
                let _ = reply.send(self.add_profile(&provider).await);
            }
            ConfigCommand::RemoveProfile { provider, profile, reply } => {
                let _ = reply.send(self.remove_profile(&provider, &profile).await);
            }
            ConfigCommand::WriteBack { key, credentials } => {
                if let Err(e) = self.write_back(&key, credentials.as_ref()).await {
                    error!(connection = %key, error = %e, "write-back to the config file failed");
                    self.shared.publish_warning(Some(&key), format!("config write-back failed: {e}"), None);
                }
            }
        }
    }

    /// Read the file and apply it if it changed since the last load or write.
    async fn reload(&mut self) {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Reported once per disappearance; the previous text stays the last good one.
                if self.text.is_some() && !self.gone {
                    self.gone = true;
                    self.rejected = None;
                    self.report(ConfigError::Invalid(format!(
                        "{} disappeared; the last good config stays in force until it is back",
                        self.path.display()
                    )));
                }
                return;
            }
            Err(source) => return self.report(ConfigError::Io { path: self.path.clone(), source }),
        };
        self.gone = false;
        if self.text.as_deref() == Some(text.as_str()) {
            // Back to the last good text after a bad one: nothing to apply, but the error is over.
            self.rejected = None;
            if self.shared.config.write().unwrap().error.take().is_some() {
                info!("config is good again");
                let _ =
                    self.shared.events.send(WireEvent::ConfigReloaded { changed: vec![], at: self.shared.clock.now() });
            }
            return;
        }
        if self.rejected.as_deref() == Some(text.as_str()) {
            return;
        }
        match self.apply_text(text.clone()).await {
            Ok(()) => self.rejected = None,
            Err(e) => {
                self.rejected = Some(text);
                self.report(e);
            }
        }
    }

    fn report(&self, e: ConfigError) {
        error!(path = %self.path.display(), error = %e, "config not applied; the last good config stays in force");
        let position = e.position();
        self.shared.config.write().unwrap().error = Some((e.message(), position));
        let _ = self.shared.events.send(WireEvent::ConfigError {
            error: e.message(),
            line: position.map(|p| p.0),
            column: position.map(|p| p.1),
            at: self.shared.clock.now(),
        });
    }

    /// Parse `text`; if it is good, make it the config and send events to just the
    /// connections it changes, then `config_reloaded`.
    async fn apply_text(&mut self, text: String) -> Result<(), ConfigError> {
        let new = Config::parse(&text)?;
        self.text = Some(text);
        self.shared.config.write().unwrap().error = None;
        let old = std::mem::replace(&mut self.config, new);
        let changed = self.apply_diff(&old).await;
        self.schedules.apply(&self.config.settings, &self.shared).await;
        info!(changed = changed.len(), "config reloaded");
        let _ = self.shared.events.send(WireEvent::ConfigReloaded {
            changed: changed.iter().map(ToString::to_string).collect(),
            at: self.shared.clock.now(),
        });
        Ok(())
    }

    async fn apply_diff(&mut self, old: &Config) -> Vec<ConnKey> {
        let (was, now) = (&old.settings, &self.config.settings.clone());
        if was.policy() != now.policy() {
            self.shared.set_policy(now.policy());
        }
        if was.http_timeout() != now.http_timeout() {
            self.http = providers::http_client(now.http_timeout());
        }
        for (provider, gate) in &self.shared.gates {
            gate.set_limits(now.limits(provider));
            self.shared.planners[provider].set_rate(now.limits(provider).per_second * super::REFRESH_SHARE);
        }
        let mut changed = Vec::new();
        for (key, change) in config::diff(old, &self.config) {
            let touched = match change {
                Change::Added => {
                    let profile = self.config.profiles[&key].clone();
                    let machine = Machine::new(key.clone(), self.shared.clock.now());
                    let adapter = self.adapter(&key, &profile);
                    self.shared.add_connection(machine, adapter);
                    self.import(&key).await;
                    true
                }
                Change::Removed => {
                    self.remove(&key).await;
                    true
                }
                Change::Changed { app, credential } => {
                    if app {
                        let profile = self.config.profiles[&key].clone();
                        let adapter = self.adapter(&key, &profile);
                        self.shared.set_extras(&key, adapter.token_extras());
                        let _ = self.shared.ask(&key, |reply| Command::Reconfigure(adapter, reply)).await;
                    }
                    let imported = credential && self.import(&key).await;
                    app || imported
                }
            };
            if touched {
                changed.push(key);
            }
        }
        self.note_profiles();
        changed
    }

    /// If the file holds a credential for `key` that the user put there (not one the daemon
    /// already has, or last read or wrote), supply it to the connection. True if it did.
    async fn import(&mut self, key: &ConnKey) -> bool {
        let Some(credentials) = self.config.trakt(key).and_then(|b| b.credentials(self.shared.clock.now())) else {
            return false;
        };
        let digest = credential_digest(Some(&credentials));
        let store = self.shared.store.clone();
        let k = key.clone();
        let seen = tokio::task::spawn_blocking(move || store.config_seen(&k)).await.ok().and_then(Result::ok).flatten();
        let held = self
            .shared
            .lookup(&key.provider, &key.profile, |s| {
                s.committed.connection().credentials.as_ref().map(|c| c.access_token.clone())
            })
            .ok()
            .flatten();
        let new = seen.as_deref() != Some(digest.as_slice()) && held.as_ref() != Some(&credentials.access_token);
        if new {
            info!(connection = %key, "importing the credential found in the config file");
            if let Err(e) = self.shared.ask(key, |reply| Command::Import(credentials, reply)).await {
                warn!(connection = %key, error = %e.message, "credential in the config file not imported");
            }
        }
        self.remember(key, digest).await;
        new
    }

    fn adapter(&mut self, key: &ConnKey, profile: &ProfileSettings) -> Adapter {
        let gate = self.shared.gates[&key.provider].clone();
        let mut adapter = Adapter::new(key, profile, &self.config.settings, &self.http, gate);
        if let Some(last) = &self.last_adapter {
            adapter.share_with(last);
        }
        self.last_adapter = Some(adapter.clone());
        adapter
    }

    async fn remember(&self, key: &ConnKey, digest: Vec<u8>) {
        let store = self.shared.store.clone();
        let key = key.clone();
        let result = tokio::task::spawn_blocking(move || store.set_config_seen(&key, &digest)).await;
        if let Ok(Err(e)) = result {
            warn!(error = %e, "could not record the config credential digest");
        }
    }

    /// The profile left the config: disconnect it, stop its actor, forget it (history stays).
    async fn remove(&mut self, key: &ConnKey) {
        if let Err(e) = self.shared.ask(key, Command::Remove).await {
            warn!(connection = %key, error = %e.message, "removal did not complete");
        }
        self.shared.conns.write().unwrap().remove(key);
        let store = self.shared.store.clone();
        let k = key.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.forget(&k)).await {
            warn!(connection = %key, error = %e, "could not forget the removed connection");
        }
    }

    fn note_profiles(&self) {
        let store = self.shared.store.clone();
        for provider in providers::manifests().iter().map(|m| m.name) {
            let highest = self.config.highest_profile(provider);
            if highest > 0
                && let Err(e) = store.note_profiles(provider, highest)
            {
                warn!(error = %e, "could not record profile numbers");
            }
        }
    }

    /// Bring `self.text` up to date with the file before editing it, so a user's edit that the
    /// watcher has not delivered yet is applied, not overwritten.
    async fn catch_up(&mut self) -> Result<String, ApiError> {
        match std::fs::read_to_string(&self.path) {
            Ok(current) => {
                if self.text.as_deref() != Some(current.as_str()) {
                    self.apply_text(current.clone()).await.map_err(|e| {
                        ApiError::conflict(format!("config.json does not load, so it was not edited: {e}"))
                    })?;
                }
                Ok(current)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(ApiError::internal(format!("cannot read {}: {e}", self.path.display()))),
        }
    }

    async fn add_profile(&mut self, provider: &str) -> Result<String, ApiError> {
        if !providers::manifests().iter().any(|m| m.name == provider) {
            return Err(ApiError::unknown_provider(provider));
        }
        let text = self.catch_up().await?;
        let store = self.shared.store.clone();
        let (p, in_use) = (provider.to_owned(), self.config.highest_profile(provider));
        let number = tokio::task::spawn_blocking(move || store.allocate_profile(&p, in_use))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let id = format!("{}-P{number:02}", provider.to_ascii_uppercase());
        let edited = config_edit::add_profile(&text, provider, &id).map_err(edit_error)?;
        self.write(&edited, false)?;
        self.apply_text(edited).await.map_err(|e| ApiError::internal(e.to_string()))?;
        info!(provider, profile = %id, "profile added");
        Ok(id)
    }

    async fn remove_profile(&mut self, provider: &str, profile: &str) -> Result<String, ApiError> {
        if !providers::manifests().iter().any(|m| m.name == provider) {
            return Err(ApiError::unknown_provider(provider));
        }
        if profile == "default" {
            return Err(ApiError::bad_request(
                "the default profile is the provider's base block; it cannot be removed",
            ));
        }
        let text = self.catch_up().await?;
        if profile_number(profile).is_none() || !self.config.profiles.contains_key(&ConnKey::new(provider, profile)) {
            return Err(ApiError::unknown_profile(provider, profile));
        }
        let edited = config_edit::remove_profile(&text, provider, profile).map_err(edit_error)?;
        self.write(&edited, false)?;
        self.apply_text(edited).await.map_err(|e| ApiError::internal(e.to_string()))?;
        info!(provider, profile, "profile removed");
        Ok(profile.to_owned())
    }

    async fn write_back(&mut self, key: &ConnKey, credentials: Option<&Credentials>) -> Result<(), EditError> {
        if !self.config.settings.write_back || !self.config.profiles.contains_key(key) {
            return Ok(());
        }
        let text = self.catch_up().await.map_err(|e| EditError::Parse(e.message))?;
        let edited = config_edit::write_credentials(&text, key, credentials)?;
        if edited == text {
            return Ok(());
        }
        config_edit::write_atomically(&self.path, &edited, true)?;
        match Config::parse(&edited) {
            Ok(config) => self.config = config,
            Err(e) => warn!(error = %e, "the written config does not load"),
        }
        self.text = Some(edited);
        self.remember(key, credential_digest(credentials)).await;
        let _ = self
            .shared
            .events
            .send(WireEvent::ConfigWritten { changed: vec![key.to_string()], at: self.shared.clock.now() });
        Ok(())
    }

    fn write(&self, text: &str, secret: bool) -> Result<(), ApiError> {
        config_edit::write_atomically(&self.path, text, secret).map_err(edit_error)
    }
}

fn edit_error(e: EditError) -> ApiError {
    match e {
        EditError::NoSuchProfile(..) => ApiError::conflict(e.to_string()),
        EditError::Io(..) => ApiError::internal(e.to_string()),
        _ => ApiError::conflict(e.to_string()),
    }
}
