//! `config.json`: the CrossWatch layout (one block per provider, profiles under `instances`)
//! plus the daemon's own `"authkeeper"` block. Unknown top-level keys are ignored here and
//! never rewritten.

use crate::limits::{Limits, Rate};
use authkeeper_state::{ConnKey, Credentials, Policy, Secret};
use chrono::{DateTime, TimeDelta, Utc};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Provider blocks of the CrossWatch layout. Only these may be named under `"authkeeper"`.
pub const LAYOUT_PROVIDERS: &[&str] =
    &["plex", "trakt", "simkl", "anilist", "jellyfin", "emby", "mdblist", "tautulli", "tmdb_sync"];

/// The `"authkeeper"` block.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct Settings {
    pub socket: Option<PathBuf>,
    /// `{"trakt": "http://127.0.0.1:PORT"}`: all of a provider's hosts at one origin.
    pub base_url: BTreeMap<String, String>,
    pub write_back: bool,
    pub refresh_margin_secs: u64,
    pub http_timeout_secs: u64,
    pub backoff_base_secs: u64,
    pub validate_every_secs: u64,
    /// Per provider, overrides of the default rate limits: `{"trakt": {"per_second": 5}}`.
    pub rate_limits: BTreeMap<String, LimitsOverride>,
    /// Cron expressions with seconds: `{"validate_all": "0 0 4 * * *", "compact_history": …}`.
    pub schedules: BTreeMap<String, String>,
    /// `compact_history` drops history rows older than this (the newest row of each
    /// connection is always kept).
    pub history_retention_days: u64,
}

/// The schedules a user can declare.
pub const SCHEDULES: &[&str] = &["validate_all", "compact_history"];

/// Any of a provider's limits; what is not given keeps its default.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsOverride {
    pub per_second: Option<f64>,
    pub burst: Option<u32>,
    pub account_reads: Option<Rate>,
    pub account_writes: Option<Rate>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            socket: None,
            base_url: BTreeMap::new(),
            write_back: false,
            refresh_margin_secs: 300,
            http_timeout_secs: 30,
            backoff_base_secs: 5,
            validate_every_secs: 1800,
            rate_limits: BTreeMap::new(),
            schedules: BTreeMap::new(),
            history_retention_days: 365,
        }
    }
}

impl Settings {
    pub fn policy(&self) -> Policy {
        Policy {
            refresh_margin: TimeDelta::seconds(self.refresh_margin_secs as i64),
            backoff_base: TimeDelta::seconds(self.backoff_base_secs as i64),
            validate_every: TimeDelta::seconds(self.validate_every_secs.max(1) as i64),
        }
    }

    /// The effective rate limits of `provider`.
    pub fn limits(&self, provider: &str) -> Limits {
        let mut limits = Limits::for_provider(provider);
        if let Some(o) = self.rate_limits.get(provider) {
            limits.per_second = o.per_second.unwrap_or(limits.per_second);
            limits.burst = o.burst.unwrap_or(limits.burst);
            limits.account_reads = o.account_reads.or(limits.account_reads);
            limits.account_writes = o.account_writes.or(limits.account_writes);
        }
        limits
    }

    pub fn http_timeout(&self) -> Duration {
        Duration::from_secs(self.http_timeout_secs.max(1))
    }
}

