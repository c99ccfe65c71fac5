//! Several daemons on one store: membership, per-connection leases, and what changed.
//!
//! A daemon joins as a member with a lease of `lease` seconds on the database's clock, and
//! renews it well before it lapses. A connection's lease row names the member that may call
//! its provider and write its changes (the holder). A lease whose holder is no longer a live
//! member is free: any member may take it. Member ids are new for every join and never reused,
//! so a holder's id is a fencing token: a daemon that was paused past its lease finds, when it
//! wakes, that its writes are refused (see `conns::commit`), and that it is no member any more.
//!
//! Every write of a connection takes the next value of `authkeeper.versions`, and a member's
//! commits `NOTIFY authkeeper_commits`: the others read the connections written since the
//! version they last saw, and the history rows since the sequence they last saw. Members'
//! commits take a transaction lock before they number anything, so versions and sequences are
//! committed in order: a reader that has seen one has seen every one before it.

use crate::conns::Batch;
use crate::{Answer, Inner, PgStore, pool, sql};
use authkeeper_state::sealed_store::open_value;
use authkeeper_state::store::parse_key;
use authkeeper_state::{ConnKey, Machine, StoreError, Transition, records};
use std::collections::HashSet;
use std::time::Duration;

/// The transaction lock members' commits take before numbering rows (the claim's key + 1).
pub(crate) const ORDER_LOCK: i64 = 0x6175_7468_6b65_6570 + 2;

/// What other members changed since a point.
pub struct Changes {
    /// Connections written since, with their current machine (flow included).
    pub connections: Vec<Machine>,
    /// The highest connection version seen (the next call's `since`).
    pub version: i64,
    /// History rows other members appended since, oldest first.
    pub transitions: Vec<(ConnKey, Transition)>,
    /// The highest history sequence seen.
    pub seq: i64,
}

/// Within a commit's transaction: the batch cut to the connections whose lease `me` holds
/// (taking the lease of any connection that has none yet), and the keys refused. The leases
/// read stay locked until the transaction ends.
pub(crate) async fn held_in(
    tx: &deadpool_postgres::Transaction<'_>,
    me: &str,
    b: Batch,
) -> Answer<(Batch, Vec<String>)> {
    let keys = b.keys();
    tx.execute(
        "INSERT INTO authkeeper.leases (key, holder) SELECT k, $2 FROM UNNEST($1::text[]) AS k
         ON CONFLICT (key) DO NOTHING",
        &[&keys, &me],
    )
    .await
    .map_err(sql)?;
    let rows = tx
        .query("SELECT key FROM authkeeper.leases WHERE key = ANY($1) AND holder = $2 FOR SHARE", &[&keys, &me])
        .await
        .map_err(sql)?;
    let held: HashSet<String> = rows.into_iter().map(|r| r.get(0)).collect();
    let refused: Vec<String> = keys.iter().filter(|k| !held.contains(*k)).cloned().collect();
    if refused.is_empty() {
        return Ok((b, refused));
    }
    Ok((b.without(&refused.iter().cloned().collect()), refused))
}

fn seconds(lease: Duration) -> f64 {
    lease.as_secs_f64()
}

impl PgStore {
    /// Join as a new member whose lease lasts `lease`; returns its id. From now on this store's
    /// commits are fenced by the leases it holds.
    pub fn join(&self, lease: Duration) -> Result<String, StoreError> {
        let id = self.block(move |inner| async move {
            let client = inner.pool.get().await.map_err(pool)?;
            let row = client
                .query_one(
                    "INSERT INTO authkeeper.members (id, expires_at)
                     VALUES (gen_random_uuid()::text, now() + make_interval(secs => $1)) RETURNING id",
                    &[&seconds(lease)],
                )
                .await
                .map_err(sql)?;
            Ok(row.get::<_, String>(0))
        })?;
        *self.inner.member.lock().expect("not poisoned") = Some(id.clone());
        Ok(id)
    }

