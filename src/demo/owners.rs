//! The demo's multi-user scene: a chat bot's two users link their own Jellyfin accounts through
//! one-time links; a token call for each is refused before and answered after.

use crate::client::{Client, ClientError};
use crate::wire::WireEvent;
use anyhow::{Context, bail};
use authkeeper_fixtures::JellyfinEmulator;
use serde_json::{Value, json};

/// Play both users: ask for a link, open it in a "browser", wait for the emulator's approval.
pub async fn run(client: &Client, jellyfin: &JellyfinEmulator) -> anyhow::Result<()> {
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let mut events = client.events().await?;
    for owner in ["discord:1001", "discord:1002"] {
        let path = format!("/v1/connections/jellyfin/{owner}/token");
        match client.get::<Value>(&path).await {
            Err(ClientError::Api { status, body, .. }) => {
                println!("   {owner}: token → {status} {}", body["message"].as_str().unwrap_or_default());
            }
            other => bail!("{owner} should not have a token yet: {other:?}"),
        }
        let link: Value = client.post("/v1/links", Some(json!({"provider": "jellyfin", "owner": owner}))).await?;
        let url = link["url"].as_str().context("no link url")?;
        let shown = url.split("token=").next().unwrap_or_default();
        println!("   {owner}: the bot sends a one-time link ({shown}token=…, secret elided here)");
        // The user's browser: the link's page, its button (the link becomes a session
        // cookie), then the login page.
        let page = browser.get(url).send().await?.text().await?;
        let token = page.split("name=\"token\" value=\"").nth(1).and_then(|s| s.split('"').next());
        let origin = url.split("/login").next().unwrap_or_default();
        let form = [("token", token.context("no button on the link's page")?)];
        let opened = browser.post(format!("{origin}/login/open")).form(&form).send().await?;
        let cookie = opened.headers().get("set-cookie").and_then(|c| c.to_str().ok()).context("no session")?;
        let cookie = cookie.split(';').next().unwrap_or_default().to_owned();
        let login = url.split("?token=").next().unwrap_or_default();
        let page = browser.get(login).header("cookie", &cookie).send().await?.text().await?;
        let code = page.split("<strong>").nth(1).and_then(|s| s.split('<').next()).context("no code on the page")?;
        println!("   {owner}: the page shows Quick Connect code {code}; the user approves it in Jellyfin");
        // (The demo's emulator also approves by itself after a few seconds.)
        jellyfin.approve(code);
        loop {
            match events.next().await {
                Some(Ok(WireEvent::Linked { owner: o, .. })) if o == owner => break,
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the daemon stopped"),
            }
        }
        let token: Value = client.get(&path).await?;
        let shown = token["access_token"].as_str().map_or(0, str::len);
        println!("   {owner}: linked; token → 200 ({shown}-character token, elided)");
    }
    Ok(())
}
