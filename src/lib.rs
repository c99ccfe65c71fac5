//! authkeeper: keeps connections to media services alive and honest.
//!
//! - [`daemon`]: start-up, one actor per connection, group commit, ordered shutdown.
//! - [`api`]: the control socket's HTTP API; [`wire`]: the types it speaks.
//! - [`socket`]: the private unix listener.
//! - [`providers`]: one protocol adapter per provider, behind one trait and a registry.
//! - [`web`]: the optional web listener (browser logins come back to its callback).
//! - [`config`]: `config.json` in the CrossWatch layout, and path resolution.
//! - [`stores`]: which store a daemon uses (redb, or PostgreSQL), and `store copy`.
//! - [`clock`]: the injected clock; [`metrics`]: the Prometheus metrics behind `GET /metrics`.
//! - [`client`]: the CLI's socket client; [`cli`]: the command line; [`demo`]: the offline demo.
//!
//! The machine and the store live in the `authkeeper-state` crate.

pub mod api;
pub mod cli;
pub mod cli_input;
pub mod client;
pub mod clock;
pub mod config;
pub mod config_diff;
pub mod config_edit;
mod config_unique;
pub mod cw_crypt;
pub mod daemon;
pub mod demo;
pub mod doctor;
pub mod emulate;
pub mod hooks;
pub mod insecure;
pub mod limits;
pub mod links;
pub mod metrics;
pub mod providers;
pub mod secrets_key;
pub mod serve;
pub mod socket;
pub mod stores;
pub mod terminal;
pub mod web;
pub mod wire;
