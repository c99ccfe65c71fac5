//! Connections' history as one append-ordered log.
//!
//! Rows are keyed by a global sequence, so the rows one batch appends sit together on the
//! log's last pages instead of one page per connection. A connection's rows are found through
//! its [`HistoryRef`] — the sequence of its newest row and how many it has — kept as a short
//! clear prefix of its connection row, which each commit rewrites anyway; each log row points
//! back to the connection's previous one. A connection that was forgotten keeps its history:
//! its reference moves to the `history_orphans` table until the connection comes back.

use crate::machine::Transition;
use crate::records;
use crate::store::{StoreError, db};
use redb::{ReadableTable, TableDefinition};
use std::collections::HashMap;

/// Global sequence → a history row: the connection's previous row, its key, the transition.
pub(crate) const HISTORY_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("history_log");
/// `provider/profile` → the [`HistoryRef`] of a connection that has history but no row.
pub(crate) const HISTORY_ORPHANS: TableDefinition<&str, &[u8]> = TableDefinition::new("history_orphans");
/// The schema-3 history, keyed (`provider/profile`, per-connection sequence); migrated away.
pub(crate) const OLD_HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("history");

/// History rows kept and shown per connection; compaction drops the older ones.
pub const HISTORY_LIMIT: u64 = 256;

/// How many rows `conn` may have before a commit drops all but its newest [`HISTORY_LIMIT`]:
/// three to four times the limit, set per connection by its key. Dropping them is a walk back
/// along the connection's rows, scattered over the log, so a commit does it rarely: once in
/// 512 to 768 appends, and not for every connection of a refresh storm in the same commit.
/// Between those, `compact_history` trims each connection to the limit in the background.
pub fn trim_at(conn: &str) -> u64 {
    3 * HISTORY_LIMIT + crate::store::settings_digest(conn.as_bytes()) % (HISTORY_LIMIT + 1)
}

/// Where a connection's history is: its newest row (0: none) and how many rows it has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryRef {
    pub head: u64,
    pub count: u32,
}

impl HistoryRef {
    /// Its encoded length, at the start of every connection row.
    pub const LEN: usize = 12;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        out[..8].copy_from_slice(&self.head.to_le_bytes());
        out[8..].copy_from_slice(&self.count.to_le_bytes());
        out
    }

    /// Split a connection row into its history reference and the (maybe sealed) record.
    pub fn split<'a>(key: &str, row: &'a [u8]) -> Result<(Self, &'a [u8]), StoreError> {
        if row.len() < Self::LEN {
            return Err(StoreError::Corrupt { key: key.to_owned(), source: records::RecordError::Empty });
        }
        let (head, rest) = row.split_at(8);
        let (count, record) = rest.split_at(4);
        let head = u64::from_le_bytes(head.try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(count.try_into().expect("4 bytes"));
        Ok((Self { head, count }, record))
    }

    /// `record` behind this reference, as a connection row.
    pub fn join(&self, record: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN + record.len());
        out.extend_from_slice(&self.encode());
        out.extend_from_slice(record);
        out
    }
}

/// A decoded log row.
struct LogRow<'a> {
    prev: u64,
    conn: &'a str,
    transition: &'a [u8],
}

fn encode_row(prev: u64, conn: &str, t: &Transition) -> Vec<u8> {
    join_row(prev, conn, &records::encode_transition(t))
}

/// A log row: the connection's previous row, its key, the transition's record.
pub(crate) fn join_row(prev: u64, conn: &str, record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + conn.len() + record.len());
    out.extend_from_slice(&prev.to_le_bytes());
    out.extend_from_slice(&(conn.len() as u16).to_le_bytes());
    out.extend_from_slice(conn.as_bytes());
    out.extend_from_slice(record);
    out
}

/// A log row's connection key and transition record.
pub(crate) fn split_row(seq: u64, bytes: &[u8]) -> Result<(&str, &[u8]), StoreError> {
    decode_row(seq, bytes).map(|r| (r.conn, r.transition))
}

fn decode_row(seq: u64, bytes: &[u8]) -> Result<LogRow<'_>, StoreError> {
    let corrupt = || StoreError::Corrupt { key: format!("history row {seq}"), source: records::RecordError::Empty };
    let prev = u64::from_le_bytes(bytes.get(..8).ok_or_else(corrupt)?.try_into().expect("8 bytes"));
    let len = u16::from_le_bytes(bytes.get(8..10).ok_or_else(corrupt)?.try_into().expect("2 bytes")) as usize;
    let conn = bytes.get(10..10 + len).and_then(|b| std::str::from_utf8(b).ok()).ok_or_else(corrupt)?;
    Ok(LogRow { prev, conn, transition: &bytes[10 + len..] })
}

/// The next global sequence: one past the log's last row (sequences start at 1).
pub(crate) fn next_sequence(log: &impl ReadableTable<u64, &'static [u8]>) -> Result<u64, StoreError> {
    Ok(log.last().map_err(db)?.map_or(1, |(k, _)| k.value() + 1))
}

