//! One-time links through the real binary, with a plain HTTP client playing the browser (the
//! cookie carried by hand): an owner links Jellyfin by Quick Connect and by password, a link
//! works once, survives a restart, and 10,000 guessed tokens get nowhere while a real link
//! still opens.

mod common;

use authkeeper_fixtures::{JellyfinEmulator, JellyfinOptions};
use common::trackers::{free_port, harness};
use common::*;
use serde_json::{Value, json};

struct Browser {
    http: reqwest::Client,
    cookie: Option<String>,
}

impl Browser {
    fn new() -> Self {
        authkeeper::providers::install_crypto();
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        Self { http, cookie: None }
    }

    /// GET `url`, keeping a cookie the page sets; (status, body, headers).
    async fn get(&mut self, url: &str) -> (u16, String, reqwest::header::HeaderMap) {
        let mut req = self.http.get(url);
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c);
        }
        let resp = req.send().await.unwrap();
        if let Some(set) = resp.headers().get("set-cookie") {
            self.cookie = Some(set.to_str().unwrap().split(';').next().unwrap().to_owned());
        }
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        (status, resp.text().await.unwrap(), headers)
    }

    /// Open a link as a user does: its page, then the button that uses it. The status of the
    /// button's answer (303 when the link became this browser's session).
    async fn open(&mut self, url: &str) -> u16 {
        let (status, page, _) = self.get(url).await;
        if status != 200 {
            return status;
        }
        let token = page.split("name=\"token\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
        let origin = url.split("/login").next().unwrap().to_owned();
        let mut req = self.http.post(format!("{origin}/login/open")).form(&[("token", token.as_str())]);
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c);
        }
        let resp = req.send().await.unwrap();
        if let Some(set) = resp.headers().get("set-cookie") {
            self.cookie = Some(set.to_str().unwrap().split(';').next().unwrap().to_owned());
        }
        resp.status().as_u16()
    }

    async fn post(&self, url: &str, form: &[(&str, &str)]) -> (u16, String) {
        let mut req = self.http.post(url).form(form);
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }
}

async fn setup() -> (Harness, JellyfinEmulator, String) {
    let jellyfin = JellyfinEmulator::start(JellyfinOptions::default()).await.unwrap();
    let (listen, public_url) = free_port();
    let config = json!({"jellyfin": {"server": jellyfin.url()},
        "authkeeper": {"web": {"listen": listen, "public_url": public_url}}});
    (harness(config).await, jellyfin, public_url)
}

async fn link(h: &Harness, owner: &str) -> String {
    let body = json!({"provider": "jellyfin", "owner": owner});
    let issued: Value = h.client().post("/v1/links", Some(body)).await.unwrap();
    issued["url"].as_str().unwrap().to_owned()
}

