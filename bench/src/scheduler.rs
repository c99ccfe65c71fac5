//! `bench scheduler`: rebuilding every deadline at 100,000 connections against reading the
//! rows, the deadline queue's memory, daemon starts against a bare read of the store, and the
//! scheduler's wakeups in an idle minute.

use crate::{live_bytes, median, ms, process};
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
    let before = live_bytes();
    let deadlines = Deadlines::default();
    let planner = RefreshPlanner::new(8.0);
    for (key, next) in &plans {
        let at = next.map(|(at, a)| {
            if a == authkeeper_state::Action::Refresh { planner.plan(key.profile.as_str(), at, now) } else { at }
        });
        deadlines.set(key, at);
    }
    let grown = live_bytes().saturating_sub(before);
    println!(
        "  memory    deadline queue + refresh plan: {} KiB for {n} connections ({} bytes each, live heap)",
        grown / 1024,
        grown / n
    );
    drop((deadlines, planner, plans));

    // An idle daemon holding all of them: how often does its scheduler wake in a minute?
    std::fs::write(dir.path().join("config.json"), process::config(n).to_string())?;
    let paths = Paths {
        config: dir.path().join("config.json"),
        state_dir: dir.path().join("state"),
        socket: dir.path().join("s.sock"),
    };
    // Each start is paired with a bare read just before it, the machine's load being what it is
    // at that moment; the first start also writes every profile's settings, so it is not counted.
    let store = Arc::new(store);
    let (mut readies, mut ratios, mut first) = (Vec::new(), Vec::new(), (Duration::ZERO, 0.0));
    let mut running = None;
    for i in 0..=starts.max(1) {
        if let Some(r) = running.take() {
            daemon::Running::stop(r).await?;
        }
        let mut reads = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            store.scan_rows()?;
            reads.push(t.elapsed());
        }
        let base = median(reads);
        let mut opts = daemon::Options::new(paths.clone(), Arc::new(SystemClock));
        opts.store = Some(store.clone());
        let t = Instant::now();
        running = Some(daemon::start(opts).await?);
        let ready = t.elapsed();
        let ratio = ready.as_secs_f64() / base.as_secs_f64();
        match i {
            0 => first = (ready, ratio),
            _ => {
                readies.push(ready);
                ratios.push(ratio);
            }
        }
    }
    let running = running.expect("started");
    println!(
        "  first     start, storing every profile's settings: ready in {:.0} ms = {:.1} × the bare read just before",
        ms(first.0),
        first.1
    );
    ratios.sort_by(f64::total_cmp);
    println!(
        "  daemon    restarts: ready with {} connections in {:.0} ms (median of {}) = {:.1} × the bare read just before (median; {:.1}–{:.1}) (target ≤ 4); {:.1} × the first baseline",
        n + 1,
        ms(median(readies.clone())),
        readies.len(),
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1],
        median(readies).as_secs_f64() / baseline.as_secs_f64()
    );
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
