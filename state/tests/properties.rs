//! The machine's promises under random event sequences, checked on the real `Machine`, its
//! records and the redb `Store` (in memory), the way the daemon's actor drives them: handle an
//! event on a copy, commit the copy when it changed, and only then take it as the machine.
//!
//! - No event sequence loses a refresh token that a commit acknowledged: the refresh token
//!   held is always the one most recently committed, it changes only to the one a provider's
//!   answer or the user brought, a rotated token that arrives is always adopted, and it is
//!   dropped only when the user asked (disconnect, removal, cancel).
//! - No unknown answer ever changes the state: the state name, the credential and the account
//!   stay the same.
//! - What a commit acknowledged is what a restart loads.

use authkeeper_state::machine::State;
use authkeeper_state::{
    Account, Cause, Commit, ConnKey, Event, Grant, Machine, PendingFlow, Policy, REFRESH_ANSWER_LOST, Secret,
    StateName, Store,
};
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use proptest::prelude::*;
use std::collections::BTreeMap;

/// What happens next to the connection: a user command, a provider's answer, time passing,
/// or a daemon restart.
#[derive(Clone, Debug)]
enum Op {
    Connect,
    Supply,
    Resume,
    FlowPending,
    SlowDown,
    Approve,
    Validate {
        with_grant: bool,
    },
    /// A refresh answer; `rotate`: it carries a new refresh token.
    Refresh {
        rotate: bool,
    },
    FlowExpired,
    Deny,
    Cancel,
    Reject,
    RefreshReject,
    ExpiryPassed,
    Disconnect,
    Remove,
    /// A call with no verdict; `lost`: a refresh whose request went out and whose answer never came.
    Unknown {
        lost: bool,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Connect),
        2 => Just(Op::Supply),
        1 => Just(Op::Resume),
        1 => Just(Op::FlowPending),
        1 => Just(Op::SlowDown),
        3 => Just(Op::Approve),
        2 => any::<bool>().prop_map(|with_grant| Op::Validate { with_grant }),
        6 => any::<bool>().prop_map(|rotate| Op::Refresh { rotate }),
        1 => Just(Op::FlowExpired),
        1 => Just(Op::Deny),
        1 => Just(Op::Cancel),
        1 => Just(Op::Reject),
        2 => Just(Op::RefreshReject),
        2 => Just(Op::ExpiryPassed),
        1 => Just(Op::Disconnect),
        1 => Just(Op::Remove),
        5 => any::<bool>().prop_map(|lost| Op::Unknown { lost }),
        2 => Just(Op::Restart),
    ]
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
}

/// One connection driven as the daemon's actor drives it.
struct Run {
    store: Store,
    /// The machine as last committed (what the actor holds).
    machine: Machine,
    now: DateTime<Utc>,
    /// Grants handed out so far (their tokens are numbered).
    issued: u32,
    /// The refresh token the last commit carried.
    acked: Option<String>,
    /// Some commit carried a refresh token.
    held_one: bool,
}

fn rt(m: &Machine) -> Option<String> {
    m.connection().refresh_token().map(|t| t.expose().to_owned())
}

impl Run {
    fn new() -> Self {
        let key = ConnKey::new("trakt", "default");
        Self {
            store: Store::in_memory().unwrap(),
            machine: Machine::new(key, t0()),
            now: t0(),
            issued: 0,
            acked: None,
            held_one: false,
        }
    }

    /// A grant from the provider: a new access token, and a new refresh token or the one held.
    fn grant(&mut self, rotate: bool) -> Grant {
        self.issued += 1;
        let n = self.issued;
        let refresh = match rt(&self.machine) {
            Some(held) if !rotate => held,
            _ => format!("refresh-{n}"),
        };
        Grant {
            refresh_token: Some(Secret::new(refresh)),
            expires_at: Some(self.now + TimeDelta::hours(1)),
            ..Grant::bearer(format!("access-{n}"), self.now)
        }
    }

    fn flow(&self) -> PendingFlow {
        PendingFlow {
            kind: "device_pin".into(),
            user_code: Some("ABCD1234".into()),
            verification_url: Some("https://trakt.tv/activate".into()),
            authorize_url: None,
            issued_at: self.now,
            expires_at: self.now + TimeDelta::minutes(10),
            interval_secs: Some(5),
            secrets: BTreeMap::from([("device_code".to_owned(), Secret::new("device-1"))]),
        }
    }

