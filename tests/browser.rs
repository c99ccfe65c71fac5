//! A real browser: headless Chromium driven over WebDriver (Debian's `chromium` and
//! `chromium-driver`; `.ci/run` installs them). It opens owners' one-time links and links
//! Jellyfin by Quick Connect and by the password form, and sees the pages of a used and an
//! expired link. Screenshots go to `target/tmp/browser/`. Without `chromedriver` on the PATH the
//! tests say so and pass, unless `AUTHKEEPER_REQUIRE_BROWSER=1` (as in CI) demands it.

mod common;

use authkeeper_fixtures::{JellyfinEmulator, JellyfinOptions};
use common::trackers::{free_port, harness};
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};

struct Chrome {
    client: Client,
    _driver: tokio::process::Child,
}

/// chromedriver on a free port, and a headless Chromium session; `None` when not installed.
async fn chrome() -> Option<Chrome> {
    let Ok(path) = which("chromedriver") else {
        assert!(
            std::env::var("AUTHKEEPER_REQUIRE_BROWSER").is_err(),
            "chromedriver is not installed (apt-get install chromium chromium-driver)"
        );
        eprintln!("skipped: chromedriver is not installed; `bash .ci/run` installs it");
        return None;
    };
    let (addr, _) = free_port();
    let port = addr.rsplit(':').next().unwrap().to_owned();
    let mut driver = tokio::process::Command::new(path)
        .arg(format!("--port={port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver starts");
    let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("started successfully") {
                return;
            }
        }
        panic!("chromedriver ended before it was ready");
    })
    .await
    .expect("chromedriver got ready in time");
    let caps = json!({"goog:chromeOptions": {"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
        "--disable-dev-shm-usage", "--window-size=800,700"]}});
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = ClientBuilder::new(connector)
        .capabilities(caps.as_object().unwrap().clone())
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session");
    Some(Chrome { client, _driver: driver })
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

async fn screenshot(c: &Client, name: &str) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), c.screenshot().await.unwrap()).unwrap();
}

/// The page's heading once it says `text` (the login page refreshes itself).
async fn heading(c: &Client, text: &str) {
    let xpath = format!("//h1[contains(., '{text}')]");
    if let Err(e) = c.wait().at_most(std::time::Duration::from_secs(20)).for_element(Locator::XPath(&xpath)).await {
        let (url, page) = (c.current_url().await.unwrap(), c.source().await.unwrap_or_default());
        panic!("no heading {text:?} ({e}) at {url}:\n{page}");
    }
}

async fn setup(extra: Value) -> (Harness, JellyfinEmulator) {
    let jellyfin = JellyfinEmulator::start(JellyfinOptions::default()).await.unwrap();
    let (listen, public_url) = free_port();
    let mut web = json!({"listen": listen, "public_url": public_url});
    for (k, v) in extra.as_object().unwrap() {
        web[k] = v.clone();
    }
    let config = json!({"jellyfin": {"server": jellyfin.url()}, "authkeeper": {"web": web}});
    (harness(config).await, jellyfin)
}

async fn link(h: &Harness, owner: &str) -> String {
    let issued: Value =
        h.client().post("/v1/links", Some(json!({"provider": "jellyfin", "owner": owner}))).await.unwrap();
    issued["url"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_links_jellyfin_by_quick_connect_and_by_password() {
    let Some(chrome) = chrome().await else { return };
    let c = &chrome.client;
    let (h, jellyfin) = setup(json!({})).await;
    let daemon = h.start_daemon().await;

    // Quick Connect: the page shows the code and updates itself once it is approved.
    let url = link(&h, "discord:1").await;
    c.goto(&url).await.unwrap();
    heading(c, "Continue to Jellyfin").await;
    c.find(Locator::Css("button")).await.unwrap().click().await.unwrap();
    heading(c, "Log in to Jellyfin").await;
    assert!(!c.current_url().await.unwrap().as_str().contains("token="), "the token left the address bar");
    let code = c.find(Locator::Css("strong")).await.unwrap().text().await.unwrap();
    screenshot(c, "quick-connect-code").await;
    assert!(jellyfin.approve(&code), "the page shows the code Jellyfin waits for: {code}");
    heading(c, "Linked to Jellyfin").await;
    screenshot(c, "quick-connect-linked").await;
    let token: Value = h.client().get("/v1/connections/jellyfin/discord:1/token").await.unwrap();
    assert!(token["access_token"].is_string());

    // The password form, for a second owner.
    let url = link(&h, "discord:2").await;
    c.goto(&url).await.unwrap();
    c.find(Locator::Css("button")).await.unwrap().click().await.unwrap();
    heading(c, "Log in to Jellyfin").await;
    c.find(Locator::LinkText("Log in with your password instead")).await.unwrap().click().await.unwrap();
    let form = c.form(Locator::Css("form")).await.unwrap();
    form.set_by_name("username", "sean").await.unwrap();
    form.set_by_name("password", &JellyfinOptions::default().password).await.unwrap();
    screenshot(c, "password-form").await;
    form.submit().await.unwrap();
    heading(c, "Linked to Jellyfin").await;
    screenshot(c, "password-linked").await;
    let token: Value = h.client().get("/v1/connections/jellyfin/discord:2/token").await.unwrap();
    assert!(token["access_token"].is_string());

    // The same link again: with its session still in this browser it is the login page…
    c.goto(&url).await.unwrap();
    heading(c, "Linked to Jellyfin").await;
    // …and from any other browser, a used link.
    c.delete_all_cookies().await.unwrap();
    c.goto(&url).await.unwrap();
    heading(c, "Link already used").await;
    screenshot(c, "link-used").await;
    chrome.client.close().await.unwrap();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_sees_an_expired_link_page() {
    let Some(chrome) = chrome().await else { return };
    let c = &chrome.client;
    let (h, _jellyfin) = setup(json!({"link_ttl_secs": 1})).await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let url = link(&h, "discord:9").await;
    // The daemon says when it has expired; then the browser opens it.
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = events.next_line().await {
            if line.unwrap().contains("\"link_expired\"") {
                return;
            }
        }
    })
    .await
    .expect("link_expired in time");
    c.goto(&url).await.unwrap();
    heading(c, "Link expired").await;
    screenshot(c, "link-expired").await;
    chrome.client.close().await.unwrap();
    daemon.stop().await;
}
