//! The command line: `authkeeper daemon` runs the daemon; every other subcommand is a client
//! of its socket.

use crate::client::{self, Client, ClientError, connection_path};
use crate::config::Paths;
use crate::wire::{ConnectionView, WireEvent};
use authkeeper_state::{StateName, Transition};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "authkeeper",
    version,
    about = "Keeps connections to media services (Trakt, Plex, Jellyfin, …) alive and honest",
    long_about = "authkeeper runs as a daemon (`authkeeper daemon`) that owns every provider login: it \
                  runs connect flows, refreshes tokens ahead of expiry, validates them, and hands live \
                  tokens to any consumer over a local socket. Every other subcommand talks to that socket.",
    after_help = "Try `authkeeper demo` for an offline walk-through against a bundled Trakt emulator.\n\
                  Exit status: 0 on success, 1 when the daemon refuses or is unreachable, 2 on bad usage."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Args, Debug)]
pub struct Global {
    /// config.json in the CrossWatch layout [default: $XDG_CONFIG_HOME/authkeeper/config.json]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the database lives [default: $XDG_STATE_HOME/authkeeper]
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The control socket [default: the config's authkeeper.socket, else
    /// $XDG_RUNTIME_DIR/authkeeper/authkeeper.sock, else STATE_DIR/authkeeper.sock]
    #[arg(long, global = true, env = "AUTHKEEPER_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print JSON for scripts instead of text
    #[arg(long, global = true)]
    pub json: bool,
}

impl Global {
    pub fn paths(&self) -> Paths {
        Paths::resolve(self.config.clone(), self.state_dir.clone(), self.socket.clone())
    }
}

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Provider name, e.g. trakt (see `authkeeper providers`)
    pub provider: String,
    /// Profile id, e.g. TRAKT-P01
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// An owner's profile instead, e.g. discord:123456 (for bots and other multi-user front ends)
    #[arg(long, conflicts_with = "profile")]
    pub owner: Option<String>,
}

