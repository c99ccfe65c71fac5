//! The store's record decoding: arbitrary bytes into every decoder (connections, flows,
//! history rows, provider state, links; this build's format and the legacy JSON one). Whatever
//! decodes must encode and decode again to the same value.

#![no_main]

use authkeeper_state::links;
use authkeeper_state::records::{
    decode_connection, decode_flow, decode_profile_state, decode_transition, encode_connection, encode_flow,
    encode_profile_state, encode_transition,
};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "trakt/TRAKT-P01";

fuzz_target!(|data: &[u8]| {
    let flow = decode_flow(data).ok();
    if let Some(f) = &flow {
        let again = decode_flow(&encode_flow(f)).expect("an encoded flow decodes");
        assert_eq!(&again, f, "a flow changed through encode and decode");
    }
    if let Ok(m) = decode_connection(KEY, data, flow.clone()) {
        // The key is the table's, not the record's (a legacy record carries its own).
        let again = decode_connection(KEY, &encode_connection(&m), flow).expect("an encoded connection decodes");
        let mut was = m.connection().clone();
        was.key = again.key().clone();
        assert_eq!(again.connection(), &was, "a connection changed through encode and decode");
        assert_eq!(again.state(), m.state(), "a connection's state changed through encode and decode");
    }
    if let Ok(t) = decode_transition(data) {
        let again = decode_transition(&encode_transition(&t)).expect("an encoded history row decodes");
        assert_eq!(again, t, "a history row changed through encode and decode");
    }
    if let Ok(s) = decode_profile_state(data) {
        let again = decode_profile_state(&encode_profile_state(&s)).expect("encoded provider state decodes");
        assert_eq!(again, s, "provider state changed through encode and decode");
    }
    if let Ok(link) = links::decode("fuzz", data) {
        let again = links::decode("fuzz", &links::encode(&link)).expect("an encoded link decodes");
        assert_eq!(again, link, "a link changed through encode and decode");
    }
});
