//! `bench owners`: N owners' connections (`trakt/discord:N`, made through links, never in the
//! config) against N config profiles (`TRAKT-P##`), in the same run: restart time and idle
//! memory, so that owners are seen to be on the same footing.

use super::process::{self, Server};
use chrono::Utc;
use serde_json::json;
use std::time::{Duration, Instant};

fn owner(i: usize) -> String {
    format!("discord:{}", 100_000_000 + i)
}

/// First start, then a measured restart: (cold start, idle RSS in KiB).
async fn measure(binary: &std::path::Path, dir: &std::path::Path, n: usize) -> anyhow::Result<(Duration, u64)> {
    let mut first = Server::daemon(binary, dir)?;
    process::wait_ready(&mut first, n, Instant::now()).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    first.stop()?;
    let mut daemon = Server::daemon(binary, dir)?;
    let t = Instant::now();
    let cold = process::wait_ready(&mut daemon, n, t).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok((cold, daemon.memory().rss_kib))
}

pub async fn owners(n: usize) -> anyhow::Result<()> {
    let binary = process::authkeeper_binary()?;
    println!("owners: {n} owners' connections vs {n} config profiles (Trakt, connected, the release daemon)");
    let config = tempfile::tempdir()?;
    process::prepare(config.path(), n)?;
    let by_config = measure(&binary, config.path(), n).await?;

    let owned = tempfile::tempdir()?;
    std::fs::create_dir_all(owned.path().join("state"))?;
    drop(process::populate_as(&owned.path().join("state").join("authkeeper.redb"), n, Utc::now(), owner)?);
    let base = json!({
        "trakt": {"client_id": "c", "client_secret": "s"},
        "authkeeper": {"base_url": {"trakt": "http://127.0.0.1:9"}, "validate_every_secs": 7 * 86_400},
    });
    std::fs::write(owned.path().join("config.json"), base.to_string())?;
    let by_owner = measure(&binary, owned.path(), n).await?;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("  {:<16} {:>10} {:>12}", "", "restart", "idle RSS");
    println!("  {:<16} {:>8.0}ms {:>8} KiB", "config profiles", ms(by_config.0), by_config.1);
    println!("  {:<16} {:>8.0}ms {:>8} KiB", "owners", ms(by_owner.0), by_owner.1);
    println!(
        "  owners / config: restart {:.2}×, memory {:.2}×",
        by_owner.0.as_secs_f64() / by_config.0.as_secs_f64(),
        by_owner.1 as f64 / by_config.1 as f64
    );
    Ok(())
}
