//! `bench tokens`: token lookups over the socket against a bare hyper server answering the
//! same bytes, with our own load generator and, when it is installed, with `oha`.

use crate::{daemon_with, oha, process};
use hyper::body::Bytes;
use std::path::Path;
use std::time::{Duration, Instant};

pub async fn tokens(length: Duration, rounds: usize, clients: &[usize], compare: Option<&Path>) -> anyhow::Result<()> {
    let binary = process::authkeeper_binary()?;
    let dir = tempfile::tempdir()?;
    let path = format!("/v1/connections/trakt/{}/token", process::profile(0));
    // This build, and the build compared with it (on its own copy of the store), by label.
    let mut daemons = vec![("this build", started(&binary, &dir.path().join("this"), &path).await?)];
    if let Some(other) = compare {
        daemons.push(("compared", started(other, &dir.path().join("compared"), &path).await?));
    }
    let (body, content_type) = (daemons[0].1.body.clone(), daemons[0].1.content_type.clone());
    let mut bare = process::Server::bare(dir.path(), &body, &content_type)?;
    bare.wait_listening().await?;
    println!("tokens: GET {path} ({} bytes) from a daemon holding 1,000 connections", body.len());
    println!("  baseline: a bare hyper server in its own process answering the same bytes from memory");
    if let Some(other) = compare {
        println!("  compared: {} on its own copy of the store, run after this build in every round", other.display());
    }
    println!("  {} s per run, {rounds} alternating runs each, median", length.as_secs_f64());
    println!(
        "  {:>7} | {:>12} {:>12} {:>6} | {:>10} {:>10} {:>6} | {:>9}",
        "clients", "base req/s", "daemon req/s", "ratio", "base p99", "daemon p99", "ratio", "daemon p50"
    );
    for &n in clients {
        let mut base = Vec::new();
        let mut ours = vec![Vec::new(); daemons.len()];
        for _ in 0..rounds {
            base.push(process::load(&bare.socket, &path, n, length, &body).await?);
            for ((_, d), runs) in daemons.iter().zip(&mut ours) {
                runs.push(process::load(&d.server.socket, &path, n, length, &d.body).await?);
            }
        }
        for ((label, _), runs) in daemons.iter().zip(&ours) {
            print_row(n, &base, runs, compare.map(|_| *label));
        }
    }
    match oha::oha() {
        Some(oha) => {
            println!(
                "  oha ({}), {} s per run, {rounds} alternating runs each, median:",
                oha.display(),
                length.as_secs_f64()
            );
            for &n in clients {
                let mut base = Vec::new();
                let mut ours = vec![Vec::new(); daemons.len()];
                for _ in 0..rounds {
                    base.push(oha::run_oha(&oha, &bare.socket, &path, n, length)?);
                    for ((_, d), runs) in daemons.iter().zip(&mut ours) {
                        runs.push(oha::run_oha(&oha, &d.server.socket, &path, n, length)?);
                    }
                }
                for ((label, _), runs) in daemons.iter().zip(&ours) {
                    print_row(n, &base, runs, compare.map(|_| *label));
                }
            }
        }
        None => println!("  oha not found (cargo install oha --locked); skipped"),
    }
    Ok(())
}

/// A daemon holding 1,000 connections, and its answer to the lookup the runs make.
struct Started {
    server: process::Server,
    body: Bytes,
    content_type: String,
}

async fn started(binary: &Path, dir: &Path, path: &str) -> anyhow::Result<Started> {
    let mut server = daemon_with(binary, dir, 1_000)?;
    process::wait_ready(&mut server, 1_000, Instant::now()).await?;
    let (status, content_type, body) = process::Connection::open(&server.socket).await?.get(path).await?;
    anyhow::ensure!(status == 200, "the token lookup answered {status}");
    Ok(Started { server, body, content_type })
}

/// One row of the token table: medians of the runs, and the daemon's over the baseline's.
fn print_row(clients: usize, base: &[process::Load], ours: &[process::Load], label: Option<&str>) {
    let med = |v: &[process::Load], f: fn(&process::Load) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let (b_rps, o_rps) = (med(base, |l| l.per_sec), med(ours, |l| l.per_sec));
    let (b_p99, o_p99) = (med(base, |l| l.p99_us), med(ours, |l| l.p99_us));
    println!(
        "  {clients:>7} | {b_rps:>12.0} {o_rps:>12.0} {:>5.2}× | {b_p99:>8.0}µs {o_p99:>8.0}µs {:>5.2}× | {:>7.0}µs{}",
        o_rps / b_rps,
        o_p99 / b_p99,
        med(ours, |l| l.p50_us),
        label.map(|l| format!("  {l}")).unwrap_or_default(),
    );
}
