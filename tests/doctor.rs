//! `authkeeper doctor` names each broken thing in a deliberately broken setup (a bad config
//! value, a world-readable config holding tokens, an unreachable provider, a stale socket
//! file), says what to do, and exits 1; on a sound setup it exits 0.

mod common;

use common::*;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_each_broken_thing_and_what_to_do() {
    let h = Harness::new(fast_trakt(), json!({})).await;

    // A value of the wrong type, on line 3.
    std::fs::write(h.config_path(), "{\n  \"trakt\": {\n    \"client_id\": 5\n  }\n}\n").unwrap();
    let (code, out, _) = h.cli(&["doctor"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("line 3, column") && out.contains("at trakt.client_id"), "{out}");

    // Tokens in a file others can read, a provider nobody answers for, a stale socket.
    let (_, closed) = common::trackers::free_port();
    let config = json!({
        "trakt": {"client_id": "id", "client_secret": "s", "access_token": "tok", "refresh_token": "ref"},
        "authkeeper": {"base_url": {"trakt": closed}},
    });
    std::fs::write(h.config_path(), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    std::fs::set_permissions(h.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::create_dir_all(h.socket().parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(h.socket()).unwrap());
    let (code, out, _) = h.cli(&["doctor"]).await;
    assert_eq!(code, 1, "{out}");
    for expected in [
        "holds tokens and others can read it (mode 644)",
        "chmod 600",
        "Trakt unreachable at",
        "stale socket file",
        "3 problems found",
    ] {
        assert!(out.contains(expected), "doctor should say {expected:?}:\n{out}");
    }
    assert!(!out.contains("tok\"") && !out.contains("ref\""), "no secret shown");

    // Fixed: a private file, the real provider, a daemon on the socket.
    let config = json!({
        "trakt": {"client_id": "emulator-client-id", "client_secret": "emulator-client-secret"},
        "authkeeper": {"base_url": {"trakt": h.emulator.url()}},
    });
    std::fs::write(h.config_path(), config.to_string()).unwrap();
    std::fs::set_permissions(h.config_path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    let daemon = h.start_daemon().await;
    let (code, out, _) = h.cli(&["doctor"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("daemon answering") && out.contains("Trakt reachable") && out.contains("no problems found"),
        "{out}"
    );
    daemon.stop().await;
}
