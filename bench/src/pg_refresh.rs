//! Refresh throughput: N connected Trakt connections whose tokens are all due for refresh, on
//! grants the bundled emulator issued, with Trakt's rate limit lifted so that the daemons, not
//! the limit, set the pace. One daemon on redb, then two daemons sharing a PostgreSQL store,
//! each against its own emulator; each run lasts until the emulator has rotated every token.

use crate::process::{self, Connection, Server};
use authkeeper_fixtures::{TraktEmulator, TraktOptions};
use authkeeper_pgstore::cluster::Cluster;
use chrono::{TimeDelta, Utc};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// The grants live 12 h and were issued 11 h ago: each refresh was due 12–19 minutes ago (the
/// lead is a tenth of the lifetime, plus up to a tenth of that as jitter), each token expires
/// in an hour, and no validation is due for another hour.
const LIFETIME_HOURS: i64 = 12;
const AGE_HOURS: i64 = 11;

/// What one run measured.
struct Run {
    /// From spawning the daemons until every daemon answered `/v1/health`.
    ready: Duration,
    /// From spawning until the emulator had rotated all N tokens.
    done: Duration,
    /// Refreshes a second between the 10th and the 90th percentile of the run.
    steady: f64,
    /// Committed transitions by cause, per daemon.
    causes: Vec<BTreeMap<String, u64>>,
    /// Each daemon's peak RSS, KiB.
    peaks: Vec<u64>,
    reused: usize,
}

