//! Reading every connection at start-up: the connections table with its settings and flows
//! walked alongside, by two threads from both ends when the store is large.

use super::{CONNECTIONS, FLOWS, SETTINGS, Store, StoreError, Stored, db, declared_digest};
use crate::history::HistoryRef;
use crate::records;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
use std::cmp::Ordering;
use std::sync::atomic::{self, AtomicU64};

type Row<'a> = Result<(redb::AccessGuard<'a, &'static str>, redb::AccessGuard<'a, &'static [u8]>), redb::StorageError>;

/// The row `rows` holds for `key`, passing the rows before it: `rows` and the keys asked for
/// are both in key order, `passed` being how a passed key compares to the next one asked for
/// (`Less` walking forward, `Greater` walking back).
fn row_for<'a>(
    rows: &mut std::iter::Peekable<impl Iterator<Item = Row<'a>>>,
    key: &str,
    passed: Ordering,
) -> Result<Option<redb::AccessGuard<'a, &'static [u8]>>, StoreError> {
    loop {
        let order = match rows.peek() {
            None => return Ok(None),
            Some(Ok((k, _))) => k.value().cmp(key),
            Some(Err(_)) => passed, // taken below, to return its error
        };
        if order != passed && order != Ordering::Equal {
            return Ok(None);
        }
        let (_, v) = rows.next().expect("peeked").map_err(db)?;
        if order == Ordering::Equal {
            return Ok(Some(v));
        }
    }
}

/// Rows of a store of this many connections or more are read by two threads, one from each
/// end of the tables.
const LOAD_APART_FROM: u64 = 8192;
/// Rows a thread claims at a time, before reading them: together the two read each row once.
const CLAIM: u64 = 512;

impl Store {
    /// Every stored connection, with its pending flow and declared settings.
    pub fn load_all(&self) -> Result<Vec<Stored>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let tables = [CONNECTIONS, SETTINGS, FLOWS].map(|t| txn.open_table(t));
        let [conns, settings, flows] = tables.map(|t| t.map_err(db));
        let (conns, settings, flows) = (conns?, settings?, flows?);
        let total = conns.len().map_err(db)?;
        let claimed = AtomicU64::new(0);
        // Decoding is most of the work, so a large store is read from both ends at once; each
        // end claims rows as it goes, so the two never read the same row.
        let walk = |back: bool| -> Result<Vec<Stored>, StoreError> {
            let (c, s, f) = (conns.iter().map_err(db)?, settings.iter().map_err(db)?, flows.iter().map_err(db)?);
            match back {
                false => self.load_rows(c, s, f, Ordering::Less, &claimed, total),
                true => self.load_rows(c.rev(), s.rev(), f.rev(), Ordering::Greater, &claimed, total),
            }
        };
        if total < LOAD_APART_FROM {
            return walk(false);
        }
        let (front, back) = std::thread::scope(|scope| {
            let back = std::thread::Builder::new()
                .name("authkeeper-load".into())
                .spawn_scoped(scope, || walk(true))
                .expect("a thread to read the store");
            (walk(false), back.join().expect("the store's reader does not panic"))
        });
        let mut out = front?;
        out.extend(back?.into_iter().rev());
        Ok(out)
    }

    /// The connections of rows `conns` yields (with their settings' digest and their flow,
    /// walked alongside), as many as this walk claims of `total`.
    fn load_rows<'a>(
        &self,
        mut conns: impl Iterator<Item = Row<'a>>,
        settings: impl Iterator<Item = Row<'a>>,
        flows: impl Iterator<Item = Row<'a>>,
        passed: Ordering,
        claimed: &AtomicU64,
        total: u64,
    ) -> Result<Vec<Stored>, StoreError> {
        let (mut settings, mut flows) = (settings.peekable(), flows.peekable());
        let mut out = Vec::with_capacity(total as usize);
        loop {
            let first = claimed.fetch_add(CLAIM, atomic::Ordering::Relaxed);
            if first >= total {
                return Ok(out);
            }
            for row in conns.by_ref().take(CLAIM.min(total - first) as usize) {
                let (key, value) = row.map_err(db)?;
                let key = key.value();
                let declared = match row_for(&mut settings, key, passed)? {
                    Some(v) => Some(declared_digest(&self.open_row(SETTINGS, key, v.value())?)),
                    None => None,
                };
                let corrupt = |source| StoreError::Corrupt { key: key.to_owned(), source };
                let flow = match row_for(&mut flows, key, passed)? {
                    Some(f) => Some(records::decode_flow(&self.open_row(FLOWS, key, f.value())?).map_err(corrupt)?),
                    None => None,
                };
                let (_, record) = HistoryRef::split(key, value.value())?;
                let value = self.open_row(CONNECTIONS, key, record)?;
                let machine = records::decode_connection(key, &value, flow).map_err(corrupt)?;
                out.push(Stored { machine, settings: declared });
            }
        }
    }
}
