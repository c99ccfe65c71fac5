//! The tables, in the `authkeeper` schema, and their migrations.
//!
//! Keys are `provider/profile` (or a link's or a delivery's id) in the "C" collation, so they
//! sort by bytes as redb's do. Values are the records `authkeeper-state` writes, sealed where
//! the redb store seals them. `meta` holds the schema version, profile numbers and the sealing
//! key's id, as bigints (a u64 is kept by its bits).
//!
//! Every daemon migrates on start, under a transaction-scoped advisory lock, so that daemons
//! starting together take turns and only the first one does the work.

use crate::{Answer, Inner, pool, sql};
use authkeeper_state::StoreError;

/// The schema this build writes. Newer ones are refused.
/// 1: the tables; 2: members, leases, connection versions and history origins (several
/// daemons on one store).
pub const SCHEMA_VERSION: u64 = 2;

/// The advisory lock key that serialises migrations ("authkeep" in ASCII).
const MIGRATION_LOCK: i64 = 0x6175_7468_6b65_6570;

/// Each step, from the version before it. Step `i` makes version `i + 1`.
pub const STEPS: [&str; SCHEMA_VERSION as usize] = [
    r#"
CREATE SCHEMA IF NOT EXISTS authkeeper;
CREATE TABLE authkeeper.meta (name text COLLATE "C" PRIMARY KEY, value bigint NOT NULL);
CREATE TABLE authkeeper.connections (
    key text COLLATE "C" PRIMARY KEY,
    record bytea NOT NULL,
    -- history rows appended since the connection's history was last trimmed
    history_count integer NOT NULL DEFAULT 0
);
CREATE TABLE authkeeper.flows (key text COLLATE "C" PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE authkeeper.history (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key text COLLATE "C" NOT NULL,
    -- the transition's time (ns since the epoch), for compaction by age
    at_ns bigint NOT NULL,
    record bytea NOT NULL
);
CREATE INDEX history_by_key ON authkeeper.history (key, seq);
CREATE TABLE authkeeper.settings (key text COLLATE "C" PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE authkeeper.profile_state (key text COLLATE "C" PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE authkeeper.config_seen (key text COLLATE "C" PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE authkeeper.links (key text COLLATE "C" PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE authkeeper.outbox (key text COLLATE "C" PRIMARY KEY, value bytea NOT NULL);
"#,
    r#"
-- daemons sharing the store, each alive until its lease lapses
CREATE TABLE authkeeper.members (id text COLLATE "C" PRIMARY KEY, expires_at timestamptz NOT NULL);
-- which daemon may call the provider for a connection and write its changes
CREATE TABLE authkeeper.leases (
    key text COLLATE "C" PRIMARY KEY,
    holder text COLLATE "C",
    -- a daemon that was asked to act on the connection and waits for it
    wanted_by text COLLATE "C"
);
CREATE INDEX leases_by_holder ON authkeeper.leases (holder);
CREATE INDEX leases_wanted ON authkeeper.leases (holder) WHERE wanted_by IS NOT NULL;
-- every write of a connection takes the next version, so that others read what changed
CREATE SEQUENCE authkeeper.versions;
ALTER TABLE authkeeper.connections ADD COLUMN version bigint NOT NULL DEFAULT 0;
CREATE INDEX connections_by_version ON authkeeper.connections (version);
-- the daemon that made a history row (none for rows written before)
ALTER TABLE authkeeper.history ADD COLUMN origin text;
"#,
];

/// Bring the database to [`SCHEMA_VERSION`], all steps in one transaction.
pub(crate) async fn migrate(inner: &Inner) -> Answer<()> {
    migrate_to(inner, SCHEMA_VERSION).await
}

/// Bring the database to `target` (tests migrate from each earlier version).
pub(crate) async fn migrate_to(inner: &Inner, target: u64) -> Answer<()> {
    let mut client = inner.pool.get().await.map_err(pool)?;
    let tx = client.transaction().await.map_err(sql)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(sql)?;
    let found = version(&tx).await?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew { found, supported: SCHEMA_VERSION });
    }
    if found >= target {
        return Ok(());
    }
    for step in &STEPS[found as usize..target as usize] {
        tx.batch_execute(step).await.map_err(sql)?;
    }
    let target = target as i64;
    tx.execute(
        "INSERT INTO authkeeper.meta (name, value) VALUES ('schema_version', $1)
         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
        &[&target],
    )
    .await
    .map_err(sql)?;
    tx.commit().await.map_err(sql)
}

/// The version the database is at: 0 before the first step.
pub(crate) async fn version(tx: &impl deadpool_postgres::GenericClient) -> Answer<u64> {
    let exists =
        tx.query_one("SELECT to_regclass('authkeeper.meta') IS NOT NULL", &[]).await.map_err(sql)?.get::<_, bool>(0);
    if !exists {
        return Ok(0);
    }
    let row =
        tx.query_opt("SELECT value FROM authkeeper.meta WHERE name = 'schema_version'", &[]).await.map_err(sql)?;
    Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
}

/// A PostgreSQL store as `authkeeper doctor` sees it, read without changing anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspection {
    /// 0: no tables yet (the daemon makes them when it starts).
    pub schema: u64,
    pub connections: u64,
    /// Daemons whose membership has not lapsed.
    pub members: u64,
}

impl crate::PgStore {
    /// Connect to `url` and read its schema version, connections and live daemons; creates and
    /// migrates nothing.
    pub fn inspect(url: &str) -> Result<Inspection, StoreError> {
        let store = Self::connect(url, None)?;
        store.block(|inner| async move {
            let client = inner.pool.get().await.map_err(pool)?;
            let schema = version(&client).await?;
            let count = |query: &'static str| {
                let client = &client;
                async move {
                    Ok::<u64, StoreError>(client.query_one(query, &[]).await.map_err(sql)?.get::<_, i64>(0) as u64)
                }
            };
            let connections = match schema {
                0 => 0,
                _ => count("SELECT count(*) FROM authkeeper.connections").await?,
            };
            let members = match schema {
                0 | 1 => 0,
                _ => count("SELECT count(*) FROM authkeeper.members WHERE expires_at > now()").await?,
            };
            Ok(Inspection { schema, connections, members })
        })
    }

    /// Migrate to `target` only (tests of the migrations).
    #[doc(hidden)]
    pub fn migrate_to(url: &str, target: u64) -> Result<Self, StoreError> {
        let store = Self::connect(url, None)?;
        store.block(move |inner| async move { migrate_to(&inner, target).await })?;
        Ok(store)
    }
}
