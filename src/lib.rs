//! leaderq: many copies of one program sharing work through Redis — one fenced generator, every
//! other copy a handler — with every message's outcome recorded exactly once.
//!
//! See `docs/PROTOCOL.md` for the keys, the scripts' contracts and why each invariant holds.

pub mod admin;
pub mod config;
pub mod conn;
pub mod error;
pub mod inspect;
pub mod node;
pub mod outcome;
pub mod protocol;
pub mod stats;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use config::Config;
pub use error::Error;
pub use protocol::keys::Keys;
