//! The whole store as a [`Dump`], out and in (`authkeeper store copy`), and sealing a store's
//! secrets with the key given at open.

use crate::{Answer, Inner, pool, rows, sql};
use authkeeper_state::dump::{Dump, TABLES};
use authkeeper_state::sealed_store::{KEY_ID, SEALED_TABLE_NAMES, open_value, reseal_needed, seal_value};
use authkeeper_state::{StoreError, records};

/// How many rows one statement of an import carries.
const CHUNK: usize = 10_000;

pub(crate) async fn export(inner: &Inner) -> Answer<Dump> {
    let mut dump = Dump::default();
    for table in TABLES {
        let rows = match table {
            "connections" => {
                let client = inner.pool.get().await.map_err(pool)?;
                let rows = client
                    .query("SELECT key, record FROM authkeeper.connections ORDER BY key", &[])
                    .await
                    .map_err(sql)?;
                rows.into_iter().map(|r| (r.get(0), r.get(1))).collect()
            }
            _ => rows::all(inner, table).await?,
        };
        dump.tables.push(rows);
    }
    let client = inner.pool.get().await.map_err(pool)?;
    let history = client.query("SELECT key, record FROM authkeeper.history ORDER BY seq", &[]).await.map_err(sql)?;
    dump.history = history.into_iter().map(|r| (r.get(0), r.get(1))).collect();
    let meta = client
        .query(
            "SELECT name, value FROM authkeeper.meta WHERE name NOT IN ('schema_version', 'claim_epoch') ORDER BY name",
            &[],
        )
        .await
        .map_err(sql)?;
    dump.meta = meta.into_iter().map(|r| (r.get(0), r.get::<_, i64>(1) as u64)).collect();
    Ok(dump)
}

/// Write `dump` into an empty store in one transaction.
pub(crate) async fn import(inner: &Inner, dump: Dump) -> Answer<()> {
    let mut client = inner.pool.get().await.map_err(pool)?;
    let tx = client.transaction().await.map_err(sql)?;
    for table in TABLES.iter().chain(&["history"]) {
        let any: bool =
            tx.query_one(&format!("SELECT EXISTS (SELECT 1 FROM authkeeper.{table})"), &[]).await.map_err(sql)?.get(0);
        if any {
            return Err(StoreError::NotEmpty);
        }
    }
    let others: i64 = tx
        .query_one("SELECT count(*) FROM authkeeper.meta WHERE name NOT IN ('schema_version', 'claim_epoch')", &[])
        .await
        .map_err(sql)?
        .get(0);
    if others > 0 {
        return Err(StoreError::NotEmpty);
    }
    for chunk in dump.history.chunks(CHUNK) {
        let (mut keys, mut at, mut records) = (Vec::new(), Vec::new(), Vec::new());
        for (key, record) in chunk {
            let t = records::decode_transition(record)
                .map_err(|source| StoreError::Corrupt { key: key.clone(), source })?;
            keys.push(key.as_str());
            at.push(t.at.timestamp_nanos_opt().unwrap_or(i64::MAX));
            records.push(record.as_slice());
        }
        tx.execute(
            "INSERT INTO authkeeper.history (key, at_ns, record)
             SELECT k, a, r FROM UNNEST($1::text[], $2::int8[], $3::bytea[]) WITH ORDINALITY AS h(k, a, r, n)
             ORDER BY n",
            &[&keys, &at, &records],
        )
        .await
        .map_err(sql)?;
    }
    for (table, rows) in TABLES.iter().zip(&dump.tables) {
        let column = if *table == "connections" { "record" } else { "value" };
        for chunk in rows.chunks(CHUNK) {
            let keys: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
            let values: Vec<&[u8]> = chunk.iter().map(|(_, v)| v.as_slice()).collect();
            tx.execute(
                &format!(
                    "INSERT INTO authkeeper.{table} (key, {column}) SELECT * FROM UNNEST($1::text[], $2::bytea[])"
                ),
                &[&keys, &values],
            )
            .await
            .map_err(sql)?;
        }
    }
    // Each connection's history so far, for trimming.
    tx.execute(
        "UPDATE authkeeper.connections c SET history_count = h.n
         FROM (SELECT key, count(*)::int4 AS n FROM authkeeper.history GROUP BY key) h WHERE h.key = c.key",
        &[],
    )
    .await
    .map_err(sql)?;
    for (name, value) in &dump.meta {
        tx.execute("INSERT INTO authkeeper.meta (name, value) VALUES ($1, $2)", &[name, &(*value as i64)])
            .await
            .map_err(sql)?;
    }
    tx.commit().await.map_err(sql)
}

/// Check the store's sealing against the key given, and when it must change (a clear store
/// and a key, or a previous key's rows), reseal every secret-holding row with the current key
/// in one transaction, under the migration lock's neighbour so daemons take turns.
pub(crate) async fn seal(inner: &Inner) -> Answer<()> {
    let sealer = inner.sealer.as_deref();
    if !reseal_needed(rows::meta(inner, KEY_ID).await?, sealer)? {
        return Ok(());
    }
    let sealer = sealer.expect("resealing needs a key");
    let mut client = inner.pool.get().await.map_err(pool)?;
    let tx = client.transaction().await.map_err(sql)?;
    tx.execute("LOCK TABLE authkeeper.meta IN SHARE ROW EXCLUSIVE MODE", &[]).await.map_err(sql)?;
    let found = tx.query_opt("SELECT value FROM authkeeper.meta WHERE name = $1", &[&KEY_ID]).await.map_err(sql)?;
    // Another daemon may have resealed it while this one waited.
    if !reseal_needed(found.map(|r| r.get::<_, i64>(0) as u64), Some(sealer))? {
        return Ok(());
    }
    for table in SEALED_TABLE_NAMES {
        let column = if table == "connections" { "record" } else { "value" };
        let rows =
            tx.query(&format!("SELECT key, {column} FROM authkeeper.{table} FOR UPDATE"), &[]).await.map_err(sql)?;
        for row in rows {
            let key: &str = row.get(0);
            let plain = open_value(Some(sealer), table, key, row.get(1))?;
            let value = seal_value(Some(sealer), table, key, plain.into_owned());
            tx.execute(&format!("UPDATE authkeeper.{table} SET {column} = $2 WHERE key = $1"), &[&key, &value])
                .await
                .map_err(sql)?;
        }
    }
    tx.execute(
        "INSERT INTO authkeeper.meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
        &[&KEY_ID, &(sealer.current.id() as i64)],
    )
    .await
    .map_err(sql)?;
    tx.commit().await.map_err(sql)
}
