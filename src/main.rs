use authkeeper::cli::{Cli, Cmd, LogFormat, StoreCmd};
use authkeeper::clock::SystemClock;
use authkeeper::{daemon, demo, stores};
use clap::Parser;
use std::sync::Arc;
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colour only for a person at a terminal: never in a log file, the journal or a pipe.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The daemon's store and its key: PostgreSQL when a URL is given (`--store`, else the config),
/// else redb in the state directory.
async fn choose_store(
    opts: &mut daemon::Options,
    keys: &authkeeper::secrets_key::KeyArgs,
    given: Option<stores::PgUrl>,
) -> anyhow::Result<()> {
    // The authkeeper block, read once for both.
    let settings = authkeeper::config::Config::settings_only(&opts.paths.config);
    let sealer = keys.sealer(&opts.paths.config, settings.as_ref().unwrap_or(&Default::default()))?;
    let given = given.as_ref().map(|u| u.expose().to_owned());
    match stores::configured(given.as_deref(), &opts.paths.config, settings.as_ref())? {
        Some(settings) => {
            let url = settings.postgres.clone().expect("a PostgreSQL store");
            tracing::info!(store = %url, lease_secs = settings.lease_secs, "using the PostgreSQL store");
            let (store, leases) =
                tokio::task::spawn_blocking(move || stores::open_postgres(&settings, sealer)).await??;
            opts.store = Some(store);
            opts.leases = Some(leases);
        }
        None => opts.secrets = sealer,
    }
    Ok(())
}

/// The exit status of a local command; its error on stderr.
fn report(what: &str, outcome: std::io::Result<()>) -> i32 {
    match outcome {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("authkeeper {what}: {e}");
            1
        }
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Cmd::Daemon { log_format, keys, store } => {
            init_logging(log_format, "info");
            let mut opts = daemon::Options::new(cli.global.paths(), Arc::new(SystemClock));
            let outcome = match choose_store(&mut opts, &keys, store).await {
                Ok(()) => daemon::run(opts, shutdown_signal()).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("{e:#}");
                    1
                }
            }
        }
        Cmd::Keygen { out } => match authkeeper::secrets_key::keygen(out.as_deref()) {
            Ok(id) => {
                eprintln!(
                    "new secrets key {id}{}",
                    out.map(|p| format!(" written to {}", p.display())).unwrap_or_default()
                );
                0
            }
            Err(e) => {
                eprintln!("authkeeper keygen: {e}");
                1
            }
        },
        Cmd::Store(StoreCmd::Copy { from, to }) => {
            let copied =
                tokio::task::spawn_blocking(move || stores::copy(&from, &to, |stage| eprintln!("store copy: {stage}")))
                    .await
                    .expect("the copy does not panic");
            match copied {
                Ok(c) => {
                    println!("copied {} rows from {} to {}, and read them back the same", c.dump.rows(), c.from, c.to);
                    0
                }
                Err(e) => {
                    eprintln!("authkeeper store copy: {e}");
                    1
                }
            }
        }
        Cmd::Doctor { store } => {
            authkeeper::doctor::report(&authkeeper::doctor::run(&cli.global.paths(), store.as_ref()).await)
        }
        Cmd::Completions { shell } => report("completions", authkeeper::cli::print_completions(shell)),
        Cmd::Man { dir } => report("man", authkeeper::cli::print_man(dir.as_deref())),
        Cmd::Demo => {
            init_logging(LogFormat::Text, "warn");
            match demo::run().await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("demo failed: {e:#}");
                    1
                }
            }
        }
        Cmd::Emulate { provider, listen, user, password, api_key, client_id, client_secret } => {
            init_logging(LogFormat::Text, "warn");
            let account = authkeeper_fixtures::Account { user, password, api_key, client_id, client_secret };
            match authkeeper::emulate::run(&provider, listen, account, shutdown_signal()).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("authkeeper emulate: {e:#}");
                    2
                }
            }
        }
        command => authkeeper::cli::run_client(&cli.global, command).await,
    };
    std::process::exit(code);
}
