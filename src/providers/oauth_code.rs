//! What every browser-redirect (authorization code) flow shares: a random `state` bound to the
//! pending flow, PKCE S256 where the provider takes it, the authorize URL, and reading the
//! callback. The redirect URI comes from the web listener's configured public URL only; the
//! grant keeps it (fact `redirect_uri`) so that a change of public URL can be reported.

use super::{Adapter, FlowError, Poll};
use crate::web::CallbackQuery;
use authkeeper_state::{Grant, PendingFlow, Secret};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeDelta, Utc};
use reqwest::Url;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// How long a browser login may take before its `state` dies.
pub const TTL: TimeDelta = TimeDelta::minutes(15);

/// 32 bytes from the operating system's CSPRNG, base64url without padding (43 characters).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The PKCE S256 challenge of `verifier` (RFC 7636 §4.2).
pub fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// One provider's authorize request.
pub struct Authorize<'a> {
    /// The authorize endpoint, e.g. `https://trakt.tv/oauth/authorize`.
    pub endpoint: String,
    pub client_id: &'a str,
    pub scope: Option<&'a str>,
    /// Send a PKCE S256 challenge (and the verifier at the exchange).
    pub pkce: bool,
    /// Send an OpenID Connect `nonce`, kept with the flow to check the ID token against.
    pub nonce: bool,
    /// More parameters for the authorize request (an `audience`, a `prompt`).
    pub extra: Vec<(String, String)>,
}

/// The redirect URI a login would use now, or why there is none.
pub fn redirect_uri(cx: &Adapter) -> Result<String, FlowError> {
    cx.redirect_uri().ok_or_else(|| {
        let name = cx.provider().manifest().name;
        FlowError::Config(format!(
            "a browser login needs the web listener: set \"authkeeper\": {{\"web\": {{\"listen\": \"127.0.0.1:8765\", \
             \"public_url\": \"https://…\"}}}} in config.json and register {{public_url}}/oauth/callback/{name} as \
             the app's redirect URI"
        ))
    })
}

/// A pending `oauth_code` flow: the authorize URL the user's browser opens, and the flow's
/// secrets (`state`, the PKCE verifier, the redirect URI it was sent with).
pub fn begin(cx: &Adapter, a: Authorize<'_>, now: DateTime<Utc>) -> Result<PendingFlow, FlowError> {
    let redirect_uri = redirect_uri(cx)?;
    let state = random_token();
    let mut params = vec![
        ("response_type", "code".to_owned()),
        ("client_id", a.client_id.to_owned()),
        ("redirect_uri", redirect_uri.clone()),
        ("state", state.clone()),
    ];
    if let Some(scope) = a.scope {
        params.push(("scope", scope.to_owned()));
    }
    let mut secrets = BTreeMap::from([
        ("state".to_owned(), Secret::new(state)),
        ("redirect_uri".to_owned(), Secret::new(redirect_uri)),
    ]);
    if a.pkce {
        let verifier = random_token();
        params.push(("code_challenge", challenge(&verifier)));
        params.push(("code_challenge_method", "S256".to_owned()));
        secrets.insert("code_verifier".into(), Secret::new(verifier));
    }
    if a.nonce {
        let nonce = random_token();
        params.push(("nonce", nonce.clone()));
        secrets.insert("nonce".into(), Secret::new(nonce));
    }
    let mut url = Url::parse_with_params(&a.endpoint, &params)
        .map_err(|e| FlowError::Config(format!("bad authorize endpoint {}: {e}", a.endpoint)))?;
    url.query_pairs_mut().extend_pairs(&a.extra);
    Ok(PendingFlow {
        kind: "oauth_code".into(),
        user_code: None,
        verification_url: None,
        authorize_url: Some(url.into()),
        issued_at: now,
        expires_at: now + TTL,
        interval_secs: None,
        secrets,
    })
}

/// The authorization code a callback carries, or how the flow ends instead.
pub fn code(query: &CallbackQuery) -> Result<&str, Box<Poll>> {
    if let Some(error) = query.get("error") {
        if error == "access_denied" {
            return Err(Box::new(Poll::Denied));
        }
        let detail = query.get("error_description").map(|d| format!(": {d}")).unwrap_or_default();
        return Err(Box::new(Poll::Gone(format!("the provider refused the login ({error}{detail})"))));
    }
    match query.get("code").filter(|c| !c.is_empty()) {
        Some(code) => Ok(code),
        None => Err(Box::new(Poll::Gone("the provider's answer carried no authorization code".into()))),
    }
}

/// The fields of the code exchange (RFC 6749 §4.1.3, plus the PKCE verifier when one was sent).
pub fn exchange_fields(flow: &PendingFlow, code: &str, client_id: &str) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("grant_type", "authorization_code".to_owned()),
        ("code", code.to_owned()),
        ("client_id", client_id.to_owned()),
    ];
    if let Some(uri) = flow.secret("redirect_uri") {
        fields.push(("redirect_uri", uri.expose().to_owned()));
    }
    if let Some(verifier) = flow.secret("code_verifier") {
        fields.push(("code_verifier", verifier.expose().to_owned()));
    }
    fields
}

/// `grant`, remembering the redirect URI `flow` was authorised with.
pub fn authorised(mut grant: Grant, flow: &PendingFlow) -> Grant {
    if let Some(uri) = flow.secret("redirect_uri") {
        grant.set_fact("redirect_uri", uri.expose());
    }
    grant
}

/// The exchange fields as a JSON object, for providers that take JSON.
pub fn as_json(fields: &[(&'static str, String)]) -> serde_json::Value {
    fields.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(v.as_str()))).collect()
}
