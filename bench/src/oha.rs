//! `oha`, when installed: a second load generator for `bench tokens`.

use super::process;
use serde_json::Value;
use std::time::Duration;

pub fn oha() -> Option<std::path::PathBuf> {
    let home = std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo/bin/oha"));
    let on_path =
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("oha")).find(|p| p.is_file()));
    on_path.or(home.filter(|p| p.is_file()))
}

pub fn run_oha(
    oha: &std::path::Path,
    socket: &std::path::Path,
    path: &str,
    clients: usize,
    length: Duration,
) -> anyhow::Result<process::Load> {
    let out = std::process::Command::new(oha)
        .args(["--no-tui", "--output-format", "json", "-c", &clients.to_string()])
        .args(["-z", &format!("{}ms", length.as_millis())])
        .arg("--unix-socket")
        .arg(socket)
        .arg(format!("http://localhost{path}"))
        .output()?;
    anyhow::ensure!(out.status.success(), "oha failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let codes = &v["statusCodeDistribution"];
    anyhow::ensure!(
        codes.as_object().is_some_and(|c| c.keys().all(|k| k == "200")),
        "oha saw answers other than 200: {codes}"
    );
    Ok(process::Load {
        per_sec: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50_us: v["latencyPercentiles"]["p50"].as_f64().unwrap_or(0.0) * 1e6,
        p99_us: v["latencyPercentiles"]["p99"].as_f64().unwrap_or(0.0) * 1e6,
    })
}
