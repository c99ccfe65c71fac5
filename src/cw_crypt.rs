//! CrossWatch's encrypted config values: a secret leaf may be `enc:v1:<Fernet token>`, under a
//! key from `CW_CONFIG_KEY` or `CROSSWATCH_CONFIG_KEY`, else `.cw_master_key` beside
//! `config.json`. A key that is 32 bytes of base64url is used as is; any other text becomes
//! one as base64url(SHA-256(text)). Such values are decrypted before the config is read, and
//! credentials written back to a file that uses them are encrypted the same way.

use crate::config::ConfigError;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// The prefix of an encrypted value.
pub const PREFIX: &str = "enc:v1:";
const ENV: [&str; 2] = ["CW_CONFIG_KEY", "CROSSWATCH_CONFIG_KEY"];
const KEY_FILE: &str = ".cw_master_key";

/// CrossWatch's key, and where it came from (never the key itself).
pub struct CwKey {
    fernet: fernet::Fernet,
    pub source: String,
}

impl std::fmt::Debug for CwKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CwKey(from {})", self.source)
    }
}

impl CwKey {
    /// A key from its text, as CrossWatch reads it.
    pub fn from_text(text: &str, source: impl Into<String>) -> Self {
        let text = text.trim();
        let raw = match URL_SAFE.decode(text) {
            Ok(bytes) if bytes.len() == 32 => text.to_owned(),
            _ => URL_SAFE.encode(Sha256::digest(text.as_bytes())),
        };
        let fernet = fernet::Fernet::new(&raw).expect("32 bytes of base64url are a Fernet key");
        Self { fernet, source: source.into() }
    }

