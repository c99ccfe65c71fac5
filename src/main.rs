use authkeeper::cli::{Cli, Cmd, LogFormat};
use authkeeper::clock::SystemClock;
use authkeeper::{daemon, demo};
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
        Cmd::Daemon { log_format, keys } => {
            init_logging(log_format, "info");
            let mut opts = daemon::Options::new(cli.global.paths(), Arc::new(SystemClock));
            let outcome = match keys.sealer(&opts.paths.config) {
                Ok(sealer) => {
                    opts.secrets = sealer;
                    daemon::run(opts, shutdown_signal()).await
                }
                Err(e) => Err(e.into()),
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
        Cmd::Doctor => authkeeper::doctor::report(&authkeeper::doctor::run(&cli.global.paths()).await),
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
