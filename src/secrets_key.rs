//! Where the key that seals the store's secrets comes from: a file (`--secrets-key-file`, or
//! `authkeeper.secrets_key_file` in the config), the environment (`AUTHKEEPER_SECRETS_KEY`), or
//! a systemd credential (`secrets_key` in `$CREDENTIALS_DIRECTORY`), in that order; the
//! previous key, when rotating, the same way.

use authkeeper_state::{Sealer, SecretsKey};
use clap::Args;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const CREDENTIAL: &str = "secrets_key";
const PREVIOUS_CREDENTIAL: &str = "previous_secrets_key";

#[derive(Args, Debug, Clone, Default)]
pub struct KeyArgs {
    /// Encrypt the secrets in the store with the key in FILE (make one with `authkeeper keygen`).
    /// Also: AUTHKEEPER_SECRETS_KEY holding the key itself, or the systemd credential
    /// secrets_key. Without a key, secrets are stored in the clear (the file is 0600)
    #[arg(long, env = "AUTHKEEPER_SECRETS_KEY_FILE", value_name = "FILE")]
    pub secrets_key_file: Option<PathBuf>,
    /// To rotate: the key the store is encrypted with now (FILE; or AUTHKEEPER_PREVIOUS_SECRETS_KEY,
    /// or the credential previous_secrets_key). The store is re-encrypted with the new
    /// key at start-up
    #[arg(long, env = "AUTHKEEPER_PREVIOUS_SECRETS_KEY_FILE", value_name = "FILE")]
    pub previous_secrets_key_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read the secrets key {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the secrets key {origin}: {source}")]
    Malformed { origin: String, source: authkeeper_state::seal::KeyError },
    #[error("a previous secrets key was given without a new one to rotate to")]
    PreviousOnly,
    #[error("{path} already exists: not overwriting a key (it may be the only copy)")]
    Exists { path: String },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

impl KeyArgs {
    /// The sealer the daemon's store uses, if a key was given anywhere: these options (or
    /// their environment variables) first, then `authkeeper.secrets_key_file` and
    /// `previous_secrets_key_file` in the config at `config` (paths relative to its directory),
    /// then `AUTHKEEPER_SECRETS_KEY`, then the systemd credential. `settings` is that config's
    /// `authkeeper` block, read once by the caller.
    pub fn sealer(&self, config: &Path, settings: &crate::config::Settings) -> Result<Option<Sealer>, KeyFileError> {
        let dir = config.parent().unwrap_or(Path::new("."));
        let file = |given: &Option<PathBuf>, configured: Option<PathBuf>| {
            given.clone().or_else(|| configured.map(|p| dir.join(p)))
        };
        let current = file(&self.secrets_key_file, settings.secrets_key_file.clone());
        let previous = file(&self.previous_secrets_key_file, settings.previous_secrets_key_file.clone());
        let current = find(current.as_deref(), "AUTHKEEPER_SECRETS_KEY", CREDENTIAL)?;
        let previous = find(previous.as_deref(), "AUTHKEEPER_PREVIOUS_SECRETS_KEY", PREVIOUS_CREDENTIAL)?;
        match (current, previous) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(KeyFileError::PreviousOnly),
            (Some(current), previous) => Ok(Some(Sealer { current, previous: previous.into_iter().collect() })),
        }
    }
}

fn find(file: Option<&Path>, env: &str, credential: &str) -> Result<Option<SecretsKey>, KeyFileError> {
    if let Some(path) = file {
        return read(path).map(Some);
    }
    if let Ok(text) = std::env::var(env) {
        return SecretsKey::parse(&text)
            .map(Some)
            .map_err(|source| KeyFileError::Malformed { origin: format!("in {env}"), source });
    }
    match std::env::var_os("CREDENTIALS_DIRECTORY").map(|d| PathBuf::from(d).join(credential)) {
        Some(path) if path.exists() => read(&path).map(Some),
        _ => Ok(None),
    }
}

fn read(path: &Path) -> Result<SecretsKey, KeyFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read { path: shown.clone(), source })?;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %shown, mode = format!("{:o}", meta.permissions().mode() & 0o777), "the secrets key file can be read by others: chmod 600 it");
    }
    SecretsKey::parse(&text).map_err(|source| KeyFileError::Malformed { origin: format!("in {shown}"), source })
}

/// `authkeeper keygen`: a new key, written to `out` (created 0600, never over an existing
/// file) or printed. Returns the key's id.
pub fn keygen(out: Option<&Path>) -> Result<String, KeyFileError> {
    let key = SecretsKey::generate();
    match out {
        None => println!("{}", key.to_text()),
        Some(path) => {
            let shown = path.display().to_string();
            let mut file =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|source| {
                    match source.kind() {
                        std::io::ErrorKind::AlreadyExists => KeyFileError::Exists { path: shown.clone() },
                        _ => KeyFileError::Write { path: shown.clone(), source },
                    }
                })?;
            writeln!(file, "{}", key.to_text())
                .and_then(|()| file.sync_all())
                .map_err(|source| KeyFileError::Write { path: shown, source })?;
        }
    }
    Ok(key.id_hex())
}
