//! config.json: arbitrary bytes into the parser; when they parse, the daemon's own edits (a
//! credential written back into a profile, a profile added and removed) must give a file that
//! parses again, changes the edited profile's credential keys only, and leaves every other
//! profile as it was.

#![no_main]

use authkeeper::config::{Config, profile_number};
use authkeeper::config_edit::{EditError, add_profile, remove_profile, write_keys};
use authkeeper_state::{ConnKey, Grant, Store, StoreError};
use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

/// A credential with every extra some provider writes back.
fn grant() -> Grant {
    let at = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap();
    let secrets = ["server_token", "session_id", "api_key", "id_token", "pms_token"];
    let facts = [
        ("user_id", "u-1"),
        ("username", "fuzzer"),
        ("device_id", "d-1"),
        ("account_id", "42"),
        ("auth_mode", "token"),
    ];
    authkeeper_fuzz::grant_with_extras(at, at, &secrets, &facts)
}

/// Every profile, as comparable settings.
fn profiles(config: &Config) -> BTreeMap<ConnKey, (serde_json::Map<String, serde_json::Value>, Option<String>)> {
    config.profiles.iter().map(|(k, p)| (k.clone(), (p.block.clone(), p.base_url.clone()))).collect()
}

/// An edit of a file that parses may refuse (a block that is not an object), never fail otherwise.
fn edited(result: Result<String, EditError>) -> Option<String> {
    match result {
        Ok(text) => Some(text),
        Err(EditError::NotAnObject(_)) => None,
        // Known and left: serde_json reads a lone surrogate escape (`"\\uDDDD"`), the editor's
        // parser refuses it, so such a file is read but not edited (the edit says why).
        Err(EditError::Parse(m)) if m.contains("surrogate") => None,
        Err(e) => panic!("an edit of a config that parses failed: {e}"),
    }
}

fn write_back(text: &str, config: &Config, key: &ConnKey, credential: Option<&Grant>) {
    let profile = &config.profiles[key];
    let (provider, block) = (profile.provider, profile.provider.manifest().block);
    let keys = provider.export(credential);
    let Some(written) = edited(write_keys(text, block, &key.profile, &keys)) else { return };
    let again = Config::parse(&written).unwrap_or_else(|e| panic!("the written config does not parse: {e}\n{written}"));
    let (before, mut after) = (profiles(config), profiles(&again));
    let (own, _) = after.remove(key).expect("the written profile is still declared");
    for (name, value) in &keys {
        assert_eq!(own.get(*name), value.as_ref(), "{key}: {name} is not what was written\n{written}");
    }
    let mut unchanged = before[key].0.clone();
    unchanged.retain(|k, _| !keys.iter().any(|(name, _)| name == k));
    let mut kept = own.clone();
    kept.retain(|k, _| !keys.iter().any(|(name, _)| name == k));
    assert_eq!(kept, unchanged, "{key}: settings besides the credential changed\n{written}");
    let mut others = before;
    others.remove(key);
    assert_eq!(after, others, "writing {key} changed other profiles\n{written}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::parse(text) else { return };
    let Some(key) = config.profiles.keys().nth(data.len() % config.profiles.len().max(1)).cloned() else { return };
    write_back(text, &config, &key, Some(&grant()));
    write_back(text, &config, &key, None);

    // A profile added, then removed: the file declares the one more profile, then the same ones.
    let provider = config.profiles[&key].provider;
    let m = provider.manifest();
    if m.named_profiles {
        return;
    }
    // Numbered as the daemon numbers it: by the store, above every number the config holds.
    let store = Store::in_memory().expect("an in-memory store");
    let number = match store.allocate_profile(m.name, config.highest_profile(m.name)) {
        Ok(number) => number,
        Err(StoreError::NoProfileNumber(_)) => return,
        Err(e) => panic!("allocating a profile number: {e}"),
    };
    let id = format!("{}-P{number:02}", m.name.to_ascii_uppercase());
    let Some(added) = edited(add_profile(text, m.block, &id)) else { return };
    let with =
        Config::parse(&added).unwrap_or_else(|e| panic!("the config with {id} added does not parse: {e}\n{added}"));
    let mut expected: Vec<ConnKey> = config.profiles.keys().cloned().collect();
    expected.push(ConnKey::new(m.name, &id));
    expected.sort();
    assert_eq!(with.profiles.keys().cloned().collect::<Vec<_>>(), expected, "adding {id}\n{added}");
    assert_eq!(profile_number(&id), Some(with.highest_profile(m.name)));
    let removed = remove_profile(&added, m.block, &id).unwrap_or_else(|e| panic!("removing {id}: {e}\n{added}"));
    let without = Config::parse(&removed)
        .unwrap_or_else(|e| panic!("the config with {id} removed does not parse: {e}\n{removed}"));
    assert_eq!(profiles(&without), profiles(&config), "adding and removing {id} changed the profiles\n{removed}");
});
