//! `authkeeper demo`: every provider, offline, in about half a minute. The emulators and a real
//! daemon (with its web listener for browser logins) run in a temporary directory; each connect
//! flow, the automatic refresh, history and disconnect go through the real socket API, and the
//! demo plays the user: it waits for codes to be approved and follows browser logins.

use crate::client::{self, Client, connection_path};
use crate::clock::SystemClock;
use crate::config::Paths;
use crate::daemon;
use crate::wire::{ConnectionView, WireEvent};
use anyhow::{Context, bail};
use authkeeper_fixtures::{JellyfinEmulator, JellyfinOptions, PlexEmulator, PlexOptions, TraktEmulator, TraktOptions};
use authkeeper_state::{Cause, Transition};
use indicatif::{ProgressBar, ProgressStyle};
use more::{More, free_port};
use serde_json::{Value, json};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::Duration;

mod more;
mod owners;

const APPROVE_AFTER: Duration = Duration::from_secs(3);
const TOKEN_LIFETIME: u64 = 12;

/// The providers whose user approves a code, in the order the demo connects them:
/// (name, flow, how the user approves).
const STEPS: [(&str, &str, &str); 3] = [
    ("trakt", "device_pin", "a device code entered at trakt.tv/activate"),
    ("jellyfin", "quick_connect", "a Quick Connect code entered in a signed-in Jellyfin app"),
    ("plex", "device_pin", "a PIN linked at plex.tv, then server discovery"),
];

/// The rest, each its own way: (name, flow, what the user does).
const MORE: [(&str, &str, &str); 6] = [
    ("simkl", "device_pin", "a PIN entered at simkl.com/pin"),
    ("anilist", "oauth_code", "a browser login that comes back to the daemon's callback"),
    ("tmdb", "request_token", "an approval page that sends the browser back to the callback"),
    ("mdblist", "api_key", "an API key (the CLI asks for it without echo)"),
    ("tautulli", "api_key", "an API key and the server's URL"),
    ("emby", "password", "a username and password, used once and kept nowhere"),
];

pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("cannot make a temporary directory")?;
    let approve = Some(APPROVE_AFTER);
    let trakt = TraktEmulator::start(TraktOptions {
        interval: 1,
        token_lifetime: TOKEN_LIFETIME,
        auto_approve_after: approve,
        ..TraktOptions::default()
    })
    .await?;
    let jellyfin =
        JellyfinEmulator::start(JellyfinOptions { auto_approve_after: approve, ..Default::default() }).await?;
    let plex = PlexEmulator::start(PlexOptions { auto_approve_after: approve, ..PlexOptions::default() }).await?;
    let (listen, public_url) = free_port()?;
    let more = More::start(&public_url).await?;
    let config = dir.path().join("config.json");
    let mut body = json!({
        "trakt": {"client_id": "emulator-client-id", "client_secret": "emulator-client-secret"},
        "jellyfin": {"server": jellyfin.url()},
        "plex": {},
        "authkeeper": {
            "base_url": {"trakt": trakt.url(), "plex": plex.url()},
            "refresh_margin_secs": 4,
            "backoff_base_secs": 1,
            "web": {"listen": listen, "public_url": public_url},
        },
    });
    more.configure(&mut body);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&config)?
        .write_all(serde_json::to_string_pretty(&body)?.as_bytes())?;

    println!("authkeeper demo — everything runs on this machine, nothing leaves it");
    println!("  Trakt emulator     {}", trakt.url());
    println!("  Jellyfin emulator  {}", jellyfin.url());
    println!("  plex.tv emulator   {}", plex.url());
    println!("  six more emulators Simkl, AniList, TMDB, MDBList, Tautulli, Emby");
    println!("  web listener       {public_url} (browser logins come back here)");
    println!("  working dir        {}", dir.path().display());
    let paths = Paths { config, state_dir: dir.path().join("state"), socket: dir.path().join("authkeeper.sock") };
    let running = daemon::start(daemon::Options::new(paths, Arc::new(SystemClock))).await?;
    println!("  daemon socket      {}\n", running.socket.display());
    let client = Client::new(&running.socket);

    let mut views = Vec::new();
    for (i, (provider, flow, how)) in STEPS.iter().enumerate() {
        println!("{}. Connect {provider}: {how} (the emulator approves after {} s)", i + 1, APPROVE_AFTER.as_secs());
        let view = client::connect_and_wait(&client, provider, "default", json!({"flow": flow}), false, |_| {}).await?;
        if view.account.is_none() {
            bail!("{provider}: the connect ended {}, not connected", view.state.as_str());
        }
        println!("   connected as {}\n", view.account.as_deref().unwrap_or("?"));
        views.push(view);
    }

    println!("4. Six more, each its own way:");
    for (provider, flow, how) in MORE {
        let account = more.connect(&client, provider, flow).await?;
        println!("   {provider:<9} {flow:<14} {how}: connected as {account}");
    }
    println!();

    println!("5. Every shape side by side: what `GET …/token` gives a consumer (secrets elided)");
    println!("   {:<9} {:<14} {:<22} BESIDES access_token", "PROVIDER", "FLOW", "EXPIRES");
    for (provider, flow, _) in STEPS.iter().chain(MORE.iter()).copied() {
        let token: Value = client.get(&format!("{}/token", connection_path(provider, "default"))).await?;
        let expires =
            token["expires_at"].as_str().map_or("never (until revoked)".to_owned(), |t| format!("{} UTC", &t[11..19]));
        println!("   {provider:<9} {flow:<14} {expires:<22} {}", shape(&token));
    }
    println!();

    let trakt_view = &views[0];
    let old_refresh = trakt.latest_tokens().map(|(_, r)| r).unwrap_or_default();
    println!("6. Two users of a chat bot link their own Jellyfin through one-time links:");
    owners::run(&client, &jellyfin).await?;
    println!();

    println!("7. Trakt's token lives {TOKEN_LIFETIME} s; the daemon refreshes it ahead of expiry, unasked:");
    wait_for_refresh(&client, trakt_view).await?;
    println!(
        "   the emulator saw the old refresh token used {} time(s); the new pair was saved first\n",
        trakt.refresh_token_uses(&old_refresh)
    );

    println!("8. Disconnect everything (each revokes upstream where the provider allows); Trakt's history:");
    for (provider, _, _) in STEPS.iter().chain(MORE.iter()).copied() {
        let path = connection_path(provider, "default");
        let view: ConnectionView = client.post(&format!("{path}/disconnect"), None).await?;
        println!("   {provider}/default is now {}", view.state.as_str());
    }
    let rows: Vec<Transition> = client.get(&format!("{}/history", connection_path("trakt", "default"))).await?;
    for r in rows {
        let cause = serde_json::to_value(r.cause)?;
        println!(
            "     {}  {:>12} → {:<12} {}",
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

/// The keys of a token answer besides the common ones, with nested secrets named, not shown.
fn shape(token: &Value) -> String {
    let common = ["access_token", "token_type", "expires_at", "scope", "account"];
    let Some(map) = token.as_object() else { return String::new() };
    map.iter()
        .filter(|(k, _)| !common.contains(&k.as_str()))
        .map(|(k, v)| match v.as_object() {
            Some(inner) => format!("{k} {{{}}}", inner.keys().cloned().collect::<Vec<_>>().join(", ")),
            None => k.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
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
