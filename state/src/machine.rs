//! The connection state machine (statig, blocking mode).
//!
//! Four states, exactly the table in ARCHITECTURE.md. The machine is pure: time, the backoff
//! policy and a jitter draw come in through [`Ctx`]; what must happen next comes out as a
//! [`Step`] (a public [`Transition`] for history and observers, plus [`Effect`]s). Scheduling
//! (when to poll, refresh or validate) is derived from the state by [`crate::schedule`].

use crate::grant::{Grant, PendingFlow};
use crate::schedule::{self, Policy};
use crate::secret::Secret;
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use statig::blocking::{InitializedStateMachine, IntoStateMachineExt};
use statig::prelude::*;
use std::fmt;

pub use crate::key::{Account, ConnKey};

/// The data every state shares (statig's shared storage).
#[derive(Clone, Debug, PartialEq)]
pub struct Connection {
    pub key: ConnKey,
    /// When the current state was entered.
    pub since: DateTime<Utc>,
    pub grant: Option<Grant>,
    pub account: Option<Account>,
    pub validated_at: Option<DateTime<Utc>>,
    /// The last unknown answer (timeout, 5xx, 429, garbage); cleared by the next good one.
    pub last_error: Option<String>,
    /// Unknown answers in a row, for backoff.
    pub failures: u32,
    /// Backoff: no provider call before this time.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Set exactly while pending on an interactive flow; stored in the `flows` table. Boxed:
    /// most connections have none, and they are many.
    pub flow: Option<Box<PendingFlow>>,
    /// When the flow was last polled; in memory only (after a restart: one interval from then).
    pub last_poll_at: Option<DateTime<Utc>>,
}

/// Why a connection is pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingKind {
    /// Waiting for the user to approve an interactive flow (device code / PIN).
    Flow,
    /// Validating a credential that was supplied without a flow.
    Validating,
}

/// Everything that can happen to a connection.
#[derive(Clone, Debug)]
pub enum Event {
    /// The user started an interactive flow; the provider already issued the code.
    ConnectRequested { flow: PendingFlow },
    /// A credential arrived without a flow (pasted token, API key, password exchange, import
    /// from config).
    CredentialsSupplied { grant: Grant },
    /// The daemon (re)started with this connection loaded from the store.
    Resumed,
    /// A flow poll answered "not yet".
    FlowPending,
    /// A flow poll answered "slow down": poll less often from now on.
    FlowSlowDown { interval_secs: u64 },
    /// The user approved the flow; the provider issued a grant. Committed before any other
    /// provider call: who it belongs to is asked afterwards (a `Validate` effect).
    Approved { grant: Grant },
    /// The provider confirmed the credential (whoami succeeded). `grant`, when given, is the
    /// same credential with facts the validation learned (a Plex server found, say).
    Validated { account: Account, grant: Option<Grant> },
    /// A refresh succeeded; `grant` is the new (possibly rotated) one.
    Refreshed { grant: Grant },
    /// The device code expired, or the provider no longer knows it.
    FlowExpired { detail: String },
    /// The user denied the flow.
    Denied,
    /// The user cancelled a pending flow or validation.
    Cancel,
    /// The provider rejected the credential and no refresh can fix it.
    Rejected { detail: String },
    /// The provider rejected the refresh token.
    RefreshRejected { detail: String },
    /// `expires_at` passed without a successful refresh.
    ExpiryPassed,
    /// The user disconnected.
    Disconnect,
    /// The profile was removed from the config.
    Remove,
    /// A provider call got no verdict: timeout, connection error, 5xx, 429, unparseable body.
    Unknown { error: String },
}

/// The cause of a transition, as it appears on the wire and in history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    ConnectRequested,
    CredentialsSupplied,
    Approved,
    Validated,
    Refreshed,
    FlowExpired,
    Denied,
    Cancelled,
    Rejected,
    RefreshRejected,
    ExpiredUnrefreshed,
    Disconnected,
    Removed,
    /// The provider rotated the refresh token, but its answer never arrived.
    RefreshAnswerLost,
}

