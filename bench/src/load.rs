//! `bench load`: the release daemon holding N connected Trakt connections that validate on a
//! short schedule against the bundled emulator, hammered by C concurrent socket clients (token
//! lookups and status calls) while S subscribers read `/v1/events`, one of which reads nothing
//! until the load is over. Reported: throughput and latency beside the same clients against a
//! bare hyper server, that every client was held, that transitions kept their schedule while
//! the slow reader stalled, that it was told it fell behind, and the daemon's memory.

use super::process::{self, Connection, Server};
use authkeeper_fixtures::{TraktEmulator, TraktOptions};
use chrono::{DateTime, TimeDelta, Utc};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub struct Options {
    pub connections: usize,
    pub clients: usize,
    pub subscribers: usize,
    pub secs: f64,
    pub validate_every: u64,
}

/// `dir/state` with `n` connections connected on grants the emulator issued at `issued` (its
/// validation too) to live `lifetime`, and `dir/config.json` naming them, validating every
/// `every` seconds, with Trakt's rate limit lifted so the daemon, not the limit, sets the pace.
pub fn prepare(
    dir: &Path,
    emulator: &TraktEmulator,
    n: usize,
    every: u64,
    (issued, lifetime): (DateTime<Utc>, TimeDelta),
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("state"))?;
    let db = dir.join("state").join("authkeeper.redb");
    drop(process::populate_with(&db, n, process::profile, lifetime, |_| {
        let (access, refresh) = emulator.issue_grant();
        (access, refresh, issued)
    })?);
    let instances: serde_json::Map<String, Value> = (0..n).map(|i| (process::profile(i), json!({}))).collect();
    let config = json!({
        "trakt": {"client_id": "emulator-client-id", "client_secret": "emulator-client-secret", "instances": instances},
        "authkeeper": {"base_url": {"trakt": emulator.url()}, "validate_every_secs": every,
                       "rate_limits": {"trakt": {"per_second": 100_000, "burst": 10_000}}},
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    Ok(())
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    transitions: u64,
    lagged: Option<String>,
    /// Transitions per whole second since the load began.
    per_second: Vec<u64>,
}

/// Read `/v1/events` on `socket`; the slow one reads nothing until `stalled` turns false.
async fn subscribe(
    socket: &Path,
    stalled: Option<Arc<AtomicBool>>,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Seen> {
    let mut c = Connection::open(socket).await?;
    let mut body = c.stream("/v1/events").await?;
    let mut seen = Seen::default();
    let mut line = Vec::new();
    if let Some(stalled) = stalled {
        while stalled.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await; // this reader chooses not to read
        }
    }
    while !stop.load(Ordering::Relaxed) {
        let Ok(frame) = tokio::time::timeout(Duration::from_millis(200), body.frame()).await else { continue };
        let Some(frame) = frame else { break };
        let Ok(data) = frame?.into_data() else { continue };
        for &b in data.iter() {
            if b != b'\n' {
                line.push(b);
                continue;
            }
            let event: Value = serde_json::from_slice(&line)?;
            line.clear();
            match event["type"].as_str() {
                Some("transition") => {
                    seen.transitions += 1;
                    let sec = start.elapsed().as_secs() as usize;
                    if seen.per_second.len() <= sec {
                        seen.per_second.resize(sec + 1, 0);
                    }
                    seen.per_second[sec] += 1;
                }
                Some("warning") if event["message"].as_str().is_some_and(|m| m.contains("fell behind")) => {
                    seen.lagged = event["message"].as_str().map(Into::into);
                }
                _ => {}
            }
        }
    }
    Ok(seen)
}

/// What the clients saw: every latency (ns), and how many could not connect or failed.
struct Run {
    latencies: Vec<u64>,
    refused: usize,
    failed: usize,
    elapsed: Duration,
}

/// `clients` connections opened all at once, each alternating a token lookup and a status call
/// for `length`.
async fn hammer(socket: &Path, clients: usize, n: usize, length: Duration) -> Run {
    let start = tokio::time::Instant::now() + Duration::from_millis(500);
    let end = start + length;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..clients {
        let socket = socket.to_owned();
        tasks.spawn(async move {
            let Ok(mut c) = Connection::open(&socket).await else { return Err(true) };
            tokio::time::sleep_until(start).await;
            let profile = process::profile(i % n.max(1));
            let paths = [format!("/v1/connections/trakt/{profile}/token"), format!("/v1/connections/trakt/{profile}")];
            let mut latencies = Vec::new();
            let mut k = 0;
            while tokio::time::Instant::now() < end {
                let t = Instant::now();
                match c.get(&paths[k % 2]).await {
                    Ok((200, _, _)) => latencies.push(t.elapsed().as_nanos() as u64),
                    _ => return Err(false),
                }
                k += 1;
            }
            Ok(latencies)
        });
    }
    let mut run = Run { latencies: Vec::new(), refused: 0, failed: 0, elapsed: Duration::ZERO };
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(l)) => run.latencies.extend(l),
            Ok(Err(true)) => run.refused += 1,
            _ => run.failed += 1,
        }
    }
    run.elapsed = start.elapsed();
    run.latencies.sort_unstable();
    run
}