    fn event(&mut self, op: &Op) -> Event {
        let account = || Account { name: "sean".into(), id: Some("sean".into()) };
        match op {
            Op::Connect => Event::ConnectRequested { flow: self.flow() },
            Op::Supply => Event::CredentialsSupplied { grant: self.grant(true) },
            Op::Resume | Op::Restart => Event::Resumed,
            Op::FlowPending => Event::FlowPending,
            Op::SlowDown => Event::FlowSlowDown { interval_secs: 10 },
            Op::Approve => Event::Approved { grant: self.grant(true) },
            Op::Validate { with_grant: false } => Event::Validated { account: account(), grant: None },
            Op::Validate { with_grant: true } => {
                // Validation learns facts about the credential held; it issues no new token.
                let grant = self.machine.connection().grant.clone().unwrap_or_else(|| self.grant(false));
                Event::Validated { account: account(), grant: Some(grant) }
            }
            Op::Refresh { rotate } => Event::Refreshed { grant: self.grant(*rotate) },
            Op::FlowExpired => Event::FlowExpired { detail: "the code expired".into() },
            Op::Deny => Event::Denied,
            Op::Cancel => Event::Cancel,
            Op::Reject => Event::Rejected { detail: "401".into() },
            Op::RefreshReject => Event::RefreshRejected { detail: "invalid_grant".into() },
            Op::ExpiryPassed => Event::ExpiryPassed,
            Op::Disconnect => Event::Disconnect,
            Op::Remove => Event::Remove,
            Op::Unknown { lost: true } => Event::Unknown { error: format!("{REFRESH_ANSWER_LOST}: connection reset") },
            Op::Unknown { lost: false } => Event::Unknown { error: "Trakt answered HTTP 503".into() },
        }
    }

    /// The machine a restart loads from the store.
    fn load(&self) -> Machine {
        let mut all = self.store.load_all().unwrap();
        assert!(all.len() <= 1);
        all.pop().map_or_else(
            || Machine::new(self.machine.key().clone(), t0()),
            |s| std::sync::Arc::unwrap_or_clone(s.machine),
        )
    }

    fn apply(&mut self, op: &Op, jitter: f64) -> Result<(), TestCaseError> {
        if let Op::Restart = op {
            self.machine = self.load();
            prop_assert_eq!(rt(&self.machine), self.acked.clone(), "a restart loaded another refresh token");
        }
        let event = self.event(op);
        let before = self.machine.clone();
        let mut next = before.clone();
        let step = next.handle(&event, self.now, Policy::default(), jitter);
        if step.refusal.is_some() {
            prop_assert_eq!(next.connection(), before.connection(), "a refused event changed the connection");
            return Ok(());
        }
        let (was, now_held) = (rt(&before), rt(&next));

        // No unknown answer changes the state or the credential.
        if let Event::Unknown { .. } = event {
            prop_assert!(step.transition.is_none() && step.effects.is_empty(), "an unknown answer made a transition");
            prop_assert_eq!(next.state(), before.state(), "an unknown answer changed the state");
            prop_assert_eq!(
                &next.connection().grant,
                &before.connection().grant,
                "an unknown answer changed the grant"
            );
            prop_assert_eq!(&next.connection().account, &before.connection().account);
        }

        // A refresh token changes only to one an answer or the user brought, or goes when the
        // user asked.
        let brought = match &event {
            Event::Refreshed { grant }
            | Event::Approved { grant }
            | Event::CredentialsSupplied { grant }
            | Event::Validated { grant: Some(grant), .. } => {
                Some(grant.refresh_token.as_ref().map(|t| t.expose().to_owned()))
            }
            _ => None,
        };
        if now_held != was {
            let user_asked = matches!(event, Event::Disconnect | Event::Remove | Event::Cancel) && now_held.is_none();
            prop_assert!(
                user_asked || brought.as_ref() == Some(&now_held),
                "{:?} changed the refresh token {:?} → {:?} in {:?}",
                event,
                was,
                now_held,
                before.state()
            );
        }

        // A rotated token that arrives in answer to a call the machine makes is always adopted.
        let asked = match (&event, before.state()) {
            (Event::Refreshed { .. }, State::Connected {} | State::Expired { .. })
            | (Event::Refreshed { .. }, State::Pending { .. })
                if before.pending_flow().is_none() =>
            {
                true
            }
            (Event::Approved { .. }, State::Pending { .. }) => before.pending_flow().is_some(),
            _ => false,
        };
        if asked {
            prop_assert_eq!(
                Some(now_held.clone()),
                brought.clone(),
                "{:?} in {:?} was not adopted",
                event,
                before.state()
            );
            prop_assert_eq!(next.state_name(), StateName::Connected);
        }

        // A refusal after a lost refresh answer ends honestly, saying so.
        let lost = before.connection().last_error.as_deref().is_some_and(|e| e.starts_with(REFRESH_ANSWER_LOST));
        if matches!(event, Event::RefreshRejected { .. }) && lost && before.state_name() == StateName::Connected {
            let t = step.transition.as_ref().expect("a transition");
            prop_assert_eq!((t.to, t.cause), (StateName::Expired, Cause::RefreshAnswerLost));
        }

        // Commit when it changed (as the actor does), then take it; a restart loads the same.
        let changed = step.transition.is_some()
            || next.connection().flow != before.connection().flow
            || authkeeper_state::records::encode_connection(&next)
                != authkeeper_state::records::encode_connection(&before);
        if changed {
            self.store.commit(&[Commit { machine: next.clone(), transition: step.transition.clone() }]).unwrap();
            self.acked = rt(&next);
            self.held_one |= self.acked.is_some();
        }
        self.machine = next;
        prop_assert_eq!(rt(&self.machine), self.acked.clone(), "the machine holds a refresh token no commit carried");
        let loaded = self.load();
        let mut held = self.machine.connection().clone();
        held.last_poll_at = None; // in memory only, by design
        prop_assert_eq!(loaded.connection(), &held, "the store holds another connection than the machine");
        prop_assert_eq!(loaded.state(), self.machine.state());
        Ok(())
    }

