//! The daemon: loads config and store, starts one actor per connection, keeps the config file
//! in step (watching it, editing it), serves the control socket, and shuts down in order
//! (socket, config owner, actors, then the commit thread).

mod actor;
mod committer;
mod config_owner;
mod deadlines;
mod error;
mod inboxes;
mod leases;
mod next;
mod rates;
mod running;
mod schedules;
mod systemd;
mod write_back;

pub use running::Running;

pub use actor::{Command, Dormant};
pub use committer::Committer;
pub use config_owner::ConfigCommand;
pub use deadlines::{Deadlines, Stats as SchedulerStats};
pub use error::{CallbackError, DaemonError};
pub use leases::Leases;
pub use next::with_refresh_slot;
pub use write_back::{StoreHealth, WriteBacks};

use crate::api;
use crate::clock::Clock;
use crate::config::Paths;
use crate::limits::{Gate, RefreshPlanner};

/// The share of a provider's global rate that refreshes plan on; the rest is headroom for
/// validations, polls and user commands.
pub const REFRESH_SHARE: f64 = 0.8;
use crate::providers::{self, Setup};
use crate::socket::ControlSocket;
use crate::web::{Callbacks, PublicUrl};
use crate::wire::{ConnectionView, WireEvent};

use anyhow::Context;
use authkeeper_state::{ConnKey, ConnectionStore, Machine, Policy, Store, Transition};
use chrono::{DateTime, Utc};
use config_owner::ConfigOwner;
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::sync::{Arc, RwLock};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

/// Who holds a connection's machine.
pub enum Owner {
    /// Its task, which takes commands through this inbox.
    Awake(mpsc::Sender<Command>),
    /// Nobody: nothing is asked of it; the next command starts a task with this.
    Asleep(Dormant),
}

/// A connection as reads (`status`, `token`) see it, and who owns it.
pub struct Slot {
    /// The machine as last committed; replaced after each commit.
    pub committed: Arc<Machine>,
    /// Its provider setup, with the settings in force (for token payloads).
    pub setup: Setup,
    /// Why its settings are not the config's (no good config was read), if so.
    pub warning: Option<Arc<str>>,
    pub owner: Owner,
}

impl Slot {
    /// A slot for `machine` with no task: the next command starts one.
    pub fn asleep(machine: Arc<Machine>, setup: Setup, warning: Option<Arc<str>>) -> Self {
        Self { committed: machine, setup, warning, owner: Owner::Asleep(Dormant { sweep_at: None }) }
    }

    pub fn view(&self, policy: &Policy, now: DateTime<Utc>) -> ConnectionView {
        ConnectionView::with_warnings(&self.committed, policy, self.warnings(now))
    }

    /// What the user should know about this connection now: settings not from a good config,
    /// a redirect URI that changed since the login, a token that will expire with no refresh.
    pub fn warnings(&self, now: DateTime<Utc>) -> Vec<String> {
        let mut out: Vec<String> = self.warning.iter().map(|w| w.to_string()).collect();
        if let Some(grant) = &self.committed.connection().grant {
            out.extend(self.setup.warnings(grant, now));
        }
        out
    }
}

/// The last config load's outcome, for `/v1/health`.
#[derive(Clone, Debug, Default)]
pub struct ConfigHealth {
    pub error: Option<(String, Option<(usize, usize)>)>,
}

