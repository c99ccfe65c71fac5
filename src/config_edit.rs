//! Edits to config.json that touch only the edited block: every other byte of the file
//! (unknown sections, formatting, key order) stays as the user wrote it. Writes are atomic
//! (temp file, fsync, rename) and keep the file's mode.

use jsonc_parser::ParseOptions;
use jsonc_parser::cst::{CstInputValue, CstObject, CstRootNode};
use jsonc_parser::json;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("config.json does not parse: {0}")]
    Parse(String),
    #[error("{0} in config.json is not an object")]
    NotAnObject(String),
    #[error("{0} has no profile {1} in config.json")]
    NoSuchProfile(String, String),
    #[error("refusing to write tokens into {0}: group or others can read it (mode {1:o}); run `chmod 600` on it first")]
    Readable(String, u32),
    #[error("cannot write {0}: {1}")]
    Io(String, std::io::Error),
    #[error(
        "{0} is being edited by another process (its lock was held for more than {1} s); nothing was changed: try again"
    )]
    Locked(String, u64),
}

fn parse(text: &str) -> Result<CstRootNode, EditError> {
    let text = if text.trim().is_empty() { "{}\n" } else { text };
    CstRootNode::parse(text, &ParseOptions::default()).map_err(|e| EditError::Parse(e.to_string()))
}

fn object(parent: &CstObject, name: &str, path: &str) -> Result<CstObject, EditError> {
    parent.object_value_or_create(name).ok_or_else(|| EditError::NotAnObject(path.to_owned()))
}

/// Add `"instances": {"<id>": {}}` under `provider`'s block.
pub fn add_profile(text: &str, provider: &str, id: &str) -> Result<String, EditError> {
    let root = parse(text)?;
    let block = object(&root.object_value_or_set(), provider, provider)?;
    let instances = object(&block, "instances", &format!("{provider}.instances"))?;
    instances.append(id, json!({}));
    Ok(root.to_string())
}

/// Remove `provider.instances.<id>`.
pub fn remove_profile(text: &str, provider: &str, id: &str) -> Result<String, EditError> {
    let root = parse(text)?;
    let prop = root
        .object_value()
        .and_then(|o| o.object_value(provider))
        .and_then(|b| b.object_value("instances"))
        .and_then(|i| i.get(id))
        .ok_or_else(|| EditError::NoSuchProfile(provider.to_owned(), id.to_owned()))?;
    prop.remove();
    Ok(root.to_string())
}

/// Write `keys` into the block of `profile` under the provider block `block` (the base block
/// for `default`, else its instance): each key is set to its value, or removed for `None`.
pub fn write_keys(
    text: &str,
    block: &str,
    profile: &str,
    keys: &[(&str, Option<serde_json::Value>)],
) -> Result<String, EditError> {
    let root = parse(text)?;
    let mut target = object(&root.object_value_or_set(), block, block)?;
    if profile != "default" {
        let instances = object(&target, "instances", &format!("{block}.instances"))?;
        target = object(&instances, profile, &format!("{block}.instances.{profile}"))?;
    }
    for (name, value) in keys {
        match (target.get(name), value.clone().map(cst)) {
            (Some(prop), Some(v)) => prop.set_value(v),
            (None, Some(v)) => {
                target.append(name, v);
            }
            (Some(prop), None) => prop.remove(),
            (None, None) => {}
        }
    }
    Ok(root.to_string())
}

fn cst(v: serde_json::Value) -> CstInputValue {
    use serde_json::Value;
    match v {
        Value::Null => CstInputValue::Null,
        Value::Bool(b) => CstInputValue::Bool(b),
        Value::Number(n) => CstInputValue::Number(n.to_string()),
        Value::String(s) => CstInputValue::String(s),
        Value::Array(a) => CstInputValue::Array(a.into_iter().map(cst).collect()),
        Value::Object(o) => CstInputValue::Object(o.into_iter().map(|(k, v)| (k, cst(v))).collect()),
    }
}

/// An exclusive lock on a config file's directory, held from reading the file to writing it
/// back: daemons sharing one config file take turns at editing it, so that no edit is written
/// over another that the editor never read.
pub struct EditLock {
    _held: std::fs::File,
}

/// Take the lock of `path`'s directory, waiting at most `patience` for another holder to let
/// go. It is tried every 10 ms rather than waited on, so no thread is held while another
/// process (a daemon stopped with `SIGSTOP`, a script) keeps it.
pub async fn lock(path: &Path, patience: std::time::Duration) -> Result<EditLock, EditError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let io = |e| EditError::Io(dir.display().to_string(), e);
    let file = std::fs::File::open(dir).map_err(io)?;
    let give_up = tokio::time::Instant::now() + patience;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(EditLock { _held: file }),
            Err(std::fs::TryLockError::WouldBlock) if tokio::time::Instant::now() < give_up => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(EditError::Locked(path.display().to_string(), patience.as_secs()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
    }
}