/// Declares the typed block of each provider in the CrossWatch layout. Every key is optional;
/// a key of the wrong type is a config error (with its line and column); unknown keys are
/// ignored. Each block's `instances` hold profiles of the same shape.
macro_rules! layout {
    ($($field:ident => $ty:ident { $($key:ident: $kty:ty),* $(,)? })*) => {
        $(
            #[derive(Clone, Debug, Default, Deserialize, PartialEq)]
            pub struct $ty {
                $(pub $key: Option<$kty>,)*
                #[serde(default)]
                pub instances: BTreeMap<String, $ty>,
            }

            impl $ty {
                /// A profile's effective settings: this base block overlaid with the profile's own.
                pub fn merged_with(&self, own: &Self) -> Self {
                    Self { $($key: own.$key.clone().or_else(|| self.$key.clone()),)* instances: BTreeMap::new() }
                }
            }
        )*

        #[derive(Debug, Default, Deserialize)]
        struct Layout {
            #[serde(default)]
            authkeeper: Settings,
            $(#[serde(default)] $field: Option<$ty>,)*
        }

        impl Layout {
            /// Every profile id under every known provider's `instances`.
            fn instance_ids(&self) -> impl Iterator<Item = (&'static str, &String)> {
                std::iter::empty()
                    $(.chain(self.$field.iter().flat_map(|b| b.instances.keys()).map(|id| (stringify!($field), id))))*
            }
        }
    };
}

layout! {
    plex => PlexBlock { account_token: String, client_id: String, server_url: String, machine_id: String,
                        username: String, account_id: serde_json::Value, pms_token: String }
    trakt => TraktBlock { client_id: String, client_secret: String, access_token: String, refresh_token: String,
                          scope: String, token_type: String, expires_at: f64 }
    simkl => SimklBlock { client_id: String, client_secret: String, access_token: String }
    anilist => AnilistBlock { client_id: String, client_secret: String, access_token: String,
                              user: serde_json::Map<String, serde_json::Value> }
    jellyfin => JellyfinBlock { server: String, access_token: String, user_id: String, username: String,
                                device_id: String, verify_ssl: bool }
    emby => EmbyBlock { server: String, access_token: String, user_id: String, device_id: String }
    mdblist => MdblistBlock { api_key: String, access_token: String, refresh_token: String, expires_at: f64 }
    tautulli => TautulliBlock { server_url: String, api_key: String }
    tmdb_sync => TmdbBlock { api_key: String, session_id: String, account_id: serde_json::Value, username: String }
}

impl TraktBlock {
    /// The credential CrossWatch keeps in this block, if any.
    pub fn credentials(&self, now: DateTime<Utc>) -> Option<Credentials> {
        let access = self.access_token.as_deref().filter(|t| !t.is_empty())?;
        Some(Credentials {
            access_token: Secret::new(access),
            refresh_token: self.refresh_token.as_deref().filter(|t| !t.is_empty()).map(Secret::new),
            token_type: self.token_type.clone().unwrap_or_else(|| "bearer".into()),
            scope: self.scope.clone(),
            issued_at: now,
            expires_at: self.expires_at.and_then(|s| DateTime::from_timestamp(s as i64, 0)),
        })
    }
}

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
    let reach = |s: &Settings, provider: &str| (s.base_url.get(provider).cloned(), s.http_timeout());
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
                if before == after && reach(&old.settings, &key.provider) == reach(&new.settings, &key.provider) {
                    continue;
                }
                let app = before.app() != after.app()
                    || reach(&old.settings, &key.provider) != reach(&new.settings, &key.provider);
                let credential = before.credential_fields() != after.credential_fields();
                if app || credential {
                    out.push((key.clone(), Change::Changed { app, credential }));
                }
            }
        }
    }
    out
}

/// A digest of the credential fields a config block holds, to tell whether the user changed
/// them since the daemon last read or wrote the file. Empty when there is no credential.
pub fn credential_digest(c: Option<&Credentials>) -> Vec<u8> {
    let Some(c) = c else { return Vec::new() };
    let mut h = Sha256::new();
    h.update(c.access_token.expose());
    h.update([0]);
    h.update(c.refresh_token.as_ref().map_or("", |t| t.expose()));
    h.update([0]);
    h.update(c.expires_at.map_or(0, |t| t.timestamp()).to_le_bytes());
    h.finalize().to_vec()
}

/// A profile's effective provider settings.
#[derive(Clone, Debug, PartialEq)]
pub enum ProfileSettings {
    Trakt(TraktBlock),
}

impl ProfileSettings {
    /// The app settings (not the credential).
    pub fn app(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Self::Trakt(b) => (b.client_id.as_deref(), b.client_secret.as_deref()),
        }
    }

    /// The credential fields, as written in the file.
    pub fn credential_fields(&self) -> (Option<&str>, Option<&str>, Option<f64>) {
        match self {
            Self::Trakt(b) => (b.access_token.as_deref(), b.refresh_token.as_deref(), b.expires_at),
        }
    }
}

/// A loaded, validated config.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    pub settings: Settings,
    /// Every profile of every provider this build connects.
    /// Equal settings are shared: a hundred thousand profiles that inherit one app from the
    /// base block hold one copy of it.
    pub profiles: BTreeMap<ConnKey, Arc<ProfileSettings>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{message} (line {line}, column {column})")]
    Parse { message: String, line: usize, column: usize },
    #[error("{0}")]
    Invalid(String),
}

