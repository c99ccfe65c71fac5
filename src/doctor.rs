//! `authkeeper doctor`: one command that says what is wrong, and what to do about it: the
//! config (line, column and key path), file modes, the socket, the store, the clock, and
//! whether each configured provider can be reached (anonymous requests only).

use crate::config::{Config, Paths};
use crate::providers::{self, Profile};
use crate::stores::PgUrl;
use authkeeper_state::ConnKey;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

/// One finding.
pub struct Finding {
    pub ok: bool,
    pub what: String,
    /// What to do about it (empty when nothing).
    pub fix: String,
}

fn ok(what: impl Into<String>) -> Finding {
    Finding { ok: true, what: what.into(), fix: String::new() }
}

fn problem(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding { ok: false, what: what.into(), fix: fix.into() }
}

/// Run every check; the findings in order.
pub async fn run(paths: &Paths, store: Option<&PgUrl>) -> Vec<Finding> {
    let mut out = Vec::new();
    let config = check_config(&paths.config, &mut out);
    check_modes(paths, config.as_ref().map(|(c, _)| c), &mut out);
    let daemon_up = check_socket(&paths.socket, &mut out).await;
    match store.or_else(|| config.as_ref()?.0.settings.store.postgres.as_ref()) {
        Some(url) => check_postgres(url.clone(), &mut out).await,
        None => check_store(&paths.state_dir, daemon_up, &mut out),
    }
    if let Some((config, text)) = &config {
        // Only the providers the file configures: a default profile alone reaches out nowhere.
        let blocks: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).unwrap_or_default();
        check_providers(config, &blocks, &mut out).await;
    }
    out
}

/// Print the findings; the exit status (1 when something is wrong).
pub fn report(findings: &[Finding]) -> i32 {
    for f in findings {
        println!("{} {}", if f.ok { "ok     " } else { "PROBLEM" }, f.what);
        if !f.fix.is_empty() {
            println!("        → {}", f.fix);
        }
    }
    let problems = findings.iter().filter(|f| !f.ok).count();
    match problems {
        0 => {
            println!("no problems found");
            0
        }
        n => {
            println!("{n} problem{} found", if n == 1 { "" } else { "s" });
            1
        }
    }
}

/// The config and its text, when it loads.
fn check_config(path: &Path, out: &mut Vec<Finding>) -> Option<(Config, String)> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            out.push(problem(
                format!("config: {} does not exist", path.display()),
                "create it (see README, Configuration) or pass --config",
            ));
            return None;
        }
        Err(e) => {
            out.push(problem(format!("config: cannot read {}: {e}", path.display()), "check its owner and mode"));
            return None;
        }
    };
    match Config::parse_file(path, &text) {
        Ok(config) => {
            out.push(ok(format!("config: {} ({} profiles)", path.display(), config.profiles.len())));
            Some((config, text))
        }
        Err(e) => {
            let at = match e.position() {
                Some((line, column)) => {
                    let key = key_path_at(&text, line, column);
                    let key = if key.is_empty() { String::new() } else { format!(", at {key}") };
                    format!(" (line {line}, column {column}{key})")
                }
                None => String::new(),
            };
            out.push(problem(
                format!("config: {}{at}: {}", path.display(), e.message()),
                "fix that value; the daemon keeps the last good config in force meanwhile",
            ));
            None
        }
    }
}

/// The key path (`trakt.client_id`, `pairs[0].source`) of the value at a 1-based line and
/// column of `text` (JSON); empty at the top level.
pub fn key_path_at(text: &str, line: usize, column: usize) -> String {
    let offset =
        text.split_inclusive('\n').take(line.saturating_sub(1)).map(str::len).sum::<usize>() + column.saturating_sub(1);
    // A stack of containers: Some(key) in an object, None plus an index in an array.
    let mut stack: Vec<(Option<String>, usize)> = Vec::new();
    let (mut in_string, mut escaped, mut current) = (false, false, String::new());
    let mut last_string = String::new();
    for (i, c) in text.char_indices() {
        if i >= offset {
            break;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    in_string = false;
                    last_string = std::mem::take(&mut current);
                    continue;
                }
                _ => {}
            }
            current.push(c);
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => stack.push((Some(String::new()), 0)),
            '[' => stack.push((None, 0)),
            '}' | ']' => {
                stack.pop();
            }
            ':' => {
                if let Some((Some(key), _)) = stack.last_mut() {
                    *key = last_string.clone();
                }
            }
            ',' => {
                if let Some((None, index)) = stack.last_mut() {
                    *index += 1;
                }
            }
            _ => {}
        }
    }
    let mut path = String::new();
    for (key, index) in &stack {
        match key {
            Some(k) if k.is_empty() => {}
            Some(k) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
            }
            None => path.push_str(&format!("[{index}]")),
        }
    }
    path
}

