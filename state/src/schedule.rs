//! Timing rules, all pure: the refresh lead, backoff, and the next thing a connection needs.

use crate::machine::{Machine, StateName};
use chrono::{DateTime, TimeDelta, Utc};
use std::hash::{DefaultHasher, Hash, Hasher};

/// The daemon's timing settings (from the `"authkeeper"` config block).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// `refresh_margin_secs`: how long before expiry a refresh is due, at the least.
    pub refresh_margin: TimeDelta,
    /// `backoff_base_secs`: the first retry delay after an unknown answer.
    pub backoff_base: TimeDelta,
    /// How often a connected credential is validated.
    pub validate_every: TimeDelta,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            refresh_margin: TimeDelta::seconds(300),
            backoff_base: TimeDelta::seconds(5),
            validate_every: TimeDelta::minutes(30),
        }
    }
}

/// What a connection needs done next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask the provider whether the pending flow was approved.
    PollFlow,
    /// The device code ran out without approval.
    ExpireFlow,
    /// Confirm the credential with the provider (whoami).
    Validate,
    /// Exchange the refresh token for a new pair.
    Refresh,
    /// `expires_at` has passed without a successful refresh.
    ExpireToken,
}

/// How long before expiry to refresh: `min(max(margin, 10 % of lifetime), 50 % of lifetime)`,
/// so that a token that lives shorter than the margin is not refreshed in a loop.
pub fn refresh_lead(lifetime: TimeDelta, margin: TimeDelta) -> TimeDelta {
    let lifetime = lifetime.max(TimeDelta::zero());
    margin.max(lifetime / 10).min(lifetime / 2)
}

/// Delay before retry number `failures` (1-based): `base × 2^min(failures − 1, 4)`, stretched
/// by up to 25 % of jitter (`jitter` in `[0, 1)`).
pub fn backoff(failures: u32, policy: &Policy, jitter: f64) -> TimeDelta {
    let exp = failures.saturating_sub(1).min(4);
    let base_ms = policy.backoff_base.num_milliseconds() * (1i64 << exp);
    TimeDelta::milliseconds(base_ms + (base_ms as f64 * 0.25 * jitter.clamp(0.0, 1.0)) as i64)
}