/// Replace `path` with `text` atomically. An existing file keeps its mode; a new one is 0600.
/// With `secret`, refuse when group or others could read the result.
pub fn write_atomically(path: &Path, text: &str, secret: bool) -> Result<(), EditError> {
    let shown = path.display().to_string();
    let io = |e| EditError::Io(shown.clone(), e);
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0o600,
        Err(e) => return Err(io(e)),
    };
    if secret && mode & 0o077 != 0 {
        return Err(EditError::Readable(shown, mode));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".authkeeper-").tempfile_in(dir).map_err(io)?;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io)?;
    tmp.write_all(text.as_bytes()).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"{
  "pairs": [ {"source": "plex", "target": "trakt", "mode": "two-way"} ],
  "trakt": {
    "client_id": "cid",
    "client_secret": "sec"
  },
  "sync": {"interval": 3600}
}
"#;

    #[test]
    fn adding_profiles_touches_only_the_providers_block() {
        let once = add_profile(FILE, "trakt", "TRAKT-P01").unwrap();
        let twice = add_profile(&once, "trakt", "TRAKT-P02").unwrap();
        let v: serde_json::Value = serde_json::from_str(&twice).unwrap();
        assert!(v["trakt"]["instances"]["TRAKT-P01"].is_object());
        assert!(v["trakt"]["instances"]["TRAKT-P02"].is_object());
        assert_eq!(v["trakt"]["client_id"], "cid");
        // Everything before the trakt block's end and after it is byte-for-byte the same.
        let head = &FILE[..FILE.find("\"client_secret\": \"sec\"").unwrap()];
        let tail = &FILE[FILE.find("  \"sync\"").unwrap()..];
        assert!(twice.starts_with(head), "{twice}");
        assert!(twice.ends_with(tail), "{twice}");
        let back = remove_profile(&twice, "trakt", "TRAKT-P01").unwrap();
        let v: serde_json::Value = serde_json::from_str(&back).unwrap();
        assert!(v["trakt"]["instances"].get("TRAKT-P01").is_none());
        assert!(matches!(remove_profile(&back, "trakt", "TRAKT-P09"), Err(EditError::NoSuchProfile(..))));
    }

    #[test]
    fn credentials_are_written_where_crosswatch_reads_them_and_removed_on_disconnect() {
        let keys = [
            ("access_token", Some("at-1".into())),
            ("refresh_token", Some("rt-1".into())),
            ("expires_at", Some(1_900_000_000.into())),
        ];
        let added = add_profile(FILE, "trakt", "TRAKT-P01").unwrap();
        let text = write_keys(&added, "trakt", "TRAKT-P01", &keys).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let block = &v["trakt"]["instances"]["TRAKT-P01"];
        assert_eq!(block["access_token"], "at-1");
        assert_eq!(block["refresh_token"], "rt-1");
        assert_eq!(block["expires_at"], 1_900_000_000);
        assert!(v["trakt"].get("access_token").is_none(), "the base block is untouched");
        let none: Vec<_> = keys.iter().map(|(k, _)| (*k, None)).collect();
        let cleared = write_keys(&text, "trakt", "TRAKT-P01", &none).unwrap();
        let v: serde_json::Value = serde_json::from_str(&cleared).unwrap();
        assert!(v["trakt"]["instances"]["TRAKT-P01"].get("access_token").is_none());
        assert!(text.contains("\"sync\": {\"interval\": 3600}"));
    }

    /// Found by the `config` fuzz target: with the trakt block named twice, the editor wrote
    /// into the first and the parser read the last, so a written-back credential was not where
    /// the next read looked. Such a file is now refused, with the duplicate's position.
    #[test]
    fn a_block_named_twice_is_refused_rather_than_edited_where_the_daemon_does_not_read() {
        let twice = "{\"trakt\": {\"client_id\": \"a\"},\n \"trakt\": {\"instances\": {\"TRAKT-P01\": {}}}}";
        let written = write_keys(twice, "trakt", "TRAKT-P01", &[("access_token", Some("at-1".into()))]).unwrap();
        let read: serde_json::Value = serde_json::from_str(&written).unwrap();
        assert!(read["trakt"]["instances"]["TRAKT-P01"].get("access_token").is_none(), "the last block wins a read");
        let refused = crate::config::Config::parse(twice).unwrap_err();
        assert_eq!(refused.position().map(|p| p.0), Some(2), "{refused}");
        assert!(refused.to_string().contains("\"trakt\" appears twice"), "{refused}");
    }

    #[test]
    fn atomic_writes_keep_the_mode_and_refuse_readable_files_for_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        write_atomically(&path, "{}\n", true).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "new files are 0600");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(write_atomically(&path, "{\"x\":1}\n", true), Err(EditError::Readable(_, 0o640))));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n", "nothing was written");
        write_atomically(&path, "{\"x\":1}\n", false).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640, "the mode is kept");
    }
}
