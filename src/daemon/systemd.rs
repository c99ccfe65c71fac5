//! Living under systemd: `Type=notify` readiness (`READY=1` once the control socket answers),
//! `STOPPING=1` at shutdown, and watchdog pings while `WATCHDOG_USEC` asks for them. Outside
//! systemd (no `NOTIFY_SOCKET`) every call does nothing.

use sd_notify::NotifyState;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, warn};

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// The control socket answers: tell systemd, with a status line for `systemctl status`.
pub fn ready(connections: usize) {
    let status = format!("{connections} connections");
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Shutdown has begun.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// Ping the watchdog at half its interval until shutdown, when systemd asked for one.
pub fn watchdog(mut shutdown: watch::Receiver<bool>) {
    // WATCHDOG_PID, when set, names the process meant (as sd_watchdog_enabled(3) reads it).
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let ours = std::env::var("WATCHDOG_PID").map_or(true, |p| p.parse() == Ok(std::process::id()));
    if usec == 0 || !ours {
        return;
    }
    let every = Duration::from_micros(usec / 2);
    debug!(every_ms = every.as_millis() as u64, "systemd watchdog enabled");
    tokio::spawn(async move {
        loop {
            notify(&[NotifyState::Watchdog]);
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    });
}
