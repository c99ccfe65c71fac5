//! Tautulli: an API key plus the server's URL. Every answer is an envelope
//! `{"response": {"result", "message", "data"}}`, and its errors come with HTTP 400, so the
//! verdict follows `result` and `message`, not the status: a wrong key is a rejection; a
//! disabled API or an unreachable server says nothing about the key.

use super::answer::{BodyError, read_json, status_error};
use super::{
    Adapter, Begun, Extras, FlowError, FlowManifest, Identity, Input, Manifest, Profile, Provider, Setup, Verdict,
    nonempty, nonempty_secret,
};
use crate::limits::Kind;
use async_trait::async_trait;
use authkeeper_state::{Account, Grant, Secret};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use std::sync::LazyLock;

pub struct Tautulli;

const LABEL: &str = "Tautulli";
/// The fact that keeps a server URL given with the connect; it wins over the profile's. The
/// fact `server_url` only shows the server last used (a new one in the config takes effect).
const GIVEN: &str = "given_server_url";

static MANIFEST: LazyLock<Manifest> = LazyLock::new(|| Manifest {
    name: "tautulli",
    label: LABEL,
    block: "tautulli",
    flows: vec![FlowManifest {
        flow: "api_key",
        fields: vec!["api_key", "server_url"],
        secret_fields: vec!["api_key"],
    }],
    config: vec!["server_url"],
    credential_keys: &["api_key"],
    named_profiles: false,
});

/// The `tautulli` block of CrossWatch's config.json.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Block {
    pub server_url: Option<String>,
    pub api_key: Option<Secret>,
}

#[derive(Deserialize)]
struct Envelope {
    response: Body,
}

#[derive(Deserialize)]
struct Body {
    result: String,
    message: Option<String>,
    #[serde(default)]
    data: Value,
}

/// What one API call told.
enum Answer {
    Success(Value),
    /// The key is wrong.
    BadKey(String),
    /// No verdict on the key: the API is off, the server is down, the answer unreadable.
    Unknown(String),
}

/// The server: the URL given with the connect, else the profile's `server_url`, else `base_url`.
fn server(cx: &Setup, grant: Option<&Grant>) -> Result<String, String> {
    let block: &Block = cx.profile.typed();
    grant
        .and_then(|g| g.fact(GIVEN))
        .or(nonempty(&block.server_url))
        .or(cx.profile.base_url.as_deref())
        .map(|s| s.trim_end_matches('/').to_owned())
        .ok_or_else(|| {
            "Tautulli needs its server URL: server_url in the tautulli block of config.json, or in the connect \
             body (e.g. http://192.168.1.10:8181)"
                .into()
        })
}

async fn call(cx: &Adapter, server: &str, key: &str, cmd: &str) -> Answer {
    let req = cx.http().get(format!("{server}/api/v2")).query(&[("apikey", key), ("cmd", cmd)]);
    let resp = match cx.send(Kind::Read, req).await {
        Ok(r) => r,
        Err(e) => return Answer::Unknown(e),
    };
    let status = resp.status();
    let envelope = match read_json::<Envelope>(resp, LABEL).await {
        Ok(e) => e.response,
        Err(_) if !status.is_success() => return Answer::Unknown(status_error(LABEL, status)),
        Err(e @ BodyError::NotJson { .. }) => {
            return Answer::Unknown(format!("{e} (is server_url a Tautulli server?)"));
        }
        Err(e) => return Answer::Unknown(e.to_string()),
    };
    if envelope.result == "success" {
        // A success envelope under an error status is no verdict: it says the key is good
        // and the status says the answer is not.
        if !status.is_success() {
            return Answer::Unknown(status_error(LABEL, status));
        }
        return Answer::Success(envelope.data);
    }
    let message = envelope.message.unwrap_or_default();
    let lower = message.to_ascii_lowercase();
    if lower.contains("invalid apikey") || lower.contains("invalid api key") {
        Answer::BadKey(format!("Tautulli rejected the API key ({message})"))
    } else if lower.contains("api not enabled") {
        Answer::Unknown("Tautulli's API is not enabled: turn it on in Settings → Web Interface → API".into())
    } else {
        Answer::Unknown(format!("Tautulli answered {cmd} with an error: {message}"))
    }
}

