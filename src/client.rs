//! The socket client the CLI (and the demo) use: the same HTTP API any script can call.

use crate::wire::{ConnectReply, ConnectionView, WireEvent};
use authkeeper_state::StateName;
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("authkeeper is not running: nothing answers on {0} (start it with `authkeeper daemon`)")]
    NotRunning(PathBuf),
    #[error("{message}")]
    Api { status: u16, code: String, message: String, body: Value },
    #[error("talking to the daemon failed: {0}")]
    Transport(String),
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
    /// The command line or its input is wrong (exit status 2).
    #[error("{0}")]
    Usage(String),
}

pub struct Client {
    http: reqwest::Client,
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        crate::providers::install_crypto();
        let http = reqwest::Client::builder().unix_socket(socket).build().expect("the socket client builds");
        Self { http, socket: socket.to_owned() }
    }

    fn url(path: &str) -> String {
        format!("http://localhost{path}")
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                ClientError::NotRunning(self.socket.clone())
            } else {
                ClientError::Transport(e.to_string())
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        Err(ClientError::Api {
            status,
            code: body["error"].as_str().unwrap_or("unknown").to_owned(),
            message: body["message"].as_str().unwrap_or("the daemon gave no reason").to_owned(),
            body,
        })
    }

    async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClientError> {
        let bytes = resp.bytes().await.map_err(|e| ClientError::Transport(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Self::decode(self.send(self.http.get(Self::url(path))).await?).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: Option<Value>) -> Result<T, ClientError> {
        let mut req = self.http.post(Self::url(path));
        if let Some(body) = body {
            req = req.json(&body);
        }
        Self::decode(self.send(req).await?).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Self::decode(self.send(self.http.delete(Self::url(path))).await?).await
    }

    /// Subscribe to `/v1/events`. Subscribed once this returns.
    pub async fn events(&self) -> Result<EventStream, ClientError> {
        let resp = self.send(self.http.get(Self::url("/v1/events"))).await?;
        Ok(EventStream { resp, buf: Vec::new() })
    }
}

/// The JSON lines of `/v1/events`.
pub struct EventStream {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl EventStream {
    /// The next raw line, or `None` when the daemon closed the stream.
    pub async fn next_line(&mut self) -> Option<Result<String, ClientError>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(Ok(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned()));
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => return None,
                Err(e) => return Some(Err(ClientError::Transport(e.to_string()))),
            }
        }
    }

    pub async fn next(&mut self) -> Option<Result<WireEvent, ClientError>> {
        let line = self.next_line().await?;
        Some(line.and_then(|l| serde_json::from_str(&l).map_err(|e| ClientError::Protocol(e.to_string()))))
    }
}

pub fn connection_path(provider: &str, profile: &str) -> String {
    format!("/v1/connections/{provider}/{profile}")
}

/// One line for a transition, as the CLI and the demo print it.
pub fn describe(event: &WireEvent) -> String {
    match event {
        WireEvent::Transition { provider, profile, from, to, cause, at, detail } => {
            let cause =
                serde_json::to_value(cause).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            let detail = detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default();
            format!(
                "{} {provider}/{profile}: {} → {} ({cause}{detail})",
                at.format("%H:%M:%S"),
                from.as_str(),
                to.as_str()
            )
        }
        WireEvent::ConfigReloaded { changed, at } => {
            format!(
                "{} config reloaded; changed: {}",
                at.format("%H:%M:%S"),
                if changed.is_empty() { "nothing".into() } else { changed.join(", ") }
            )
        }
        WireEvent::ConfigWritten { changed, at } => {
            format!("{} config written back for {}", at.format("%H:%M:%S"), changed.join(", "))
        }
        WireEvent::ScheduleRan { schedule, detail, at } => {
            format!("{} schedule {schedule} ran: {detail}", at.format("%H:%M:%S"))
        }
        WireEvent::ConfigError { error, line, column, .. } => {
            format!("config error: {error} (line {}, column {})", line.unwrap_or(0), column.unwrap_or(0))
        }
        WireEvent::LinkOpened { provider, owner, at } => {
            format!("{} {owner}: {provider} link opened", at.format("%H:%M:%S"))
        }
        WireEvent::Linked { provider, owner, at } => format!("{} {owner}: linked to {provider}", at.format("%H:%M:%S")),
        WireEvent::LinkExpired { provider, owner, at } => {
            format!("{} {owner}: {provider} link expired unused", at.format("%H:%M:%S"))
        }
        WireEvent::LinkFailed { provider, owner, at, detail } => {
            let detail = detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default();
            format!("{} {owner}: {provider} link failed{detail}", at.format("%H:%M:%S"))
        }
        WireEvent::Warning { message, provider, profile, next_attempt_at, at } => {
            let whose = match (provider, profile) {
                (Some(p), Some(q)) => format!(" {p}/{q}:"),
                _ => String::new(),
            };
            let retry = next_attempt_at.map(|t| format!(" (retry at {})", t.format("%H:%M:%S"))).unwrap_or_default();
            format!("{}{whose} warning: {message}{retry}", at.format("%H:%M:%S"))
        }
    }
}

