//! A throwaway PostgreSQL cluster for tests and benchmarks: `initdb` into a temporary
//! directory, `postgres` listening on a unix socket there only (no TCP port), stopped and
//! deleted when the [`Cluster`] is dropped.
//!
//! The binaries are found on `PATH`, else in Debian's `/usr/lib/postgresql/<version>/bin`.
//! PostgreSQL refuses to run as root: as root, the cluster runs as the `postgres` user (which
//! Debian's package creates), its directory handed to that user.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a cluster could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    #[error(
        "PostgreSQL's {0} was not found on PATH nor in /usr/lib/postgresql/*/bin (Debian: apt-get install postgresql)"
    )]
    NotInstalled(&'static str),
    #[error("running as root needs the postgres user to run PostgreSQL as (Debian's postgresql package makes it)")]
    NoUser,
    #[error("cannot prepare the cluster's directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("{what} failed: {output}")]
    Failed { what: &'static str, output: String },
}

/// A running cluster. The superuser is `authkeeper`, trusted on the socket.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: Option<(u32, u32)>,
}

/// Where PostgreSQL's server binaries are.
pub fn binaries() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
    });
    on_path.or_else(|| {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").is_file())
            .collect();
        versions.sort_by_key(|b| b.parent().and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok()).unwrap_or(0));
        versions.pop()
    })
}

/// The uid and gid of `name`, from /etc/passwd.
fn user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&name) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))?
    })
}

impl Cluster {
    /// A cluster for a test, or `None` (the test then passes, saying it was skipped) when
    /// PostgreSQL is not installed, unless `AUTHKEEPER_REQUIRE_POSTGRES` is set (as in CI): then
    /// its absence fails the test.
    pub fn for_tests() -> Option<Self> {
        if binaries().is_none() && std::env::var_os("AUTHKEEPER_REQUIRE_POSTGRES").is_none() {
            eprintln!("skipped: PostgreSQL is not installed; `bash .ci/run` installs it");
            return None;
        }
        Some(Self::start().unwrap_or_else(|e| panic!("a throwaway PostgreSQL cluster: {e}")))
    }

    /// Create and start a cluster; waits until it accepts connections.
    pub fn start() -> Result<Self, ClusterError> {
        let bin = binaries().ok_or(ClusterError::NotInstalled("initdb"))?;
        let root = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)?;
        let user = match root {
            true => Some(user("postgres").ok_or(ClusterError::NoUser)?),
            false => None,
        };
        let dir = tempfile::Builder::new().prefix("authkeeper-pg-").tempdir()?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let cluster = Self { dir, bin, user };
        let data = cluster.data();
        cluster.run(
            "initdb",
            [
                OsStr::new("-D"),
                data.as_os_str(),
                OsStr::new("-U"),
                OsStr::new("authkeeper"),
                OsStr::new("-A"),
                OsStr::new("trust"),
                OsStr::new("-E"),
                OsStr::new("UTF8"),
                OsStr::new("--no-sync"),
            ],
        )?;
        cluster.resume()?;
        Ok(cluster)
    }

    /// Start the server again after [`Cluster::halt`]; waits until it accepts connections.
    pub fn resume(&self) -> Result<(), ClusterError> {
        let data = self.data();
        let options = format!("-c listen_addresses='' -c unix_socket_directories='{}'", self.dir.path().display());
        let log = self.dir.path().join("server.log");
        let args = [
            OsStr::new("start"),
            OsStr::new("-w"),
            OsStr::new("-D"),
            data.as_os_str(),
            OsStr::new("-l"),
            log.as_os_str(),
            OsStr::new("-o"),
            OsStr::new(&options),
        ];
        self.run("pg_ctl", args).map(drop)
    }

    /// Stop the server at once, as a crash or an outage would (`pg_ctl stop -m immediate`):
    /// every client's connection breaks; the data stays for [`Cluster::resume`].
    pub fn halt(&self) -> Result<(), ClusterError> {
        let data = self.data();
        let args = [
            OsStr::new("stop"),
            OsStr::new("-w"),
            OsStr::new("-m"),
            OsStr::new("immediate"),
            OsStr::new("-D"),
            data.as_os_str(),
        ];
        self.run("pg_ctl", args).map(drop)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The socket's directory.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A URL for database `db` of this cluster.
    pub fn url(&self, db: &str) -> String {
        let host: String = self
            .dir
            .path()
            .to_string_lossy()
            .bytes()
            .map(|b| match b {
                b'/' => "%2F".to_owned(),
                b => char::from(b).to_string(),
            })
            .collect();
        format!("postgresql://authkeeper@{host}/{db}")
    }

    /// Create database `name` and give its URL.
    pub fn database(&self, name: &str) -> Result<String, ClusterError> {
        let host = self.dir.path().as_os_str();
        let args = [OsStr::new("-h"), host, OsStr::new("-U"), OsStr::new("authkeeper"), OsStr::new(name)];
        self.run("createdb", args)?;
        Ok(self.url(name))
    }

    /// Run SQL in database `db` with psql, stopping at the first error.
    pub fn psql(&self, db: &str, sql: &str) -> Result<(), ClusterError> {
        self.query(db, sql).map(drop)
    }

    /// Run SQL in database `db` with psql; its rows, unaligned, one per line.
    pub fn query(&self, db: &str, sql: &str) -> Result<String, ClusterError> {
        let host = self.dir.path().as_os_str();
        let args = [
            OsStr::new("-h"),
            host,
            OsStr::new("-U"),
            OsStr::new("authkeeper"),
            OsStr::new("-d"),
            OsStr::new(db),
            OsStr::new("-v"),
            OsStr::new("ON_ERROR_STOP=1"),
            OsStr::new("-At"),
            OsStr::new("-c"),
            OsStr::new(sql),
        ];
        self.run("psql", args)
    }

    /// Run one of the cluster's binaries, as the cluster's user.
    fn run<'a>(&self, what: &'static str, args: impl IntoIterator<Item = &'a OsStr>) -> Result<String, ClusterError> {
        let program = self.bin.join(what);
        let program = match program.is_file() {
            true => program,
            // A client program may be on PATH only.
            false => PathBuf::from(what),
        };
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::null()).current_dir(self.dir.path());
        if let Some((uid, gid)) = self.user {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
            std::os::unix::process::CommandExt::gid(&mut command, gid);
            command.env("HOME", self.dir.path());
        }
        let output = command.output().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ClusterError::NotInstalled(what),
            _ => ClusterError::Io(e),
        })?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
        if let Ok(log) = std::fs::read_to_string(self.dir.path().join("server.log")) {
            text.push_str(&log);
        }
        Err(ClusterError::Failed { what, output: text })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}
