//! When each connection acts next: its machine's schedule, a pending sweep, a pause the
//! provider asked for, and its refresh's slot under the provider's rate.

use super::Shared;
use crate::limits::RefreshPlanner;
use authkeeper_state::schedule::{Action, next_action, refresh_at};
use authkeeper_state::{Machine, Policy, StateName};
use chrono::{DateTime, Utc};

/// What `machine` needs next and when: the machine's schedule, a pending sweep, and no provider
/// call while the provider asked for a pause. A refresh takes its slot in the provider's plan.
pub fn next_for(
    machine: &Machine,
    sweep_at: Option<DateTime<Utc>>,
    shared: &Shared,
) -> Option<(DateTime<Utc>, Action)> {
    next_at(machine, sweep_at, shared, &shared.policy(), shared.clock.now())
}

/// [`next_for`] with the policy and the time given (read once for many connections).
pub fn next_at(
    machine: &Machine,
    sweep_at: Option<DateTime<Utc>>,
    shared: &Shared,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Option<(DateTime<Utc>, Action)> {
    let mut next = next_action(machine, policy);
    if let Some(sweep) = sweep_at
        && machine.state_name() == StateName::Connected
        && next.is_none_or(|(at, _)| sweep < at)
    {
        next = Some((sweep, Action::Validate));
    }
    let key = machine.key();
    let planner = &shared.planners[key.provider.as_str()];
    let (at, action) = with_refresh_slot(machine, next?, planner, policy, now);
    let calls_provider = !matches!(action, Action::ExpireFlow | Action::ExpireToken);
    let paused = shared.gates.get(key.provider.as_str()).and_then(|g| g.paused_until());
    Some(match paused {
        Some(until) if calls_provider && until > at => (until, action),
        _ => (at, action),
    })
}

/// `next` with the refresh in it planned under the provider's rate: a refresh takes the slot
/// `planner` gives it, at or before the time it wants. A connection whose refresh comes later,
/// after a validation, takes its slot now all the same, so that tokens expiring together are
/// planned over the days before, not only the last one: at Trakt's rate a day holds 691,200
/// refreshes, fewer than a million.
pub fn with_refresh_slot(
    machine: &Machine,
    (at, action): (DateTime<Utc>, Action),
    planner: &RefreshPlanner,
    policy: &Policy,
    now: DateTime<Utc>,
) -> (DateTime<Utc>, Action) {
    // Each provider has its own planner: the profile id names the account in it.
    let account = machine.key().profile.as_str();
    if machine.state_name() != StateName::Connected || machine.connection().next_attempt_at.is_some() {
        planner.release(account);
        return (at, action);
    }
    if action == Action::Refresh {
        return (planner.plan(account, at, now), action);
    }
    match refresh_at(machine, policy) {
        Some(want) => match planner.plan(account, want, now) {
            slot if slot < at => (slot, Action::Refresh),
            _ => (at, action),
        },
        None => {
            planner.release(account);
            (at, action)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use authkeeper_state::{Account, ConnKey, Event, Grant, Secret};
    use chrono::TimeDelta;

    #[test]
    fn tokens_expiring_together_are_planned_over_the_days_before_within_the_rate() {
        // 2,000 week-long tokens issued within the same hour, at one refresh per 100 s: a day
        // holds 864 of them, so planning only in the last day would let most expire.
        let now = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 12, 1, 12, 0, 0).unwrap();
        let policy = Policy { validate_every: TimeDelta::days(1), ..Policy::default() };
        let planner = RefreshPlanner::new(0.01);
        let mut machines = Vec::new();
        for i in 0..2000 {
            let issued = now - TimeDelta::seconds(i % 3600);
            let grant = Grant {
                refresh_token: Some(Secret::new(format!("r{i}"))),
                expires_at: Some(issued + TimeDelta::days(7)),
                ..Grant::bearer(format!("a{i}"), issued)
            };
            let mut m = Machine::new(ConnKey::new("trakt", format!("TRAKT-P{i:02}")), issued);
            m.handle(&Event::CredentialsSupplied { grant }, issued, policy, 0.0);
            let account = Account { name: "u".into(), id: None };
            m.handle(&Event::Validated { account, grant: None }, issued, policy, 0.0);
            let next = next_action(&m, &policy).unwrap();
            assert_eq!(next.1, Action::Validate, "a validation comes first");
            // Scheduled at start-up.
            with_refresh_slot(&m, next, &planner, &policy, now);
            machines.push(m);
        }
        // Six days on, after the daily validations, each asks for its refresh: its slot was
        // kept for it, before its token expires.
        let later = now + TimeDelta::days(6);
        let mut slots = Vec::new();
        for m in &machines {
            let due = (refresh_at(m, &policy).unwrap(), Action::Refresh);
            let (slot, action) = with_refresh_slot(m, due, &planner, &policy, later);
            assert_eq!(action, Action::Refresh);
            assert!(slot >= now && slot < m.connection().grant.as_ref().unwrap().expires_at.unwrap(), "{slot}");
            slots.push(slot);
        }
        slots.sort();
        assert!(slots.windows(2).all(|w| w[1] - w[0] >= TimeDelta::seconds(100)), "one refresh per 100 s at most");
        assert!(slots[1999] - slots[0] > TimeDelta::days(2), "spread over more than the last day");
    }
}
