//! The handler: fetch in batches, run `eventHandler` on up to `max_in_flight` messages at once,
//! commit outcomes in batches.
//!
//! Three tasks joined by channels, so no Redis round trip is ever per message:
//! - the fetcher moves up to `batch` messages into this handler's in-flight set (fetch.lua), once
//!   it holds that many permits of the in-flight semaphore;
//! - the timer task parks each message in a `DelayQueue` for its `eventHandler` delay (one timer
//!   wheel, not one task per message, so 50k+ concurrent messages cost little);
//! - the committer takes whatever outcomes are ready (up to `commit_max`) and records them in one
//!   commit.lua call, then returns the permits. While one commit is in flight the next batch
//!   accumulates, so batches grow with load.
//!
//! The channels are unbounded in type but bounded in fact: every message in them holds a permit.

use crate::conn::Conn;
use crate::error::Error;
use crate::keys::Keys;
use crate::message::Message;
use crate::outcome::OutcomeModel;
use crate::scripts;
use crate::stats::{self, Latencies};
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;

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
    /// Heartbeat TTL (a fetch refreshes it too).
    pub heartbeat_ms: u64,
    /// Give up (fatal error) when Redis keeps failing a commit for this long.
    pub redis_down_max_ms: u64,
    /// The `eventHandler` port.
    pub model: OutcomeModel,
}

/// What the handler decided about one message, ready to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `eventHandler` called back without error.
    Ok,
    /// `eventHandler` called back with an error.
    Failed,
    /// The payload could not be parsed; the reason goes to the error store.
    Bad(String),
}

/// One message on its way from fetch to commit.
#[derive(Debug, Clone)]
pub struct Done {
    /// The payload exactly as fetched: commit.lua finds it in the in-flight set by value.
    pub payload: Vec<u8>,
    /// The handler id whose in-flight set holds the payload.
    pub owner: Arc<str>,
    /// Parsed id and generation time (zeros for a bad payload).
    pub message: Message,
    /// The outcome to record.
    pub verdict: Verdict,
    /// The eventHandler delay it waited, ms (0 until decided): end-to-end latency minus this is
    /// what the queue itself cost.
    pub delay_ms: u64,
}

/// How much one fetch may take, and of what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchLimits {
    /// Messages in all.
    pub count: u64,
    /// At most this many from the retry set (reclaimed once), sampled at random.
    pub retry_max: u64,
    /// The suspects this handler holds: more of the same level only, up to its group size.
    pub hold: SuspectHold,
    /// Group size of suspects at level L is `suspect_base / 10^(L-1)` (at least 1).
    pub suspect_base: u64,
}

/// Runs fetch.lua: up to `count` fresh messages, a tenth of them at most from the retry set.
pub async fn fetch(
    con: &mut Conn,
    keys: &Keys,
    handler: &str,
    count: u64,
    heartbeat_ms: u64,
) -> Result<(u64, Vec<Vec<u8>>), Error> {
    let limits = FetchLimits {
        count,
        retry_max: count.div_ceil(10),
        hold: SuspectHold::default(),
        suspect_base: count,
    };
    fetch_limited(con, keys, handler, limits, heartbeat_ms).await
}