impl ConfigError {
    /// Where in the file, when known.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            Self::Parse { line, column, .. } => Some((*line, *column)),
            _ => None,
        }
    }

    /// The message without its position.
    pub fn message(&self) -> String {
        match self {
            Self::Parse { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

impl Config {
    /// Read `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Io { path: path.to_owned(), source }),
        }
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let layout: Layout = serde_json::from_str(text).map_err(|e| ConfigError::Parse {
            message: e.to_string().split(" at line ").next().unwrap_or_default().to_owned(),
            line: e.line(),
            column: e.column(),
        })?;
        for name in layout.authkeeper.base_url.keys().chain(layout.authkeeper.rate_limits.keys()) {
            if !LAYOUT_PROVIDERS.contains(&name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "authkeeper names an unknown provider {name:?} (known: {})",
                    LAYOUT_PROVIDERS.join(", ")
                )));
            }
        }
        for (name, expr) in &layout.authkeeper.schedules {
            if !SCHEDULES.contains(&name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "authkeeper.schedules has an unknown schedule {name:?} (known: {})",
                    SCHEDULES.join(", ")
                )));
            }
            if let Err(e) = cron_parser().parse(expr) {
                return Err(ConfigError::Invalid(format!(
                    "authkeeper.schedules.{name}: {expr:?} is not a cron expression with seconds (\"sec min hour day month weekday\"): {e}"
                )));
            }
        }
        for (provider, id) in layout.instance_ids() {
            check_profile_id(provider, id)?;
        }
        let mut profiles = BTreeMap::new();
        let trakt = layout.trakt.unwrap_or_default();
        let mut last = Arc::new(ProfileSettings::Trakt(trakt.merged_with(&TraktBlock::default())));
        profiles.insert(ConnKey::new("trakt", "default"), last.clone());
        for (id, own) in &trakt.instances {
            let settings = ProfileSettings::Trakt(trakt.merged_with(own));
            if *last != settings {
                last = Arc::new(settings);
            }
            profiles.insert(ConnKey::new("trakt", id), last.clone());
        }
        Ok(Self { settings: layout.authkeeper, profiles })
    }

    pub fn trakt(&self, key: &ConnKey) -> Option<&TraktBlock> {
        match &**self.profiles.get(key)? {
            ProfileSettings::Trakt(block) => Some(block),
        }
    }

    /// The highest `PROVIDER-P##` number among `provider`'s profiles.
    pub fn highest_profile(&self, provider: &str) -> u64 {
        self.profiles
            .keys()
            .filter(|k| k.provider == provider)
            .filter_map(|k| profile_number(&k.profile))
            .max()
            .unwrap_or(0)
    }
}

/// The parser `tokio-cron-scheduler` uses: six fields, seconds first.
fn cron_parser() -> croner::parser::CronParser {
    croner::parser::CronParser::builder().seconds(croner::parser::Seconds::Required).dom_and_dow(true).build()
}

/// `TRAKT-P07` → 7.
pub fn profile_number(id: &str) -> Option<u64> {
    id.rsplit_once("-P")?.1.parse().ok()
}

/// Profile ids are `PROVIDER-P##`: `TRAKT-P01`.
fn check_profile_id(provider: &str, id: &str) -> Result<(), ConfigError> {
    let prefix = format!("{}-P", provider.to_ascii_uppercase());
    let ok = id.strip_prefix(&prefix).is_some_and(|n| n.len() >= 2 && n.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!("{provider}.instances: profile id {id:?} must look like {prefix}01")))
    }
}

/// Where things live, resolved per the CLI contract.
#[derive(Clone, Debug)]
pub struct Paths {
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
}

