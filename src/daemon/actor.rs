//! Each connection has one owner: a task while there is work, its slot while there is none.
//! The task turns commands, deadlines and provider answers into events, runs them through the
//! machine, commits, publishes, and only then acts; at most one provider call is in flight per
//! connection. When its inbox is empty it hands the machine back to the slot and ends, so an
//! idle connection costs neither a task nor an inbox; the next command starts a new task.

pub use super::next::next_for;
use super::{CallbackError, DaemonError, Owner, Shared};
use crate::providers::{Adapter, Begun, Identity, Input, Poll, Verdict};
use crate::web::{CallbackQuery, flow_key};
use crate::wire::{ConnectReply, ConnectionView, PendingView};
use authkeeper_state::records::encode_connection;
use authkeeper_state::schedule::Action;
use authkeeper_state::{
    Cause, Commit, Effect, Event, Grant, Machine, PendingFlow, REFRESH_ANSWER_LOST, Refusal, StateName, Step,
};
use chrono::{DateTime, TimeDelta, Utc};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

pub type Reply<T> = oneshot::Sender<Result<T, DaemonError>>;

/// What the socket asks of a connection; each carries its reply.
pub enum Command {
    /// Begin a flow (`None`: the provider's first) with the user's input.
    Connect(Option<String>, Input, Reply<ConnectReply>),
    Cancel(Reply<ConnectionView>),
    Validate(Reply<ConnectionView>),
    Refresh(Reply<ConnectionView>),
    Disconnect(Reply<ConnectionView>),
    /// A credential the user put in the config file.
    Import(Grant, Reply<ConnectionView>),
    /// The profile's provider settings changed: use this adapter, and revalidate.
    Reconfigure(Adapter, Reply<ConnectionView>),
    /// The profile left the config: disconnect and stop.
    Remove(Reply<ConnectionView>),
    /// The deadline queue: this connection's deadline has come (the permit is held until what
    /// was due is done).
    Wake(super::deadlines::WakePermit),
    /// A validation sweep (`validate_all`): validate at this time, unless it happens sooner.
    SweepAt(DateTime<Utc>),
    /// The daemon restarted during a connect flow: wait one interval before polling the same
    /// code again.
    Resume,
    /// A browser came back to the web listener from the provider with this query.
    Callback(CallbackQuery, oneshot::Sender<Result<ConnectionView, CallbackError>>),
}

/// What [`Actor::sleep`] found.
enum Sleep {
    Asleep,
    /// Commands came meanwhile: the actor, the first of them, and the closed inbox that holds
    /// (or is about to hold) the rest.
    Awake(Box<Actor>, Option<Command>, mpsc::Receiver<Command>),
}

/// How long a commit may be retried.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Patience {
    /// Until the store takes it: the change may carry a credential the provider just issued.
    UntilWritten,
    /// Once: the change records an intent only, and nothing acts on it if it is not written.
    Once,
}

/// Commands that may wait in a connection's inbox.
pub const INBOX: usize = 64;

/// A connection with no task: what its next task starts from, besides the committed machine
/// and the slot's adapter.
pub struct Dormant {
    /// A validation asked for by a sweep, until it is done.
    pub sweep_at: Option<DateTime<Utc>>,
}

/// Added to the poll interval on each "slow down" (RFC 8628 §3.5).
const SLOW_DOWN_SECS: u64 = 5;
/// The longest wait between attempts at a commit the store refused.
const COMMIT_RETRY_CAP: Duration = Duration::from_secs(5);
/// Attempts at a refused commit once the daemon is stopping (about half a minute with backoff).
const COMMIT_ATTEMPTS_AT_SHUTDOWN: u32 = 10;
/// How long scheduled provider calls wait while the store refuses writes.
const STORE_DOWN_DEFER: TimeDelta = TimeDelta::seconds(5);

pub struct Actor {
    machine: Machine,
    provider: Adapter,
    shared: Arc<Shared>,
    inbox: mpsc::Receiver<Command>,
    /// A validation asked for by a sweep, until it is done.
    sweep_at: Option<DateTime<Utc>>,
}

