//! The handler: fetch in batches, run the [`Handler`] on up to `max_in_flight` messages at once,
//! commit outcomes in batches.
//!
//! Three tasks joined by channels, so no Redis round trip is ever per message:
//! - the fetcher ([`mod@fetch`]) moves up to `batch` messages into this handler's in-flight set
//!   (fetch.lua), once it holds that many permits of the in-flight semaphore;
//! - the runner ([`runner`]) runs the handler on each message, all of them concurrently in one
//!   task (not one task per message, so 50k+ concurrent messages cost little), each under the
//!   handler timeout;
//! - the committer ([`mod@commit`]) takes whatever outcomes are ready (up to `commit_max`) and records them in one
//!   commit.lua call, then returns the permits. While one commit is in flight the next batch
//!   accumulates, so batches grow with load.
//!
//! The channels are unbounded in type but bounded in fact: every message in them holds a permit.
//!
//! The fetcher also keeps this handler's in-flight set in Redis and what it holds in memory in
//! step (docs/PROTOCOL.md, invariant 5): after a fetch whose outcome it could not see, after its
//! heartbeat lapsed, and at least every [`RECONCILE_EVERY`] in any role, it compares the two and
//! adopts any message the set holds that it does not, so no message is stranded in a live
//! process.

pub mod commit;
pub mod fetch;
pub mod runner;
mod waits;

pub use commit::commit;
pub use fetch::{fetch, fetch_limited, FetchLimits, Fetched};

use crate::conn::Conn;
use crate::error::Error;
use crate::node::incarnation::Incarnation;
use crate::protocol::keys::Keys;
use crate::protocol::message::{BatchEntry, Envelope};
use crate::stats::{self, Latencies};
use crate::work::{Handler, Message};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;

/// What the fetcher sends the runner.
#[derive(Debug)]
pub(super) enum ToRunner {
    /// Messages to handle.
    Work(Vec<Done>),
    /// Drop every message not yet finished (the copy became the generator and gives its messages
    /// back); the committer acknowledges on this sender once every outcome made before is
    /// committed.
    Abandon(tokio::sync::oneshot::Sender<()>),
}

/// What the runner sends the committer.
#[derive(Debug)]
pub(super) enum ToCommitter {
    /// Outcomes to commit.
    Done(Vec<Done>),
    /// `count` messages were dropped unfinished: their permits come back, nothing is committed;
    /// `ack` is told once everything before is committed.
    Abandoned {
        count: usize,
        ack: tokio::sync::oneshot::Sender<()>,
    },
}

/// The role of a process, published by the leader loop and watched by the fetcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Fetch and handle messages.
    Handler,
    /// Generate (holding the lease under `epoch`); do not fetch.
    Generator {
        /// The fencing epoch of our lease.
        epoch: u64,
    },
}

/// How a handler fetches, runs and commits.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// This process's instance id; its handler id is `<instance>.0`.
    pub instance_id: String,
    /// Messages per fetch.
    pub batch: u64,
    /// Messages fetched and not yet committed, at most.
    pub max_in_flight: usize,
    /// Outcomes per commit call, at most.
    pub commit_max: usize,
    /// Under load, how long the committer may gather outcomes before a commit, so each call
    /// carries many outcomes per batch (a batch group has a fixed cost in commit.lua). Only
    /// when the recent outcome rate fills a window with [`WINDOW_MIN_OUTCOMES`] or more: slow
    /// traffic is committed at once. 0 = always at once.
    pub commit_window_ms: u64,
    /// Heartbeat TTL (a fetch refreshes it too).
    pub heartbeat_ms: u64,
    /// Give up (fatal error) when Redis keeps failing a commit for this long.
    pub redis_down_max_ms: u64,
    /// A handler still running after this long is given up on: the message gets the outcome
    /// "error, handler timeout" (recorded exactly once like any other) and its slot is freed, so a
    /// stuck handler cannot hold messages forever. One that finishes but took this long or more
    /// times out too, so the rule is exact: handling time >= timeout fails.
    pub handler_timeout_ms: u64,
    /// Append the id of every message whose handler ran (finished, failed or timed out) to this
    /// file, 8 bytes little-endian each, before its outcome is committed: `sim`'s verdict reads
    /// where each message really ran. `None`: no log.
    pub run_log: Option<std::path::PathBuf>,
}

