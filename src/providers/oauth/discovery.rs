//! An authorization server's endpoints: from the instance's config where given, else from its
//! metadata (`/.well-known/openid-configuration`, or RFC 8414's
//! `/.well-known/oauth-authorization-server`), fetched once an hour per issuer.

use super::Block;
use crate::limits::Kind;
use crate::providers::Adapter;
use crate::providers::answer::{json, status_error};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// How long fetched metadata is trusted.
const TTL: Duration = Duration::from_secs(3600);

/// What the daemon uses of a server's metadata.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Metadata {
    pub issuer: Option<String>,
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: Option<String>,
    pub device_authorization_endpoint: Option<String>,
    pub userinfo_endpoint: Option<String>,
    pub introspection_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
}

/// Metadata by issuer, with when it was fetched.
type Cache = Mutex<HashMap<String, (Arc<Metadata>, Instant)>>;

static CACHE: LazyLock<Cache> = LazyLock::new(Default::default);

impl Metadata {
    /// The endpoints, each with its name.
    pub fn named(&self) -> [(&'static str, &Option<String>); 6] {
        [
            ("authorization_endpoint", &self.authorization_endpoint),
            ("token_endpoint", &self.token_endpoint),
            ("device_authorization_endpoint", &self.device_authorization_endpoint),
            ("userinfo_endpoint", &self.userinfo_endpoint),
            ("introspection_endpoint", &self.introspection_endpoint),
            ("revocation_endpoint", &self.revocation_endpoint),
        ]
    }

    /// What the instance's config gives.
    pub fn configured(block: &Block) -> Self {
        Metadata {
            issuer: block.issuer.clone(),
            authorization_endpoint: block.authorization_endpoint.clone(),
            token_endpoint: block.token_endpoint.clone(),
            device_authorization_endpoint: block.device_authorization_endpoint.clone(),
            userinfo_endpoint: block.userinfo_endpoint.clone(),
            introspection_endpoint: block.introspection_endpoint.clone(),
            revocation_endpoint: block.revocation_endpoint.clone(),
            token_endpoint_auth_methods_supported: None,
        }
    }
}

/// The instance's endpoints: its own settings over the server's metadata.
pub async fn endpoints(cx: &Adapter) -> Result<Arc<Metadata>, String> {
    let block: &Block = cx.profile.typed();
    let configured = Metadata::configured(block);
    let Some(issuer) = block.issuer.as_deref().map(|i| i.trim_end_matches('/')) else {
        return match configured.token_endpoint {
            Some(_) => Ok(Arc::new(configured)),
            None => Err("an oauth instance needs issuer, or at least token_endpoint, in config.json".into()),
        };
    };
    let found = discover(cx, issuer).await?;
    let or = |own: Option<String>, theirs: &Option<String>| own.or_else(|| theirs.clone());
    let merged = Metadata {
        issuer: Some(issuer.to_owned()),
        authorization_endpoint: or(configured.authorization_endpoint, &found.authorization_endpoint),
        token_endpoint: or(configured.token_endpoint, &found.token_endpoint),
        device_authorization_endpoint: or(
            configured.device_authorization_endpoint,
            &found.device_authorization_endpoint,
        ),
        userinfo_endpoint: or(configured.userinfo_endpoint, &found.userinfo_endpoint),
        introspection_endpoint: or(configured.introspection_endpoint, &found.introspection_endpoint),
        revocation_endpoint: or(configured.revocation_endpoint, &found.revocation_endpoint),
        token_endpoint_auth_methods_supported: found.token_endpoint_auth_methods_supported.clone(),
    };
    // What the server publishes is held to the same rule as what the config names.
    for (name, url) in merged.named() {
        if let Some(url) = url {
            cx.profile.check_url(&format!("the {name} of {issuer}"), url)?;
        }
    }
    Ok(Arc::new(merged))
}

/// The metadata `issuer` publishes, from the cache when fresh.
async fn discover(cx: &Adapter, issuer: &str) -> Result<Arc<Metadata>, String> {
    if let Some((meta, at)) = CACHE.lock().unwrap().get(issuer)
        && at.elapsed() < TTL
    {
        return Ok(meta.clone());
    }
    let url = reqwest::Url::parse(issuer).map_err(|e| format!("issuer {issuer:?} is not a URL: {e}"))?;
    // OIDC Discovery appends to the issuer; RFC 8414 inserts before the issuer's path.
    let path = url.path().trim_end_matches('/');
    let origin = url.origin().ascii_serialization();
    let candidates = [
        format!("{issuer}/.well-known/openid-configuration"),
        format!("{origin}/.well-known/oauth-authorization-server{path}"),
    ];
    let mut last = String::new();
    for candidate in candidates {
        let resp = cx.send(Kind::Read, cx.http().get(&candidate).header("accept", "application/json")).await?;
        if !resp.status().is_success() {
            last = status_error(&format!("the metadata at {candidate}"), resp.status());
            continue;
        }
        let meta: Metadata = json(resp, "the authorization server's metadata").await?;
        // OIDC Discovery §4.3, RFC 8414 §3.3: the document must name the issuer asked for.
        if meta.issuer.as_deref().map(|i| i.trim_end_matches('/')) != Some(issuer) {
            return Err(format!("the metadata at {candidate} names another issuer ({:?})", meta.issuer));
        }
        let meta = Arc::new(meta);
        CACHE.lock().unwrap().insert(issuer.to_owned(), (meta.clone(), Instant::now()));
        return Ok(meta);
    }
    Err(format!("no metadata for issuer {issuer}: {last}"))
}
