//! `config.json`: the CrossWatch layout (one block per provider, profiles under `instances`)
//! plus the daemon's own `"authkeeper"` block. Unknown top-level keys are ignored here and
//! never rewritten.

use crate::limits::{Limits, Rate};
use crate::providers::{self, Manifest, Profile};
use authkeeper_state::{ConnKey, Policy};

mod blocks;

pub use crate::config_diff::{Change, credential_digest, diff};
use chrono::TimeDelta;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Providers of the CrossWatch layout, by their names on the socket (TMDB's block is
/// `tmdb_sync`). Only these may be named under `"authkeeper"`; blocks of those this build does
/// not connect yet are preserved and ignored, like any other key it does not know.
pub const LAYOUT_PROVIDERS: &[&str] =
    &["plex", "trakt", "simkl", "anilist", "jellyfin", "emby", "mdblist", "tautulli", "tmdb", "tmdb_sync"];

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
    /// The web listener (OAuth callbacks); off when absent.
    pub web: Option<crate::web::WebSettings>,
    /// Per provider, what an owner who is not connected is told (default "Please log in
    /// first: /login PROVIDER").
    pub login_messages: BTreeMap<String, String>,
    /// Encrypt the secrets in the store with the key in this file (relative to the config's
    /// directory); read at start-up.
    pub secrets_key_file: Option<PathBuf>,
    /// To rotate: the key the store is encrypted with until now.
    pub previous_secrets_key_file: Option<PathBuf>,
    /// How long a request to either listener may take to arrive, headers and body each
    /// (default 10; read at start-up).
    pub request_timeout_secs: u64,
    /// Plain `http` to a public host for `base_url`, servers and OAuth endpoints (default false).
    pub allow_insecure_http: bool,
    /// A command and webhooks told of events (see `hooks`).
    pub hooks: crate::hooks::HookSettings,
    /// Where connections are stored (read at start-up): redb in the state directory unless
    /// `{"postgres": "postgresql://…"}` names a database.
    pub store: crate::stores::StoreSettings,
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
            web: None,
            login_messages: BTreeMap::new(),
            secrets_key_file: None,
            previous_secrets_key_file: None,
            request_timeout_secs: crate::serve::REQUEST_TIMEOUT.as_secs(),
            allow_insecure_http: false,
            hooks: crate::hooks::HookSettings::default(),
            store: crate::stores::StoreSettings::default(),
        }
    }
}

impl Settings {
    pub fn policy(&self) -> Policy {
        Policy {
            refresh_margin: TimeDelta::seconds(self.refresh_margin_secs as i64),
            backoff_base: TimeDelta::seconds(self.backoff_base_secs as i64),
            // At least daily: providers that revoke idle grants must see every grant used.
            validate_every: TimeDelta::seconds(self.validate_every_secs.clamp(1, 86_400) as i64),
        }
    }

    /// The effective rate limits of `provider`.
    pub fn limits(&self, provider: &str) -> Limits {
        let mut limits = providers::find(provider).map_or_else(Limits::default, |p| p.limits());
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

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }
}

