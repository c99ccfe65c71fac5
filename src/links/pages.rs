//! The login pages on the web listener: `GET /login?token=…` trades a link for a browser
//! session and leaves the address bar; `GET /login` shows that session's login (a code to
//! enter, a PIN to link, a redirect to the provider) until it is linked; `POST /login/password`
//! takes a password form (Jellyfin, Emby), used once.

use super::{SESSION_TTL, ensure_connection, hash, load, matches, save, split};
use crate::daemon::{Command, DaemonError, Shared};
use crate::providers::{self, FlowError, Input, oauth_code::random_token};
use crate::web::pages::{escape, html, page};
use crate::wire::{ConnectionView, WireEvent};
use authkeeper_state::{ConnKey, LinkRecord, Secret, StateName};
use axum::Router;
use axum::extract::{ConnectInfo, Form, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

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
        .route("/login/password", get(password_form).post(password))
        .with_state(Login { shared, trusted: Arc::new(trusted) })
}

/// The client's address: the peer, or what a trusted proxy says it forwarded for.
fn client(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer.ip()) {
        return peer.ip();
    }
    let forwarded = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    forwarded.and_then(|v| v.rsplit(',').next()).and_then(|v| v.trim().parse().ok()).unwrap_or(peer.ip())
}

/// The form token against cross-site posts: derived from the session secret, which only the
/// browser's HttpOnly cookie holds.
fn csrf(session: &str) -> String {
    let digest = Sha256::digest(format!("csrf:{session}").as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn gone(title: &str, text: &str) -> Response {
    page(StatusCode::GONE, title, text)
}

/// `GET /login?token=…` or, with the session cookie, `GET /login`.
async fn login(
    State(l): State<Login>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
) -> Response {
    match q.token {
        Some(token) => open(&l, client(peer, &headers, &l.trusted), &token).await,
        None => match session(&l.shared, &headers).await {
            Ok((id, record, _)) => show(&l.shared, &id, record).await,
            Err(response) => response,
        },
    }
}

/// The link's only use: a browser session, and a page that moves on to `/login`.
async fn open(l: &Login, addr: IpAddr, token: &str) -> Response {
    let found = match split(token) {
        Some((id, secret)) => match load(&l.shared, id).await {
            Ok(Some(record)) if matches(&record.secret_hash, secret) => Some((id.to_owned(), record)),
            Ok(_) => None,
            Err(e) => return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", &e.to_string()),
        },
        None => None,
    };
    let Some((id, record)) = found else {
        if let Some(wait) = l.shared.guesses.fail(addr) {
            let mut r = page(StatusCode::TOO_MANY_REQUESTS, "Too many tries", "Too many unknown links from here.");
            r.headers_mut().insert(header::RETRY_AFTER, wait.into());
            return r;
        }
        return page(StatusCode::BAD_REQUEST, "Unknown link", "This link is not valid. Ask for a new one.");
    };
    let now = l.shared.clock.now();
    if record.session_hash.is_some() {
        return gone("Link already used", "This link was already used. Ask for a new one.");
    }
    if now >= record.expires_at {
        return gone("Link expired", "This link expired before it was opened. Ask for a new one.");
    }
    let secret = random_token();
    let (store, claim, session) = (l.shared.store.clone(), id.clone(), hash(&secret));
    let record = match tokio::task::spawn_blocking(move || store.claim_link(&claim, session)).await {
        Ok(Ok(Some(claimed))) => claimed,
        Ok(Ok(None)) => return gone("Link already used", "This link was already used. Ask for a new one."),
        Ok(Err(e)) => return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", &e.to_string()),
        Err(e) => return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", &e.to_string()),
    };
    l.shared.active_links.track(&id, &record);
    let (provider, owner) = (record.provider.clone(), record.profile.clone());
    let _ = l.shared.events.send(WireEvent::LinkOpened { provider, owner, at: now });
    let secure = l.shared.public_url.get().is_some_and(|u| u.starts_with("https:"));
    let max_age = (record.expires_at + SESSION_TTL - now).num_seconds().max(1);
    let cookie = format!(
        "{COOKIE}={id}.{secret}; Path=/login; Max-Age={max_age}; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    );
    // A page of our own moves the browser on: a redirect would carry the cross-site navigation
    // along, and SameSite=Strict would keep the cookie from it.
    let mut r = html(StatusCode::OK, "Opening…", "<p><a href=\"/login\">Continue</a></p>", Some("0;url=/login"));
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
        Err(e) => return Err(page(StatusCode::SERVICE_UNAVAILABLE, "Try again", &e.to_string())),
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
async fn show(shared: &Arc<Shared>, id: &str, mut record: LinkRecord) -> Response {
    let key = ConnKey::new(&record.provider, &record.profile);
    let label = label(&record.provider);
    if let Err(e) = ensure_connection(shared, &key).await {
        return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", &e.to_string());
    }
    let current = match view(shared, &key) {
        Ok(v) => v,
        Err(e) => return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", &e.to_string()),
    };
    match current.state {
        StateName::Connected => return page(StatusCode::OK, &format!("Linked to {label}"), "You are logged in."),
        StateName::Pending => return pending(&record, &current),
        _ if record.started => {
            let why = current.last_error.unwrap_or_else(|| "the login ended before it was approved".into());
            return page(StatusCode::OK, "Not linked", &format!("{why}. Ask for a new link to try again."));
        }
        _ => {}
    }
    let answer = shared.ask_new(&key, |reply| Command::Connect(None, Input::new(), reply)).await;
    match answer {
        Ok(reply) => {
            record.started = true;
            let _ = save(shared, id, &record).await;
            shared.active_links.track(id, &record);
            pending(&record, &reply.connection)
        }
        Err(e) => page(StatusCode::SERVICE_UNAVAILABLE, "Try again", &format!("{label} could not start a login: {e}")),
    }
}

/// What the user must do for a pending login: a code, or the provider's own page.
fn pending(record: &LinkRecord, current: &ConnectionView) -> Response {
    let label = label(&record.provider);
    let Some(flow) = &current.pending else {
        return html(StatusCode::OK, &format!("Log in to {label}"), "<p>Checking your login…</p>", Some("2"));
    };
    if let Some(url) = &flow.authorize_url {
        return Redirect::to(url).into_response();
    }
    let mut body = String::new();
    if let Some(code) = &flow.user_code {
        body += &format!("<p>Your code:</p><p><strong>{}</strong></p>", escape(code));
    }
    if let Some(url) = &flow.verification_url {
        let url = escape(url);
        body += &format!("<p>Enter it at <a href=\"{url}\">{url}</a> (or in a signed-in {label} app).</p>");
    }
    body += "<p>This page updates by itself.</p>";
    let has_password =
        providers::find(&record.provider).is_some_and(|p| p.manifest().flows.iter().any(|f| f.flow == "password"));
    if has_password {
        body += "<p><a href=\"/login/password\">Log in with your password instead</a></p>";
    }
    html(StatusCode::OK, &format!("Log in to {label}"), &body, Some("3"))
}

/// The password form (no refresh, so typing is not interrupted).
async fn password_form(State(l): State<Login>, headers: HeaderMap) -> Response {
    let (_, record, secret) = match session(&l.shared, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    form_page(StatusCode::OK, &record, &secret, None)
}

fn form_page(status: StatusCode, record: &LinkRecord, secret: &str, error: Option<&str>) -> Response {
    let label = label(&record.provider);
    let error = error.map(|e| format!("<p><strong>{}</strong></p>", escape(e))).unwrap_or_default();
    let body = format!(
        "{error}<form method=\"post\" action=\"/login/password\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <p><label>Username <input name=\"username\" autocomplete=\"username\" required></label></p>\
         <p><label>Password <input type=\"password\" name=\"password\" autocomplete=\"current-password\"></label></p>\
         <p><button type=\"submit\">Log in</button></p></form>\
         <p>Your password goes to {label} once, through this page, and is kept nowhere.</p>",
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
    let (id, mut record, secret) = match session(&l.shared, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let expected = csrf(&secret);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), form.csrf.as_bytes())) {
        return page(StatusCode::FORBIDDEN, "Not accepted", "This form did not come from this page. Reload it.");
    }
    let key = ConnKey::new(&record.provider, &record.profile);
    if view(&l.shared, &key).is_ok_and(|v| v.state == StateName::Pending) {
        let _ = l.shared.ask(&key, Command::Cancel).await;
    }
    let input: Input =
        [("username".to_owned(), Secret::new(form.username)), ("password".to_owned(), Secret::new(form.password))]
            .into();
    match l.shared.ask_new(&key, |reply| Command::Connect(Some("password".into()), input, reply)).await {
        Ok(_) => {
            record.started = true;
            let _ = save(&l.shared, &id, &record).await;
            l.shared.active_links.track(&id, &record);
            Redirect::to("/login").into_response()
        }
        Err(DaemonError::Flow(FlowError::Rejected(why) | FlowError::Input(why))) => {
            form_page(StatusCode::UNAUTHORIZED, &record, &secret, Some(&why))
        }
        Err(e) => page(StatusCode::SERVICE_UNAVAILABLE, "Try again", &e.to_string()),
    }
}
