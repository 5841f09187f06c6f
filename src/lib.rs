#![deny(missing_docs)]
//! leaderq: many copies of one program sharing work through Redis — one fenced generator, every
//! other copy a handler — with every message's outcome recorded exactly once.
//!
//! Run any number of copies of a program built on it, anywhere, against one Redis: one copy at a
//! time holds the generator lease (fenced: a paused old leader can never generate again) and
//! puts messages into the queue from its [`Source`]; every other copy fetches them in batches and
//! runs its [`Handler`] on each. Every message's outcome (ok, or failed with a reason, into the
//! error store) is recorded exactly once per id, whatever copy dies or whatever Redis does;
//! [`admin::errors::drain`] takes the error store out (the `app getErrors` command).
//!
//! A program with a handler and a source of its own:
//!
//! ```no_run
//! use leaderq::{Batch, CancellationToken, Failure, Handler, Message, Node, Source};
//!
//! struct Greetings; // what the generator puts into messages 0, 1, 2, ...
//! impl Source for Greetings {
//!     async fn batch(&self, first_id: u64, count: usize) -> Result<Batch, Failure> {
//!         let ids = first_id..first_id + count as u64;
//!         Ok(Batch::Payloads(ids.map(|id| format!("hello #{id}").into_bytes()).collect()))
//!     }
//! }
//!
//! struct Print; // what every handler does with one
//! impl Handler for Print {
//!     async fn handle(&self, message: Message) -> Result<(), Failure> {
//!         println!("{}: {}", message.id, String::from_utf8_lossy(&message.payload));
//!         Ok(())
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), leaderq::Error> {
//!     let node = Node::builder("redis://127.0.0.1:6379").namespace("greetings")
//!         .source(Greetings).handler(Print).build()?;
//!     node.run(CancellationToken::new()).await // until cancelled; then it drains
//! }
//! ```
//!
//! Layout: [`protocol`] (key names, the message envelope, the Lua scripts), [`node`] (one copy:
//! lease, generator, handler, liveness), [`admin`] (`getErrors`, `status`, `repair`, metrics),
//! [`work`] (the traits). Test and simulation support is behind the `testkit` feature. See
//! `docs/PROTOCOL.md` for the keys, the scripts' contracts and why each invariant holds.

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
pub mod work;

pub use config::Config;
pub use error::Error;
pub use node::{Node, NodeBuilder};
pub use protocol::keys::Keys;
pub use tokio_util::sync::CancellationToken;
pub use work::{Batch, Bytes, Counter, Failure, Handler, Message, Planned, Source, TaskHandler};