fn mode(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.permissions().mode() & 0o777)
}

fn check_modes(paths: &Paths, config: Option<&Config>, out: &mut Vec<Finding>) {
    if let (Some(m), Some(config)) = (mode(&paths.config), config) {
        let holds_tokens = config.profiles.values().any(|p| holds_credential(p));
        if holds_tokens && m & 0o077 != 0 {
            out.push(problem(
                format!("config: {} holds tokens and others can read it (mode {m:o})", paths.config.display()),
                format!("chmod 600 {}", paths.config.display()),
            ));
        } else {
            out.push(ok(format!("config mode {m:o}")));
        }
    }
    for (what, path, want) in [
        ("state directory", paths.state_dir.clone(), 0o700),
        ("database", paths.state_dir.join("authkeeper.redb"), 0o600),
    ] {
        match mode(&path) {
            Some(m) if m & 0o077 != 0 => out.push(problem(
                format!("{what} {} can be read by others (mode {m:o})", path.display()),
                format!("chmod {want:o} {}", path.display()),
            )),
            Some(m) => out.push(ok(format!("{what} mode {m:o}"))),
            None => {}
        }
    }
}

fn holds_credential(p: &Profile) -> bool {
    let keys = p.provider.manifest().credential_keys;
    keys.iter().any(|k| p.block.get(*k).is_some_and(|v| v.as_str().is_some_and(|s| !s.is_empty())))
}

/// Whether a daemon answers on the socket.
async fn check_socket(path: &Path, out: &mut Vec<Finding>) -> bool {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(_) => {
            out.push(ok(format!("socket {}: no daemon running (start one with `authkeeper daemon`)", path.display())));
            return false;
        }
    };
    if !meta.file_type().is_socket() {
        out.push(problem(
            format!("socket path {} is not a socket", path.display()),
            "the daemon will not replace it: move that file away, or pass another --socket",
        ));
        return false;
    }
    let client = crate::client::Client::new(path);
    match client.get::<serde_json::Value>("/v1/health").await {
        Ok(health) => {
            if health["store"]["ok"].as_bool().unwrap_or(true) {
                out.push(ok(format!("daemon answering on {}", path.display())));
            } else {
                let error = health["store"]["error"].as_str().unwrap_or("unknown error").to_owned();
                out.push(problem(format!("the daemon's store refuses writes: {error}"), "see the daemon's log"));
            }
            true
        }
        Err(_) => {
            out.push(problem(
                format!("stale socket file {}: no daemon answers on it", path.display()),
                "a daemon that died left it; `authkeeper daemon` replaces it when it starts",
            ));
            false
        }
    }
}

fn check_store(state_dir: &Path, daemon_up: bool, out: &mut Vec<Finding>) {
    let db = state_dir.join("authkeeper.redb");
    match std::fs::metadata(&db) {
        Err(_) => out.push(ok(format!("store {}: not created yet", db.display()))),
        Ok(m) if !m.is_file() => {
            out.push(problem(format!("store {} is not a file", db.display()), "move it away; nothing was changed"))
        }
        Ok(_) if daemon_up => out.push(ok(format!("store {}: in use by the running daemon", db.display()))),
        Ok(m) => match std::fs::File::open(&db) {
            Ok(_) => out.push(ok(format!("store {} ({} KiB)", db.display(), m.len() / 1024))),
            Err(e) => out.push(problem(format!("cannot read the store {}: {e}", db.display()), "check its owner")),
        },
    }
}

