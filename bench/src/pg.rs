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

/// Leases per holder, from the store.
fn holders(cluster: &Cluster, db: &str) -> anyhow::Result<Vec<u64>> {
    let rows = cluster.query(db, "SELECT count(*) FROM authkeeper.leases GROUP BY holder ORDER BY holder")?;
    Ok(rows.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Two daemons sharing `n` connections on PostgreSQL: each one's start and memory, and how long
/// until the connections are spread over both, against one daemon on redb.
pub async fn shared(n: usize) -> anyhow::Result<()> {
    let binary = process::authkeeper_binary()?;
    let cluster = Cluster::start()?;
    println!("pg-shared: two release daemons sharing {n} connections on PostgreSQL, against one on redb");
    let dir = tempfile::tempdir()?;
    process::prepare(dir.path(), n)?;
    let mut first = Server::daemon(&binary, dir.path())?;
    process::wait_ready(&mut first, n, Instant::now()).await?;
    first.stop()?;
    let (redb_cold, redb_rss) = measure(&binary, dir.path(), n, &[]).await?;
    println!("  redb, one daemon:      ready in {:>7.0} ms, idle RSS {redb_rss} KiB", ms(redb_cold));

    let url = cluster.database("shared")?;
    let redb = format!("redb:{}", dir.path().join("state").join("authkeeper.redb").display());
    let t = Instant::now();
    let copied = std::process::Command::new(&binary).args(["store", "copy", "--from", &redb, "--to", &url]).output()?;
    anyhow::ensure!(copied.status.success(), "store copy failed: {}", String::from_utf8_lossy(&copied.stderr));
    println!("  store copy to PostgreSQL: {:.1} s", t.elapsed().as_secs_f64());

    let store = ["--store", url.as_str()];
    let other = tempfile::tempdir()?;
    std::fs::copy(dir.path().join("config.json"), other.path().join("config.json"))?;
    let mut a = Server::daemon_with(&binary, dir.path(), &store)?;
    let t = Instant::now();
    let a_cold = process::wait_ready(&mut a, 0, t).await?;
    let mut b = Server::daemon_with(&binary, other.path(), &store)?;
    let t = Instant::now();
    let b_cold = process::wait_ready(&mut b, 0, t).await?;
    // Spread: B's share handed over by A (as its connections are idle) and taken by B.
    let t = Instant::now();
    let spread = loop {
        let counts = holders(&cluster, "shared")?;
        if counts.len() == 2 && counts.iter().all(|&c| c as usize > n / 3) {
            break counts;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(300), "not spread after 5 minutes: {counts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let spread_in = t.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (a_rss, b_rss) = (a.memory().rss_kib, b.memory().rss_kib);
    println!(
        "  PostgreSQL, daemon A: ready in {:>7.0} ms ({:.2}× redb), idle RSS {a_rss} KiB ({:.2}× redb)",
        ms(a_cold),
        a_cold.as_secs_f64() / redb_cold.as_secs_f64(),
        a_rss as f64 / redb_rss as f64
    );
    println!(
        "  PostgreSQL, daemon B: ready in {:>7.0} ms ({:.2}× redb), idle RSS {b_rss} KiB ({:.2}× redb)",
        ms(b_cold),
        b_cold.as_secs_f64() / redb_cold.as_secs_f64(),
        b_rss as f64 / redb_rss as f64
    );
    println!("  spread over both {:.1} s after B was ready: leases held {spread:?}", spread_in.as_secs_f64());
    a.stop()?;
    b.stop()?;
    Ok(())
}
