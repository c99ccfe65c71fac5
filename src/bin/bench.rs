//! Benchmarks, each reported as a ratio to a baseline measured in the same run (these machines
//! are shared and noisy). `cargo run --release --bin bench -- <scenario>`; see BENCHMARKS.md.

use authkeeper::client::Client;
use authkeeper::clock::SystemClock;
use authkeeper::config::{self, Config, Paths};
use authkeeper::daemon;
use authkeeper::wire::WireEvent;
use authkeeper_fixtures::{TraktEmulator, TraktOptions};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "authkeeper benchmarks: each figure beside a baseline measured in the same run")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Reload a config of N profiles where one changed, against a bare serde_json parse
    ConfigReload {
        #[arg(long, default_value_t = 10_000)]
        profiles: usize,
        #[arg(long, default_value_t = 31)]
        rounds: usize,
    },
    /// Durable transitions: many connections committing at once through the group-commit
    /// thread, against one durable transaction per transition
    Commits {
        /// Connections committing concurrently
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Transitions each
        #[arg(long, default_value_t = 20)]
        each: usize,
        /// Transitions in the one-per-transaction baseline
        #[arg(long, default_value_t = 300)]
        baseline: usize,
    },
    /// 100,000 connections: rebuilding every deadline against reading the rows, the deadline
    /// queue's memory, and the scheduler's wakeups in an idle minute
    Scheduler {
        #[arg(long, default_value_t = 100_000)]
        connections: usize,
        /// Seconds to watch the idle daemon
        #[arg(long, default_value_t = 60)]
        idle_secs: u64,
    },
}

/// Median of `rounds` timings of `f`.
fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn crosswatch_config(profiles: usize, changed: Option<usize>, emulator: &str) -> String {
    let mut instances = serde_json::Map::new();
    for i in 1..=profiles {
        let client = if changed == Some(i) { format!("client-{i}-changed") } else { format!("client-{i}") };
        instances.insert(
            format!("TRAKT-P{i:02}"),
            json!({"client_id": client, "client_secret": format!("secret-{i}"), "label": format!("user {i}"),
                   "sync_watchlist": i % 2 == 0, "history": {"enabled": true, "days": 30}}),
        );
    }
    let v = json!({
        "pairs": (0..50).map(|i| json!({"source": "plex", "target": "trakt", "id": i, "mode": "two-way"})).collect::<Vec<_>>(),
        "sync": {"interval_minutes": 60, "dry_run": false, "features": ["watchlist", "ratings", "history"]},
        "plex": {"account_token": "plex-token", "server_url": "http://192.168.1.10:32400"},
        "trakt": {"client_id": "base-client", "client_secret": "base-secret", "instances": instances},
        "authkeeper": {"base_url": {"trakt": emulator}},
    });
    serde_json::to_string_pretty(&v).unwrap()
}

