//! Each connection has one owner: a task while there is work, its slot while there is none.
//! The task turns commands, deadlines and provider answers into events, runs them through the
//! machine, commits, publishes, and only then acts; at most one provider call is in flight per
//! connection. When its inbox is empty it hands the machine back to the slot and ends, so an
//! idle connection costs neither a task nor an inbox; the next command starts a new task.

use super::{ConfigCommand, Owner, Shared};
use crate::providers::{Adapter, Poll, Provider, StartError, Verdict};
use crate::wire::{ApiError, ConnectReply, ConnectionView};
use authkeeper_state::schedule::{Action, next_action};
use authkeeper_state::{Cause, Commit, Credentials, Effect, Event, Machine, Refusal, StateName, Step};
use chrono::{DateTime, Utc};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// What the socket asks of a connection; each carries its reply.
pub enum Command {
    Connect(Reply<ConnectReply>),
    Cancel(Reply<ConnectionView>),
    Validate(Reply<ConnectionView>),
    Refresh(Reply<ConnectionView>),
    Disconnect(Reply<ConnectionView>),
    /// A credential the user put in the config file.
    Import(Credentials, Reply<ConnectionView>),
    /// The profile's provider settings changed: use this adapter, and revalidate.
    Reconfigure(Adapter, Reply<ConnectionView>),
    /// The profile left the config: disconnect and stop.
    Remove(Reply<ConnectionView>),
    /// The deadline queue: this connection's deadline has come.
    Wake,
    /// A validation sweep (`validate_all`): validate at this time, unless it happens sooner.
    SweepAt(DateTime<Utc>),
    /// The daemon restarted during a connect flow: wait one interval before polling the same
    /// code again.
    Resume,
}

/// What [`Actor::sleep`] found.
enum Sleep {
    Asleep,
    /// Commands came meanwhile: the actor, the first of them, and the closed inbox that holds
    /// (or is about to hold) the rest.
    Awake(Box<Actor>, Option<Command>, mpsc::Receiver<Command>),
}

/// Commands that may wait in a connection's inbox.
pub const INBOX: usize = 64;

/// A connection with no task: what its next task starts from, besides the committed machine.
pub struct Dormant {
    pub provider: Adapter,
    /// A validation asked for by a sweep, until it is done.
    pub sweep_at: Option<DateTime<Utc>>,
}

/// What `machine` needs next and when: the machine's schedule, a pending sweep, and no provider
/// call while the provider asked for a pause. A refresh takes its slot in the provider's plan.
pub fn next_for(
    machine: &Machine,
    sweep_at: Option<DateTime<Utc>>,
    shared: &Shared,
) -> Option<(DateTime<Utc>, Action)> {
    let mut next = next_action(machine, &shared.policy());
    if let Some(sweep) = sweep_at
        && machine.state_name() == StateName::Connected
        && next.is_none_or(|(at, _)| sweep < at)
    {
        next = Some((sweep, Action::Validate));
    }
    let (mut at, action) = next?;
    let key = machine.key();
    let planner = &shared.planners[&key.provider];
    if action == Action::Refresh
        && machine.state_name() == StateName::Connected
        && machine.connection().next_attempt_at.is_none()
    {
        // Take a slot under the provider's rate, at or before the time it wants.
        at = planner.plan(&key.to_string(), at, shared.clock.now());
    } else {
        planner.release(&key.to_string());
    }
    let calls_provider = !matches!(action, Action::ExpireFlow | Action::ExpireToken);
    let paused = shared.gates.get(&key.provider).and_then(|g| g.paused_until());
    Some(match paused {
        Some(until) if calls_provider && until > at => (until, action),
        _ => (at, action),
    })
}

/// Added to the poll interval on each "slow down" (RFC 8628 §3.5).
const SLOW_DOWN_SECS: u64 = 5;
/// Attempts at a commit before giving up on it.
const COMMIT_ATTEMPTS: u32 = 3;

pub struct Actor {
    machine: Machine,
    provider: Adapter,
    shared: Arc<Shared>,
    inbox: mpsc::Receiver<Command>,
    /// A validation asked for by a sweep, until it is done.
    sweep_at: Option<DateTime<Utc>>,
}