/// How an unknown answer to a refresh begins when the request went out and no answer came
/// back; a refusal of the next attempt is then [`Cause::RefreshAnswerLost`].
pub const REFRESH_ANSWER_LOST: &str = "the refresh answer was lost";

/// The public state names; the wire never sees the internal state enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateName {
    Disconnected,
    Pending,
    Connected,
    Expired,
}

impl StateName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disconnected => "disconnected",
            Self::Pending => "pending",
            Self::Connected => "connected",
            Self::Expired => "expired",
        }
    }
}

/// A committed change of state (or a connected → connected confirmation), for history and
/// the events stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub at: DateTime<Utc>,
    pub from: StateName,
    pub to: StateName,
    pub cause: Cause,
    pub detail: Option<String>,
}

/// What the runner must do once the step is committed.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Ask the provider whether the supplied credential is good.
    Validate,
    /// Revoke this grant upstream, best effort.
    Revoke(Grant),
}

/// An event the machine refuses in its current state; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Conflict(String),
}

/// The outcome of handling one event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Step {
    pub transition: Option<Transition>,
    pub effects: Vec<Effect>,
    pub refusal: Option<Refusal>,
}

/// What the machine gets from outside besides the event.
pub struct Ctx {
    pub now: DateTime<Utc>,
    pub policy: Policy,
    /// A uniform draw in `[0, 1)` for backoff jitter.
    pub jitter: f64,
    step: Step,
    cause: Option<(Cause, Option<String>)>,
}

impl Ctx {
    fn record(&mut self, cause: Cause, detail: Option<String>) {
        self.cause = Some((cause, detail));
    }
    fn refuse(&mut self, why: &str) {
        self.step.refusal = Some(Refusal::Conflict(why.to_owned()));
    }
}

#[state_machine(
    initial = "State::disconnected()",
    state(derive(Debug, Clone, PartialEq)),
    after_transition = "Self::after_transition"
)]
impl Connection {
    /// No usable credential. Entered on first sight, on `disconnect`, when a flow ends without
    /// approval, and when the profile is removed. Leaves on `connect` (→ pending) or a supplied
    /// credential (→ pending, validating).
    #[state(superstate = "any")]
    fn disconnected(&mut self, context: &mut Ctx, event: &Event) -> Outcome<State> {
        match event {
            Event::ConnectRequested { flow } => self.start_flow(context, flow),
            Event::CredentialsSupplied { grant } => self.supply(context, grant),
            Event::Cancel => {
                context.refuse("nothing is pending");
                Handled
            }
            _ => Super,
        }
    }

