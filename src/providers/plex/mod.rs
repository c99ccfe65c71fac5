//! Plex: a strong PIN the user links at plex.tv, polled about once a second; the account token
//! is validated with `/api/v2/user`, and `/api/v2/resources` finds the user's server (a local
//! connection first, then a remote one, a relay last) and its own access token. Every call
//! carries an `X-Plex-Client-Identifier` that is stable per profile.

use super::{
    Adapter, Begun, Extras, FlowError, FlowManifest, Identity, Input, Manifest, Poll, Profile, Provider, Setup,
    Verdict, nonempty, nonempty_secret,
};
use crate::limits::Kind;
use crate::providers::answer::json;
use async_trait::async_trait;
use authkeeper_state::{Account, Grant, PendingFlow, ProfileState, Secret};
use chrono::{DateTime, Utc};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::LazyLock;

mod jwt;

use jwt::DeviceKey;

/// How errors name it.
const LABEL: &str = "Plex";
/// plex.tv and clients.plex.tv; `base_url` puts both at one origin.
pub const PLEX_TV: &str = "https://plex.tv";
const CLIENTS: &str = "https://clients.plex.tv";
const PRODUCT: &str = "authkeeper";

pub struct Plex;

static MANIFEST: LazyLock<Manifest> = LazyLock::new(|| Manifest {
    name: "plex",
    label: "Plex",
    block: "plex",
    flows: vec![FlowManifest { flow: "device_pin", fields: vec![], secret_fields: vec![] }],
    config: vec![],
    credential_keys: &["account_token", "pms_token", "username", "account_id"],
    named_profiles: false,
});

/// The `plex` block of CrossWatch's config.json.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Block {
    pub account_token: Option<Secret>,
    pub client_id: Option<String>,
    pub server_url: Option<String>,
    pub machine_id: Option<String>,
    pub username: Option<String>,
    pub account_id: Option<Value>,
    pub pms_token: Option<Secret>,
    /// Use Plex's JWT authentication (a device key, 7-day tokens refreshed unattended). Opt-in:
    /// the device's legacy token stops working once the first JWT is issued.
    pub jwt: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Pin {
    id: u64,
    code: String,
    expires_in: Option<i64>,
    auth_token: Option<String>,
}

#[derive(Deserialize)]
struct User {
    id: Value,
    username: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Resource {
    name: String,
    #[serde(default)]
    provides: String,
    client_identifier: String,
    access_token: Option<String>,
    #[serde(default)]
    owned: bool,
    #[serde(default)]
    connections: Vec<Connection>,
}

#[derive(Deserialize)]
struct Connection {
    uri: String,
    #[serde(default)]
    local: bool,
    #[serde(default)]
    relay: bool,
}

fn client_identifier(cx: &Setup) -> &str {
    cx.state.fact("client_identifier").unwrap_or(PRODUCT)
}

/// The client identifier a token was issued to (an imported one keeps CrossWatch's).
fn token_client<'a>(cx: &'a Setup, grant: &'a Grant) -> &'a str {
    grant.fact("client_identifier").unwrap_or_else(|| client_identifier(cx))
}

/// A call to plex.tv: as the profile's client, or with `grant`'s token as the client it was
/// issued to.
fn request(cx: &Adapter, method: Method, host: &str, path: &str, grant: Option<&Grant>) -> RequestBuilder {
    let client = grant.map_or_else(|| client_identifier(cx), |g| token_client(cx, g));
    let req = request_as(cx, method, host, path, client);
    match grant {
        Some(g) => req.header("x-plex-token", g.access_token.expose()),
        None => req,
    }
}

/// A call to plex.tv as `client`, with no token.
fn request_as(cx: &Adapter, method: Method, host: &str, path: &str, client: &str) -> RequestBuilder {
    cx.http()
        .request(method, format!("{}{path}", cx.origin(host)))
        .header("accept", "application/json")
        .header("x-plex-client-identifier", client)
        .header("x-plex-product", PRODUCT)
        .header("x-plex-version", env!("CARGO_PKG_VERSION"))
}

/// The profile's device key, for a profile in JWT mode.
fn device_key(cx: &Adapter) -> Result<DeviceKey, String> {
    DeviceKey::of(&cx.state).ok_or_else(|| "this Plex profile has no device key yet (set \"jwt\": true)".into())
}

/// The profile opted in to JWT authentication.
fn jwt_mode(profile: &Profile) -> bool {
    profile.typed::<Block>().jwt == Some(true)
}

fn unknown_status(status: StatusCode) -> String {
    match status {
        StatusCode::TOO_MANY_REQUESTS => "rate limited by Plex (429)".into(),
        s => format!("Plex answered HTTP {}", s.as_u16()),
    }
}

/// The server to use: the one already chosen (`machine_id`) if it is listed, else the user's
/// own first; and its best connection (local, remote, relay).
fn choose(resources: Vec<Resource>, machine_id: Option<&str>) -> Option<(Resource, String)> {
    let mut servers: Vec<Resource> =
        resources.into_iter().filter(|r| r.provides.split(',').any(|p| p.trim() == "server")).collect();
    servers.sort_by_key(|r| (Some(r.client_identifier.as_str()) != machine_id, !r.owned));
    servers.into_iter().find_map(|r| {
        let rank = |c: &Connection| match (c.relay, c.local) {
            (false, true) => 0,
            (false, false) => 1,
            (true, _) => 2,
        };
        let uri = r.connections.iter().min_by_key(|c| rank(c))?.uri.clone();
        Some((r, uri))
    })
}

#[async_trait]
impl Provider for Plex {
    fn manifest(&self) -> &'static Manifest {
        &MANIFEST
    }

