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
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashSet};
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
    /// Fills under way (see [`Deadlines::begin_fill`]), and the connections whose deadline was
    /// set since the first began: theirs is newer than what a fill computed.
    fills: usize,
    touched: HashSet<ConnKey, foldhash::fast::RandomState>,
}

impl Inner {
    fn touch(&mut self, key: &ConnKey) {
        if self.fills > 0 {
            self.touched.insert(key.clone());
        }
    }
}

pub struct Deadlines {
    inner: Mutex<Inner>,
    /// Signalled when a new deadline is earlier than every other.
    earlier: Notify,
    wakes: AtomicU64,
    idle_wakes: AtomicU64,
    /// One permit for each woken connection, held until it has done what was due.
    awake: Arc<Semaphore>,
    /// Connections still waiting for their first deadline from a fill.
    unscheduled: watch::Sender<usize>,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            earlier: Notify::new(),
            wakes: AtomicU64::new(0),
            idle_wakes: AtomicU64::new(0),
            awake: Arc::new(Semaphore::new(MAX_AWAKE)),
            unscheduled: watch::Sender::new(0),
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
    /// Connections not given their first deadline yet (a large start schedules them after
    /// the daemon is ready).
    pub unscheduled: usize,
}

impl Deadlines {
    /// Set (or with `None`, clear) `key`'s deadline.
    pub fn set(&self, key: &ConnKey, at: Option<DateTime<Utc>>) {
        let mut inner = self.inner.lock().unwrap();
        inner.touch(key);
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

    /// Set the deadlines of connections that have none yet: the queue is built apart and
    /// merged in one go. While a fill is under way, a connection whose deadline was set since
    /// it began keeps that one.
    pub fn set_many(&self, deadlines: Vec<(ConnKey, DateTime<Utc>)>) {
        self.merge(deadlines, false);
    }

    fn merge(&self, deadlines: Vec<(ConnKey, DateTime<Utc>)>, filling: bool) {
        let earliest = deadlines.iter().map(|(_, at)| *at).min();
        let mut at = FastMap::with_capacity_and_hasher(deadlines.len(), Default::default());
        let mut queue = Vec::with_capacity(deadlines.len());
        for (key, t) in deadlines {
            at.insert(key.clone(), t);
            queue.push((t, key));
        }
        let mut fresh = Inner { queue: queue.into_iter().collect(), at, ..Inner::default() };
        let mut inner = self.inner.lock().unwrap();
        let first = inner.queue.first().map(|(at, _)| *at);
        for key in &inner.touched {
            if let Some(t) = fresh.at.remove(key) {
                fresh.queue.remove(&(t, key.clone()));
            }
        }
        // Newer than what another fill computed (a fill's own connections are in no other).
        if inner.fills > 0 && !filling {
            inner.touched.extend(fresh.at.keys().cloned());
        }
        // The smaller goes into the larger (at start-up the queue is empty); the new deadline
        // wins where a connection has both.
        let old =
            Inner { queue: std::mem::take(&mut inner.queue), at: std::mem::take(&mut inner.at), ..Inner::default() };
        let (old_is_larger, (mut into, from)) = match old.queue.len() > fresh.queue.len() {
            true => (true, (old, fresh)),
            false => (false, (fresh, old)),
        };
        for (t, key) in from.queue {
            match into.at.entry(key.clone()) {
                Entry::Vacant(e) => {
                    e.insert(t);
                    into.queue.insert((t, key));
                }
                Entry::Occupied(mut e) if old_is_larger => {
                    let replaced = e.insert(t);
                    into.queue.remove(&(replaced, key.clone()));
                    into.queue.insert((t, key));
                }
                Entry::Occupied(_) => {}
            }
        }
        (inner.queue, inner.at) = (into.queue, into.at);
        drop(inner);
        if earliest.is_some_and(|e| first.is_none_or(|f| e < f)) {
            self.earlier.notify_one();
        }
    }

    /// `n` connections are about to be scheduled in the background: until the fill ends, a
    /// deadline set for any connection is newer than the one the fill computed.
    pub fn begin_fill(self: &Arc<Self>, n: usize) -> Fill {
        self.inner.lock().unwrap().fills += 1;
        self.unscheduled.send_modify(|u| *u += n);
        Fill { deadlines: self.clone(), n }
    }

    /// Once every connection has its first deadline (no fill under way).
    pub async fn scheduled(&self) {
        let mut unscheduled = self.unscheduled.subscribe();
        let _ = unscheduled.wait_for(|u| *u == 0).await;
    }

    pub fn stats(&self) -> Stats {
        let inner = self.inner.lock().unwrap();
        Stats {
            deadlines: inner.queue.len(),
            next: inner.queue.first().map(|(at, _)| *at),
            wakes: self.wakes.load(Ordering::Relaxed),
            idle_wakes: self.idle_wakes.load(Ordering::Relaxed),
            unscheduled: *self.unscheduled.borrow(),
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

/// A fill under way ([`Deadlines::begin_fill`]). It ends when dropped, with the deadlines given
/// to [`Fill::finish`] or, if the work that computed them did not finish, none.
pub struct Fill {
    deadlines: Arc<Deadlines>,
    n: usize,
}

impl Fill {
    /// Set the deadlines the fill computed, except where a newer one was set meanwhile.
    pub fn finish(self, deadlines: Vec<(ConnKey, DateTime<Utc>)>) {
        self.deadlines.merge(deadlines, true);
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        let mut inner = self.deadlines.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        inner.fills -= 1;
        if inner.fills == 0 {
            inner.touched = HashSet::default();
        }
        drop(inner);
        self.deadlines.unscheduled.send_modify(|u| *u -= self.n);
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

    #[tokio::test]
    async fn a_deadline_set_while_a_fill_runs_is_kept_over_the_one_the_fill_computed() {
        let d = Arc::new(Deadlines::default());
        let t = Utc::now();
        let key = |p: &str| ConnKey::new("trakt", p);
        let at = |s: i64| t + TimeDelta::seconds(s);
        d.set(&key("OLD"), Some(at(30)));
        // A fill whose work failed ends all the same: nothing waits on it, nothing is kept.
        drop(d.begin_fill(2));
        d.scheduled().await;
        let fill = d.begin_fill(3);
        assert_eq!(d.stats().unscheduled, 3);
        // Set by their tasks while the fill computed: A to a retry, C to nothing at all.
        d.set(&key("A"), Some(at(5)));
        d.set(&key("C"), None);
        fill.finish(vec![(key("A"), at(100)), (key("B"), at(50)), (key("C"), at(7))]);
        d.scheduled().await;
        let stats = d.stats();
        assert_eq!((stats.deadlines, stats.unscheduled), (3, 0), "OLD, A and B; C has none");
        let (due, next) = d.take_due(at(60), MAX_AWAKE);
        assert_eq!(due, [key("A"), key("OLD"), key("B")], "A's own deadline, not the fill's");
        assert_eq!(next, None);
        // After the fill, a deadline set is a deadline set: nothing is remembered.
        d.set_many(vec![(key("D"), at(1))]);
        d.set(&key("D"), Some(at(2)));
        assert_eq!(d.take_due(at(60), MAX_AWAKE).0, [key("D")]);
    }

    #[test]
    fn many_deadlines_merge_into_a_queue_in_time_order_either_way_round() {
        let t = Utc::now();
        let keys: Vec<ConnKey> = (0..6).map(|i| ConnKey::new("trakt", format!("P{i}"))).collect();
        for first in [1, 5] {
            let d = Deadlines::default();
            let mut expected: Vec<(DateTime<Utc>, ConnKey)> = Vec::new();
            let (before, after) = keys.split_at(first);
            for (i, k) in before.iter().enumerate() {
                d.set(k, Some(t + TimeDelta::seconds(10 * i as i64)));
                expected.push((t + TimeDelta::seconds(10 * i as i64), k.clone()));
            }
            let many: Vec<_> =
                after.iter().enumerate().map(|(i, k)| (k.clone(), t + TimeDelta::seconds(i as i64 * 7 + 3))).collect();
            expected.extend(many.iter().map(|(k, at)| (*at, k.clone())));
            d.set_many(many);
            expected.sort();
            let (due, next) = d.take_due(t + TimeDelta::days(1), MAX_AWAKE);
            assert_eq!(due, expected.into_iter().map(|(_, k)| k).collect::<Vec<_>>(), "{first} set one by one");
            assert_eq!(next, None);
        }
    }
}