    /// Waiting: for the user to approve a flow (`Flow`), or for the provider to confirm a
    /// supplied credential (`Validating`). Leaves on approval/validation (→ connected), on
    /// expiry, denial or cancel (→ disconnected), or on rejection of a supplied credential
    /// (→ expired). Unknown answers keep it pending.
    #[state(superstate = "any")]
    fn pending(&mut self, kind: &PendingKind, context: &mut Ctx, event: &Event) -> Outcome<State> {
        match (kind, event) {
            (_, Event::ConnectRequested { .. } | Event::CredentialsSupplied { .. }) => {
                context.refuse("a connect is already pending; cancel it first");
                Handled
            }
            (PendingKind::Flow, Event::Resumed) => {
                self.last_poll_at = Some(context.now);
                Handled
            }
            (PendingKind::Flow, Event::FlowPending) => {
                self.last_poll_at = Some(context.now);
                self.clear_errors();
                Handled
            }
            (PendingKind::Flow, Event::FlowSlowDown { interval_secs }) => {
                self.last_poll_at = Some(context.now);
                if let Some(flow) = self.flow.as_mut() {
                    flow.interval_secs = Some(*interval_secs);
                }
                Handled
            }
            (PendingKind::Flow, Event::Approved { grant }) => {
                self.grant = Some(grant.clone());
                self.account = None;
                self.validated_at = Some(context.now);
                self.clear_errors();
                self.end_flow();
                context.step.effects.push(Effect::Validate);
                context.record(Cause::Approved, None);
                Transition(State::connected())
            }
            (PendingKind::Flow, Event::FlowExpired { detail }) => {
                self.end_flow();
                context.record(Cause::FlowExpired, Some(detail.clone()));
                Transition(State::disconnected())
            }
            (PendingKind::Flow, Event::Denied) => {
                self.end_flow();
                context.record(Cause::Denied, None);
                Transition(State::disconnected())
            }
            (_, Event::Cancel) => {
                self.end_flow();
                self.grant = None;
                context.record(Cause::Cancelled, None);
                Transition(State::disconnected())
            }
            (PendingKind::Validating, Event::Validated { account, grant }) => {
                self.confirm(context, Some(account), grant.as_ref());
                context.record(Cause::Validated, None);
                Transition(State::connected())
            }
            (PendingKind::Validating, Event::Refreshed { grant }) => {
                self.confirm(context, None, Some(grant));
                context.record(Cause::Refreshed, None);
                Transition(State::connected())
            }
            (PendingKind::Validating, Event::RefreshRejected { detail }) => {
                let cause = self.refusal_cause();
                self.clear_errors();
                context.record(cause, Some(detail.clone()));
                Transition(State::expired(false))
            }
            (PendingKind::Validating, Event::Rejected { detail }) => {
                self.clear_errors();
                context.record(Cause::Rejected, Some(detail.clone()));
                Transition(State::expired(false))
            }
            _ => Super,
        }
    }

    /// The credential was validated (or just issued or refreshed). Stays connected on each
    /// successful validation or refresh (a history row each); leaves for expired when the
    /// provider rejects the credential and no refresh fixes it, or when `expires_at` passes
    /// without a successful refresh; a newly supplied credential is validated (→ pending).
    #[state(superstate = "any")]
    fn connected(&mut self, context: &mut Ctx, event: &Event) -> Outcome<State> {
        match event {
            Event::Validated { account, grant } => {
                self.confirm(context, Some(account), grant.as_ref());
                context.record(Cause::Validated, None);
                Handled
            }
            Event::Refreshed { grant } => {
                self.confirm(context, None, Some(grant));
                context.record(Cause::Refreshed, None);
                Handled
            }
            Event::Rejected { detail } => {
                self.clear_errors();
                context.record(Cause::Rejected, Some(detail.clone()));
                Transition(State::expired(false))
            }
            Event::RefreshRejected { detail } => {
                let cause = self.refusal_cause();
                self.clear_errors();
                context.record(cause, Some(detail.clone()));
                Transition(State::expired(false))
            }
            Event::ExpiryPassed => {
                let expires_at = self.grant.as_ref().and_then(|c| c.expires_at);
                if expires_at.is_none_or(|at| at > context.now) {
                    return Handled; // stale: a refresh got there first
                }
                let refreshable = self.refresh_token().is_some();
                context.record(Cause::ExpiredUnrefreshed, self.last_error.clone());
                Transition(State::expired(refreshable))
            }
            // A new credential (pasted into the config) replaces the current one once validated.
            Event::CredentialsSupplied { grant } => self.supply(context, grant),
            Event::ConnectRequested { .. } => {
                context.refuse("already connected; disconnect first");
                Handled
            }
            Event::Cancel => {
                context.refuse("nothing is pending");
                Handled
            }
            _ => Super,
        }
    }

