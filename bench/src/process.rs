//! The daemon as users run it: the release `authkeeper` binary in its own process, a store
//! filled with connected connections, a load generator that speaks HTTP over the unix socket,
//! and the bare hyper server that is the baseline for it.

use authkeeper_state::{Account, Commit, ConnKey, Event, Grant, Machine, Policy, Secret, Store};
use chrono::{DateTime, TimeDelta, Utc};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::{UnixListener, UnixStream};

/// Fill `db` with `n` connected Trakt connections (`TRAKT-P01`…) whose week-long tokens were
/// issued and validated over the past hour, in batches of 10,000 per transaction. (Validation
/// is at least daily, never sooner than half a day after the last, so none is due for hours.)
pub fn populate(db: &Path, n: usize, now: DateTime<Utc>) -> anyhow::Result<Store> {
    populate_as(db, n, now, profile)
}

/// [`populate`] with profiles named by `name` (`discord:7` for owners' connections).
pub fn populate_as(db: &Path, n: usize, now: DateTime<Utc>, name: fn(usize) -> String) -> anyhow::Result<Store> {
    populate_with(db, n, name, TimeDelta::days(7), |i| {
        let issued = now - TimeDelta::seconds((i % 3_600) as i64);
        let access = format!("access-{i:08}-0123456789abcdef0123456789abcdef");
        let refresh = format!("refresh-{i:08}-0123456789abcdef0123456789abcdef");
        (access, refresh, issued)
    })
}

/// `n` connected Trakt connections named by `name`, connection `i` on the grant `grant(i)`
/// (access token, refresh token, when it was issued and validated), which lives `lifetime`.
pub fn populate_with(
    db: &Path,
    n: usize,
    name: fn(usize) -> String,
    lifetime: TimeDelta,
    mut grant: impl FnMut(usize) -> (String, String, DateTime<Utc>),
) -> anyhow::Result<Store> {
    let store = Store::open(db)?;
    let mut batch = Vec::new();
    for i in 0..n {
        batch.push(connected_for(name(i), i, grant(i), lifetime));
        if batch.len() == 10_000 {
            store.commit(&batch)?;
            batch.clear();
        }
    }
    store.commit(&batch)?;
    Ok(store)
}

/// Connected Trakt connection `profile` (account `user{i}`) on a week-long grant issued and
/// validated at `issued`, with the history row of its validation.
pub fn connected(profile: String, i: usize, access: String, refresh: String, issued: DateTime<Utc>) -> Commit {
    connected_for(profile, i, (access, refresh, issued), TimeDelta::days(7))
}

/// [`connected`] on a grant (access token, refresh token, issued at) that lives `lifetime`.
pub fn connected_for(
    profile: String,
    i: usize,
    (access, refresh, issued): (String, String, DateTime<Utc>),
    lifetime: TimeDelta,
) -> Commit {
    let policy = Policy { validate_every: TimeDelta::days(7), ..Policy::default() };
    let grant = Grant {
        refresh_token: Some(Secret::new(refresh)),
        scope: Some("public".into()),
        expires_at: Some(issued + lifetime),
        ..Grant::bearer(access, issued)
    };
    let mut m = Machine::new(ConnKey::new("trakt", profile), issued);
    m.handle(&Event::CredentialsSupplied { grant }, issued, policy, 0.0);
    let account = Account { name: format!("user{i}").into(), id: None };
    let step = m.handle(&Event::Validated { account, grant: None }, issued, policy, 0.0);
    Commit { machine: m, transition: step.transition }
}

/// The profile id of the `i`-th populated connection.
pub fn profile(i: usize) -> String {
    format!("TRAKT-P{:02}", i + 1)
}

/// `dir/state/authkeeper.redb` with `n` connected connections and `dir/config.json` naming them.
pub fn prepare(dir: &Path, n: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("state"))?;
    drop(populate(&dir.join("state").join("authkeeper.redb"), n, Utc::now())?);
    std::fs::write(dir.join("config.json"), config(n).to_string())?;
    Ok(())
}

