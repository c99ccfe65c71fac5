//! The daemon on PostgreSQL against the same daemon on redb, in the same run: the store of N
//! connected connections is made on redb, copied to a throwaway PostgreSQL cluster with
//! `authkeeper store copy`, and each daemon is then restarted and measured.

use crate::process::{self, Server};
use authkeeper_pgstore::cluster::Cluster;
use std::time::{Duration, Instant};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Start, wait until ready with `n` deadlines, let it settle, and read its memory; stop it.
async fn measure(
    binary: &std::path::Path,
    dir: &std::path::Path,
    n: usize,
    options: &[&str],
) -> anyhow::Result<(Duration, u64)> {
    let mut daemon = Server::daemon_with(binary, dir, options)?;
    let t = Instant::now();
    let cold = process::wait_ready(&mut daemon, n, t).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = daemon.memory().rss_kib;
    daemon.stop()?;
    Ok((cold, rss))
}

pub async fn scale(sizes: &[usize]) -> anyhow::Result<()> {
    let binary = process::authkeeper_binary()?;
    let cluster = Cluster::start()?;
    println!("pg-scale: the release daemon on PostgreSQL (a local cluster on a unix socket) against redb");
    println!("  each start is a restart (the first start stored the profiles' settings); idle RSS after 3 s");
    println!(
        "  {:>7} | {:>9} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6}",
        "N", "copy", "redb cold", "pg cold", "ratio", "redb RSS", "pg RSS", "ratio"
    );
    for &n in sizes {
        let dir = tempfile::tempdir()?;
        process::prepare(dir.path(), n)?;
        let mut first = Server::daemon(&binary, dir.path())?;
        process::wait_ready(&mut first, n, Instant::now()).await?;
        first.stop()?;

        let url = cluster.database(&format!("scale{n}"))?;
        let redb = format!("redb:{}", dir.path().join("state").join("authkeeper.redb").display());
        let t = Instant::now();
        let copied =
            std::process::Command::new(&binary).args(["store", "copy", "--from", &redb, "--to", &url]).output()?;
        let copy = t.elapsed();
        anyhow::ensure!(copied.status.success(), "store copy failed: {}", String::from_utf8_lossy(&copied.stderr));

        let store = ["--store", url.as_str()];
        // Alternating, twice each; the better of each pair.
        let mut redb_runs = Vec::new();
        let mut pg_runs = Vec::new();
        for _ in 0..2 {
            redb_runs.push(measure(&binary, dir.path(), n, &[]).await?);
            pg_runs.push(measure(&binary, dir.path(), n, &store).await?);
        }
        let best = |runs: &[(Duration, u64)]| runs.iter().min_by_key(|r| r.0).copied().expect("two runs");
        let ((rc, rr), (pc, pr)) = (best(&redb_runs), best(&pg_runs));
        println!(
            "  {n:>7} | {:>7.0}ms | {:>8.0}ms {:>8.0}ms {:>5.2}× | {:>6} KiB {:>6} KiB {:>5.2}×",
            ms(copy),
            ms(rc),
            ms(pc),
            pc.as_secs_f64() / rc.as_secs_f64(),
            rr,
            pr,
            pr as f64 / rr as f64
        );
    }
    Ok(())
}
