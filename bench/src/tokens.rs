//! `bench tokens`: token lookups over the socket against a bare hyper server answering the
//! same bytes, with our own load generator and, when it is installed, with `oha`.

use crate::{daemon_with, oha, process};
use std::time::{Duration, Instant};

pub async fn tokens(length: Duration, rounds: usize, clients: &[usize]) -> anyhow::Result<()> {
    let binary = process::authkeeper_binary()?;
    let dir = tempfile::tempdir()?;
    let mut daemon = daemon_with(&binary, dir.path(), 1_000)?;
    process::wait_ready(&mut daemon, 1_000, Instant::now()).await?;
    let path = format!("/v1/connections/trakt/{}/token", process::profile(0));
    let (status, content_type, body) = process::Connection::open(&daemon.socket).await?.get(&path).await?;
    anyhow::ensure!(status == 200, "the token lookup answered {status}");
    let mut bare = process::Server::bare(dir.path(), &body, &content_type)?;
    bare.wait_listening().await?;
    println!("tokens: GET {path} ({} bytes) from a daemon holding 1,000 connections", body.len());
    println!("  baseline: a bare hyper server in its own process answering the same bytes from memory");
    println!("  {} s per run, {rounds} alternating runs each, median", length.as_secs_f64());
    println!(
        "  {:>7} | {:>12} {:>12} {:>6} | {:>10} {:>10} {:>6} | {:>9}",
        "clients", "base req/s", "daemon req/s", "ratio", "base p99", "daemon p99", "ratio", "daemon p50"
    );
    for &n in clients {
        let (mut base, mut ours) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            base.push(process::load(&bare.socket, &path, n, length, &body).await?);
            ours.push(process::load(&daemon.socket, &path, n, length, &body).await?);
        }
        print_row(n, &base, &ours);
    }
    match oha::oha() {
        Some(oha) => {
            println!(
                "  oha ({}), {} s per run, {rounds} alternating runs each, median:",
                oha.display(),
                length.as_secs_f64()
            );
            for &n in clients {
                let (mut base, mut ours) = (Vec::new(), Vec::new());
                for _ in 0..rounds {
                    base.push(oha::run_oha(&oha, &bare.socket, &path, n, length)?);
                    ours.push(oha::run_oha(&oha, &daemon.socket, &path, n, length)?);
                }
                print_row(n, &base, &ours);
            }
        }
        None => println!("  oha not found (cargo install oha --locked); skipped"),
    }
    Ok(())
}

/// One row of the token table: medians of the runs, and the daemon's over the baseline's.
fn print_row(clients: usize, base: &[process::Load], ours: &[process::Load]) {
    let med = |v: &[process::Load], f: fn(&process::Load) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let (b_rps, o_rps) = (med(base, |l| l.per_sec), med(ours, |l| l.per_sec));
    let (b_p99, o_p99) = (med(base, |l| l.p99_us), med(ours, |l| l.p99_us));
    println!(
        "  {clients:>7} | {b_rps:>12.0} {o_rps:>12.0} {:>5.2}× | {b_p99:>8.0}µs {o_p99:>8.0}µs {:>5.2}× | {:>7.0}µs",
        o_rps / b_rps,
        o_p99 / b_p99,
        med(ours, |l| l.p50_us)
    );
}