fn row(name: &str, r: &Run) {
    let at = |q: f64| quantile(&r.latencies, q) / 1e3;
    println!(
        "  {name:<8} {:>9.0} req/s  p50 {:>8.0}µs  p99 {:>8.0}µs  max {:>9.0}µs  refused {}  failed {}",
        r.latencies.len() as f64 / r.elapsed.as_secs_f64(),
        at(0.5),
        at(0.99),
        r.latencies.last().copied().unwrap_or(0) as f64 / 1e3,
        r.refused,
        r.failed
    );
}

pub async fn load(o: Options) -> anyhow::Result<()> {
    let binary = process::authkeeper_binary()?;
    let emulator = TraktEmulator::start(TraktOptions::default()).await?;
    let dir = tempfile::tempdir()?;
    prepare(dir.path(), &emulator, o.connections, o.validate_every, (Utc::now(), TimeDelta::days(7)))?;
    let mut daemon = Server::daemon(&binary, dir.path())?;
    process::wait_ready(&mut daemon, o.connections, Instant::now()).await?;
    let length = Duration::from_secs_f64(o.secs);
    println!(
        "load: {} connected Trakt connections validating every {} s (emulator), {} clients for {} s, {} /v1/events subscribers (1 slow)",
        o.connections, o.validate_every, o.clients, o.secs, o.subscribers
    );

    // Baseline: the same clients against a bare hyper server answering the token's bytes.
    let path = format!("/v1/connections/trakt/{}/token", process::profile(0));
    let (_, content_type, body) = Connection::open(&daemon.socket).await?.get(&path).await?;
    let bare = {
        let mut bare = Server::bare(dir.path(), &body, &content_type)?;
        bare.wait_listening().await?;
        hammer(&bare.socket, o.clients, o.connections, length).await
    };

    let idle = daemon.memory();
    daemon.reset_peak();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let stalled = Arc::new(AtomicBool::new(true));
    let mut readers = tokio::task::JoinSet::new();
    for i in 0..o.subscribers {
        let (socket, stop) = (daemon.socket.clone(), stop.clone());
        let slow = (i == 0).then(|| stalled.clone());
        readers.spawn(async move { (i, subscribe(&socket, slow, start, stop).await) });
    }
    let ours = hammer(&daemon.socket, o.clients, o.connections, length).await;
    let during = daemon.memory();
    stalled.store(false, Ordering::Relaxed);
    // The slow reader catches up on what its buffer kept; then everyone stops.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen: Vec<(usize, Seen)> = Vec::new();
    while let Some(done) = readers.join_next().await {
        let (i, s) = done?;
        seen.push((i, s?));
    }
    seen.sort_by_key(|(i, _)| *i);

    println!("  clients  {} opened at once; every answer must be 200", o.clients);
    row("bare", &bare);
    row("daemon", &ours);
    println!(
        "  ratio    throughput {:.2}× bare, p99 {:.2}× bare",
        ours.latencies.len() as f64
            / ours.elapsed.as_secs_f64()
            / (bare.latencies.len() as f64 / bare.elapsed.as_secs_f64()),
        quantile(&ours.latencies, 0.99) / quantile(&bare.latencies, 0.99)
    );
    let fast: Vec<&Seen> = seen.iter().skip(1).map(|(_, s)| s).collect();
    let slow = &seen[0].1;
    let expected = o.connections as f64 / o.validate_every as f64;
    let whole = (length.as_secs() as usize).max(1);
    let steady: Vec<u64> = fast[0].per_second.iter().skip(1).take(whole.saturating_sub(1)).copied().collect();
    println!("  events   transitions a second while the slow reader stalled (schedule: {expected:.0}/s): {steady:?}");
    println!(
        "           fast readers: {} of {} saw no lag; transitions seen {}..{}",
        fast.iter().filter(|s| s.lagged.is_none()).count(),
        fast.len(),
        fast.iter().map(|s| s.transitions).min().unwrap_or(0),
        fast.iter().map(|s| s.transitions).max().unwrap_or(0)
    );
    println!("           slow reader: {} transitions, told: {:?}", slow.transitions, slow.lagged);
    println!(
        "  memory   daemon RSS idle {} KiB, after the load {} KiB, peak during it {} KiB",
        idle.rss_kib, during.rss_kib, during.peak_kib
    );
    let held = ours.refused == 0 && ours.failed == 0;
    anyhow::ensure!(held, "{} clients were refused and {} failed", ours.refused, ours.failed);
    anyhow::ensure!(slow.lagged.is_some(), "the slow reader was never told it fell behind");
    Ok(())
}

fn quantile(l: &[u64], q: f64) -> f64 {
    if l.is_empty() { 0.0 } else { l[((l.len() as f64 * q) as usize).min(l.len() - 1)] as f64 }
}
