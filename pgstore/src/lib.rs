//! `authkeeper-pgstore`: the store on PostgreSQL, for several daemons sharing one set of
//! connections. It keeps the same versioned records as the redb store (`authkeeper-state`), in
//! the `authkeeper` schema of the database the URL names, and implements the same narrow
//! [`ConnectionStore`] interface.
//!
//! - [`schema`]: the tables, created and migrated by the daemon.
//! - `conns`: connections, flows and history; the group commit.
//! - `rows`: settings, provider state, links, the webhook outbox, profile numbers.
//! - `copy`: the whole store as a [`Dump`], both ways, and resealing.
//! - [`leases`]: several daemons on one store: members, per-connection leases, changes.
//! - [`cluster`]: a throwaway PostgreSQL cluster on a unix socket, for tests and benchmarks.
//!
//! The interface is blocking, like redb's; the client is async (tokio-postgres, pooled by
//! deadpool, TLS by rustls when the URL asks for it). Each call runs on the store's own small
//! runtime and the calling thread waits for its answer, so the store can be called from any
//! thread, the daemon's blocking tasks and its commit thread alike.

pub mod cluster;
mod conns;
mod copy;
pub mod leases;
mod rows;
pub mod schema;

use authkeeper_state::dump::Dump;
use authkeeper_state::grant::ProfileState;
use authkeeper_state::{Commit, ConnKey, ConnectionStore, LinkRecord, Sealer, StoreError, Stored, Transition};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::fmt;
use std::future::Future;
use std::sync::Arc;

/// What can go wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    #[error("the store URL is not a PostgreSQL connection URL: {0}")]
    Url(tokio_postgres::Error),
    #[error("cannot set up TLS for PostgreSQL: {0}")]
    Tls(rustls::Error),
    #[error("cannot start the store's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot reach PostgreSQL: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("PostgreSQL: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error("the store's runtime stopped before answering")]
    Stopped,
}

impl From<PgError> for StoreError {
    fn from(e: PgError) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

/// Async work's result: a store error, which may be PostgreSQL's.
pub(crate) type Answer<T> = Result<T, StoreError>;

pub(crate) fn sql(e: tokio_postgres::Error) -> StoreError {
    PgError::Sql(e).into()
}

pub(crate) fn pool(e: deadpool_postgres::PoolError) -> StoreError {
    PgError::Pool(e).into()
}

/// A connection URL with its password hidden, for messages and logs.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return "(not a URL)".into() };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => format!("{user}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some(("password", _)) => "password=***".to_owned(),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// The store's runtime, shut down without waiting when the store goes (it may go on a thread
/// that must not block).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) sealer: Option<Arc<Sealer>>,
    /// What a dedicated connection is made with (the pool's are interchangeable).
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// The connection that holds this process's claim on the store, once claimed.
    claim: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// The claim's fencing token (0: not claimed, no fencing) and whether its connection was
    /// lost: see [`PgStore::claim`].
    pub(crate) epoch: std::sync::atomic::AtomicI64,
    pub(crate) claim_lost: std::sync::Mutex<Arc<std::sync::atomic::AtomicBool>>,
    /// This daemon's member id, once it joined (see `leases`).
    pub(crate) member: std::sync::Mutex<Option<String>>,
    /// Connections that listen for notifications, kept open while the store lives.
    pub(crate) listeners: std::sync::Mutex<Vec<tokio_postgres::Client>>,
}

impl Inner {
    pub(crate) fn member(&self) -> Option<String> {
        self.member.lock().expect("not poisoned").clone()
    }

    /// Inside a writing transaction: refuse when this process's claim is gone. The `FOR SHARE`
    /// lock holds off a new claimant's epoch update until this transaction ends.
    pub(crate) async fn fence(&self, tx: &deadpool_postgres::Transaction<'_>) -> Answer<()> {
        use std::sync::atomic::Ordering;
        let epoch = self.epoch.load(Ordering::SeqCst);
        if epoch == 0 {
            return Ok(());
        }
        if self.claim_lost.lock().expect("not poisoned").load(Ordering::SeqCst) {
            return Err(StoreError::NotOwner);
        }
        let current = tx
            .query_opt("SELECT value FROM authkeeper.meta WHERE name = 'claim_epoch' FOR SHARE", &[])
            .await
            .map_err(sql)?
            .map(|r| r.get::<_, i64>(0));
        match current == Some(epoch) {
            true => Ok(()),
            false => Err(StoreError::NotOwner),
        }
    }
}

