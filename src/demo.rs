//! `authkeeper demo`: the whole life of a Trakt connection, offline, in about twenty seconds.
//! A Trakt emulator and a real daemon run in a temporary directory; the connect flow, the
//! automatic refresh, history and disconnect all go through the real socket API.

use crate::client::{self, Client, connection_path};
use crate::clock::SystemClock;
use crate::config::Paths;
use crate::daemon;
use crate::wire::{ConnectionView, WireEvent};
use anyhow::{Context, bail};
use authkeeper_fixtures::{TraktEmulator, TraktOptions};
use authkeeper_state::{Cause, Transition};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::Duration;

const APPROVE_AFTER: Duration = Duration::from_secs(4);
const TOKEN_LIFETIME: u64 = 12;

pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("cannot make a temporary directory")?;
    let emulator = TraktEmulator::start(TraktOptions {
        interval: 1,
        token_lifetime: TOKEN_LIFETIME,
        auto_approve_after: Some(APPROVE_AFTER),
        ..TraktOptions::default()
    })
    .await?;
    let config = dir.path().join("config.json");
    let body = json!({
        "trakt": {"client_id": "emulator-client-id", "client_secret": "emulator-client-secret"},
        "authkeeper": {"base_url": {"trakt": emulator.url()}, "refresh_margin_secs": 4, "backoff_base_secs": 1},
    });
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&config)?
        .write_all(serde_json::to_string_pretty(&body)?.as_bytes())?;

    println!("authkeeper demo — everything runs on this machine, nothing leaves it");
    println!("  Trakt emulator  {}", emulator.url());
    println!("  working dir     {}", dir.path().display());
    let paths = Paths { config, state_dir: dir.path().join("state"), socket: dir.path().join("authkeeper.sock") };
    let running = daemon::start(daemon::Options::new(paths, Arc::new(SystemClock))).await?;
    println!("  daemon socket   {}\n", running.socket.display());
    let client = Client::new(&running.socket);
    let path = connection_path("trakt", "default");

    println!("1. Connect Trakt with a device code (the emulator approves it after {} s):", APPROVE_AFTER.as_secs());
    let view = client::connect_and_wait(&client, "trakt", "default", serde_json::json!({}), false, |_| {}).await?;
    if view.account.is_none() {
        bail!("connect ended {}, not connected", view.state.as_str());
    }
    println!("   connected as {}\n", view.account.as_deref().unwrap_or("?"));

    let token: Value = client.get(&format!("{path}/token")).await?;
    let len = token["access_token"].as_str().map_or(0, str::len);
    println!("2. A consumer asks for a token: `authkeeper token trakt` hands out a live {len}-character");
    println!("   bearer token (not shown here), valid until {}\n", token["expires_at"].as_str().unwrap_or("?"));

    let old_refresh = emulator.latest_tokens().map(|(_, r)| r).unwrap_or_default();
    println!("3. The token lives {TOKEN_LIFETIME} s; the daemon refreshes it ahead of expiry, unasked:");
    wait_for_refresh(&client, &view).await?;
    println!(
        "   the emulator saw the old refresh token used {} time(s); the new pair was saved first\n",
        emulator.refresh_token_uses(&old_refresh)
    );

    println!("4. Disconnect (revokes upstream):");
    let view: ConnectionView = client.post(&format!("{path}/disconnect"), None).await?;
    println!("   now {}\n", view.state.as_str());

    println!("5. History of trakt/default:");
    let rows: Vec<Transition> = client.get(&format!("{path}/history")).await?;
    for r in rows {
        let cause = serde_json::to_value(r.cause)?;
        println!(
            "   {}  {:>12} → {:<12} {}",
            r.at.format("%H:%M:%S"),
            r.from.as_str(),
            r.to.as_str(),
            cause.as_str().unwrap_or("")
        );
    }
    running.stop().await?;
    println!("\nDone. Run `cargo test --workspace` to see all of this checked.");
    Ok(())
}

async fn wait_for_refresh(client: &Client, view: &ConnectionView) -> anyhow::Result<()> {
    let mut events = client.events().await?;
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(ProgressStyle::with_template("   {spinner} {msg}").expect("valid template"));
    let expires = view.expires_at;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(e @ WireEvent::Transition { cause: Cause::Refreshed, .. })) => {
                    spinner.finish_and_clear();
                    println!("   {}", client::describe(&e));
                    return Ok(());
                }
                Some(Ok(e @ WireEvent::Transition { .. })) => {
                    spinner.finish_and_clear();
                    bail!("unexpected transition: {}", client::describe(&e));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the daemon stopped"),
            },
            _ = tick.tick() => {
                let left = expires.map(|t| (t - chrono::Utc::now()).num_milliseconds() as f64 / 1000.0).unwrap_or(0.0);
                spinner.set_message(format!("token expires in {left:.1} s — waiting for the refresh"));
            }
        }
    }
}
