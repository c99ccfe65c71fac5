//! Several daemons on one PostgreSQL store. Each is a member with a lease on the database's
//! clock, renewed every third of it; each connection's lease names the one daemon that may call
//! its provider and write it. The connections are spread over the live members by rendezvous
//! hashing; a member that joins is handed its share by the others as their connections go
//! idle, and the share of a member whose lease lapsed is taken by the others.
//!
//! A daemon acts on a connection only while it holds its lease and its own membership is
//! surely alive: it counts its lease from the moment it asked for the renewal, and stops short
//! of its end, so it has stopped before any other daemon can take over. A user's command for a
//! connection held elsewhere asks its holder to let go, and waits. The others' commits are read
//! within a second (at once when their `NOTIFY` arrives): their connections' states replace the
//! slots' and their transitions are published on `/v1/events`. Each provider's global rate is
//! split evenly over the live members (`rates.rs`).

use super::{DaemonError, Owner, Shared};
use authkeeper_pgstore::PgStore;
use authkeeper_state::{ConnKey, Machine};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

/// What made a daemon look at the leases again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Look {
    /// Its own renewal: the live members may have changed.
    Renewal,
    /// Another daemon let go of leases (handed over, or left).
    Released,
    /// Another daemon asked for a lease.
    Wanted,
}

/// Every how many renewals every free lease is looked at.
const SWEEP_EVERY: u32 = 10;

/// How often the others' commits are read when no notification came.
const CATCH_UP: Duration = Duration::from_secs(1);

pub struct Leases {
    store: PgStore,
    lease: Duration,
    /// Connections whose lease this daemon holds.
    held: RwLock<HashSet<ConnKey>>,
    /// Until when this daemon's membership is surely alive (monotonic).
    valid_until: Mutex<Instant>,
    /// Another daemon let go of a lease (or wants one).
    moved: Notify,
    /// The newest connection version and history sequence read.
    position: Mutex<(i64, i64)>,
    /// The live members at the last look.
    members: Mutex<Vec<String>>,
    /// Held connections to let go of as soon as they are idle: they belong with another live
    /// member, or one asked for them.
    leaving: Mutex<HashSet<ConnKey>>,
    /// Renewals so far.
    renewals: std::sync::atomic::AtomicU32,
    me: String,
}

/// Which live member a connection belongs with: the highest hash of (member, key).
fn winner<'a>(members: &'a [String], key: &str) -> Option<&'a str> {
    let score = |m: &str| {
        let mut bytes = Vec::with_capacity(m.len() + key.len() + 1);
        bytes.extend_from_slice(m.as_bytes());
        bytes.push(b'/');
        bytes.extend_from_slice(key.as_bytes());
        // FNV-1a, then splitmix64's finaliser: FNV values of strings that share a long suffix
        // compare alike, which would hand one member nearly everything.
        let mut z = authkeeper_state::store::settings_digest(&bytes);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    members.iter().max_by_key(|m| score(m)).map(String::as_str)
}

/// Run a blocking store call off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, authkeeper_state::StoreError> + Send + 'static,
) -> Result<T, DaemonError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DaemonError::Internal(e.to_string()))?
        .map_err(|e| DaemonError::Store(e.to_string()))
}

impl Leases {
    /// Join the members of `store` with a lease of `lease`.
    pub fn join(store: PgStore, lease: Duration) -> Result<Arc<Self>, authkeeper_state::StoreError> {
        let asked = Instant::now();
        let position = store.position()?;
        let me = store.join(lease)?;
        Ok(Arc::new(Self {
            store,
            lease,
            held: RwLock::default(),
            valid_until: Mutex::new(asked + lease.mul_f64(0.9)),
            moved: Notify::new(),
            position: Mutex::new(position),
            members: Mutex::default(),
            leaving: Mutex::default(),
            renewals: Default::default(),
            me,
        }))
    }

    /// How many daemons were live members at the last look.
    pub fn members(&self) -> usize {
        self.members.lock().unwrap().len()
    }

    pub fn id(&self) -> &str {
        &self.me
    }

    /// Whether this daemon's membership is surely alive: renewed within the last 0.9 lease.
    pub fn valid(&self) -> bool {
        Instant::now() < *self.valid_until.lock().unwrap()
    }

    /// Whether this daemon may act on `key` now.
    pub fn holds(&self, key: &ConnKey) -> bool {
        self.valid() && self.owns(key)
    }

    /// Whether `key`'s lease is this daemon's, whether or not its own membership is renewed
    /// right now (while it is not, the connection waits instead of being dropped).
    pub fn owns(&self, key: &ConnKey) -> bool {
        self.held.read().unwrap().contains(key)
    }

    /// Take the leases of the stored connections `keys` that belong with this daemon (start-up,
    /// before any connection has a slot).
    pub fn take_share(&self, keys: impl Iterator<Item = ConnKey>) -> Result<usize, authkeeper_state::StoreError> {
        let members = self.store.members()?;
        let mine: Vec<String> =
            keys.map(|k| k.to_string()).filter(|k| winner(&members, k) == Some(self.me.as_str())).collect();
        let taken = self.store.acquire_only(&mine)?;
        let mut held = self.held.write().unwrap();
        held.extend(taken.iter().map(|k| authkeeper_state::store::parse_key(k)));
        *self.members.lock().unwrap() = members;
        Ok(held.len())
    }