async fn config_reload(profiles: usize, rounds: usize) -> anyhow::Result<()> {
    let emulator = TraktEmulator::start(TraktOptions::default()).await?;
    let before = crosswatch_config(profiles, None, &emulator.url());
    let after = crosswatch_config(profiles, Some(profiles / 2), &emulator.url());
    println!("config-reload: {profiles} profiles, {} KiB, profile {} changed", after.len() / 1024, profiles / 2);

    // CPU: the reload's parse + diff, against a bare serde_json parse of the same text.
    let old = Config::parse(&before)?;
    let (mut base, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let v: Value = serde_json::from_str(&after)?;
        base.push(t.elapsed());
        drop(v);
        let t = Instant::now();
        let new = Config::parse(&after)?;
        let changes = config::diff(&old, &new);
        ours.push(t.elapsed());
        assert_eq!(changes.len(), 1, "exactly one profile differs");
    }
    let (base, ours) = (median(base), median(ours));
    println!("  baseline  serde_json::from_str::<Value>      {:>8.2} ms (median of {rounds})", ms(base));
    println!("  reload    Config::parse + diff               {:>8.2} ms", ms(ours));
    println!("  ratio     {:.2} × baseline (target ≤ 3)", ours.as_secs_f64() / base.as_secs_f64());

    // End to end: a daemon holding every profile sees the edit; only one connection changes.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.json");
    std::fs::write(&path, &before)?;
    let paths = Paths { config: path.clone(), state_dir: dir.path().join("state"), socket: dir.path().join("s.sock") };
    let t = Instant::now();
    let running = daemon::start(daemon::Options::new(paths, Arc::new(SystemClock))).await?;
    println!("  daemon start with {} connections: {:.0} ms", profiles + 1, ms(t.elapsed()));
    let client = Client::new(&running.socket);
    let mut events = client.events().await?;
    let t = Instant::now();
    std::fs::write(&path, &after)?;
    let mut transitions = 0;
    let changed = loop {
        match events.next().await.expect("events")? {
            WireEvent::ConfigReloaded { changed, .. } => break changed,
            WireEvent::Transition { .. } => transitions += 1,
            _ => {}
        }
    };
    println!(
        "  edit → config_reloaded: {:.0} ms (including the {} ms debounce); changed {:?}; {} transitions",
        ms(t.elapsed()),
        100,
        changed,
        transitions
    );
    assert_eq!(changed, [format!("trakt/TRAKT-P{:02}", profiles / 2)], "only the changed connection is touched");
    running.stop().await?;
    Ok(())
}

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4
}

