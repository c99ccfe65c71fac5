//! The one owner of config.json: it loads it, watches it, diffs each change into events for
//! just the connections it affects, and makes the daemon's own edits (profiles, write-back).
//!
//! The config declares connections; the store owns them. A file that is missing, unreadable or
//! invalid changes no stored connection: at start-up they run on the settings the store kept
//! from the last good config (each with a warning), later the last good config stays in force.
//! A connection leaves only when a good config that declared it stops declaring it; one that
//! no config declared (an owner's) is never touched by config changes.

mod edits;
mod first_read;
mod persist;

use first_read::declared_profiles;
pub use first_read::{Read, Stamp, Watch, read, stamp, watch};

use super::schedules::Schedules;
use super::{Command, DaemonError, Shared, Slot};
use crate::config::{self, Change, Config, ConfigError, credential_digest};
use crate::providers::{self, Profile, Reach, Setup};
use crate::wire::WireEvent;
use anyhow::Context;
use authkeeper_state::{ConnKey, Machine, ProfileState, Stored};
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
        reply: oneshot::Sender<Result<String, DaemonError>>,
    },
    /// Make an owner's connection (`discord:123456`) if it has none, on the provider's base block.
    AddOwner {
        key: ConnKey,
        reply: oneshot::Sender<Result<(), DaemonError>>,
    },
    RemoveProfile {
        provider: String,
        profile: String,
        reply: oneshot::Sender<Result<String, DaemonError>>,
    },
}

pub struct ConfigOwner {
    path: PathBuf,
    /// The text last loaded or written (`None`: no good file yet). Equal text on disk means no
    /// change, which is how the daemon's own writes are told from the user's.
    text: Option<String>,
    /// The config in force: the last good one, or at start-up without one, the stored settings.
    config: Config,
    /// The config in force came from the store, not from a good file.
    from_store: bool,
    /// The store held connections a config had declared when the daemon started.
    stored_declared: bool,
    /// The last background write of settings rows; a removal waits for it, so that a late
    /// write cannot bring a removed connection's settings back.
    settings_write: Option<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
    http: reqwest::Client,
    /// Each provider's reach on `http`, made when first needed.
    reaches: crate::limits::FastMap<&'static str, Arc<Reach>>,
    /// The file is missing and that has been reported.
    gone: bool,
    /// The bad text last reported: seeing it again (one save can wake the watcher twice) is
    /// not a new error.
    rejected: Option<String>,
    /// Per-profile provider state (stable device ids), as saved.
    states: crate::limits::FastMap<ConnKey, Arc<ProfileState>>,
    /// Provider state made since the last save; saved before any adapter that uses it acts.
    unsaved: Vec<(ConnKey, ProfileState)>,
    schedules: Schedules,
}