/// State shared by the actors, the config owner and the socket handlers.
pub struct Shared {
    pub clock: Arc<dyn Clock>,
    policy: RwLock<Policy>,
    pub committer: Committer,
    pub store: Arc<dyn ConnectionStore>,
    /// Whether the store takes writes, for `/v1/health` and to refuse new work when it does not.
    pub store_health: StoreHealth,
    /// Credentials to mirror into config.json (`write_back`): the latest of each connection.
    pub write_backs: WriteBacks,
    pub events: broadcast::Sender<WireEvent>,
    pub conns: RwLock<BTreeMap<ConnKey, Slot>>,
    /// Connections added this many at a time or more get their first deadlines in the
    /// background (see [`Options::schedule_later_from`]).
    schedule_later_from: usize,
    pub config: RwLock<ConfigHealth>,
    pub config_tx: mpsc::Sender<ConfigCommand>,
    pub shutdown: watch::Receiver<bool>,
    /// One gate per provider: its rate limits and any `Retry-After` pause.
    pub gates: BTreeMap<String, Arc<Gate>>,
    /// One refresh planner per provider, at the share of its global rate kept for refreshes.
    pub planners: BTreeMap<String, RefreshPlanner>,
    /// The limits the config gives each provider, and this daemon's share of them.
    rates: rates::Rates,
    pub deadlines: Arc<Deadlines>,
    /// The cron schedules in force, by name.
    pub schedules: RwLock<BTreeMap<String, String>>,
    /// The web listener's public URL in force (every adapter shares it).
    pub public_url: Arc<PublicUrl>,
    /// Pending callback flows by their `state`.
    pub callbacks: Callbacks,
    /// Links whose outcome is still to come, and failed guesses at links, per address.
    pub active_links: crate::links::Active,
    /// How long a one-time link may wait to be opened (`authkeeper.web.link_ttl_secs`).
    pub link_ttl: RwLock<chrono::TimeDelta>,
    pub guesses: crate::links::Guesses,
    /// Per provider, what an owner who is not connected is told (`authkeeper.login_messages`).
    pub login_messages: RwLock<BTreeMap<String, String>>,
    /// This daemon's metrics, for `GET /metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The hook settings in force (`authkeeper.hooks`).
    pub hooks: crate::hooks::Current,
    /// The other daemons' transitions (a shared store), for `/v1/events` only: hooks and
    /// metrics are the business of the daemon that made them.
    pub remote_events: broadcast::Sender<WireEvent>,
    /// Leases, when daemons share the store: this one acts only on the connections it holds.
    pub leases: Option<Arc<Leases>>,
    /// Something the daemon cannot go on after (its lease lapsed): it stops.
    pub fatal: tokio::sync::Notify,
    actors: TaskTracker,
}

impl Shared {
    /// Connections with a running task (busy); the rest cost no task.
    pub fn awake(&self) -> usize {
        self.actors.len()
    }