/// What the handler decided about one message, ready to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Handled without error (also the verdict of a message waiting to be handled).
    Ok,
    /// The handler failed it, with this reason (one line, as stored).
    Failed(String),
    /// The handler did not finish within `handler_timeout_ms`.
    TimedOut,
    /// The payload could not be parsed; the reason goes to the error store.
    Bad(String),
}

/// One message on its way from fetch to commit.
#[derive(Debug, Clone)]
pub struct Done {
    /// The payload exactly as fetched: commit.lua finds it in the in-flight set by value. Empty
    /// for a message of a batch (`batch` is set).
    pub payload: Bytes,
    /// For a message of a batch: the batch record's first id (commit.lua finds the record by it,
    /// and the message by `envelope.id - first`). `None` for a payload of the in-flight set.
    pub batch: Option<u64>,
    /// The handler id whose in-flight set holds the payload.
    pub owner: Arc<str>,
    /// Parsed id and generation time (zeros for a bad payload).
    pub envelope: Envelope,
    /// Where the message's data begins in `payload`.
    pub data_at: usize,
    /// The outcome to record.
    pub verdict: Verdict,
    /// How long the handler ran, µs (0 until it has): end-to-end latency minus this is what the
    /// queue itself cost.
    pub handled_us: u64,
}

impl Done {
    /// Message `index` of the batch `entry`, owned through the batch record, not yet handled.
    pub fn in_batch(entry: &BatchEntry, index: u64, owner: &Arc<str>) -> Done {
        Done {
            payload: Bytes::new(),
            batch: Some(entry.first_id),
            owner: owner.clone(),
            envelope: entry.envelope(index),
            data_at: 0,
            verdict: Verdict::Ok,
            handled_us: 0,
        }
    }

    /// A payload of the in-flight set and what parsing it gave: not yet handled, or, when it
    /// does not parse, [`Verdict::Bad`] with the reason.
    pub fn from_payload(
        payload: Bytes,
        parsed: Result<(Envelope, usize), String>,
        owner: &Arc<str>,
    ) -> Done {
        let (envelope, data_at, verdict) = match parsed {
            Ok((envelope, data_at)) => (envelope, data_at, Verdict::Ok),
            Err(reason) => (Envelope::default(), payload.len(), Verdict::Bad(reason)),
        };
        Done {
            payload,
            batch: None,
            owner: owner.clone(),
            envelope,
            data_at,
            verdict,
            handled_us: 0,
        }
    }

    /// The message as the handler receives it.
    pub fn message(&self) -> Message {
        Message {
            id: self.envelope.id,
            payload: self.payload.slice(self.data_at.min(self.payload.len())..),
            epoch: self.envelope.epoch,
            generated_us: self.envelope.generated_us,
            delivery: self.envelope.reclaims + 1,
        }
    }
}

/// Shared state the node reads: the in-flight gauge and the latency histograms.
#[derive(Debug, Clone, Default)]
pub struct HandlerShared {
    /// Messages fetched and not yet committed.
    pub in_flight: Arc<AtomicU64>,
    /// Latencies measured by this process.
    pub latencies: Arc<Mutex<Latencies>>,
    /// Suspects (messages reclaimed twice or more) held now, all of one level (see reclaim.lua).
    pub suspects: Arc<Mutex<SuspectHold>>,
    /// Signalled by the wake-up channel listener when the generator has queued messages.
    pub wake: Arc<tokio::sync::Notify>,
    /// Set when this handler's heartbeat was found expired (by the heartbeat task or a fetch):
    /// reclaim.lua may have taken its in-flight set, so the fetcher reconciles in full.
    pub heartbeat_lapsed: Arc<AtomicBool>,
}

