//! The config file as the daemon first meets it: read once its connections are loaded, then
//! watched. Its size and modification time from just before the read are compared once the
//! watch is on, so that an edit made in between is not missed.

use super::DEBOUNCE;
use crate::config::{Config, ConfigError};
use notify_debouncer_mini::notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
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
