//! One deadline queue for every connection's next timer (poll, refresh, validation, retry), and
//! one task that sleeps until the earliest, as in tokio's mini-redis. 100,000 connections are
//! 100,000 entries here, not 100,000 sleeping tasks. Deadlines are wall-clock times read
//! through the injected clock; the task never sleeps more than a minute, so a suspend or a
//! clock jump is noticed within one.

use super::{Command, Shared};
use crate::clock::MAX_SLEEP;
use crate::limits::FastMap;
use authkeeper_state::ConnKey;
use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

/// Connections woken by their deadline that may be at work at once. The rest wait in the queue,
/// so a storm of due refreshes costs this many tasks and provider calls in flight, not one each.
pub const MAX_AWAKE: usize = 512;

#[derive(Default)]
struct Inner {
    queue: BTreeSet<(DateTime<Utc>, ConnKey)>,
    at: FastMap<ConnKey, DateTime<Utc>>,
}

pub struct Deadlines {
    inner: Mutex<Inner>,
    /// Signalled when a new deadline is earlier than every other.
    earlier: Notify,
    wakes: AtomicU64,
    idle_wakes: AtomicU64,
    /// One permit for each woken connection, held until it has done what was due.
    awake: Arc<Semaphore>,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            earlier: Notify::new(),
            wakes: AtomicU64::new(0),
            idle_wakes: AtomicU64::new(0),
            awake: Arc::new(Semaphore::new(MAX_AWAKE)),
        }
    }
}

/// A woken connection's place among the [`MAX_AWAKE`]: dropped when its work is done.
pub type WakePermit = OwnedSemaphorePermit;

/// For `/v1/health` and the benchmarks.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub deadlines: usize,
    pub next: Option<DateTime<Utc>>,
    /// Times the task woke up.
    pub wakes: u64,
    /// Wakes that found nothing due (the once-a-minute re-check, or a clock that moved back).
    pub idle_wakes: u64,
}

impl Deadlines {
    /// Set (or with `None`, clear) `key`'s deadline.
    pub fn set(&self, key: &ConnKey, at: Option<DateTime<Utc>>) {
        let mut inner = self.inner.lock().unwrap();
        if inner.at.get(key) == at.as_ref() {
            return;
        }
        if let Some(old) = inner.at.remove(key) {
            inner.queue.remove(&(old, key.clone()));
        }
        let Some(at) = at else { return };
        let earliest = inner.queue.first().is_none_or(|(first, _)| at < *first);
        inner.queue.insert((at, key.clone()));
        inner.at.insert(key.clone(), at);
        drop(inner);
        if earliest {
            self.earlier.notify_one();
        }
    }

    /// Set the deadlines of connections that have none yet (start-up): filled in one go.
    pub fn set_many(&self, deadlines: Vec<(ConnKey, DateTime<Utc>)>) {
        let mut inner = self.inner.lock().unwrap();
        let first = inner.queue.first().map(|(at, _)| *at);
        let earliest = deadlines.iter().map(|(_, at)| *at).min();
        if inner.queue.is_empty() {
            inner.at.reserve(deadlines.len());
            let mut queue = Vec::with_capacity(deadlines.len());
            for (key, at) in deadlines {
                inner.at.insert(key.clone(), at);
                queue.push((at, key));
            }
            inner.queue = queue.into_iter().collect();
        } else {
            for (key, at) in deadlines {
                if let Some(old) = inner.at.insert(key.clone(), at) {
                    inner.queue.remove(&(old, key.clone()));
                }
                inner.queue.insert((at, key));
            }
        }
        drop(inner);
        if earliest.is_some_and(|e| first.is_none_or(|f| e < f)) {
            self.earlier.notify_one();
        }
    }

    pub fn stats(&self) -> Stats {
        let inner = self.inner.lock().unwrap();
        Stats {
            deadlines: inner.queue.len(),
            next: inner.queue.first().map(|(at, _)| *at),
            wakes: self.wakes.load(Ordering::Relaxed),
            idle_wakes: self.idle_wakes.load(Ordering::Relaxed),
        }
    }