impl ConfigOwner {
    /// Load the config, give every stored or declared connection its slot, and import
    /// credentials the user put in the file.
    pub async fn start(
        path: PathBuf,
        first: Read,
        http: reqwest::Client,
        shared: Arc<Shared>,
        stored: Vec<Stored>,
        states: Vec<(ConnKey, ProfileState)>,
    ) -> anyhow::Result<Self> {
        let mut machines = stored;
        let (config, text, rejected, warning) = match first {
            Read::Good(config, text) => (*config, Some(text), None, None),
            other => {
                let (why, rejected) = match other {
                    Read::Bad(e, text) => {
                        error!(path = %path.display(), error = %e, "config not loaded; stored connections keep their stored settings");
                        shared.config.write().unwrap().error = Some((e.message(), e.position()));
                        shared.metrics.config_refused();
                        (format!("config.json does not load ({e})"), text)
                    }
                    _ => {
                        info!(path = %path.display(), "no config file yet; stored connections keep their stored settings");
                        (format!("{} is missing", path.display()), None)
                    }
                };
                let warning: Arc<str> =
                    format!("{why}: running on the settings stored from the last good config").into();
                (Self::from_stored(shared.store.as_ref()), None, rejected, Some(warning))
            }
        };
        let good = warning.is_none();
        shared.set_policy(config.settings.policy());
        shared.public_url.set(config.settings.web.as_ref().map(|w| w.public_url()));
        *shared.login_messages.write().unwrap() = config.settings.login_messages.clone();
        shared.hooks.set(&config.settings.hooks);
        if let Some(web) = &config.settings.web {
            *shared.link_ttl.write().unwrap() = web.link_ttl();
            shared.metrics.serve_on_web(web.metrics);
        }
        shared.configure_limits(&config.settings);
        let schedules = Schedules::new().await;
        let states = states.into_iter().map(|(k, s)| (k, Arc::new(s))).collect();
        let mut owner = Self {
            path,
            text,
            config,
            from_store: !good,
            stored_declared: false,
            settings_write: None,
            unsaved: Vec::new(),
            shared,
            http,
            reaches: Default::default(),
            gone: false,
            rejected,
            states,
            schedules,
        };
        owner.schedules.apply(&owner.config.settings, &owner.shared).await;

        let (declared, new) = declared_profiles(&mut machines, &owner.config.profiles, owner.shared.clock.now());
        // The settings the store holds decide now only the fate of connections the config does
        // not declare, and of every one when no good config is read. Those of the declared
        // connections are compared once the daemon answers (`store_declared_settings`).
        let asked: Vec<_> = (machines.iter().zip(&declared))
            .filter(|(_, profile)| !good || profile.is_none())
            .map(|(s, _)| s.key.clone())
            .collect();
        let found = owner.shared.store.settings_digests(&asked).context("cannot read the stored settings")?;
        owner.stored_declared = found.iter().any(Option::is_some);
        let mut found = found.into_iter();
        let mut gone = Vec::new();
        let mut slots = Vec::with_capacity(machines.len() + new.len());
        for (Stored { key, machine }, profile) in machines.into_iter().chain(new).zip(declared) {
            // Taken in the order asked; a new machine (last) has none.
            let stored = match !good || profile.is_none() {
                true => found.next().flatten(),
                false => None,
            };
            let (profile, warning) = match profile {
                Some(p) if good => (p, None),
                Some(p) if stored.is_some() => (p, warning.clone()),
                Some(p) => (p, None), // a default the empty config declares
                None if stored.is_some() && good => {
                    // Declared by the last good config, not by this one: removed below (a
                    // removal calls no provider, so its provider's defaults do).
                    match owner.owner_profile(&key) {
                        Some(p) => {
                            gone.push(key.clone());
                            (p, None)
                        }
                        None => continue,
                    }
                }
                None => match owner.owner_profile(&key) {
                    // A config-style profile with no stored settings (a store kept from before
                    // settings were stored): it waits for a good config, and says so.
                    Some(p)
                        if !good && (key.profile == "default" || config::profile_number(&key.profile).is_some()) =>
                    {
                        let why = format!(
                            "{}; no settings are stored for it: waiting for a good config",
                            warning.as_deref().unwrap_or("no good config")
                        );
                        (p, Some(why.into()))
                    }
                    Some(p) => (p, None),
                    None => {
                        warn!(connection = %key, "stored connection of a provider this build does not know; left alone");
                        continue;
                    }
                },
            };
            let setup = owner.setup(&key, &profile);
            slots.push((key, Slot::asleep(machine, setup, warning)));
        }
        owner.save_states().await;
        owner.shared.add_connections(slots);
        for key in gone {
            owner.remove(&key).await;
        }
        if good {
            // Only the profiles whose block holds a credential have one to import.
            let now = owner.shared.clock.now();
            let grants: Vec<_> = (owner.config.profiles.iter())
                .filter_map(|(k, p)| Some((k.clone(), p.provider.import(p, now)?)))
                .collect();
            for (key, grant) in grants {
                owner.import_grant(&key, grant).await;
            }
        }
        Ok(owner)
    }

    /// The config made of the settings the store kept, for when no good file is read.
    /// The web listener's settings in force.
    pub fn web(&self) -> Option<crate::web::WebSettings> {
        self.config.settings.web.clone()
    }

    /// The limits both listeners hold requests to (taken at start-up).
    pub fn request_limits(&self) -> crate::serve::Limits {
        crate::serve::Limits { timeout: self.config.settings.request_timeout(), ..Default::default() }
    }

    fn from_stored(store: &dyn authkeeper_state::ConnectionStore) -> Config {
        let mut config = Config::parse("{}").expect("the empty config loads");
        let stored = store.settings().unwrap_or_else(|e| {
            error!(error = %e, "cannot read the stored settings; the defaults apply");
            Vec::new()
        });
        for (key, bytes) in stored {
            let Some(provider) = providers::find(&key.provider) else { continue };
            match Profile::from_stored(provider, &bytes) {
                Ok(profile) => {
                    config.profiles.insert(key, Arc::new(profile));
                }
                Err(e) => warn!(connection = %key, error = %e, "stored settings unreadable; the defaults apply"),
            }
        }
        config
    }

