//! Group commit: one thread owns the write side of the store. Every transition waiting when it
//! wakes goes into one durable redb transaction; each sender hears back only after that
//! transaction has committed.

use crate::metrics::Metrics;
use authkeeper_state::{Commit, ConnectionStore, StoreError};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// Most transitions in one transaction.
const MAX_BATCH: usize = 4096;

struct Job {
    commit: Commit,
    done: oneshot::Sender<Result<(), String>>,
}

/// What a commit of a connection another daemon holds (a shared store) answers.
pub const NOT_HOLDER: &str = "another daemon holds this connection's lease: the change was not written";

#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
}

impl Committer {
    /// Start the commit thread. It ends when every `Committer` clone is dropped, after
    /// committing what was queued.
    pub fn spawn(store: Arc<dyn ConnectionStore>, metrics: Arc<Metrics>) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("authkeeper-commit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    while jobs.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
                    let (commits, waiters): (Vec<Commit>, Vec<_>) =
                        jobs.into_iter().map(|j| (j.commit, j.done)).unzip();
                    let started = std::time::Instant::now();
                    let result = store.commit(&commits);
                    metrics.commit(commits.len(), started.elapsed());
                    // A shared store writes what this daemon holds and refuses the rest.
                    let refused: HashSet<String> = match &result {
                        Err(StoreError::NotOwnerOf(keys)) => keys.iter().cloned().collect(),
                        _ => HashSet::new(),
                    };
                    let result = match result {
                        Ok(()) | Err(StoreError::NotOwnerOf(_)) => Ok(()),
                        Err(e) => Err(e.to_string()),
                    };
                    for (commit, done) in commits.iter().zip(waiters) {
                        let refused = !refused.is_empty() && refused.contains(&commit.machine.key().to_string());
                        let _ = done.send(if refused { Err(NOT_HOLDER.to_owned()) } else { result.clone() });
                    }
                }
            })
            .expect("the commit thread starts");
        (Self { tx }, thread)
    }

    /// Commit durably; returns once the transaction holding it has committed.
    pub async fn commit(&self, commit: Commit) -> Result<(), String> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Job { commit, done }).map_err(|_| "the store is closed".to_owned())?;
        wait.await.map_err(|_| "the store is closed".to_owned())?
    }
}