    /// Where the run ended is honest: a token held is the last one committed; no token means
    /// the user asked, or none was ever issued; expired means the provider refused it or time ran out.
    fn ended_honestly(&self) -> Result<(), TestCaseError> {
        let history = self.store.history(self.machine.key()).unwrap();
        let last = history.last().map(|t| t.cause);
        match self.machine.state_name() {
            StateName::Expired => prop_assert!(
                matches!(
                    last,
                    Some(
                        Cause::Rejected | Cause::RefreshRejected | Cause::RefreshAnswerLost | Cause::ExpiredUnrefreshed
                    )
                ),
                "expired after {:?}",
                last
            ),
            StateName::Disconnected if rt(&self.machine).is_none() && self.held_one => prop_assert!(
                history.iter().any(|t| matches!(t.cause, Cause::Disconnected | Cause::Removed | Cause::Cancelled)),
                "the token went with no disconnect, removal or cancel in the history"
            ),
            _ => {}
        }
        prop_assert_eq!(rt(&self.load()), self.acked.clone());
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_event_sequence_loses_an_acknowledged_refresh_token(
        ops in prop::collection::vec((op(), 0u32..5400, 0.0f64..1.0), 1..60)
    ) {
        let mut run = Run::new();
        for (op, wait, jitter) in &ops {
            run.now += TimeDelta::seconds(i64::from(*wait));
            run.apply(op, *jitter)?;
        }
        run.ended_honestly()?;
    }

    #[test]
    fn no_unknown_answer_changes_the_state(
        ops in prop::collection::vec((op(), 0u32..5400), 0..30),
        unknowns in prop::collection::vec((any::<bool>(), 0u32..600), 1..10),
    ) {
        let mut run = Run::new();
        for (op, wait) in &ops {
            run.now += TimeDelta::seconds(i64::from(*wait));
            run.apply(op, 0.5)?;
        }
        let (state, grant, account) =
            (run.machine.state().clone(), run.machine.connection().grant.clone(), run.machine.connection().account.clone());
        for (lost, wait) in &unknowns {
            run.now += TimeDelta::seconds(i64::from(*wait));
            run.apply(&Op::Unknown { lost: *lost }, 0.5)?;
        }
        prop_assert_eq!(run.machine.state(), &state);
        prop_assert_eq!(&run.machine.connection().grant, &grant);
        prop_assert_eq!(&run.machine.connection().account, &account);
    }
}
