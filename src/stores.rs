//! Which store a daemon uses, and `authkeeper store copy`.
//!
//! redb in the state directory unless a PostgreSQL URL is given: `--store URL` (or
//! `AUTHKEEPER_STORE`) first, then `"authkeeper": {"store": {"postgres": URL}}` in the config.
//! A URL's password is never shown: not in `Debug`, logs or errors.

use authkeeper_pgstore::PgStore;
use authkeeper_state::dump::Dump;
use authkeeper_state::{ConnectionStore, Sealer, Store, StoreError};
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A PostgreSQL connection URL; shown with its password hidden.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct PgUrl(String);

impl PgUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// A URL given on the command line: it must be a postgresql:// one.
    pub fn parse(url: &str) -> Result<Self, String> {
        match is_postgres(url) {
            true => Ok(Self::new(url)),
            false => Err("not a postgresql:// URL".into()),
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", authkeeper_pgstore::redacted(&self.0))
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&authkeeper_pgstore::redacted(&self.0))
    }
}

/// A store named on the command line: `redb:PATH` or a PostgreSQL URL (shown without its
/// password).
#[derive(Clone, PartialEq)]
pub struct StoreSpec(String);

impl StoreSpec {
    pub fn parse(spec: &str) -> Result<Self, String> {
        Side::parse(spec).map(|_| Self(spec.to_owned())).map_err(|e| e.to_string())
    }
}

impl fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Side::parse(&self.0) {
            Ok(side) => write!(f, "{:?}", side.name()),
            Err(_) => f.write_str("(not a store)"),
        }
    }
}

/// `"authkeeper": {"store": …}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// `postgresql://user@host/db` (libpq's URL form; `?sslmode=require` for TLS).
    pub postgres: Option<PgUrl>,
    /// How long a daemon sharing the PostgreSQL store stays a member without renewing: a
    /// daemon that dies is replaced by the others this long after its last renewal (3..=300,
    /// default 15).
    pub lease_secs: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self { postgres: None, lease_secs: 15 }
    }
}

impl StoreSettings {
    /// Why the block is unusable, if it is.
    pub fn check(&self) -> Result<(), String> {
        if !(3..=300).contains(&self.lease_secs) {
            return Err(format!("authkeeper.store.lease_secs: {} is not between 3 and 300", self.lease_secs));
        }
        match &self.postgres {
            Some(url) if !is_postgres(url.expose()) => {
                Err(format!("authkeeper.store.postgres: {url} is not a postgresql:// URL"))
            }
            _ => Ok(()),
        }
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgresql://") || url.starts_with("postgres://")
}

#[derive(Debug, thiserror::Error)]
pub enum StoresError {
    #[error(
        "{config} cannot be read, and it mentions PostgreSQL: not guessing which store to use; fix it, or give --store"
    )]
    UnreadableConfig { config: String },
    #[error("cannot open the PostgreSQL store {url}: {source}")]
    Postgres { url: String, source: StoreError },
    #[error("{0:?} is neither redb:PATH nor a postgresql:// URL")]
    Spec(String),
    #[error("{0} does not exist: nothing to copy")]
    NoSource(String),
    #[error("{0} already exists: copying into it could lose what it holds; give a new path")]
    TargetExists(String),
    #[error("cannot open {what}: {source}")]
    Open { what: String, source: StoreError },
    #[error("cannot read {what}: {source}")]
    Export { what: String, source: StoreError },
    #[error("cannot write {what}: {source}")]
    Import { what: String, source: StoreError },
    #[error("{what} does not read back as what was copied: it is left for you to inspect")]
    Mismatch { what: String },
}

/// The PostgreSQL store a daemon is told to use, if any: `given` (`--store`), else the
/// config's; with the config's lease. `settings` is the authkeeper block of the config at
/// `config`, when it could be read.
pub fn configured(
    given: Option<&str>,
    config: &Path,
    settings: Option<&crate::config::Settings>,
) -> Result<Option<StoreSettings>, StoresError> {
    if let Some(url) = given {
        let lease_secs = settings.map_or(StoreSettings::default().lease_secs, |s| s.store.lease_secs);
        return Ok(Some(StoreSettings { postgres: Some(PgUrl::new(url)), lease_secs }));
    }
    if let Some(settings) = settings {
        return Ok(settings.store.postgres.is_some().then(|| settings.store.clone()));
    }
    // A config that exists but does not read: the store it names is unknown. Starting on redb
    // beside daemons that share PostgreSQL would refresh their tokens from a second copy.
    match std::fs::read_to_string(config) {
        Ok(text) if text.contains("postgres") => {
            Err(StoresError::UnreadableConfig { config: config.display().to_string() })
        }
        _ => Ok(None),
    }
}

