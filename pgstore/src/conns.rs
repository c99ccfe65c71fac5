//! Connections, their pending flows and their history; the group commit.

use crate::{Answer, Inner, pool, sql};
use authkeeper_state::history::{HISTORY_LIMIT, trim_at};
use authkeeper_state::machine::StateName;
use authkeeper_state::sealed_store::{open_value, seal_value};
use authkeeper_state::{Commit, Sealer, StoreError, Stored, Transition, records};
use futures_util::{TryStreamExt, pin_mut};
use std::collections::HashMap;

/// A batch of commits, encoded and sealed, ready to send: built on the caller's thread.
pub(crate) struct Batch {
    /// Each connection's last state in the batch.
    keys: Vec<String>,
    records: Vec<Vec<u8>>,
    /// History rows the batch appends to each of `keys`.
    appended: Vec<i32>,
    /// Flows that are pending after the batch, and flows that ended in it.
    flow_keys: Vec<String>,
    flows: Vec<Vec<u8>>,
    ended: Vec<String>,
    /// History rows, in order.
    history_keys: Vec<String>,
    history_at: Vec<i64>,
    history: Vec<Vec<u8>>,
}

impl Batch {
    pub(crate) fn new(sealer: Option<&Sealer>, batch: &[Commit]) -> Self {
        // A connection committed twice in one batch keeps its last state and every row.
        // Per connection: its last commit, whether it left pending, how many rows it appends.
        let mut last: HashMap<String, (usize, bool, i32)> = HashMap::with_capacity(batch.len());
        let mut b = Batch {
            keys: Vec::with_capacity(batch.len()),
            records: Vec::new(),
            appended: Vec::new(),
            flow_keys: Vec::new(),
            flows: Vec::new(),
            ended: Vec::new(),
            history_keys: Vec::new(),
            history_at: Vec::new(),
            history: Vec::new(),
        };
        for (i, c) in batch.iter().enumerate() {
            let key = c.machine.key().to_string();
            let left_pending = c.transition.as_ref().is_some_and(|t| t.from == StateName::Pending);
            if let Some(t) = &c.transition {
                b.history_keys.push(key.clone());
                b.history_at.push(t.at.timestamp_nanos_opt().unwrap_or(i64::MAX));
                b.history.push(records::encode_transition(t));
            }
            let entry = last.entry(key).or_insert((i, false, 0));
            *entry = (i, entry.1 || left_pending, entry.2 + i32::from(c.transition.is_some()));
        }
        let mut order: Vec<(String, (usize, bool, i32))> = last.into_iter().collect();
        order.sort_by_key(|(_, (i, _, _))| *i);
        for (key, (i, left_pending, appended)) in order {
            let machine = &batch[i].machine;
            b.records.push(seal_value(sealer, "connections", &key, records::encode_connection(machine)));
            b.appended.push(appended);
            match &machine.connection().flow {
                Some(flow) => {
                    b.flows.push(seal_value(sealer, "flows", &key, records::encode_flow(flow)));
                    b.flow_keys.push(key.clone());
                }
                // A flow ends only with a step out of pending.
                None if left_pending => b.ended.push(key.clone()),
                None => {}
            }
            b.keys.push(key);
        }
        b
    }
}

impl Batch {
    /// The connections it writes.
    pub(crate) fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The batch without the connections in `gone`.
    pub(crate) fn without(self, gone: &std::collections::HashSet<String>) -> Self {
        let split = |keys: &[String]| -> Vec<bool> { keys.iter().map(|k| !gone.contains(k)).collect() };
        fn pick<T>(values: Vec<T>, kept: &[bool]) -> Vec<T> {
            values.into_iter().zip(kept).filter_map(|(v, k)| k.then_some(v)).collect()
        }
        let kept = split(&self.keys);
        let flows_kept = split(&self.flow_keys);
        let ended_kept = split(&self.ended);
        let history_kept = split(&self.history_keys);
        Batch {
            keys: pick(self.keys, &kept),
            records: pick(self.records, &kept),
            appended: pick(self.appended, &kept),
            flow_keys: pick(self.flow_keys, &flows_kept),
            flows: pick(self.flows, &flows_kept),
            ended: pick(self.ended, &ended_kept),
            history_keys: pick(self.history_keys, &history_kept),
            history_at: pick(self.history_at, &history_kept),
            history: pick(self.history, &history_kept),
        }
    }
}