    pub fn policy(&self) -> Policy {
        *self.policy.read().unwrap()
    }

    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap() = policy;
    }

    pub fn update_view(&self, key: &ConnKey, machine: &Machine) {
        let committed = Arc::new(machine.clone());
        if let Some(slot) = self.conns.write().unwrap().get_mut(key) {
            slot.committed = committed;
        }
    }

    /// Use `setup` (new settings) for `key`'s reads, and say why if they are not the config's.
    pub fn set_setup(&self, key: &ConnKey, setup: Setup, warning: Option<Arc<str>>) {
        if let Some(slot) = self.conns.write().unwrap().get_mut(key) {
            slot.setup = setup;
            slot.warning = warning;
        }
    }

    pub fn publish_transition(&self, key: &ConnKey, t: &Transition) {
        self.metrics.transition(&key.provider, t.cause);
        let _ = self.events.send(transition_event(key, t));
    }

    /// Another daemon's transition (read from the shared store): shown on `/v1/events` only.
    pub fn publish_remote_transition(&self, key: &ConnKey, t: &Transition) {
        let _ = self.remote_events.send(transition_event(key, t));
    }

    /// Whether this daemon acts on `key`: always, unless daemons share the store and another
    /// holds it.
    pub fn acts_on(&self, key: &ConnKey) -> bool {
        self.leases.as_ref().is_none_or(|l| l.holds(key))
    }

    /// Whether `key` is this daemon's to schedule: always, unless daemons share the store and
    /// another holds its lease. (It may act on it only while [`Shared::acts_on`].)
    pub fn owns(&self, key: &ConnKey) -> bool {
        self.leases.as_ref().is_none_or(|l| l.owns(key))
    }

    /// `machine` (another daemon's, or the store's) as `key`'s state, unless a task holds it.
    pub fn replace_if_asleep(&self, key: &ConnKey, machine: Machine) {
        if let Some(slot) = self.conns.write().unwrap().get_mut(key)
            && matches!(slot.owner, Owner::Asleep(_))
        {
            slot.committed = Arc::new(machine);
        }
    }

    /// Schedule `key` from its slot's machine, as at start-up (a pending flow resumes).
    pub fn schedule(self: &Arc<Self>, key: &ConnKey) {
        let machine = match self.conns.read().unwrap().get(key) {
            Some(slot) => slot.committed.clone(),
            None => return,
        };
        if machine.pending_flow().is_some() {
            self.deadlines.set(key, None);
            let _ = self.try_send(key, Command::Resume);
        } else {
            self.deadlines.set(key, actor::next_for(&machine, None, self).map(|(at, _)| at));
        }
    }

    pub fn publish_warning(&self, key: Option<&ConnKey>, message: String, next_attempt_at: Option<DateTime<Utc>>) {
        let _ = self.events.send(WireEvent::Warning {
            message,
            at: self.clock.now(),
            provider: key.map(|k| k.provider.to_string()),
            profile: key.map(|k| k.profile.to_string()),
            next_attempt_at,
        });
    }

    /// What an owner who is not connected to `provider` is told.
    pub fn login_message(&self, provider: &str) -> String {
        let configured = self.login_messages.read().unwrap().get(provider).cloned();
        configured.unwrap_or_else(|| format!("Please log in first: /login {provider}"))
    }

    /// The slot for `provider/profile`, or the fitting 404.
    pub fn lookup<T>(&self, provider: &str, profile: &str, f: impl FnOnce(&Slot) -> T) -> Result<T, DaemonError> {
        let Some(found) = providers::find(provider) else {
            return Err(DaemonError::UnknownProvider(shown(provider)));
        };
        if !crate::config::is_profile_id(found.manifest(), profile) {
            return Err(DaemonError::BadRequest(format!(
                "{:?} is not a profile id: default, {}-P01 and up, or an owner id (namespace:id; letters, digits \
                 and :._@-, up to 128 characters)",
                shown(profile),
                provider.to_ascii_uppercase()
            )));
        }
        let conns = self.conns.read().unwrap();
        let slot = conns
            .get(&ConnKey::new(provider, profile))
            .ok_or_else(|| DaemonError::unknown_profile(provider, profile))?;
        Ok(f(slot))
    }

    /// Give `machine` a slot in the read view and its first deadline. It starts asleep: a
    /// task runs only when a command or a deadline comes.
    pub(crate) fn add_connection(self: &Arc<Self>, machine: Machine, setup: Setup, warning: Option<Arc<str>>) {
        self.add_connections(vec![(machine.key().clone(), Slot::asleep(Arc::new(machine), setup, warning))]);
    }

    /// [`Shared::add_connection`] for many at once (start-up): one lock of the read view. Their
    /// deadlines are set in one go, in the background when there are many: the connections
    /// are readable at once, and one already due is woken a fraction of a second later.
    /// The slots go into the read view as they are (at 100,000 connections, each copy of
    /// them is a few milliseconds).
    pub(crate) fn add_connections(self: &Arc<Self>, slots: Vec<(ConnKey, Slot)>) {
        let mut resumed = Vec::new();
        let mut scheduled = Vec::with_capacity(slots.len());
        for (key, Slot { committed: machine, .. }) in &slots {
            if let Some(state) = machine.pending_flow().and_then(|f| f.secret("state")) {
                self.callbacks.insert(state.expose(), key);
            }
            // A resumed flow is scheduled by its `Resume`, which waits one interval first: a
            // deadline set here could poll before that, too soon after the last daemon's poll.
            match machine.pending_flow().is_some() && self.owns(key) {
                true => resumed.push(key.clone()),
                false => scheduled.push(machine.clone()),
            }
        }
        // Begun before any of them can be reached, so that any deadline set for one is newer.
        let later = (scheduled.len() >= self.schedule_later_from).then(|| self.deadlines.begin_fill(scheduled.len()));
        {
            let mut conns = self.conns.write().unwrap();
            match conns.is_empty() {
                true => *conns = slots.into_iter().collect(),
                false => conns.extend(slots),
            }
        }
        for key in &resumed {
            self.deadlines.set(key, None);
        }
        match later {
            Some(fill) => {
                let shared = self.clone();
                tokio::task::spawn_blocking(move || {
                    let n = scheduled.len();
                    fill.finish(shared.first_deadlines(scheduled, true));
                    return_free_memory();
                    debug!(connections = n, "every connection has its first deadline");
                });
            }
            None => {
                let deadlines = self.first_deadlines(scheduled, false);
                self.deadlines.set_many(deadlines);
            }
        }
        for key in resumed {
            let _ = self.try_send(&key, Command::Resume);
        }
    }

    /// When each of `machines` acts first. Those with nothing to do, or another daemon's (a
    /// shared store), get no deadline: cleared at once unless `filling`, when they have none.
    fn first_deadlines(&self, machines: Vec<Arc<Machine>>, filling: bool) -> Vec<(ConnKey, DateTime<Utc>)> {
        // Room in each provider's refresh plan for the connections that can refresh.
        let mut per_provider = crate::limits::FastMap::<&str, usize>::default();
        for machine in &machines {
            if machine.connection().grant.as_ref().is_some_and(|g| g.refresh_token.is_some()) {
                *per_provider.entry(machine.key().provider.as_str()).or_default() += 1;
            }
        }
        for (provider, n) in per_provider {
            self.planners.get(provider).inspect(|p| p.reserve(n));
        }
        let (policy, now) = (self.policy(), self.clock.now());
        let mut deadlines = Vec::with_capacity(machines.len());
        for machine in machines {
            let key = machine.key();
            match self.owns(key).then(|| next::next_at(&machine, None, self, &policy, now)).flatten() {
                Some((at, _)) => deadlines.push((key.clone(), at)),
                None if !filling => self.deadlines.set(key, None),
                None => {}
            }
        }
        deadlines
    }
}

