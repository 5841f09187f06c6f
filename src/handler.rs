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
use std::time::Duration;
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
    /// This process's instance id; handler ids are `<instance>.<incarnation>`.
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
    /// The handler id (incarnation) whose in-flight set holds the payload.
    pub owner: Arc<str>,
    /// Parsed id and generation time (zeros for a bad payload).
    pub message: Message,
    /// The outcome to record.
    pub verdict: Verdict,
    /// The eventHandler delay it waited, ms (0 until decided): end-to-end latency minus this is
    /// what the queue itself cost.
    pub delay_ms: u64,
}

/// Runs fetch.lua: up to `count` messages into `handler`'s in-flight set, a tenth of them at most
/// from the retry set, and one isolated message. See [`fetch_limited`].
pub async fn fetch(
    con: &mut Conn,
    keys: &Keys,
    handler: &str,
    count: u64,
    heartbeat_ms: u64,
) -> Result<(u64, Vec<Vec<u8>>), Error> {
    fetch_limited(
        con,
        keys,
        handler,
        count,
        count.div_ceil(10),
        true,
        heartbeat_ms,
    )
    .await
}

/// Runs fetch.lua: up to `count` messages into `handler`'s in-flight set — one isolated message
/// when `isolated_ok` (the handler holds none), up to `retry_max` from the retry set, the rest
/// fresh from the queue. Returns the Redis time of the fetch (µs) and the payloads.
pub async fn fetch_limited(
    con: &mut Conn,
    keys: &Keys,
    handler: &str,
    count: u64,
    retry_max: u64,
    isolated_ok: bool,
    heartbeat_ms: u64,
) -> Result<(u64, Vec<Vec<u8>>), Error> {
    let reply: Vec<redis::Value> = scripts::FETCH
        .key(keys.queue())
        .key(keys.inflight(handler))
        .key(keys.handlers())
        .key(keys.heartbeat(handler))
        .key(keys.errors())
        .key(keys.stats())
        .key(keys.retry())
        .key(keys.isolate())
        .arg(handler)
        .arg(count)
        .arg(heartbeat_ms)
        .arg(retry_max)
        .arg(if isolated_ok { "1" } else { "0" })
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
    /// Isolated messages (reclaimed twice or more) held now: at most one, see reclaim.lua.
    pub isolated: Arc<AtomicU64>,
    /// Signalled by the wake-up channel listener when the generator has queued messages.
    pub wake: Arc<tokio::sync::Notify>,
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
    let fetcher = fetch_loop(
        con.clone(),
        &keys,
        &config,
        role,
        owner_tx,
        &permits,
        &shared,
        work_tx,
        &stop,
    );
    let timers = timer_loop(config.model, work_rx, done_tx);
    let committer = commit_loop(con, &keys, &config, &permits, &shared, done_rx);
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
    work_tx: mpsc::UnboundedSender<Vec<Done>>,
    stop: &CancellationToken,
) -> Result<(), Error> {
    let batch = config.batch.min(config.max_in_flight as u64).max(1);
    let mut incarnation = 0u64;
    let mut owner: Arc<str> = Arc::from(format!("{}.{incarnation}", config.instance_id));
    owner_tx.send_replace(owner.clone());
    let mut idle = Duration::ZERO;
    let mut failures = 0u32;
    loop {
        // A generator does not fetch; its messages already in flight still finish.
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = role.wait_for(|r| *r == Role::Handler) => { if r.is_err() { return Ok(()); } }
        }
        let held = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            p = permits.acquire_many(batch as u32) => p.expect("the semaphore is never closed"),
        };
        held.forget();
        let isolated_ok = shared.isolated.load(Ordering::Relaxed) == 0;
        let retry_max = batch.div_ceil(10);
        match fetch_limited(
            &mut con,
            keys,
            &owner,
            batch,
            retry_max,
            isolated_ok,
            config.heartbeat_ms,
        )
        .await
        {
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
                shared
                    .in_flight
                    .fetch_add(payloads.len() as u64, Ordering::Relaxed);
                let mut items = Vec::with_capacity(payloads.len());
                {
                    let mut lat = shared.latencies.lock().expect("latency lock poisoned");
                    for payload in payloads {
                        let parsed = std::str::from_utf8(&payload)
                            .map_err(|_| "payload is not UTF-8".to_string())
                            .and_then(Message::parse);
                        let (message, verdict) = match parsed {
                            Ok(m) => {
                                stats::record(
                                    &mut lat.queue_wait_us,
                                    time_us.saturating_sub(m.generated_us),
                                );
                                if m.reclaims >= 2 {
                                    shared.isolated.fetch_add(1, Ordering::Relaxed);
                                }
                                (m, Verdict::Ok)
                            }
                            Err(reason) => {
                                tracing::warn!(payload = %String::from_utf8_lossy(&payload), %reason, "bad message; moving it to the error store");
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
                }
                if work_tx.send(items).is_err() {
                    return Ok(()); // the timer task ended: its error, if any, is reported there
                }
            }
            Err(e) => {
                permits.add_permits(batch as usize);
                failures += 1;
                if e.is_connection() {
                    // The reply was lost: fetch.lua may have moved messages we never saw into our
                    // in-flight set. Continue under a new handler id; the old one's heartbeat
                    // stops, so those messages are reclaimed and handled by someone.
                    incarnation += 1;
                    owner = Arc::from(format!("{}.{incarnation}", config.instance_id));
                    owner_tx.send_replace(owner.clone());
                }
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

async fn timer_loop(
    model: OutcomeModel,
    mut work_rx: mpsc::UnboundedReceiver<Vec<Done>>,
    done_tx: mpsc::UnboundedSender<Done>,
) -> Result<(), Error> {
    let mut waiting: DelayQueue<Done> = DelayQueue::new();
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
                        let outcome = model.decide(d.message.id);
                        crate::metrics::handler_ms(outcome.delay_ms);
                        if outcome.failed {
                            d.verdict = Verdict::Failed;
                        }
                        d.delay_ms = outcome.delay_ms;
                        if outcome.delay_ms > 0 {
                            waiting.insert(d, Duration::from_millis(outcome.delay_ms));
                            continue;
                        }
                    }
                    if done_tx.send(d).is_err() {
                        return Ok(());
                    }
                }
            }
            Some(expired) = poll_fn(|cx| waiting.poll_expired(cx)), if !waiting.is_empty() => {
                if done_tx.send(expired.into_inner()).is_err() {
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
        // Group by owner (almost always one group; several only after a fetch reply was lost).
        batch.sort_by(|a, b| a.owner.cmp(&b.owner));
        let mut start = 0;
        while start < batch.len() {
            let end = start
                + batch[start..]
                    .iter()
                    .take_while(|d| d.owner == batch[start].owner)
                    .count();
            let group = &batch[start..end];
            let (time_us, refused) = commit_with_retry(&mut con, keys, config, group).await?;
            if !refused.is_empty() {
                tracing::warn!(refused = refused.len(), handler = %group[0].owner, "outcomes refused: those messages were reclaimed while we held them and are handled elsewhere");
            }
            let mut lat = shared.latencies.lock().expect("latency lock poisoned");
            let mut refused = refused.into_iter().peekable();
            let (mut processed, mut errors) = (0, 0);
            for (i, d) in group.iter().enumerate() {
                if refused.peek() == Some(&i) {
                    refused.next();
                    continue;
                }
                if d.verdict == Verdict::Ok {
                    processed += 1;
                } else {
                    errors += 1;
                }
                if !matches!(d.verdict, Verdict::Bad(_)) {
                    let latency_us = time_us.saturating_sub(d.message.generated_us);
                    stats::record(&mut lat.end_to_end_us, latency_us);
                    let overhead_us = latency_us.saturating_sub(d.delay_ms * 1000);
                    stats::record(&mut lat.overhead_us, overhead_us);
                    crate::metrics::end_to_end_us(latency_us);
                }
            }
            crate::metrics::committed(processed, errors);
            start = end;
        }
        shared
            .in_flight
            .fetch_sub(batch.len() as u64, Ordering::Relaxed);
        let isolated = batch.iter().filter(|d| d.message.reclaims >= 2).count() as u64;
        if isolated > 0 {
            shared.isolated.fetch_sub(isolated, Ordering::Relaxed);
        }
        permits.add_permits(batch.len());
        batch.clear();
    }
    Ok(())
}

/// Commits, retrying while Redis is unreachable or loading (a lost reply is safe to retry: a commit that did
/// land makes the retry's SREM find nothing, so nothing is recorded twice). Any other failure is a
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