impl Paths {
    /// `--config`, `--state-dir`, `--socket` (or `AUTHKEEPER_SOCKET`, which clap maps onto it)
    /// win; then the config's `authkeeper.socket`; then XDG defaults.
    pub fn resolve(config: Option<PathBuf>, state_dir: Option<PathBuf>, socket: Option<PathBuf>) -> Self {
        let config = config.unwrap_or_else(|| {
            dirs::config_dir().unwrap_or_else(|| PathBuf::from(".config")).join("authkeeper").join("config.json")
        });
        let state_dir = state_dir.unwrap_or_else(|| {
            dirs::state_dir()
                .or_else(|| dirs::home_dir().map(|h| h.join(".local/state")))
                .unwrap_or_else(|| PathBuf::from(".local/state"))
                .join("authkeeper")
        });
        let socket = socket
            .or_else(|| Config::load(&config).ok().and_then(|c| c.settings.socket))
            .or_else(|| dirs::runtime_dir().map(|d| d.join("authkeeper").join("authkeeper.sock")))
            .unwrap_or_else(|| state_dir.join("authkeeper.sock"));
        Self { config, state_dir, socket }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crosswatch_file_gives_default_and_instance_profiles_with_merged_settings() {
        let cfg = Config::parse(
            r#"{
              "pairs": [{"a": 1}], "sync": {"x": true},
              "trakt": {"client_id": "cid", "client_secret": "sec",
                        "instances": {"TRAKT-P01": {"client_id": "cid-2"}}},
              "authkeeper": {"refresh_margin_secs": 7, "base_url": {"trakt": "http://127.0.0.1:9"}}
            }"#,
        )
        .unwrap();
        assert_eq!(cfg.settings.refresh_margin_secs, 7);
        assert_eq!(cfg.settings.http_timeout_secs, 30, "defaults fill the rest");
        let p1 = cfg.trakt(&ConnKey::new("trakt", "TRAKT-P01")).unwrap();
        assert_eq!(p1.client_id.as_deref(), Some("cid-2"));
        assert_eq!(p1.client_secret.as_deref(), Some("sec"), "inherited from the base block");
        assert!(cfg.trakt(&ConnKey::new("trakt", "default")).is_some());
    }

    #[test]
    fn diff_names_only_the_profiles_that_changed_and_how() {
        let base = r#"{"trakt": {"client_id": "c", "client_secret": "s", "instances": {
            "TRAKT-P01": {}, "TRAKT-P02": {"access_token": "a"}, "TRAKT-P03": {}}}}"#;
        let old = Config::parse(base).unwrap();
        assert!(diff(&old, &old).is_empty());
        let new = Config::parse(
            &base
                .replace(r#""TRAKT-P03": {}"#, r#""TRAKT-P04": {"client_id": "d"}"#)
                .replace(r#""access_token": "a""#, r#""access_token": "b""#),
        )
        .unwrap();
        let k = |p: &str| ConnKey::new("trakt", p);
        assert_eq!(
            diff(&old, &new),
            [
                (k("TRAKT-P02"), Change::Changed { app: false, credential: true }),
                (k("TRAKT-P03"), Change::Removed),
                (k("TRAKT-P04"), Change::Added),
            ]
        );
        let moved =
            Config::parse(&base.replace(
                "{\"trakt\"",
                "{\"authkeeper\": {\"base_url\": {\"trakt\": \"http://127.0.0.1:1\"}}, \"trakt\"",
            ))
            .unwrap();
        assert_eq!(diff(&old, &moved).len(), 4, "a new base URL touches every trakt profile");
        assert!(diff(&old, &moved).iter().all(|(_, c)| *c == Change::Changed { app: true, credential: false }));
    }

    #[test]
    fn an_empty_or_missing_file_is_an_empty_config() {
        let cfg = Config::parse("{}").unwrap();
        assert_eq!(cfg.settings, Settings::default());
        let missing = Config::load(Path::new("/nonexistent/authkeeper/config.json")).unwrap();
        assert_eq!(missing.settings, Settings::default());
    }

    #[test]
    fn bad_files_are_refused_with_a_position_or_a_clear_reason() {
        let e = Config::parse("{\n  \"trakt\": {\"client_id\": 5}\n}").unwrap_err();
        assert_eq!(e.position(), Some((2, 26)));
        assert!(e.to_string().contains("invalid type"), "{e}");

        let e = Config::parse("{\"trakt\": ").unwrap_err();
        assert!(e.position().is_some());

        let e = Config::parse(r#"{"authkeeper": {"base_url": {"trackt": "http://x"}}}"#).unwrap_err();
        assert!(e.to_string().contains("unknown provider \"trackt\""), "{e}");

        let e = Config::parse(r#"{"authkeeper": {"schedules": {"validate_all": "0 0 4 * *"}}}"#).unwrap_err();
        assert!(e.to_string().contains("validate_all") && e.to_string().contains("cron"), "{e}");
        let e = Config::parse(r#"{"authkeeper": {"schedules": {"vacuum": "0 0 4 * * *"}}}"#).unwrap_err();
        assert!(e.to_string().contains("unknown schedule \"vacuum\""), "{e}");
        assert!(Config::parse(r#"{"authkeeper": {"schedules": {"validate_all": "0 0 4 * * *"}}}"#).is_ok());

        let e = Config::parse(r#"{"trakt": {"instances": {"trakt-1": {}}}}"#).unwrap_err();
        assert!(e.to_string().contains("TRAKT-P01"), "{e}");
    }
}