/// A loaded, validated config.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub settings: Settings,
    /// Every profile of every provider this build connects.
    /// Equal settings are shared: a hundred thousand profiles that inherit one app from the
    /// base block hold one copy of it.
    pub profiles: BTreeMap<ConnKey, Arc<Profile>>,
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
            Ok(text) => Self::parse_file(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Io { path: path.to_owned(), source }),
        }
    }

    /// Only the `"authkeeper"` block of the file at `path`, for what is needed before the
    /// config is loaded (the socket's path, the secrets key files): every other block is
    /// skipped, not parsed, so this stays cheap with a hundred thousand profiles. `None` when
    /// the file is missing or that block does not read; the full load reports why.
    pub fn settings_only(path: &Path) -> Option<Settings> {
        #[derive(Deserialize)]
        struct Top {
            #[serde(default)]
            authkeeper: Settings,
        }
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str::<Top>(&text).ok().map(|t| t.authkeeper)
    }

    /// `text`, read from `path`: CrossWatch's encrypted values (`enc:v1:`) are decrypted first,
    /// with the key for that file.
    pub fn parse_file(path: &Path, text: &str) -> Result<Self, ConfigError> {
        if !crate::cw_crypt::uses_encryption(text) {
            return Self::parse(text);
        }
        let key = crate::cw_crypt::CwKey::find(path)?;
        Self::parse(&crate::cw_crypt::decrypt_text(text, key.as_ref())?)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let top: BTreeMap<String, &RawValue> = serde_json::from_str(text).map_err(|e| parse_error(&e, (1, 0)))?;
        let ours = |key: &str| key == "authkeeper" || providers::REGISTRY.iter().any(|p| p.manifest().block == key);
        crate::config_unique::check(text, &ours).map_err(|e| parse_error(&e, (1, 0)))?;
        let settings: Settings = match top.get("authkeeper") {
            Some(raw) => serde_json::from_str(raw.get()).map_err(|e| located(text, raw, &e))?,
            None => Settings::default(),
        };
        for name in settings.base_url.keys().chain(settings.rate_limits.keys()).chain(settings.login_messages.keys()) {
            if !LAYOUT_PROVIDERS.contains(&name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "authkeeper names an unknown provider {name:?} (known: {})",
                    LAYOUT_PROVIDERS.join(", ")
                )));
            }
        }
        for (name, expr) in &settings.schedules {
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
        if let Some(web) = &settings.web {
            web.check().map_err(ConfigError::Invalid)?;
        }
        settings.store.check().map_err(ConfigError::Invalid)?;
        // Gathered, then sorted once: in key order already when the file keeps each block's
        // instances in order, as it nearly always does, so that sorting only checks.
        let mut listed = Vec::new();
        let mut by_name = providers::REGISTRY.to_vec();
        by_name.sort_by_key(|p| p.manifest().name);
        for provider in by_name {
            let raw = top.get(provider.manifest().block).filter(|r| r.get() != "null");
            blocks::parse_block(text, raw.copied(), provider, &settings, &mut listed)?;
        }
        let profiles: BTreeMap<ConnKey, Arc<Profile>> = listed.into_iter().collect();
        crate::insecure::check_config(&settings, &profiles).map_err(ConfigError::Invalid)?;
        Ok(Self { settings, profiles })
    }

    pub fn profile(&self, key: &ConnKey) -> Option<&Arc<Profile>> {
        self.profiles.get(key)
    }

    /// The highest `PROVIDER-P##` number among `provider`'s profiles.
    pub fn highest_profile(&self, provider: &str) -> u64 {
        // The provider's keys sit together, from its name with an empty profile on.
        self.profiles
            .range(ConnKey::new(provider, "")..)
            .map(|(k, _)| k)
            .take_while(|k| k.provider == provider)
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

fn parse_error(e: &serde_json::Error, (line, column): (usize, usize)) -> ConfigError {
    let message = e.to_string().split(" at line ").next().unwrap_or_default().to_owned();
    // A position inside a nested value is relative to where that value starts in the file.
    let column = if e.line() == 1 { column + e.column() } else { e.column() };
    ConfigError::Parse { message, line: line + e.line() - 1, column }
}

/// `e`, raised while parsing `raw` (a slice of `text`), at its position in the whole file.
fn located(text: &str, raw: &RawValue, e: &serde_json::Error) -> ConfigError {
    let offset = (raw.get().as_ptr() as usize).saturating_sub(text.as_ptr() as usize).min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count());
    parse_error(e, (line, column))
}

/// Whether `id` can name one of the provider's profiles: `default`, `PROVIDER-P##`, a named
/// instance's id, or an owner's (`discord:123456`). Nothing else reaches the store or the file.
pub fn is_profile_id(m: &Manifest, id: &str) -> bool {
    (id == "default" && !m.named_profiles) || check_profile_id(m, id).is_ok() || authkeeper_state::is_owner_id(id)
}

