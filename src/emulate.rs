//! `authkeeper emulate PROVIDER`: one provider emulator in the foreground, an offline sandbox
//! for anyone integrating with these services. It prints its origin, what it accepts, and the
//! config.json snippet that points a daemon at it, then serves until Ctrl-C.

use authkeeper_fixtures::{Account, EMULATORS};
use std::net::SocketAddr;

/// The names `emulate` knows, for `--help` and errors.
pub fn names() -> Vec<&'static str> {
    EMULATORS.iter().map(|(name, _)| *name).collect()
}

/// Run the emulator of `provider` on `listen` until `stop` resolves.
pub async fn run(
    provider: &str,
    listen: SocketAddr,
    account: Account,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let Some((_, start)) = EMULATORS.iter().find(|(name, _)| *name == provider) else {
        anyhow::bail!("no emulator named {provider:?}; there are: {}", names().join(", "));
    };
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    if !listen.ip().is_loopback() {
        eprintln!("warning: listening on {listen}, beyond this machine; the emulator accepts anyone it is told to");
    }
    let emulator = start(account, listener).await?;
    let url = emulator.url();
    println!("{provider} emulator on {url}");
    println!();
    println!("It accepts:");
    for (what, value) in emulator.accepts() {
        println!("  {what:<14} {value}");
    }
    println!();
    println!("Point a daemon at it with this in config.json:");
    println!("{}", serde_json::to_string_pretty(&emulator.config())?);
    println!();
    println!("Script it:");
    println!("  curl -X POST '{url}/_emulator/approve?code=CODE'     approve the code or PIN the user sees");
    println!("  curl -X POST '{url}/_emulator/deny?code=CODE'        deny it");
    println!("  curl -X POST '{url}/_emulator/revoke_all'            kill every issued token");
    println!("  curl -X POST '{url}/_emulator/token_lifetime?seconds=N'");
    println!("  curl -X POST '{url}/_emulator/fail?path=P&status=S&count=N&retry_after=R'");
    println!("  curl -X POST '{url}/_emulator/fail?path=P&fault=KIND&count=N'");
    println!("       KIND: hang, garbage, reset, truncated, html, huge (&bytes=N), drip (&interval_ms=N)");
    println!("  curl '{url}/_emulator/calls'                         the call log");
    println!();
    println!("Ctrl-C stops it.");
    stop.await;
    Ok(())
}