/// A config naming the `n` populated profiles, validating weekly, against a provider address
/// nothing listens on (nothing is due while the benchmark runs).
pub fn config(n: usize) -> Value {
    let instances: serde_json::Map<String, Value> = (0..n).map(|i| (profile(i), json!({}))).collect();
    json!({
        "trakt": {"client_id": "c", "client_secret": "s", "instances": instances},
        "authkeeper": {"base_url": {"trakt": "http://127.0.0.1:9"}, "validate_every_secs": 7 * 86_400},
    })
}

/// Build the release `authkeeper` binary beside this one (a no-op when it is up to date).
pub fn authkeeper_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let release = exe.parent().is_some_and(|d| d.ends_with("release"));
    // `cargo` from PATH, as the user ran it: `$CARGO` names the toolchain's own cargo, whose
    // builds fingerprint differently from rustup's proxy and rebuild everything once each.
    let mut build = Command::new("cargo");
    build.args(["build", "--quiet", "--bin", "authkeeper"]);
    if release {
        build.arg("--release");
    }
    anyhow::ensure!(build.status()?.success(), "building the authkeeper binary failed");
    Ok(exe.with_file_name("authkeeper"))
}

/// A process serving a unix socket, killed when dropped.
pub struct Server {
    child: Child,
    pub socket: PathBuf,
}

impl Server {
    /// `authkeeper daemon` on `dir/config.json`, `dir/state` and `dir/s.sock`, logging warnings
    /// to `dir/daemon.log`.
    pub fn daemon(binary: &Path, dir: &Path) -> anyhow::Result<Self> {
        Self::daemon_with(binary, dir, &[])
    }

    /// [`Server::daemon`] with more options for `authkeeper daemon`.
    pub fn daemon_with(binary: &Path, dir: &Path, options: &[&str]) -> anyhow::Result<Self> {
        let socket = dir.join("s.sock");
        let log = std::fs::File::create(dir.join("daemon.log"))?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(dir.join("config.json"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(&socket)
            .arg("daemon")
            .args(options)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Self { child, socket })
    }

    /// This benchmark program's `bare-server` mode, answering `body` to every request.
    pub fn bare(dir: &Path, body: &[u8], content_type: &str) -> anyhow::Result<Self> {
        let socket = dir.join("bare.sock");
        let body_file = dir.join("bare.body");
        std::fs::write(&body_file, body)?;
        let child = Command::new(std::env::current_exe()?)
            .arg("bare-server")
            .arg("--socket")
            .arg(&socket)
            .arg("--body-file")
            .arg(&body_file)
            .arg("--content-type")
            .arg(content_type)
            .stdin(Stdio::null())
            .spawn()?;
        Ok(Self { child, socket })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now and at its peak, in KiB, from `/proc/PID/status`.
    pub fn memory(&self) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Memory { rss_kib: field("VmRSS:"), peak_kib: field("VmHWM:") }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status()?;
        self.child.wait()?;
        Ok(())
    }

    /// Reset the peak (`VmHWM`) to the current resident size.
    pub fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }

    /// Wait until the socket answers.
    pub async fn wait_listening(&mut self) -> anyhow::Result<()> {
        loop {
            if UnixStream::connect(&self.socket).await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("the server exited before listening: {status}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Memory {
    pub rss_kib: u64,
    pub peak_kib: u64,
}

/// Serve `body` with `content_type` to every request on `socket`, from memory: the least an
/// HTTP/1.1-over-unix-socket server can do.
pub async fn bare_server(socket: &Path, body: Bytes, content_type: String) -> anyhow::Result<()> {
    let listener = UnixListener::bind(socket)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let (body, content_type) = (body.clone(), content_type.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_: Request<Incoming>| {
                let response = Response::builder()
                    .header(hyper::header::CONTENT_TYPE, content_type.as_str())
                    .body(Full::new(body.clone()));
                async move { response }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// One keep-alive HTTP/1.1 connection to a unix socket.
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Connection {
    pub async fn open(socket: &Path) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(socket).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Self { sender })
    }

    /// GET `path`; the response's status, content type and body.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<(u16, String, Bytes)> {
        self.sender.ready().await?;
        let request = Request::get(path).header(hyper::header::HOST, "localhost").body(Empty::new())?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let content_type =
            response.headers().get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, content_type, body))
    }

    /// GET `path` and hand back its body as it streams (`/v1/events`).
    pub async fn stream(&mut self, path: &str) -> anyhow::Result<Incoming> {
        self.sender.ready().await?;
        let request = Request::get(path).header(hyper::header::HOST, "localhost").body(Empty::new())?;
        let response = self.sender.send_request(request).await?;
        anyhow::ensure!(response.status() == 200, "GET {path} answered {}", response.status());
        Ok(response.into_body())
    }

    /// GET `path` and count the body's bytes as they arrive, without keeping them.
    pub async fn get_counting(&mut self, path: &str) -> anyhow::Result<(u16, u64, Bytes)> {
        self.sender.ready().await?;
        let request = Request::get(path).header(hyper::header::HOST, "localhost").body(Empty::new())?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let (mut bytes, mut tail) = (0u64, Bytes::new());
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                bytes += data.len() as u64;
                tail = data;
            }
        }
        Ok((status, bytes, tail))
    }
}

/// What a load run saw.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// `clients` connections GET `path` back to back for `length`; every answer must be 200 with
/// `expect` as its body.
pub async fn load(socket: &Path, path: &str, clients: usize, length: Duration, expect: &Bytes) -> anyhow::Result<Load> {
    let mut connections = Vec::with_capacity(clients);
    for _ in 0..clients {
        connections.push(Connection::open(socket).await?);
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let end = start + length;
    let mut tasks = tokio::task::JoinSet::new();
    for mut c in connections {
        let (path, expect) = (path.to_owned(), expect.clone());
        tasks.spawn(async move {
            tokio::time::sleep_until(start).await;
            let mut latencies = Vec::with_capacity(1 << 14);
            while tokio::time::Instant::now() < end {
                let t = Instant::now();
                let (status, _, body) = c.get(&path).await?;
                latencies.push(t.elapsed().as_nanos() as u64);
                anyhow::ensure!(status == 200 && body == expect, "unexpected answer {status}: {body:?}");
            }
            anyhow::Ok(latencies)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)] as f64 / 1000.0;
    Ok(Load { per_sec: all.len() as f64 / elapsed, p50_us: at(0.50), p99_us: at(0.99) })
}

/// Poll `/v1/health` until it answers with at least `deadlines` scheduled; the time it took.
pub async fn wait_ready(server: &mut Server, deadlines: usize, since: Instant) -> anyhow::Result<Duration> {
    Ok(wait_answering(server, deadlines, since).await?.scheduled)
}

/// When a started daemon first answered, and when it held at least `deadlines` deadlines.
pub struct Ready {
    pub answered: Duration,
    pub scheduled: Duration,
}

/// Wait until the daemon answers `/v1/health` and its scheduler holds `deadlines` deadlines (a
/// large start sets them in the background after it answers).
pub async fn wait_answering(server: &mut Server, deadlines: usize, since: Instant) -> anyhow::Result<Ready> {
    server.wait_listening().await?;
    let mut c = Connection::open(&server.socket).await?;
    let mut answered = None;
    loop {
        let (status, _, body) = c.get("/v1/health").await?;
        if status == 200 {
            let answered = *answered.get_or_insert_with(|| since.elapsed());
            let health: Value = serde_json::from_slice(&body)?;
            if health["scheduler"]["deadlines"].as_u64().unwrap_or(0) as usize >= deadlines {
                return Ok(Ready { answered, scheduled: since.elapsed() });
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
