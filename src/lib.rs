//! leaderq: many copies of one program sharing work through Redis — one fenced generator, every
//! other copy a handler — with every message's outcome recorded exactly once.
//!
//! See `docs/PROTOCOL.md` for the keys, the scripts' contracts and why each invariant holds.

pub mod config;
pub mod conn;
pub mod error;
pub mod errors_store;
pub mod generator;
pub mod handler;
pub mod incarnation;
pub mod inspect;
pub mod keys;
pub mod lease;
pub mod liveness;
pub mod message;
pub mod metrics;
pub mod node;
pub mod outcome;
pub mod procs;
pub mod redis_config;
pub mod repair;
pub mod scripts;
pub mod stats;
pub mod status;
pub mod verify;
pub mod wake;

pub use config::Config;
pub use error::Error;
pub use keys::Keys;