/// A stable per-connection draw in `[0, 1)`, so refreshes of many tokens that expire together
/// spread out, the same way on every run.
fn spread(machine: &Machine, salt: i64) -> f64 {
    let mut h = DefaultHasher::new();
    machine.key().hash(&mut h);
    salt.hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// When this connection's token should be refreshed, if it can be.
pub fn refresh_at(machine: &Machine, policy: &Policy) -> Option<DateTime<Utc>> {
    let creds = machine.connection().grant.as_ref()?;
    creds.refresh_token.as_ref()?;
    let expires_at = creds.expires_at?;
    let lead = refresh_lead(expires_at - creds.issued_at, policy.refresh_margin);
    let jitter = TimeDelta::milliseconds(
        (lead.num_milliseconds() as f64 * 0.1 * spread(machine, expires_at.timestamp())) as i64,
    );
    Some(expires_at - lead - jitter)
}

/// The next rolling validation after one at `last`: at this connection's own phase of the
/// period, so that validations of many connections are spread evenly over the period whatever
/// their history, and never sooner than half a period after the last.
pub fn rolling_validation(machine: &Machine, last: DateTime<Utc>, policy: &Policy) -> DateTime<Utc> {
    let period = policy.validate_every.num_milliseconds().max(1);
    let phase = (spread(machine, 0) * period as f64) as i64;
    let earliest = (last + policy.validate_every / 2).timestamp_millis();
    let k = (earliest - phase).div_euclid(period) + i64::from((earliest - phase).rem_euclid(period) != 0);
    DateTime::from_timestamp_millis(phase + k * period).unwrap_or(last + policy.validate_every)
}

/// The next action this connection needs and when, or `None` when it needs nothing.
pub fn next_action(machine: &Machine, policy: &Policy) -> Option<(DateTime<Utc>, Action)> {
    let conn = machine.connection();
    // After an unknown answer no provider call happens before the backoff has passed.
    let gate = |at: DateTime<Utc>| conn.next_attempt_at.map_or(at, |n| at.max(n));
    match machine.state_name() {
        StateName::Disconnected => None,
        StateName::Pending => match machine.pending_flow() {
            Some(flow) => {
                // A flow that ends by callback is not polled: only its expiry is due.
                let poll = flow.interval_secs.map(|interval| {
                    gate(conn.last_poll_at.unwrap_or(flow.issued_at) + TimeDelta::seconds(interval.min(3600) as i64))
                });
                match poll {
                    Some(poll) if poll < flow.expires_at => Some((poll, Action::PollFlow)),
                    _ => Some((flow.expires_at, Action::ExpireFlow)),
                }
            }
            None => Some((gate(conn.since), Action::Validate)),
        },
        StateName::Connected => {
            let creds = conn.grant.as_ref()?;
            // A refresh whose answer was lost is retried first: only that retry can tell
            // whether the provider had rotated.
            if creds.refresh_token.is_some()
                && conn.last_error.as_deref().is_some_and(|e| e.starts_with(crate::machine::REFRESH_ANSWER_LOST))
            {
                let retry = gate(conn.since);
                // Expiry is a fact even while the answer is in doubt.
                return Some(match creds.expires_at {
                    Some(expires_at) if expires_at < retry => (expires_at, Action::ExpireToken),
                    _ => (retry, Action::Refresh),
                });
            }
            // A retry after an unknown answer is due when its backoff ends; otherwise the
            // rolling validation is.
            let validate = conn
                .next_attempt_at
                .unwrap_or_else(|| rolling_validation(machine, conn.validated_at.unwrap_or(conn.since), policy));
            let mut next = (validate, Action::Validate);
            if let Some(at) = refresh_at(machine, policy).map(gate)
                && at <= next.0
            {
                next = (at, Action::Refresh);
            }
            if let Some(expires_at) = creds.expires_at {
                // Expiry is a fact, not a provider call: backoff does not delay it.
                if expires_at < next.0 {
                    next = (expires_at, Action::ExpireToken);
                }
            }
            Some(next)
        }
        StateName::Expired if machine.retrying_refresh() && conn.refresh_token().is_some() => {
            Some((gate(conn.since), Action::Refresh))
        }
        StateName::Expired => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lead_follows_the_formula() {
        let s = TimeDelta::seconds;
        let margin = s(300);
        // Long-lived token: 10 % of lifetime beats the margin.
        assert_eq!(refresh_lead(s(86_400), margin), s(8_640));
        // Medium: the margin wins.
        assert_eq!(refresh_lead(s(1_000), margin), s(300));
        // Shorter than the margin: capped at half the lifetime, never a refresh loop.
        assert_eq!(refresh_lead(s(4), margin), s(2));
        assert_eq!(refresh_lead(s(0), margin), s(0));
    }

    #[test]
    fn rolling_validations_are_spread_evenly_and_keep_their_period() {
        let policy = Policy { validate_every: TimeDelta::minutes(30), ..Policy::default() };
        let t = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 11, 23, 12, 0, 0).unwrap();
        let mut per_minute = [0u32; 30];
        for i in 0..3000 {
            let m = Machine::new(crate::ConnKey::new("trakt", format!("TRAKT-P{i:02}")), t);
            let due = rolling_validation(&m, t, &policy);
            assert!(due >= t + TimeDelta::minutes(15) && due < t + TimeDelta::minutes(45), "{due}");
            // The same connection keeps its phase: one period later, the next is one period on.
            assert_eq!(rolling_validation(&m, due, &policy), due + policy.validate_every);
            per_minute[((due.timestamp() / 60) % 30) as usize] += 1;
        }
        // 3,000 connections validated at the same instant come due about 100 a minute.
        assert!(per_minute.iter().all(|n| (60..=140).contains(n)), "{per_minute:?}");
    }

    #[test]
    fn backoff_doubles_to_sixteen_times_and_jitter_stays_within_a_quarter() {
        let p = Policy { backoff_base: TimeDelta::seconds(5), ..Policy::default() };
        let secs: Vec<i64> = (1..=7).map(|n| backoff(n, &p, 0.0).num_seconds()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 80, 80]);
        assert_eq!(backoff(1, &p, 0.999).num_milliseconds(), 6_248);
    }
}