    /// Take up to `most` deadlines at or before `now`; return them and the next one left.
    fn take_due(&self, now: DateTime<Utc>, most: usize) -> (Vec<ConnKey>, Option<DateTime<Utc>>) {
        let mut inner = self.inner.lock().unwrap();
        let mut due = Vec::new();
        while let Some((at, _)) = inner.queue.first() {
            if *at > now || due.len() == most {
                break;
            }
            let (_, key) = inner.queue.pop_first().expect("looked at");
            inner.at.remove(&key);
            due.push(key);
        }
        (due, inner.queue.first().map(|(at, _)| *at))
    }

    /// Wake each connection whose deadline has come, as many at once as [`MAX_AWAKE`] allows;
    /// sleep until the next (a minute at most), or until one of those woken is done.
    pub async fn run(self: Arc<Self>, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let now = shared.clock.now();
            let (due, next) = self.take_due(now, self.awake.available_permits());
            self.wakes.fetch_add(1, Ordering::Relaxed);
            if due.is_empty() {
                self.idle_wakes.fetch_add(1, Ordering::Relaxed);
            }
            for key in due {
                let permit = self.awake.clone().try_acquire_owned().expect("counted above");
                match shared.try_send(&key, Command::Wake(permit)) {
                    Ok(()) => {}
                    // Removed meanwhile: nothing to wake.
                    Err(super::DaemonError::UnknownProfile { .. } | super::DaemonError::UnknownProvider(_)) => {}
                    // Its inbox is full: it is busy; look again in a second.
                    Err(_) => self.set(&key, Some(now + TimeDelta::seconds(1))),
                }
            }
            let cap = now + TimeDelta::from_std(MAX_SLEEP).expect("a minute fits");
            let until = next.map_or(cap, |n| n.min(cap));
            if until <= now {
                // More are due than may be awake: wait for one of them to finish.
                tokio::select! {
                    permit = self.awake.acquire() => drop(permit),
                    _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
                }
                continue;
            }
            tokio::select! {
                _ = shared.clock.sleep_until(until) => {}
                _ = self.earlier.notified() => {}
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_keeps_one_deadline_per_connection_in_time_order() {
        let d = Deadlines::default();
        let t = Utc::now();
        let (a, b) = (ConnKey::new("trakt", "A"), ConnKey::new("trakt", "B"));
        d.set(&a, Some(t + TimeDelta::seconds(10)));
        d.set(&b, Some(t + TimeDelta::seconds(5)));
        d.set(&a, Some(t + TimeDelta::seconds(3))); // replaces a's earlier deadline
        assert_eq!(d.stats().deadlines, 2);
        let (due, next) = d.take_due(t + TimeDelta::seconds(4), MAX_AWAKE);
        assert_eq!(due, std::slice::from_ref(&a));
        assert_eq!(next, Some(t + TimeDelta::seconds(5)));
        d.set(&b, None);
        assert_eq!(d.take_due(t + TimeDelta::days(1), MAX_AWAKE), (vec![], None));
    }

    #[test]
    fn no_more_are_taken_than_may_be_awake_and_the_rest_stay_due_in_order() {
        let d = Deadlines::default();
        let t = Utc::now();
        let keys: Vec<ConnKey> = (0..5).map(|i| ConnKey::new("trakt", format!("P{i}"))).collect();
        for (i, k) in keys.iter().enumerate() {
            d.set(k, Some(t + TimeDelta::seconds(i as i64)));
        }
        let (due, next) = d.take_due(t + TimeDelta::minutes(1), 2);
        assert_eq!(due, keys[..2]);
        assert_eq!(next, Some(t + TimeDelta::seconds(2)), "the third is still due, and next");
        assert_eq!(d.take_due(t + TimeDelta::minutes(1), 10).0, keys[2..]);
    }
}