impl Actor {
    pub fn new(
        machine: Machine,
        provider: Adapter,
        dormant: Dormant,
        shared: Arc<Shared>,
        inbox: mpsc::Receiver<Command>,
    ) -> Self {
        Self { machine, provider, shared, inbox, sweep_at: dormant.sweep_at }
    }

    /// Handle commands until the inbox is empty, then go back to sleep in the slot.
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) {
        loop {
            while let Ok(command) = self.inbox.try_recv() {
                if !self.handle(command, &shutdown).await {
                    return;
                }
            }
            self = match self.sleep() {
                Sleep::Asleep => return,
                Sleep::Awake(mut actor, first, mut closing) => {
                    if let Some(command) = first
                        && !actor.handle(command, &shutdown).await
                    {
                        return;
                    }
                    // Senders that took a place in the old inbox before it closed still deliver:
                    // `recv` ends only when the last of them has.
                    while let Some(command) = closing.recv().await {
                        if !actor.handle(command, &shutdown).await {
                            return;
                        }
                    }
                    *actor
                }
            };
        }
    }

    /// Handle one command; false when the task must end (shutdown, or the connection removed).
    async fn handle(&mut self, command: Command, shutdown: &watch::Receiver<bool>) -> bool {
        if *shutdown.borrow() {
            return false;
        }
        let more = self.on_command(command).await;
        self.reschedule();
        if !more {
            // Removed: its slot goes too, so that no command waits for it.
            let key = self.machine.key();
            self.shared.conns.write().unwrap().remove(key);
            self.shared.deadlines.set(key, None);
            self.shared.planners[key.provider.as_str()].release(key.profile.as_str());
        }
        more
    }

    /// Hand the machine back to its slot if nothing is on its way to the inbox. Otherwise stay
    /// awake: new senders get a fresh inbox, and what is on its way to the old one is handled
    /// first.
    fn sleep(mut self) -> Sleep {
        let shared = self.shared.clone();
        let mut conns = shared.conns.write().unwrap();
        let Some(slot) = conns.get_mut(self.machine.key()) else { return Sleep::Asleep };
        self.inbox.close();
        let first = match self.inbox.try_recv() {
            Err(mpsc::error::TryRecvError::Disconnected) => {
                // Closed, empty, and no sender holds a place in it. The slot holds the committed
                // machine, which is this one: the step that changed it last published it.
                slot.owner = Owner::Asleep(Dormant { sweep_at: self.sweep_at });
                return Sleep::Asleep;
            }
            Ok(command) => Some(command),
            Err(mpsc::error::TryRecvError::Empty) => None, // one is on its way
        };
        let (tx, inbox) = mpsc::channel(INBOX);
        slot.owner = Owner::Awake(tx);
        let closing = std::mem::replace(&mut self.inbox, inbox);
        Sleep::Awake(Box::new(self), first, closing)
    }

    fn next(&self) -> Option<(DateTime<Utc>, Action)> {
        next_for(&self.machine, self.sweep_at, &self.shared)
    }

    async fn on_wake(&mut self) {
        let now = self.shared.clock.now();
        let key = self.machine.key();
        if !self.shared.owns(key) {
            // Another daemon's now (a shared store): it does the work.
            return self.shared.deadlines.set(key, None);
        }
        let Some((at, action)) = self.next() else { return };
        if let Some(later) = self.held_back(at, action) {
            return self.shared.deadlines.set(key, Some(later));
        }
        if at <= now {
            return self.on_action(action).await;
        }
        let paused = self.shared.gates.get(key.provider.as_str()).and_then(|g| g.paused_until());
        if paused == Some(at) {
            self.reschedule();
            let message = format!("{} asked for no calls until {at}; waiting", key.provider);
            self.shared.publish_warning(Some(key), message, Some(at));
        }
    }

    fn reschedule(&self) {
        let key = self.machine.key();
        let next = self.next().filter(|_| self.shared.owns(key));
        self.shared.deadlines.set(key, next.map(|(at, action)| self.held_back(at, action).unwrap_or(at)));
    }

    /// Until when `action`, due at `at`, must wait, if it must: while this daemon's membership
    /// of a shared store is not renewed, and, for a provider call, while the store refuses
    /// writes (an answer that cannot be saved, a rotated token say, must not be asked for).
    fn held_back(&self, at: DateTime<Utc>, action: Action) -> Option<DateTime<Utc>> {
        let now = self.shared.clock.now();
        let calls_provider = !matches!(action, Action::ExpireFlow | Action::ExpireToken);
        let blocked = !self.shared.acts_on(self.machine.key())
            || (calls_provider && self.shared.store_health.failing().is_some());
        (at <= now && blocked).then(|| now + STORE_DOWN_DEFER)
    }

    /// Whether this daemon may call the provider for this connection: always, unless daemons
    /// share the store and this one does not hold its lease (or could not renew its own).
    fn may_call(&self) -> Result<(), DaemonError> {
        match self.shared.acts_on(self.machine.key()) {
            true => Ok(()),
            false => Err(DaemonError::NotHolder(format!("{} is not held here", self.machine.key()))),
        }
    }

    fn view(&self) -> ConnectionView {
        let now = self.shared.clock.now();
        let conns = self.shared.conns.read().unwrap();
        let warnings = conns.get(self.machine.key()).map(|s| s.warnings(now)).unwrap_or_default();
        ConnectionView::with_warnings(&self.machine, &self.shared.policy(), warnings)
    }

    /// Handle one command; false when the connection is done (removed).
    async fn on_command(&mut self, command: Command) -> bool {
        match command {
            Command::Connect(flow, input, reply) => {
                let _ = reply.send(self.connect(flow, input).await);
            }
            Command::Cancel(reply) => {
                let r = self.apply(Event::Cancel).await.map(|_| self.view());
                let _ = reply.send(r);
            }
            Command::Validate(reply) => {
                let r = match self.machine.connection().grant {
                    None => Err(DaemonError::not_connected(self.view())),
                    Some(_) => self.validate_now().await.map(|_| self.view()),
                };
                let _ = reply.send(r);
            }
            Command::Refresh(reply) => {
                let r = match self.machine.connection().grant.as_ref() {
                    None => Err(DaemonError::not_connected(self.view())),
                    Some(c) if c.refresh_token.is_none() => {
                        Err(DaemonError::Conflict("this connection has no refresh token".into()))
                    }
                    Some(_) => self.refresh_now().await.map(|_| self.view()),
                };
                let _ = reply.send(r);
            }
            Command::Disconnect(reply) => {
                let r = self.apply(Event::Disconnect).await.map(|_| self.view());
                let _ = reply.send(r);
            }
            Command::Import(grant, reply) => {
                let r = self.apply(Event::CredentialsSupplied { grant }).await.map(|_| self.view());
                let _ = reply.send(r);
            }
            Command::Reconfigure(provider, reply) => {
                self.provider = provider;
                let r = match self.machine.state_name() {
                    StateName::Connected | StateName::Expired => self.validate_now().await.map(|_| self.view()),
                    _ => Ok(self.view()),
                };
                let _ = reply.send(r);
            }
            Command::Remove(reply) => {
                let _ = reply.send(self.apply(Event::Remove).await.map(|_| self.view()));
                return false;
            }
            Command::Wake(_permit) => self.on_wake().await,
            Command::SweepAt(at) => self.sweep_at = Some(at),
            Command::Callback(query, reply) => {
                let _ = reply.send(self.callback(query).await);
            }
            Command::Resume => {
                if self.machine.pending_flow().is_some() {
                    let _ = self.apply(Event::Resumed).await;
                }
            }
        }
        true
    }

    async fn connect(&mut self, flow: Option<String>, input: Input) -> Result<ConnectReply, DaemonError> {
        match self.machine.state_name() {
            StateName::Pending => {
                return Err(DaemonError::Conflict("a connect is already pending; cancel it first".into()));
            }
            StateName::Connected => {
                return Err(DaemonError::Conflict("already connected; disconnect first".into()));
            }
            StateName::Disconnected | StateName::Expired => {}
        }
        let manifest = self.provider.provider().manifest();
        let flow = flow.unwrap_or_else(|| manifest.flows[0].flow.to_owned());
        self.may_call()?;
        // The input (a password, say) is moved into the call and dropped with it.
        let begun = self.provider.begin(&flow, input, self.shared.clock.now()).await?;
        let mut reply = ConnectReply { pending: None, interval: None, connection: self.view() };
        match begun {
            Begun::Pending(pending) => {
                reply.pending = Some(PendingView::of(&pending));
                reply.interval = pending.interval_secs;
                let state = pending.secret("state").map(|s| s.expose().to_owned());
                self.apply(Event::ConnectRequested { flow: pending }).await?;
                if let Some(state) = state {
                    self.shared.callbacks.insert(&state, self.machine.key());
                }
            }
            Begun::Granted(grant) => {
                self.apply(Event::CredentialsSupplied { grant }).await?;
            }
        }
        reply.connection = self.view();
        Ok(reply)
    }

    async fn on_action(&mut self, action: Action) {
        let result = match action {
            Action::PollFlow => self.poll().await,
            Action::ExpireFlow => self
                .apply(Event::FlowExpired { detail: "the code expired before it was approved".into() })
                .await
                .map(drop),
            Action::Validate => self.validate_now().await,
            Action::Refresh => self.refresh_now().await,
            Action::ExpireToken => self.apply(Event::ExpiryPassed).await.map(drop),
        };
        if let Err(e) = result {
            warn!(connection = %self.machine.key(), error = %e, "scheduled work failed");
        }
    }

    async fn poll(&mut self) -> Result<(), DaemonError> {
        let Some(flow) = self.machine.pending_flow().cloned() else {
            return Ok(());
        };
        self.may_call()?;
        let answer = self.provider.poll(&flow, self.shared.clock.now()).await;
        self.flow_answer(&flow, answer).await
    }

    /// What a poll or a callback learned about the pending `flow`.
    async fn flow_answer(&mut self, flow: &PendingFlow, answer: Poll) -> Result<(), DaemonError> {
        let event = match answer {
            Poll::Pending => Event::FlowPending,
            Poll::SlowDown => Event::FlowSlowDown {
                interval_secs: flow.interval_secs.unwrap_or(0).saturating_add(SLOW_DOWN_SECS).min(3600),
            },
            // Committed before any other call: who it belongs to is asked afterwards, by the
            // `Validate` effect of the approval.
            Poll::Approved(grant) => return self.apply(Event::Approved { grant }).await.map(drop),
            Poll::Gone(detail) => Event::FlowExpired { detail },
            Poll::Denied => Event::Denied,
            Poll::Unknown(error) => Event::Unknown { error },
        };
        self.step(event).await.map(drop)
    }

    /// A browser came back with `query`. Only the pending flow's own `state`, before the flow
    /// expires, is taken; anything else changes nothing.
    async fn callback(&mut self, query: CallbackQuery) -> Result<ConnectionView, CallbackError> {
        let flow = self.machine.pending_flow().cloned().ok_or(CallbackError::UnknownState)?;
        let expected = flow.secret("state").map(|s| s.expose().as_bytes());
        let presented = flow_key(&query).map(str::as_bytes);
        match (expected, presented) {
            (Some(e), Some(p)) if bool::from(subtle::ConstantTimeEq::ct_eq(e, p)) => {}
            _ => return Err(CallbackError::UnknownState),
        }
        let now = self.shared.clock.now();
        if now >= flow.expires_at {
            return Err(CallbackError::Expired);
        }
        self.may_call()?;
        let answer = self.provider.complete(&flow, &query, now).await;
        self.flow_answer(&flow, answer).await?;
        Ok(self.view())
    }

    /// A refresh answer was lost: only the retry of that refresh can tell what became of the
    /// grant, so nothing else (a validation that would clear the doubt) goes first.
    fn refresh_in_doubt(&self) -> bool {
        let c = self.machine.connection();
        c.refresh_token().is_some() && c.last_error.as_deref().is_some_and(|e| e.starts_with(REFRESH_ANSWER_LOST))
    }

    async fn validate_now(&mut self) -> Result<(), DaemonError> {
        self.sweep_at = None;
        if self.refresh_in_doubt() {
            return self.refresh_now().await;
        }
        let Some(grant) = self.machine.connection().grant.clone() else {
            return Ok(());
        };
        let last = self.machine.connection().validated_at.unwrap_or(self.machine.connection().since);
        self.may_call()?;
        let event = match self.provider.validate(&grant).await {
            Verdict::Valid(Identity { account, grant: learned }) => {
                // A token with no refresh that nears its end: said once at each notice point.
                if let Some(notice) = self.provider.expiry_notice(&grant, last, self.shared.clock.now()) {
                    self.shared.publish_warning(Some(self.machine.key()), notice, grant.expires_at);
                }
                Event::Validated { account, grant: learned }
            }
            Verdict::Rejected(detail) => {
                // A refresh may still save a credential whose access token was rejected.
                if grant.refresh_token.is_some() {
                    return self.refresh_now().await;
                }
                Event::Rejected { detail }
            }
            Verdict::Unknown(error) => Event::Unknown { error },
        };
        self.step(event).await.map(drop)
    }

    async fn refresh_now(&mut self) -> Result<(), DaemonError> {
        self.sweep_at = None;
        let Some(grant) = self.machine.connection().grant.clone() else {
            return Ok(());
        };
        let in_doubt = self.refresh_in_doubt();
        self.may_call()?;
        // Write-ahead: the store says a refresh is under way before it goes out (unless it
        // says so already), and the outcome below always replaces that.
        // Nothing has happened yet if it cannot be written: the refresh is refused, not retried.
        if !in_doubt {
            self.commit(&self.machine.awaiting_refresh(), &Step::default(), Patience::Once).await?;
        }
        // Again, right before the call: a daemon paused in between may have lost the lease.
        self.may_call()?;
        let event = match self.provider.refresh(&grant, self.shared.clock.now()).await {
            Verdict::Valid(fresh) => {
                let answered = std::time::Instant::now();
                if let Some(end) = grant.expires_at {
                    let lead = (end - self.shared.clock.now()).num_milliseconds() as f64 / 1000.0;
                    self.shared.metrics.refresh_lead(&self.machine.key().provider, lead);
                }
                let step = self.step_stored(Event::Refreshed { grant: fresh }, true).await;
                // From the provider's answer to our commit: a kill in there loses the answer.
                debug!(
                    connection = %self.machine.key(),
                    window_us = answered.elapsed().as_micros() as u64,
                    "refresh answer stored"
                );
                return step.map(drop);
            }
            Verdict::Rejected(detail) => Event::RefreshRejected { detail },
            // Still no answer on the lost one: the doubt stays until one comes.
            Verdict::Unknown(error) if in_doubt && !error.starts_with(REFRESH_ANSWER_LOST) => {
                Event::Unknown { error: format!("{REFRESH_ANSWER_LOST}; the retry got no answer either: {error}") }
            }
            Verdict::Unknown(error) => Event::Unknown { error },
        };
        self.step_stored(event, true).await.map(drop)
    }

    /// [`Self::step`], then the step's effects.
    async fn apply(&mut self, event: Event) -> Result<Step, DaemonError> {
        let step = self.step(event).await?;
        for effect in &step.effects {
            match effect {
                Effect::Validate => self.validate_now().await?,
                Effect::Revoke(grant) => {
                    if self.may_call().is_err() {
                        continue;
                    }
                    if let Err(error) = self.provider.revoke(grant).await {
                        warn!(connection = %self.machine.key(), %error, "could not revoke upstream");
                    }
                }
            }
        }
        Ok(step)
    }

    /// Event → machine → durable commit → publish. Nothing is published or acted on before its
    /// commit; a refused or failed step leaves the machine as it was. Provider answers come
    /// through here: they never carry effects.
    async fn step(&mut self, event: Event) -> Result<Step, DaemonError> {
        self.step_stored(event, false).await
    }

    /// [`Self::step`]; `stored_differs` says the store holds something other than the machine
    /// (a write-ahead mark), so the outcome is committed even when it changes nothing.
    async fn step_stored(&mut self, event: Event, stored_differs: bool) -> Result<Step, DaemonError> {
        if matches!(event, Event::Unknown { .. }) && *self.shared.shutdown.borrow() {
            return Ok(Step::default()); // a call abandoned for shutdown says nothing about the provider
        }
        let now = self.shared.clock.now();
        let mut next = self.machine.clone();
        let step = next.handle(&event, now, self.shared.policy(), fastrand::f64());
        if let Some(Refusal::Conflict(message)) = step.refusal {
            return Err(DaemonError::Conflict(message));
        }
        let changed = stored_differs
            || step.transition.is_some()
            || next.connection().flow != self.machine.connection().flow
            || encode_connection(&next) != encode_connection(&self.machine);
        if changed {
            self.commit(&next, &step, Patience::UntilWritten).await?;
        }
        // A callback flow that ended takes its `state` out of the index: it is used once.
        if let Some(old) = self.machine.pending_flow().filter(|f| next.pending_flow() != Some(*f))
            && let Some(state) = old.secret("state")
        {
            self.shared.callbacks.remove(state.expose());
        }
        self.machine = next;
        // Deadline first: whoever sees the event can rely on the queue being up to date.
        self.reschedule();
        self.publish(&step, &event);
        Ok(step)
    }

    /// Commit durably. A refused commit is retried with backoff until it goes through (or the
    /// daemon stops): the step may carry a credential the provider has just replaced, so the
    /// machine never goes on without it. Meanwhile `/v1/health` says the store is failing and
    /// new work is refused. A change that records only an intent is tried [`Patience::Once`].
    async fn commit(&self, next: &Machine, step: &Step, patience: Patience) -> Result<(), DaemonError> {
        let mut attempt: u32 = 0;
        loop {
            let commit = Commit { machine: next.clone(), transition: step.transition.clone() };
            let outcome = self.shared.committer.commit(commit).await;
            if matches!(&outcome, Err(e) if e == super::committer::NOT_HOLDER) {
                // Another daemon holds it: this change is not to be written, nor retried.
                error!(connection = %next.key(), "the lease passed to another daemon; this change is not written");
                return Err(DaemonError::NotHolder(format!("{} passed to another daemon", next.key())));
            }
            self.shared
                .store_health
                .record(outcome.as_ref().map(drop).map_err(String::as_str), self.shared.clock.now());
            let error = match outcome {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if patience == Patience::Once {
                return Err(DaemonError::StoreUnwritable(error));
            }
            attempt += 1;
            let stopping = *self.shared.shutdown.borrow();
            if stopping && attempt > COMMIT_ATTEMPTS_AT_SHUTDOWN {
                error!(connection = %next.key(), %error, "commit failed at shutdown; this change is not saved");
                return Err(DaemonError::Store(error));
            }
            let wait = COMMIT_RETRY_CAP.min(Duration::from_millis(50) * 2u32.saturating_pow(attempt.min(10)));
            if stopping {
                // The commit thread outlives the connections: keep trying for a while.
                tokio::time::sleep(wait).await;
                continue;
            }
            warn!(connection = %next.key(), %error, attempt, retry_in_ms = wait.as_millis() as u64, "commit failed; retrying");
            if attempt == 1 {
                let message = format!("the store refused a change ({error}); retrying until it takes it");
                self.shared.publish_warning(Some(next.key()), message, None);
            }
            let mut stop = self.shared.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }
    }

    fn publish(&self, step: &Step, event: &Event) {
        let key = self.machine.key();
        self.shared.update_view(key, &self.machine);
        if let Some(t) = &step.transition {
            if matches!(t.cause, Cause::Approved | Cause::Refreshed | Cause::Disconnected | Cause::Validated) {
                self.shared.write_backs.push(key.clone(), self.machine.connection().grant.clone());
            }
            info!(connection = %key, from = t.from.as_str(), to = t.to.as_str(), cause = ?t.cause, detail = t.detail.as_deref(), "transition");
            self.shared.publish_transition(key, t);
        } else if let Event::Unknown { error } = event {
            let retry_at = self.machine.connection().next_attempt_at;
            warn!(connection = %key, %error, retry_at = retry_at.map(|t| t.to_rfc3339()), "no verdict from the provider; will retry");
            self.shared.publish_warning(Some(key), format!("no verdict from {}: {error}", key.provider), retry_at);
        }
    }
}