/// The session advisory lock a daemon (or `store copy`) holds on a store while it uses it.
const CLAIM_LOCK: i64 = 0x6175_7468_6b65_6570 + 1;

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
    runtime: Arc<Runtime>,
    url: Arc<str>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore").field("url", &redacted(&self.url)).finish_non_exhaustive()
    }
}

/// Connections the pool keeps open: the commit thread, readers, and the config owner's writes.
const POOL_SIZE: usize = 8;

/// The server ends a session that sits this long inside a transaction. A daemon stopped
/// mid-commit (`SIGSTOP`, a VM paused, a debugger) would otherwise hold its row locks and keep
/// the daemon taking its leases over waiting until it wakes; well under the shortest lease.
const IDLE_IN_TRANSACTION_MS: u32 = 2_000;

impl PgStore {
    /// Connect to the database at `url`, create or migrate its tables, and check (or apply) the
    /// sealing of its secrets as [`authkeeper_state::Store::open_sealed`] does.
    pub fn open(url: &str, sealer: Option<Sealer>) -> Result<Self, StoreError> {
        let store = Self::connect(url, sealer)?;
        store.block(|inner| async move { schema::migrate(&inner).await })?;
        store.block(|inner| async move { copy::seal(&inner).await })?;
        Ok(store)
    }

    /// Connect and migrate, leaving the secrets as they are: for `store copy`, which moves rows
    /// as stored and needs no key.
    pub fn open_as_is(url: &str) -> Result<Self, StoreError> {
        let store = Self::connect(url, None)?;
        store.block(|inner| async move { schema::migrate(&inner).await })?;
        Ok(store)
    }

    fn connect(url: &str, sealer: Option<Sealer>) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(PgError::Url)?;
        let options = config.get_options().map(|o| format!("{o} ")).unwrap_or_default();
        config.options(format!("{options}-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}"));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = <rustls::ClientConfig as rustls_platform_verifier::ConfigVerifierExt>::with_platform_verifier()
            .map_err(PgError::Tls)?;
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("authkeeper-pg")
            .enable_all()
            .build()
            .map_err(PgError::Runtime)?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = {
            let _entered = runtime.enter();
            Pool::builder(manager)
                .max_size(POOL_SIZE)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .expect("a pool with a runtime builds")
        };
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                sealer: sealer.map(Arc::new),
                config,
                tls,
                claim: tokio::sync::Mutex::new(None),
                epoch: std::sync::atomic::AtomicI64::new(0),
                claim_lost: std::sync::Mutex::default(),
                member: std::sync::Mutex::default(),
                listeners: std::sync::Mutex::default(),
            }),
            runtime: Arc::new(Runtime(Some(runtime))),
            url: url.into(),
        })
    }

    /// Run `work` on the store's runtime and wait for its answer.
    pub(crate) fn block<T, F>(&self, work: impl FnOnce(Arc<Inner>) -> F) -> Answer<T>
    where
        T: Send + 'static,
        F: Future<Output = Answer<T>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let future = work(self.inner.clone());
        let rt = self.runtime.0.as_ref().expect("the runtime lives as long as the store");
        rt.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().map_err(|_| PgError::Stopped)?
    }

    /// Claim the store for this process alone, as redb's file lock does, until the store is
    /// dropped: [`StoreError::InUse`] when another process holds it. Several daemons may share a
    /// store only once each connection's refreshes are guarded by a lease of its own; until then
    /// a second daemon (or a `store copy` while a daemon runs) is refused.
    ///
    /// The claim is a session lock on a connection of its own, and a fencing token: each claim
    /// advances `claim_epoch` in `meta`, and every commit of connections or provider state
    /// checks it in its transaction. Should the claim's connection be lost (the server
    /// restarted, or ended the session) and another process claim the store, this one's writes
    /// are refused with [`StoreError::NotOwner`] and can never overwrite the newer owner's.
    pub fn claim(&self) -> Result<(), StoreError> {
        self.claim_as(true)
    }

    /// A daemon's share of the claim: any number of daemons hold it together, and while any
    /// does, [`PgStore::claim`] (`store copy`) is refused; while a copy holds the claim, no
    /// daemon starts. No fencing token: the leases fence a daemon's writes.
    pub fn claim_shared(&self) -> Result<(), StoreError> {
        self.claim_as(false)
    }

    fn claim_as(&self, exclusive: bool) -> Result<(), StoreError> {
        self.block(move |inner| async move {
            use std::sync::atomic::Ordering;
            let mut claim = inner.claim.lock().await;
            if claim.is_some() {
                return Ok(());
            }
            let (client, connection) = inner.config.connect(inner.tls.clone()).await.map_err(sql)?;
            // This attempt's own flag: a refused attempt's connection ends too.
            let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = lost.clone();
            tokio::spawn(async move {
                let _ = connection.await;
                flag.store(true, Ordering::SeqCst);
            });
            let lock = match exclusive {
                true => "SELECT pg_try_advisory_lock($1)",
                false => "SELECT pg_try_advisory_lock_shared($1)",
            };
            let held: bool = client.query_one(lock, &[&CLAIM_LOCK]).await.map_err(sql)?.get(0);
            if !held {
                return Err(StoreError::InUse);
            }
            if !exclusive {
                *claim = Some(client);
                return Ok(());
            }
            let epoch: i64 = inner
                .pool
                .get()
                .await
                .map_err(pool)?
                .query_one(
                    "INSERT INTO authkeeper.meta AS m (name, value) VALUES ('claim_epoch', 1)
                     ON CONFLICT (name) DO UPDATE SET value = m.value + 1 RETURNING value",
                    &[],
                )
                .await
                .map_err(sql)?
                .get(0);
            *inner.claim_lost.lock().expect("not poisoned") = lost;
            inner.epoch.store(epoch, Ordering::SeqCst);
            *claim = Some(client);
            Ok(())
        })
    }

    /// The id of the key that sealed the store's secrets, if they are sealed.
    pub fn sealed_with(&self) -> Result<Option<u64>, StoreError> {
        self.block(|inner| async move { rows::meta(&inner, authkeeper_state::sealed_store::KEY_ID).await })
    }

    /// The schema version in the database.
    pub fn schema_version(&self) -> Result<u64, StoreError> {
        self.block(|inner| async move { schema::version(&inner.pool.get().await.map_err(pool)?).await })
    }
}

