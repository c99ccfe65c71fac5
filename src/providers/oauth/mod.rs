//! Any OAuth 2.0 / OpenID Connect server, as freely named instances (`oauth/authentik`): the
//! device grant and the code flow with PKCE (and a `nonce` for OIDC), refresh with rotation,
//! validation by userinfo, introspection or the tokens' own `exp`, revocation on disconnect.
//! Endpoints come from the instance's `issuer` (discovery) or are given one by one.

mod discovery;

use super::oauth2::{Client, ClientAuth};
use super::{
    Adapter, Begun, Extras, FlowError, FlowManifest, Identity, Input, Manifest, Poll, Profile, Provider, Setup,
    Verdict, jwt_expiry, nonempty, nonempty_secret, oauth_code,
};
use crate::limits::Kind;
use crate::web::CallbackQuery;
use async_trait::async_trait;
use authkeeper_state::{Account, Grant, PendingFlow, Secret};
use chrono::{DateTime, Utc};
use discovery::Metadata;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::LazyLock;

pub struct OAuth;

const LABEL: &str = "OAuth";

static MANIFEST: LazyLock<Manifest> = LazyLock::new(|| Manifest {
    name: "oauth",
    label: "OAuth 2.0 / OpenID Connect",
    block: "oauth",
    flows: vec![
        FlowManifest { flow: "device_pin", fields: vec![], secret_fields: vec![] },
        FlowManifest { flow: "oauth_code", fields: vec![], secret_fields: vec![] },
    ],
    config: vec!["issuer", "client_id"],
    credential_keys: &["access_token", "refresh_token", "expires_at"],
    named_profiles: true,
});

/// One instance under `"oauth": {"instances": {NAME: …}}` (the base block's keys are shared).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Block {
    pub issuer: Option<String>,
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: Option<String>,
    pub device_authorization_endpoint: Option<String>,
    pub userinfo_endpoint: Option<String>,
    pub introspection_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub scope: Option<String>,
    pub audience: Option<String>,
    /// More parameters for the authorize request.
    #[serde(default)]
    pub authorize_params: BTreeMap<String, String>,
    /// `client_secret_basic`, `client_secret_post` or `none`; chosen from the metadata when absent.
    pub token_endpoint_auth_method: Option<String>,
    /// Validate by introspection (RFC 7662) rather than userinfo.
    #[serde(default)]
    pub introspect: bool,
    pub access_token: Option<Secret>,
    pub refresh_token: Option<Secret>,
    pub expires_at: Option<f64>,
}

/// The client for `meta`'s token endpoint, authenticating as the config or the metadata say.
fn client<'a>(cx: &'a Adapter, meta: &Metadata) -> Result<Client<'a>, String> {
    let block: &Block = cx.profile.typed();
    let client_id = nonempty(&block.client_id).ok_or("an oauth instance needs client_id in config.json")?;
    let secret = nonempty_secret(&block.client_secret);
    let only_post = meta
        .token_endpoint_auth_methods_supported
        .as_ref()
        .is_some_and(|m| m.iter().any(|x| x == "client_secret_post") && !m.iter().any(|x| x == "client_secret_basic"));
    let auth = match (block.token_endpoint_auth_method.as_deref(), secret) {
        (Some("none"), _) | (None, None) => ClientAuth::None,
        (Some("client_secret_post"), _) => ClientAuth::Post,
        (Some("client_secret_basic"), _) => ClientAuth::Basic,
        (Some(other), _) => return Err(format!("token_endpoint_auth_method {other:?} is not supported")),
        (None, Some(_)) if only_post => ClientAuth::Post,
        (None, Some(_)) => ClientAuth::Basic,
    };
    Ok(Client {
        label: LABEL,
        client_id,
        client_secret: secret,
        auth,
        device_endpoint: meta.device_authorization_endpoint.clone().unwrap_or_default(),
        token_endpoint: meta.token_endpoint.clone().ok_or("the server names no token endpoint")?,
    })
}

/// The `nonce` claim of an ID token (read only to compare with the flow's own).
fn id_token_nonce(id_token: &str) -> Option<String> {
    use base64::Engine;
    let payload = id_token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("nonce")?.as_str().map(str::to_owned)
}

