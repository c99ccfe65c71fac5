//! A provider's block of config.json: its base settings, its `default` profile and its
//! `instances`, each profile the base deep-merged with its own.

use super::{ConfigError, Settings, check_profile_id, located};
use crate::config_unique::{Entries, Key};
use crate::providers::{Profile, Provider};
use authkeeper_state::ConnKey;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// One provider's block: its `default` profile and every profile under `instances`, each the
/// base block deep-merged with its own. A key of the wrong type is an error at its position.
pub(super) fn parse_block(
    text: &str,
    raw: Option<&RawValue>,
    provider: &'static dyn Provider,
    settings: &Settings,
    profiles: &mut Vec<(ConnKey, Arc<Profile>)>,
) -> Result<(), ConfigError> {
    let m = provider.manifest();
    let base_url = settings.base_url.get(m.name).cloned();
    let allowed = settings.allow_insecure_http;
    let Some(raw) = raw else {
        if !m.named_profiles {
            let profile = Profile::new(provider, Map::new(), base_url)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?
                .allowing_insecure_http(allowed);
            profiles.push((ConnKey::new(m.name, "default"), Arc::new(profile)));
        }
        return Ok(());
    };
    // The instances are kept as text until each is looked at: most are `{}`, and a block of
    // 100,000 built as JSON values cost more than everything else in reading the file.
    let fields: BTreeMap<Key, &RawValue> = serde_json::from_str(raw.get()).map_err(|e| located(text, raw, &e))?;
    let mut base = Map::new();
    let mut instances = Vec::new();
    for (name, value) in fields {
        if name.0 != "instances" {
            base.insert(name.0.into_owned(), serde_json::from_str(value.get()).map_err(|e| located(text, value, &e))?);
        } else if value.get() != "null" {
            instances = serde_json::from_str::<Entries>(value.get())
                .map_err(|_| ConfigError::Invalid(format!("{}.instances must be an object", m.block)))?
                .0;
        }
    }
    let typed_error = |e: serde_json::Error| typed_error(text, raw, provider, e);
    let new = |block: Map<String, Value>| {
        Profile::new(provider, block, base_url.clone()).map(|p| Arc::new(p.allowing_insecure_http(allowed)))
    };
    let default = new(base.clone()).map_err(typed_error)?;
    // Added after the instances, where it sorts among them.
    let own_default = (!m.named_profiles).then(|| (ConnKey::new(m.name, "default"), default.clone()));
    let from = profiles.len();
    // A credential in the base block is the default profile's own: profiles inherit the app's
    // settings, never its login.
    let inherited = if m.credential_keys.iter().any(|k| base.contains_key(*k)) {
        base.retain(|k, _| !m.credential_keys.contains(&k.as_str()));
        new(base.clone()).map_err(typed_error)?
    } else {
        default.clone()
    };
    let mut last = inherited.clone();
    for (Key(id), own) in instances {
        check_profile_id(m, &id)?;
        let empty = own.get().strip_prefix('{').and_then(|o| o.strip_suffix('}')).is_some_and(|o| o.trim().is_empty());
        let own = match empty {
            true => Map::new(),
            false => match serde_json::from_str(own.get()).map_err(|e| located(text, own, &e))? {
                Value::Object(own) => own,
                _ => return Err(ConfigError::Invalid(format!("{}.instances.{id} must be an object", m.block))),
            },
        };
        let profile = if own.is_empty() {
            inherited.clone()
        } else {
            let mut block = base.clone();
            deep_merge(&mut block, own);
            if block != last.block {
                last = new(block).map_err(typed_error)?;
            }
            last.clone()
        };
        profiles.push((ConnKey::new(m.name, id), profile));
    }
    if let Some(own_default) = own_default {
        let at = from + profiles[from..].partition_point(|(k, _)| k.profile.as_str() < "default");
        profiles.insert(at, own_default);
    }
    Ok(())
}

/// Overlay `own` on `base`, recursing into objects both hold.
fn deep_merge(base: &mut Map<String, Value>, own: Map<String, Value>) {
    for (k, v) in own {
        match (base.get_mut(&k), v) {
            (Some(Value::Object(b)), Value::Object(o)) => deep_merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Find where a profile's settings have the wrong type: the base block, else the profile's own.
fn typed_error(text: &str, raw: &RawValue, provider: &dyn Provider, e: serde_json::Error) -> ConfigError {
    if let Err(found) = provider.check(raw.get()) {
        return located(text, raw, &found);
    }
    #[derive(serde::Deserialize)]
    struct Instances<'a> {
        #[serde(borrow, default)]
        instances: BTreeMap<String, &'a RawValue>,
    }
    if let Ok(block) = serde_json::from_str::<Instances>(raw.get()) {
        for own in block.instances.values() {
            if let Err(found) = provider.check(own.get()) {
                return located(text, own, &found);
            }
        }
    }
    ConfigError::Invalid(format!("{}: {e}", provider.manifest().block))
}
