//! `bench scheduler`: rebuilding every deadline at 100,000 connections against reading the
//! rows, the deadline queue's memory, daemon starts and restarts against that read, and the
//! scheduler's wakeups in an idle minute.

use crate::{live_growth, median, ms, process};
use authkeeper::client::Client;
use authkeeper::clock::SystemClock;
use authkeeper::config::Paths;
use authkeeper::daemon;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub async fn scheduler(n: usize, idle_secs: u64, starts: usize) -> anyhow::Result<()> {
    use authkeeper::daemon::Deadlines;
    use authkeeper::limits::RefreshPlanner;
    use authkeeper_state::schedule::next_action;
    use authkeeper_state::{Policy, Store};
    use chrono::{TimeDelta, Utc};

    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.redb");
    let now = Utc::now();
    let policy = Policy { validate_every: TimeDelta::days(7), ..Policy::default() };
    drop(process::populate(&db, n, now)?);
    println!("scheduler: {n} connected connections in {}", db.display());

    // Rebuild on restart, against a bare read of the same rows, alternating, median of 5.
    let store = Store::open(&db)?;
    let (mut base, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let (rows, _) = store.scan_rows()?;
        base.push(t.elapsed());
        assert_eq!(rows as usize, n);
        let t = Instant::now();
        let deadlines = Deadlines::default();
        let planner = RefreshPlanner::new(8.0);
        for m in store.load_all()?.into_iter().map(|s| s.machine) {
            let next = next_action(&m, &policy).map(|(at, action)| match action {
                authkeeper_state::Action::Refresh => planner.plan(m.key().profile.as_str(), at, now),
                _ => at,
            });
            deadlines.set(m.key(), next);
        }
        ours.push(t.elapsed());
        assert_eq!(deadlines.stats().deadlines, n);
    }
    let (base, ours) = (median(base), median(ours));
    println!("  baseline  read {n} rows from redb            {:>8.1} ms (median of 5)", ms(base));
    println!("  rebuild   load, decode, schedule every one  {:>8.1} ms", ms(ours));
    println!("  ratio     {:.2} × baseline", ours.as_secs_f64() / base.as_secs_f64());
    let baseline = base;

    // Memory of the deadline queue (and refresh plan) alone.
    let machines: Vec<_> = store.load_all()?.into_iter().map(|s| s.machine).collect();
    let plans: Vec<_> = machines.iter().map(|m| (m.key().clone(), next_action(m, &policy))).collect();
    drop(machines);
    let (made, grown) = live_growth(|| {
        let deadlines = Deadlines::default();
        let planner = RefreshPlanner::new(8.0);
        for (key, next) in &plans {
            let at = next.map(|(at, a)| {
                if a == authkeeper_state::Action::Refresh { planner.plan(key.profile.as_str(), at, now) } else { at }
            });
            deadlines.set(key, at);
        }
        (deadlines, planner)
    });
    let grown = grown.max(0) as usize;
    println!(
        "  memory    deadline queue + refresh plan: {} KiB for {n} connections ({} bytes each, live heap)",
        grown / 1024,
        grown / n
    );
    drop((made, plans));

    // An idle daemon holding all of them: how often does its scheduler wake in a minute?
    std::fs::write(dir.path().join("config.json"), process::config(n).to_string())?;
    let paths = Paths {
        config: dir.path().join("config.json"),
        state_dir: dir.path().join("state"),
        socket: dir.path().join("s.sock"),
    };
    // The first start also stores every profile's settings (once it answers): shown apart. The
    // restarts after it are what a daemon restarting on its own store does: each opens the
    // store, as a new process would. All are read against the baseline above.
    drop(store);
    let mut timed = starts_on(&paths, &db, n, starts.max(1) + 1, None).await?;
    let (first, _) = timed.times.remove(0);
    timed.reads.remove(0);
    let ratio = |d: Duration| d.as_secs_f64() / baseline.as_secs_f64();
    println!(
        "  first     start, on a store that holds no settings yet: ready in {:.0} ms = {:.1} × the baseline read",
        ms(first),
        ratio(first)
    );
    let (mut readies, scheduled): (Vec<_>, Vec<_>) = timed.times.iter().copied().unzip();
    readies.sort();
    let ready = median(readies.clone());
    println!(
        "  daemon    restarts, each opening the store: ready with {} connections in {:.0} ms (median of {}; {:.0}–{:.0}) = {:.1} × the baseline read (target ≤ 4)",
        n + 1,
        ms(ready),
        readies.len(),
        ms(readies[0]),
        ms(readies[readies.len() - 1]),
        ratio(ready)
    );
    // Each restart against the bare read taken just before it: the machine's pace drifts over
    // a run, and a pair shares it.
    let mut paired: Vec<f64> = (timed.times.iter().zip(&timed.reads))
        .map(|((ready, _), read)| ready.as_secs_f64() / read.as_secs_f64())
        .collect();
    paired.sort_by(f64::total_cmp);
    println!(
        "  paired    each restart against a bare read on the store opened afresh just before it: {:.1} × (median of {}; {:.1}–{:.1}; reads {:.1} ms median) (target ≤ 4)",
        paired[paired.len() / 2],
        paired.len(),
        paired[0],
        paired[paired.len() - 1],
        ms(median(timed.reads.clone()))
    );
    let scheduled = median(scheduled);
    println!(
        "  deadlines restarts: every connection's first deadline set {:.0} ms after the start (median) = {:.1} × the baseline read",
        ms(scheduled),
        ratio(scheduled)
    );
    // As this bench measured restarts until 2026-12-03: one store opened once, a start on it,
    // then every restart on that same handle. Its reads slow down once a daemon has run on it
    // (a bare read on it is shown), which no restarting process meets.
    timed.running.stop().await?;
    let one = Arc::new(Store::open(&db)?);
    let mut timed = starts_on(&paths, &db, n, starts.max(1) + 1, Some(&one)).await?;
    timed.times.remove(0);
    let mut readies: Vec<_> = timed.times.iter().map(|(ready, _)| *ready).collect();
    readies.sort();
    let t = Instant::now();
    let (rows, _) = one.scan_rows()?;
    let read = t.elapsed();
    assert_eq!(rows as usize, n);
    println!(
        "  one store restarts on one store opened once: ready in {:.0} ms (median of {}) = {:.1} × the baseline read; a bare read on that store now takes {:.1} ms",
        ms(median(readies.clone())),
        readies.len(),
        ratio(median(readies)),
        ms(read)
    );
    let running = timed.running;
    let client = Client::new(&running.socket);
    let health: Value = client.get("/v1/health").await?;
    let (w0, i0) =
        (health["scheduler"]["wakes"].as_u64().unwrap_or(0), health["scheduler"]["idle_wakes"].as_u64().unwrap_or(0));
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let health: Value = client.get("/v1/health").await?;
    let (w1, i1) =
        (health["scheduler"]["wakes"].as_u64().unwrap_or(0), health["scheduler"]["idle_wakes"].as_u64().unwrap_or(0));
    let minutes = idle_secs as f64 / 60.0;
    println!(
        "  idle      {:.1} wakeups a minute with nothing due (target ≤ 1); {:.1} a minute for due work; next deadline {}",
        (i1 - i0) as f64 / minutes,
        ((w1 - w0) - (i1 - i0)) as f64 / minutes,
        health["scheduler"]["next"]
    );
    running.stop().await?;
    Ok(())
}