/// Commit a batch in one transaction: every connection's new state, its flow, its history.
/// A daemon sharing the store writes only the connections whose lease it holds (a new
/// connection's lease goes to the daemon that made it); the others are refused with
/// [`StoreError::NotOwnerOf`], and the rest is committed. The leases read are locked until the
/// commit, so no lease passes to another daemon while its connection is being written.
pub(crate) async fn commit(inner: &Inner, b: Batch) -> Answer<()> {
    let mut client = inner.pool.get().await.map_err(pool)?;
    if b.keys.is_empty() {
        // Nothing to write, but the database must answer: an empty commit is a daemon's probe.
        client.simple_query("").await.map_err(sql)?;
        return Ok(());
    }
    let tx = client.transaction().await.map_err(sql)?;
    inner.fence(&tx).await?;
    let member = inner.member();
    let (b, refused) = match &member {
        Some(me) => {
            // Numbered in commit order (see `leases`): the lock is held until the commit.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&crate::leases::ORDER_LOCK]).await.map_err(sql)?;
            crate::leases::held_in(&tx, me, b).await?
        }
        None => (b, Vec::new()),
    };
    let upsert = tx
        .prepare_cached(
            "INSERT INTO authkeeper.connections AS c (key, record, history_count, version)
             SELECT k, r, n, nextval('authkeeper.versions') FROM UNNEST($1::text[], $2::bytea[], $3::int4[]) AS u(k, r, n)
             ON CONFLICT (key) DO UPDATE
             SET record = EXCLUDED.record, history_count = c.history_count + EXCLUDED.history_count,
                 version = EXCLUDED.version
             RETURNING key, history_count",
        )
        .await
        .map_err(sql)?;
    let counts = tx.query(&upsert, &[&b.keys, &b.records, &b.appended]).await.map_err(sql)?;
    if !b.history.is_empty() {
        let append = tx
            .prepare_cached(
                "INSERT INTO authkeeper.history (key, at_ns, record, origin)
                 SELECT k, a, r, $4 FROM UNNEST($1::text[], $2::int8[], $3::bytea[]) WITH ORDINALITY AS h(k, a, r, n)
                 ORDER BY n",
            )
            .await
            .map_err(sql)?;
        tx.execute(&append, &[&b.history_keys, &b.history_at, &b.history, &member]).await.map_err(sql)?;
    }
    if !b.flow_keys.is_empty() {
        let flows = tx
            .prepare_cached(
                "INSERT INTO authkeeper.flows (key, value) SELECT * FROM UNNEST($1::text[], $2::bytea[])
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            )
            .await
            .map_err(sql)?;
        tx.execute(&flows, &[&b.flow_keys, &b.flows]).await.map_err(sql)?;
    }
    if !b.ended.is_empty() {
        let ended = tx.prepare_cached("DELETE FROM authkeeper.flows WHERE key = ANY($1)").await.map_err(sql)?;
        tx.execute(&ended, &[&b.ended]).await.map_err(sql)?;
    }
    // A connection past its trim point keeps its newest rows only (rarely: see `trim_at`).
    for row in counts {
        let (key, count): (String, i32) = (row.get(0), row.get(1));
        if u64::try_from(count).unwrap_or(0) > trim_at(&key) {
            trim(&tx, &key).await?;
        }
    }
    if member.is_some() {
        tx.execute("SELECT pg_notify('authkeeper_commits', '')", &[]).await.map_err(sql)?;
    }
    tx.commit().await.map_err(sql)?;
    match refused.is_empty() {
        true => Ok(()),
        false => Err(StoreError::NotOwnerOf(refused)),
    }
}

