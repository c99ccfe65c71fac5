//! `authkeeper-state`: the connection state machine and the store that persists it.
//!
//! - [`secret`]: credential types whose `Debug` and `Display` never show the value.
//! - [`grant`]: grants, pending flows and per-profile provider state: data, not a type per
//!   provider.
//! - [`machine`]: the pure machine, `(state, event, now) → (state', transition, effects)`,
//!   built with statig in blocking mode.
//! - [`schedule`]: pure timing rules: when to poll, refresh, validate, retry, give up.
//! - [`store`]: redb tables, migrations and the batched (group) commit, behind a narrow
//!   interface.
//! - [`records`]: the store's versioned on-disk records.
//! - [`dump`]: a store's whole content, backend-neutral, for `store copy`.
//! - [`history`]: connections' history as one append-ordered log.
//! - `outbox`: webhook deliveries not yet acknowledged.
//! - [`seal`]: optional encryption of the store's secrets at rest.
//!
//! Nothing here does network I/O or reads the clock: time always comes in as an argument.

pub mod dump;
pub mod grant;
pub mod history;
pub mod interface;
pub mod key;
pub mod links;
pub mod machine;
mod outbox;
pub mod records;
pub mod schedule;
pub mod seal;
pub mod sealed_store;
pub mod secret;
pub mod store;

pub use grant::{Extras, Grant, PendingFlow, ProfileState};
pub use interface::ConnectionStore;
pub use links::LinkRecord;
pub use machine::{
    Account, Cause, ConnKey, Connection, Effect, Event, Machine, REFRESH_ANSWER_LOST, Refusal, StateName, Step,
    Transition,
};
pub use schedule::{Action, Policy};
pub use seal::{Sealer, SecretsKey};
pub use secret::Secret;
pub use store::{Commit, Store, StoreError, Stored};

/// Whether `id` names an owner's profile (`discord:123456`): it holds a `:`, only letters,
/// digits and `:._@-`, 1 to 128 characters, and does not start with `.`; so it never clashes
/// with `default`, `PROVIDER-P##` or a generic OAuth instance's name.
pub fn is_owner_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id.contains(':')
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b":._@-".contains(&b))
}
