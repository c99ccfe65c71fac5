//! The demo's six other providers: their emulators, their config, and how the demo plays the
//! user for each (waits for a PIN, follows a browser login, types a key or a password).

use crate::client::{self, Client, connection_path};
use crate::wire::{ConnectReply, ConnectionView};
use anyhow::{Context, bail};
use authkeeper_fixtures::anilist::{AniListEmulator, AniListOptions};
use authkeeper_fixtures::emby::{EmbyEmulator, EmbyOptions};
use authkeeper_fixtures::mdblist::{MdblistEmulator, MdblistOptions};
use authkeeper_fixtures::simkl::{SimklEmulator, SimklOptions};
use authkeeper_fixtures::tautulli::{TautulliEmulator, TautulliOptions};
use authkeeper_fixtures::tmdb::{TmdbEmulator, TmdbOptions};
use serde_json::{Value, json};

/// A free loopback address for the web listener, and its origin.
pub fn free_port() -> anyhow::Result<(String, String)> {
    authkeeper_fixtures::server::free_loopback_port().context("cannot find a free port")
}

pub struct More {
    simkl: SimklEmulator,
    anilist: AniListEmulator,
    tmdb: TmdbEmulator,
    mdblist: MdblistEmulator,
    tautulli: TautulliEmulator,
    emby: EmbyEmulator,
}

impl More {
    pub async fn start(public_url: &str) -> anyhow::Result<Self> {
        let approve = Some(super::APPROVE_AFTER);
        let redirect = Some(format!("{public_url}/oauth/callback/anilist"));
        Ok(Self {
            simkl: SimklEmulator::start(SimklOptions {
                interval: 1,
                auto_approve_after: approve,
                ..Default::default()
            })
            .await?,
            anilist: AniListEmulator::start(AniListOptions { redirect_uri: redirect, ..Default::default() }).await?,
            tmdb: TmdbEmulator::start(TmdbOptions::default()).await?,
            mdblist: MdblistEmulator::start(MdblistOptions::default()).await?,
            tautulli: TautulliEmulator::start(TautulliOptions::default()).await?,
            emby: EmbyEmulator::start(EmbyOptions::default()).await?,
        })
    }

    /// Their blocks and base URLs in the demo's config.
    pub fn configure(&self, config: &mut Value) {
        let (s, a) = (SimklOptions::default(), AniListOptions::default());
        config["simkl"] = json!({"client_id": s.client_id, "client_secret": s.client_secret});
        config["anilist"] = json!({"client_id": a.client_id, "client_secret": a.client_secret});
        config["tmdb_sync"] = json!({});
        config["tautulli"] = json!({"server_url": self.tautulli.server_url()});
        config["emby"] = json!({"server": self.emby.url()});
        let base = &mut config["authkeeper"]["base_url"];
        base["simkl"] = self.simkl.url().into();
        base["anilist"] = self.anilist.url().into();
        base["tmdb"] = self.tmdb.url().into();
        base["mdblist"] = self.mdblist.url().into();
    }

    /// Connect `provider` with `flow`, playing the user; returns the account.
    pub async fn connect(&self, client: &Client, provider: &str, flow: &str) -> anyhow::Result<String> {
        let path = connection_path(provider, "default");
        let view = match flow {
            "oauth_code" | "request_token" => {
                let mut body = json!({"flow": flow});
                if provider == "tmdb" {
                    body["api_key"] = TmdbOptions::default().api_key.into(); // the app's key, given at connect
                }
                let reply: ConnectReply = client.post(&format!("{path}/connect"), Some(body)).await?;
                let url = reply.pending.and_then(|p| p.authorize_url).context("no authorize URL")?;
                // The browser: to the provider's page, which approves and sends it back.
                reqwest::get(&url).await.context("the browser could not follow the login")?;
                client.get::<ConnectionView>(&path).await?
            }
            _ => {
                let body = match provider {
                    "mdblist" => json!({"flow": flow, "api_key": self.mdblist.api_key()}),
                    "tautulli" => json!({"flow": flow, "api_key": self.tautulli.api_key()}),
                    "emby" => {
                        let o = EmbyOptions::default();
                        json!({"flow": flow, "username": o.username, "password": o.password})
                    }
                    _ => json!({"flow": flow}),
                };
                client::connect_and_wait(client, provider, "default", body, false, |_| {}).await?
            }
        };
        match view.account {
            Some(account) => Ok(account),
            None => bail!("{provider}: the connect ended {}, not connected", view.state.as_str()),
        }
    }
}