/// Suspects a handler holds: all of one level at a time, so that if it dies the group that climbs
/// is exactly the group it held (see reclaim.lua and fetch.lua).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SuspectHold {
    /// Their reclaim count (2 or more), or 0 when none are held.
    pub level: u64,
    /// How many are held.
    pub count: u64,
}

/// What this handler believes its in-flight set and batch records hold: every payload and batch
/// it fetched (and saw the reply of) or adopted, minus what it committed (and saw the reply of),
/// minus what a reconciliation found reclaimed. Exact payload bytes, so that a reconciliation can
/// tell any member of the set it never saw, even one that repeats another's id.
#[derive(Debug, Default)]
struct Holdings {
    payloads: HashSet<Bytes>,
    /// Batch record first id → the messages of it held and not yet committed.
    batches: HashMap<u64, HeldBatch>,
}

impl Holdings {
    /// Messages held in batches.
    fn batch_messages(&self) -> u64 {
        self.batches.values().map(|b| b.count).sum()
    }
}

/// The messages of one batch record a handler holds: a bitmap by index, and how many.
#[derive(Debug, Default)]
struct HeldBatch {
    mask: Vec<u8>,
    count: u64,
}

impl HeldBatch {
    fn holds(&self, index: u64) -> bool {
        self.mask
            .get((index / 8) as usize)
            .is_some_and(|b| b & (0x80 >> (index % 8)) != 0)
    }

    fn insert(&mut self, index: u64) {
        let byte = (index / 8) as usize;
        if self.mask.len() <= byte {
            self.mask.resize(byte + 1, 0);
        }
        if self.mask[byte] & (0x80 >> (index % 8)) == 0 {
            self.mask[byte] |= 0x80 >> (index % 8);
            self.count += 1;
        }
    }

    fn remove(&mut self, index: u64) {
        if self.holds(index) {
            self.mask[(index / 8) as usize] &= !(0x80 >> (index % 8));
            self.count -= 1;
        }
    }
}

/// How often the fetcher checks, in every role, that its in-flight set holds exactly what it
/// holds in memory (one `SCARD`, and a `SMEMBERS` only when they differ): the backstop that
/// bounds how long any message can sit unseen in a live handler's set (docs/PROTOCOL.md,
/// invariant 5).
pub const RECONCILE_EVERY: Duration = Duration::from_secs(2);

/// The committer waits out its window only when the recent outcome rate would gather at least
/// this many outcomes in it; below that a commit goes at once (latency matters more than Redis
/// CPU when traffic is light).
pub const WINDOW_MIN_OUTCOMES: f64 = 64.0;

