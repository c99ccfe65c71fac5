//! Under systemd: `READY=1` reaches `NOTIFY_SOCKET` only once the control socket answers,
//! `STOPPING=1` at shutdown, watchdog pings while `WATCHDOG_USEC` is set; and the unit files
//! pass `systemd-analyze verify` where it is installed.

mod common;

use common::*;
use serde_json::{Value, json};
use std::process::Stdio;
use tokio::net::UnixDatagram;

async fn next_message(sock: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(PATIENCE, sock.recv(&mut buf)).await.expect("a notification in time").unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_stopping_and_the_watchdog_reach_systemd() {
    let h = Harness::new(fast_trakt(), json!({})).await;
    let notify = h.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_authkeeper"))
        .arg("daemon")
        .args(h.args())
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let first = next_message(&sock).await;
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    assert!(first.contains("STATUS="), "a status line for systemctl status: {first:?}");
    // The moment systemd hears READY=1, the socket answers.
    let health: Value = h.client().get("/v1/health").await.unwrap();
    assert!(health.is_object());

    // Pings at half the watchdog interval.
    let mut pings = 0;
    while pings < 2 {
        if next_message(&sock).await.lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }

    std::process::Command::new("kill").args(["-TERM", &child.id().unwrap().to_string()]).status().unwrap();
    loop {
        if next_message(&sock).await.lines().any(|l| l == "STOPPING=1") {
            break;
        }
    }
    let status = tokio::time::timeout(PATIENCE, child.wait()).await.unwrap().unwrap();
    assert!(status.success());
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    let Ok(which) = std::process::Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed: skipped");
        return;
    };
    assert!(which.status.success());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    // verify checks that ExecStart exists: point the units at the binary just built.
    let tmp = tempfile::tempdir().unwrap();
    for unit in ["authkeeper.service", "authkeeper.socket", "user/authkeeper.service", "user/authkeeper.socket"] {
        let text = std::fs::read_to_string(dir.join(unit)).unwrap();
        let text = text.replace("/usr/bin/authkeeper", env!("CARGO_BIN_EXE_authkeeper"));
        let sub = if unit.starts_with("user/") { "user" } else { "system" };
        std::fs::create_dir_all(tmp.path().join(sub)).unwrap();
        std::fs::write(tmp.path().join(sub).join(unit.trim_start_matches("user/")), text).unwrap();
    }
    for (sub, extra) in [("system", None), ("user", Some("--user"))] {
        let mut cmd = std::process::Command::new("systemd-analyze");
        cmd.arg("verify");
        if let Some(flag) = extra {
            // A user manager needs a runtime directory, as a login session has.
            cmd.arg(flag).env("XDG_RUNTIME_DIR", tmp.path());
        }
        cmd.arg(tmp.path().join(sub).join("authkeeper.service"));
        cmd.arg(tmp.path().join(sub).join("authkeeper.socket"));
        let out = cmd.arg("--man=no").env("SYSTEMD_LOG_LEVEL", "warning").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("authkeeper")).collect();
        assert!(out.status.success() && ours.is_empty(), "{sub} units: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_socket_can_be_handed_over_by_systemd() {
    if std::process::Command::new("systemd-socket-activate").arg("--version").output().is_err() {
        eprintln!("systemd-socket-activate is not installed: skipped");
        return;
    }
    let h = Harness::new(fast_trakt(), json!({})).await;
    std::fs::create_dir_all(h.socket().parent().unwrap()).unwrap();
    let socket = h.socket().display().to_string();
    // It listens on the socket and starts the daemon on the first connection, handing it over.
    let mut activator = tokio::process::Command::new("systemd-socket-activate")
        .args(["-l", &socket, env!("CARGO_BIN_EXE_authkeeper"), "daemon"])
        .args(h.args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let appeared = async {
        while !h.socket().exists() {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(PATIENCE, appeared).await.expect("the activator listens");
    let health: Value = h.client().get("/v1/health").await.unwrap();
    assert!(health.is_object(), "the first connection started the daemon, which answered it");
    std::process::Command::new("kill").args(["-TERM", &activator.id().unwrap().to_string()]).status().unwrap();
    let status = tokio::time::timeout(PATIENCE, activator.wait()).await.unwrap().unwrap();
    assert!(status.success());
    assert!(h.socket().exists(), "the socket is systemd's: the daemon leaves it in place");
}