/// Daemons started one after another on `db`, each stopped before the next starts.
struct Starts {
    /// Each start's time to ready, and to every connection's first deadline.
    times: Vec<(Duration, Duration)>,
    /// Before each start that opens the store, a bare read of its rows on a store opened
    /// afresh: the same read as the baseline, taken moments before the start.
    reads: Vec<Duration>,
    /// The last one, still running.
    running: daemon::Running,
}

/// `count` daemon starts on `db` (holding `n` connections), each opening the store as a
/// daemon does, or all on `one` store opened once.
async fn starts_on(
    paths: &Paths,
    db: &std::path::Path,
    n: usize,
    count: usize,
    one: Option<&Arc<authkeeper_state::Store>>,
) -> anyhow::Result<Starts> {
    let (mut times, mut reads, mut running) = (Vec::with_capacity(count), Vec::new(), None);
    for _ in 0..count {
        if let Some(r) = running.take() {
            daemon::Running::stop(r).await?;
        }
        if one.is_none() {
            let fresh = authkeeper_state::Store::open(db)?;
            let t = Instant::now();
            let (rows, _) = fresh.scan_rows()?;
            reads.push(t.elapsed());
            assert_eq!(rows as usize, n);
        }
        let mut opts = daemon::Options::new(paths.clone(), Arc::new(SystemClock));
        let t = Instant::now();
        opts.store = Some(match one {
            Some(store) => store.clone(),
            None => Arc::new(authkeeper_state::Store::open(db)?),
        });
        let started = daemon::start(opts).await?;
        let ready = t.elapsed();
        // Ready: the socket answers for every connection. Their first deadlines may still be
        // on their way (a large start sets them in the background): timed apart.
        started.shared().deadlines.scheduled().await;
        let deadlines = t.elapsed();
        assert_eq!(started.shared().deadlines.stats().deadlines, n, "every connection has its deadline");
        times.push((ready, deadlines));
        running = Some(started);
    }
    Ok(Starts { times, reads, running: running.expect("started at least once") })
}
