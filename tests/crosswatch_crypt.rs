//! CrossWatch's encrypted config values: a config.json and `.cw_master_key` made by another
//! Fernet implementation (Python's `cryptography`, see tests/fixtures/crosswatch) is read as
//! is; credentials written back stay encrypted, in a form that implementation decrypts; a key
//! that does not open the file is a config error naming the value, and changes nothing.

mod common;

use authkeeper::wire::{ConnectionView, WireEvent};
use authkeeper_fixtures::tautulli::{TautulliEmulator, TautulliOptions};
use authkeeper_state::StateName;
use common::*;
use serde_json::{Value, json};

const TAUTULLI_KEY: &str = "c0ffee11d00dfeed5eed1e55ba5eba11";
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/crosswatch");

/// Python's Fernet decrypts `token` with CrossWatch's key `passphrase`; `None` when Python or
/// its `cryptography` package is missing.
fn python_decrypts(passphrase: &str, token: &str) -> Option<String> {
    let script = "import base64,hashlib,sys\nfrom cryptography.fernet import Fernet\n\
                  k=base64.urlsafe_b64encode(hashlib.sha256(sys.argv[1].strip().encode()).digest())\n\
                  print(Fernet(k).decrypt(sys.argv[2].removeprefix('enc:v1:').encode()).decode())";
    let out = std::process::Command::new("python3").args(["-c", script, passphrase, token]).output().ok()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("No module named"), "Python could not decrypt: {stderr}");
        return None;
    }
    Some(String::from_utf8(out.stdout).unwrap().trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_crosswatch_config_imports_and_is_written_back_encrypted() {
    let tautulli =
        TautulliEmulator::start(TautulliOptions { api_key: TAUTULLI_KEY.into(), ..TautulliOptions::default() })
            .await
            .unwrap();
    let h = Harness::new(fast_trakt(), json!({})).await;
    let passphrase = std::fs::read_to_string(format!("{FIXTURE}/.cw_master_key")).unwrap();
    std::fs::write(h.dir.path().join(".cw_master_key"), &passphrase).unwrap();
    let text = std::fs::read_to_string(format!("{FIXTURE}/config.json"))
        .unwrap()
        .replace("SERVER_URL", &tautulli.server_url());
    let mut config: Value = serde_json::from_str(&text).unwrap();
    config["authkeeper"] = json!({"base_url": {"trakt": h.emulator.url()}, "write_back": true,
                                  "http_timeout_secs": 5, "backoff_base_secs": 1});
    std::fs::write(h.config_path(), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    // Tokens are written back only into a file nobody else can read.
    std::fs::set_permissions(h.config_path(), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (tautulli_cipher, secret_cipher) =
        (config["tautulli"]["api_key"].clone(), config["trakt"]["client_secret"].clone());

    let daemon = h.start_daemon().await;
    let client = h.client();
    // The decrypted key is the one Tautulli accepts.
    let view: ConnectionView = client.post("/v1/connections/tautulli/default/validate", None).await.unwrap();
    assert_eq!(view.state, StateName::Connected, "{view:?}");
    let token: Value = client.get("/v1/connections/tautulli/default/token").await.unwrap();
    assert_eq!(token["access_token"], TAUTULLI_KEY);

    // A Trakt login (the decrypted client secret is what the emulator wants), written back.
    let mut events = client.events().await.unwrap();
    let reply: authkeeper::wire::ConnectReply =
        client.post("/v1/connections/trakt/default/connect", None).await.unwrap();
    assert!(h.emulator.approve(reply.user_code().unwrap()));
    let written = tokio::time::timeout(PATIENCE, async {
        loop {
            match events.next().await.unwrap().unwrap() {
                WireEvent::ConfigWritten { changed, .. } if changed.contains(&"trakt/default".to_owned()) => {
                    return std::fs::read_to_string(h.config_path()).unwrap();
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the login is not written back:\n{}", h.log()));
    let file: Value = serde_json::from_str(&written).unwrap();
    let access = file["trakt"]["access_token"].as_str().unwrap();
    assert!(access.starts_with("enc:v1:"), "written back encrypted: {access}");
    assert!(file["trakt"]["refresh_token"].as_str().unwrap().starts_with("enc:v1:"));
    assert!(file["trakt"]["expires_at"].is_number(), "not a secret: written plain");
    assert_eq!(file["trakt"]["client_secret"], secret_cipher, "an unchanged secret keeps its ciphertext");
    assert_eq!(file["tautulli"]["api_key"], tautulli_cipher);
    let live: Value = client.get("/v1/connections/trakt/default/token").await.unwrap();
    for token in h.emulator.issued_tokens() {
        assert!(!written.contains(&token), "a token in clear in the config");
    }
    match python_decrypts(&passphrase, access) {
        Some(plain) => assert_eq!(plain, live["access_token"].as_str().unwrap(), "Python's Fernet reads ours"),
        None if std::env::var_os("AUTHKEEPER_REQUIRE_FERNET").is_some() => panic!("python3-cryptography is required"),
        None => eprintln!("python3 with cryptography is not installed: the cross-check was skipped"),
    }

    // Another key: the file does not load, the error names the value, nothing changes.
    std::fs::write(h.dir.path().join(".cw_master_key"), "not the key").unwrap();
    let changed = written.replace("\"http_timeout_secs\": 5", "\"http_timeout_secs\": 6");
    assert_ne!(changed, written);
    save_by_rename(&h.config_path(), &changed);
    let error = tokio::time::timeout(PATIENCE, async {
        loop {
            if let WireEvent::ConfigError { error, .. } = events.next().await.unwrap().unwrap() {
                return error;
            }
        }
    })
    .await
    .expect("a config error");
    assert!(error.contains("tautulli.api_key") || error.contains("trakt."), "{error}");
    assert!(error.contains(".cw_master_key"), "names where the key came from: {error}");
    let view: ConnectionView = client.get("/v1/connections/trakt/default").await.unwrap();
    assert_eq!(view.state, StateName::Connected, "the last good config stays in force");
    daemon.stop().await;
}
