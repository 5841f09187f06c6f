//! The protocol's shared vocabulary: every Redis key name, the message format, and the Lua
//! scripts that are its only atomic steps (`docs/PROTOCOL.md` argues each invariant).

pub mod epoch_log;
pub mod keys;
pub mod message;
pub mod scripts;
pub mod shards;

/// Reclaim counts that make a message a suspect with its own list (`{ns}:suspects:<level>`);
/// one more than the last is poison ([`MAX_RECLAIMS`]). Passed to the scripts as arguments.
pub const SUSPECT_LEVELS: std::ops::RangeInclusive<u64> = 2..=6;

/// A message reclaimed this many times is poison: `reclaim.lua` moves it to the error store
/// instead of letting it kill handlers forever. From its second reclaim on, a message is handled
/// in a group of suspects of its level only, groups shrinking tenfold per level down to one, so
/// reaching 7 means it was alone in its group when its handler died.
pub const MAX_RECLAIMS: u64 = 7;

/// The incarnation key's value once a copy has halted the namespace: `halted:<why>`.
pub const HALTED_PREFIX: &str = "halted:";