/// Runs fetch.lua: suspects first (a group of one level, if the handler may take more), then a
/// random sample from the retry set, then fresh messages from the queue, `limits.count` in all,
/// into `handler`'s in-flight set. Returns the Redis time of the fetch (µs) and the payloads.
pub async fn fetch_limited(
    con: &mut Conn,
    keys: &Keys,
    handler: &str,
    limits: FetchLimits,
    heartbeat_ms: u64,
) -> Result<(u64, Vec<Vec<u8>>), Error> {
    let mut call = scripts::FETCH.prepare_invoke();
    call.key(keys.queue())
        .key(keys.inflight(handler))
        .key(keys.handlers())
        .key(keys.heartbeat(handler))
        .key(keys.errors())
        .key(keys.stats())
        .key(keys.retry());
    for level in SUSPECT_LEVELS {
        call.key(keys.suspects(level));
    }
    let reply: Vec<redis::Value> = call
        .arg(handler)
        .arg(limits.count)
        .arg(heartbeat_ms)
        .arg(limits.retry_max)
        .arg(limits.hold.level)
        .arg(limits.hold.count)
        .arg(limits.suspect_base)
        .invoke_async(con)
        .await?;
    let mut items = reply.into_iter();
    let time_us = match items.next() {
        Some(redis::Value::Int(t)) => t as u64,
        other => {
            return Err(Error::Corrupt(format!(
                "fetch.lua returned {other:?} before the payloads"
            )))
        }
    };
    let payloads = items
        .map(|v| match v {
            redis::Value::BulkString(b) => b,
            other => format!("{other:?}").into_bytes(),
        })
        .collect();
    Ok((time_us, payloads))
}