/// `connect`: start the flow, tell the user what to do, show a live countdown, and wait for
/// the outcome. `on_start` sees the 202 answer (the CLI prints it as JSON with `--json`).
pub async fn connect_and_wait(
    client: &Client,
    provider: &str,
    profile: &str,
    body: serde_json::Value,
    quiet: bool,
    on_start: impl FnOnce(&ConnectReply),
) -> Result<ConnectionView, ClientError> {
    let mut events = client.events().await?;
    let path = connection_path(provider, profile);
    let reply: ConnectReply = client.post(&format!("{path}/connect"), Some(body)).await?;
    on_start(&reply);
    let (Some(pending), true) = (&reply.pending, reply.connection.state == StateName::Pending) else {
        // Nothing for the user to do: the input was exchanged and validated already.
        return client.get(&path).await;
    };
    let (code, expires_at) = (pending.user_code.clone().unwrap_or_default(), pending.expires_at);
    if !quiet {
        eprintln!("To connect {provider} (profile {profile}):");
        match (&pending.verification_url, &pending.user_code, &pending.authorize_url) {
            (_, _, Some(url)) => eprintln!("  open   {url}"),
            (Some(url), Some(code), _) => {
                eprintln!("  1. open   {url}");
                eprintln!("  2. enter  {code}");
            }
            (None, Some(code), _) => eprintln!("  enter  {code}"),
            _ => {}
        }
        // A phone can scan the page to open instead of typing it.
        if crate::terminal::stdout_is_terminal()
            && let Some(qr) =
                pending.authorize_url.as_deref().or(pending.verification_url.as_deref()).and_then(crate::terminal::qr)
        {
            eprintln!("{qr}");
        }
    }
    let spinner = if quiet { ProgressBar::hidden() } else { ProgressBar::new_spinner() };
    spinner.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks = 0u64;
    // An approval is saved first and validated after: wait for that verdict too, so that the
    // account is known.
    let mut approved = false;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(e @ WireEvent::Transition { .. })) => {
                    let WireEvent::Transition { provider: p, profile: q, from, to, cause, .. } = &e else { unreachable!() };
                    if p == provider && q == profile {
                        spinner.suspend(|| if !quiet { eprintln!("{}", describe(&e)) });
                        if approved || (*from == StateName::Pending && *to != StateName::Pending) {
                            if *cause != authkeeper_state::Cause::Approved {
                                break;
                            }
                            approved = true;
                        }
                    }
                }
                Some(Ok(WireEvent::Warning { provider: Some(p), profile: Some(q), .. }))
                    if approved && p == provider && q == profile => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => { spinner.finish_and_clear(); return Err(e) }
                None => {
                    spinner.finish_and_clear();
                    return Err(ClientError::Transport("the daemon stopped while waiting for approval".into()));
                }
            },
            _ = tick.tick() => {
                let left = (expires_at - chrono::Utc::now()).num_seconds().max(0);
                let msg = format!("waiting for approval of {code} — {}:{:02} left", left / 60, left % 60);
                if tty || quiet {
                    spinner.set_message(msg);
                    spinner.tick();
                } else if ticks.is_multiple_of(30) {
                    eprintln!("{msg}");
                }
                ticks += 1;
            }
        }
    }
    spinner.finish_and_clear();
    client.get(&path).await
}
