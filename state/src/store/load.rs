//! Reading every connection at start-up: the connections table with its flows walked
//! alongside. A large store is read by one thread while another decodes it.

use super::{CONNECTIONS, FLOWS, Store, StoreError, Stored, db};
use crate::history::HistoryRef;
use crate::records;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
use std::ops::Range;
use std::sync::mpsc;

type Row<'a> = Result<(redb::AccessGuard<'a, &'static str>, redb::AccessGuard<'a, &'static [u8]>), redb::StorageError>;

/// The row `rows` holds for `key`, passing the rows before it: `rows` and the keys asked for
/// are both in key order.
fn row_for<'a>(
    rows: &mut std::iter::Peekable<impl Iterator<Item = Row<'a>>>,
    key: &str,
) -> Result<Option<redb::AccessGuard<'a, &'static [u8]>>, StoreError> {
    loop {
        let order = match rows.peek() {
            None => return Ok(None),
            Some(Ok((k, _))) => k.value().cmp(key),
            Some(Err(_)) => std::cmp::Ordering::Less, // taken below, to return its error
        };
        if order.is_gt() {
            return Ok(None);
        }
        let (_, v) = rows.next().expect("peeked").map_err(db)?;
        if order.is_eq() {
            return Ok(Some(v));
        }
    }
}

type Table = redb::ReadOnlyTable<&'static str, &'static [u8]>;
/// The connections and flows tables.
type Tables = (Table, Table);

/// Each connection row of `tables` in key order, with its flow row if it has one, given to
/// `row` until it answers `false`.
fn walk(
    (conns, flows): &Tables,
    mut row: impl FnMut(&str, &[u8], Option<&[u8]>) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let mut flows = flows.iter().map_err(db)?.peekable();
    for r in conns.iter().map_err(db)? {
        let (key, value) = r.map_err(db)?;
        let flow = row_for(&mut flows, key.value())?;
        if !row(key.value(), value.value(), flow.as_ref().map(|v| v.value()))? {
            break;
        }
    }
    Ok(())
}

/// A store of this many connections or more is read by one thread and decoded by another.
const DECODE_APART_FROM: usize = 8192;
/// Rows handed from the reader to the decoder at a time.
const BATCH: usize = 512;

/// Rows copied out of the tables for the decoder, into one buffer.
struct Batch {
    bytes: Vec<u8>,
    rows: Vec<Copied>,
}

/// Where a row's key and values sit in its batch's buffer.
struct Copied {
    key: Range<usize>,
    value: Range<usize>,
    flow: Option<Range<usize>>,
}

impl Batch {
    fn new() -> Self {
        Self { bytes: Vec::with_capacity(BATCH * 256), rows: Vec::with_capacity(BATCH) }
    }

    fn push(&mut self, key: &str, value: &[u8], flow: Option<&[u8]>) {
        let mut copy = |v: &[u8]| {
            self.bytes.extend_from_slice(v);
            self.bytes.len() - v.len()..self.bytes.len()
        };
        let (key, value, flow) = (copy(key.as_bytes()), copy(value), flow.map(&mut copy));
        self.rows.push(Copied { key, value, flow });
    }

    /// Each row as [`walk`] gave it.
    fn rows(&self) -> impl Iterator<Item = (&str, &[u8], Option<&[u8]>)> {
        self.rows.iter().map(|r| {
            let key = std::str::from_utf8(&self.bytes[r.key.clone()]).expect("copied from a str");
            (key, &self.bytes[r.value.clone()], r.flow.clone().map(|f| &self.bytes[f]))
        })
    }
}

impl Store {
    /// Every stored connection, with its pending flow, in key order.
    pub fn load_all(&self) -> Result<Vec<Stored>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let tables = (txn.open_table(CONNECTIONS).map_err(db)?, txn.open_table(FLOWS).map_err(db)?);
        let total = tables.0.len().map_err(db)? as usize;
        let mut out = Vec::with_capacity(total);
        if total < DECODE_APART_FROM {
            walk(&tables, |key, value, flow| {
                out.push(self.decode(key, value, flow)?);
                Ok(true)
            })?;
            return Ok(out);
        }
        // Walking the tables (redb's page reads) is about half the work and decoding the rest, so
        // a large store's rows are copied out in batches by another thread while this one
        // decodes them. This one is the caller's: what it decodes is kept, on the caller's heap.
        std::thread::scope(|scope| {
            let (batches, decoder_gets) = mpsc::sync_channel::<Batch>(8);
            let tables = &tables;
            let reader = std::thread::Builder::new()
                .name("authkeeper-read".into())
                .spawn_scoped(scope, move || {
                    let mut batch = Batch::new();
                    walk(tables, |key, value, flow| {
                        batch.push(key, value, flow);
                        // Stopped once the decoder has (on an error, which it returns).
                        Ok(batch.rows.len() < BATCH
                            || batches.send(std::mem::replace(&mut batch, Batch::new())).is_ok())
                    })?;
                    let _ = batches.send(batch);
                    Ok(())
                })
                .map_err(|e| StoreError::Backend(Box::new(e)))?;
            let decoded = (|| {
                for batch in decoder_gets {
                    for (key, value, flow) in batch.rows() {
                        out.push(self.decode(key, value, flow)?);
                    }
                }
                Ok(())
            })();
            let read = reader.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            read.and(decoded).map(|()| out)
        })
    }

    /// One connection from its row's value and its flow's, if it has one.
    fn decode(&self, key: &str, value: &[u8], flow: Option<&[u8]>) -> Result<Stored, StoreError> {
        let corrupt = |source| StoreError::Corrupt { key: key.to_owned(), source };
        let flow = match flow {
            Some(f) => Some(records::decode_flow(&self.open_row(FLOWS, key, f)?).map_err(corrupt)?),
            None => None,
        };
        let (_, record) = HistoryRef::split(key, value)?;
        let value = self.open_row(CONNECTIONS, key, record)?;
        let machine = records::decode_connection(key, &value, flow).map_err(corrupt)?;
        Ok(Stored { key: machine.key().clone(), machine: machine.into() })
    }
}