    /// The credential is dead: rejected, or past expiry with no successful refresh. When the
    /// expiry came from unknown refresh answers (`retry_refresh`), refreshing goes on with
    /// backoff and a success returns to connected; otherwise the user must connect again.
    #[state(superstate = "any")]
    fn expired(&mut self, retry_refresh: &bool, context: &mut Ctx, event: &Event) -> Outcome<State> {
        match event {
            Event::ConnectRequested { flow } => self.start_flow(context, flow),
            Event::CredentialsSupplied { grant } => self.supply(context, grant),
            Event::Refreshed { grant } => {
                self.confirm(context, None, Some(grant));
                context.record(Cause::Refreshed, None);
                Transition(State::connected())
            }
            Event::Validated { account, grant } => {
                self.confirm(context, Some(account), grant.as_ref());
                context.record(Cause::Validated, None);
                Transition(State::connected())
            }
            Event::RefreshRejected { detail } | Event::Rejected { detail } if *retry_refresh => {
                self.clear_errors();
                self.last_error = Some(detail.clone());
                Transition(State::expired(false))
            }
            Event::Cancel => {
                context.refuse("nothing is pending");
                Handled
            }
            _ => Super,
        }
    }

    /// What every state does alike: disconnect and removal from anywhere, unknown answers
    /// recorded with backoff, and stale results (an answer to a call made in an earlier state)
    /// ignored.
    #[superstate]
    fn any(&mut self, context: &mut Ctx, event: &Event) -> Outcome<State> {
        let cause = match event {
            Event::Disconnect => Cause::Disconnected,
            Event::Remove => Cause::Removed,
            Event::Unknown { error } => {
                if self.grant.is_some() || self.flow.is_some() {
                    self.failures = self.failures.saturating_add(1);
                    self.last_error = Some(error.clone());
                    let mut delay = schedule::backoff(self.failures, &context.policy, context.jitter);
                    // Several more attempts must fit before the token ends: at most a quarter
                    // of the time left (a second at the least).
                    if let Some(end) = self.grant.as_ref().and_then(|g| g.expires_at).filter(|e| *e > context.now) {
                        delay = delay.min(((end - context.now) / 4).max(TimeDelta::seconds(1)));
                    }
                    self.next_attempt_at = Some(context.now + delay);
                }
                return Handled;
            }
            _ => return Handled,
        };
        if self.grant.is_none() && self.flow.is_none() && self.account.is_none() {
            return Handled; // already disconnected: nothing to do, nothing to record
        }
        // Only an explicit disconnect revokes upstream: a profile removed from the config may
        // have moved elsewhere with its token.
        if let Some(grant) = self.grant.take()
            && cause == Cause::Disconnected
        {
            context.step.effects.push(Effect::Revoke(grant));
        }
        self.end_flow();
        self.account = None;
        self.validated_at = None;
        self.clear_errors();
        context.record(cause, None);
        Transition(State::disconnected())
    }
}

impl Connection {
    fn new(key: ConnKey, now: DateTime<Utc>) -> Self {
        Self {
            key,
            since: now,
            grant: None,
            account: None,
            validated_at: None,
            last_error: None,
            failures: 0,
            next_attempt_at: None,
            flow: None,
            last_poll_at: None,
        }
    }

    fn after_transition(&mut self, _from: &State, _to: &State, context: &mut Ctx) {
        self.since = context.now;
    }

    fn start_flow(&mut self, context: &mut Ctx, flow: &PendingFlow) -> Outcome<State> {
        self.flow = Some(Box::new(flow.clone()));
        self.last_poll_at = None;
        self.clear_errors();
        context.record(Cause::ConnectRequested, None);
        Transition(State::pending(PendingKind::Flow))
    }

    fn supply(&mut self, context: &mut Ctx, grant: &Grant) -> Outcome<State> {
        self.grant = Some(grant.clone());
        self.clear_errors();
        context.step.effects.push(Effect::Validate);
        context.record(Cause::CredentialsSupplied, None);
        Transition(State::pending(PendingKind::Validating))
    }

    fn confirm(&mut self, context: &Ctx, account: Option<&Account>, grant: Option<&Grant>) {
        if let Some(account) = account {
            self.account = Some(account.clone());
        }
        if let Some(grant) = grant {
            self.grant = Some(grant.clone());
        }
        self.validated_at = Some(context.now);
        self.clear_errors();
    }

    fn end_flow(&mut self) {
        self.flow = None;
        self.last_poll_at = None;
    }

