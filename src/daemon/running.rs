//! A started daemon, and stopping it in order.

use super::Shared;
use anyhow::Context;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::info;

/// A started daemon: the socket answers and every connection's actor runs.
pub struct Running {
    pub socket: PathBuf,
    pub(super) stop: watch::Sender<bool>,
    pub(super) server: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The web listener, when configured.
    pub(super) web: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    pub(super) owner: tokio::task::JoinHandle<()>,
    pub(super) scheduler: tokio::task::JoinHandle<()>,
    /// The hooks task, and what tells it to hand on the last events and end.
    pub(super) hooks: tokio::task::JoinHandle<()>,
    pub(super) drain_hooks: watch::Sender<bool>,
    pub(super) commit_thread: std::thread::JoinHandle<()>,
    pub(super) shared: Arc<Shared>,
}

impl Running {
    /// The state the socket's handlers share: what [`crate::api::router`] and [`crate::web::app`] are
    /// built on. For harnesses that drive the routers in-process (the fuzz targets).
    #[doc(hidden)]
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Stop in order: the socket stops answering, the config owner and actors finish their
    /// current step, the commit thread drains, then the socket file is removed.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let served = self.server.await;
        if let Some(web) = self.web
            && let Ok(Err(e)) = web.await
        {
            tracing::warn!(error = %e, "the web listener failed");
        }
        let _ = self.owner.await;
        let _ = self.scheduler.await;
        self.shared.actors.close();
        self.shared.actors.wait().await;
        // Every transition is published by now: the hooks save their deliveries, then end.
        let _ = self.drain_hooks.send(true);
        let _ = self.hooks.await;
        self.shared.conns.write().unwrap().clear();
        let Running { commit_thread, shared, .. } = self;
        let leases = shared.leases.clone();
        drop(shared);
        tokio::task::spawn_blocking(move || commit_thread.join()).await.ok();
        // Every change is committed: the other daemons may take the connections over now.
        if let Some(leases) = leases {
            tokio::task::spawn_blocking(move || leases.leave()).await.ok();
        }
        info!("authkeeper stopped");
        served.context("the socket server panicked")?.context("the socket server failed")?;
        Ok(())
    }
}