    /// The key for the config at `config`, if one is set.
    pub fn find(config: &Path) -> Result<Option<Self>, ConfigError> {
        for name in ENV {
            if let Ok(text) = std::env::var(name)
                && !text.trim().is_empty()
            {
                return Ok(Some(Self::from_text(&text, name)));
            }
        }
        let file = config.parent().unwrap_or(Path::new(".")).join(KEY_FILE);
        match std::fs::read_to_string(&file) {
            Ok(text) => Ok(Some(Self::from_text(&text, file.display().to_string()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ConfigError::Io { path: file, source }),
        }
    }

    /// `plain`, encrypted as CrossWatch writes it.
    pub fn encrypt(&self, plain: &str) -> String {
        format!("{PREFIX}{}", self.fernet.encrypt(plain.as_bytes()))
    }

    fn decrypt(&self, value: &str) -> Option<String> {
        let token = value.strip_prefix(PREFIX)?;
        String::from_utf8(self.fernet.decrypt(token).ok()?).ok()
    }
}

/// Whether CrossWatch encrypts a leaf of this name.
pub fn is_secret_name(name: &str) -> bool {
    const NAMES: [&str; 14] = [
        "api_key",
        "apikey",
        "access_token",
        "refresh_token",
        "client_secret",
        "account_token",
        "pms_token",
        "home_pin",
        "session_id",
        "device_code",
        "request_token",
        "token",
        "password",
        "secret",
    ];
    NAMES.contains(&name) || (name.ends_with("_token") && !matches!(name, "token_endpoint" | "token_url"))
}

/// Whether `text` holds encrypted values.
pub fn uses_encryption(text: &str) -> bool {
    text.contains(PREFIX)
}

/// `text` with every encrypted value replaced by its plaintext, in place (lines and other
/// values stay where they were). An encrypted value without a key, or one the key does not
/// open, is an error naming where it is.
pub fn decrypt_text(text: &str, key: Option<&CwKey>) -> Result<String, ConfigError> {
    if !uses_encryption(text) {
        return Ok(text.to_owned());
    }
    // Parse errors are left to the config parser, which locates them.
    let Ok(root) = serde_json::from_str::<Value>(text) else { return Ok(text.to_owned()) };
    let mut plain = HashMap::new();
    collect(&root, &mut String::new(), key, &mut plain)?;
    let mut out = text.to_owned();
    for (cipher, clear) in plain {
        out = out.replace(&format!("\"{cipher}\""), &serde_json::to_string(&clear).expect("a string serializes"));
    }
    Ok(out)
}

fn collect(
    v: &Value,
    path: &mut String,
    key: Option<&CwKey>,
    out: &mut HashMap<String, String>,
) -> Result<(), ConfigError> {
    match v {
        Value::String(s) if s.starts_with(PREFIX) => {
            let Some(key) = key else {
                return Err(ConfigError::Invalid(format!(
                    "{path} is encrypted (enc:v1:) but no key was found: set CW_CONFIG_KEY or \
                     CROSSWATCH_CONFIG_KEY, or put CrossWatch's .cw_master_key beside the config"
                )));
            };
            let clear = key.decrypt(s).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "{path} is encrypted (enc:v1:) but the key from {} does not decrypt it: is it CrossWatch's key for this file?",
                    key.source
                ))
            })?;
            out.insert(s.clone(), clear);
        }
        Value::Object(map) => {
            for (k, child) in map {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                collect(child, path, key, out)?;
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                collect(child, path, key, out)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// The value to write for `name` in a file that uses encryption: `new` encrypted, or the
/// `current` ciphertext when it already holds `new` (CrossWatch keeps those).
pub fn seal_for_write(key: &CwKey, name: &str, current: Option<&str>, new: Value) -> Value {
    let Value::String(plain) = &new else { return new };
    if !is_secret_name(name) {
        return new;
    }
    match current {
        Some(c) if key.decrypt(c).as_deref() == Some(plain.as_str()) => Value::String(c.to_owned()),
        _ => Value::String(key.encrypt(plain)),
    }
}

/// `keys` to write into `profile` of `block` in `text` (see `config_edit::write_keys`), sealed
/// for a file that uses encryption.
pub fn seal_keys<'a>(
    text: &str,
    block: &str,
    profile: &str,
    keys: &[(&'a str, Option<Value>)],
    key: &CwKey,
) -> Vec<(&'a str, Option<Value>)> {
    let root: Value = serde_json::from_str(text).unwrap_or_default();
    let target = match profile {
        "default" => &root[block],
        p => &root[block]["instances"][p],
    };
    keys.iter()
        .map(|(name, value)| {
            let current = target.get(*name).and_then(Value::as_str);
            (*name, value.clone().map(|v| seal_for_write(key, name, current, v)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_decrypted_in_place_and_failures_name_the_leaf() {
        let key = CwKey::from_text("a passphrase", "test");
        let text = format!(
            "{{\n  \"trakt\": {{\"client_id\": \"id\",\n    \"client_secret\": \"{}\"}}\n}}",
            key.encrypt("s3cr\"et")
        );
        let plain = decrypt_text(&text, Some(&key)).unwrap();
        assert_eq!(plain, "{\n  \"trakt\": {\"client_id\": \"id\",\n    \"client_secret\": \"s3cr\\\"et\"}\n}");
        let e = decrypt_text(&text, None).unwrap_err().to_string();
        assert!(e.contains("trakt.client_secret") && e.contains("CW_CONFIG_KEY"), "{e}");
        let other = CwKey::from_text("another passphrase", "the other key");
        let e = decrypt_text(&text, Some(&other)).unwrap_err().to_string();
        assert!(e.contains("trakt.client_secret") && e.contains("the other key"), "{e}");
        assert!(!format!("{key:?}").contains("passphrase"));
    }

    #[test]
    fn secret_names_follow_crosswatch_and_unchanged_ciphertext_is_kept() {
        for name in ["access_token", "refresh_token", "plex_token", "api_key", "password"] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in ["token_endpoint", "token_url", "client_id", "expires_at", "server_url"] {
            assert!(!is_secret_name(name), "{name}");
        }
        let key = CwKey::from_text("k", "test");
        let current = key.encrypt("tok");
        assert_eq!(seal_for_write(&key, "access_token", Some(&current), "tok".into()), Value::String(current.clone()));
        let changed = seal_for_write(&key, "access_token", Some(&current), "tok2".into());
        assert_ne!(changed, Value::String(current));
        assert_eq!(key.decrypt(changed.as_str().unwrap()).as_deref(), Some("tok2"));
        assert_eq!(seal_for_write(&key, "expires_at", None, 5.into()), Value::from(5));
    }
}