/// A PostgreSQL store: reachable, and what it holds (read without changing anything).
async fn check_postgres(url: PgUrl, out: &mut Vec<Finding>) {
    let shown = url.to_string();
    let inspected = tokio::task::spawn_blocking(move || authkeeper_pgstore::PgStore::inspect(url.expose())).await;
    let newest = authkeeper_pgstore::schema::SCHEMA_VERSION;
    out.push(match inspected.expect("the inspection does not panic") {
        Ok(i) if i.schema == 0 => ok(format!("store {shown}: reachable, no tables yet (the daemon makes them)")),
        Ok(i) if i.schema > newest => problem(
            format!("store {shown}: its schema ({}) is newer than this authkeeper's ({newest})", i.schema),
            "run the authkeeper that wrote it, or a newer one; nothing was changed",
        ),
        Ok(i) => ok(format!(
            "store {shown}: schema {}, {} connections, {} daemon(s) sharing it now",
            i.schema, i.connections, i.members
        )),
        Err(e) => problem(
            format!("cannot use the store {shown}: {e}"),
            "check the URL, that PostgreSQL runs and accepts this user (pg_hba.conf)",
        ),
    });
}

/// Each configured provider's host: reachable, and its clock close to ours.
async fn check_providers(config: &Config, blocks: &serde_json::Map<String, serde_json::Value>, out: &mut Vec<Finding>) {
    let http = providers::http_client(Duration::from_secs(10));
    let mut seen = std::collections::BTreeSet::new();
    for (key, profile) in &config.profiles {
        if !blocks.contains_key(profile.provider.manifest().block) {
            continue;
        }
        let Some(url) = probe_url(key, profile) else { continue };
        if !seen.insert(url.clone()) {
            continue;
        }
        let label = profile.provider.manifest().label;
        match http.get(&url).send().await {
            Ok(resp) => {
                out.push(ok(format!("{label} reachable at {url} (HTTP {})", resp.status().as_u16())));
                if let Some(skew) = clock_skew(resp.headers())
                    && skew.abs() > 60
                {
                    out.push(problem(
                        format!("this machine's clock is {skew} s off {label}'s"),
                        "token expiry is judged by this clock: enable time sync (timedatectl set-ntp true)",
                    ));
                }
            }
            Err(e) => out.push(problem(
                format!("{label} unreachable at {url}: {}", providers::transport_error(e)),
                "check the address in the config (or base_url), DNS and the firewall",
            )),
        }
    }
}

/// Seconds between the server's `Date` and ours (positive: ours is ahead).
fn clock_skew(headers: &reqwest::header::HeaderMap) -> Option<i64> {
    let date = headers.get("date")?.to_str().ok()?;
    let theirs = chrono::DateTime::parse_from_rfc2822(date).ok()?;
    Some((chrono::Utc::now() - theirs.with_timezone(&chrono::Utc)).num_seconds())
}

/// An anonymous address of the provider behind `profile`: its server, issuer, or API origin.
fn probe_url(key: &ConnKey, profile: &Profile) -> Option<String> {
    let block = &profile.block;
    let text = |k: &str| block.get(k).and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_owned);
    let origin = |default: &str| profile.base_url.clone().unwrap_or_else(|| default.to_owned());
    let url = match key.provider.as_str() {
        "jellyfin" | "emby" => format!("{}/System/Info/Public", text("server")?.trim_end_matches('/')),
        "tautulli" => text("server_url")?,
        "oauth" => text("issuer").or_else(|| text("token_endpoint"))?,
        "trakt" => origin(providers::trakt::API),
        "plex" => origin(providers::plex::PLEX_TV),
        "simkl" => origin(providers::simkl::API),
        "anilist" => origin(providers::anilist::GRAPHQL),
        "mdblist" => origin(providers::mdblist::API),
        "tmdb" => origin(providers::tmdb::API),
        _ => return None,
    };
    Some(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_path_of_a_position_is_named() {
        let text = "{\n  \"trakt\": {\"client_id\": 5},\n  \"pairs\": [{\"a\": 1}, {\"source\": x}]\n}";
        assert_eq!(key_path_at(text, 2, 26), "trakt.client_id");
        assert_eq!(key_path_at(text, 3, 34), "pairs[1].source");
        assert_eq!(key_path_at(text, 1, 1), "");
    }
}