    typed_block!(Block);

    fn import(&self, profile: &Profile, now: DateTime<Utc>) -> Option<Grant> {
        let b: &Block = profile.typed();
        let mut grant = Grant { token_type: "plex".into(), ..Grant::bearer(nonempty_secret(&b.account_token)?, now) };
        if let Some(t) = nonempty_secret(&b.pms_token) {
            grant.set_secret("server_token", Secret::new(t));
        }
        let fields =
            [("machine_id", &b.machine_id), ("server_url", &b.server_url), ("client_identifier", &b.client_id)];
        for (name, value) in fields {
            if let Some(v) = nonempty(value) {
                grant.set_fact(name, v);
            }
        }
        Some(grant)
    }

    fn export(&self, grant: Option<&Grant>) -> Vec<(&'static str, Option<Value>)> {
        let fact = |name: &str| grant.and_then(|g| g.fact(name)).map(Value::from);
        vec![
            ("account_token", grant.map(|g| g.access_token.expose().into())),
            ("pms_token", grant.and_then(|g| g.secret("server_token")).map(|t| t.expose().into())),
            ("machine_id", fact("machine_id")),
            ("server_url", fact("server_url")),
            ("username", fact("username")),
            ("account_id", fact("account_id")),
            ("client_id", fact("client_identifier")),
        ]
    }