/// The next link event on `events`: (type, owner).
async fn link_event(events: &mut authkeeper::client::EventStream) -> (String, String) {
    loop {
        let line = tokio::time::timeout(PATIENCE, events.next_line()).await.unwrap().unwrap().unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        let kind = v["type"].as_str().unwrap_or_default().to_owned();
        if kind.starts_with("link") {
            return (kind, v["owner"].as_str().unwrap_or_default().to_owned());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_links_jellyfin_by_quick_connect_once_and_is_gated_until_then() {
    let (h, jellyfin, public_url) = setup().await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let owner = "discord:123456";
    let token_path = format!("/v1/connections/jellyfin/{owner}/token");

    let url = link(&h, owner).await;
    assert!(url.starts_with(&format!("{public_url}/login?token=")), "{url}");
    let (status, body) = api_error(h.client().get::<Value>(&token_path).await.unwrap_err());
    assert_eq!((status, body["message"].as_str()), (409, Some("Please log in first: /login jellyfin")));

    // Looking at the link (a chat app's preview does) uses nothing up.
    let (status, _, headers) = Browser::new().get(&url).await;
    assert_eq!(status, 200);
    assert!(!headers.contains_key("set-cookie"));
    assert_eq!(headers["x-frame-options"], "DENY");

    // Opened: the token becomes a session cookie, and the browser goes on without it.
    let mut browser = Browser::new();
    assert_eq!(browser.open(&url).await, 303);
    let cookie = browser.cookie.clone().unwrap();
    assert!(cookie.starts_with("authkeeper_login="), "{cookie}");
    assert_eq!(link_event(&mut events).await, ("link_opened".into(), owner.into()));

    // The login page: a Quick Connect code, refreshing by itself.
    let (status, page, headers) = browser.get(&format!("{public_url}/login")).await;
    assert_eq!(status, 200, "{page}");
    assert!(headers["content-security-policy"].to_str().unwrap().contains("default-src 'none'"));
    let code = jellyfin.pending_codes().pop().expect("a Quick Connect request");
    assert!(page.contains(&code) && page.contains("http-equiv=\"refresh\""), "{page}");

    // The same link again: used.
    let (status, page, _) = Browser::new().get(&url).await;
    assert_eq!(status, 410, "{page}");
    assert!(page.contains("already used"));
    assert_eq!(Browser::new().open(&url).await, 410);

    assert!(jellyfin.approve(&code));
    assert_eq!(link_event(&mut events).await, ("linked".into(), owner.into()));
    let (_, page, _) = browser.get(&format!("{public_url}/login")).await;
    assert!(page.contains("Linked to Jellyfin"), "{page}");
    let token: Value = h.client().get(&token_path).await.unwrap();
    assert!(jellyfin.live_tokens().contains(&token["access_token"].as_str().unwrap().to_owned()));
    let mine: Vec<Value> = h.client().get(&format!("/v1/connections?owner={owner}")).await.unwrap();
    assert_eq!(mine.len(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_form_is_used_once_guarded_against_cross_site_posts_and_survives_a_restart() {
    let password = JellyfinOptions::default().password;
    let (h, jellyfin, public_url) = setup().await;
    let daemon = h.start_daemon().await;
    let url = link(&h, "discord:42").await;
    let mut browser = Browser::new();
    assert_eq!(browser.open(&url).await, 303);
    let (_, first, _) = browser.get(&format!("{public_url}/login")).await;
    daemon.kill9().await;

    // After a restart the same page shows the same code.
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();
    let (status, again, _) = browser.get(&format!("{public_url}/login")).await;
    assert_eq!(status, 200);
    let code = jellyfin.pending_codes().pop().unwrap();
    assert!(first.contains(&code) && again.contains(&code), "{again}");

    let (_, form, _) = browser.get(&format!("{public_url}/login/password")).await;
    let csrf = form.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let target = format!("{public_url}/login/password");
    let (status, _) = browser.post(&target, &[("csrf", "forged"), ("username", "sean"), ("password", &password)]).await;
    assert_eq!(status, 403, "a post without the page's token is refused");
    let (status, page) = browser.post(&target, &[("csrf", &csrf), ("username", "sean"), ("password", "wrong")]).await;
    assert_eq!(status, 401);
    assert!(page.contains("refused the username or password"), "{page}");
    let (status, _) = browser.post(&target, &[("csrf", &csrf), ("username", "sean"), ("password", &password)]).await;
    assert_eq!(status, 303);
    // Switching from the code to the password is no failure: the one outcome is `linked`.
    assert_eq!(link_event(&mut events).await, ("linked".into(), "discord:42".into()));
    let (_, page, _) = browser.get(&format!("{public_url}/login")).await;
    assert!(page.contains("Linked to Jellyfin"), "{page}");
    daemon.stop().await;
    let db = std::fs::read(h.state_dir().join("authkeeper.redb")).unwrap();
    assert!(!db.windows(password.len()).any(|w| w == password.as_bytes()), "the password is not stored");
    assert!(!h.log().contains(&password), "nor logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_guessed_tokens_open_nothing_and_do_not_stop_a_real_link() {
    let (h, _jellyfin, public_url) = setup().await;
    let daemon = h.start_daemon().await;
    let mut guesser = Browser::new();
    let (mut opened, mut throttled) = (0, 0);
    for i in 0..10_000u32 {
        let (status, _, headers) =
            guesser.get(&format!("{public_url}/login?token=guess{i:05}.{}", "x".repeat(43))).await;
        match status {
            200 => opened += 1,
            429 => {
                throttled += 1;
                assert!(headers.contains_key("retry-after"));
            }
            _ => {}
        }
    }
    assert_eq!(opened, 0);
    assert!(throttled > 9_000, "throttled {throttled}");

    // Another owner's real link, from the same address even, still opens.
    let url = link(&h, "discord:7").await;
    assert_eq!(Browser::new().open(&url).await, 303);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_that_runs_out_is_a_failed_link_and_a_browser_provider_is_sent_to_its_page() {
    // Jellyfin forgets Quick Connect requests after a second here.
    let jellyfin = JellyfinEmulator::start(JellyfinOptions { quick_connect_ttl_secs: 1, ..JellyfinOptions::default() })
        .await
        .unwrap();
    let anilist = authkeeper_fixtures::anilist::AniListEmulator::start(Default::default()).await.unwrap();
    let (listen, public_url) = free_port();
    let app = authkeeper_fixtures::anilist::AniListOptions::default();
    let config = json!({"jellyfin": {"server": jellyfin.url()},
        "anilist": {"client_id": app.client_id, "client_secret": app.client_secret},
        "authkeeper": {"web": {"listen": listen, "public_url": public_url}, "base_url": {"anilist": anilist.url()}}});
    let h = harness(config).await;
    let daemon = h.start_daemon().await;
    let mut events = h.client().events().await.unwrap();

    let mut browser = Browser::new();
    assert_eq!(browser.open(&link(&h, "discord:5").await).await, 303);
    assert_eq!(link_event(&mut events).await, ("link_opened".into(), "discord:5".into()));
    let (_, page, _) = browser.get(&format!("{public_url}/login")).await;
    assert!(page.contains("Your code"), "{page}");
    assert_eq!(link_event(&mut events).await, ("link_failed".into(), "discord:5".into()));
    let (_, page, _) = browser.get(&format!("{public_url}/login")).await;
    assert!(page.contains("Not linked") && page.contains("new link"), "{page}");

    // AniList logs in on its own page: the login page sends the browser there, and the
    // callback brings it back linked.
    let issued: Value =
        h.client().post("/v1/links", Some(json!({"provider": "anilist", "owner": "discord:5"}))).await.unwrap();
    let mut browser = Browser::new();
    assert_eq!(browser.open(issued["url"].as_str().unwrap()).await, 303);
    let (status, _, headers) = browser.get(&format!("{public_url}/login")).await;
    assert_eq!(status, 303);
    let authorize = headers["location"].to_str().unwrap().to_owned();
    assert!(authorize.starts_with(&anilist.url()), "{authorize}");
    let (status, _, _) = common::trackers::browse(&authorize).await;
    assert_eq!(status, 200);
    assert_eq!(link_event(&mut events).await, ("link_opened".into(), "discord:5".into()));
    assert_eq!(link_event(&mut events).await, ("linked".into(), "discord:5".into()));
    let (_, page, _) = browser.get(&format!("{public_url}/login")).await;
    assert!(page.contains("Linked to AniList"), "{page}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_link_ends_the_owners_earlier_unopened_one_and_bad_requests_are_clear() {
    let (h, _jellyfin, _) = setup().await;
    let daemon = h.start_daemon().await;
    let first = link(&h, "discord:11").await;
    let second = link(&h, "discord:11").await;
    let (status, page, _) = Browser::new().get(&first).await;
    assert_eq!(status, 400, "the earlier link is gone: {page}");
    assert_eq!(Browser::new().open(&second).await, 303);

    let client = h.client();
    for (body, says) in [
        (json!({"provider": "jellyfin", "owner": "no-colon"}), "not an owner id"),
        (json!({"provider": "jellyfin"}), "exactly one of owner and profile"),
        (json!({"provider": "netflix", "owner": "discord:1"}), "netflix"),
    ] {
        let (status, err) = api_error(client.post::<Value>("/v1/links", Some(body)).await.unwrap_err());
        assert!(status == 400 || status == 404, "{status} {err}");
        assert!(err["message"].as_str().unwrap().contains(says), "{err}");
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_opening_one_link_at_once_get_one_session() {
    let (h, _jellyfin, _) = setup().await;
    let daemon = h.start_daemon().await;
    for round in 0..20 {
        let url = link(&h, &format!("discord:{}", 500 + round)).await;
        let (mut a, mut b) = (Browser::new(), Browser::new());
        let (sa, sb) = tokio::join!(a.open(&url), b.open(&url));
        let mut statuses = [sa, sb];
        statuses.sort();
        assert_eq!(statuses, [303, 410], "round {round}: exactly one browser gets in");
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_that_serves_it_under_a_path_the_pages_address_that_path() {
    let jellyfin = JellyfinEmulator::start(JellyfinOptions::default()).await.unwrap();
    let (listen, origin) = free_port();
    let public_url = format!("{origin}/auth");
    let config = json!({"jellyfin": {"server": jellyfin.url()},
        "authkeeper": {"web": {"listen": listen, "public_url": public_url}}});
    let h = harness(config).await;
    let daemon = h.start_daemon().await;
    let url = link(&h, "discord:77").await;
    assert!(url.starts_with(&format!("{public_url}/login?token=")), "{url}");

    // What the proxy forwards, with its path stripped.
    let forwarded = url.replacen("/auth/login", "/login", 1);
    let mut browser = Browser::new();
    let (_, page, _) = browser.get(&forwarded).await;
    assert!(page.contains("action=\"/auth/login/open\""), "{page}");
    let token = page.split("name=\"token\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let resp = browser.http.post(format!("{origin}/login/open")).form(&[("token", token)]).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 303);
    assert_eq!(resp.headers()["location"], "/auth/login");
    let cookie = resp.headers()["set-cookie"].to_str().unwrap();
    assert!(cookie.contains("Path=/auth/login;"), "{cookie}");
    daemon.stop().await;
}
