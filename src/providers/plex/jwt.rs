//! A Plex profile's Ed25519 device key: made once, kept in the profile's provider state as a
//! secret, published as a JWK, and used to sign the short device JWTs that Plex exchanges for
//! its own 7-day tokens.

use authkeeper_state::{ProfileState, Secret};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The provider-state secret that holds the key's 32-byte seed (base64url).
pub const SEED: &str = "device_key";

pub struct DeviceKey {
    key: SigningKey,
    kid: String,
}

impl DeviceKey {
    /// A new seed from the operating system's CSPRNG, to keep in the profile's state.
    pub fn generate(state: &mut ProfileState) {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("the operating system's random source works");
        state.secrets.insert(SEED.into(), Secret::new(URL_SAFE_NO_PAD.encode(seed)));
    }

    /// The profile's key, if it has one.
    pub fn of(state: &ProfileState) -> Option<Self> {
        let seed = URL_SAFE_NO_PAD.decode(state.secrets.get(SEED)?.expose()).ok()?;
        let key = SigningKey::from_bytes(&seed.try_into().ok()?);
        let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
        // RFC 7638: the thumbprint of the required members, in lexicographic order.
        let thumbprint = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(thumbprint.as_bytes()));
        Some(Self { key, kid })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        let x = URL_SAFE_NO_PAD.encode(self.key.verifying_key().as_bytes());
        json!({"kty": "OKP", "crv": "Ed25519", "x": x, "use": "sig", "alg": "EdDSA", "kid": self.kid})
    }

    /// A compact JWS of `claims`, signed EdDSA, with `kid` in its header.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid});
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = self.key.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }
}

/// The device JWT's lifetime (Plex: five minutes).
const DEVICE_JWT_SECS: i64 = 300;
/// The scopes a refreshed token asks for.
const SCOPE: &str = "username,email,friendly_name,restricted,anonymous,joinedAt";

/// Claims of a device JWT for `nonce`, issued by the profile's client identifier.
pub fn claims(client_identifier: &str, nonce: &str, now: chrono::DateTime<chrono::Utc>) -> Value {
    let iat = now.timestamp();
    json!({
        "nonce": nonce,
        "scope": SCOPE,
        "aud": "plex.tv",
        "iss": client_identifier,
        "iat": iat,
        "exp": iat + DEVICE_JWT_SECS,
    })
}

use super::{CLIENTS, request, request_as, unknown_status};
use crate::limits::Kind;
use crate::providers::answer::json;
use crate::providers::{Adapter, Identity, Verdict, jwt_expiry};
use authkeeper_state::Grant;
use reqwest::{Method, StatusCode};

/// What a refresh token means for a JWT grant: the device key refreshes it, so the grant
/// carries the key's id where a refresh token would be (no secret: the key stays in the
/// profile's state).
pub fn marker(key: &DeviceKey) -> Secret {
    Secret::new(format!("device-key:{}", key.kid()))
}

/// A grant that is a Plex JWT.
pub fn is_jwt(grant: &Grant) -> bool {
    grant.fact("auth_mode") == Some("jwt")
}

/// Plex's error body: `{"errors": [{"code", "message"}]}`, as one line.
async fn plex_error(resp: reqwest::Response) -> (u16, Option<i64>, String) {
    let status = resp.status().as_u16();
    let body: Value = json(resp, "Plex").await.unwrap_or(Value::Null);
    let first = &body["errors"][0];
    (status, first["code"].as_i64(), first["message"].as_str().unwrap_or_default().to_owned())
}

/// Register the device key with a legacy `grant` (`POST /api/v2/auth/jwk`). A key already
/// registered for the device is fine: a crash may have come between the two steps.
pub async fn register(cx: &Adapter, grant: &Grant, key: &DeviceKey) -> Result<(), Verdict<Identity>> {
    let req = request(cx, Method::POST, CLIENTS, "/api/v2/auth/jwk", Some(grant)).json(&json!({"jwk": key.jwk()}));
    let resp = cx.send(Kind::Write, req).await.map_err(Verdict::Unknown)?;
    match resp.status() {
        s if s.is_success() => Ok(()),
        StatusCode::UNPROCESSABLE_ENTITY => match plex_error(resp).await {
            (_, Some(1091), _) => Ok(()),
            (s, code, m) => Err(Verdict::Rejected(format!("Plex refused the device key ({s} {code:?}: {m})"))),
        },
        StatusCode::UNAUTHORIZED => {
            Err(Verdict::Rejected("Plex rejected the token when registering the device key (401)".into()))
        }
        s => Err(Verdict::Unknown(unknown_status(s))),
    }
}