/// Runs commit.lua for `items`, which must all have the same owner.
/// Returns the Redis time of the commit (µs) and the indexes of the items it refused.
pub async fn commit(
    con: &mut Conn,
    keys: &Keys,
    items: &[Done],
) -> Result<(u64, Vec<usize>), Error> {
    let Some(first) = items.first() else {
        return Ok((0, Vec::new()));
    };
    let mut call = scripts::COMMIT.prepare_invoke();
    call.key(keys.inflight(&first.owner))
        .key(keys.done())
        .key(keys.ok())
        .key(keys.errors())
        .key(keys.stats());
    for d in items {
        debug_assert!(Arc::ptr_eq(&d.owner, &first.owner) || d.owner == first.owner);
        match &d.verdict {
            Verdict::Ok => call.arg("o").arg(&d.payload[..]).arg(d.message.id),
            Verdict::Failed => call.arg("e").arg(&d.payload[..]).arg(d.message.id),
            Verdict::Bad(reason) => call.arg("b").arg(&d.payload[..]).arg(reason.as_str()),
        };
    }
    let reply: Vec<u64> = call.invoke_async(con).await?;
    let time_us = reply.first().copied().unwrap_or(0);
    let refused = reply
        .iter()
        .skip(1)
        .map(|&i| (i as usize).saturating_sub(1))
        .collect();
    Ok((time_us, refused))
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

/// Reclaim counts that make a message a suspect with its own list; one more is poison
/// (`liveness::MAX_RECLAIMS`).
pub const SUSPECT_LEVELS: std::ops::RangeInclusive<u64> = 2..=6;

/// What this handler holds, by id (and unparseable payloads by value), so that after a lost
/// fetch reply it can tell which members of its in-flight set it has never seen.
#[derive(Debug, Default)]
struct Tracked {
    ids: std::collections::HashSet<u64>,
    bad: std::collections::HashSet<Vec<u8>>,
}

/// Longest pause between polls of an idle handler; the wake-up channel usually ends it sooner.
const IDLE_POLL_MAX: Duration = Duration::from_millis(50);

/// Runs the three tasks until `stop` fires, then drains: no new fetches, every fetched message is
/// still handled and committed. Publishes the current handler id on `owner_tx` (the heartbeat
/// task keeps that one alive).
pub async fn run(
    con: Conn,
    keys: Keys,
    config: HandlerConfig,
    role: watch::Receiver<Role>,
    owner_tx: watch::Sender<Arc<str>>,
    shared: HandlerShared,
    stop: CancellationToken,
) -> Result<(), Error> {
    let permits = Arc::new(Semaphore::new(config.max_in_flight));
    let (work_tx, work_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let tracked = Mutex::new(Tracked::default());
    let fetcher = fetch_loop(
        con.clone(),
        &keys,
        &config,
        role,
        owner_tx,
        &permits,
        &shared,
        &tracked,
        work_tx,
        &stop,
    );
    let timers = timer_loop(config.model, work_rx, done_tx);
    let committer = commit_loop(con, &keys, &config, &permits, &shared, &tracked, done_rx);
    tokio::try_join!(fetcher, timers, committer)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn fetch_loop(
    mut con: Conn,
    keys: &Keys,
    config: &HandlerConfig,
    mut role: watch::Receiver<Role>,
    owner_tx: watch::Sender<Arc<str>>,
    permits: &Arc<Semaphore>,
    shared: &HandlerShared,
    tracked: &Mutex<Tracked>,
    work_tx: mpsc::UnboundedSender<Vec<Done>>,
    stop: &CancellationToken,
) -> Result<(), Error> {
    let batch = config.batch.min(config.max_in_flight as u64).max(1);
    let owner: Arc<str> = Arc::from(format!("{}.0", config.instance_id));
    owner_tx.send_replace(owner.clone());
    let mut idle = Duration::ZERO;
    let mut failures = 0u32;
    let mut resync_needed = false;
    loop {
        // A generator does not fetch; its messages already in flight still finish.
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = role.wait_for(|r| *r == Role::Handler) => { if r.is_err() { return Ok(()); } }
        }
        if resync_needed {
            // A fetch reply was lost: fetch.lua may have moved messages into our in-flight set
            // that we never saw. Adopt them, so they are neither stranded nor reclaimed while
            // we are alive.
            match orphans(&mut con, keys, &owner, tracked).await {
                Ok(found) => {
                    resync_needed = false;
                    if !found.is_empty() {
                        tracing::warn!(
                            adopted = found.len(),
                            "adopted messages a lost fetch reply had moved to us"
                        );
                        let n = found.len() as u32;
                        let held = tokio::select! {
                            _ = stop.cancelled() => return Ok(()),
                            p = permits.acquire_many(n) => p.expect("the semaphore is never closed"),
                        };
                        held.forget();
                        let items = admit(found, None, &owner, shared, tracked);
                        if work_tx.send(items).is_err() {
                            return Ok(());
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "in-flight resync failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
            }
        }
        let held = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            p = permits.acquire_many(batch as u32) => p.expect("the semaphore is never closed"),
        };
        held.forget();
        let hold = *shared.suspects.lock().expect("suspect lock poisoned");
        let limits = FetchLimits {
            count: batch,
            retry_max: batch.div_ceil(10),
            hold,
            suspect_base: config.max_in_flight as u64,
        };
        match fetch_limited(&mut con, keys, &owner, limits, config.heartbeat_ms).await {
            Ok((time_us, payloads)) => {
                failures = 0;
                permits.add_permits(batch as usize - payloads.len());
                if payloads.is_empty() {
                    // Idle: wait for the wake-up channel (new messages), polling ever more slowly
                    // as the backstop for a lost notification or reclaimed messages.
                    idle = (idle * 2).clamp(Duration::from_micros(500), IDLE_POLL_MAX);
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = shared.wake.notified() => idle = Duration::ZERO,
                        _ = tokio::time::sleep(idle) => {}
                    }
                    continue;
                }
                idle = Duration::ZERO;
                let items = admit(payloads, Some(time_us), &owner, shared, tracked);
                if work_tx.send(items).is_err() {
                    return Ok(()); // the timer task ended: its error, if any, is reported there
                }
            }
            Err(e) => {
                permits.add_permits(batch as usize);
                failures += 1;
                resync_needed |= e.is_connection();
                tracing::warn!(error = %e, failures, handler = %owner, "fetch failed; retrying");
                let backoff = Duration::from_millis(20 * u64::from(failures.min(50)));
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}

/// Turns fetched payloads into work items: parses them (a bad one is committed as such), records
/// the queue wait (when the fetch time is known), and notes what this handler now holds.
fn admit(
    payloads: Vec<Vec<u8>>,
    fetched_us: Option<u64>,
    owner: &Arc<str>,
    shared: &HandlerShared,
    tracked: &Mutex<Tracked>,
) -> Vec<Done> {
    shared
        .in_flight
        .fetch_add(payloads.len() as u64, Ordering::Relaxed);
    let mut items = Vec::with_capacity(payloads.len());
    let mut lat = shared.latencies.lock().expect("latency lock poisoned");
    let mut held = tracked.lock().expect("tracking lock poisoned");
    let mut suspects = shared.suspects.lock().expect("suspect lock poisoned");
    for payload in payloads {
        let parsed = std::str::from_utf8(&payload)
            .map_err(|_| "payload is not UTF-8".to_string())
            .and_then(Message::parse);
        let (message, verdict) = match parsed {
            Ok(m) => {
                if let Some(t) = fetched_us {
                    stats::record(&mut lat.queue_wait_us, t.saturating_sub(m.generated_us));
                }
                if m.reclaims >= 2 {
                    suspects.level = m.reclaims;
                    suspects.count += 1;
                }
                held.ids.insert(m.id);
                (m, Verdict::Ok)
            }
            Err(reason) => {
                tracing::warn!(payload = %String::from_utf8_lossy(&payload), %reason, "bad message; moving it to the error store");
                held.bad.insert(payload.clone());
                (Message::default(), Verdict::Bad(reason))
            }
        };
        items.push(Done {
            payload,
            owner: owner.clone(),
            message,
            verdict,
            delay_ms: 0,
        });
    }
    items
}

/// Members of `owner`'s in-flight set this handler does not know it holds.
///
/// A message committed between the `SMEMBERS` and the check may be taken for an orphan and run
/// again; its second commit is then refused (the `SREM` finds nothing), so nothing is recorded
/// twice.
async fn orphans(
    con: &mut Conn,
    keys: &Keys,
    owner: &str,
    tracked: &Mutex<Tracked>,
) -> Result<Vec<Vec<u8>>, Error> {
    let members: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
        .arg(keys.inflight(owner))
        .query_async(con)
        .await?;
    let held = tracked.lock().expect("tracking lock poisoned");
    Ok(members
        .into_iter()
        .filter(|p| match std::str::from_utf8(p).ok().map(Message::parse) {
            Some(Ok(m)) => !held.ids.contains(&m.id),
            _ => !held.bad.contains(p),
        })
        .collect())
}

/// Forgets committed messages: no longer held, no longer tracked.
fn release(batch: &[Done], shared: &HandlerShared, tracked: &Mutex<Tracked>) {
    let mut held = tracked.lock().expect("tracking lock poisoned");
    let mut suspects = shared.suspects.lock().expect("suspect lock poisoned");
    for d in batch {
        match d.verdict {
            Verdict::Bad(_) => {
                held.bad.remove(&d.payload);
            }
            _ => {
                held.ids.remove(&d.message.id);
            }
        }
        if d.message.reclaims >= 2 {
            suspects.count = suspects.count.saturating_sub(1);
        }
    }
    if suspects.count == 0 {
        suspects.level = 0;
    }
}

async fn timer_loop(
    model: OutcomeModel,
    mut work_rx: mpsc::UnboundedReceiver<Vec<Done>>,
    done_tx: mpsc::UnboundedSender<Done>,
) -> Result<(), Error> {
    // Each waiting message with the moment its eventHandler started, for the handler-time metric.
    let mut waiting: DelayQueue<(Done, Instant)> = DelayQueue::new();
    let mut open = true;
    while open || !waiting.is_empty() {
        tokio::select! {
            batch = work_rx.recv(), if open => {
                let Some(batch) = batch else { open = false; continue };
                for mut d in batch {
                    if d.verdict == Verdict::Ok {
                        if model.crash_on_id == Some(d.message.id) {
                            tracing::error!(id = d.message.id, "fault injection: crashing on this message");
                            std::process::abort();
                        }
                        let started = Instant::now();
                        let outcome = model.decide(d.message.id);
                        if outcome.failed {
                            d.verdict = Verdict::Failed;
                        }
                        d.delay_ms = outcome.delay_ms;
                        if outcome.delay_ms > 0 {
                            waiting.insert((d, started), Duration::from_millis(outcome.delay_ms));
                            continue;
                        }
                        crate::metrics::handler_time(started.elapsed());
                    }
                    if done_tx.send(d).is_err() {
                        return Ok(());
                    }
                }
            }
            Some(expired) = poll_fn(|cx| waiting.poll_expired(cx)), if !waiting.is_empty() => {
                let (d, started) = expired.into_inner();
                crate::metrics::handler_time(started.elapsed());
                if done_tx.send(d).is_err() {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

async fn commit_loop(
    mut con: Conn,
    keys: &Keys,
    config: &HandlerConfig,
    permits: &Arc<Semaphore>,
    shared: &HandlerShared,
    tracked: &Mutex<Tracked>,
    mut done_rx: mpsc::UnboundedReceiver<Done>,
) -> Result<(), Error> {
    let mut batch: Vec<Done> = Vec::with_capacity(config.commit_max);
    while let Some(first) = done_rx.recv().await {
        batch.push(first);
        while batch.len() < config.commit_max {
            match done_rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        // One owner per process (`<instance>.0`), so the whole batch is one commit.
        let (time_us, refused) = commit_with_retry(&mut con, keys, config, &batch).await?;
        if !refused.is_empty() {
            tracing::warn!(refused = refused.len(), "outcomes refused: those messages were reclaimed while we held them and are handled elsewhere");
        }
        let mut lat = shared.latencies.lock().expect("latency lock poisoned");
        let mut refused = refused.into_iter().peekable();
        let (mut processed, mut errors) = (0, 0);
        for (i, d) in batch.iter().enumerate() {
            if refused.peek() == Some(&i) {
                refused.next();
                continue;
            }
            match d.verdict {
                Verdict::Ok => processed += 1,
                Verdict::Failed => errors += 1,
                Verdict::Bad(_) => continue,
            }
            let latency_us = time_us.saturating_sub(d.message.generated_us);
            stats::record(&mut lat.end_to_end_us, latency_us);
            let overhead_us = latency_us.saturating_sub(d.delay_ms * 1000);
            stats::record(&mut lat.overhead_us, overhead_us);
            crate::metrics::end_to_end_us(latency_us);
        }
        drop(lat);
        crate::metrics::committed(processed, errors);
        shared
            .in_flight
            .fetch_sub(batch.len() as u64, Ordering::Relaxed);
        release(&batch, shared, tracked);
        permits.add_permits(batch.len());
        batch.clear();
    }
    Ok(())
}

/// Commits, retrying while Redis is unreachable or loading (a lost reply is safe to retry: a
/// commit that did land makes the retry's SREM find nothing, so nothing is recorded twice). Any other failure is a
/// bug or corrupt data, and fatal: the process exits, its heartbeat expires, and its messages are
/// reclaimed by the others.
async fn commit_with_retry(
    con: &mut Conn,
    keys: &Keys,
    config: &HandlerConfig,
    group: &[Done],
) -> Result<(u64, Vec<usize>), Error> {
    let started = tokio::time::Instant::now();
    let mut failures = 0u32;
    loop {
        match commit(con, keys, group).await {
            Ok(r) => return Ok(r),
            Err(e)
                if e.is_transient()
                    && started.elapsed() < Duration::from_millis(config.redis_down_max_ms) =>
            {
                failures += 1;
                tracing::warn!(error = %e, failures, "commit failed; retrying");
                tokio::time::sleep(Duration::from_millis(20 * u64::from(failures.min(50)))).await;
            }
            Err(e) => return Err(e),
        }
    }
}
