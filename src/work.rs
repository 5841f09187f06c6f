//! The user's work, behind two traits: what a handler does with a message ([`Handler`]; the task's
//! `eventHandler` by default, [`TaskHandler`]), and what the generator puts into each message
//! ([`Source`]; the task's counter by default, [`Counter`]).
//!
//! The protocol around them is the same whatever they do: ids are handed out by the fenced
//! generator, every message's outcome is recorded exactly once per id, a handler that does not
//! finish within the handler timeout fails the message with the reason "handler timeout", and a
//! copy that dies mid-message has it run again elsewhere (so a handler must tolerate a message
//! running more than once; only its recorded outcome is exactly once).

use crate::error::Error;
use crate::outcome::{Outcome, OutcomeModel};
pub use bytes::Bytes;
use std::future::Future;
use std::time::Duration;

/// The most bytes one message's data may have: Redis holds every message of the queue and the
/// in-flight sets in memory, and a fetch moves a batch of them in one reply.
pub const DATA_MAX_BYTES: usize = 512 * 1024;

/// The longest failure reason stored (longer ones are cut, on a character boundary).
pub const REASON_MAX_BYTES: usize = 500;

/// A message as a handler receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its id: `getMessage()`'s value, unique and gap-free across the group.
    pub id: u64,
    /// The bytes the [`Source`] gave for this id (empty with the task's [`Counter`]).
    pub payload: Bytes,
    /// The fencing epoch of the generator that made it.
    pub epoch: u64,
    /// When it was generated, µs on Redis's clock.
    pub generated_us: u64,
    /// 1 on its first delivery, one more each time a dead handler's copy was given back.
    pub delivery: u64,
}

/// Why a handler failed a message: recorded in the error store with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// One line (tabs and newlines are replaced when it is stored).
    pub reason: String,
}

impl Failure {
    /// A failure with `reason`.
    pub fn new(reason: impl Into<String>) -> Failure {
        Failure {
            reason: reason.into(),
        }
    }

    /// The reason as stored: one line (tabs, newlines and other control characters become
    /// spaces), at most [`REASON_MAX_BYTES`], never empty.
    pub fn stored_reason(&self) -> String {
        let mut out: String = self
            .reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if out.len() > REASON_MAX_BYTES {
            let mut cut = REASON_MAX_BYTES;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
        }
        if out.trim().is_empty() {
            out = "handler failed (no reason given)".into();
        }
        out
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// What handles a message: the task's `eventHandler` by default ([`TaskHandler`]).
///
/// Called once per delivery, many at a time (up to `max_in_flight`), on the copy's runtime: a
/// handler that blocks a thread should move its work to `tokio::task::spawn_blocking`. A message
/// can be delivered again after its handler's copy died, so the work should be idempotent (or
/// check what it already did); the recorded outcome is exactly once whatever happens.
pub trait Handler: Send + Sync + 'static {
    /// Handles `message`: `Ok` records it as handled, `Err` puts it in the error store with the
    /// reason. A call still running after the handler timeout is abandoned and the message fails
    /// with the reason "handler timeout".
    fn handle(&self, message: Message) -> impl Future<Output = Result<(), Failure>> + Send;

    /// For a handler whose work is only a wait of known length with a known result (a
    /// simulation, like the task's `eventHandler`): the plan for `message`, and the runner parks
    /// it in one timer wheel instead of running a future per message, which makes 50k+ waiting
    /// messages cost a slab entry each. `None` (the default) runs [`handle`](Handler::handle).
    /// The timeout rule is the same either way: a wait of the handler timeout or longer fails the
    /// message with "handler timeout" at the deadline.
    fn planned(&self, message: &Message) -> Option<Planned> {
        let _ = message;
        None
    }
}

/// What [`Handler::planned`] says a message's handling will be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// How long the handling takes.
    pub wait: Duration,
    /// Its result once the wait is over.
    pub result: Result<(), Failure>,
}

/// What the generator puts into messages: nothing by default ([`Counter`]: the id is the message,
/// like the task's `getMessage`).
pub trait Source: Send + Sync + 'static {
    /// The messages with ids `first_id .. first_id + count`: [`Batch::Ids`] when they carry no
    /// bytes, or their payloads in id order, fewer than `count` when the source ends sooner (an
    /// empty list: nothing to generate now; the generator asks again after its interval).
    ///
    /// Must be a function of the ids: the generator may ask for the same ids again (after a
    /// failover, or a reply it did not see) and must get the same bytes.
    fn batch(
        &self,
        first_id: u64,
        count: usize,
    ) -> impl Future<Output = Result<Batch, Failure>> + Send;
}

/// What a [`Source`] gives for a run of ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Batch {
    /// As many messages as asked for, without bytes: the id is the message.
    Ids,
    /// One payload per id, in order; fewer than asked for when the source ends sooner.
    Payloads(Vec<Vec<u8>>),
}

/// The task's `eventHandler`: waits a uniform delay in `0..delay_max_ms`, then fails with
/// probability `error_rate` (seeded: a pure function of seed and id; see [`OutcomeModel`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TaskHandler {
    model: OutcomeModel,
}

impl TaskHandler {
    /// The task's handler with `model`'s delays and error rate, once they are checked: an error
    /// rate in `0..=1`, delays of at most an hour.
    pub fn new(model: OutcomeModel) -> Result<TaskHandler, Error> {
        if !(0.0..=1.0).contains(&model.error_rate) || model.error_rate.is_nan() {
            return Err(Error::Config(format!(
                "--error-rate {} must be between 0 and 1",
                model.error_rate
            )));
        }
        if model.delay_max_ms > 3_600_000 {
            return Err(Error::Config(format!(
                "--handler-delay-max-ms {} exceeds one hour",
                model.delay_max_ms
            )));
        }
        Ok(TaskHandler { model })
    }

    /// Its delay and error model.
    pub fn model(&self) -> OutcomeModel {
        self.model
    }
}

impl Handler for TaskHandler {
    async fn handle(&self, message: Message) -> Result<(), Failure> {
        let Planned { wait, result } = self.plan(message.id);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        result
    }

    fn planned(&self, message: &Message) -> Option<Planned> {
        Some(self.plan(message.id))
    }
}

impl TaskHandler {
    fn plan(&self, id: u64) -> Planned {
        let Outcome { delay_ms, failed } = self.model.decide(id);
        Planned {
            wait: Duration::from_millis(delay_ms),
            result: if failed {
                Err(Failure::new(HANDLER_ERROR))
            } else {
                Ok(())
            },
        }
    }
}

/// The reason stored for a failure of the task's `eventHandler`.
pub const HANDLER_ERROR: &str = "handler error";

/// The reason stored for a handler that did not finish within the handler timeout (commit.lua
/// writes it for kind "t").
pub const HANDLER_TIMEOUT: &str = "handler timeout";

/// The task's `getMessage`: a counter. Messages carry no bytes; the id is the message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter;

impl Source for Counter {
    async fn batch(&self, _first_id: u64, _count: usize) -> Result<Batch, Failure> {
        Ok(Batch::Ids)
    }
}