/// Drop all but `key`'s newest [`HISTORY_LIMIT`] history rows.
async fn trim(tx: &deadpool_postgres::Transaction<'_>, key: &str) -> Answer<()> {
    let limit = HISTORY_LIMIT as i64;
    tx.execute(
        "DELETE FROM authkeeper.history WHERE key = $1 AND seq < (
             SELECT seq FROM authkeeper.history WHERE key = $1 ORDER BY seq DESC OFFSET $2::int8 - 1 LIMIT 1)",
        &[&key, &limit],
    )
    .await
    .map_err(sql)?;
    let kept = limit as i32;
    tx.execute("UPDATE authkeeper.connections SET history_count = $2 WHERE key = $1", &[&key, &kept])
        .await
        .map_err(sql)?;
    Ok(())
}

/// Every connection, with its flow, in key order; rows are decoded as they arrive.
pub(crate) async fn load_all(inner: &Inner) -> Answer<Vec<Stored>> {
    let client = inner.pool.get().await.map_err(pool)?;
    let count: i64 = client.query_one("SELECT count(*) FROM authkeeper.connections", &[]).await.map_err(sql)?.get(0);
    let rows = client
        .query_raw(
            "SELECT c.key, c.record, f.value FROM authkeeper.connections c
             LEFT JOIN authkeeper.flows f ON f.key = c.key
             ORDER BY c.key",
            std::iter::empty::<&str>(),
        )
        .await
        .map_err(sql)?;
    pin_mut!(rows);
    let sealer = inner.sealer.as_deref();
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    while let Some(row) = rows.try_next().await.map_err(sql)? {
        let key: &str = row.get(0);
        let corrupt = |source| StoreError::Corrupt { key: key.to_owned(), source };
        let flow = match row.get::<_, Option<&[u8]>>(2) {
            Some(f) => Some(records::decode_flow(&open_value(sealer, "flows", key, f)?).map_err(corrupt)?),
            None => None,
        };
        let record = open_value(sealer, "connections", key, row.get(1))?;
        let machine = records::decode_connection(key, &record, flow).map_err(corrupt)?;
        out.push(Stored { key: machine.key().clone(), machine: machine.into() });
    }
    Ok(out)
}

/// A connection's newest [`HISTORY_LIMIT`] rows, oldest first.
pub(crate) async fn history(inner: &Inner, key: String) -> Answer<Vec<Transition>> {
    let client = inner.pool.get().await.map_err(pool)?;
    let read = client
        .prepare_cached("SELECT record FROM authkeeper.history WHERE key = $1 ORDER BY seq DESC LIMIT $2")
        .await
        .map_err(sql)?;
    let rows = client.query(&read, &[&key, &(HISTORY_LIMIT as i64)]).await.map_err(sql)?;
    let mut out = rows
        .iter()
        .map(|r| {
            records::decode_transition(r.get(0)).map_err(|source| StoreError::Corrupt { key: key.clone(), source })
        })
        .collect::<Answer<Vec<_>>>()?;
    out.reverse();
    Ok(out)
}

/// Drop a removed connection's state, flow, settings and config digest; its history stays.
pub(crate) async fn forget(inner: &Inner, key: String) -> Answer<()> {
    let mut client = inner.pool.get().await.map_err(pool)?;
    let tx = client.transaction().await.map_err(sql)?;
    inner.fence(&tx).await?;
    for table in ["connections", "flows", "config_seen", "settings"] {
        tx.execute(&format!("DELETE FROM authkeeper.{table} WHERE key = $1"), &[&key]).await.map_err(sql)?;
    }
    tx.commit().await.map_err(sql)
}

/// Drop history rows older than `cutoff`, keeping each connection's newest row, and all but
/// each connection's newest [`HISTORY_LIMIT`]. Returns how many went.
pub(crate) async fn compact_history(inner: &Inner, cutoff: chrono::DateTime<chrono::Utc>) -> Answer<u64> {
    let client = inner.pool.get().await.map_err(pool)?;
    let cutoff = cutoff.timestamp_nanos_opt().unwrap_or(i64::MIN);
    client
        .execute(
            "DELETE FROM authkeeper.history h USING (
                 SELECT seq, at_ns, row_number() OVER (PARTITION BY key ORDER BY seq DESC) AS newer
                 FROM authkeeper.history) o
             WHERE h.seq = o.seq AND (o.newer > $1 OR (o.newer > 1 AND o.at_ns < $2))",
            &[&(HISTORY_LIMIT as i64), &cutoff],
        )
        .await
        .map_err(sql)
}
