//! The one place the daemon reads time. Tests drive a [`ManualClock`]; `tokio::time::pause`
//! alone would not move wall-clock time, and deadlines are kept in wall-clock time.

use chrono::{DateTime, Utc};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

/// Longest single sleep: the daemon re-checks the clock at least this often, so a suspend or
/// a clock jump is noticed within a minute.
pub const MAX_SLEEP: Duration = Duration::from_secs(60);

pub type Sleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Wall-clock time plus sleeping until a wall-clock instant.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
    /// Resolve once `now() >= at`.
    fn sleep_until(&self, at: DateTime<Utc>) -> Sleep<'_>;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> Sleep<'_> {
        Box::pin(async move {
            loop {
                let left = at - Utc::now();
                let Ok(left) = left.to_std() else { return };
                if left.is_zero() {
                    return;
                }
                tokio::time::sleep(left.min(MAX_SLEEP)).await;
            }
        })
    }
}

/// A clock that moves only when told to.
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
    tx: watch::Sender<DateTime<Utc>>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        Self { now: Mutex::new(start), tx: watch::Sender::new(start) }
    }

    /// Move time forward (or jump) to `to`; sleepers whose instant has come wake up.
    pub fn set(&self, to: DateTime<Utc>) {
        *self.now.lock().unwrap() = to;
        self.tx.send_replace(to);
    }

    pub fn advance(&self, by: chrono::TimeDelta) {
        let to = self.now() + by;
        self.set(to);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> Sleep<'_> {
        let mut rx = self.tx.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|now| *now >= at).await;
        })
    }
}

/// Wall-clock time run faster by a constant factor from a starting instant: a soak of an
/// hour of token lifetimes in a minute, with every deadline, backoff and rate limit kept in
/// the same (virtual) time by the daemon and the emulators alike.
pub struct ScaledClock {
    origin: DateTime<Utc>,
    started: tokio::time::Instant,
    factor: f64,
}

impl ScaledClock {
    /// Time starts at `origin` and runs `factor` times faster than the system's.
    pub fn new(origin: DateTime<Utc>, factor: f64) -> Self {
        Self { origin, started: tokio::time::Instant::now(), factor: factor.max(f64::MIN_POSITIVE) }
    }
}

impl Clock for ScaledClock {
    fn now(&self) -> DateTime<Utc> {
        let real = self.started.elapsed().as_secs_f64();
        self.origin + chrono::TimeDelta::microseconds((real * self.factor * 1e6) as i64)
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> Sleep<'_> {
        Box::pin(async move {
            loop {
                let Ok(left) = (at - self.now()).to_std() else { return };
                if left.is_zero() {
                    return;
                }
                tokio::time::sleep(left.div_f64(self.factor).min(MAX_SLEEP)).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    #[tokio::test]
    async fn manual_sleepers_wake_only_when_their_time_comes() {
        let start = Utc::now();
        let clock = std::sync::Arc::new(ManualClock::new(start));
        let c = clock.clone();
        let sleeper = tokio::spawn(async move { c.sleep_until(start + TimeDelta::seconds(10)).await });
        clock.advance(TimeDelta::seconds(9));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(TimeDelta::seconds(1));
        sleeper.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn scaled_sleepers_wake_after_the_scaled_real_time() {
        let clock = ScaledClock::new(Utc::now(), 60.0);
        let start = clock.now();
        let real = tokio::time::Instant::now();
        clock.sleep_until(start + TimeDelta::seconds(120)).await;
        // Two (paused, auto-advanced) tokio seconds were slept for two virtual minutes.
        assert_eq!(real.elapsed().as_secs(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn system_sleep_returns_at_once_for_the_past() {
        SystemClock.sleep_until(Utc::now() - TimeDelta::seconds(1)).await;
    }
}