    /// A refused refresh after one whose answer was lost: the provider had rotated.
    fn refusal_cause(&self) -> Cause {
        match &self.last_error {
            Some(e) if e.starts_with(REFRESH_ANSWER_LOST) => Cause::RefreshAnswerLost,
            _ => Cause::RefreshRejected,
        }
    }

    fn clear_errors(&mut self) {
        self.last_error = None;
        self.failures = 0;
        self.next_attempt_at = None;
    }

    pub fn refresh_token(&self) -> Option<&Secret> {
        self.grant.as_ref()?.refresh_token.as_ref()
    }
}

/// One connection's machine: the statig machine plus the persistence and query helpers the
/// runner needs. Cloning is cheap enough to keep a copy until a step is committed.
#[derive(Clone)]
pub struct Machine {
    sm: InitializedStateMachine<Connection>,
}

impl fmt::Debug for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Machine").field("state", self.sm.state()).field("connection", self.connection()).finish()
    }
}

impl Machine {
    /// A connection seen for the first time: disconnected.
    pub fn new(key: ConnKey, now: DateTime<Utc>) -> Self {
        let mut ctx = Ctx::new(now, Policy::default(), 0.0);
        let sm = Connection::new(key, now).uninitialized_state_machine().init_with_context(&mut ctx);
        Self { sm }
    }

    /// Rebuild a machine in `state` from its stored data (the store's records).
    pub fn restore(connection: Connection, state: State) -> Self {
        let now = connection.since;
        let mut sm = connection.uninitialized_state_machine();
        *sm.state_mut() = state;
        Self { sm: sm.init_with_context(&mut Ctx::new(now, Policy::default(), 0.0)) }
    }

    pub fn connection(&self) -> &Connection {
        &self.sm
    }

    pub fn key(&self) -> &ConnKey {
        &self.connection().key
    }

    pub fn state(&self) -> &State {
        self.sm.state()
    }

    pub fn state_name(&self) -> StateName {
        match self.sm.state() {
            State::Disconnected {} => StateName::Disconnected,
            State::Pending { .. } => StateName::Pending,
            State::Connected {} => StateName::Connected,
            State::Expired { .. } => StateName::Expired,
        }
    }

    /// Pending on an interactive flow (as opposed to validating a supplied credential).
    pub fn pending_flow(&self) -> Option<&PendingFlow> {
        match self.sm.state() {
            State::Pending { kind: PendingKind::Flow } => self.connection().flow.as_deref(),
            _ => None,
        }
    }

    /// What the store keeps while a refresh is on its way: this connection, saying that a
    /// refresh answer is awaited. A daemon that dies before it stores the answer finds this on
    /// restart and treats the refresh as in doubt: the provider may have rotated.
    pub fn awaiting_refresh(&self) -> Machine {
        let mut connection = self.connection().clone();
        connection.last_error =
            Some(format!("{REFRESH_ANSWER_LOST} (the daemon stopped while the refresh was under way)"));
        Machine::restore(connection, self.state().clone())
    }

    /// Expired after unknown refresh answers: refreshing goes on.
    pub fn retrying_refresh(&self) -> bool {
        matches!(self.sm.state(), State::Expired { retry_refresh: true })
    }

    /// Handle one event at `now`. On a refusal nothing changed.
    pub fn handle(&mut self, event: &Event, now: DateTime<Utc>, policy: Policy, jitter: f64) -> Step {
        let from = self.state_name();
        let mut ctx = Ctx::new(now, policy, jitter);
        self.sm.handle_with_context(event, &mut ctx);
        let mut step = ctx.step;
        if let Some((cause, detail)) = ctx.cause {
            step.transition = Some(Transition { at: now, from, to: self.state_name(), cause, detail });
        }
        step
    }
}

impl Ctx {
    fn new(now: DateTime<Utc>, policy: Policy, jitter: f64) -> Self {
        Self { now, policy, jitter, step: Step::default(), cause: None }
    }
}