    /// Renew this member's lease; false when it had lapsed (its leases may have passed to
    /// others: it is no member any more and must act on nothing).
    pub fn renew(&self, lease: Duration) -> Result<bool, StoreError> {
        let Some(me) = self.inner.member() else { return Ok(false) };
        self.block(move |inner| async move {
            let client = inner.pool.get().await.map_err(pool)?;
            let renewed = client
                .execute(
                    "UPDATE authkeeper.members SET expires_at = now() + make_interval(secs => $2)
                     WHERE id = $1 AND expires_at > now()",
                    &[&me, &seconds(lease)],
                )
                .await
                .map_err(sql)?;
            Ok(renewed == 1)
        })
    }

    /// The live members, in id order.
    pub fn members(&self) -> Result<Vec<String>, StoreError> {
        self.block(|inner| async move {
            let client = inner.pool.get().await.map_err(pool)?;
            let rows = client
                .query("SELECT id FROM authkeeper.members WHERE expires_at > now() ORDER BY id", &[])
                .await
                .map_err(sql)?;
            Ok(rows.into_iter().map(|r| r.get(0)).collect())
        })
    }

    /// Take the leases of `keys` that are free (no holder, or one that is no live member, and
    /// not let go for another live member that asked for it) or already this member's; returns
    /// the keys now held, each with its connection as stored (`None` when it has no row yet),
    /// read after the lease was taken.
    pub fn acquire(&self, keys: &[String]) -> Result<Vec<(String, Option<Machine>)>, StoreError> {
        self.take_leases(keys, true)
    }

    /// [`PgStore::acquire`] without reading the connections (start-up, which has just loaded
    /// them): the keys now held.
    pub fn acquire_only(&self, keys: &[String]) -> Result<Vec<String>, StoreError> {
        Ok(self.take_leases(keys, false)?.into_iter().map(|(k, _)| k).collect())
    }

    fn take_leases(&self, keys: &[String], read: bool) -> Result<Vec<(String, Option<Machine>)>, StoreError> {
        let me = self.inner.member().ok_or(StoreError::NotOwner)?;
        let keys = keys.to_vec();
        self.block(move |inner| async move {
            let mut client = inner.pool.get().await.map_err(pool)?;
            let tx = client.transaction().await.map_err(sql)?;
            let rows = tx
                .query(
                    "INSERT INTO authkeeper.leases AS l (key, holder) SELECT k, $2 FROM UNNEST($1::text[]) AS k
                     ON CONFLICT (key) DO UPDATE SET holder = $2, wanted_by = NULL
                     WHERE (l.holder IS NULL OR l.holder = $2 OR NOT EXISTS (
                         SELECT 1 FROM authkeeper.members m WHERE m.id = l.holder AND m.expires_at > now()))
                     -- a lease let go for another live member is that member's to take
                     AND (l.wanted_by IS NULL OR l.wanted_by = $2 OR NOT EXISTS (
                         SELECT 1 FROM authkeeper.members m WHERE m.id = l.wanted_by AND m.expires_at > now()))
                     RETURNING key",
                    &[&keys, &me],
                )
                .await
                .map_err(sql)?;
            let taken: Vec<String> = rows.into_iter().map(|r| r.get(0)).collect();
            let machines = match read {
                true => read_machines(&inner, &tx, &taken).await?,
                false => taken.into_iter().map(|k| (k, None)).collect(),
            };
            tx.commit().await.map_err(sql)?;
            Ok(machines)
        })
    }

    /// Give up the leases of `keys` this member holds.
    pub fn release(&self, keys: &[String]) -> Result<(), StoreError> {
        let me = self.inner.member().ok_or(StoreError::NotOwner)?;
        let keys = keys.to_vec();
        self.block(move |inner| async move {
            let client = inner.pool.get().await.map_err(pool)?;
            client
                .execute(
                    "UPDATE authkeeper.leases SET holder = NULL WHERE key = ANY($1) AND holder = $2",
                    &[&keys, &me],
                )
                .await
                .map_err(sql)?;
            client.execute("SELECT pg_notify('authkeeper_leases', 'released')", &[]).await.map_err(sql)?;
            Ok(())
        })
    }

    /// Ask the holder of `key` to give it up (for a user's command here): it releases the lease
    /// once the connection is idle.
    pub fn want(&self, key: &str) -> Result<(), StoreError> {
        self.ask_for(key, true)
    }