/// How to run a daemon.
pub struct Options {
    pub paths: Paths,
    pub clock: Arc<dyn Clock>,
    /// A store to use instead of `<state_dir>/authkeeper.redb` (tests and benchmarks).
    pub store: Option<Arc<dyn ConnectionStore>>,
    /// Seals the secrets in `<state_dir>/authkeeper.redb` (not used with `store`).
    pub secrets: Option<authkeeper_state::Sealer>,
    /// This daemon's membership of a store shared with other daemons.
    pub leases: Option<Arc<Leases>>,
    /// Connections added this many at once or more (a start on a large store) get their first
    /// deadlines in the background, after the daemon is ready;
    /// [`Deadlines::scheduled`] tells when they all have one.
    pub schedule_later_from: usize,
}

/// The default of [`Options::schedule_later_from`].
pub const SCHEDULE_LATER_FROM: usize = 10_000;

impl Options {
    pub fn new(paths: Paths, clock: Arc<dyn Clock>) -> Self {
        Self { paths, clock, store: None, secrets: None, leases: None, schedule_later_from: SCHEDULE_LATER_FROM }
    }
}

/// Run until `shutdown` resolves.
pub async fn run(opts: Options, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let running = start(opts).await?;
    systemd::ready(running.shared.conns.read().unwrap().len());
    systemd::watchdog(running.stop.subscribe());
    let shared = running.shared.clone();
    let fatal = tokio::select! {
        _ = shutdown => false,
        _ = shared.fatal.notified() => true,
    };
    drop(shared);
    info!("shutting down");
    systemd::stopping();
    running.stop().await?;
    anyhow::ensure!(!fatal, "stopped: this daemon's lease on the shared store lapsed");
    Ok(())
}

