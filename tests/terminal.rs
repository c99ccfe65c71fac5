//! At a terminal (a pseudo-terminal made by `script`): `status` is a coloured table unless
//! `NO_COLOR` is set, `connect` shows a QR code of the page to open; through a pipe and with
//! `--json` the output stays plain.

mod common;

use common::*;
use serde_json::{Value, json};
use std::process::Stdio;

/// Run the CLI under a pseudo-terminal; returns what the terminal showed.
async fn at_terminal(h: &Harness, args: &[&str], no_color: bool) -> String {
    let mut line = vec![env!("CARGO_BIN_EXE_authkeeper").to_owned()];
    line.extend(args.iter().map(|a| a.to_string()));
    line.extend(h.args());
    let mut cmd = tokio::process::Command::new("script");
    cmd.args(["-qec", &line.join(" "), "/dev/null"]).env("TERM", "xterm-256color").env_remove("NO_COLOR");
    if no_color {
        cmd.env("NO_COLOR", "1");
    }
    let out = tokio::time::timeout(PATIENCE, cmd.stdin(Stdio::null()).output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_coloured_only_at_a_terminal_and_connect_shows_a_qr_code() {
    if std::process::Command::new("script").arg("--version").output().is_err() {
        eprintln!("script (util-linux) is not installed: skipped");
        return;
    }
    let h = Harness::new(fast_trakt(), json!({})).await;
    let daemon = h.start_daemon().await;
    connect_approved(&h).await;

    let coloured = at_terminal(&h, &["status", "trakt"], false).await;
    assert!(coloured.contains("\x1b[32mconnected\x1b[0m"), "{coloured:?}");
    let header = coloured.lines().next().unwrap();
    assert!(header.starts_with("CONNECTION") && header.contains("STATE"), "{header:?}");
    let plain = at_terminal(&h, &["status", "trakt"], true).await;
    assert!(!plain.contains('\x1b'), "NO_COLOR: {plain:?}");
    let (_, piped, _) = h.cli(&["status", "trakt"]).await;
    assert!(!piped.contains('\x1b') && piped.contains("connected"), "{piped:?}");
    let json_out = at_terminal(&h, &["status", "--json"], false).await;
    assert!(!json_out.contains('\x1b'), "--json stays plain");
    let _: Value = serde_json::from_str(json_out.trim()).expect("and parses");

    // A device login at a terminal: the code, the page, and a QR code of the page.
    h.cli(&["disconnect", "trakt"]).await;
    let emulator = &h.emulator;
    let codes_before = emulator.log().calls_to("/oauth/device/code").len();
    let approve = async {
        emulator.log().wait_for_calls("/oauth/device/code", codes_before + 1).await;
        let code = emulator.pending_user_codes().pop().expect("a code is pending");
        assert!(emulator.approve(&code));
    };
    let (shown, ()) = tokio::join!(at_terminal(&h, &["connect", "trakt"], false), approve);
    assert!(shown.contains("enter"), "{shown}");
    let blocks = shown.chars().filter(|c| matches!(c, '▀' | '▄' | '█')).count();
    assert!(blocks > 100, "a QR code of the verification page: {shown}");
    daemon.stop().await;
}
