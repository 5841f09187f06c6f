//! The protocol's shared vocabulary: every Redis key name, the message format, and the Lua
//! scripts that are its only atomic steps (`docs/PROTOCOL.md` argues each invariant).

pub mod epoch_log;
pub mod keys;
pub mod message;
pub mod scripts;
