//! The control socket: a unix listener that is private (0600, in a 0700 directory when it makes
//! one), admits only peers with the daemon's uid (or root), detects a running daemon by
//! connecting, and removes its file when dropped.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    uid: u32,
    /// The socket file is ours to remove (not one systemd handed over).
    owned: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another authkeeper is already answering on {0}")]
    AlreadyRunning(PathBuf),
    #[error("cannot use the socket path {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} exists and is not a socket; refusing to replace it (check --socket)")]
    NotASocket(PathBuf),
}

impl ControlSocket {
    pub async fn bind(path: &Path) -> Result<Self, SocketError> {
        let io_err = |source| SocketError::Io { path: path.to_owned(), source };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => return Err(SocketError::NotASocket(path.to_owned())),
            Ok(_) => {
                if UnixStream::connect(path).await.is_ok() {
                    return Err(SocketError::AlreadyRunning(path.to_owned()));
                }
                // A stale socket from a daemon that died without cleaning up.
                std::fs::remove_file(path).map_err(io_err)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err)?;
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        let uid = std::fs::metadata(path).map_err(io_err)?.uid();
        Ok(Self { listener, path: path.to_owned(), uid, owned: true })
    }

    /// The listening socket systemd passed (socket activation: `LISTEN_FDS`, `LISTEN_PID`),
    /// if it passed one. Its file is systemd's: it is neither checked nor removed here.
    pub fn activated(path: &Path) -> Result<Option<Self>, SocketError> {
        let io_err = |source| SocketError::Io { path: path.to_owned(), source };
        let Some(fd) = sd_notify::listen_fds().map_err(io_err)?.next() else { return Ok(None) };
        // SAFETY: systemd passed this descriptor to this process, open and ours alone
        // (LISTEN_PID matched), and nothing else here takes it: listen_fds() yields it once.
        let listener = unsafe { <std::os::unix::net::UnixListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        listener.set_nonblocking(true).map_err(io_err)?;
        let listener = UnixListener::from_std(listener).map_err(io_err)?;
        // Peers are admitted by the daemon's own uid: the activated file may belong to root.
        let uid = std::fs::metadata("/proc/self").map_err(io_err)?.uid();
        let bound = listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_owned));
        Ok(Some(Self { listener, path: bound.unwrap_or_else(|| path.to_owned()), uid, owned: false }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn admits(&self, stream: &UnixStream) -> bool {
        match stream.peer_cred() {
            Ok(cred) => cred.uid() == self.uid || cred.uid() == 0,
            Err(_) => false,
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl axum::serve::Listener for ControlSocket {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) if self.admits(&stream) => return (stream, addr),
                Ok((stream, _)) => {
                    let uid = stream.peer_cred().map(|c| c.uid()).ok();
                    warn!(peer_uid = ?uid, "refused a control-socket peer with another uid");
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}