impl Actor {
    pub fn new(machine: Machine, dormant: Dormant, shared: Arc<Shared>, inbox: mpsc::Receiver<Command>) -> Self {
        let Dormant { provider, sweep_at } = dormant;
        Self { machine, provider, shared, inbox, sweep_at }
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
            self.shared.planners[&key.provider].release(&key.to_string());
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
                let Actor { provider, sweep_at, .. } = self;
                slot.owner = Owner::Asleep(Box::new(Dormant { provider, sweep_at }));
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
        let Some((at, action)) = self.next() else { return };
        if at <= now {
            return self.on_action(action).await;
        }
        let key = self.machine.key();
        let paused = self.shared.gates.get(&key.provider).and_then(|g| g.paused_until());
        if paused == Some(at) {
            self.reschedule();
            let message = format!("{} asked for no calls until {at}; waiting", key.provider);
            self.shared.publish_warning(Some(key), message, Some(at));
        }
    }

    fn reschedule(&self) {
        self.shared.deadlines.set(self.machine.key(), self.next().map(|(at, _)| at));
    }

    fn view(&self) -> ConnectionView {
        ConnectionView::of(&self.machine, &self.shared.policy())
    }

    /// Handle one command; false when the connection is done (removed).
    async fn on_command(&mut self, command: Command) -> bool {
        match command {
            Command::Connect(reply) => {
                let _ = reply.send(self.connect().await);
            }
            Command::Cancel(reply) => {
                let r = self.apply(Event::Cancel).await.map(|_| self.view());
                let _ = reply.send(r);
            }
            Command::Validate(reply) => {
                let r = match self.machine.connection().credentials {
                    None => Err(ApiError::not_connected(&self.view())),
                    Some(_) => self.validate_now().await.map(|_| self.view()),
                };
                let _ = reply.send(r);
            }
            Command::Refresh(reply) => {
                let r = match self.machine.connection().credentials.as_ref() {
                    None => Err(ApiError::not_connected(&self.view())),
                    Some(c) if c.refresh_token.is_none() => {
                        Err(ApiError::conflict("this connection has no refresh token"))
                    }
                    Some(_) => self.refresh_now().await.map(|_| self.view()),
                };
                let _ = reply.send(r);
            }
            Command::Disconnect(reply) => {
                let r = self.apply(Event::Disconnect).await.map(|_| self.view());
                let _ = reply.send(r);
            }
            Command::Import(credentials, reply) => {
                let r = self.apply(Event::CredentialsSupplied { credentials }).await.map(|_| self.view());
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
            Command::Wake => self.on_wake().await,
            Command::SweepAt(at) => self.sweep_at = Some(at),
            Command::Resume => {
                if self.machine.pending_flow().is_some() {
                    let _ = self.apply(Event::Resumed).await;
                }
            }
        }
        true
    }

    async fn connect(&mut self) -> Result<ConnectReply, ApiError> {
        match self.machine.state_name() {
            StateName::Pending => {
                return Err(ApiError::conflict("a connect is already pending; cancel it first"));
            }
            StateName::Connected => {
                return Err(ApiError::conflict("already connected; disconnect first"));
            }
            StateName::Disconnected | StateName::Expired => {}
        }
        let flow = self.provider.start_flow(self.shared.clock.now()).await.map_err(|e| match e {
            StartError::Config(m) => ApiError::bad_request(m),
            StartError::Unavailable(m) => ApiError::provider_unavailable(m),
        })?;
        let reply = ConnectReply {
            user_code: flow.user_code.clone(),
            verification_url: flow.verification_url.clone(),
            expires_at: flow.expires_at,
            interval: flow.interval_secs,
            connection: self.view(),
        };
        self.apply(Event::ConnectRequested { flow }).await?;
        Ok(ConnectReply { connection: self.view(), ..reply })
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
            warn!(connection = %self.machine.key(), error = %e.message, "scheduled work failed");
        }
    }

