//! Rate limits per provider, on the injected clock: a global cap for the provider, per-account
//! limits where the provider counts per user (Trakt: 1,000 GETs per 5 minutes, 1 POST per
//! second), and a pause for every call when the provider answers `429` with `Retry-After`.
//! Callers reserve a slot and wait for it, so limits are never exceeded, only queued for.

use crate::clock::Clock;
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};

/// A map hashed with foldhash (seeded per process): the planner's and the deadline queue's
/// maps hold one entry per connection, and SipHash was a tenth of filling them at start-up.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// `count` calls per `per_secs` seconds, with bursts up to `count`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub count: u32,
    pub per_secs: f64,
}

/// One provider's limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Calls per second across all of the provider's connections.
    pub per_second: f64,
    /// How many of those may go back to back (1: evenly spaced).
    pub burst: u32,
    /// Per account: reads (GET).
    pub account_reads: Option<Rate>,
    /// Per account: writes (POST, PUT, DELETE).
    pub account_writes: Option<Rate>,
}

impl Default for Limits {
    fn default() -> Self {
        Self { per_second: 10.0, burst: 1, account_reads: None, account_writes: None }
    }
}

impl Limits {
    fn global_rate(&self) -> Rate {
        let burst = self.burst.max(1);
        Rate { count: burst, per_secs: burst as f64 / self.per_second.max(0.001) }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Read,
    Write,
}

/// The generic cell rate algorithm: a theoretical arrival time and a burst tolerance.
#[derive(Debug)]
struct Gcra {
    interval: TimeDelta,
    tolerance: TimeDelta,
    tat: Option<DateTime<Utc>>,
}

impl Gcra {
    fn new(rate: Rate) -> Self {
        let interval = TimeDelta::microseconds((rate.per_secs * 1e6 / rate.count.max(1) as f64) as i64);
        Self { interval, tolerance: interval * (rate.count.max(1) as i32 - 1), tat: None }
    }

    /// Reserve the earliest slot at or after `now`; returns when the call may go.
    fn reserve(&mut self, now: DateTime<Utc>) -> DateTime<Utc> {
        let tat = self.tat.map_or(now, |t| t.max(now));
        let at = now.max(tat - self.tolerance);
        self.tat = Some(tat + self.interval);
        at
    }
}

struct Inner {
    limits: Limits,
    paused_until: Option<DateTime<Utc>>,
    global: Gcra,
    accounts: HashMap<(String, Kind), Gcra>,
}

/// One provider's gate: every call to the provider passes through it.
pub struct Gate {
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
    /// When it turns true, waiting callers give up: nothing is in flight while they wait.
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Asked once a caller's slot comes, right before the call: false when this daemon may no
    /// longer call providers (its lease on a shared store lapsed while the caller waited).
    fence: Option<Fence>,
}

/// See [`Gate::with_fence`].
pub type Fence = Arc<dyn Fn() -> bool + Send + Sync>;

/// Why a call that waited at the gate was not made.
#[derive(Debug, thiserror::Error)]
pub enum NotMade {
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("not called: this daemon's lease on the shared store lapsed while the call waited for its turn")]
    Fenced,
}

impl Gate {
    pub fn new(clock: Arc<dyn Clock>, limits: Limits) -> Self {
        let global = Gcra::new(limits.global_rate());
        let (tx, shutdown) = tokio::sync::watch::channel(false);
        std::mem::forget(tx); // a gate on its own never shuts down
        Self {
            clock,
            inner: Mutex::new(Inner { limits, paused_until: None, global, accounts: HashMap::new() }),
            shutdown,
            fence: None,
        }
    }

    /// Give up waiting when `shutdown` turns true.
    pub fn with_shutdown(mut self, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Refuse a call whose slot came once `fence` answers false. A caller checks its lease
    /// before it asks for a slot; the wait for the slot (seconds, under a provider's rate or a
    /// `Retry-After`) is checked here, so that what is left between the last check and the call
    /// is only the send itself.
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = Some(fence);
        self
    }

    pub fn set_limits(&self, limits: Limits) {
        let mut inner = self.inner.lock().unwrap();
        if inner.limits != limits {
            inner.global = Gcra::new(limits.global_rate());
            inner.accounts.clear();
            inner.limits = limits;
        }
    }

    pub fn limits(&self) -> Limits {
        self.inner.lock().unwrap().limits.clone()
    }