    /// The settings of a connection no config declares: its provider's base block.
    pub(super) fn owner_profile(&self, key: &ConnKey) -> Option<Arc<Profile>> {
        providers::find(&key.provider)?;
        self.config.profile(&ConnKey::new(key.provider.as_str(), "default")).cloned()
    }

    pub async fn run(
        mut self,
        mut file: Watch,
        read_as: Stamp,
        mut commands: mpsc::Receiver<ConfigCommand>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // The profile numbers the config uses, recorded once the socket serves: allocating a
        // number (through this task) counts the config's own anyway.
        self.note_profiles();
        self.store_declared_settings().await;
        // The file was read before the watch began: an edit made in between is seen now.
        if stamp(&self.path) != read_as {
            self.reload().await;
        }
        let shared = self.shared.clone();
        loop {
            tokio::select! {
                biased;
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
                Some(command) = commands.recv() => self.on_command(command).await,
                Some(()) = file.changes.recv() => self.reload().await,
                () = shared.write_backs.ready() => self.write_back().await,
            }
        }
        // What is still queued, and what the connections' last steps queue, is written before
        // the daemon goes.
        self.shared.actors.close();
        self.shared.actors.wait().await;
        self.write_back().await;
        self.schedules.stop().await;
        // The settings being stored are kept before the daemon lets go of the store.
        if let Some(write) = self.settings_write.take() {
            let _ = write.await;
        }
    }

    async fn on_command(&mut self, command: ConfigCommand) {
        match command {
            ConfigCommand::AddProfile { provider, reply } => {
                let _ = reply.send(self.add_profile(&provider).await);
            }
            ConfigCommand::AddOwner { key, reply } => {
                let _ = reply.send(self.add_owner(key).await);
            }
            ConfigCommand::RemoveProfile { provider, profile, reply } => {
                let _ = reply.send(self.remove_profile(&provider, &profile).await);
            }
        }
    }

