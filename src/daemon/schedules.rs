//! The schedules a user declares (`"authkeeper": {"schedules": {…}}`), run by
//! tokio-cron-scheduler: `validate_all` (a sweep fed through the deadline queue and the rate
//! limits, spread out, never all at once) and `compact_history`.

use super::{Command, Shared};
use crate::config::Settings;
use crate::wire::WireEvent;
use authkeeper_state::StateName;
use chrono::TimeDelta;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio_cron_scheduler::{Job, JobScheduler};
use tracing::{error, info};

/// The running cron jobs, by schedule name: (what they were made from, job id).
pub struct Schedules {
    scheduler: Option<JobScheduler>,
    jobs: BTreeMap<String, (String, uuid::Uuid)>,
}

impl Schedules {
    pub async fn new() -> Self {
        let scheduler = match JobScheduler::new().await {
            Ok(s) => match s.start().await {
                Ok(()) => Some(s),
                Err(e) => {
                    error!(error = %e, "cannot start the cron scheduler; schedules will not run");
                    None
                }
            },
            Err(e) => {
                error!(error = %e, "cannot create the cron scheduler; schedules will not run");
                None
            }
        };
        Self { scheduler, jobs: BTreeMap::new() }
    }

    /// Make the running jobs match `settings` (already validated): replace what changed.
    pub async fn apply(&mut self, settings: &Settings, shared: &Arc<Shared>) {
        let Some(scheduler) = &self.scheduler else { return };
        for name in crate::config::SCHEDULES {
            let desired = settings.schedules.get(*name).map(|expr| match *name {
                "compact_history" => format!("{expr} keep {}d", settings.history_retention_days),
                _ => expr.clone(),
            });
            if self.jobs.get(*name).map(|(d, _)| d) == desired.as_ref() {
                continue;
            }
            if let Some((_, id)) = self.jobs.remove(*name) {
                let _ = scheduler.remove(&id).await;
            }
            shared.schedules.write().unwrap().remove(*name);
            let (Some(desired), Some(expr)) = (desired, settings.schedules.get(*name)) else { continue };
            // The job holds the daemon weakly: the cron scheduler's tasks must not keep it (and
            // so the commit thread) alive past shutdown.
            let (weak, name2, days) = (Arc::downgrade(shared), *name, settings.history_retention_days);
            let job = Job::new_async(expr.as_str(), move |_, _| {
                let shared = weak.upgrade();
                Box::pin(async move {
                    if let Some(shared) = shared {
                        run(&shared, name2, days).await;
                    }
                })
            });
            match job {
                Ok(job) => match scheduler.add(job).await {
                    Ok(id) => {
                        info!(schedule = *name, cron = %expr, "schedule set");
                        self.jobs.insert(name.to_string(), (desired, id));
                        shared.schedules.write().unwrap().insert(name.to_string(), expr.clone());
                    }
                    Err(e) => error!(schedule = *name, error = %e, "cannot add the schedule"),
                },
                Err(e) => error!(schedule = *name, error = %e, "cannot build the schedule"),
            }
        }
    }

    pub async fn stop(&mut self) {
        if let Some(mut s) = self.scheduler.take() {
            let _ = s.shutdown().await;
        }
    }
}

async fn run(shared: &Arc<Shared>, name: &'static str, retention_days: u64) {
    let now = shared.clock.now();
    let detail = match name {
        "validate_all" => {
            // Spread the sweep over the time half of each provider's global rate needs, so
            // that it never crowds out refreshes and never goes all at once.
            let targets: Vec<_> = shared
                .conns
                .read()
                .unwrap()
                .iter()
                .filter(|(_, s)| s.committed.state_name() == StateName::Connected)
                .map(|(k, _)| k.clone())
                .collect();
            let n = targets.len().max(1) as f64;
            for (i, key) in targets.iter().enumerate() {
                let per_second = shared.gates.get(key.provider.as_str()).map_or(10.0, |g| g.limits().per_second);
                let window_ms = n / (per_second * 0.5) * 1000.0;
                let at = now + TimeDelta::milliseconds((window_ms * i as f64 / n) as i64);
                let _ = shared.send(key, Command::SweepAt(at)).await;
            }
            format!("{} connections to validate", targets.len())
        }
        "compact_history" => {
            let store = shared.store.clone();
            let cutoff = now - TimeDelta::days(retention_days as i64);
            match tokio::task::spawn_blocking(move || store.compact_history(cutoff)).await {
                Ok(Ok(n)) => format!("{n} history rows older than {retention_days} days removed"),
                Ok(Err(e)) => format!("failed: {e}"),
                Err(e) => format!("failed: {e}"),
            }
        }
        _ => return,
    };
    info!(schedule = name, %detail, "schedule ran");
    let _ = shared.events.send(WireEvent::ScheduleRan { schedule: name.to_owned(), detail, at: now });
}
