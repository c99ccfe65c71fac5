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
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
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
