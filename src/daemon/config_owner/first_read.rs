//! The config file as the daemon first meets it: read once its connections are loaded, then
//! watched. Its size and modification time from just before the read are compared once the
//! watch is on, so that an edit made in between is not missed.

use super::DEBOUNCE;
use crate::config::{Config, ConfigError};
use crate::providers::Profile;
use authkeeper_state::{ConnKey, Machine, Stored};
use notify_debouncer_mini::notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::error;

/// What reading the file gave.
pub enum Read {
    Good(Box<Config>, String),
    Missing,
    Bad(ConfigError, Option<String>),
}

pub fn read(path: &Path) -> Read {
    match std::fs::read_to_string(path) {
        Ok(text) => match Config::parse_file(path, &text) {
            Ok(config) => Read::Good(Box::new(config), text),
            Err(e) => Read::Bad(e, Some(text)),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Read::Missing,
        Err(source) => Read::Bad(ConfigError::Io { path: path.to_owned(), source }, None),
    }
}

impl Read {
    /// The timeout of provider calls under this read: the file's, or the default when it
    /// does not load (the settings stored from the last good config hold no timeout).
    pub fn http_timeout(&self) -> std::time::Duration {
        match self {
            Read::Good(config, _) => config.settings.http_timeout(),
            _ => crate::config::Settings::default().http_timeout(),
        }
    }
}

/// The file's modification time and size, to tell whether it changed (`None`: unreadable).
pub type Stamp = Option<(std::time::SystemTime, u64)>;

pub fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())))
}

/// The watch on the config's directory: `changes` gets a `()` after each burst of events that
/// name the file. Without a watcher (the error is logged) edits take a restart.
pub struct Watch {
    _watcher: Option<Debouncer<RecommendedWatcher>>,
    pub changes: mpsc::UnboundedReceiver<()>,
}

pub fn watch(path: &Path) -> Watch {
    let (tx, changes) = mpsc::unbounded_channel();
    let name = path.file_name().map(|n| n.to_owned());
    let watcher = new_debouncer(DEBOUNCE, move |res: DebounceEventResult| {
        if let Ok(events) = res
            && events.iter().any(|e| e.path.file_name() == name.as_deref())
        {
            let _ = tx.send(());
        }
    });
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
    let watcher = match watcher {
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
    Watch { _watcher: watcher, changes }
}

/// Machines to add, each with its key.
pub(super) type Machines = Vec<Stored>;

/// Each of `machines`' declared profile, found by walking them and `profiles` together in key
/// order (the store's order; machines in another are sorted first), then a new machine for
/// each declared profile that has none, with its profile.
pub(super) fn declared_profiles(
    machines: &mut Machines,
    profiles: &BTreeMap<ConnKey, Arc<Profile>>,
    now: chrono::DateTime<chrono::Utc>,
) -> (Vec<Option<Arc<Profile>>>, Machines) {
    if let Some(found) = walk(machines, profiles, now) {
        return found;
    }
    machines.sort_by(|a, b| a.key.cmp(&b.key));
    walk(machines, profiles, now).expect("sorted")
}

/// [`declared_profiles`], or `None` if `machines` are not in key order.
fn walk(
    machines: &Machines,
    profiles: &BTreeMap<ConnKey, Arc<Profile>>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<(Vec<Option<Arc<Profile>>>, Machines)> {
    let mut declared = Vec::with_capacity(machines.len().max(profiles.len()));
    let mut new = Vec::new();
    let mut profiles = profiles.iter().peekable();
    let mut last: Option<&ConnKey> = None;
    for Stored { key, .. } in machines {
        if last.is_some_and(|last| last > key) {
            return None;
        }
        last = Some(key);
        // One comparison a step: the keys sit in different places in memory.
        let mut found = None;
        while let Some((k, p)) = profiles.peek() {
            match (*k).cmp(key) {
                std::cmp::Ordering::Less => new.push((made(k, now), (*p).clone())),
                std::cmp::Ordering::Equal => found = Some((*p).clone()),
                std::cmp::Ordering::Greater => break,
            }
            profiles.next();
            if found.is_some() {
                break;
            }
        }
        declared.push(found);
    }
    new.extend(profiles.map(|(k, p)| (made(k, now), p.clone())));
    let (new, new_declared): (Machines, Vec<_>) = new.into_iter().unzip();
    declared.extend(new_declared.into_iter().map(Some));
    Some((declared, new))
}

/// A new machine for a declared profile that has none.
fn made(key: &ConnKey, now: chrono::DateTime<chrono::Utc>) -> Stored {
    Stored { key: key.clone(), machine: Arc::new(Machine::new(key.clone(), now)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn each_machine_gets_its_declared_profile_and_a_declared_one_without_a_machine_is_made() {
        let cfg = Config::parse(
            r#"{"trakt": {"client_id": "c", "client_secret": "s", "instances":
                {"TRAKT-P01": {}, "TRAKT-P03": {"client_id": "d"}}}}"#,
        )
        .unwrap();
        let now = chrono::Utc::now();
        let key = |p: &str| ConnKey::new("trakt", p);
        // Out of key order, as a store sorting its keys as text could give them.
        let mut machines = vec![made(&key("TRAKT-P02"), now), made(&key("TRAKT-P01"), now)];
        let (declared, new) = declared_profiles(&mut machines, &cfg.profiles, now);
        machines.extend(new);
        let got: Vec<_> = machines
            .iter()
            .zip(&declared)
            .filter(|(m, _)| m.key.provider == "trakt" && m.machine.key() == &m.key)
            .map(|(m, p)| (m.key.profile.to_string(), p.as_ref().map(|p| p.block["client_id"].clone())))
            .collect();
        let d = |s: &str| Some(serde_json::json!(s));
        assert_eq!(
            got,
            [
                ("TRAKT-P01".into(), d("c")),
                ("TRAKT-P02".into(), None),
                ("TRAKT-P03".into(), d("d")),
                ("default".into(), d("c")),
            ]
        );
        assert_eq!(machines.len(), declared.len());
    }
}
