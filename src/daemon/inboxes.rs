//! Commands to connections: each connection's task is started when a command comes for it,
//! and with a shared store, the connection's lease is taken first.

use super::actor::{Actor, INBOX};
use super::{Command, DaemonError, Owner, Shared};
use authkeeper_state::{ConnKey, Machine};
use std::sync::Arc;
use tokio::sync::mpsc;

impl Shared {
    /// The inbox of `key`'s task, starting the task if the connection is asleep.
    fn inbox(self: &Arc<Self>, key: &ConnKey) -> Result<mpsc::Sender<Command>, DaemonError> {
        let awake = self.lookup(&key.provider, &key.profile, |s| match &s.owner {
            Owner::Awake(tx) => Some(self.open(tx.clone())),
            Owner::Asleep(_) => None,
        })?;
        if let Some(inbox) = awake {
            return inbox;
        }
        let mut conns = self.conns.write().unwrap();
        let slot = conns.get_mut(key).ok_or_else(|| DaemonError::unknown_profile(&key.provider, &key.profile))?;
        match &slot.owner {
            Owner::Awake(tx) => self.open(tx.clone()),
            Owner::Asleep(_) => {
                let (tx, inbox) = mpsc::channel(INBOX);
                let Owner::Asleep(dormant) = std::mem::replace(&mut slot.owner, Owner::Awake(tx.clone())) else {
                    unreachable!("matched above")
                };
                let machine = Machine::clone(&slot.committed);
                let actor = Actor::new(machine, slot.setup.bind(key), dormant, self.clone(), inbox);
                self.actors.spawn(actor.run(self.shutdown.clone()));
                Ok(tx)
            }
        }
    }

    /// `tx` if its task still takes commands. Called under the map's lock, under which a task
    /// going to sleep also swaps its inbox: a closed one in a slot means the task is gone.
    fn open(&self, tx: mpsc::Sender<Command>) -> Result<mpsc::Sender<Command>, DaemonError> {
        match (tx.is_closed(), *self.shutdown.borrow()) {
            (false, _) => Ok(tx),
            (true, true) => Err(DaemonError::ShuttingDown),
            (true, false) => Err(DaemonError::OwnerGone),
        }
    }

    /// Hand a user's `command` to `key`'s task, waiting while its inbox is full. With a shared
    /// store, the connection's lease is taken first (asked of the daemon holding it).
    pub async fn send(self: &Arc<Self>, key: &ConnKey, command: Command) -> Result<(), DaemonError> {
        if let Some(leases) = &self.leases
            && !leases.holds(key)
        {
            self.lookup(&key.provider, &key.profile, |_| ())?;
            leases.take(self, key).await?;
        }
        self.deliver(key, command).await
    }

    /// The daemon's own command (the config's): with a shared store, only where this daemon
    /// holds the lease or it is free; elsewhere the holder's own config does it.
    pub async fn ask_held<T>(
        self: &Arc<Self>,
        key: &ConnKey,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, DaemonError>>) -> Command,
    ) -> Result<T, DaemonError> {
        if let Some(leases) = &self.leases
            && !leases.hold_if_free(self, key).await
        {
            return Err(DaemonError::NotHolder(format!("{key} is another daemon's")));
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.deliver(key, make(reply)).await?;
        answer.await.map_err(|_| DaemonError::ShuttingDown)?
    }

    /// Hand `command` to `key`'s task, waiting while its inbox is full.
    async fn deliver(self: &Arc<Self>, key: &ConnKey, mut command: Command) -> Result<(), DaemonError> {
        loop {
            match self.inbox(key)?.send(command).await {
                Ok(()) => return Ok(()),
                // The task went to sleep after we took its inbox: wake it again.
                Err(mpsc::error::SendError(c)) if !*self.shutdown.borrow() => command = c,
                Err(_) => return Err(DaemonError::ShuttingDown),
            }
        }
    }

    /// Hand `command` to `key`'s task unless its inbox is full (it is busy).
    pub fn try_send(self: &Arc<Self>, key: &ConnKey, mut command: Command) -> Result<(), DaemonError> {
        loop {
            match self.inbox(key)?.try_send(command) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Closed(c)) if !*self.shutdown.borrow() => command = c,
                Err(_) => return Err(DaemonError::Busy),
            }
        }
    }

    /// Ask a connection something and wait for the answer.
    pub async fn ask<T>(
        self: &Arc<Self>,
        key: &ConnKey,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, DaemonError>>) -> Command,
    ) -> Result<T, DaemonError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(key, make(reply)).await?;
        answer.await.map_err(|_| DaemonError::ShuttingDown)?
    }

    /// New work from a user, unless the store cannot save what it would change.
    pub async fn ask_new<T>(
        self: &Arc<Self>,
        key: &ConnKey,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, DaemonError>>) -> Command,
    ) -> Result<T, DaemonError> {
        if let Some(error) = self.store_health.failing() {
            return Err(DaemonError::StoreUnwritable(error));
        }
        self.ask(key, make).await
    }
}