#[async_trait]
impl Provider for Tautulli {
    fn manifest(&self) -> &'static Manifest {
        &MANIFEST
    }

    fn urls(&self, profile: &Profile) -> Vec<(&'static str, String)> {
        nonempty(&profile.typed::<Block>().server_url).map(|u| ("server_url", u.to_owned())).into_iter().collect()
    }

    typed_block!(Block);

    fn import(&self, profile: &Profile, now: DateTime<Utc>) -> Option<Grant> {
        let b: &Block = profile.typed();
        Some(Grant { token_type: "api_key".into(), ..Grant::bearer(nonempty_secret(&b.api_key)?, now) })
    }

    fn export(&self, grant: Option<&Grant>) -> Vec<(&'static str, Option<Value>)> {
        // A key is the user's to keep: written when in use, never removed.
        grant.map(|g| ("api_key", Some(g.access_token.expose().into()))).into_iter().collect()
    }

    async fn begin(&self, cx: &Adapter, _flow: &str, input: Input, now: DateTime<Utc>) -> Result<Begun, FlowError> {
        let key = input.get("api_key").map(|k| k.expose().trim()).filter(|k| !k.is_empty());
        let key = key.ok_or_else(|| {
            FlowError::Input("the api_key flow needs api_key (Tautulli: Settings → Web Interface → API)".into())
        })?;
        let mut grant = Grant { token_type: "api_key".into(), ..Grant::bearer(key, now) };
        if let Some(url) = input.get("server_url").map(|u| u.expose().trim()).filter(|u| !u.is_empty()) {
            let parsed = reqwest::Url::parse(url).map_err(|e| FlowError::Input(format!("server_url {url:?}: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(FlowError::Input(format!("server_url {url:?} must be an http:// or https:// URL")));
            }
            cx.profile.check_url("server_url", url).map_err(FlowError::Input)?;
            grant.set_fact(GIVEN, url.trim_end_matches('/'));
        }
        server(cx, Some(&grant)).map_err(FlowError::Config)?;
        Ok(Begun::Granted(grant))
    }

    async fn validate(&self, cx: &Adapter, grant: &Grant) -> Verdict<Identity> {
        let server = match server(cx, Some(grant)) {
            Ok(s) => s,
            Err(e) => return Verdict::Unknown(e),
        };
        let key = grant.access_token.expose();
        match call(cx, &server, key, "arnold").await {
            Answer::Success(_) => {}
            Answer::BadKey(why) => return Verdict::Rejected(why),
            Answer::Unknown(why) => return Verdict::Unknown(why),
        }
        let info = match call(cx, &server, key, "get_server_info").await {
            Answer::Success(info) => info,
            Answer::BadKey(why) => return Verdict::Rejected(why),
            Answer::Unknown(why) => return Verdict::Unknown(why),
        };
        let text = |k: &str| info.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
        let mut updated = grant.clone();
        updated.set_fact("server_url", &server);
        for (field, fact) in
            [("pms_name", "plex_server"), ("pms_version", "plex_version"), ("pms_identifier", "machine_id")]
        {
            if let Some(v) = text(field) {
                updated.set_fact(fact, v);
            }
        }
        let name = text("pms_name").map_or_else(|| format!("Tautulli at {server}"), |n| format!("Tautulli for {n}"));
        let grant = (updated != *grant).then_some(updated);
        Verdict::Valid(Identity { account: Account { name: name.into(), id: None }, grant })
    }

    fn token(&self, cx: &Setup, grant: &Grant, out: &mut Extras) {
        out.put("server_url", server(cx, Some(grant)).ok());
    }
}
