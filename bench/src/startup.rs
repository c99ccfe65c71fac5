//! `bench startup`: the release binary's size and its idle memory with no connections.

use super::*;

pub async fn startup() -> anyhow::Result<()> {
    let binary = process::authkeeper_binary()?;
    let size = std::fs::metadata(&binary)?.len();
    let dir = tempfile::tempdir()?;
    let stripped = dir.path().join("authkeeper.stripped");
    let strip = std::process::Command::new("strip").arg("-o").arg(&stripped).arg(&binary).status();
    let stripped = strip.ok().filter(|s| s.success()).and_then(|_| std::fs::metadata(&stripped).ok()).map(|m| m.len());
    let mut daemon = daemon_with(&binary, dir.path(), 0)?;
    let t = Instant::now();
    let ready = process::wait_ready(&mut daemon, 0, t).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mem = daemon.memory();
    println!("startup: {}", binary.display());
    println!("  binary    {:.1} MiB as built (line tables for backtraces)", size as f64 / (1 << 20) as f64);
    if let Some(s) = stripped {
        println!("            {:.1} MiB stripped", s as f64 / (1 << 20) as f64);
    }
    println!("  ready     {:.0} ms from spawn to a socket that answers, with 0 connections", ms(ready));
    println!("  idle RSS  {} KiB (peak {} KiB)", mem.rss_kib, mem.peak_kib);
    Ok(())
}