/// A signed device JWT for a fresh nonce (`GET /api/v2/auth/nonce`).
pub async fn device_jwt(
    cx: &Adapter,
    key: &DeviceKey,
    client: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<String, String> {
    let resp = cx.send(Kind::Read, request_as(cx, Method::GET, CLIENTS, "/api/v2/auth/nonce", client)).await?;
    if !resp.status().is_success() {
        return Err(unknown_status(resp.status()));
    }
    let body: Value = json(resp, "Plex").await?;
    let nonce = body["nonce"].as_str().ok_or("Plex's nonce answer has no nonce")?;
    Ok(key.sign(&claims(client, nonce, now)))
}

/// A Plex JWT as a grant: its end read from its own `exp`, the device key as its refresh.
pub fn grant(token: String, key: &DeviceKey, client: &str, now: chrono::DateTime<chrono::Utc>) -> Grant {
    let mut grant = Grant {
        token_type: "plex".into(),
        expires_at: jwt_expiry(&token),
        refresh_token: Some(marker(key)),
        ..Grant::bearer(token, now)
    };
    grant.set_fact("client_identifier", client);
    grant.set_fact("auth_mode", "jwt");
    grant
}

/// A new Plex JWT for the device key: nonce, device JWT, `POST /api/v2/auth/token`.
pub async fn refresh(
    cx: &Adapter,
    key: &DeviceKey,
    client: &str,
    old: &Grant,
    now: chrono::DateTime<chrono::Utc>,
) -> Verdict<Grant> {
    let jwt = match device_jwt(cx, key, client, now).await {
        Ok(jwt) => jwt,
        Err(e) => return Verdict::Unknown(e),
    };
    let req = request_as(cx, Method::POST, CLIENTS, "/api/v2/auth/token", client).json(&json!({ "jwt": jwt }));
    let resp = match cx.send(Kind::Write, req).await {
        Ok(r) => r,
        Err(e) => return Verdict::Unknown(e),
    };
    let status = resp.status();
    if status.is_success() {
        let body: Value = match json(resp, "Plex").await {
            Ok(b) => b,
            Err(e) => return Verdict::Unknown(e),
        };
        let Some(token) = body["auth_token"].as_str() else {
            return Verdict::Unknown("Plex's token answer has no auth_token".into());
        };
        let mut fresh = grant(token.to_owned(), key, client, now);
        for (name, value) in old.facts() {
            if fresh.fact(name).is_none() {
                fresh.set_fact(name.clone(), value.clone());
            }
        }
        if let Some(t) = old.secret("server_token") {
            fresh.set_secret("server_token", t.clone());
        }
        return Verdict::Valid(fresh);
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return Verdict::Unknown(unknown_status(status));
    }
    // 1097 and 422 are about the key, 1001 is a removed device; anything else (a stale nonce,
    // a clock that drifted) is tried again with a new nonce.
    match plex_error(resp).await {
        (_, Some(1097), m) => Verdict::Rejected(format!(
            "Plex refused the device JWT: its iss is not the client identifier the key was registered for (1097: {m})"
        )),
        (401, Some(1001), m) => Verdict::Rejected(format!("Plex refused the device key (401: {m}): log in again")),
        (422, code, m) => Verdict::Rejected(format!(
            "Plex refused the device JWT's signature or key (422, code {}: {m})",
            code.unwrap_or_default()
        )),
        (s, code, m) => Verdict::Unknown(format!(
            "Plex refused the device JWT ({s}, code {}: {m}); a new nonce is tried next time",
            code.unwrap_or_default()
        )),
    }
}

/// What became of upgrading a legacy token to a Plex JWT.
pub enum Upgrade {
    Done(Grant),
    /// Plex refused the key or the device JWT: the legacy token still works.
    Refused(String),
    NoAnswer(String),
}

/// Register the key with the legacy `grant`, then take the first Plex JWT. A legacy token Plex
/// no longer takes may already have been traded (an upgrade whose answer was lost): the key
/// is tried alone before giving up.
pub async fn upgrade(
    cx: &Adapter,
    grant: &Grant,
    key: &DeviceKey,
    client: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Upgrade {
    let registered = register(cx, grant, key).await;
    if let Err(Verdict::Unknown(e)) = registered {
        return Upgrade::NoAnswer(e);
    }
    match (refresh(cx, key, client, grant, now).await, registered) {
        (Verdict::Valid(fresh), _) => Upgrade::Done(fresh),
        (_, Err(Verdict::Rejected(e))) | (Verdict::Rejected(e), _) => Upgrade::Refused(e),
        (Verdict::Unknown(e), _) => Upgrade::NoAnswer(e),
    }
}
