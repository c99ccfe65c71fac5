//! Secrets at rest through the daemon: `authkeeper keygen`, a store whose file holds none of
//! the tokens the provider issued, refusal without the key or with another (nothing lost),
//! and rotation to a new key.

mod common;

use authkeeper::wire::ConnectionView;
use authkeeper_state::StateName;
use common::*;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;

/// Every secret the emulator issued (and the app's secret) that the store file shows in clear.
fn in_clear(h: &Harness) -> Vec<String> {
    let bytes = std::fs::read(h.state_dir().join("authkeeper.redb")).unwrap();
    let mut secrets = h.emulator.issued_tokens();
    secrets.push("emulator-client-secret".into());
    secrets.into_iter().filter(|s| bytes.windows(s.len()).any(|w| w == s.as_bytes())).collect()
}

async fn keygen(h: &Harness, name: &str) -> String {
    let path = h.dir.path().join(name);
    let (code, stdout, stderr) = h.cli(&["keygen", "--out", path.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.is_empty(), "the key is not printed when written to a file");
    assert!(stderr.contains("new secrets key"), "{stderr}");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_store_shows_no_token_refuses_other_keys_and_rotates() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let key = keygen(&h, "secrets.key").await;
    let (code, _, stderr) = h.cli(&["keygen", "--out", &key]).await;
    assert_eq!(code, 1, "an existing key file is never overwritten");
    assert!(stderr.contains("already exists"), "{stderr}");

    let daemon = h.start_daemon_with(&["--secrets-key-file", &key]).await;
    connect_approved(&h).await;
    let client = h.client();
    let view: ConnectionView = client.post("/v1/connections/trakt/default/refresh", None).await.unwrap();
    assert_eq!(view.state, StateName::Connected);
    let token: Value = client.get("/v1/connections/trakt/default/token").await.unwrap();
    daemon.stop().await;
    assert!(h.emulator.issued_tokens().len() >= 5, "device code, two pairs of tokens");
    assert_eq!(in_clear(&h), Vec::<String>::new(), "the store file holds no secret in clear text");

    // Without the key, or with another one: a clear refusal, and nothing changes.
    let (code, _, stderr) = h.cli(&["daemon"]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("encrypted") && stderr.contains("--secrets-key-file"), "{stderr}");
    let other = keygen(&h, "other.key").await;
    let (code, _, stderr) = h.cli(&["daemon", "--secrets-key-file", &other]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("not with the key given"), "{stderr}");

    // Rotation: the new key, with the old one as the previous key.
    let daemon = h.start_daemon_with(&["--secrets-key-file", &other, "--previous-secrets-key-file", &key]).await;
    let again: Value = client.get("/v1/connections/trakt/default/token").await.unwrap();
    assert_eq!(again["access_token"], token["access_token"], "nothing lost on the way");
    daemon.stop().await;
    assert_eq!(in_clear(&h), Vec::<String>::new());
    let (code, _, stderr) = h.cli(&["daemon", "--secrets-key-file", &key]).await;
    assert_eq!(code, 1, "the old key no longer opens it: {stderr}");
    // The key named in the config (relative to its directory) is used as well.
    let mut config: Value = serde_json::from_slice(&std::fs::read(h.config_path()).unwrap()).unwrap();
    config["authkeeper"]["secrets_key_file"] = json!("other.key");
    std::fs::write(h.config_path(), config.to_string()).unwrap();
    let daemon = h.start_daemon().await;
    let view: ConnectionView = client.get("/v1/connections/trakt/default").await.unwrap();
    assert_eq!(view.state, StateName::Connected);
    daemon.stop().await;

    // No key material in the log.
    let log = h.log();
    for file in [&key, &other] {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(!log.contains(text.trim()), "a key leaked into the log");
    }
}
