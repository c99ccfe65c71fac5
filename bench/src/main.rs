//! Benchmarks, each reported as a ratio to a baseline measured in the same run (these machines
//! are shared and noisy). `cargo run --release -p authkeeper-bench -- <scenario>`; see BENCHMARKS.md.

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

mod load;
mod oha;
mod owners;
mod pg;
mod pg_refresh;
mod process;
mod scheduler;
mod startup;
mod storm;
mod tokens;

/// The system allocator, counting the bytes allocated and freed while [`live_growth`] runs,
/// so that a structure's memory is measured exactly rather than read off RSS (which freed
/// memory that is reused hides). Outside it nothing is counted: a counter every thread updates
/// on every allocation would slow the daemon's parallel start-up down in this process.
struct Counting;

static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static LIVE_BYTES: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

fn count(bytes: isize) {
    if COUNTING.load(std::sync::atomic::Ordering::Relaxed) {
        LIVE_BYTES.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

// SAFETY: every call is passed to `System` unchanged; the counter has no effect on allocation.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What `make` returns, and the bytes it left allocated (what it allocated, less what it freed).
fn live_growth<T>(make: impl FnOnce() -> T) -> (T, isize) {
    use std::sync::atomic::Ordering::SeqCst;
    LIVE_BYTES.store(0, SeqCst);
    COUNTING.store(true, SeqCst);
    let made = make();
    COUNTING.store(false, SeqCst);
    (made, LIVE_BYTES.load(SeqCst))
}

#[derive(Parser)]
#[command(about = "authkeeper benchmarks: each figure beside a baseline measured in the same run")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// N owners' connections (made through links) against N config profiles
    Owners {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
    },
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
        #[arg(long, default_value_t = 1000)]
        baseline: usize,
        /// Alternating runs of each, on one store whose history deepens every round (past the
        /// per-connection limit of 256 rows from round 14, so that old rows are dropped too)
        #[arg(long, default_value_t = 18)]
        rounds: usize,
        /// On the PostgreSQL store, in a throwaway cluster (initdb and pg_ctl must be installed)
        #[arg(long)]
        postgres: bool,
    },
    /// The daemon on PostgreSQL against the same daemon on redb: `store copy` of N connections,
    /// then cold start and idle memory of each (a throwaway cluster on a unix socket)
    PgScale {
        #[arg(long, value_delimiter = ',', default_value = "100000")]
        sizes: Vec<usize>,
    },
    /// Two daemons sharing N connections on PostgreSQL: start, memory, and how long until the
    /// connections are spread over both, against one daemon on redb
    PgShared {
        #[arg(long, default_value_t = 1_000_000)]
        connections: usize,
    },
    /// Refresh throughput: N tokens all due, rotated by the Trakt emulator with the rate limit
    /// lifted, by one daemon on redb and then by two daemons sharing PostgreSQL
    PgRefresh {
        #[arg(long, default_value_t = 1_000_000)]
        connections: usize,
    },
    /// Token lookups over the socket with 1, 8, 32 and 128 clients, against a bare hyper server
    /// answering the same bytes (and through `oha`, when it is installed)
    Tokens {
        /// Seconds each load run lasts
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        /// Runs of each (server, clients) pair, alternating; the median is reported
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
        clients: Vec<usize>,
        /// Another build of `authkeeper` (an earlier commit's, say) to run in every round after
        /// this one, against the same baseline
        #[arg(long, value_name = "BINARY")]
        compare: Option<std::path::PathBuf>,
    },
    /// Cold start and resident memory of the daemon with 0, 10,000 and 100,000 connections, and
    /// the memory `GET /v1/connections` costs at the largest size
    Scale {
        #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
        sizes: Vec<usize>,
    },
    /// The release binary's size and the daemon's idle memory with no connections
    Startup,
    /// A refresh storm: N tokens expiring within the same hour, planned as the daemon plans
    /// them; the plan must keep to Trakt's rate and refresh each before it expires
    Storm {
        #[arg(long, default_value_t = 1_000_000)]
        connections: usize,
    },
    /// Write a store of N connected connections and a config naming them into DIR, to profile
    /// the daemon by hand: `authkeeper --config DIR/config.json --state-dir DIR/state daemon`
    Prepare {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
    },
    /// 1,000 concurrent socket clients (token lookups and status calls) and 100 `/v1/events`
    /// subscribers, one of them slow, on a daemon whose connections validate on a short
    /// schedule; against the same clients on a bare hyper server
    Load {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        /// Seconds the clients run (the slow subscriber reads nothing meanwhile)
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Each connection's validation period, in seconds
        #[arg(long, default_value_t = 1)]
        validate_every: u64,
    },
    /// (internal) the baseline server: answer every request with the file's bytes
    #[command(hide = true)]
    BareServer {
        #[arg(long)]
        socket: std::path::PathBuf,
        #[arg(long)]
        body_file: std::path::PathBuf,
        #[arg(long)]
        content_type: String,
    },
    /// 100,000 connections: rebuilding every deadline against reading the rows, the deadline
    /// queue's memory, and the scheduler's wakeups in an idle minute
    Scheduler {
        #[arg(long, default_value_t = 100_000)]
        connections: usize,
        /// Seconds to watch the idle daemon
        #[arg(long, default_value_t = 60)]
        idle_secs: u64,
        /// Restarts of the daemon on the store after its first start (their median is
        /// reported against the baseline read)
        #[arg(long, default_value_t = 5)]
        starts: usize,
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
        "plex": {"server_url": "http://192.168.1.10:32400", "machine_id": "abc"},
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
async fn commits(
    connections: usize,
    each: usize,
    baseline: usize,
    rounds: usize,
    postgres: bool,
) -> anyhow::Result<()> {
    use authkeeper::daemon::Committer;
    use authkeeper_state::{Account, Commit, ConnKey, ConnectionStore, Event, Machine, Policy, Store};
    use chrono::Utc;

    let dir = tempfile::tempdir()?;
    let cluster = postgres.then(authkeeper_pgstore::cluster::Cluster::start).transpose()?;
    let store: Arc<dyn ConnectionStore> = match &cluster {
        Some(cluster) => {
            // As a daemon uses it: a member, whose commits check their leases in commit order.
            let store = authkeeper_pgstore::PgStore::open(&cluster.database("bench")?, None)?;
            store.join(Duration::from_secs(600))?;
            Arc::new(store)
        }
        None => Arc::new(Store::open(&dir.path().join("bench.redb"))?),
    };
    // A validated transition (connected → connected, one history row) for connection `i`.
    let step = |m: &mut Machine| {
        let s = m.handle(
            &Event::Validated { account: Account { name: "u".into(), id: None }, grant: None },
            Utc::now(),
            Policy::default(),
            0.0,
        );
        Commit { machine: m.clone(), transition: s.transition }
    };
    let machine = |i: usize| {
        let mut m = Machine::new(ConnKey::new("trakt", format!("TRAKT-P{i:02}")), Utc::now());
        let grant = authkeeper_state::Grant::bearer("a", Utc::now());
        m.handle(&Event::CredentialsSupplied { grant }, Utc::now(), Policy::default(), 0.0);
        m
    };

    let on = if postgres { "PostgreSQL (synchronous_commit on)" } else { "redb (Durability::Immediate)" };
    println!("commits: durable transitions on {on}, each acknowledged only after its commit");
    println!("  baseline: one transaction per transition ({baseline}); group: {connections} connections at once");
    println!("  through the daemon's commit thread, {each} transitions each; {rounds} alternating rounds");
    let (committer, thread) = Committer::spawn(store.clone(), Arc::default());
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        // Baseline: one durable transaction per transition, on the same disk.
        let mut m = machine(0);
        let t = Instant::now();
        for _ in 0..baseline {
            store.commit(&[step(&mut m)])?;
        }
        let base_rate = baseline as f64 / t.elapsed().as_secs_f64();

        // Group commit: every connection's actor commits as the daemon's do, each waiting for
        // its own transaction to be durable before the next.
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
        let ratio = group_rate / base_rate;
        println!("  round {round}: baseline {base_rate:>7.0} /s   group {group_rate:>7.0} /s   {ratio:>5.1} ×");
        ratios.push(ratio);
    }
    drop(committer);
    thread.join().ok();
    ratios.sort_by(f64::total_cmp);
    println!(
        "  ratio     {:.1} × baseline in the slowest round, {:.1} × the median of {rounds} (target ≥ 20 in every round)",
        ratios[0],
        ratios[ratios.len() / 2]
    );
    Ok(())
}

/// A daemon process on a fresh store of `n` connected connections (and the config naming them).
pub(crate) fn daemon_with(
    binary: &std::path::Path,
    dir: &std::path::Path,
    n: usize,
) -> anyhow::Result<process::Server> {
    process::prepare(dir, n)?;
    process::Server::daemon(binary, dir)
}

async fn scale(sizes: &[usize]) -> anyhow::Result<()> {
    let binary = process::authkeeper_binary()?;
    println!("scale: the release daemon on a store of N connected connections (and a config naming them)");
    // Idle memory is read after the daemon has been ready for a while, so that start-up's
    // transient allocations do not count.
    let settle = Duration::from_secs(3);
    let dir = tempfile::tempdir()?;
    let mut empty = daemon_with(&binary, dir.path(), 0)?;
    let t = Instant::now();
    let cold0 = process::wait_ready(&mut empty, 0, t).await?;
    tokio::time::sleep(settle).await;
    let mem0 = empty.memory();
    drop(empty);
    println!("  cold start: a restart, until every connection has its deadline (answering, in brackets, is sooner)");
    println!("  {:>7} | {:>18} | {:>10} {:>14}", "N", "cold start", "idle RSS", "above empty");
    println!("  {:>7} | {:>16.0}ms | {:>7} KiB {:>14}", 0, ms(cold0), mem0.rss_kib, "");
    let mut colds = Vec::new();
    let mut last = None;
    for &n in sizes {
        let dir = tempfile::tempdir()?;
        // A first start keeps every profile's settings in the store (in the background, once);
        // what is measured is a restart, the daemon's steady state.
        let mut first = daemon_with(&binary, dir.path(), n)?;
        let t = Instant::now();
        let first_cold = process::wait_ready(&mut first, n, t).await?;
        tokio::time::sleep(settle).await;
        let first_rss = first.memory().rss_kib;
        first.stop()?;
        println!("  {n:>7} | first start {:.0} ms, {first_rss} KiB while it stores the settings", ms(first_cold));
        let mut daemon = process::Server::daemon(&binary, dir.path())?;
        let t = Instant::now();
        let process::Ready { answered, scheduled: cold } = process::wait_answering(&mut daemon, n, t).await?;
        tokio::time::sleep(settle).await;
        let mem = daemon.memory();
        let above = mem.rss_kib.saturating_sub(mem0.rss_kib);
        let health: Value =
            serde_json::from_slice(&process::Connection::open(&daemon.socket).await?.get("/v1/health").await?.2)?;
        anyhow::ensure!(health["connections"]["busy"] == 0, "idle means no task runs: {health}");
        println!(
            "  {n:>7} | {:>6.0}ms ({:>5.0}ms) | {:>7} KiB {:>7} B/conn",
            ms(cold),
            ms(answered),
            mem.rss_kib,
            above * 1024 / n.max(1) as u64
        );
        colds.push((n, cold, answered, mem.rss_kib));
        last = Some((n, daemon, dir, mem));
    }
    if let [(n0, c0, a0, r0), .., (n1, c1, a1, r1)] = colds[..] {
        println!(
            "  cold start grows {:.2}× for {:.0}× the connections (target ≤ 12×); answering {:.2}×",
            c1.as_secs_f64() / c0.as_secs_f64(),
            n1 as f64 / n0 as f64,
            a1.as_secs_f64() / a0.as_secs_f64()
        );
        println!(
            "  each connection from {n0} to {n1} adds {} B of RSS (target ≤ 2048)",
            r1.saturating_sub(r0) * 1024 / (n1 - n0) as u64
        );
    }
    if let Some((n, daemon, _dir, mem)) = last {
        daemon.reset_peak();
        let before = daemon.memory();
        let (status, bytes, tail) =
            process::Connection::open(&daemon.socket).await?.get_counting("/v1/connections").await?;
        let after = daemon.memory();
        anyhow::ensure!(status == 200 && tail.ends_with(b"]"), "GET /v1/connections answered {status}");
        println!(
            "  GET /v1/connections at {n}: {:.1} MiB of JSON; the daemon's peak RSS rose {} KiB above {} KiB \
             ({:.1}% of its idle RSS)",
            bytes as f64 / (1 << 20) as f64,
            after.peak_kib.saturating_sub(before.rss_kib),
            before.rss_kib,
            after.peak_kib.saturating_sub(before.rss_kib) as f64 * 100.0 / mem.rss_kib as f64
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().scenario {
        Scenario::ConfigReload { profiles, rounds } => config_reload(profiles, rounds).await,
        Scenario::Scheduler { connections, idle_secs, starts } => {
            scheduler::scheduler(connections, idle_secs, starts).await
        }
        Scenario::Commits { connections, each, baseline, rounds, postgres } => {
            commits(connections, each, baseline, rounds, postgres).await
        }
        Scenario::PgScale { sizes } => pg::scale(&sizes).await,
        Scenario::PgShared { connections } => pg::shared(connections).await,
        Scenario::PgRefresh { connections } => pg_refresh::refresh(connections).await,
        Scenario::Tokens { secs, rounds, clients, compare } => {
            tokens::tokens(Duration::from_secs_f64(secs), rounds, &clients, compare.as_deref()).await
        }
        Scenario::Scale { sizes } => scale(&sizes).await,
        Scenario::Startup => startup::startup().await,
        Scenario::Storm { connections } => storm::storm(connections),
        Scenario::Owners { connections } => owners::owners(connections).await,
        Scenario::Load { connections, clients, subscribers, secs, validate_every } => {
            load::load(load::Options { connections, clients, subscribers, secs, validate_every }).await
        }
        Scenario::Prepare { dir, connections } => process::prepare(&dir, connections),
        Scenario::BareServer { socket, body_file, content_type } => {
            process::bare_server(&socket, std::fs::read(body_file)?.into(), content_type).await
        }
    }
}