impl Target {
    /// The profile meant: the owner's, when one is named.
    pub fn id(&self) -> &str {
        self.owner.as_deref().unwrap_or(&self.profile)
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// Copy every connection, credential, pending flow, history row, link and queued webhook
    /// from one store into a new or empty one, then read it back to check it. Secrets move as
    /// stored (encrypted ones stay encrypted with their key). Stop the daemon first: a store in
    /// use is refused. Example: `authkeeper store copy --from redb:/var/lib/authkeeper/authkeeper.redb
    /// --to postgresql://authkeeper@db.example.org/authkeeper`
    Copy {
        /// redb:PATH (an existing file) or a postgresql:// URL
        #[arg(long, value_name = "STORE", value_parser = crate::stores::StoreSpec::parse)]
        from: crate::stores::StoreSpec,
        /// redb:PATH (a file that does not exist yet) or a postgresql:// URL of an empty database
        #[arg(long, value_name = "STORE", value_parser = crate::stores::StoreSpec::parse)]
        to: crate::stores::StoreSpec,
    },
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the daemon in the foreground (logs to stderr; stop with Ctrl-C or SIGTERM)
    Daemon {
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        #[command(flatten)]
        keys: crate::secrets_key::KeyArgs,
        /// Keep connections in this PostgreSQL database (postgresql://USER@HOST/DB;
        /// ?sslmode=require for TLS) instead of redb in the state directory. Also the config's
        /// authkeeper.store.postgres
        #[arg(long, env = "AUTHKEEPER_STORE", value_name = "URL", value_parser = crate::stores::PgUrl::parse)]
        store: Option<crate::stores::PgUrl>,
    },
    /// Work on a store while no daemon uses it
    #[command(subcommand)]
    Store(StoreCmd),
    /// Print a shell completion script: `authkeeper completions bash > /etc/bash_completion.d/authkeeper`
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `authkeeper man > authkeeper.1; man ./authkeeper.1`
    Man {
        /// Write authkeeper.1 and a page per subcommand (authkeeper-connect.1, …) into DIR instead
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Check the setup and say what is wrong and what to do: the config (line, column, key),
    /// file modes, the socket, the store, the clock and each provider's reachability. Exits 1
    /// when something is wrong
    Doctor {
        /// Check this PostgreSQL store instead of the one the config names (or redb)
        #[arg(long, env = "AUTHKEEPER_STORE", value_name = "URL", value_parser = crate::stores::PgUrl::parse)]
        store: Option<crate::stores::PgUrl>,
    },
    /// Make a new key for encrypting the secrets in the store (see `daemon --secrets-key-file`)
    Keygen {
        /// Write it to FILE (created with mode 0600; an existing file is never overwritten)
        /// instead of printing it
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Offline demo: a daemon and a Trakt emulator in a temporary directory, a real device
    /// connect that the emulator approves, and a token that refreshes by itself
    Demo,
    /// Run one provider's emulator in the foreground: an offline sandbox that speaks the
    /// provider's protocol on loopback, scriptable under /_emulator
    Emulate {
        /// The provider to emulate, e.g. trakt (an unknown name lists them all)
        provider: String,
        /// Where to listen
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// The account's user name it accepts
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// The account's password it accepts (a made-up one: this is a sandbox)
        #[arg(long, value_name = "PW")]
        password: Option<String>,
        /// The API key it accepts
        #[arg(long, value_name = "KEY")]
        api_key: Option<String>,
        /// The app's client id it accepts
        #[arg(long, value_name = "ID")]
        client_id: Option<String>,
        /// The app's client secret it accepts
        #[arg(long, value_name = "SECRET")]
        client_secret: Option<String>,
    },
    /// Show connections, their states and what is due next
    Status {
        /// Only this provider
        provider: Option<String>,
        /// Only this profile
        #[arg(long)]
        profile: Option<String>,
    },
    /// Connect: prints the code and the URL, then waits for approval with a live countdown
    Connect {
        #[command(flatten)]
        target: Target,
        /// The flow to use (see `authkeeper providers`); the provider's first otherwise
        #[arg(long)]
        flow: Option<String>,
        /// A field the flow needs, e.g. `--field username=sean` (secrets are prompted for with no
        /// echo, or read with --stdin: never from the command line)
        #[arg(long = "field", value_name = "NAME=VALUE")]
        fields: Vec<String>,
        /// Read the flow's fields as one JSON object on standard input, e.g.
        /// `{"username": "sean", "password": "…"}`
        #[arg(long)]
        stdin: bool,
        /// Print what to do and return without waiting for the outcome
        #[arg(long)]
        no_wait: bool,
    },
    /// Cancel a pending connect
    Cancel(Target),
    /// Print the live access token, bare, for `$(authkeeper token trakt)`
    Token(Target),
    /// Make a one-time login link for an owner (--owner discord:123456) or a profile, to send
    /// to the user; it opens on the web listener and lives 10 minutes
    Link(Target),
    /// Disconnect and revoke upstream where the provider allows
    Disconnect(Target),
    /// Refresh the token now and show the outcome
    Refresh(Target),
    /// Validate the credential with the provider now and show the outcome
    Validate(Target),
    /// Show a connection's transitions, oldest first
    History(Target),
    /// Follow the daemon's events, one per line
    Events,
    /// List the providers this build supports and their flows
    Providers,
    /// Add or remove profiles (written to the config file)
    #[command(subcommand)]
    Profiles(ProfilesCmd),
}

#[derive(Subcommand, Debug)]
pub enum ProfilesCmd {
    /// Allocate the next PROVIDER-P## profile and add it to the config file
    Add {
        /// Provider name, e.g. trakt
        provider: String,
    },
    /// Remove a profile from the config file (its connection is disconnected; history is kept)
    Remove {
        /// Provider name, e.g. trakt
        provider: String,
        /// Profile id, e.g. TRAKT-P02
        profile: String,
    },
}

/// Run a client subcommand; returns the process exit status.
pub async fn run_client(global: &Global, command: Cmd) -> i32 {
    let paths = global.paths();
    let client = Client::new(&paths.socket);
    match client_command(&client, global.json, command).await {
        Ok(code) => code,
        Err(e) => {
            if global.json
                && let ClientError::Api { body, .. } = &e
            {
                println!("{body}");
            }
            eprintln!("authkeeper: {e}");
            if matches!(e, ClientError::Usage(_)) { 2 } else { 1 }
        }
    }
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

async fn client_command(client: &Client, json: bool, command: Cmd) -> Result<i32, ClientError> {
    match command {
        Cmd::Daemon { .. }
        | Cmd::Demo
        | Cmd::Emulate { .. }
        | Cmd::Keygen { .. }
        | Cmd::Completions { .. }
        | Cmd::Doctor { .. }
        | Cmd::Store(_)
        | Cmd::Man { .. } => unreachable!("not client commands"),
        Cmd::Status { provider, profile } => {
            let all: Vec<ConnectionView> = client.get("/v1/connections").await?;
            let shown: Vec<_> = all
                .into_iter()
                .filter(|c| provider.as_ref().is_none_or(|p| &c.provider == p))
                .filter(|c| profile.as_ref().is_none_or(|p| &c.profile == p))
                .collect();
            if json {
                print_json(&shown);
            } else {
                print_status(&shown);
            }
            Ok(0)
        }
        Cmd::Connect { target, flow, fields, stdin, no_wait } => {
            let path = connection_path(&target.provider, target.id());
            let body = crate::cli_input::connect_body(client, &target.provider, flow, &fields, stdin).await?;
            if no_wait {
                let reply: Value = client.post(&format!("{path}/connect"), Some(body)).await?;
                if json {
                    print_json(&reply);
                } else if let Some(url) = reply["authorize_url"].as_str() {
                    println!("open {url}");
                } else if let Some(code) = reply["user_code"].as_str() {
                    println!(
                        "open {} and enter {code}",
                        reply["verification_url"].as_str().unwrap_or("the provider's page")
                    );
                } else {
                    println!("{}", reply["connection"]["state"].as_str().unwrap_or("?"));
                }
                return Ok(0);
            }
            let view = client::connect_and_wait(client, &target.provider, target.id(), body, json, |r| {
                if json {
                    println!("{}", serde_json::to_string(r).expect("serializable"));
                }
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string(&view).expect("serializable"));
            } else if view.state == StateName::Connected {
                println!("connected as {}", view.account.as_deref().unwrap_or("(unknown account)"));
            } else {
                println!("not connected: {}", view.state.as_str());
            }
            Ok(if view.state == StateName::Connected { 0 } else { 1 })
        }
        Cmd::Link(t) => {
            let body = match &t.owner {
                Some(owner) => serde_json::json!({"provider": t.provider, "owner": owner}),
                None => serde_json::json!({"provider": t.provider, "profile": t.profile}),
            };
            let link: Value = client.post("/v1/links", Some(body)).await?;
            if json {
                print_json(&link);
            } else {
                println!("{}", link["url"].as_str().unwrap_or_default());
                eprintln!("valid once, until {}", link["expires_at"].as_str().unwrap_or_default());
            }
            Ok(0)
        }
        Cmd::Token(t) => {
            let token: Value = client.get(&format!("{}/token", connection_path(&t.provider, t.id()))).await?;
            if json {
                print_json(&token);
            } else {
                println!("{}", token["access_token"].as_str().unwrap_or_default());
            }
            Ok(0)
        }
        Cmd::Cancel(t) => act(client, json, &t, "cancel").await,
        Cmd::Disconnect(t) => act(client, json, &t, "disconnect").await,
        Cmd::Refresh(t) => act(client, json, &t, "refresh").await,
        Cmd::Validate(t) => act(client, json, &t, "validate").await,
        Cmd::History(t) => {
            let rows: Vec<Transition> =
                client.get(&format!("{}/history", connection_path(&t.provider, t.id()))).await?;
            if json {
                print_json(&rows);
            } else {
                for r in rows {
                    let cause = serde_json::to_value(r.cause).unwrap_or_default();
                    let detail = r.detail.map(|d| format!("  {d}")).unwrap_or_default();
                    println!(
                        "{}  {:<12} → {:<12} {}{detail}",
                        r.at.format("%Y-%m-%d %H:%M:%S"),
                        r.from.as_str(),
                        r.to.as_str(),
                        cause.as_str().unwrap_or_default()
                    );
                }
            }
            Ok(0)
        }
        Cmd::Events => {
            let mut events = client.events().await?;
            while let Some(line) = events.next_line().await {
                let line = line?;
                if json {
                    println!("{line}");
                } else if let Ok(event) = serde_json::from_str::<WireEvent>(&line) {
                    println!("{}", client::describe(&event));
                }
            }
            Ok(0)
        }
        Cmd::Profiles(ProfilesCmd::Add { provider }) => {
            let answer: Value = client.post(&format!("/v1/providers/{provider}/profiles"), None).await?;
            if json {
                print_json(&answer);
            } else {
                println!("{}", answer["profile"].as_str().unwrap_or_default());
            }
            Ok(0)
        }
        Cmd::Profiles(ProfilesCmd::Remove { provider, profile }) => {
            let answer: Value = client.delete(&format!("/v1/providers/{provider}/profiles/{profile}")).await?;
            if json {
                print_json(&answer);
            } else {
                println!("removed {provider}/{profile}");
            }
            Ok(0)
        }
        Cmd::Providers => {
            let providers: Value = client.get("/v1/providers").await?;
            if json {
                print_json(&providers);
            } else {
                print_providers(&providers);
            }
            Ok(0)
        }
    }
}

/// One line per provider: its name, label, flows with the fields each asks for (`*`: secret,
/// asked without echo), and the config keys it needs.
fn print_providers(providers: &Value) {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_owned)).collect()
    };
    println!("{:<10} {:<10} {:<58} CONFIG", "PROVIDER", "LABEL", "FLOWS (fields; * secret)");
    for p in providers.as_array().into_iter().flatten() {
        let flows: Vec<String> = p["flows"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| {
                let secret = strings(&f["secret_fields"]);
                let fields: Vec<String> = strings(&f["fields"])
                    .into_iter()
                    .map(|name| if secret.contains(&name) { format!("{name}*") } else { name })
                    .collect();
                let flow = f["flow"].as_str().unwrap_or_default();
                if fields.is_empty() { flow.to_owned() } else { format!("{flow} ({})", fields.join(", ")) }
            })
            .collect();
        let config = strings(&p["config"]);
        println!(
            "{:<10} {:<10} {:<58} {}",
            p["name"].as_str().unwrap_or_default(),
            p["label"].as_str().unwrap_or_default(),
            flows.join("; "),
            if config.is_empty() { "-".to_owned() } else { config.join(", ") }
        );
    }
}

async fn act(client: &Client, json: bool, t: &Target, action: &str) -> Result<i32, ClientError> {
    let view: ConnectionView = client.post(&format!("{}/{action}", connection_path(&t.provider, t.id())), None).await?;
    if json {
        print_json(&view);
    } else {
        print_status(std::slice::from_ref(&view));
    }
    Ok(0)
}

fn print_status(views: &[ConnectionView]) {
    if views.is_empty() {
        println!("no connections: add a provider block to config.json, or see `authkeeper providers`");
        return;
    }
    let rows: Vec<crate::terminal::Row> = views
        .iter()
        .map(|v| {
            let expires =
                v.expires_at.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string()).unwrap_or_else(|| "-".into());
            let note = match (&v.pending, &v.last_error) {
                (Some(p), _) => match (&p.authorize_url, &p.user_code, &p.verification_url) {
                    (Some(url), _, _) => format!("open {url}"),
                    (None, Some(code), Some(url)) => format!("enter {code} at {url}"),
                    (None, Some(code), None) => format!("enter {code}"),
                    _ => format!("pending ({})", p.flow),
                },
                (None, Some(e)) => {
                    let next =
                        v.next_attempt_at.map(|t| format!("; retry at {}", t.format("%H:%M:%S"))).unwrap_or_default();
                    format!("{e}{next}")
                }
                (None, None) => String::new(),
            };
            let account = v.account.clone().unwrap_or_else(|| "-".into());
            [format!("{}/{}", v.provider, v.profile), v.state.as_str().to_owned(), account, expires, note]
        })
        .collect();
    let table = crate::terminal::table(views, &rows, crate::terminal::colour());
    let _ = emit(table.as_bytes());
}

/// Write `text` to stdout; a reader that went away (`| head`) is not an error.
fn emit(text: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// `authkeeper completions SHELL`: the completion script, generated from this definition.
pub fn print_completions(shell: clap_complete::Shell) -> std::io::Result<()> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "authkeeper", &mut out);
    emit(&out)
}

/// `authkeeper man`: the manual page, generated from this definition; with `dir`, one page per
/// subcommand too (`authkeeper-connect.1`, …), written there.
pub fn print_man(dir: Option<&std::path::Path>) -> std::io::Result<()> {
    let cmd = <Cli as clap::CommandFactory>::command();
    match dir {
        Some(dir) => clap_mangen::generate_to(cmd, dir),
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            emit(&out)
        }
    }
}
