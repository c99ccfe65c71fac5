//! The command hook: one queue and one worker per connection, so runs for a connection never
//! overlap and never wait on another connection's, and the events task never waits on a run.

use super::{HookEvent, HookSettings};
use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Runs waiting per connection before new events for it are dropped (with a warning).
const QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot start the hook command: {0}")]
    Spawn(std::io::Error),
    #[error("the hook command ran longer than {0:?} and was killed")]
    Timeout(Duration),
    #[error("the hook command failed: {0}")]
    Wait(std::io::Error),
    #[error("the hook command exited with {0}")]
    Exit(std::process::ExitStatus),
}

struct Run {
    argv: Vec<String>,
    timeout: Duration,
    event: HookEvent,
}

#[derive(Default)]
pub struct Queues(HashMap<String, mpsc::Sender<Run>>);

impl Queues {
    /// Queue a run of the configured command for `event` behind its connection's earlier ones.
    pub fn queue(&mut self, settings: &HookSettings, event: &HookEvent) {
        let connection = event.connection();
        let queue = self.0.entry(connection.clone()).or_insert_with(|| {
            let (tx, mut rx) = mpsc::channel::<Run>(QUEUE);
            tokio::spawn(async move {
                while let Some(run) = rx.recv().await {
                    let event = run.event.event.as_str();
                    match execute(&run).await {
                        Ok(()) => debug!(event, "hook command ran"),
                        Err(e) => warn!(event, error = %e, "hook command"),
                    }
                }
            });
            tx
        });
        let run = Run { argv: settings.command.clone(), timeout: settings.timeout(), event: event.clone() };
        if queue.try_send(run).is_err() {
            warn!(connection, event = event.event.as_str(), "the hook command is falling behind: event dropped");
        }
    }
}

fn name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

async fn execute(run: &Run) -> Result<(), CommandError> {
    let event = &run.event;
    let mut command = tokio::process::Command::new(&run.argv[0]);
    command
        .args(&run.argv[1..])
        .env("AUTHKEEPER_EVENT", event.event.as_str())
        .env("AUTHKEEPER_EVENT_ID", &event.id)
        .env("AUTHKEEPER_PROVIDER", event.provider.as_deref().unwrap_or_default())
        .env("AUTHKEEPER_PROFILE", event.profile.as_deref().unwrap_or_default())
        .env("AUTHKEEPER_FROM", event.from.map(|s| s.as_str()).unwrap_or_default())
        .env("AUTHKEEPER_TO", event.to.map(|s| s.as_str()).unwrap_or_default())
        .env("AUTHKEEPER_CAUSE", event.cause.as_ref().map(name).unwrap_or_default())
        .env("AUTHKEEPER_LOGIN_URL", event.login_url.as_ref().map(|u| u.expose()).unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(CommandError::Spawn)?;
    let mut body = serde_json::to_vec(event).expect("an event serializes");
    body.push(b'\n');
    let finished = tokio::time::timeout(run.timeout, async {
        if let Some(mut stdin) = child.stdin.take() {
            // A program that does not read its input is its own business.
            let _ = stdin.write_all(&body).await;
        }
        child.wait().await
    })
    .await;
    match finished {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(CommandError::Exit(status)),
        Ok(Err(e)) => Err(CommandError::Wait(e)),
        Err(_) => {
            let _ = child.kill().await;
            Err(CommandError::Timeout(run.timeout))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(script: &str, timeout: Duration) -> Run {
        let argv = vec!["/bin/sh".into(), "-c".into(), script.into()];
        Run { argv, timeout, event: HookEvent::new(super::super::EventKind::Warning, chrono::Utc::now()) }
    }

    #[tokio::test]
    async fn a_run_past_its_timeout_is_killed_and_a_failure_is_reported() {
        let started = std::time::Instant::now();
        let slow = execute(&run("exec sleep 30", Duration::from_millis(200))).await;
        assert!(matches!(slow, Err(CommandError::Timeout(_))), "{slow:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "killed, not waited for");
        let failed = execute(&run("cat >/dev/null; exit 3", Duration::from_secs(10))).await;
        assert!(matches!(failed, Err(CommandError::Exit(s)) if s.code() == Some(3)), "{failed:?}");
        let fine = execute(&run("test \"$AUTHKEEPER_EVENT\" = warning", Duration::from_secs(10))).await;
        assert!(fine.is_ok(), "{fine:?}");
        let missing = execute(&Run { argv: vec!["/nonexistent/hook".into()], ..run("", Duration::from_secs(1)) }).await;
        assert!(matches!(missing, Err(CommandError::Spawn(_))), "{missing:?}");
    }
}