/// Committed transitions by cause, from the daemon's `/metrics`.
async fn causes(socket: &Path) -> anyhow::Result<BTreeMap<String, u64>> {
    let (status, _, body) = Connection::open(socket).await?.get("/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    let mut out = BTreeMap::new();
    for line in String::from_utf8_lossy(&body).lines().filter(|l| l.starts_with("authkeeper_transitions_total{")) {
        let cause = line.split("cause=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *out.entry(cause.to_owned()).or_default() += value as u64;
    }
    Ok(out)
}

fn refreshed(causes: &[BTreeMap<String, u64>]) -> u64 {
    causes.iter().filter_map(|c| c.get("refreshed")).sum()
}

/// Spawn a daemon for each of `dirs` (with `options`), and follow the emulator until it has
/// rotated `n` tokens and the daemons have committed them all.
async fn run(
    binary: &Path,
    label: &str,
    emulator: &TraktEmulator,
    dirs: &[&Path],
    options: &[&str],
    n: usize,
) -> anyhow::Result<Run> {
    let t = Instant::now();
    let mut daemons = Vec::new();
    for dir in dirs {
        daemons.push(Server::daemon_with(binary, dir, options)?);
    }
    for d in &mut daemons {
        process::wait_ready(d, 0, t).await?;
    }
    let ready = t.elapsed();
    println!("  {label}: ready in {:.1} s", ready.as_secs_f64());
    let (mut low, mut high) = (None, None);
    let (mut last_print, mut last_count) = (Instant::now(), 0usize);
    let done = loop {
        let count = emulator.refreshes();
        let at = t.elapsed();
        if low.is_none() && count >= n / 10 {
            low = Some((at, count));
        }
        if high.is_none() && count >= n * 9 / 10 {
            high = Some((at, count));
        }
        if count >= n {
            break at;
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            let rate = (count - last_count) as f64 / last_print.elapsed().as_secs_f64();
            println!("  {label}: {count:>8} of {n} refreshed after {:>5.0} s ({rate:.0}/s just now)", at.as_secs_f64());
            (last_print, last_count) = (Instant::now(), count);
        }
        anyhow::ensure!(at < Duration::from_secs(3_000), "{label}: only {count} of {n} refreshed after 50 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The last answers' commits.
    let causes = loop {
        let mut all = Vec::new();
        for d in &daemons {
            all.push(causes(&d.socket).await?);
        }
        if refreshed(&all) >= n as u64 || t.elapsed() > done + Duration::from_secs(60) {
            break all;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let peaks = daemons.iter().map(|d| d.memory().peak_kib).collect();
    for d in &mut daemons {
        d.stop()?;
    }
    let steady = match (low, high) {
        (Some((t0, c0)), Some((t1, c1))) if t1 > t0 => (c1 - c0) as f64 / (t1 - t0).as_secs_f64(),
        _ => n as f64 / done.as_secs_f64(),
    };
    Ok(Run { ready, done, steady, causes, peaks, reused: emulator.reused_refresh_tokens() })
}

/// `dir` with `n` connections due for refresh on grants `emulator` issued.
fn prepare(dir: &Path, emulator: &TraktEmulator, n: usize) -> anyhow::Result<()> {
    let issued = Utc::now() - TimeDelta::hours(AGE_HOURS);
    crate::load::prepare(dir, emulator, n, 86_400, (issued, TimeDelta::hours(LIFETIME_HOURS)))
}

fn report(label: &str, n: usize, r: &Run) {
    let per_daemon: Vec<u64> = r.causes.iter().map(|c| c.get("refreshed").copied().unwrap_or(0)).collect();
    let mut others = BTreeMap::new();
    for c in &r.causes {
        for (cause, v) in c.iter().filter(|(k, _)| k.as_str() != "refreshed") {
            *others.entry(cause.clone()).or_insert(0) += v;
        }
    }
    println!(
        "  {label}: {n} refreshed {:.1} s after ready ({:.0}/s overall, {:.0}/s from 10% to 90%); \
         committed per daemon {per_daemon:?}, peak RSS per daemon {:?} MiB; other transitions {others:?}; \
         refresh tokens used twice: {}",
        (r.done - r.ready).as_secs_f64(),
        n as f64 / (r.done - r.ready).as_secs_f64(),
        r.steady,
        r.peaks.iter().map(|k| k / 1024).collect::<Vec<_>>(),
        r.reused
    );
}

pub async fn refresh(n: usize) -> anyhow::Result<()> {
    let binary = process::authkeeper_binary()?;
    println!(
        "pg-refresh: {n} Trakt tokens all due for refresh (rate limit lifted), rotated by the emulator; \
         one daemon on redb, then two sharing PostgreSQL"
    );
    let cluster = Cluster::start()?;

    let emulator = TraktEmulator::start(TraktOptions::default()).await?;
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    prepare(dir.path(), &emulator, n)?;
    println!("  redb store of {n} made in {:.1} s", t.elapsed().as_secs_f64());
    let redb = run(&binary, "redb, one daemon", &emulator, &[dir.path()], &[], n).await?;
    report("redb, one daemon", n, &redb);
    drop((emulator, dir));

    let emulator = TraktEmulator::start(TraktOptions::default()).await?;
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let t = Instant::now();
    prepare(a.path(), &emulator, n)?;
    let url = cluster.database("refresh")?;
    let from = format!("redb:{}", a.path().join("state").join("authkeeper.redb").display());
    let copied = std::process::Command::new(&binary).args(["store", "copy", "--from", &from, "--to", &url]).output()?;
    anyhow::ensure!(copied.status.success(), "store copy failed: {}", String::from_utf8_lossy(&copied.stderr));
    std::fs::copy(a.path().join("config.json"), b.path().join("config.json"))?;
    println!("  PostgreSQL store of {n} made and copied in {:.1} s", t.elapsed().as_secs_f64());
    let pg = run(&binary, "PostgreSQL, two daemons", &emulator, &[a.path(), b.path()], &["--store", url.as_str()], n)
        .await?;
    report("PostgreSQL, two daemons", n, &pg);

    let rate = |r: &Run| n as f64 / (r.done - r.ready).as_secs_f64();
    println!(
        "  two daemons on PostgreSQL against one on redb: {:.2}× overall, {:.2}× from 10% to 90%",
        rate(&pg) / rate(&redb),
        pg.steady / redb.steady
    );
    anyhow::ensure!(redb.reused == 0 && pg.reused == 0, "a refresh token was used twice");
    anyhow::ensure!(
        refreshed(&redb.causes) == n as u64 && refreshed(&pg.causes) == n as u64,
        "not every refresh was committed"
    );
    Ok(())
}