/// Runs the three tasks until `stop` fires, then drains: no new fetches, every fetched message is
/// still handled and committed. Publishes the current handler id on `owner_tx` (the heartbeat
/// task keeps that one alive).
#[allow(clippy::too_many_arguments)]
pub async fn run<H: Handler>(
    handler: Arc<H>,
    con: Conn,
    keys: Keys,
    incarnation: Incarnation,
    config: HandlerConfig,
    role: watch::Receiver<Role>,
    owner_tx: watch::Sender<Arc<str>>,
    shared: HandlerShared,
    stop: CancellationToken,
) -> Result<(), Error> {
    let permits = Arc::new(Semaphore::new(config.max_in_flight));
    let (work_tx, work_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let holdings = Mutex::new(Holdings::default());
    // Held by the committer from sending a commit until it has applied the reply, and by a
    // reconciliation while it compares: so a reconciliation never sees a commit half-applied.
    let commit_gate = tokio::sync::Mutex::new(());
    let owner: Arc<str> = Arc::from(format!("{}.0", config.instance_id));
    owner_tx.send_replace(owner.clone());
    let fetcher = fetch::Fetcher {
        con: con.clone(),
        keys: &keys,
        incarnation: &incarnation,
        config: &config,
        owner,
        permits: &permits,
        shared: &shared,
        holdings: &holdings,
        commit_gate: &commit_gate,
        work_tx,
        stop: &stop,
    };
    let run_log = match &config.run_log {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| Error::Config(format!("--run-log {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let timeout = Duration::from_millis(config.handler_timeout_ms);
    let runner = runner::run(handler, timeout, work_rx, done_tx, run_log);
    let committer = commit::commit_loop(
        con,
        &keys,
        &incarnation,
        &config,
        &permits,
        &shared,
        &holdings,
        &commit_gate,
        done_rx,
    );
    tokio::try_join!(fetcher.run(role), runner, committer)?;
    Ok(())
}

/// The messages of one batch a handler takes on: the whole batch after a fetch, the open indexes
/// of its record after an adoption.
#[derive(Debug, Clone)]
struct BatchTake {
    entry: BatchEntry,
    /// The indexes taken (`0..count` after a fetch).
    indexes: Vec<u64>,
}

impl BatchTake {
    fn whole(entry: BatchEntry) -> BatchTake {
        BatchTake {
            entry,
            indexes: (0..entry.count).collect(),
        }
    }
}

/// Turns payloads and batches into work items: parses the payloads (a bad one is committed as
/// such), records the queue wait (when the fetch time is known), and adds them to the holdings.
fn admit(
    payloads: Vec<Bytes>,
    batches: Vec<BatchTake>,
    fetched_us: Option<u64>,
    owner: &Arc<str>,
    shared: &HandlerShared,
    holdings: &Mutex<Holdings>,
) -> Vec<Done> {
    let in_batches: usize = batches.iter().map(|b| b.indexes.len()).sum();
    let total = payloads.len() + in_batches;
    shared.in_flight.fetch_add(total as u64, Ordering::Relaxed);
    let mut items = Vec::with_capacity(total);
    let mut lat = shared.latencies.lock().expect("latency lock poisoned");
    let mut held = holdings.lock().expect("holdings lock poisoned");
    let mut suspects = shared.suspects.lock().expect("suspect lock poisoned");
    for take in batches {
        let entry = take.entry;
        if let Some(t) = fetched_us {
            let wait_us = t.saturating_sub(entry.generated_us);
            stats::record_n(&mut lat.queue_wait_us, wait_us, take.indexes.len() as u64);
        }
        let hold = held.batches.entry(entry.first_id).or_default();
        for &index in &take.indexes {
            hold.insert(index);
        }
        items.extend(
            take.indexes
                .into_iter()
                .map(|index| Done::in_batch(&entry, index, owner)),
        );
    }
    for payload in payloads {
        let parsed = Envelope::parse(&payload);
        match &parsed {
            Ok((m, _)) => {
                if let Some(t) = fetched_us {
                    stats::record(&mut lat.queue_wait_us, t.saturating_sub(m.generated_us));
                }
                if m.reclaims >= 2 {
                    suspects.level = m.reclaims;
                    suspects.count += 1;
                }
            }
            Err(reason) => {
                tracing::warn!(payload = %String::from_utf8_lossy(&payload), %reason, "bad message; moving it to the error store");
            }
        }
        held.payloads.insert(payload.clone());
        items.push(Done::from_payload(payload, parsed, owner));
    }
    items
}

/// Forgets committed messages: no longer held.
fn release(batch: &[Done], shared: &HandlerShared, holdings: &Mutex<Holdings>) {
    let mut held = holdings.lock().expect("holdings lock poisoned");
    let mut suspects = shared.suspects.lock().expect("suspect lock poisoned");
    for d in batch {
        match d.batch {
            Some(first) => {
                if let Some(hold) = held.batches.get_mut(&first) {
                    hold.remove(d.envelope.id - first);
                    if hold.count == 0 {
                        held.batches.remove(&first);
                    }
                }
            }
            None => {
                held.payloads.remove(&d.payload);
            }
        }
        if d.envelope.reclaims >= 2 {
            suspects.count = suspects.count.saturating_sub(1);
        }
    }
    if suspects.count == 0 {
        suspects.level = 0;
    }
}