    /// Hold `key` for a command of the daemon's own (the config's): taken when it is free, never
    /// asked of another daemon. Whether this daemon holds it now.
    pub async fn hold_if_free(&self, shared: &Arc<Shared>, key: &ConnKey) -> bool {
        if self.holds(key) {
            return true;
        }
        if !self.valid() {
            return false;
        }
        let (store, wanted) = (self.store.clone(), vec![key.to_string()]);
        match blocking(move || store.acquire(&wanted)).await {
            Ok(taken) if !taken.is_empty() => {
                self.install(shared, taken);
                self.holds(key)
            }
            _ => false,
        }
    }

    /// Hold `key` for a user's command: taken when free, else asked of its holder, who lets go
    /// once the connection is idle. Waits up to twice the lease.
    pub async fn take(&self, shared: &Arc<Shared>, key: &ConnKey) -> Result<(), DaemonError> {
        let until = tokio::time::Instant::now() + self.lease * 2;
        let mut asked = false;
        loop {
            // Registered before looking, so that a hand-over in between is not missed.
            let moved = self.moved.notified();
            let mut moved = std::pin::pin!(moved);
            moved.as_mut().enable();
            if self.hold_if_free(shared, key).await {
                return Ok(());
            }
            if !self.valid() {
                return Err(DaemonError::NotHolder("this daemon's own lease is not renewed".into()));
            }
            if !asked {
                let (store, wanted) = (self.store.clone(), key.to_string());
                blocking(move || store.want(&wanted)).await?;
                asked = true;
            }
            // Told when the holder lets go; looked at again every third of a lease, for a holder
            // whose own lease lapses without a word.
            let look = (tokio::time::Instant::now() + self.lease / 3).min(until);
            let _ = tokio::time::timeout_at(look, moved).await;
            if tokio::time::Instant::now() >= until {
                // Asked no more: a lease let go later is free for whoever it belongs with.
                let (store, wanted) = (self.store.clone(), key.to_string());
                let _ = blocking(move || store.unwant(&wanted)).await;
                return Err(DaemonError::NotHolder(format!("another daemon is busy with {key}")));
            }
        }
    }

    /// Leases just taken: the connections as stored replace the slots' (a slot with a task
    /// keeps its own), then they are held and scheduled here.
    fn install(&self, shared: &Arc<Shared>, taken: Vec<(String, Option<Machine>)>) {
        let keys: Vec<ConnKey> = taken.iter().map(|(k, _)| authkeeper_state::store::parse_key(k)).collect();
        for ((_, machine), key) in taken.into_iter().zip(&keys) {
            if let Some(machine) = machine {
                shared.replace_if_asleep(key, machine);
            }
        }
        self.held.write().unwrap().extend(keys.iter().cloned());
        for key in &keys {
            shared.schedule(key);
        }
    }

    /// Let go of `keys` whose connections are idle: no longer held or scheduled here. Returns
    /// those let go, for the store.
    fn let_go(&self, shared: &Shared, keys: impl Iterator<Item = ConnKey>) -> Vec<String> {
        let conns = shared.conns.read().unwrap();
        let mut held = self.held.write().unwrap();
        let mut out = Vec::new();
        for key in keys {
            if matches!(conns.get(&key).map(|s| &s.owner), Some(Owner::Awake(_))) {
                continue;
            }
            if held.remove(&key) {
                shared.deadlines.set(&key, None);
                out.push(key.to_string());
            }
        }
        out
    }

    /// Renew the membership; a lapsed one ends the daemon (others may hold its connections).
    async fn renew(&self, shared: &Shared) {
        let asked = Instant::now();
        let (store, lease) = (self.store.clone(), self.lease);
        match blocking(move || store.renew(lease)).await {
            Ok(true) => *self.valid_until.lock().unwrap() = asked + self.lease.mul_f64(0.9),
            Ok(false) => {
                *self.valid_until.lock().unwrap() = asked;
                error!("this daemon's lease lapsed: other daemons may hold its connections now; stopping");
                shared.fatal.notify_one();
            }
            Err(e) => warn!(error = %e, "could not renew this daemon's lease; retrying"),
        }
    }

