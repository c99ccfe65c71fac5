//! The login pages on the web listener. `GET /login?token=…` only looks at the link (a chat
//! app's preview or a mail scanner fetching it uses nothing up) and shows a button; the
//! button's `POST /login/open` is the link's only use: it becomes a browser session (an
//! HttpOnly, SameSite=Strict cookie) and the browser moves on to `/login`, without the token.
//! `/login` shows the session's login (a code to enter, a PIN to link, a redirect to the
//! provider) until it is linked, also after a restart; `/login/password` takes a password
//! form (Jellyfin, Emby), used once.

use super::{PageFlow, SESSION_TTL, ensure_connection, has_password, hash, load, matches, page_flow, progress, split};
use crate::daemon::{Command, DaemonError, Shared};
use crate::providers::{self, FlowError, Input, oauth_code::random_token};
use crate::web::pages::{escape, html, page};
use crate::wire::{ConnectionView, WireEvent};
use authkeeper_state::{ConnKey, LinkRecord, Secret, StateName};
use axum::Router;
use axum::extract::{ConnectInfo, Form, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tracing::warn;

const COOKIE: &str = "authkeeper_login";

#[derive(Clone)]
struct Login {
    shared: Arc<Shared>,
    /// Reverse proxies whose `X-Forwarded-For` names the client.
    trusted: Arc<Vec<IpAddr>>,
}

/// The login routes, for the web listener.
pub fn routes(shared: Arc<Shared>, trusted: Vec<IpAddr>) -> Router {
    Router::new()
        .route("/login", get(login))
        .route("/login/open", post(open))
        .route("/login/password", get(password_form).post(password))
        .with_state(Login { shared, trusted: Arc::new(trusted) })
}

/// The client's address: the peer, or the last hop a trusted proxy says it forwarded for.
fn client(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    let peer = peer.ip().to_canonical();
    if !trusted.iter().any(|t| t.to_canonical() == peer) {
        return peer;
    }
    let forwarded = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).next_back();
    forwarded.and_then(|v| v.rsplit(',').next()).and_then(|v| v.trim().parse().ok()).unwrap_or(peer)
}