    /// Read the file and apply it if it changed since the last load or write.
    async fn reload(&mut self) {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Reported once per disappearance; the config in force stays.
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
        self.shared.metrics.config_refused();
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
        let new = Config::parse_file(&self.path, &text)?;
        self.text = Some(text);
        self.shared.config.write().unwrap().error = None;
        let mut old = std::mem::replace(&mut self.config, new);
        if self.from_store {
            // The daemon's own settings were not stored: a timeout that now comes from a good
            // file is no change to any connection (the rest, policy and limits, apply below).
            old.settings.http_timeout_secs = self.config.settings.http_timeout_secs;
            self.set_http(providers::http_client(self.config.settings.http_timeout()));
        }
        let changed = self.apply_diff(&old).await;
        if std::mem::take(&mut self.from_store) {
            // The first good config: every connection it declares runs on its settings now.
            let keys: Vec<ConnKey> = self.config.profiles.keys().cloned().collect();
            let setups: Vec<Setup> =
                keys.iter().map(|key| self.setup(key, &self.config.profiles[key].clone())).collect();
            self.save_states().await;
            for (key, setup) in keys.iter().zip(setups) {
                self.shared.set_setup(key, setup, None);
            }
            self.save_settings(keys);
            self.shared.write_backs.nudge(); // what waited for a good config to write into
        }
        self.schedules.apply(&self.config.settings, &self.shared).await;
        info!(changed = changed.len(), "config reloaded");
        self.shared.metrics.config_reloaded();
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
            self.set_http(providers::http_client(now.http_timeout()));
        }
        crate::web::reconfigure(&self.shared, was.web.as_ref(), now.web.as_ref());
        *self.shared.login_messages.write().unwrap() = now.login_messages.clone();
        self.shared.hooks.set(&now.hooks);
        self.shared.configure_limits(now);
        let mut changed = Vec::new();
        let mut save = Vec::new();
        for (key, change) in config::diff(old, &self.config) {
            let touched = match change {
                Change::Added => {
                    let profile = self.config.profiles[&key].clone();
                    let setup = self.setup(&key, &profile);
                    self.save_states().await;
                    if self.shared.lookup(&key.provider, &key.profile, |_| ()).is_ok() {
                        // An owner's connection by that name: the config declares it from now on.
                        self.shared.set_setup(&key, setup.clone(), None);
                        let _ = self.shared.ask_held(&key, |reply| Command::Reconfigure(setup.bind(&key), reply)).await;
                    } else {
                        let machine = Machine::new(key.clone(), self.shared.clock.now());
                        self.shared.add_connection(machine, setup, None);
                    }
                    save.push(key.clone());
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
                        let setup = self.setup(&key, &profile);
                        self.save_states().await;
                        self.shared.set_setup(&key, setup.clone(), None);
                        let _ = self.shared.ask_held(&key, |reply| Command::Reconfigure(setup.bind(&key), reply)).await;
                        save.push(key.clone());
                    }
                    let imported = credential && self.import(&key).await;
                    app || imported
                }
            };
            if touched {
                changed.push(key);
            }
        }
        self.save_settings(save);
        self.note_profiles();
        changed
    }

    /// If the file holds a credential for `key` that the user put there (not one the daemon
    /// already has, or last read or wrote), supply it to the connection. True if it did.
    async fn import(&mut self, key: &ConnKey) -> bool {
        let Some(profile) = self.config.profile(key) else { return false };
        match profile.provider.import(profile, self.shared.clock.now()) {
            Some(grant) => self.import_grant(key, grant).await,
            None => false,
        }
    }

    /// [`Self::import`] of `grant`, the credential the file holds for `key`.
    async fn import_grant(&mut self, key: &ConnKey, grant: authkeeper_state::Grant) -> bool {
        let digest = credential_digest(Some(&grant));
        let store = self.shared.store.clone();
        let k = key.clone();
        let seen = tokio::task::spawn_blocking(move || store.config_seen(&k)).await.ok().and_then(Result::ok).flatten();
        let held = self
            .shared
            .lookup(&key.provider, &key.profile, |s| {
                s.committed.connection().grant.as_ref().map(|c| c.access_token.clone())
            })
            .ok()
            .flatten();
        let new = seen.as_deref() != Some(digest.as_slice()) && held.as_ref() != Some(&grant.access_token);
        if new {
            info!(connection = %key, "importing the credential found in the config file");
            match self.shared.ask_held(key, |reply| Command::Import(grant, reply)).await {
                Ok(_) => {}
                // Another daemon's (a shared store): its own reading of the config imports it.
                Err(DaemonError::NotHolder(_)) => return false,
                Err(e) => {
                    // Not marked as seen: it is tried again at the next load.
                    warn!(connection = %key, error = %e, "credential in the config file not imported");
                    return false;
                }
            }
        }
        self.remember(key, digest).await;
        new
    }

    /// The setup for `key` with `profile`, its provider state prepared; a new state must be
    /// saved ([`Self::save_states`]) before an adapter with it acts.
    fn setup(&mut self, key: &ConnKey, profile: &Arc<Profile>) -> Setup {
        let provider = profile.provider;
        let mut state = self.states.get(key).map_or_else(ProfileState::default, |s| ProfileState::clone(s));
        if provider.prepare(profile, &mut state) {
            self.unsaved.push((key.clone(), state.clone()));
            self.states.insert(key.clone(), Arc::new(state));
        }
        let state = self.states.get(key).cloned().unwrap_or_else(|| empty_state().clone());
        let name = provider.manifest().name;
        let reach = match self.reaches.get(name) {
            Some(reach) => reach.clone(),
            None => {
                let reach = Arc::new(Reach {
                    http: self.http.clone(),
                    gate: self.shared.gates[name].clone(),
                    public_url: self.shared.public_url.clone(),
                    metrics: self.shared.metrics.clone(),
                });
                self.reaches.insert(name, reach.clone());
                reach
            }
        };
        Setup { profile: profile.clone(), state, reach }
    }

    /// Make provider calls with `http` from now on (setups made before keep theirs).
    fn set_http(&mut self, http: reqwest::Client) {
        self.http = http;
        self.reaches.clear();
    }

    /// The profile left a good config: disconnect it, stop its actor, forget it (history stays).
    async fn remove(&mut self, key: &ConnKey) {
        if let Some(write) = self.settings_write.take() {
            let _ = write.await;
        }
        match self.shared.ask_held(key, Command::Remove).await {
            Ok(_) => {}
            // Another daemon's (a shared store): it removes it from the store; here it just goes.
            Err(DaemonError::NotHolder(_)) => {
                self.shared.conns.write().unwrap().remove(key);
                return;
            }
            Err(e) => warn!(connection = %key, error = %e, "removal did not complete"),
        }
        self.shared.conns.write().unwrap().remove(key);
        let store = self.shared.store.clone();
        let k = key.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.forget(&k)).await {
            warn!(connection = %key, error = %e, "could not forget the removed connection");
        }
    }
}

/// The provider state of profiles that have none: one shared empty value.
fn empty_state() -> &'static Arc<ProfileState> {
    static EMPTY: std::sync::LazyLock<Arc<ProfileState>> = std::sync::LazyLock::new(Arc::default);
    &EMPTY
}