pub async fn start(opts: Options) -> anyhow::Result<Running> {
    let Options { paths, clock, store, secrets, leases, schedule_later_from } = opts;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.state_dir)
        .with_context(|| format!("cannot create the state directory {}", paths.state_dir.display()))?;

    let db_path = paths.state_dir.join("authkeeper.redb");
    let store: Arc<dyn ConnectionStore> = match store {
        Some(store) => store,
        None => Arc::new(Store::open_sealed(&db_path, secrets).map_err(|e| {
            let hint = if matches!(e, authkeeper_state::StoreError::Db(_)) {
                " (is another authkeeper using it?)"
            } else {
                ""
            };
            anyhow::anyhow!("cannot open {}{hint}: {e}", db_path.display())
        })?),
    };
    // The config is read and parsed while the store loads: both are needed before any
    // connection gets its slot. Watched from later on; what changed since `read_as` is read again.
    // The store is loaded on this thread, whose heap keeps what the daemon keeps.
    let (stored, read_as, first_read, http) = std::thread::scope(|scope| {
        let reading = std::thread::Builder::new()
            .name("authkeeper-config".into())
            .spawn_scoped(scope, || {
                let read_as = config_owner::stamp(&paths.config);
                let read = config_owner::read(&paths.config);
                // Its provider client too: loading the system's CA roots takes milliseconds.
                let http = providers::http_client(read.http_timeout());
                (read_as, read, http)
            })
            .context("cannot start a thread to read the config")?;
        let stored = store.load_all();
        let (read_as, first_read, http) = reading.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        anyhow::Ok((stored, read_as, first_read, http))
    })?;
    let stored = stored.context("cannot load connections")?;
    let profile_states = store.profile_states().context("cannot load provider state")?;
    if let Some(leases) = &leases {
        let held = leases
            .take_share(stored.iter().map(|s| s.machine.key().clone()))
            .context("cannot take this daemon's share of the connections")?;
        info!(member = leases.id(), held, of = stored.len(), "sharing the store with other daemons");
    }

    let metrics = Arc::new(crate::metrics::Metrics::default());
    let (committer, commit_thread) = Committer::spawn(store.clone(), metrics.clone());
    let (stop, shutdown) = watch::channel(false);
    let (config_tx, config_rx) = mpsc::channel(256);
    let shared = Arc::new(Shared {
        clock: clock.clone(),
        policy: RwLock::new(Policy::default()),
        committer,
        store,
        store_health: StoreHealth::default(),
        write_backs: WriteBacks::default(),
        events: broadcast::channel(4096).0,
        remote_events: broadcast::channel(4096).0,
        leases: leases.clone(),
        fatal: tokio::sync::Notify::new(),
        conns: RwLock::new(BTreeMap::new()),
        schedule_later_from,
        config: RwLock::new(ConfigHealth::default()),
        config_tx,
        shutdown: shutdown.clone(),
        gates: providers::REGISTRY
            .iter()
            .map(|p| {
                let mut gate = Gate::new(clock.clone(), p.limits()).with_shutdown(shutdown.clone());
                if let Some(leases) = leases.clone() {
                    gate = gate.with_fence(Arc::new(move || leases.valid()));
                }
                (p.manifest().name.to_owned(), Arc::new(gate))
            })
            .collect(),
        planners: providers::REGISTRY
            .iter()
            .map(|p| (p.manifest().name.to_owned(), RefreshPlanner::new(p.limits().per_second * REFRESH_SHARE)))
            .collect(),
        rates: Default::default(),
        deadlines: Arc::new(Deadlines::default()),
        schedules: RwLock::new(BTreeMap::new()),
        public_url: Arc::default(),
        callbacks: Callbacks::default(),
        login_messages: RwLock::default(),
        hooks: Default::default(),
        active_links: Default::default(),
        link_ttl: RwLock::new(crate::links::LINK_TTL),
        guesses: Default::default(),
        metrics,
        actors: TaskTracker::new(),
    });
    let scheduler = tokio::spawn(shared.deadlines.clone().run(shared.clone(), shutdown.clone()));
    if let Some(leases) = &leases {
        shared.share_limits(leases.members());
        tokio::spawn(leases.clone().run(shared.clone(), shutdown.clone()));
    }
    tokio::spawn(crate::links::watch(shared.clone(), shutdown.clone()));
    tokio::spawn(write_back::probe_while_failing(shared.clone(), shutdown.clone()));

    // Bind first, to fail fast when another daemon answers there; serve once connections exist.
    let socket = match ControlSocket::activated(&paths.socket)? {
        Some(socket) => socket,
        None => ControlSocket::bind(&paths.socket).await?,
    };
    // Subscribed before any connection can move, so the hooks see every transition.
    let hook_events = shared.events.subscribe();
    let owner =
        ConfigOwner::start(paths.config.clone(), first_read, http, shared.clone(), stored, profile_states).await?;
    let limits = owner.request_limits();
    let web = match owner.web() {
        Some(settings) => Some(crate::web::serve(&settings, shared.clone(), limits, shutdown.clone()).await?),
        None => None,
    };
    let (drain_hooks, drain) = watch::channel(false);
    let hooks = crate::hooks::spawn(&shared, hook_events, shutdown.clone(), drain);
    let config_file = config_owner::watch(&paths.config);
    let owner = tokio::spawn(owner.run(config_file, read_as, config_rx, shutdown.clone()));
    let socket_path = socket.path().to_owned();
    let answers =
        crate::serve::Answers { limits, refuse: crate::serve::json_refusal, finish: api::json_errors, peer: false };
    let server = tokio::spawn(crate::serve::serve(socket, api::Socket::new(shared.clone()), answers, shutdown.clone()));
    info!(
        socket = %socket_path.display(),
        config = %paths.config.display(),
        connections = shared.conns.read().unwrap().len(),
        "authkeeper ready"
    );
    Ok(Running { socket: socket_path, stop, server, web, owner, scheduler, hooks, drain_hooks, commit_thread, shared })
}

/// Give the heaps' free pages back to the system. A large start frees much of what it
/// allocated (the store's pages read through its cache, the settings compared, the deadlines'
/// working lists) on threads whose heaps glibc would otherwise keep at their peak.
pub(crate) fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of glibc's own heaps to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A transition as `/v1/events` shows it.
fn transition_event(key: &ConnKey, t: &Transition) -> WireEvent {
    WireEvent::Transition {
        provider: key.provider.to_string(),
        profile: key.profile.to_string(),
        from: t.from,
        to: t.to,
        cause: t.cause,
        at: t.at,
        detail: t.detail.clone(),
    }
}

/// An id from a request, cut for a message (quote it with `{:?}`): at most 64 characters.
pub fn shown(id: &str) -> String {
    let cut: String = id.chars().take(64).collect();
    if cut.len() < id.len() { cut + "…" } else { cut }
}