/// `conn`'s rows, newest first, up to `limit`: their sequences and transition bytes. The walk
/// stops at a row that is gone (dropped by age) or that is not `conn`'s.
fn walk<T: ReadableTable<u64, &'static [u8]>>(
    log: &T,
    conn: &str,
    from: HistoryRef,
    limit: usize,
    mut each: impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
) -> Result<usize, StoreError> {
    let (mut seq, mut seen) = (from.head, 0);
    while seq != 0 && seen < limit {
        let Some(value) = log.get(seq).map_err(db)? else { break };
        let row = decode_row(seq, value.value())?;
        if row.conn != conn {
            break;
        }
        each(seq, row.transition)?;
        seen += 1;
        // Sequences only go back; anything else would be a loop in a damaged file.
        seq = if row.prev < seq { row.prev } else { 0 };
    }
    Ok(seen)
}

/// Append `t` as `conn`'s newest row at sequence `seq`, dropping all but its newest
/// [`HISTORY_LIMIT`] rows once it has more than [`trim_at`]. Returns the connection's new
/// reference.
pub(crate) fn append(
    log: &mut redb::Table<u64, &[u8]>,
    seq: u64,
    conn: &str,
    was: HistoryRef,
    t: &Transition,
) -> Result<HistoryRef, StoreError> {
    log.insert(seq, encode_row(was.head, conn, t).as_slice()).map_err(db)?;
    let now = HistoryRef { head: seq, count: was.count.saturating_add(1) };
    if u64::from(now.count) <= trim_at(conn) {
        return Ok(now);
    }
    let mut doomed = Vec::new();
    let mut kept = 0u32;
    walk(&*log, conn, now, usize::MAX, |seq, _| {
        match u64::from(kept) < HISTORY_LIMIT {
            true => kept += 1,
            false => doomed.push(seq),
        }
        Ok(())
    })?;
    for seq in doomed {
        log.remove(seq).map_err(db)?;
    }
    Ok(HistoryRef { head: seq, count: kept })
}

/// `conn`'s history, oldest first: its newest [`HISTORY_LIMIT`] rows.
pub(crate) fn read<T: ReadableTable<u64, &'static [u8]>>(
    log: &T,
    conn: &str,
    from: HistoryRef,
) -> Result<Vec<Transition>, StoreError> {
    let mut out = Vec::new();
    walk(log, conn, from, HISTORY_LIMIT as usize, |_, bytes| {
        let t =
            records::decode_transition(bytes).map_err(|source| StoreError::Corrupt { key: conn.to_owned(), source })?;
        out.push(t);
        Ok(())
    })?;
    out.reverse();
    Ok(out)
}

/// Drop rows older than `cutoff`, except each connection's newest, and all but each
/// connection's newest [`HISTORY_LIMIT`]. Returns how many went.
pub(crate) fn compact(
    log: &mut redb::Table<u64, &[u8]>,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Result<u64, StoreError> {
    // First how many rows each connection has, then, in sequence order, which to drop.
    let mut left: HashMap<String, u64> = HashMap::new();
    for row in log.iter().map_err(db)? {
        let (k, v) = row.map_err(db)?;
        *left.entry(decode_row(k.value(), v.value())?.conn.to_owned()).or_default() += 1;
    }
    let mut doomed = Vec::new();
    for row in log.iter().map_err(db)? {
        let (k, v) = row.map_err(db)?;
        let seq = k.value();
        let row = decode_row(seq, v.value())?;
        let left = left.get_mut(row.conn).expect("counted");
        let t = records::decode_transition(row.transition)
            .map_err(|source| StoreError::Corrupt { key: row.conn.to_owned(), source })?;
        if *left > HISTORY_LIMIT || (*left > 1 && t.at < cutoff) {
            doomed.push(seq);
        }
        *left -= 1;
    }
    for seq in &doomed {
        log.remove(*seq).map_err(db)?;
    }
    Ok(doomed.len() as u64)
}

/// Schema 3 → 4: move the (connection, sequence)-keyed history into the log, in that order.
/// Returns each connection's reference; the old table is deleted.
pub(crate) fn migrate(txn: &redb::WriteTransaction) -> Result<HashMap<String, HistoryRef>, StoreError> {
    let mut refs: HashMap<String, HistoryRef> = HashMap::new();
    {
        let old = txn.open_table(OLD_HISTORY).map_err(db)?;
        let mut log = txn.open_table(HISTORY_LOG).map_err(db)?;
        let first = next_sequence(&log)?;
        for (seq, row) in (first..).zip(old.iter().map_err(db)?) {
            let (k, v) = row.map_err(db)?;
            let (conn, _) = k.value();
            let t = records::decode_transition(v.value())
                .map_err(|source| StoreError::Corrupt { key: conn.to_owned(), source })?;
            let r = refs.entry(conn.to_owned()).or_default();
            log.insert(seq, encode_row(r.head, conn, &t).as_slice()).map_err(db)?;
            *r = HistoryRef { head: seq, count: r.count + 1 };
        }
    }
    txn.delete_table(OLD_HISTORY).map_err(db)?;
    Ok(refs)
}