    /// Until when the provider asked for no calls, if that is still ahead.
    /// Now, on the gate's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    pub fn paused_until(&self) -> Option<DateTime<Utc>> {
        let now = self.clock.now();
        self.inner.lock().unwrap().paused_until.filter(|p| *p > now)
    }

    /// The provider answered `Retry-After: secs`: no call to it until then.
    pub fn pause_for(&self, secs: u64) {
        // A day at most: no answer can overflow a time or silence a provider for longer.
        let until = self.clock.now() + TimeDelta::seconds(secs.min(86_400) as i64);
        self.pause_until(until);
    }

    /// A `Retry-After` header's value, in seconds or as an HTTP date: no call until then.
    /// False when the value is neither.
    pub fn pause_for_header(&self, value: &str) -> bool {
        let value = value.trim();
        if let Ok(secs) = value.parse::<u64>() {
            self.pause_for(secs);
            return true;
        }
        match DateTime::parse_from_rfc2822(value) {
            Ok(at) => {
                let left = (at.with_timezone(&Utc) - self.clock.now()).num_seconds().max(0);
                self.pause_for(left as u64);
                true
            }
            Err(_) => false,
        }
    }

    fn pause_until(&self, until: DateTime<Utc>) {
        let mut inner = self.inner.lock().unwrap();
        inner.paused_until = Some(inner.paused_until.map_or(until, |p| p.max(until)));
    }

    /// Wait until a call for `account` of `kind` may go, and take its slot.
    pub async fn acquire(&self, account: &str, kind: Kind) -> Result<(), NotMade> {
        loop {
            let (at, paused) = {
                let now = self.clock.now();
                let mut inner = self.inner.lock().unwrap();
                match inner.paused_until.filter(|p| *p > now) {
                    Some(until) => (until, true),
                    None => {
                        let mut at = inner.global.reserve(now);
                        let rate = match kind {
                            Kind::Read => inner.limits.account_reads,
                            Kind::Write => inner.limits.account_writes,
                        };
                        if let Some(rate) = rate {
                            let cell =
                                inner.accounts.entry((account.to_owned(), kind)).or_insert_with(|| Gcra::new(rate));
                            at = at.max(cell.reserve(now));
                        }
                        (at, false)
                    }
                }
            };
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                _ = self.clock.sleep_until(at) => {}
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return Err(NotMade::ShuttingDown),
            }
            // A `Retry-After` that came in while this call waited for its slot holds it too.
            if !paused && self.paused_until().is_none() {
                return match &self.fence {
                    Some(fence) if !fence() => Err(NotMade::Fenced),
                    _ => Ok(()),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use futures_util::FutureExt;

    fn gate(limits: Limits) -> (Arc<ManualClock>, Gate) {
        let clock = Arc::new(ManualClock::new(Utc::now()));
        (clock.clone(), Gate::new(clock, limits))
    }

    #[tokio::test]
    async fn the_global_cap_spaces_calls_and_never_exceeds_it() {
        let (clock, gate) = gate(Limits { per_second: 4.0, ..Limits::default() });
        assert!(
            gate.acquire("a", Kind::Write).now_or_never().is_some_and(|r| r.is_ok()),
            "the first call goes at once"
        );
        let second = gate.acquire("b", Kind::Write);
        tokio::pin!(second);
        assert!(second.as_mut().now_or_never().is_none(), "the second waits for its slot");
        clock.advance(TimeDelta::milliseconds(249));
        assert!((&mut second).now_or_never().is_none());
        clock.advance(TimeDelta::milliseconds(1));
        assert!((&mut second).now_or_never().is_some(), "250 ms later it goes");
    }

    #[tokio::test]
    async fn per_account_limits_allow_their_burst_then_space() {
        let (clock, gate) = gate(Limits {
            per_second: 1000.0,
            burst: 1,
            account_reads: Some(Rate { count: 3, per_secs: 3.0 }),
            account_writes: None,
        });
        for _ in 0..3 {
            gate.acquire("sean", Kind::Read).await.unwrap();
            clock.advance(TimeDelta::milliseconds(1));
        }
        assert!(gate.acquire("other", Kind::Read).now_or_never().is_some(), "another account goes at once");
        clock.advance(TimeDelta::milliseconds(1));
        let fourth = gate.acquire("sean", Kind::Read);
        tokio::pin!(fourth);
        assert!((&mut fourth).now_or_never().is_none(), "the fourth read waits");
        clock.advance(TimeDelta::seconds(1));
        assert!((&mut fourth).now_or_never().is_some(), "and goes once the window allows");
    }

    #[tokio::test]
    async fn retry_after_pauses_every_call_until_it_passes() {
        let (clock, gate) = gate(crate::providers::find("trakt").unwrap().limits());
        gate.pause_for(30);
        let start = clock.now();
        assert_eq!(gate.paused_until(), Some(start + TimeDelta::seconds(30)));
        let call = gate.acquire("sean", Kind::Read);
        tokio::pin!(call);
        for secs in [1, 10, 29] {
            clock.set(start + TimeDelta::seconds(secs));
            assert!((&mut call).now_or_never().is_none(), "no call {secs} s into a 30 s pause");
        }
        clock.set(start + TimeDelta::seconds(30));
        assert!((&mut call).now_or_never().is_some());
        assert_eq!(gate.paused_until(), None);
    }

    #[tokio::test]
    async fn a_call_waiting_for_its_slot_is_held_by_a_pause_that_comes_in_meanwhile() {
        let (clock, gate) = gate(Limits { per_second: 1.0, burst: 1, ..Limits::default() });
        gate.acquire("a", Kind::Read).await.unwrap();
        let second = gate.acquire("b", Kind::Read);
        tokio::pin!(second);
        assert!((&mut second).now_or_never().is_none(), "the second waits a second for its slot");
        let start = clock.now();
        gate.pause_for(20);
        clock.set(start + TimeDelta::seconds(1));
        assert!((&mut second).now_or_never().is_none(), "its slot came, but the provider asked for quiet");
        clock.set(start + TimeDelta::seconds(20));
        assert!((&mut second).now_or_never().is_some(), "it goes when the pause ends");
    }

    #[tokio::test]
    async fn a_call_whose_lease_lapsed_while_it_waited_for_its_slot_is_not_made() {
        let held = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (clock, gate) = gate(Limits { per_second: 1.0, burst: 1, ..Limits::default() });
        let lease = held.clone();
        let gate = gate.with_fence(Arc::new(move || lease.load(std::sync::atomic::Ordering::SeqCst)));
        gate.acquire("a", Kind::Write).await.expect("the first goes at once, the lease held");
        let second = gate.acquire("b", Kind::Write);
        tokio::pin!(second);
        assert!((&mut second).now_or_never().is_none(), "the second waits a second for its slot");
        held.store(false, std::sync::atomic::Ordering::SeqCst);
        clock.advance(TimeDelta::seconds(1));
        let answer = (&mut second).now_or_never().expect("its slot came");
        assert!(matches!(answer, Err(NotMade::Fenced)), "{answer:?}");
        assert!(answer.unwrap_err().to_string().contains("lease on the shared store lapsed"));
    }

    #[test]
    fn retry_after_is_read_in_seconds_or_as_an_http_date() {
        let (clock, gate) = gate(Limits::default());
        let now = clock.now();
        let date = (now + TimeDelta::seconds(90)).to_rfc2822();
        assert!(gate.pause_for_header(&date));
        let until = gate.paused_until().unwrap();
        assert!((until - now - TimeDelta::seconds(90)).num_seconds().abs() <= 1, "{until} vs {now}");
        assert!(gate.pause_for_header(" 120 "));
        assert_eq!(gate.paused_until(), Some(now + TimeDelta::seconds(120)));
        assert!(!gate.pause_for_header("soon"), "nonsense is not a pause");
    }
}

/// Plans refreshes under a provider's global rate: each connection reserves one slot (the
/// latest free one at or before the time it wants), so that when more refreshes fall due
/// together than the rate allows, the earlier ones start earlier, spread back across the
/// window, and none is pushed past its token's expiry.
pub struct RefreshPlanner {
    inner: Mutex<Plan>,
}

struct Plan {
    slot_us: i64,
    runs: Runs,
    /// Each account's slot and the time it wanted; its name kept inline (no allocation each).
    held: FastMap<compact_str::CompactString, (i64, DateTime<Utc>)>,
}

/// Taken slots as merged runs: first slot → one past the last.
#[derive(Default)]
struct Runs(std::collections::BTreeMap<i64, i64>);

impl Runs {
    fn take(&mut self, slot: i64) {
        let mut start = slot;
        let mut end = slot + 1;
        if let Some((&s, &e)) = self.0.range(..slot).next_back()
            && e == slot
        {
            start = s;
            self.0.remove(&s);
        }
        if let Some(e) = self.0.remove(&(slot + 1)) {
            end = e;
        }
        self.0.insert(start, end);
    }

    fn free(&mut self, slot: i64) {
        let Some((&s, &e)) = self.0.range(..=slot).next_back() else { return };
        if slot >= e {
            return;
        }
        self.0.remove(&s);
        if s < slot {
            self.0.insert(s, slot);
        }
        if slot + 1 < e {
            self.0.insert(slot + 1, e);
        }
    }

    /// The latest free slot at or before `slot`, if one is at or after `floor`.
    fn latest_free(&self, slot: i64, floor: i64) -> Option<i64> {
        let candidate = match self.0.range(..=slot).next_back() {
            Some((&s, &e)) if slot < e => s - 1,
            _ => slot,
        };
        (candidate >= floor).then_some(candidate)
    }

    /// The earliest free slot at or after `slot`.
    fn earliest_free(&self, slot: i64) -> i64 {
        match self.0.range(..=slot).next_back() {
            Some((_, &e)) if slot < e => e,
            _ => slot,
        }
    }
}

impl RefreshPlanner {
    /// Slots `1 / per_second` apart.
    pub fn new(per_second: f64) -> Self {
        Self {
            inner: Mutex::new(Plan {
                slot_us: Self::slot_us(per_second),
                runs: Default::default(),
                held: FastMap::default(),
            }),
        }
    }

    fn slot_us(per_second: f64) -> i64 {
        (1_000_000.0 / per_second.max(0.000_001)).ceil() as i64
    }

    /// A new rate starts a new plan; connections re-plan when they next reschedule.
    pub fn set_rate(&self, per_second: f64) {
        let mut plan = self.inner.lock().unwrap();
        if plan.slot_us != Self::slot_us(per_second) {
            *plan = Plan { slot_us: Self::slot_us(per_second), runs: Default::default(), held: FastMap::default() };
        }
    }

    /// When `account` should refresh, given that it wants to at `want` and it is `now`: a slot
    /// at or before `want` but not before `now`'s, else the first free one after. The answer is
    /// the same whenever it is asked again with the same `want` (it may then lie in the past,
    /// which means "due"), so a deadline planned once stays put.
    pub fn plan(&self, account: &str, want: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
        let mut plan = self.inner.lock().unwrap();
        let Plan { slot_us, runs, held } = &mut *plan;
        let held = held.entry(account.into());
        if let Entry::Occupied(held) = &held {
            let (slot, wanted) = *held.get();
            if wanted == want {
                return DateTime::from_timestamp_micros(slot * *slot_us).unwrap_or(want);
            }
            runs.free(slot);
        }
        let (want_slot, now_slot) = (want.timestamp_micros() / *slot_us, now.timestamp_micros() / *slot_us);
        let slot = runs.latest_free(want_slot, now_slot).unwrap_or_else(|| runs.earliest_free(want_slot.max(now_slot)));
        runs.take(slot);
        held.insert_entry((slot, want));
        DateTime::from_timestamp_micros(slot * *slot_us).unwrap_or(want)
    }

    /// Room for `more` accounts (start-up), so the plan is not rebuilt as it grows.
    pub fn reserve(&self, more: usize) {
        self.inner.lock().unwrap().held.reserve(more);
    }

    /// `account` no longer needs its slot (it refreshed, or went away).
    pub fn release(&self, account: &str) {
        let mut plan = self.inner.lock().unwrap();
        if let Some((slot, _)) = plan.held.remove(account) {
            plan.runs.free(slot);
        }
    }
}

#[cfg(test)]
mod planner_tests {
    use super::*;

    #[test]
    fn refreshes_due_together_are_spread_back_one_slot_apart_and_none_is_late() {
        let planner = RefreshPlanner::new(10.0);
        let now = Utc::now();
        let want = now + TimeDelta::minutes(30);
        let mut times: Vec<DateTime<Utc>> = (0..1000).map(|i| planner.plan(&format!("a{i}"), want, now)).collect();
        let now_slot = now - TimeDelta::milliseconds(100);
        assert!(times.iter().all(|t| *t <= want && *t > now_slot), "none later than wanted, none in the past");
        times.sort();
        times.dedup();
        assert_eq!(times.len(), 1000, "one slot each");
        assert!(times.windows(2).all(|w| w[1] - w[0] >= TimeDelta::milliseconds(100)), "10 a second at most");
        assert!(want - times[0] <= TimeDelta::seconds(100), "packed just before the time they want");
        // Asking again keeps the slot; releasing frees it for the next.
        assert_eq!(planner.plan("a5", want, now), planner.plan("a5", want, now));
        let last = planner.plan("a0", want, now);
        planner.release("a0");
        assert_eq!(planner.plan("b", want, now), last, "the freed slot is reused");
    }

    #[test]
    fn when_there_is_no_room_before_the_wanted_time_it_is_the_first_free_one_after() {
        let planner = RefreshPlanner::new(1.0);
        let now = Utc::now();
        let want = now + TimeDelta::seconds(2);
        let times: Vec<_> = (0..5).map(|i| planner.plan(&format!("a{i}"), want, now)).collect();
        assert!(times[..3].iter().all(|t| *t <= want));
        assert!(times[3] > want && times[4] > times[3], "overbooked: as soon as possible after");
    }
}