/// Profile ids are `PROVIDER-P##` (`TRAKT-P01`), or for named instances `[a-z0-9_-]{1,64}`.
fn check_profile_id(m: &Manifest, id: &str) -> Result<(), ConfigError> {
    if m.named_profiles {
        let ok = (1..=64).contains(&id.len())
            && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        return match ok {
            true => Ok(()),
            false => Err(ConfigError::Invalid(format!(
                "{}.instances: {id:?} must be 1 to 64 lowercase letters, digits, '-' or '_'",
                m.block
            ))),
        };
    }
    // `TRAKT-P01`: the provider's name in capitals, `-P`, then two or more digits.
    let number = id.split_at_checked(m.name.len()).and_then(|(name, rest)| {
        let named = name.bytes().zip(m.name.bytes()).all(|(a, b)| a == b.to_ascii_uppercase());
        rest.strip_prefix("-P").filter(|_| named)
    });
    match number.is_some_and(|n| n.len() >= 2 && n.bytes().all(|b| b.is_ascii_digit())) {
        true => Ok(()),
        false => Err(ConfigError::Invalid(format!(
            "{}.instances: profile id {id:?} must look like {}-P01",
            m.block,
            m.name.to_ascii_uppercase()
        ))),
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
            .or_else(|| Config::settings_only(&config).and_then(|s| s.socket))
            .or_else(|| dirs::runtime_dir().map(|d| d.join("authkeeper").join("authkeeper.sock")))
            .unwrap_or_else(|| state_dir.join("authkeeper.sock"));
        Self { config, state_dir, socket }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::trakt::Block as TraktBlock;

    #[test]
    fn profiles_inherit_the_apps_settings_but_never_the_base_blocks_login() {
        let cfg = Config::parse(
            r#"{"trakt": {"client_id": "c", "client_secret": "s", "access_token": "base-tok",
                "refresh_token": "base-ref", "instances": {"TRAKT-P01": {}, "TRAKT-P02": {"access_token": "own"}}}}"#,
        )
        .unwrap();
        let block = |p: &str| cfg.profile(&ConnKey::new("trakt", p)).unwrap().typed::<TraktBlock>().clone();
        let token = |b: &TraktBlock| b.access_token.as_ref().map(|t| t.expose().to_owned());
        assert_eq!(token(&block("default")).as_deref(), Some("base-tok"));
        assert_eq!(token(&block("TRAKT-P01")), None, "an instance does not inherit the default's token");
        assert!(block("TRAKT-P01").refresh_token.is_none());
        assert_eq!(block("TRAKT-P01").client_id.as_deref(), Some("c"), "but does inherit the app");
        assert_eq!(token(&block("TRAKT-P02")).as_deref(), Some("own"));
        assert!(block("TRAKT-P02").refresh_token.is_none(), "nor a piece of the default's login");
    }

    #[test]
    fn a_profile_debug_shows_no_secret() {
        let text = r#"{"trakt": {"client_id": "c", "client_secret": "sec-123", "access_token": "tok-456",
            "refresh_token": "ref-789"}, "jellyfin": {"server": "http://j", "access_token": "jf-tok"},
            "plex": {"account_token": "plex-tok", "pms_token": "pms-tok"}}"#;
        let cfg = Config::parse(text).unwrap();
        let mut shown = format!("{cfg:?}");
        for p in cfg.profiles.values() {
            shown += &format!("{p:?}");
        }
        shown += &format!("{:?}", cfg.profile(&ConnKey::new("trakt", "default")).unwrap().typed::<TraktBlock>());
        for secret in ["sec-123", "tok-456", "ref-789", "jf-tok", "plex-tok", "pms-tok"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn profiles_deep_merge_nested_objects_and_share_equal_settings() {
        let cfg = Config::parse(
            r#"{"trakt": {"client_id": "c", "client_secret": "s", "extra": {"a": 1, "b": {"c": 2}},
                "instances": {"TRAKT-P01": {"extra": {"b": {"d": 3}}}, "TRAKT-P02": {}, "TRAKT-P03": {}}}}"#,
        )
        .unwrap();
        let p = |id: &str| cfg.profile(&ConnKey::new("trakt", id)).unwrap().clone();
        assert_eq!(p("TRAKT-P01").block["extra"], serde_json::json!({"a": 1, "b": {"c": 2, "d": 3}}));
        assert!(Arc::ptr_eq(&p("TRAKT-P02"), &p("default")) && Arc::ptr_eq(&p("TRAKT-P03"), &p("default")));
    }

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
        let trakt = |p: &str| cfg.profile(&ConnKey::new("trakt", p)).unwrap().typed::<TraktBlock>().clone();
        let p1 = trakt("TRAKT-P01");
        assert_eq!(p1.client_id.as_deref(), Some("cid-2"));
        assert_eq!(p1.client_secret.as_ref().map(|s| s.expose()), Some("sec"), "inherited from the base block");
        assert_eq!(trakt("default").client_id.as_deref(), Some("cid"));
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
