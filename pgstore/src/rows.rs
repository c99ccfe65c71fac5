//! The keyed tables besides connections: declared settings, provider state, config digests,
//! links and the webhook outbox; and `meta` (profile numbers).
//!
//! Table names come from this crate only (never from input), so they are formatted into the
//! statements; values are always parameters.

use crate::{Answer, Inner, pool, sql};
use authkeeper_state::grant::ProfileState;
use authkeeper_state::links::{self, LinkRecord};
use authkeeper_state::sealed_store::{open_value, seal_value};
use authkeeper_state::store::{declared_digest, parse_key};
use authkeeper_state::{ConnKey, Sealer, StoreError, records};
use std::sync::Arc;

/// `(key, value)` rows sealed for `table`.
pub(crate) fn sealed(
    sealer: Option<&Sealer>,
    table: &str,
    rows: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> Vec<(String, Vec<u8>)> {
    rows.into_iter().map(|(key, value)| (key.clone(), seal_value(sealer, table, &key, value))).collect()
}

/// Settings to record (`Some`, sealed) or clear (`None`).
pub(crate) fn sealed_settings(
    sealer: Option<&Sealer>,
    rows: &[(ConnKey, Option<Arc<[u8]>>)],
) -> Vec<(String, Option<Vec<u8>>)> {
    rows.iter()
        .map(|(key, value)| {
            let key = key.to_string();
            let value = value.as_ref().map(|v| seal_value(sealer, "settings", &key, v.to_vec()));
            (key, value)
        })
        .collect()
}

pub(crate) fn sealed_profile_states(
    sealer: Option<&Sealer>,
    states: &[(ConnKey, ProfileState)],
) -> Vec<(String, Vec<u8>)> {
    sealed(sealer, "profile_state", states.iter().map(|(k, s)| (k.to_string(), records::encode_profile_state(s))))
}

/// Insert or replace rows of `table`, in one transaction.
pub(crate) async fn upsert(inner: &Inner, table: &str, rows: Vec<(String, Vec<u8>)>) -> Answer<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let (keys, values): (Vec<String>, Vec<Vec<u8>>) = rows.into_iter().unzip();
    let mut client = inner.pool.get().await.map_err(pool)?;
    let tx = client.transaction().await.map_err(sql)?;
    inner.fence(&tx).await?;
    let statement = tx
        .prepare_cached(&format!(
            "INSERT INTO authkeeper.{table} (key, value) SELECT * FROM UNNEST($1::text[], $2::bytea[])
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
        ))
        .await
        .map_err(sql)?;
    tx.execute(&statement, &[&keys, &values]).await.map_err(sql)?;
    tx.commit().await.map_err(sql)
}

pub(crate) async fn set_settings(inner: &Inner, rows: Vec<(String, Option<Vec<u8>>)>) -> Answer<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut client = inner.pool.get().await.map_err(pool)?;
    let tx = client.transaction().await.map_err(sql)?;
    inner.fence(&tx).await?;
    let (mut keys, mut values, mut cleared) = (Vec::new(), Vec::new(), Vec::new());
    for (key, value) in rows {
        match value {
            Some(v) => {
                keys.push(key);
                values.push(v);
            }
            None => cleared.push(key),
        }
    }
    tx.execute(
        "INSERT INTO authkeeper.settings (key, value) SELECT * FROM UNNEST($1::text[], $2::bytea[])
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        &[&keys, &values],
    )
    .await
    .map_err(sql)?;
    tx.execute("DELETE FROM authkeeper.settings WHERE key = ANY($1)", &[&cleared]).await.map_err(sql)?;
    tx.commit().await.map_err(sql)
}

/// One row's value as stored.
pub(crate) async fn get(inner: &Inner, table: &str, key: String) -> Answer<Option<Vec<u8>>> {
    let client = inner.pool.get().await.map_err(pool)?;
    let statement =
        client.prepare_cached(&format!("SELECT value FROM authkeeper.{table} WHERE key = $1")).await.map_err(sql)?;
    Ok(client.query_opt(&statement, &[&key]).await.map_err(sql)?.map(|r| r.get(0)))
}

pub(crate) async fn remove(inner: &Inner, table: &str, key: String) -> Answer<()> {
    let client = inner.pool.get().await.map_err(pool)?;
    client.execute(&format!("DELETE FROM authkeeper.{table} WHERE key = $1"), &[&key]).await.map_err(sql)?;
    Ok(())
}

/// Every row of `table` in key order, as stored.
pub(crate) async fn all(inner: &Inner, table: &str) -> Answer<Vec<(String, Vec<u8>)>> {
    let client = inner.pool.get().await.map_err(pool)?;
    let rows =
        client.query(&format!("SELECT key, value FROM authkeeper.{table} ORDER BY key"), &[]).await.map_err(sql)?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Every row of a sealed table in key order, opened.
pub(crate) async fn opened(inner: &Inner, table: &str) -> Answer<Vec<(String, Vec<u8>)>> {
    let sealer = inner.sealer.as_deref();
    all(inner, table)
        .await?
        .into_iter()
        .map(|(key, value)| {
            let value = open_value(sealer, table, &key, &value)?.into_owned();
            Ok((key, value))
        })
        .collect()
}

pub(crate) async fn settings(inner: &Inner) -> Answer<Vec<(ConnKey, Vec<u8>)>> {
    Ok(opened(inner, "settings").await?.into_iter().map(|(k, v)| (parse_key(&k), v)).collect())
}

/// The digest of the settings stored for each of `keys`, in their order.
pub(crate) async fn settings_digests(inner: &Inner, keys: Vec<String>) -> Answer<Vec<Option<u64>>> {
    let client = inner.pool.get().await.map_err(pool)?;
    let rows =
        client.query("SELECT key, value FROM authkeeper.settings WHERE key = ANY($1)", &[&keys]).await.map_err(sql)?;
    let sealer = inner.sealer.as_deref();
    let mut found = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        let key: String = row.get(0);
        let digest = declared_digest(&open_value(sealer, "settings", &key, row.get(1))?);
        found.insert(key, digest);
    }
    Ok(keys.iter().map(|k| found.get(k).copied()).collect())
}