/// Open the PostgreSQL store of `settings` for a daemon, and join the daemons that share it.
pub fn open_postgres(
    settings: &StoreSettings,
    sealer: Option<Sealer>,
) -> Result<(Arc<dyn ConnectionStore>, Arc<crate::daemon::Leases>), StoresError> {
    let url = settings.postgres.as_ref().expect("a PostgreSQL store");
    let postgres = |source| StoresError::Postgres { url: url.to_string(), source };
    let store = PgStore::open(url.expose(), sealer).map_err(postgres)?;
    store.claim_shared().map_err(postgres)?;
    let lease = std::time::Duration::from_secs(settings.lease_secs);
    let leases = crate::daemon::Leases::join(store.clone(), lease).map_err(postgres)?;
    Ok((Arc::new(store), leases))
}

/// One side of a copy.
enum Side {
    Redb(PathBuf),
    Postgres(PgUrl),
}

impl Side {
    fn parse(spec: &str) -> Result<Self, StoresError> {
        match spec.strip_prefix("redb:") {
            Some(path) if !path.is_empty() => Ok(Side::Redb(PathBuf::from(path))),
            _ if is_postgres(spec) => Ok(Side::Postgres(PgUrl::new(spec))),
            _ => Err(StoresError::Spec(spec.to_owned())),
        }
    }

    fn name(&self) -> String {
        match self {
            Side::Redb(path) => format!("redb:{}", path.display()),
            Side::Postgres(url) => url.to_string(),
        }
    }

    /// Open the store as it is (no key needed: rows move as stored), claimed so that no daemon
    /// uses it meanwhile.
    fn open(&self, source: bool) -> Result<Box<dyn ConnectionStore>, StoresError> {
        let open = |e| StoresError::Open { what: self.name(), source: e };
        match self {
            Side::Redb(path) if source && !path.exists() => Err(StoresError::NoSource(self.name())),
            Side::Redb(path) if !source && path.exists() => Err(StoresError::TargetExists(self.name())),
            // redb's file lock keeps a daemon out.
            Side::Redb(path) => Ok(Box::new(Store::open_as_is(path).map_err(open)?)),
            // Daemons hold the claim shared: a copy waits for none of them.
            Side::Postgres(url) => {
                let store = PgStore::open_as_is(url.expose()).map_err(open)?;
                store.claim().map_err(open)?;
                Ok(Box::new(store))
            }
        }
    }
}

/// What a copy moved.
pub struct Copied {
    pub from: String,
    pub to: String,
    pub dump: Dump,
}

/// Copy everything from one store to another, which must be new (redb) or empty
/// (PostgreSQL), then read the target back and compare. `progress` is told of each stage.
pub fn copy(from: &StoreSpec, to: &StoreSpec, mut progress: impl FnMut(&str)) -> Result<Copied, StoresError> {
    let (from, to) = (Side::parse(&from.0)?, Side::parse(&to.0)?);
    let source = from.open(true)?;
    progress(&format!("reading {}", from.name()));
    let dump = source.export().map_err(|source| StoresError::Export { what: from.name(), source })?;
    progress(&format!(
        "read {} connections, {} pending flows, {} history rows, {} rows in all",
        dump.table("connections").len(),
        dump.table("flows").len(),
        dump.history.len(),
        dump.rows()
    ));
    let target = to.open(false)?;
    progress(&format!("writing {}", to.name()));
    if let Err(source) = target.import(&dump) {
        drop(target);
        // The redb file this command made (it did not exist): nothing was written into it.
        if let Side::Redb(path) = &to {
            let _ = std::fs::remove_file(path);
        }
        return Err(StoresError::Import { what: to.name(), source });
    }
    progress("reading it back");
    let back = target.export().map_err(|source| StoresError::Export { what: to.name(), source })?;
    if back != dump {
        return Err(StoresError::Mismatch { what: to.name() });
    }
    Ok(Copied { from: from.name(), to: to.name(), dump })
}