    /// An `X-Plex-Client-Identifier` made once per profile and kept; with `jwt`, a device key.
    fn prepare(&self, profile: &Profile, state: &mut ProfileState) -> bool {
        let mut changed = false;
        if state.fact("client_identifier").is_none() {
            let id = format!("authkeeper-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
            state.facts.insert("client_identifier".into(), id);
            changed = true;
        }
        if jwt_mode(profile) && DeviceKey::of(state).is_none() {
            DeviceKey::generate(state);
            changed = true;
        }
        changed
    }

    async fn begin(&self, cx: &Adapter, _flow: &str, _input: Input, now: DateTime<Utc>) -> Result<Begun, FlowError> {
        let mut req = request(cx, Method::POST, PLEX_TV, "/api/v2/pins?strong=true", None);
        let key = if jwt_mode(&cx.profile) { Some(device_key(cx).map_err(FlowError::Config)?) } else { None };
        if let Some(key) = &key {
            // A new login in JWT mode sends the device key with the PIN.
            req = req.json(&json!({"jwk": key.jwk(), "strong": true}));
        }
        let resp = cx.send(Kind::Write, req).await.map_err(FlowError::Unavailable)?;
        if !resp.status().is_success() {
            return Err(FlowError::Unavailable(unknown_status(resp.status())));
        }
        let pin: Pin = json(resp, LABEL).await.map_err(FlowError::Unavailable)?;
        let cid = client_identifier(cx);
        let verification_url = format!(
            "https://app.plex.tv/auth#?clientID={cid}&code={}&context%5Bdevice%5D%5Bproduct%5D={PRODUCT}",
            pin.code
        );
        Ok(Begun::Pending(PendingFlow {
            kind: "device_pin".into(),
            user_code: Some(pin.code),
            verification_url: Some(verification_url),
            authorize_url: None,
            issued_at: now,
            expires_at: now + super::lifetime(pin.expires_in.unwrap_or(1800)),
            interval_secs: Some(1),
            secrets: BTreeMap::from([("pin_id".to_owned(), Secret::new(pin.id.to_string()))])
                .into_iter()
                .chain(key.map(|k| ("device_key".to_owned(), jwt::marker(&k))))
                .collect(),
        }))
    }

    async fn poll(&self, cx: &Adapter, flow: &PendingFlow, now: DateTime<Utc>) -> Poll {
        let Some(id) = flow.secret("pin_id") else { return Poll::Gone("the pending PIN has no id".into()) };
        let mut path = format!("/api/v2/pins/{}", id.expose());
        // A PIN made with the device key is asked about with a device JWT, and yields a Plex JWT.
        let key = match flow.secret("device_key").map(|_| device_key(cx)) {
            Some(Ok(key)) => {
                match jwt::device_jwt(cx, &key, client_identifier(cx), now).await {
                    Ok(signed) => path.push_str(&format!("?deviceJWT={signed}")),
                    Err(e) => return Poll::Unknown(e),
                }
                Some(key)
            }
            Some(Err(e)) => return Poll::Gone(e),
            None => None,
        };
        let resp = match cx.send(Kind::Read, request(cx, Method::GET, PLEX_TV, &path, None)).await {
            Ok(r) => r,
            Err(e) => return Poll::Unknown(e),
        };
        match resp.status() {
            StatusCode::OK => match json::<Pin>(resp, LABEL).await {
                Ok(Pin { auth_token: Some(token), .. }) if !token.is_empty() => match &key {
                    Some(key) => Poll::Approved(jwt::grant(token, key, client_identifier(cx), now)),
                    None => {
                        let mut grant = Grant { token_type: "plex".into(), ..Grant::bearer(token, now) };
                        grant.set_fact("client_identifier", client_identifier(cx));
                        Poll::Approved(grant)
                    }
                },
                Ok(_) => Poll::Pending,
                Err(e) => Poll::Unknown(e),
            },
            StatusCode::NOT_FOUND => Poll::Gone("the PIN expired before it was linked (404)".into()),
            s => Poll::Unknown(unknown_status(s)),
        }
    }

    async fn validate(&self, cx: &Adapter, grant: &Grant) -> Verdict<Identity> {
        // A legacy token on a profile in JWT mode is upgraded first: the key is registered with
        // it, and the first Plex JWT replaces it. Plex kills the legacy token then, so the JWT
        // is handed back at once, to be committed before anything else is asked.
        let mut refused = None;
        if jwt_mode(&cx.profile) && !jwt::is_jwt(grant) {
            let key = match device_key(cx) {
                Ok(key) => key,
                Err(e) => return Verdict::Unknown(e),
            };
            match jwt::upgrade(cx, grant, &key, token_client(cx, grant), cx.gate().now()).await {
                jwt::Upgrade::Done(fresh) => {
                    let name = grant.fact("username").unwrap_or("(Plex account)").to_owned();
                    let account = Account { name: name.into(), id: grant.fact("account_id").map(str::to_owned) };
                    return Verdict::Valid(Identity { account, grant: Some(fresh) });
                }
                jwt::Upgrade::NoAnswer(e) => return Verdict::Unknown(e),
                // The legacy token still works: it stays, and status says why it was not upgraded.
                jwt::Upgrade::Refused(e) => refused = Some(e),
            }
        }
        let user = match cx.send(Kind::Read, request(cx, Method::GET, PLEX_TV, "/api/v2/user", Some(grant))).await {
            Err(e) => return Verdict::Unknown(e),
            Ok(r) if r.status() == StatusCode::UNAUTHORIZED => {
                return Verdict::Rejected("Plex rejected the account token (401)".into());
            }
            Ok(r) if r.status().as_u16() == 498 => {
                return Verdict::Rejected("Plex says the token expired (498); the device key refreshes it".into());
            }
            Ok(r) if !r.status().is_success() => return Verdict::Unknown(unknown_status(r.status())),
            Ok(r) => match json::<User>(r, LABEL).await {
                Ok(user) => user,
                Err(e) => return Verdict::Unknown(e),
            },
        };
        let path = "/api/v2/resources?includeHttps=1&includeRelay=1";
        let resources = match cx.send(Kind::Read, request(cx, Method::GET, CLIENTS, path, Some(grant))).await {
            Err(e) => return Verdict::Unknown(e),
            Ok(r) if r.status() == StatusCode::UNAUTHORIZED => {
                return Verdict::Rejected("Plex refused server discovery (401): the device was removed".into());
            }
            Ok(r) if !r.status().is_success() => return Verdict::Unknown(unknown_status(r.status())),
            Ok(r) => match json::<Vec<Resource>>(r, LABEL).await {
                Ok(list) => list,
                Err(e) => return Verdict::Unknown(e),
            },
        };
        let id = match &user.id {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let mut updated = grant.clone();
        updated.set_fact("auth_mode", if jwt::is_jwt(grant) { "jwt" } else { "legacy" });
        if let Some(why) = refused {
            updated.set_fact("jwt_upgrade", format!("refused: {why}"));
        }
        updated.set_fact("username", user.username.clone());
        updated.set_fact("account_id", id.clone());
        // No server listed (a passing answer, a shared-only account): what was known stays.
        if let Some((server, uri)) = choose(resources, grant.fact("machine_id")) {
            updated.set_fact("server_name", server.name);
            updated.set_fact("machine_id", server.client_identifier);
            updated.set_fact("server_url", uri);
            if let Some(t) = server.access_token {
                updated.set_secret("server_token", Secret::new(t));
            }
        }
        let grant = (updated != *grant).then_some(updated);
        Verdict::Valid(Identity { account: Account { name: user.username.into(), id: Some(id) }, grant })
    }

    /// A Plex JWT is refreshed with the device key; a legacy token has no refresh.
    async fn refresh(&self, cx: &Adapter, grant: &Grant, now: DateTime<Utc>) -> Verdict<Grant> {
        if !jwt::is_jwt(grant) {
            return Verdict::Rejected("a legacy Plex token has no refresh".into());
        }
        match device_key(cx) {
            Ok(key) => jwt::refresh(cx, &key, token_client(cx, grant), grant, now).await,
            Err(e) => Verdict::Rejected(e),
        }
    }

    async fn revoke(&self, cx: &Adapter, grant: &Grant) -> Result<(), String> {
        let resp =
            cx.send(Kind::Write, request(cx, Method::DELETE, PLEX_TV, "/api/v2/users/signout", Some(grant))).await?;
        if resp.status().is_success() { Ok(()) } else { Err(unknown_status(resp.status())) }
    }

    fn token(&self, cx: &Setup, grant: &Grant, out: &mut Extras) {
        out.put("client_identifier", token_client(cx, grant));
        let server = grant.fact("machine_id").map(|machine_id| {
            json!({
                "name": grant.fact("server_name"),
                "machine_id": machine_id,
                "url": grant.fact("server_url"),
                "access_token": grant.secret("server_token").map(|t| t.expose()),
            })
        });
        out.put("server", server);
    }
}