async fn scheduler(n: usize, idle_secs: u64) -> anyhow::Result<()> {
    use authkeeper::daemon::Deadlines;
    use authkeeper::limits::RefreshPlanner;
    use authkeeper_state::schedule::next_action;
    use authkeeper_state::{Account, Commit, ConnKey, Credentials, Event, Machine, Policy, Secret, Store};
    use chrono::{TimeDelta, Utc};

    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.redb");
    let now = Utc::now();
    let policy = Policy { validate_every: TimeDelta::days(7), ..Policy::default() };
    {
        let store = Store::open(&db)?;
        let mut batch = Vec::new();
        for i in 0..n {
            // Connected, with tokens that live a week, issued over the past day.
            let issued = now - TimeDelta::seconds((i % 86_400) as i64);
            let credentials = Credentials {
                access_token: Secret::new(format!("access-{i:08}-0123456789abcdef0123456789abcdef")),
                refresh_token: Some(Secret::new(format!("refresh-{i:08}-0123456789abcdef0123456789abcdef"))),
                token_type: "bearer".into(),
                scope: Some("public".into()),
                issued_at: issued,
                expires_at: Some(issued + TimeDelta::days(7)),
            };
            let mut m = Machine::new(ConnKey::new("trakt", format!("TRAKT-P{:02}", i + 1)), issued);
            m.handle(&Event::CredentialsSupplied { credentials }, issued, policy, 0.0);
            let step = m.handle(
                &Event::Validated { account: Account { name: format!("user{i}"), id: None } },
                issued,
                policy,
                0.0,
            );
            batch.push(Commit { machine: m, transition: step.transition });
            if batch.len() == 10_000 {
                store.commit(&batch)?;
                batch.clear();
            }
        }
        store.commit(&batch)?;
    }
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
        for m in store.load_all()? {
            let next = next_action(&m, &policy).map(|(at, action)| match action {
                authkeeper_state::Action::Refresh => planner.plan(&m.key().to_string(), at, now),
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

    // Memory of the deadline queue (and refresh plan) alone.
    let machines = store.load_all()?;
    let plans: Vec<_> = machines.iter().map(|m| (m.key().clone(), next_action(m, &policy))).collect();
    drop(machines);
    let before = rss_kib();
    let deadlines = Deadlines::default();
    let planner = RefreshPlanner::new(8.0);
    for (key, next) in &plans {
        let at =
            next.map(
                |(at, a)| {
                    if a == authkeeper_state::Action::Refresh { planner.plan(&key.to_string(), at, now) } else { at }
                },
            );
        deadlines.set(key, at);
    }
    let after = rss_kib();
    println!(
        "  memory    deadline queue + refresh plan: {} KiB for {n} connections ({} bytes each)",
        after.saturating_sub(before),
        after.saturating_sub(before) * 1024 / n as u64
    );
    drop((deadlines, planner, plans));

    // An idle daemon holding all of them: how often does its scheduler wake in a minute?
    let instances: serde_json::Map<String, Value> =
        (0..n).map(|i| (format!("TRAKT-P{:02}", i + 1), json!({}))).collect();
    let config = json!({
        "trakt": {"client_id": "c", "client_secret": "s", "instances": instances},
        "authkeeper": {"base_url": {"trakt": "http://127.0.0.1:9"}, "validate_every_secs": 7 * 86_400},
    });
    std::fs::write(dir.path().join("config.json"), config.to_string())?;
    let paths = Paths {
        config: dir.path().join("config.json"),
        state_dir: dir.path().join("state"),
        socket: dir.path().join("s.sock"),
    };
    let mut opts = daemon::Options::new(paths, Arc::new(SystemClock));
    opts.store = Some(store);
    let t = Instant::now();
    let running = daemon::start(opts).await?;
    println!("  daemon    ready with {} connections in {:.0} ms", n + 1, ms(t.elapsed()));
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

async fn commits(connections: usize, each: usize, baseline: usize) -> anyhow::Result<()> {
    use authkeeper::daemon::Committer;
    use authkeeper_state::{Account, Commit, ConnKey, Event, Machine, Policy, Store};
    use chrono::Utc;

    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("bench.redb"))?;
    // A validated transition (connected → connected, one history row) for connection `i`.
    let step = |m: &mut Machine| {
        let s = m.handle(
            &Event::Validated { account: Account { name: "u".into(), id: None } },
            Utc::now(),
            Policy::default(),
            0.0,
        );
        Commit { machine: m.clone(), transition: s.transition }
    };
    let machine = |i: usize| {
        let mut m = Machine::new(ConnKey::new("trakt", format!("TRAKT-P{i:02}")), Utc::now());
        let credentials = authkeeper_state::Credentials {
            access_token: authkeeper_state::Secret::new("a"),
            refresh_token: None,
            token_type: "bearer".into(),
            scope: None,
            issued_at: Utc::now(),
            expires_at: None,
        };
        m.handle(&Event::CredentialsSupplied { credentials }, Utc::now(), Policy::default(), 0.0);
        m
    };

    // Baseline: one durable transaction per transition, on the same disk.
    let mut m = machine(0);
    let t = Instant::now();
    for _ in 0..baseline {
        store.commit(&[step(&mut m)])?;
    }
    let base_rate = baseline as f64 / t.elapsed().as_secs_f64();

    // Group commit: every connection's actor commits as the daemon's do, each waiting for its
    // own transaction to be durable before the next.
    let (committer, thread) = Committer::spawn(store.clone());
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 1..=connections {
        let committer = committer.clone();
        let mut m = machine(i);
        tasks.spawn(async move {
            for _ in 0..each {
                let c = step(&mut m);
                committer.commit(c).await.expect("committed");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let group_rate = (connections * each) as f64 / t.elapsed().as_secs_f64();
    drop(committer);
    thread.join().ok();
    println!("commits: durable (Immediate) transitions, each acknowledged only after its commit");
    println!("  baseline  one transaction per transition   {base_rate:>10.0} /s ({baseline} transitions)");
    println!(
        "  group     {connections} connections at once        {group_rate:>10.0} /s ({} transitions)",
        connections * each
    );
    println!("  ratio     {:.1} × baseline (target ≥ 20)", group_rate / base_rate);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().scenario {
        Scenario::ConfigReload { profiles, rounds } => config_reload(profiles, rounds).await,
        Scenario::Scheduler { connections, idle_secs } => scheduler(connections, idle_secs).await,
        Scenario::Commits { connections, each, baseline } => commits(connections, each, baseline).await,
    }
}
