//! The store's own record types: what is written to disk, versioned and compact, independent
//! of the machine library's types. Every value starts with a format byte; the rest is
//! `postcard`. Timestamps are nanoseconds since the epoch, states and causes are small numbers
//! that never change meaning.
//!
//! Format 3 is this build's. Values of the schema-2 release (JSON rows of the state-machine
//! library's own encoding) are read by [`legacy`] and rewritten on open.

use crate::grant::{Extras, Grant, PendingFlow, ProfileState};
use crate::machine::{Account, Cause, ConnKey, Connection, Machine, PendingKind, State, StateName, Transition};
use crate::secret::Secret;
use chrono::{DateTime, Utc};
use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The first byte of every value this build writes.
pub const FORMAT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("empty record")]
    Empty,
    #[error("record format {0} is not one this build reads")]
    Format(u8),
    #[error("undecodable record: {0}")]
    Decode(#[from] postcard::Error),
    #[error("undecodable legacy record: {0}")]
    Legacy(#[from] serde_json::Error),
    #[error("unknown {what} number {n}")]
    Unknown { what: &'static str, n: u8 },
}

type Pairs = Vec<(String, String)>;

#[derive(Serialize, Deserialize)]
struct ConnectionRec {
    state: u8,
    retry_refresh: bool,
    since: i64,
    grant: Option<GrantRec>,
    account: Option<(CompactString, Option<String>)>,
    validated_at: Option<i64>,
    last_error: Option<String>,
    failures: u32,
    next_attempt_at: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct GrantRec {
    access_token: String,
    refresh_token: Option<String>,
    token_type: CompactString,
    scope: Option<CompactString>,
    issued_at: i64,
    expires_at: Option<i64>,
    secrets: Pairs,
    facts: Pairs,
}

#[derive(Serialize, Deserialize)]
struct FlowRec {
    kind: String,
    user_code: Option<String>,
    verification_url: Option<String>,
    authorize_url: Option<String>,
    issued_at: i64,
    expires_at: i64,
    interval_secs: Option<u64>,
    secrets: Pairs,
}

#[derive(Serialize, Deserialize)]
struct TransitionRec {
    at: i64,
    from: u8,
    to: u8,
    cause: u8,
    detail: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct ProfileStateRec {
    facts: Pairs,
    secrets: Pairs,
}

/// Nanoseconds since the epoch, saturating: a time before 1677 is stored as the earliest one
/// this format holds, a time after 2262 as the latest.
fn nanos(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(if t.timestamp() < 0 { i64::MIN } else { i64::MAX })
}

fn time(n: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(n)
}

/// `t` as this format stores it: a legacy record read here is what it will be once rewritten.
fn storable(t: DateTime<Utc>) -> DateTime<Utc> {
    time(nanos(t))
}

fn secrets_out(m: &BTreeMap<String, Secret>) -> Pairs {
    m.iter().map(|(k, v)| (k.clone(), v.expose().to_owned())).collect()
}

fn secrets_in(p: Pairs) -> BTreeMap<String, Secret> {
    p.into_iter().map(|(k, v)| (k, Secret::new(v))).collect()
}

fn facts_out(m: &BTreeMap<String, String>) -> Pairs {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Stable numbers: appended to, never reordered.
const STATES: [StateName; 4] = [StateName::Disconnected, StateName::Pending, StateName::Connected, StateName::Expired];
const CAUSES: [Cause; 14] = [
    Cause::ConnectRequested,
    Cause::CredentialsSupplied,
    Cause::Approved,
    Cause::Validated,
    Cause::Refreshed,
    Cause::FlowExpired,
    Cause::Denied,
    Cause::Cancelled,
    Cause::Rejected,
    Cause::RefreshRejected,
    Cause::ExpiredUnrefreshed,
    Cause::Disconnected,
    Cause::Removed,
    Cause::RefreshAnswerLost,
];

fn number<T: PartialEq>(table: &[T], v: &T) -> u8 {
    table.iter().position(|x| x == v).expect("every variant is numbered") as u8
}

fn from_number<T: Copy>(table: &[T], n: u8, what: &'static str) -> Result<T, RecordError> {
    table.get(n as usize).copied().ok_or(RecordError::Unknown { what, n })
}

fn encode<T: Serialize>(rec: &T) -> Vec<u8> {
    let mut out = vec![FORMAT];
    postcard::to_io(rec, &mut out).expect("records encode into memory");
    out
}

/// `Ok(None)` for a legacy (JSON) value.
fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<Option<T>, RecordError> {
    match bytes.first() {
        None => Err(RecordError::Empty),
        Some(b'{') => Ok(None),
        Some(&FORMAT) => Ok(Some(postcard::from_bytes(&bytes[1..])?)),
        Some(&other) => Err(RecordError::Format(other)),
    }
}

fn grant_out(g: &Grant) -> GrantRec {
    GrantRec {
        access_token: g.access_token.expose().to_owned(),
        refresh_token: g.refresh_token.as_ref().map(|t| t.expose().to_owned()),
        token_type: g.token_type.clone(),
        scope: g.scope.clone(),
        issued_at: nanos(g.issued_at),
        expires_at: g.expires_at.map(nanos),
        secrets: secrets_out(g.secrets()),
        facts: facts_out(g.facts()),
    }
}

fn grant_in(r: GrantRec) -> Grant {
    Grant {
        access_token: Secret::new(r.access_token),
        refresh_token: r.refresh_token.map(Secret::new),
        token_type: r.token_type,
        scope: r.scope,
        issued_at: time(r.issued_at),
        expires_at: r.expires_at.map(time),
        extras: (!r.secrets.is_empty() || !r.facts.is_empty())
            .then(|| Box::new(Extras { secrets: secrets_in(r.secrets), facts: r.facts.into_iter().collect() })),
    }
}

/// A connection's row: its state and data, the flow excluded (it has its own table).
pub fn encode_connection(m: &Machine) -> Vec<u8> {
    let c = m.connection();
    let (state, retry_refresh) = match m.state() {
        State::Disconnected {} => (0, false),
        State::Pending { kind: PendingKind::Flow } => (1, false),
        State::Pending { kind: PendingKind::Validating } => (2, false),
        State::Connected {} => (3, false),
        State::Expired { retry_refresh } => (4, *retry_refresh),
    };
    encode(&ConnectionRec {
        state,
        retry_refresh,
        since: nanos(c.since),
        grant: c.grant.as_ref().map(grant_out),
        account: c.account.as_ref().map(|a| (a.name.clone(), a.id.clone())),
        validated_at: c.validated_at.map(nanos),
        last_error: c.last_error.clone(),
        failures: c.failures,
        next_attempt_at: c.next_attempt_at.map(nanos),
    })
}

pub fn decode_connection(key: &str, bytes: &[u8], flow: Option<PendingFlow>) -> Result<Machine, RecordError> {
    let Some(r) = decode::<ConnectionRec>(bytes)? else { return legacy::connection(bytes, flow) };
    let state = match r.state {
        0 => State::Disconnected {},
        1 => State::Pending { kind: PendingKind::Flow },
        2 => State::Pending { kind: PendingKind::Validating },
        3 => State::Connected {},
        4 => State::Expired { retry_refresh: r.retry_refresh },
        n => return Err(RecordError::Unknown { what: "state", n }),
    };
    let (provider, profile) = key.split_once('/').unwrap_or((key, ""));
    let connection = Connection {
        key: ConnKey::new(provider, profile),
        since: time(r.since),
        grant: r.grant.map(grant_in),
        account: r.account.map(|(name, id)| Account { name, id }),
        validated_at: r.validated_at.map(time),
        last_error: r.last_error,
        failures: r.failures,
        next_attempt_at: r.next_attempt_at.map(time),
        flow: flow.map(Box::new),
        last_poll_at: None,
    };
    Ok(Machine::restore(connection, state))
}

pub fn encode_flow(f: &PendingFlow) -> Vec<u8> {
    encode(&FlowRec {
        kind: f.kind.clone(),
        user_code: f.user_code.clone(),
        verification_url: f.verification_url.clone(),
        authorize_url: f.authorize_url.clone(),
        issued_at: nanos(f.issued_at),
        expires_at: nanos(f.expires_at),
        interval_secs: f.interval_secs,
        secrets: secrets_out(&f.secrets),
    })
}

pub fn decode_flow(bytes: &[u8]) -> Result<PendingFlow, RecordError> {
    let Some(r) = decode::<FlowRec>(bytes)? else { return legacy::flow(bytes) };
    Ok(PendingFlow {
        kind: r.kind,
        user_code: r.user_code,
        verification_url: r.verification_url,
        authorize_url: r.authorize_url,
        issued_at: time(r.issued_at),
        expires_at: time(r.expires_at),
        interval_secs: r.interval_secs,
        secrets: secrets_in(r.secrets),
    })
}

pub fn encode_transition(t: &Transition) -> Vec<u8> {
    encode(&TransitionRec {
        at: nanos(t.at),
        from: number(&STATES, &t.from),
        to: number(&STATES, &t.to),
        cause: number(&CAUSES, &t.cause),
        detail: t.detail.clone(),
    })
}

pub fn decode_transition(bytes: &[u8]) -> Result<Transition, RecordError> {
    let Some(r) = decode::<TransitionRec>(bytes)? else {
        let t: Transition = serde_json::from_slice(bytes)?;
        return Ok(Transition { at: storable(t.at), ..t });
    };
    Ok(Transition {
        at: time(r.at),
        from: from_number(&STATES, r.from, "state")?,
        to: from_number(&STATES, r.to, "state")?,
        cause: from_number(&CAUSES, r.cause, "cause")?,
        detail: r.detail,
    })
}

pub fn encode_profile_state(s: &ProfileState) -> Vec<u8> {
    encode(&ProfileStateRec { facts: facts_out(&s.facts), secrets: secrets_out(&s.secrets) })
}

pub fn decode_profile_state(bytes: &[u8]) -> Result<ProfileState, RecordError> {
    let r = decode::<ProfileStateRec>(bytes)?.ok_or(RecordError::Format(b'{'))?;
    Ok(ProfileState { facts: r.facts.into_iter().collect(), secrets: secrets_in(r.secrets) })
}

/// The schema-2 release's rows: statig's serde encoding of the machine, as JSON.
mod legacy {
    use super::*;

    #[derive(Deserialize)]
    struct Row {
        shared_storage: Conn,
        state: LegacyState,
    }

    #[derive(Deserialize)]
    enum LegacyState {
        Disconnected {},
        Pending { kind: PendingKind },
        Connected {},
        Expired { retry_refresh: bool },
    }

    #[derive(Deserialize)]
    struct Conn {
        key: ConnKey,
        since: DateTime<Utc>,
        credentials: Option<Credentials>,
        account: Option<Account>,
        validated_at: Option<DateTime<Utc>>,
        last_error: Option<String>,
        failures: u32,
        next_attempt_at: Option<DateTime<Utc>>,
    }

    #[derive(Deserialize)]
    struct Credentials {
        access_token: String,
        refresh_token: Option<String>,
        token_type: String,
        scope: Option<String>,
        issued_at: DateTime<Utc>,
        expires_at: Option<DateTime<Utc>>,
    }

    /// The schema-2 device-code flow: Trakt's, the only one that release had.
    #[derive(Deserialize)]
    struct DeviceFlow {
        device_code: String,
        user_code: String,
        verification_url: String,
        issued_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
        interval_secs: u64,
    }

    pub fn connection(bytes: &[u8], flow: Option<PendingFlow>) -> Result<Machine, RecordError> {
        let row: Row = serde_json::from_slice(bytes)?;
        let c = row.shared_storage;
        let state = match row.state {
            LegacyState::Disconnected {} => State::Disconnected {},
            LegacyState::Pending { kind } => State::Pending { kind },
            LegacyState::Connected {} => State::Connected {},
            LegacyState::Expired { retry_refresh } => State::Expired { retry_refresh },
        };
        let grant = c.credentials.map(|g| Grant {
            access_token: Secret::new(g.access_token),
            refresh_token: g.refresh_token.map(Secret::new),
            token_type: g.token_type.into(),
            scope: g.scope.map(Into::into),
            issued_at: storable(g.issued_at),
            expires_at: g.expires_at.map(storable),
            extras: None,
        });
        let connection = Connection {
            key: c.key,
            since: storable(c.since),
            grant,
            account: c.account,
            validated_at: c.validated_at.map(storable),
            last_error: c.last_error,
            failures: c.failures,
            next_attempt_at: c.next_attempt_at.map(storable),
            flow: flow.map(Box::new),
            last_poll_at: None,
        };
        Ok(Machine::restore(connection, state))
    }

    pub fn flow(bytes: &[u8]) -> Result<PendingFlow, RecordError> {
        let f: DeviceFlow = serde_json::from_slice(bytes)?;
        Ok(PendingFlow {
            kind: "device_pin".into(),
            user_code: Some(f.user_code),
            verification_url: Some(f.verification_url),
            authorize_url: None,
            issued_at: storable(f.issued_at),
            expires_at: storable(f.expires_at),
            interval_secs: Some(f.interval_secs),
            secrets: BTreeMap::from([("device_code".to_owned(), Secret::new(f.device_code))]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `store_records` fuzz target: a legacy flow issued in 4076 read as 4076 but
    /// was rewritten as 2262, so what the daemon held was not what it stored; and a time before
    /// 1677 was stored as the latest time there is, turning a long-past expiry into a far future.
    #[test]
    fn times_beyond_the_formats_range_are_read_as_they_will_be_stored() {
        let legacy = br#"{"device_code":"d","user_code":"U","verification_url":"https://trakt.tv/activate",
            "issued_at":"4076-11-28T12:00:00Z","expires_at":"1000-01-01T00:00:00Z","interval_secs":5}"#;
        let flow = decode_flow(legacy).unwrap();
        assert_eq!(decode_flow(&encode_flow(&flow)).unwrap(), flow, "rewriting changes nothing");
        assert_eq!(flow.issued_at, time(i64::MAX), "the latest time the format holds");
        assert_eq!(flow.expires_at, time(i64::MIN), "a time long past stays in the past");
    }
}