    async fn poll(&mut self) -> Result<(), ApiError> {
        let Some(flow) = self.machine.pending_flow().cloned() else {
            return Ok(());
        };
        let event = match self.provider.poll(&flow, self.shared.clock.now()).await {
            Poll::Pending => Event::FlowPending,
            Poll::SlowDown => Event::FlowSlowDown { interval_secs: flow.interval_secs + SLOW_DOWN_SECS },
            Poll::Approved(credentials) => {
                let account = match self.provider.validate(&credentials).await {
                    Verdict::Valid(account) => Some(account),
                    _ => None,
                };
                Event::Approved { credentials, account }
            }
            Poll::Gone(detail) => Event::FlowExpired { detail },
            Poll::Denied => Event::Denied,
            Poll::Unknown(error) => Event::Unknown { error },
        };
        self.step(event).await.map(drop)
    }

    async fn validate_now(&mut self) -> Result<(), ApiError> {
        self.sweep_at = None;
        let Some(credentials) = self.machine.connection().credentials.clone() else {
            return Ok(());
        };
        let event = match self.provider.validate(&credentials).await {
            Verdict::Valid(account) => Event::Validated { account },
            Verdict::Rejected(detail) => {
                // A refresh may still save a credential whose access token was rejected.
                if credentials.refresh_token.is_some() {
                    return self.refresh_now().await;
                }
                Event::Rejected { detail }
            }
            Verdict::Unknown(error) => Event::Unknown { error },
        };
        self.step(event).await.map(drop)
    }

    async fn refresh_now(&mut self) -> Result<(), ApiError> {
        self.sweep_at = None;
        let Some(credentials) = self.machine.connection().credentials.clone() else {
            return Ok(());
        };
        let event = match self.provider.refresh(&credentials, self.shared.clock.now()).await {
            Verdict::Valid(credentials) => Event::Refreshed { credentials },
            Verdict::Rejected(detail) => Event::RefreshRejected { detail },
            Verdict::Unknown(error) => Event::Unknown { error },
        };
        self.step(event).await.map(drop)
    }

    /// [`Self::step`], then the step's effects.
    async fn apply(&mut self, event: Event) -> Result<Step, ApiError> {
        let step = self.step(event).await?;
        for effect in &step.effects {
            match effect {
                Effect::Validate => self.validate_now().await?,
                Effect::Revoke(credentials) => {
                    if let Err(error) = self.provider.revoke(credentials).await {
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
    async fn step(&mut self, event: Event) -> Result<Step, ApiError> {
        if matches!(event, Event::Unknown { .. }) && *self.shared.shutdown.borrow() {
            return Ok(Step::default()); // a call abandoned for shutdown says nothing about the provider
        }
        let now = self.shared.clock.now();
        let mut next = self.machine.clone();
        let step = next.handle(&event, now, self.shared.policy(), fastrand::f64());
        if let Some(Refusal::Conflict(message)) = step.refusal {
            return Err(ApiError::conflict(message));
        }
        let changed = step.transition.is_some()
            || next.connection().flow != self.machine.connection().flow
            || next.to_row() != self.machine.to_row();
        if changed {
            self.commit(&next, &step).await?;
        }
        self.machine = next;
        // Deadline first: whoever sees the event can rely on the queue being up to date.
        self.reschedule();
        self.publish(&step, &event);
        Ok(step)
    }

    async fn commit(&self, next: &Machine, step: &Step) -> Result<(), ApiError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let commit = Commit { machine: next.clone(), transition: step.transition.clone() };
            match self.shared.committer.commit(commit).await {
                Ok(()) => return Ok(()),
                Err(error) if attempt < COMMIT_ATTEMPTS => {
                    warn!(connection = %next.key(), %error, attempt, "commit failed; retrying");
                    tokio::task::yield_now().await;
                }
                Err(error) => {
                    tracing::error!(connection = %next.key(), %error, "commit failed; the change is dropped");
                    return Err(ApiError::internal(format!("could not save the change: {error}")));
                }
            }
        }
    }

    fn publish(&self, step: &Step, event: &Event) {
        let key = self.machine.key();
        self.shared.update_view(key, &self.machine);
        if let Some(t) = &step.transition {
            if matches!(t.cause, Cause::Approved | Cause::Refreshed | Cause::Disconnected) {
                let credentials = self.machine.connection().credentials.clone();
                let _ = self.shared.config_tx.try_send(ConfigCommand::WriteBack { key: key.clone(), credentials });
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