impl ConnectionStore for PgStore {
    fn load_all(&self) -> Result<Vec<Stored>, StoreError> {
        self.block(|inner| async move { conns::load_all(&inner).await })
    }
    fn commit(&self, batch: &[Commit]) -> Result<(), StoreError> {
        let rows = conns::Batch::new(self.inner.sealer.as_deref(), batch);
        self.block(|inner| async move { conns::commit(&inner, rows).await })
    }
    fn history(&self, key: &ConnKey) -> Result<Vec<Transition>, StoreError> {
        let key = key.to_string();
        self.block(|inner| async move { conns::history(&inner, key).await })
    }
    fn forget(&self, key: &ConnKey) -> Result<(), StoreError> {
        let key = key.to_string();
        self.block(|inner| async move { conns::forget(&inner, key).await })
    }
    fn settings(&self) -> Result<Vec<(ConnKey, Vec<u8>)>, StoreError> {
        self.block(|inner| async move { rows::settings(&inner).await })
    }
    fn settings_digests(&self, keys: &[ConnKey]) -> Result<Vec<Option<u64>>, StoreError> {
        let keys: Vec<String> = keys.iter().map(ConnKey::to_string).collect();
        self.block(|inner| async move { rows::settings_digests(&inner, keys).await })
    }
    fn set_settings(&self, rows: &[(ConnKey, Option<Arc<[u8]>>)]) -> Result<(), StoreError> {
        let rows = rows::sealed_settings(self.inner.sealer.as_deref(), rows);
        self.block(|inner| async move { rows::set_settings(&inner, rows).await })
    }
    fn profile_states(&self) -> Result<Vec<(ConnKey, ProfileState)>, StoreError> {
        self.block(|inner| async move { rows::profile_states(&inner).await })
    }
    fn set_profile_states(&self, states: &[(ConnKey, ProfileState)]) -> Result<(), StoreError> {
        let rows = rows::sealed_profile_states(self.inner.sealer.as_deref(), states);
        self.block(|inner| async move { rows::upsert(&inner, "profile_state", rows).await })
    }
    fn config_seen(&self, key: &ConnKey) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_string();
        self.block(|inner| async move { rows::get(&inner, "config_seen", key).await })
    }
    fn set_config_seen(&self, key: &ConnKey, digest: &[u8]) -> Result<(), StoreError> {
        let rows = vec![(key.to_string(), digest.to_vec())];
        self.block(|inner| async move { rows::upsert(&inner, "config_seen", rows).await })
    }
    fn allocate_profile(&self, provider: &str, in_use: u64) -> Result<u64, StoreError> {
        let provider = provider.to_owned();
        self.block(|inner| async move { rows::allocate_profile(&inner, provider, in_use).await })
    }
    fn note_profiles(&self, provider: &str, in_use: u64) -> Result<(), StoreError> {
        let provider = provider.to_owned();
        self.block(|inner| async move { rows::note_profiles(&inner, provider, in_use).await })
    }
    fn compact_history(&self, cutoff: chrono::DateTime<chrono::Utc>) -> Result<u64, StoreError> {
        self.block(|inner| async move { conns::compact_history(&inner, cutoff).await })
    }
    fn put_link(&self, id: &str, record: &LinkRecord) -> Result<(), StoreError> {
        let (id, record) = (id.to_owned(), record.clone());
        self.block(|inner| async move { rows::put_link(&inner, id, record).await })
    }
    fn link(&self, id: &str) -> Result<Option<LinkRecord>, StoreError> {
        let id = id.to_owned();
        self.block(|inner| async move {
            let value = rows::get(&inner, "links", id.clone()).await?;
            value.map(|v| authkeeper_state::links::decode(&id, &v)).transpose()
        })
    }
    fn claim_link(
        &self,
        id: &str,
        session_hash: [u8; 32],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<LinkRecord>, StoreError> {
        let id = id.to_owned();
        self.block(move |inner| async move {
            rows::change_link(&inner, id, move |record| record.claimed(session_hash, now)).await
        })
    }
    fn progress_link(
        &self,
        id: &str,
        started: bool,
        outcome: Option<&str>,
        only_unopened: bool,
    ) -> Result<Option<LinkRecord>, StoreError> {
        let (id, outcome) = (id.to_owned(), outcome.map(str::to_owned));
        self.block(move |inner| async move {
            rows::change_link(&inner, id, move |mut record| {
                record.progress(started, outcome.as_deref(), only_unopened);
                Some(record)
            })
            .await
        })
    }
    fn links(&self) -> Result<Vec<(String, LinkRecord)>, StoreError> {
        self.block(|inner| async move { rows::links(&inner).await })
    }
    fn put_outbox(&self, rows: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        let sealer = self.inner.sealer.as_deref();
        let rows = rows::sealed(sealer, "outbox", rows.iter().map(|(id, bytes)| (id.clone(), bytes.clone())));
        self.block(|inner| async move { rows::upsert(&inner, "outbox", rows).await })
    }
    fn outbox(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.block(|inner| async move { rows::opened(&inner, "outbox").await })
    }
    fn remove_outbox(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.block(|inner| async move { rows::remove(&inner, "outbox", id).await })
    }
    fn export(&self) -> Result<Dump, StoreError> {
        self.block(|inner| async move { copy::export(&inner).await })
    }
    fn import(&self, dump: &Dump) -> Result<(), StoreError> {
        let dump = dump.clone();
        self.block(|inner| async move { copy::import(&inner, dump).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SHOW name` on one of the store's pooled sessions.
    fn show(store: &PgStore, name: &'static str) -> String {
        store
            .block(move |inner| async move {
                let client = inner.pool.get().await.map_err(pool)?;
                let row = client.query_one(&format!("SHOW {name}"), &[]).await.map_err(sql)?;
                Ok(row.get::<_, String>(0))
            })
            .unwrap()
    }

    #[test]
    fn sessions_end_after_2_s_idle_inside_a_transaction_and_keep_the_urls_own_options() {
        let Some(cluster) = crate::cluster::Cluster::for_tests() else { return };
        let url = cluster.database("sessions").unwrap();
        let store = PgStore::open(&url, None).unwrap();
        assert_eq!(show(&store, "idle_in_transaction_session_timeout"), "2s");
        let own = format!("{url}?options=-c%20statement_timeout%3D7s");
        let store = PgStore::open(&own, None).unwrap();
        assert_eq!(show(&store, "statement_timeout"), "7s", "the URL's own options stay");
        assert_eq!(show(&store, "idle_in_transaction_session_timeout"), "2s");
    }
}
