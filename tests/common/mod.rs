//! Test harness: a Trakt emulator, a config file, and the real `authkeeper` binary on a real
//! socket with a real redb file, all in a temporary directory.
#![allow(dead_code)]

pub mod trackers;

use authkeeper::client::{Client, ClientError, EventStream};
use authkeeper::wire::WireEvent;
use authkeeper_fixtures::{TraktEmulator, TraktOptions};
use authkeeper_state::{Cause, StateName};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// A bound on every wait, so a broken build fails instead of hanging. Not a synchronisation.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub emulator: TraktEmulator,
}

pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    /// Copies the daemon's stderr into `daemon.log`; it ends once the process has exited and
    /// every line is in the file.
    logger: tokio::task::JoinHandle<()>,
}

impl Harness {
    /// An emulator plus a config pointing the daemon at it; `settings` merges into
    /// `"authkeeper"`.
    pub async fn new(opts: TraktOptions, settings: Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let emulator = TraktEmulator::start(opts.clone()).await.unwrap();
        let mut authkeeper =
            json!({"base_url": {"trakt": emulator.url()}, "http_timeout_secs": 5, "backoff_base_secs": 1});
        for (k, v) in settings.as_object().unwrap() {
            authkeeper[k] = v.clone();
        }
        let config = json!({
            "trakt": {"client_id": opts.client_id, "client_secret": opts.client_secret},
            "authkeeper": authkeeper,
            "pairs": [{"source": "plex", "target": "trakt"}],
        });
        std::fs::write(dir.path().join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        Self { dir, emulator }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run").join("authkeeper.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.json")
    }

    /// The common options of every invocation.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--config".into(),
            self.config_path().display().to_string(),
            "--state-dir".into(),
            self.state_dir().display().to_string(),
            "--socket".into(),
            self.socket().display().to_string(),
        ]
    }

    /// Start `authkeeper daemon`; returns once it logs that it is ready. Its stderr is appended
    /// to `daemon.log`.
    pub async fn start_daemon(&self) -> Daemon {
        self.start_daemon_with(&[]).await
    }

    /// [`Harness::start_daemon`] with more options for `authkeeper daemon`.
    pub async fn start_daemon_with(&self, options: &[&str]) -> Daemon {
        self.spawn_daemon(self.args(), self.socket(), self.log_path(), options).await
    }

    /// A second daemon (`node`) on the same config: its own socket (`dir/node/s.sock`), state
    /// directory and log (`dir/node.log`).
    pub async fn start_node(&self, node: &str, options: &[&str]) -> Daemon {
        let home = self.dir.path().join(node);
        let socket = home.join("s.sock");
        let args = vec![
            "--config".into(),
            self.config_path().display().to_string(),
            "--state-dir".into(),
            home.join("state").display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
        ];
        self.spawn_daemon(args, socket, self.dir.path().join(format!("{node}.log")), options).await
    }

    async fn spawn_daemon(&self, args: Vec<String>, socket: PathBuf, log_path: PathBuf, options: &[&str]) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_authkeeper"))
            .arg("daemon")
            .args(options)
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the daemon starts");
        let stderr = child.stderr.take().unwrap();
        let mut log = tokio::fs::OpenOptions::new().create(true).append(true).open(&log_path).await.unwrap();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let logger = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut ready = Some(ready_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                log.write_all(line.as_bytes()).await.unwrap();
                log.write_all(b"\n").await.unwrap();
                log.flush().await.unwrap();
                if line.contains("authkeeper ready")
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        tokio::time::timeout(PATIENCE, ready_rx).await.expect("the daemon got ready in time").unwrap_or_else(|_| {
            panic!("the daemon exited before it was ready:\n{}", std::fs::read_to_string(&log_path).unwrap_or_default())
        });
        Daemon { child, socket, logger }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Run the CLI with the harness's options; returns (exit code, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_authkeeper"))
            .args(args)
            .args(self.args())
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Harness {
    /// Run the CLI with `input` on its standard input; returns (exit code, stdout, stderr).
    pub async fn cli_stdin(&self, args: &[&str], input: &str) -> (i32, String, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_authkeeper"))
            .args(args)
            .args(self.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).await.unwrap();
        stdin.write_all(b"\n").await.unwrap();
        drop(stdin);
        let out =
            tokio::time::timeout(PATIENCE, child.wait_with_output()).await.expect("the CLI ends in time").unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Daemon {
    /// A client of this daemon's socket.
    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    /// Send a signal by name (`STOP`, `CONT`, …).
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill").arg(format!("-{name}")).arg(self.pid().to_string()).status();
        assert!(status.unwrap().success());
    }

    /// Wait for the daemon to exit by itself; its exit code.
    pub async fn exited(mut self) -> i32 {
        let status = tokio::time::timeout(PATIENCE, self.child.wait()).await.expect("exits in time").unwrap();
        let _ = tokio::time::timeout(PATIENCE, self.logger).await;
        status.code().unwrap_or(-1)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the daemon runs")
    }

    /// `kill -9`: no shutdown code runs.
    pub async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
        let _ = self.logger.await;
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(mut self) -> i32 {
        let pid = self.child.id().unwrap() as i32;
        let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
        assert!(status.success());
        let status = tokio::time::timeout(PATIENCE, self.child.wait()).await.expect("stops in time").unwrap();
        // Every line it wrote is in daemon.log from here on.
        let _ = tokio::time::timeout(PATIENCE, self.logger).await;
        status.code().unwrap_or(-1)
    }
}

/// Wait on the events stream for a transition of a Trakt connection with this cause.
pub async fn wait_transition(
    events: &mut EventStream,
    cause: Cause,
) -> (StateName, StateName, chrono::DateTime<chrono::Utc>) {
    wait_for(events, "trakt", cause).await
}

/// Wait on the events stream for a transition of `provider`'s connections with this cause.
pub async fn wait_for(
    events: &mut EventStream,
    provider: &str,
    cause: Cause,
) -> (StateName, StateName, chrono::DateTime<chrono::Utc>) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match events.next().await {
                Some(Ok(WireEvent::Transition { provider: p, from, to, cause: c, at, .. }))
                    if c == cause && p == provider =>
                {
                    return (from, to, at);
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("events stream failed: {e}"),
                None => panic!("events stream ended while waiting for {provider} {cause:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {provider} {cause:?} transition in time"))
}

/// Check `done` every 50 ms until it holds, for at most `within`; how long it took, or `None`
/// if it never held.
pub async fn until(within: Duration, mut done: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let start = std::time::Instant::now();
    while !done().await {
        if start.elapsed() >= within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Some(start.elapsed())
}

/// `/v1/health` once `ready` holds for it.
pub async fn wait_health(client: &authkeeper::client::Client, ready: impl Fn(&Value) -> bool) -> Value {
    let mut health = Value::Null;
    let held = until(PATIENCE, async || {
        health = client.get("/v1/health").await.unwrap();
        ready(&health)
    })
    .await;
    assert!(held.is_some(), "health never became as expected: {health}");
    health
}

/// The status code and JSON body of an error answer.
pub fn api_error(e: ClientError) -> (u16, Value) {
    match e {
        ClientError::Api { status, body, .. } => (status, body),
        other => panic!("expected an API error, got {other}"),
    }
}

/// A raw request over the socket, for bodies the typed client would never send.
pub async fn raw(socket: &Path, method: reqwest::Method, path: &str, body: &'static str) -> (u16, Value) {
    authkeeper::providers::install_crypto();
    let http = reqwest::Client::builder().unix_socket(socket).build().unwrap();
    let resp = http.request(method, format!("http://localhost{path}")).body(body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

pub fn fast_trakt() -> TraktOptions {
    TraktOptions { interval: 1, ..TraktOptions::default() }
}

/// Connect `trakt/default` and approve it in the emulator; returns the events stream, which
/// has just seen the `approved` transition and the validation that follows it (whose account
/// the new token is).
pub async fn connect_approved(h: &Harness) -> EventStream {
    let client = h.client();
    let mut events = client.events().await.unwrap();
    let reply: authkeeper::wire::ConnectReply =
        client.post("/v1/connections/trakt/default/connect", None).await.unwrap();
    assert!(h.emulator.approve(reply.user_code().unwrap()));
    wait_transition(&mut events, Cause::Approved).await;
    wait_transition(&mut events, Cause::Validated).await;
    events
}

/// A store holding `n` connected Trakt accounts (`TRAKT-P01`…), each with a live grant from
/// the emulator; `expires(i)` is when account `i`'s token expires, after `lifetime` seconds.
pub fn connected_store(
    emulator: &TraktEmulator,
    n: usize,
    lifetime: i64,
    expires: impl Fn(usize) -> chrono::DateTime<chrono::Utc>,
) -> authkeeper_state::Store {
    use authkeeper_state::{Account, Commit, ConnKey, Event, Grant, Machine, Policy, Secret, Store};
    let store = Store::in_memory().unwrap();
    let mut batch = Vec::with_capacity(n);
    for i in 0..n {
        let (access, refresh) = emulator.issue_grant();
        let issued = expires(i) - chrono::TimeDelta::seconds(lifetime);
        let grant = Grant {
            refresh_token: Some(Secret::new(refresh)),
            scope: Some("public".into()),
            expires_at: Some(expires(i)),
            ..Grant::bearer(access, issued)
        };
        let mut m = Machine::new(ConnKey::new("trakt", profile(i)), issued);
        m.handle(&Event::CredentialsSupplied { grant }, issued, Policy::default(), 0.0);
        let account = Account { name: format!("user{i}").into(), id: None };
        let step = m.handle(&Event::Validated { account, grant: None }, issued, Policy::default(), 0.0);
        batch.push(Commit { machine: m, transition: step.transition });
    }
    store.commit(&batch).unwrap();
    store
}

/// `TRAKT-P01` for account 0.
pub fn profile(i: usize) -> String {
    format!("TRAKT-P{:02}", i + 1)
}

/// A daemon in this process on `clock`, with `store`, the `n` profiles of
/// [`connected_store`], and `settings` merged into `"authkeeper"`.
pub async fn start_in_process(
    dir: &Path,
    emulator: &TraktEmulator,
    clock: std::sync::Arc<authkeeper::clock::ManualClock>,
    store: authkeeper_state::Store,
    n: usize,
    settings: Value,
) -> authkeeper::daemon::Running {
    start_with(dir, emulator, clock, std::sync::Arc::new(store), n, settings).await
}

/// [`start_in_process`] with any store behind the daemon's store interface.
pub async fn start_with_store(
    dir: &Path,
    emulator: &TraktEmulator,
    clock: std::sync::Arc<authkeeper::clock::ManualClock>,
    store: std::sync::Arc<dyn authkeeper_state::ConnectionStore>,
    n: usize,
) -> authkeeper::daemon::Running {
    start_with(dir, emulator, clock, store, n, json!({})).await
}

/// [`start_in_process`] on any clock.
pub async fn start_with(
    dir: &Path,
    emulator: &TraktEmulator,
    clock: std::sync::Arc<dyn authkeeper::clock::Clock>,
    store: std::sync::Arc<dyn authkeeper_state::ConnectionStore>,
    n: usize,
    settings: Value,
) -> authkeeper::daemon::Running {
    let instances: serde_json::Map<String, Value> = (0..n).map(|i| (profile(i), json!({}))).collect();
    let mut authkeeper = json!({"base_url": {"trakt": emulator.url()}});
    for (k, v) in settings.as_object().unwrap() {
        authkeeper[k] = v.clone();
    }
    let config = json!({
        "trakt": {"client_id": "emulator-client-id", "client_secret": "emulator-client-secret", "instances": instances},
        "authkeeper": authkeeper,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let paths = authkeeper::config::Paths {
        config: dir.join("config.json"),
        state_dir: dir.join("state"),
        socket: dir.join("s.sock"),
    };
    let mut opts = authkeeper::daemon::Options::new(paths, clock);
    opts.store = Some(store);
    let running = authkeeper::daemon::start(opts).await.unwrap();
    // A large start gives its connections their first deadlines after it is ready.
    running.shared().deadlines.scheduled().await;
    running
}

/// Replace `path` the way most editors save: write a temporary file beside it, rename it over.
pub fn save_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The daemon's earliest deadline, from `/v1/health`.
pub async fn next_deadline(client: &Client) -> Option<chrono::DateTime<chrono::Utc>> {
    let health: Value = client.get("/v1/health").await.unwrap();
    health["scheduler"]["next"].as_str().map(|t| t.parse().unwrap())
}