/// A grant's verdict from its tokens' own `exp`, for servers with neither userinfo nor
/// introspection.
fn by_expiry(grant: &Grant, now: DateTime<Utc>) -> Verdict<Identity> {
    let ends = grant.expires_at.or_else(|| jwt_expiry(grant.access_token.expose()));
    match ends {
        Some(end) if end <= now => Verdict::Rejected("the access token has expired".into()),
        _ => Verdict::Valid(Identity { account: Account { name: "(token holder)".into(), id: None }, grant: None }),
    }
}

/// Who `claims` (userinfo or introspection) name.
fn account(claims: &Value) -> Account {
    let text = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_owned);
    let name =
        text("preferred_username").or_else(|| text("username")).or_else(|| text("email")).or_else(|| text("name"));
    let id = text("sub");
    Account { name: name.or_else(|| id.clone()).map_or_else(|| "(unnamed)".into(), Into::into), id }
}

#[async_trait]
impl Provider for OAuth {
    fn manifest(&self) -> &'static Manifest {
        &MANIFEST
    }

    fn urls(&self, profile: &Profile) -> Vec<(&'static str, String)> {
        let configured = Metadata::configured(profile.typed());
        let issuer = [("issuer", &configured.issuer)];
        issuer
            .into_iter()
            .chain(configured.named())
            .filter_map(|(key, url)| Some((key, nonempty(url)?.to_owned())))
            .collect()
    }

    typed_block!(Block);

    fn import(&self, profile: &Profile, now: DateTime<Utc>) -> Option<Grant> {
        let b: &Block = profile.typed();
        Some(Grant {
            refresh_token: nonempty_secret(&b.refresh_token).map(Secret::new),
            expires_at: b.expires_at.and_then(|s| DateTime::from_timestamp(s as i64, 0)),
            token_type: "Bearer".into(),
            ..Grant::bearer(nonempty_secret(&b.access_token)?, now)
        })
    }

    fn export(&self, grant: Option<&Grant>) -> Vec<(&'static str, Option<Value>)> {
        vec![
            ("access_token", grant.map(|g| g.access_token.expose().into())),
            ("refresh_token", grant.and_then(|g| g.refresh_token.as_ref()).map(|t| t.expose().into())),
            ("expires_at", grant.and_then(|g| g.expires_at).map(|t| t.timestamp().into())),
        ]
    }

    async fn begin(&self, cx: &Adapter, flow: &str, _input: Input, now: DateTime<Utc>) -> Result<Begun, FlowError> {
        let meta = discovery::endpoints(cx).await.map_err(FlowError::Unavailable)?;
        let client = client(cx, &meta).map_err(FlowError::Config)?;
        let block: &Block = cx.profile.typed();
        let scope = block.scope.as_deref();
        if flow == "device_pin" {
            if client.device_endpoint.is_empty() {
                return Err(FlowError::Config(
                    "this server names no device authorization endpoint: use --flow oauth_code".into(),
                ));
            }
            let extra: Vec<(&str, String)> = block.audience.iter().map(|a| ("audience", a.clone())).collect();
            return client.begin(cx, scope, &extra, now).await.map(Begun::Pending);
        }
        let endpoint = meta.authorization_endpoint.clone().ok_or_else(|| {
            FlowError::Config("this server names no authorization endpoint: use --flow device_pin".into())
        })?;
        let mut extra: Vec<(String, String)> = block.authorize_params.clone().into_iter().collect();
        extra.extend(block.audience.iter().map(|a| ("audience".to_owned(), a.clone())));
        let openid = scope.is_some_and(|s| s.split_whitespace().any(|s| s == "openid"));
        let authorize =
            oauth_code::Authorize { endpoint, client_id: client.client_id, scope, pkce: true, nonce: openid, extra };
        oauth_code::begin(cx, authorize, now).map(Begun::Pending)
    }

    async fn poll(&self, cx: &Adapter, flow: &PendingFlow, now: DateTime<Utc>) -> Poll {
        let meta = match discovery::endpoints(cx).await {
            Ok(meta) => meta,
            Err(e) => return Poll::Unknown(e),
        };
        match client(cx, &meta) {
            Ok(client) => client.poll(cx, flow, now).await,
            Err(e) => Poll::Unknown(e),
        }
    }

    async fn complete(&self, cx: &Adapter, flow: &PendingFlow, query: &CallbackQuery, now: DateTime<Utc>) -> Poll {
        let code = match oauth_code::code(query) {
            Ok(code) => code,
            Err(end) => return *end,
        };
        let meta = match discovery::endpoints(cx).await {
            Ok(meta) => meta,
            Err(e) => return Poll::Unknown(e),
        };
        let client = match client(cx, &meta) {
            Ok(client) => client,
            Err(e) => return Poll::Unknown(e),
        };
        match client.exchange(cx, oauth_code::exchange_fields(flow, code, client.client_id), now).await {
            Poll::Approved(grant) => {
                if let Some(expected) = flow.secret("nonce") {
                    let nonce = grant.secret("id_token").and_then(|t| id_token_nonce(t.expose()));
                    if nonce.as_deref() != Some(expected.expose()) {
                        return Poll::Gone("the ID token does not carry this login's nonce".into());
                    }
                }
                Poll::Approved(oauth_code::authorised(grant, flow))
            }
            other => other,
        }
    }

    async fn validate(&self, cx: &Adapter, grant: &Grant) -> Verdict<Identity> {
        let meta = match discovery::endpoints(cx).await {
            Ok(meta) => meta,
            Err(e) => return Verdict::Unknown(e),
        };
        let block: &Block = cx.profile.typed();
        let now = cx.gate().now();
        if block.introspect
            && let Some(endpoint) = &meta.introspection_endpoint
        {
            let client = match client(cx, &meta) {
                Ok(client) => client,
                Err(e) => return Verdict::Unknown(e),
            };
            return match client.introspect(cx, endpoint, grant.access_token.expose()).await {
                Ok(claims) if claims.get("active") == Some(&Value::Bool(true)) => {
                    Verdict::Valid(Identity { account: account(&claims), grant: None })
                }
                Ok(_) => Verdict::Rejected("the server says the access token is not active (introspection)".into()),
                Err(e) => Verdict::Unknown(e),
            };
        }
        let Some(endpoint) = &meta.userinfo_endpoint else {
            return by_expiry(grant, now);
        };
        let req = cx.http().get(endpoint).bearer_auth(grant.access_token.expose()).header("accept", "application/json");
        let resp = match cx.send(Kind::Read, req).await {
            Ok(r) => r,
            Err(e) => return Verdict::Unknown(e),
        };
        match resp.status() {
            s if s.is_success() => match super::answer::json::<Value>(resp, "the userinfo endpoint").await {
                Ok(claims) => Verdict::Valid(Identity { account: account(&claims), grant: None }),
                Err(e) => Verdict::Unknown(e),
            },
            StatusCode::UNAUTHORIZED => {
                Verdict::Rejected("the server rejected the access token (401 at userinfo)".into())
            }
            s => Verdict::Unknown(super::answer::status_error("the userinfo endpoint", s)),
        }
    }

    async fn refresh(&self, cx: &Adapter, grant: &Grant, now: DateTime<Utc>) -> Verdict<Grant> {
        let meta = match discovery::endpoints(cx).await {
            Ok(meta) => meta,
            Err(e) => return Verdict::Unknown(e),
        };
        match client(cx, &meta) {
            Ok(client) => client.refresh(cx, grant, now).await,
            Err(e) => Verdict::Unknown(e),
        }
    }

    /// RFC 7009: the refresh token first (it takes the access tokens with it on most servers),
    /// then the access token.
    async fn revoke(&self, cx: &Adapter, grant: &Grant) -> Result<(), String> {
        let meta = discovery::endpoints(cx).await?;
        let Some(endpoint) = meta.revocation_endpoint.clone() else { return Ok(()) };
        let client = client(cx, &meta)?;
        if let Some(refresh) = &grant.refresh_token {
            client.revoke(cx, &endpoint, refresh.expose()).await?;
        }
        client.revoke(cx, &endpoint, grant.access_token.expose()).await
    }

    fn token(&self, _cx: &Setup, grant: &Grant, out: &mut Extras) {
        if let Some(id_token) = grant.secret("id_token") {
            out.put("id_token", id_token.expose());
        }
    }
}