    /// Set (or, with `ask` false, take back) this member's request for `key`'s lease; a
    /// request is announced to the holder.
    fn ask_for(&self, key: &str, ask: bool) -> Result<(), StoreError> {
        let me = self.inner.member().ok_or(StoreError::NotOwner)?;
        let key = key.to_owned();
        self.block(move |inner| async move {
            let client = inner.pool.get().await.map_err(pool)?;
            let statement = match ask {
                true => "UPDATE authkeeper.leases SET wanted_by = $2 WHERE key = $1 AND holder IS DISTINCT FROM $2",
                false => "UPDATE authkeeper.leases SET wanted_by = NULL WHERE key = $1 AND wanted_by = $2",
            };
            client.execute(statement, &[&key, &me]).await.map_err(sql)?;
            if ask {
                client.execute("SELECT pg_notify('authkeeper_leases', 'wanted')", &[]).await.map_err(sql)?;
            }
            Ok(())
        })
    }

    /// The keys this member holds that another member asked for.
    pub fn wanted(&self) -> Result<Vec<String>, StoreError> {
        self.held_where("AND wanted_by IS NOT NULL")
    }

    /// The keys whose lease this member holds.
    pub fn held(&self) -> Result<Vec<String>, StoreError> {
        self.held_where("")
    }

    fn held_where(&self, condition: &'static str) -> Result<Vec<String>, StoreError> {
        let me = self.inner.member().ok_or(StoreError::NotOwner)?;
        self.block(move |inner| async move {
            let client = inner.pool.get().await.map_err(pool)?;
            let statement = format!("SELECT key FROM authkeeper.leases WHERE holder = $1 {condition} ORDER BY key");
            let rows = client.query(&statement, &[&me]).await.map_err(sql)?;
            Ok(rows.into_iter().map(|r| r.get(0)).collect())
        })
    }

    /// Leave: give up every lease and the membership (a clean shutdown), so that the others
    /// take the connections over at once instead of after the lease.
    pub fn leave(&self) -> Result<(), StoreError> {
        let Some(me) = self.inner.member.lock().expect("not poisoned").take() else { return Ok(()) };
        self.block(move |inner| async move {
            let client = inner.pool.get().await.map_err(pool)?;
            client
                .execute("UPDATE authkeeper.leases SET holder = NULL WHERE holder = $1", &[&me])
                .await
                .map_err(sql)?;
            client.execute("DELETE FROM authkeeper.members WHERE id = $1", &[&me]).await.map_err(sql)?;
            client.execute("SELECT pg_notify('authkeeper_leases', 'released')", &[]).await.map_err(sql)?;
            Ok(())
        })
    }

    /// What changed since connection version `version` and history sequence `seq`; history
    /// rows this member wrote are left out (it published them itself).
    pub fn changes(&self, version: i64, seq: i64) -> Result<Changes, StoreError> {
        let me = self.inner.member();
        self.block(move |inner| async move {
            let client = inner.pool.get().await.map_err(pool)?;
            let rows = client
                .query(
                    "SELECT key, version FROM authkeeper.connections WHERE version > $1 ORDER BY version",
                    &[&version],
                )
                .await
                .map_err(sql)?;
            let last = rows.last().map_or(version, |r| r.get(1));
            let keys: Vec<String> = rows.into_iter().map(|r| r.get(0)).collect();
            let connections = read_machines(&inner, &client, &keys).await?.into_iter().filter_map(|(_, m)| m).collect();
            // Every row since, this member's too: the position moves past them all.
            let rows = client
                .query(
                    "SELECT seq, key, record, origin IS NOT DISTINCT FROM $2 FROM authkeeper.history
                     WHERE seq > $1 ORDER BY seq",
                    &[&seq, &me],
                )
                .await
                .map_err(sql)?;
            let newest = rows.last().map_or(seq, |r| r.get(0));
            let mut transitions = Vec::with_capacity(rows.len());
            for row in rows.iter().filter(|r| !r.get::<_, bool>(3)) {
                let key: &str = row.get(1);
                let t = records::decode_transition(row.get(2))
                    .map_err(|source| StoreError::Corrupt { key: key.to_owned(), source })?;
                transitions.push((parse_key(key), t));
            }
            Ok(Changes { connections, version: last, transitions, seq: newest })
        })
    }