/// The form token against cross-site posts: derived from the session secret, which only the
/// browser's HttpOnly cookie holds.
fn csrf(session: &str) -> String {
    let digest = Sha256::digest(format!("csrf:{session}").as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The path of the public URL (`/auth` for `https://host/auth`; empty at the root): the
/// browser's addresses of the pages begin with it, whatever the proxy strips before us.
fn base(shared: &Shared) -> String {
    let url = shared.public_url.get().and_then(|u| reqwest::Url::parse(&u).ok());
    url.map(|u| u.path().trim_end_matches('/').to_owned()).unwrap_or_default()
}

/// `path` as the browser addresses it.
fn at(shared: &Shared, path: &str) -> String {
    format!("{}{path}", base(shared))
}

/// What a visitor sees when the daemon failed inside (the detail goes to the log only).
fn trouble(e: impl std::fmt::Display) -> Response {
    warn!(error = %e, "a login page failed");
    page(StatusCode::SERVICE_UNAVAILABLE, "Try again", "authkeeper could not answer just now. Reload this page.")
}

fn gone(title: &str, text: &str) -> Response {
    page(StatusCode::GONE, title, text)
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The link `token` names, if its secret matches; a failed guess counts against `addr`.
async fn find(l: &Login, addr: IpAddr, token: &str) -> Result<(String, LinkRecord), Response> {
    let found = match split(token) {
        Some((id, secret)) => match load(&l.shared, id).await {
            Ok(Some(record)) if matches(&record.secret_hash, secret) => Some((id.to_owned(), record)),
            Ok(_) => None,
            Err(e) => return Err(trouble(e)),
        },
        None => None,
    };
    found.ok_or_else(|| match l.shared.guesses.fail(addr) {
        Some(wait) => {
            let mut r = page(StatusCode::TOO_MANY_REQUESTS, "Too many tries", "Too many unknown links from here.");
            r.headers_mut().insert(header::RETRY_AFTER, wait.into());
            r
        }
        None => page(StatusCode::BAD_REQUEST, "Unknown link", "This link is not valid. Ask for a new one."),
    })
}

/// A link that can no longer be opened, and why.
fn spent(record: &LinkRecord, now: chrono::DateTime<chrono::Utc>) -> Option<Response> {
    if record.session_hash.is_some() {
        return Some(gone("Link already used", "This link was already used. Ask for a new one."));
    }
    if now >= record.expires_at || record.outcome.is_some() {
        return Some(gone("Link expired", "This link expired before it was opened. Ask for a new one."));
    }
    None
}

/// `GET /login?token=…` (look, use nothing) or, with the session cookie, `GET /login`.
async fn login(
    State(l): State<Login>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
) -> Response {
    let Some(token) = q.token else {
        return match session(&l.shared, &headers).await {
            Ok((id, record, _)) => show(&l.shared, &id, record).await,
            Err(response) => response,
        };
    };
    let (id, record) = match find(&l, client(peer, &headers, &l.trusted), &token).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    // Back to the link's own address with its session still on: the login, not an error.
    if let Ok((sid, _, _)) = session(&l.shared, &headers).await
        && sid == id
    {
        return Redirect::to(&at(&l.shared, "/login")).into_response();
    }
    if let Some(response) = spent(&record, l.shared.clock.now()) {
        return response;
    }
    let label = label(&record.provider);
    let body = format!(
        "<p>This link logs you in to {label}. It works once.</p>\
         <form method=\"post\" action=\"{}\"><input type=\"hidden\" name=\"token\" value=\"{}\">\
         <p><button type=\"submit\">Continue</button></p></form>",
        escape(&at(&l.shared, "/login/open")),
        escape(&token)
    );
    html(StatusCode::OK, &format!("Continue to {label}"), &body, None)
}

#[derive(Deserialize)]
struct OpenForm {
    token: String,
}

/// `POST /login/open`: the link's only use becomes a browser session.
async fn open(
    State(l): State<Login>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<OpenForm>,
) -> Response {
    let (id, record) = match find(&l, client(peer, &headers, &l.trusted), &form.token).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let now = l.shared.clock.now();
    if let Some(response) = spent(&record, now) {
        return response;
    }
    let secret = random_token();
    let (store, claim, session) = (l.shared.store.clone(), id.clone(), hash(&secret));
    let record = match tokio::task::spawn_blocking(move || store.claim_link(&claim, session, now)).await {
        Ok(Ok(Some(claimed))) => claimed,
        Ok(Ok(None)) => return gone("Link already used", "This link was already used. Ask for a new one."),
        Ok(Err(e)) => return trouble(e),
        Err(e) => return trouble(e),
    };
    l.shared.active_links.track(&id, &record);
    let (provider, owner) = (record.provider.clone(), record.profile.clone());
    let _ = l.shared.events.send(WireEvent::LinkOpened { provider, owner, at: now });
    let secure =
        l.shared.public_url.get().and_then(|u| reqwest::Url::parse(&u).ok()).is_some_and(|u| u.scheme() == "https");
    let max_age = (record.expires_at + SESSION_TTL - now).num_seconds().max(1);
    let cookie = format!(
        "{COOKIE}={id}.{secret}; Path={}; Max-Age={max_age}; HttpOnly; SameSite=Strict{}",
        at(&l.shared, "/login"),
        if secure { "; Secure" } else { "" }
    );
    let mut r = Redirect::to(&at(&l.shared, "/login")).into_response();
    r.headers_mut().insert(header::SET_COOKIE, cookie.parse().expect("a cookie header"));
    r
}

/// The session the cookie names: (link id, record, session secret).
async fn session(shared: &Arc<Shared>, headers: &HeaderMap) -> Result<(String, LinkRecord, String), Response> {
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")).map(str::to_owned));
    let unknown = || page(StatusCode::BAD_REQUEST, "No login here", "Open the link you were sent to log in.");
    let (id, secret) = cookie.as_deref().and_then(split).ok_or_else(unknown)?;
    let record = match load(shared, id).await {
        Ok(Some(r)) if r.session_hash.is_some_and(|h| matches(&h, secret)) => r,
        Ok(_) => return Err(unknown()),
        Err(e) => return Err(trouble(e)),
    };
    if shared.clock.now() >= record.expires_at + SESSION_TTL {
        return Err(gone("Login expired", "This login took too long. Ask for a new link."));
    }
    Ok((id.to_owned(), record, secret.to_owned()))
}

fn view(shared: &Shared, key: &ConnKey) -> Result<ConnectionView, DaemonError> {
    shared.lookup(&key.provider, &key.profile, |s| s.view(&shared.policy(), shared.clock.now()))
}

fn label(provider: &str) -> &'static str {
    providers::find(provider).map_or("the provider", |p| p.manifest().label)
}

/// The page for the session's connection, starting its login the first time.
async fn show(shared: &Arc<Shared>, id: &str, record: LinkRecord) -> Response {
    let key = ConnKey::new(&record.provider, &record.profile);
    let label = label(&record.provider);
    if let Err(e) = ensure_connection(shared, &key).await {
        return trouble(e);
    }
    let current = match view(shared, &key) {
        Ok(v) => v,
        Err(e) => return trouble(e),
    };
    match current.state {
        StateName::Connected => {
            // Connected already (another way, or before the events were watched): say so once.
            if let Ok(Some(after)) = progress(shared, id, true, Some("linked"), false).await
                && record.outcome.is_none()
                && after.outcome.as_deref() == Some("linked")
            {
                let (provider, owner, at) = (key.provider.to_string(), key.profile.to_string(), shared.clock.now());
                let _ = shared.events.send(WireEvent::Linked { provider, owner, at });
            }
            return page(StatusCode::OK, &format!("Linked to {label}"), "You are logged in.");
        }
        StateName::Pending => {
            // A login already under way (another link's, say) is this link's from now on.
            if !record.started {
                let _ = progress(shared, id, true, None, false).await;
            }
            return pending(&record, &current, &base(shared));
        }
        _ if record.started => {
            let why = current.last_error.unwrap_or_else(|| "the login ended before it was approved".into());
            return page(StatusCode::OK, "Not linked", &format!("{why}. Ask for a new link to try again."));
        }
        _ => {}
    }
    let flow = match page_flow(&record.provider) {
        Some(PageFlow::Start(flow)) => flow,
        Some(PageFlow::Password) => return Redirect::to(&at(shared, "/login/password")).into_response(),
        None => return page(StatusCode::BAD_REQUEST, "No login here", &format!("{label} has no login a page can do.")),
    };
    if let Err(e) = progress(shared, id, true, None, false).await {
        return trouble(e);
    }
    match shared.ask_new(&key, |reply| Command::Connect(Some(flow.into()), Input::new(), reply)).await {
        Ok(reply) => pending(&record, &reply.connection, &base(shared)),
        Err(DaemonError::Flow(FlowError::Rejected(why))) if has_password(&record.provider) => {
            let body = format!(
                "<p>{}</p><p><a href=\"{}\">Log in with your password</a></p>",
                escape(&why),
                escape(&at(shared, "/login/password"))
            );
            html(StatusCode::OK, &format!("Log in to {label}"), &body, None)
        }
        Err(e) => trouble(e),
    }
}

/// An address a page may link to: http(s) only.
fn web_address(url: &str) -> Option<&str> {
    (url.starts_with("https://") || url.starts_with("http://")).then_some(url)
}

/// What the user must do for a pending login: a code, or the provider's own page.
fn pending(record: &LinkRecord, current: &ConnectionView, base: &str) -> Response {
    let label = label(&record.provider);
    let Some(flow) = &current.pending else {
        return html(StatusCode::OK, &format!("Log in to {label}"), "<p>Checking your login…</p>", Some("2"));
    };
    if let Some(url) = flow.authorize_url.as_deref().and_then(web_address) {
        return Redirect::to(url).into_response();
    }
    let mut body = String::new();
    if let Some(code) = &flow.user_code {
        body += &format!("<p>Your code:</p><p><strong>{}</strong></p>", escape(code));
    }
    if let Some(url) = flow.verification_url.as_deref().and_then(web_address) {
        let url = escape(url);
        body += &format!("<p>Enter it at <a href=\"{url}\">{url}</a> (or in a signed-in {label} app).</p>");
    }
    body += "<p>This page updates by itself.</p>";
    if has_password(&record.provider) {
        let form = escape(&format!("{base}/login/password"));
        body += &format!("<p><a href=\"{form}\">Log in with your password instead</a></p>");
    }
    html(StatusCode::OK, &format!("Log in to {label}"), &body, Some("3"))
}

/// The password form (no refresh, so typing is not interrupted).
async fn password_form(State(l): State<Login>, headers: HeaderMap) -> Response {
    let (_, record, secret) = match session(&l.shared, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    form_page(StatusCode::OK, &record, &secret, None, &base(&l.shared))
}

fn form_page(status: StatusCode, record: &LinkRecord, secret: &str, error: Option<&str>, base: &str) -> Response {
    let label = label(&record.provider);
    let error = error.map(|e| format!("<p><strong>{}</strong></p>", escape(e))).unwrap_or_default();
    let body = format!(
        "{error}<form method=\"post\" action=\"{}\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <p><label>Username <input name=\"username\" autocomplete=\"username\" required></label></p>\
         <p><label>Password <input type=\"password\" name=\"password\" autocomplete=\"current-password\"></label></p>\
         <p><button type=\"submit\">Log in</button></p></form>\
         <p>Your password goes to {label} once, through this page, and is kept nowhere.</p>",
        escape(&format!("{base}/login/password")),
        csrf(secret)
    );
    html(status, &format!("Log in to {label}"), &body, None)
}

#[derive(Deserialize)]
struct PasswordForm {
    csrf: String,
    username: String,
    #[serde(default)]
    password: String,
}

/// `POST /login/password`: the password goes into one login and is dropped.
async fn password(State(l): State<Login>, headers: HeaderMap, Form(form): Form<PasswordForm>) -> Response {
    let (id, record, secret) = match session(&l.shared, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let expected = csrf(&secret);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), form.csrf.as_bytes())) {
        return page(StatusCode::FORBIDDEN, "Not accepted", "This form did not come from this page. Reload it.");
    }
    if !has_password(&record.provider) {
        return page(StatusCode::BAD_REQUEST, "No password here", "This provider does not log in by password.");
    }
    let key = ConnKey::new(&record.provider, &record.profile);
    if let Err(e) = ensure_connection(&l.shared, &key).await {
        return trouble(e);
    }
    if let Err(e) = progress(&l.shared, &id, true, None, false).await {
        return trouble(e);
    }
    if view(&l.shared, &key).is_ok_and(|v| v.state == StateName::Pending) {
        let _ = l.shared.ask(&key, Command::Cancel).await;
    }
    let input: Input =
        [("username".to_owned(), Secret::new(form.username)), ("password".to_owned(), Secret::new(form.password))]
            .into();
    match l.shared.ask_new(&key, |reply| Command::Connect(Some("password".into()), input, reply)).await {
        Ok(_) => Redirect::to(&at(&l.shared, "/login")).into_response(),
        Err(DaemonError::Flow(FlowError::Rejected(why) | FlowError::Input(why))) => {
            form_page(StatusCode::UNAUTHORIZED, &record, &secret, Some(&why), &base(&l.shared))
        }
        Err(e) => trouble(e),
    }
}
