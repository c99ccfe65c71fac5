//! The webhook outbox: deliveries not yet acknowledged, kept so that a restart loses none.
//! The store knows nothing of webhooks: a row is an opaque id (ordered: the daemon uses
//! time-ordered ids) and the bytes the daemon wants back, sealed when the store has a key (a
//! delivery may carry a one-time login link).

use crate::store::{OUTBOX, Store, StoreError, db};
use redb::Durability;

impl Store {
    /// Add `rows` in one durable transaction; an id already there is replaced.
    pub fn put_outbox(&self, rows: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(db)?;
        txn.set_durability(Durability::Immediate).map_err(db)?;
        {
            let mut table = txn.open_table(OUTBOX).map_err(db)?;
            for (id, bytes) in rows {
                let value = self.seal_row(OUTBOX, id, bytes.clone());
                table.insert(id.as_str(), value.as_slice()).map_err(db)?;
            }
        }
        txn.commit().map_err(db)
    }

    /// Every row, in id order.
    pub fn outbox(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let rows = self.all_rows(OUTBOX)?;
        rows.into_iter().map(|(id, value)| Ok((id.clone(), self.open_row(OUTBOX, &id, &value)?.into_owned()))).collect()
    }

    /// Drop a delivered (or abandoned) row; a missing one is no error.
    pub fn remove_outbox(&self, id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut table = txn.open_table(OUTBOX).map_err(db)?;
            table.remove(id).map_err(db)?;
        }
        txn.commit().map_err(db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_survive_reopening_in_id_order_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let store = Store::open(&path).unwrap();
            assert!(store.outbox().unwrap().is_empty());
            store.put_outbox(&[("b".into(), b"2".to_vec()), ("a".into(), b"1".to_vec())]).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.outbox().unwrap(), vec![("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())]);
        store.remove_outbox("a").unwrap();
        store.remove_outbox("missing").unwrap();
        assert_eq!(store.outbox().unwrap(), vec![("b".into(), b"2".to_vec())]);
    }

    #[test]
    fn with_a_key_rows_are_sealed_on_disk_and_read_back_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let key = crate::SecretsKey::generate();
        {
            let store = Store::open_sealed(&path, Some(crate::Sealer::new(key.clone()))).unwrap();
            store.put_outbox(&[("a".into(), b"login?token=abc.def".to_vec())]).unwrap();
            assert_eq!(store.outbox().unwrap(), vec![("a".into(), b"login?token=abc.def".to_vec())]);
        }
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(9).any(|w| w == b"token=abc"), "the row is sealed on disk");
    }
}