    /// A receiver told of every `NOTIFY` on `authkeeper_commits` and `authkeeper_leases`, as
    /// `channel/payload` (`authkeeper_leases/released`, `authkeeper_leases/wanted`), on a
    /// connection of its own; it ends when that connection does.
    pub fn notifications(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<String>, StoreError> {
        self.block(|inner| async move {
            let (client, mut connection) = inner.config.connect(inner.tls.clone()).await.map_err(sql)?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(Ok(message)) = futures_util::StreamExt::next(&mut messages).await {
                    if let tokio_postgres::AsyncMessage::Notification(n) = message
                        && tx.send(format!("{}/{}", n.channel(), n.payload())).is_err()
                    {
                        break;
                    }
                }
            });
            client.batch_execute("LISTEN authkeeper_commits; LISTEN authkeeper_leases").await.map_err(sql)?;
            // The connection lives as long as its client: keep it with the listener.
            inner.listeners.lock().expect("not poisoned").push(client);
            Ok(rx)
        })
    }
}

/// The stored machines (flows included) of `keys`, in that order; `None` for a key without a
/// connection row.
async fn read_machines(
    inner: &Inner,
    client: &impl deadpool_postgres::GenericClient,
    keys: &[String],
) -> Answer<Vec<(String, Option<Machine>)>> {
    let rows = client
        .query(
            "SELECT k, c.record, f.value FROM UNNEST($1::text[]) WITH ORDINALITY AS u(k, n)
             LEFT JOIN authkeeper.connections c ON c.key = u.k
             LEFT JOIN authkeeper.flows f ON f.key = u.k ORDER BY u.n",
            &[&keys],
        )
        .await
        .map_err(sql)?;
    let sealer = inner.sealer.as_deref();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let key: String = row.get(0);
        let corrupt = |source| StoreError::Corrupt { key: key.clone(), source };
        let machine = match row.get::<_, Option<&[u8]>>(1) {
            None => None,
            Some(record) => {
                let flow = match row.get::<_, Option<&[u8]>>(2) {
                    Some(f) => Some(records::decode_flow(&open_value(sealer, "flows", &key, f)?).map_err(corrupt)?),
                    None => None,
                };
                let record = open_value(sealer, "connections", &key, record)?;
                Some(records::decode_connection(&key, &record, flow).map_err(corrupt)?)
            }
        };
        out.push((key, machine));
    }
    Ok(out)
}

impl PgStore {
    /// Where the store is now: the newest connection version and history sequence (read
    /// before loading, so that [`PgStore::changes`] from here misses nothing).
    pub fn position(&self) -> Result<(i64, i64), StoreError> {
        self.block(|inner| async move {
            let client = inner.pool.get().await.map_err(pool)?;
            let row = client
                .query_one(
                    "SELECT (SELECT coalesce(max(version), 0) FROM authkeeper.connections),
                            (SELECT coalesce(max(seq), 0) FROM authkeeper.history)",
                    &[],
                )
                .await
                .map_err(sql)?;
            Ok((row.get(0), row.get(1)))
        })
    }
}

impl PgStore {
    /// Connections whose lease is free: none yet, no holder, or a holder that is no live member;
    /// each with whether this member asked for it (it is then this member's to take).
    pub fn free(&self) -> Result<Vec<(String, bool)>, StoreError> {
        let me = self.inner.member();
        self.block(move |inner| async move {
            let client = inner.pool.get().await.map_err(pool)?;
            let rows = client
                .query(
                    "SELECT c.key, l.wanted_by IS NOT DISTINCT FROM $1 AND l.wanted_by IS NOT NULL
                     FROM authkeeper.connections c LEFT JOIN authkeeper.leases l ON l.key = c.key
                     WHERE l.holder IS NULL OR NOT EXISTS (
                         SELECT 1 FROM authkeeper.members m WHERE m.id = l.holder AND m.expires_at > now())",
                    &[&me],
                )
                .await
                .map_err(sql)?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    /// Take back a request for `key`'s lease (the command that wanted it gave up waiting).
    pub fn unwant(&self, key: &str) -> Result<(), StoreError> {
        self.ask_for(key, false)
    }
}