pub(crate) async fn profile_states(inner: &Inner) -> Answer<Vec<(ConnKey, ProfileState)>> {
    opened(inner, "profile_state")
        .await?
        .into_iter()
        .map(|(key, value)| {
            let state = records::decode_profile_state(&value)
                .map_err(|source| StoreError::Corrupt { key: key.clone(), source })?;
            Ok((parse_key(&key), state))
        })
        .collect()
}

/// A `meta` value.
pub(crate) async fn meta(inner: &Inner, name: &str) -> Answer<Option<u64>> {
    let client = inner.pool.get().await.map_err(pool)?;
    let row = client.query_opt("SELECT value FROM authkeeper.meta WHERE name = $1", &[&name]).await.map_err(sql)?;
    Ok(row.map(|r| r.get::<_, i64>(0) as u64))
}

/// The next profile number for `provider`: one above both the highest ever allocated and
/// `in_use`, in one statement, so that daemons sharing the store never hand out the same one.
pub(crate) async fn allocate_profile(inner: &Inner, provider: String, in_use: u64) -> Answer<u64> {
    let next = i64::try_from(in_use)
        .ok()
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| StoreError::NoProfileNumber(provider.clone()))?;
    let client = inner.pool.get().await.map_err(pool)?;
    let row = client
        .query_one(
            "INSERT INTO authkeeper.meta AS m (name, value) VALUES ('profiles/' || $1, $2)
             ON CONFLICT (name) DO UPDATE SET value = GREATEST(m.value + 1, EXCLUDED.value)
             RETURNING value",
            &[&provider, &next],
        )
        .await
        .map_err(|e| match e.code() {
            Some(&tokio_postgres::error::SqlState::NUMERIC_VALUE_OUT_OF_RANGE) => {
                StoreError::NoProfileNumber(provider.clone())
            }
            _ => sql(e),
        })?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// Record that profile numbers up to `in_use` exist.
pub(crate) async fn note_profiles(inner: &Inner, provider: String, in_use: u64) -> Answer<()> {
    let in_use = i64::try_from(in_use).unwrap_or(i64::MAX);
    let client = inner.pool.get().await.map_err(pool)?;
    client
        .execute(
            "INSERT INTO authkeeper.meta AS m (name, value) VALUES ('profiles/' || $1, $2)
             ON CONFLICT (name) DO UPDATE SET value = GREATEST(m.value, EXCLUDED.value)",
            &[&provider, &in_use],
        )
        .await
        .map_err(sql)?;
    Ok(())
}

/// Save a link; the same profile's earlier unopened links, and links that ended over a day
/// ago, go (see [`LinkRecord::ended_by`]). The table is locked for the while, as redb's single
/// writer would be.
pub(crate) async fn put_link(inner: &Inner, id: String, record: LinkRecord) -> Answer<()> {
    let mut client = inner.pool.get().await.map_err(pool)?;
    let tx = client.transaction().await.map_err(sql)?;
    tx.execute("LOCK TABLE authkeeper.links IN SHARE ROW EXCLUSIVE MODE", &[]).await.map_err(sql)?;
    let rows = tx.query("SELECT key, value FROM authkeeper.links WHERE key <> $1", &[&id]).await.map_err(sql)?;
    let stale: Vec<String> = rows
        .iter()
        .filter(|r| {
            // A record that does not read is left for a human, not a reason to refuse links.
            links::decode(r.get(0), r.get(1)).is_ok_and(|other| other.ended_by(&record))
        })
        .map(|r| r.get(0))
        .collect();
    tx.execute("DELETE FROM authkeeper.links WHERE key = ANY($1)", &[&stale]).await.map_err(sql)?;
    tx.execute(
        "INSERT INTO authkeeper.links (key, value) VALUES ($1, $2)
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        &[&id, &links::encode(&record)],
    )
    .await
    .map_err(sql)?;
    tx.commit().await.map_err(sql)
}

/// Change one link in one transaction, its row locked: `change` gives the record after, or
/// `None` to leave it (and answer `None`). `None` too when there is no such link.
pub(crate) async fn change_link(
    inner: &Inner,
    id: String,
    change: impl FnOnce(LinkRecord) -> Option<LinkRecord>,
) -> Answer<Option<LinkRecord>> {
    let mut client = inner.pool.get().await.map_err(pool)?;
    let tx = client.transaction().await.map_err(sql)?;
    let row =
        tx.query_opt("SELECT value FROM authkeeper.links WHERE key = $1 FOR UPDATE", &[&id]).await.map_err(sql)?;
    let Some(row) = row else { return Ok(None) };
    let Some(after) = change(links::decode(&id, row.get(0))?) else { return Ok(None) };
    tx.execute("UPDATE authkeeper.links SET value = $2 WHERE key = $1", &[&id, &links::encode(&after)])
        .await
        .map_err(sql)?;
    tx.commit().await.map_err(sql)?;
    Ok(Some(after))
}

pub(crate) async fn links(inner: &Inner) -> Answer<Vec<(String, LinkRecord)>> {
    all(inner, "links").await?.into_iter().map(|(id, value)| Ok((id.clone(), links::decode(&id, &value)?))).collect()
}