    /// Hand connections to where they belong. When the live members changed (or another let go
    /// of some), free ones that belong here are taken; when they changed, held ones that belong
    /// with another live member are let go as they go idle; when another asked for some, those.
    async fn rebalance(&self, shared: &Arc<Shared>, why: Look) {
        let store = self.store.clone();
        let Ok(members) = blocking(move || store.members()).await else { return };
        let changed = *self.members.lock().unwrap() != members;
        *self.members.lock().unwrap() = members.clone();
        shared.share_limits(members.len());
        // Now and then, a look at every free lease whatever happened: one let go while nobody
        // was listening is taken all the same.
        let sweep = why == Look::Renewal
            && self.renewals.fetch_add(1, std::sync::atomic::Ordering::Relaxed).is_multiple_of(SWEEP_EVERY);
        if changed || sweep || why == Look::Released {
            let store = self.store.clone();
            let Ok(free) = blocking(move || store.free()).await else { return };
            // Those that belong here, and those let go because this daemon asked for them.
            let mine: Vec<String> = free
                .into_iter()
                .filter(|(k, asked)| *asked || winner(&members, k) == Some(self.me.as_str()))
                .map(|(k, _)| k)
                .collect();
            if !mine.is_empty() {
                let store = self.store.clone();
                if let Ok(taken) = blocking(move || store.acquire(&mine)).await {
                    info!(taken = taken.len(), "took connections that belong with this daemon");
                    self.install(shared, taken);
                }
            }
        }
        if changed {
            let store = self.store.clone();
            let Ok(held) = blocking(move || store.held()).await else { return };
            let elsewhere = held
                .into_iter()
                .filter(|k| winner(&members, k).is_some_and(|w| w != self.me))
                .map(|k| authkeeper_state::store::parse_key(&k));
            *self.leaving.lock().unwrap() = elsewhere.collect();
        }
        if why == Look::Wanted {
            let store = self.store.clone();
            let Ok(wanted) = blocking(move || store.wanted()).await else { return };
            self.leaving.lock().unwrap().extend(wanted.iter().map(|k| authkeeper_state::store::parse_key(k)));
        }
        debug!(members = members.len(), leaving = self.leaving.lock().unwrap().len(), "rebalanced");
        self.hand_over(shared).await;
    }

    /// Let go of the connections that are leaving and idle now; busy ones go at a later look.
    async fn hand_over(&self, shared: &Arc<Shared>) {
        let leaving: Vec<ConnKey> = self.leaving.lock().unwrap().iter().cloned().collect();
        if leaving.is_empty() {
            return;
        }
        let gone = self.let_go(shared, leaving.into_iter());
        {
            let mut left = self.leaving.lock().unwrap();
            for key in &gone {
                left.remove(&authkeeper_state::store::parse_key(key));
            }
        }
        if !gone.is_empty() {
            info!(released = gone.len(), "handed connections to the daemons they belong with");
            let store = self.store.clone();
            if let Err(e) = blocking(move || store.release(&gone)).await {
                warn!(error = %e, "could not release leases");
            }
        }
    }

    /// Read what the other daemons committed since the last look.
    async fn catch_up(&self, shared: &Arc<Shared>) {
        let (version, seq) = *self.position.lock().unwrap();
        let store = self.store.clone();
        let changes = match blocking(move || store.changes(version, seq)).await {
            Ok(changes) => changes,
            Err(e) => return warn!(error = %e, "could not read the other daemons' changes"),
        };
        for machine in changes.connections {
            let key = machine.key().clone();
            if self.owns(&key) {
                continue;
            }
            if shared.lookup(&key.provider, &key.profile, |_| ()).is_err()
                && authkeeper_state::is_owner_id(&key.profile)
            {
                let (reply, made) = tokio::sync::oneshot::channel();
                let command = super::ConfigCommand::AddOwner { key: key.clone(), reply };
                if shared.config_tx.send(command).await.is_err() || !matches!(made.await, Ok(Ok(()))) {
                    continue;
                }
                shared.deadlines.set(&key, None);
            }
            shared.replace_if_asleep(&key, machine);
        }
        for (key, t) in &changes.transitions {
            shared.publish_remote_transition(key, t);
        }
        *self.position.lock().unwrap() = (changes.version, changes.seq);
    }

    /// Renew, rebalance and catch up until shutdown.
    pub async fn run(self: Arc<Self>, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
        let store = self.store.clone();
        let mut told = match blocking(move || store.notifications()).await {
            Ok(rx) => Some(rx),
            Err(e) => {
                warn!(error = %e, "cannot listen for the other daemons' commits; reading them every second");
                None
            }
        };
        let mut renew = tokio::time::interval(self.lease / 3);
        let mut catch_up = tokio::time::interval(CATCH_UP);
        loop {
            tokio::select! {
                _ = async { shutdown.wait_for(|s| *s).await.map(drop) } => break,
                _ = renew.tick() => {
                    self.renew(&shared).await;
                    self.rebalance(&shared, Look::Renewal).await;
                }
                _ = catch_up.tick() => self.catch_up(&shared).await,
                message = async { told.as_mut()?.recv().await }, if told.is_some() => match message.as_deref() {
                    Some("authkeeper_leases/released") => {
                        self.moved.notify_waiters();
                        self.rebalance(&shared, Look::Released).await;
                    }
                    Some("authkeeper_leases/wanted") => self.rebalance(&shared, Look::Wanted).await,
                    Some(_) => self.catch_up(&shared).await,
                    None => {
                        warn!("stopped hearing the other daemons' commits; reading them every second");
                        told = None;
                    }
                },
            }
        }
    }

    /// Give every lease back and leave (a clean stop): the others take over at once.
    pub fn leave(&self) {
        if let Err(e) = self.store.leave() {
            warn!(error = %e, "could not leave the store's members; the others take over when the lease lapses");
        }
    }
}
