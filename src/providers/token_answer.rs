//! What `GET …/token` answers: `access_token`, `token_type`, `expires_at`, `scope` and
//! `account` from the grant, then what the provider adds (which cannot replace those five).
//! Written straight from the grant into the answer's bytes: the token lookup is every
//! consumer's hot path, and a lookup allocates nothing here.

use super::Setup;
use authkeeper_state::Grant;
use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Serialize;

/// The members every answer has, in order; a provider's additions never replace them.
const FIELDS: [&str; 5] = ["access_token", "token_type", "expires_at", "scope", "account"];

/// Where a provider writes what it adds to a token answer: each member goes straight into the
/// answer's bytes. A name among the five the grant gives is not written.
pub struct Extras<'w> {
    out: &'w mut Vec<u8>,
    error: Option<serde_json::Error>,
}

impl Extras<'_> {
    pub fn put(&mut self, name: &'static str, value: impl Serialize) {
        if self.error.is_none() && !FIELDS.contains(&name) {
            member_name(self.out, b',', name);
            self.error = serde_json::to_writer(&mut *self.out, &value).err();
        }
    }
}

/// Write `grant`'s answer into `out`.
pub(super) fn write(cx: &Setup, grant: &Grant, account: Option<&str>, out: &mut Vec<u8>) -> serde_json::Result<()> {
    member_name(out, b'{', "access_token");
    text(out, Some(grant.access_token.expose()))?;
    member_name(out, b',', "token_type");
    text(out, Some(&grant.token_type))?;
    member_name(out, b',', "expires_at");
    text(out, grant.expires_at.map(Rfc3339::of).as_ref().map(Rfc3339::as_str))?;
    member_name(out, b',', "scope");
    text(out, grant.scope.as_deref())?;
    member_name(out, b',', "account");
    text(out, account)?;
    let mut extras = Extras { out, error: None };
    cx.provider().token(cx, grant, &mut extras);
    if let Some(e) = extras.error {
        return Err(e);
    }
    out.push(b'}');
    Ok(())
}

/// A member's name, after `lead` (`{` or `,`). Names are the adapters' own identifiers, which
/// JSON writes as they are.
fn member_name(out: &mut Vec<u8>, lead: u8, name: &'static str) {
    debug_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{name:?} needs escaping");
    out.push(lead);
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// A string member's value: copied as it is when JSON escapes nothing in it (as with every
/// token, type and name providers issue), written by serde otherwise. Either way the bytes
/// are serde's.
fn text(out: &mut Vec<u8>, value: Option<&str>) -> serde_json::Result<()> {
    match value {
        // A fold without a branch per byte, which the compiler vectorises.
        Some(plain) if plain.bytes().fold(true, |plain, b| plain & (b >= 0x20) & (b != b'"') & (b != b'\\')) => {
            out.push(b'"');
            out.extend_from_slice(plain.as_bytes());
            out.push(b'"');
            Ok(())
        }
        value => serde_json::to_writer(out, &value),
    }
}

/// A time as chrono's `Serialize` writes it (RFC 3339, UTC as `Z`, as many fraction digits as
/// it needs in threes, a leap second as :60), made on the stack. Through serde, chrono writes
/// it a character at a time; `to_rfc3339_opts` allocates, and so does anything through `fmt`.
/// A year past 9999 (which no grant reaches: lifetimes are held to ten years) is chrono's.
struct Rfc3339 {
    text: [u8; 40],
    len: usize,
}

impl Rfc3339 {
    fn of(at: DateTime<Utc>) -> Self {
        let mut text = [0u8; 40];
        let (date, time) = (at.date_naive(), at.time());
        let (year, mut second, mut nanos) = (date.year(), time.second(), time.nanosecond());
        if !(0..=9999).contains(&year) {
            let long = at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
            let len = long.len().min(text.len());
            text[..len].copy_from_slice(&long.as_bytes()[..len]);
            return Self { text, len };
        }
        if nanos >= 1_000_000_000 {
            (second, nanos) = (second + 1, nanos - 1_000_000_000);
        }
        let fields =
            [(year as u32, 4), (date.month(), 2), (date.day(), 2), (time.hour(), 2), (time.minute(), 2), (second, 2)];
        let mut at = 0;
        for ((value, width), separator) in fields.into_iter().zip(*b"--T::.") {
            digits(&mut text[at..at + width], value);
            text[at + width] = separator;
            at += width + 1;
        }
        let width = match nanos {
            0 => 0,
            n if n % 1_000_000 == 0 => 3,
            n if n % 1_000 == 0 => 6,
            _ => 9,
        };
        if width == 0 {
            at -= 1;
        } else {
            digits(&mut text[at..at + width], nanos / 10u32.pow(9 - width as u32));
            at += width;
        }
        text[at] = b'Z';
        Self { text, len: at + 1 }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.text[..self.len]).unwrap_or_default()
    }
}

/// `value` in decimal, zero-padded to fill `out`.
fn digits(out: &mut [u8], mut value: u32) {
    for digit in out.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use serde_json::json;

    #[test]
    fn token_times_read_as_chrono_writes_them() {
        let whole = DateTime::from_timestamp(1_796_000_000, 0).unwrap();
        for nanos in [0, 120_000_000, 123_456_000, 123_456_789, 1] {
            let at = whole + TimeDelta::nanoseconds(nanos);
            assert_eq!(json!(Rfc3339::of(at).as_str()), json!(at), "{nanos} ns");
        }
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31).unwrap().and_hms_nano_opt(23, 59, 59, 1_250_000_000);
        let leap = leap.unwrap().and_utc();
        let bc = DateTime::from_timestamp(-62_198_755_200, 0).unwrap();
        for at in [DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC, DateTime::UNIX_EPOCH, leap, bc] {
            assert_eq!(json!(Rfc3339::of(at).as_str()), json!(at), "{at:?}");
        }
    }

    #[test]
    fn strings_read_as_serde_writes_them() {
        for value in
            [None, Some(""), Some("plain-token.123"), Some("a \"quote\""), Some("back\\slash"), Some("line\nbreak")]
                .into_iter()
                .chain([Some("tab\t, nul \u{0}, del \u{7f}"), Some("ünï©ødé ✓")])
        {
            let mut out = Vec::new();
            text(&mut out, value).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&value).unwrap());
        }
    }
}
