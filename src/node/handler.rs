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
//!
//! The fetcher also keeps this handler's in-flight set in Redis and what it holds in memory in
//! step (docs/PROTOCOL.md, invariant 5): after a fetch whose outcome it could not see, after its
//! heartbeat lapsed, and at least every [`RECONCILE_EVERY`] in any role, it compares the two and
//! adopts any message the set holds that it does not, so no message is stranded in a live
//! process.

use crate::conn::Conn;
use crate::error::Error;
use crate::node::incarnation::Incarnation;
use crate::outcome::OutcomeModel;
use crate::protocol::keys::Keys;
use crate::protocol::message::Message;
use crate::protocol::scripts;
use crate::stats::{self, Latencies};
use std::collections::HashSet;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
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
    /// An `eventHandler` that has not called back after this long is given up on: the message
    /// gets the outcome "error, handler timeout" (recorded exactly once like any other) and its
    /// slot is freed, so a stuck handler cannot hold messages forever.
    pub handler_timeout_ms: u64,
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
    /// `eventHandler` did not call back within `handler_timeout_ms`.
    TimedOut,
    /// The payload could not be parsed; the reason goes to the error store.
    Bad(String),
}

/// One message on its way from fetch to commit.
#[derive(Debug, Clone)]
pub struct Done {
    /// The payload exactly as fetched: commit.lua finds it in the in-flight set by value.
    pub payload: Arc<[u8]>,
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

/// What one fetch.lua call returned.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    /// Redis time of the fetch, µs.
    pub time_us: u64,
    /// The handler's heartbeat had expired before this fetch refreshed it: its in-flight set may
    /// have been reclaimed, so what it holds must be reconciled with the set.
    pub heartbeat_lapsed: bool,
    /// The payloads now in the handler's in-flight set, in the order taken.
    pub payloads: Vec<Vec<u8>>,
}

/// Runs fetch.lua: up to `count` fresh messages, a tenth of them at most from the retry set.
pub async fn fetch(
    con: &mut Conn,
    keys: &Keys,
    handler: &str,
    count: u64,
    heartbeat_ms: u64,
    incarnation: &Incarnation,
) -> Result<Fetched, Error> {
    let limits = FetchLimits {
        count,
        retry_max: count.div_ceil(10),
        hold: SuspectHold::default(),
        suspect_base: count,
    };
    fetch_limited(con, keys, handler, limits, heartbeat_ms, incarnation).await
}

/// Runs fetch.lua: suspects first (a group of one level, if the handler may take more), then a
/// random sample from the retry set, then fresh messages from the queue, `limits.count` in all,
/// into `handler`'s in-flight set.
pub async fn fetch_limited(
    con: &mut Conn,
    keys: &Keys,
    handler: &str,
    limits: FetchLimits,
    heartbeat_ms: u64,
    incarnation: &Incarnation,
) -> Result<Fetched, Error> {
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
    call.key(keys.incarnation());
    let reply: Vec<redis::Value> = call
        .arg(handler)
        .arg(limits.count)
        .arg(heartbeat_ms)
        .arg(limits.retry_max)
        .arg(limits.hold.level)
        .arg(limits.hold.count)
        .arg(limits.suspect_base)
        .arg(incarnation.token())
        .invoke_async(con)
        .await?;
    let mut items = reply.into_iter();
    let (time_us, lapsed) = match (items.next(), items.next()) {
        (Some(redis::Value::Int(t)), Some(redis::Value::Int(l))) => (t as u64, l),
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
    Ok(Fetched {
        time_us,
        heartbeat_lapsed: lapsed == 1,
        payloads,
    })
}

/// Runs commit.lua for `items`, which must all have the same owner.
/// Returns the Redis time of the commit (µs) and the indexes of the items it refused.
pub async fn commit(
    con: &mut Conn,
    keys: &Keys,
    items: &[Done],
    incarnation: &Incarnation,
) -> Result<(u64, Vec<usize>), Error> {
    let Some(first) = items.first() else {
        return Ok((0, Vec::new()));
    };
    let mut call = scripts::COMMIT.prepare_invoke();
    call.key(keys.inflight(&first.owner))
        .key(keys.done())
        .key(keys.ok())
        .key(keys.errors())
        .key(keys.stats())
        .key(keys.incarnation())
        .arg(incarnation.token());
    for d in items {
        debug_assert!(Arc::ptr_eq(&d.owner, &first.owner) || d.owner == first.owner);
        match &d.verdict {
            Verdict::Ok => call.arg("o").arg(&d.payload[..]).arg(d.message.id),
            Verdict::Failed => call.arg("e").arg(&d.payload[..]).arg(d.message.id),
            Verdict::TimedOut => call.arg("t").arg(&d.payload[..]).arg(d.message.id),
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

/// Reclaim counts that make a message a suspect with its own list; one more is poison
/// (`liveness::MAX_RECLAIMS`).
pub const SUSPECT_LEVELS: std::ops::RangeInclusive<u64> = 2..=6;

/// What this handler believes its in-flight set holds: every payload it fetched (and saw the
/// reply of) or adopted, minus those it committed (and saw the reply of), minus those a
/// reconciliation found reclaimed. Exact payload bytes, so that a reconciliation can tell any
/// member of the set it never saw, even one that repeats another's id.
#[derive(Debug, Default)]
struct Holdings {
    payloads: HashSet<Arc<[u8]>>,
}

/// How often the fetcher checks, in every role, that its in-flight set holds exactly what it
/// holds in memory (one `SCARD`, and a `SMEMBERS` only when they differ): the backstop that
/// bounds how long any message can sit unseen in a live handler's set (docs/PROTOCOL.md,
/// invariant 5).
pub const RECONCILE_EVERY: Duration = Duration::from_secs(2);

/// Longest pause between polls of an idle handler; the wake-up channel usually ends it sooner.
const IDLE_POLL_MAX: Duration = Duration::from_millis(50);

/// Pause before retrying a reconciliation that failed (Redis away).
const RECONCILE_RETRY: Duration = Duration::from_millis(100);

/// Runs the three tasks until `stop` fires, then drains: no new fetches, every fetched message is
/// still handled and committed. Publishes the current handler id on `owner_tx` (the heartbeat
/// task keeps that one alive).
#[allow(clippy::too_many_arguments)]
pub async fn run(
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
    let fetcher = Fetcher {
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
    let timeout = Duration::from_millis(config.handler_timeout_ms);
    let timers = timer_loop(config.model, timeout, work_rx, done_tx);
    let committer = commit_loop(
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
    tokio::try_join!(fetcher.run(role), timers, committer)?;
    Ok(())
}

/// The fetch side of one handler: takes batches while this process is a handler, and keeps its
/// in-flight set reconciled with what it holds in every role.
struct Fetcher<'a> {
    con: Conn,
    keys: &'a Keys,
    incarnation: &'a Incarnation,
    config: &'a HandlerConfig,
    /// This process's handler id (`<instance>.0`): whose in-flight set it fills.
    owner: Arc<str>,
    /// One permit per message held, `max_in_flight` in all.
    permits: &'a Arc<Semaphore>,
    shared: &'a HandlerShared,
    holdings: &'a Mutex<Holdings>,
    commit_gate: &'a tokio::sync::Mutex<()>,
    /// To the timer task: batches of messages to run.
    work_tx: mpsc::UnboundedSender<Vec<Done>>,
    stop: &'a CancellationToken,
}

/// Why [`Fetcher::run`] ends.
enum Exit {
    /// Told to stop, or the timer task is gone (its error is reported there).
    Stopped,
    /// An error retrying cannot cure (Redis lost data).
    Fatal(Error),
}

impl Fetcher<'_> {
    async fn run(mut self, mut role: watch::Receiver<Role>) -> Result<(), Error> {
        match self.fetch_until_stopped(&mut role).await {
            Exit::Stopped => Ok(()),
            Exit::Fatal(e) => Err(e),
        }
    }

    async fn fetch_until_stopped(&mut self, role: &mut watch::Receiver<Role>) -> Exit {
        match self.fetch_loop(role).await {
            Ok(never) => match never {},
            Err(exit) => exit,
        }
    }

    async fn fetch_loop(
        &mut self,
        role: &mut watch::Receiver<Role>,
    ) -> Result<std::convert::Infallible, Exit> {
        let batch = self
            .config
            .batch
            .min(self.config.max_in_flight as u64)
            .max(1);
        let mut idle = Duration::ZERO;
        let mut failures = 0u32;
        // A fetch whose reply was lost may have moved messages into our set: reconcile in full.
        let mut outcome_unknown = false;
        let mut unknown_since: Option<Instant> = None;
        let mut next_check = Instant::now() + RECONCILE_EVERY;
        loop {
            if self.stop.is_cancelled() {
                return Err(Exit::Stopped);
            }
            let lapsed = self.shared.heartbeat_lapsed.load(Ordering::Acquire);
            if outcome_unknown || lapsed || Instant::now() >= next_check {
                match self.reconcile(outcome_unknown, unknown_since).await {
                    Ok(()) => {
                        outcome_unknown = false;
                        unknown_since = None;
                        next_check = Instant::now() + RECONCILE_EVERY;
                    }
                    Err(e) if e.halts_the_group() => return Err(Exit::Fatal(e)),
                    Err(e) => {
                        tracing::warn!(error = %e, "in-flight reconciliation failed; retrying");
                        outcome_unknown = true;
                        unknown_since.get_or_insert_with(Instant::now);
                        self.pause(RECONCILE_RETRY).await?;
                        continue;
                    }
                }
            }
            // A generator does not fetch; its messages already in flight still finish, and its
            // set is still reconciled on schedule.
            if *role.borrow_and_update() != Role::Handler {
                tokio::select! {
                    _ = self.stop.cancelled() => return Err(Exit::Stopped),
                    r = role.changed() => if r.is_err() { return Err(Exit::Stopped) },
                    _ = tokio::time::sleep_until(next_check) => {}
                }
                continue;
            }
            let held = tokio::select! {
                _ = self.stop.cancelled() => return Err(Exit::Stopped),
                p = self.permits.acquire_many(batch as u32) => p.expect("the semaphore is never closed"),
            };
            held.forget();
            let hold = *self.shared.suspects.lock().expect("suspect lock poisoned");
            let limits = FetchLimits {
                count: batch,
                retry_max: batch.div_ceil(10),
                hold,
                suspect_base: self.config.max_in_flight as u64,
            };
            let fetched = fetch_limited(
                &mut self.con,
                self.keys,
                &self.owner,
                limits,
                self.config.heartbeat_ms,
                self.incarnation,
            )
            .await;
            match fetched {
                Ok(f) => {
                    failures = 0;
                    if f.heartbeat_lapsed {
                        self.shared.heartbeat_lapsed.store(true, Ordering::Release);
                    }
                    self.permits.add_permits(batch as usize - f.payloads.len());
                    if f.payloads.is_empty() {
                        // Idle: wait for the wake-up channel (new messages), polling ever more
                        // slowly as the backstop for a lost notification or reclaimed messages.
                        idle = (idle * 2).clamp(Duration::from_micros(500), IDLE_POLL_MAX);
                        tokio::select! {
                            _ = self.stop.cancelled() => return Err(Exit::Stopped),
                            _ = self.shared.wake.notified() => idle = Duration::ZERO,
                            _ = tokio::time::sleep(idle) => {}
                        }
                        continue;
                    }
                    idle = Duration::ZERO;
                    self.hand_over(f.payloads, Some(f.time_us))?;
                }
                Err(e) if e.halts_the_group() => {
                    self.permits.add_permits(batch as usize);
                    return Err(Exit::Fatal(e));
                }
                Err(e) => {
                    self.permits.add_permits(batch as usize);
                    failures += 1;
                    // Whatever the error, the script may have run: never assume it did not.
                    outcome_unknown = true;
                    unknown_since.get_or_insert_with(Instant::now);
                    tracing::warn!(error = %e, failures, handler = %self.owner, "fetch failed; retrying");
                    self.pause(Duration::from_millis(20 * u64::from(failures.min(50))))
                        .await?;
                }
            }
        }
    }

    /// Sleeps, or stops early when told to.
    async fn pause(&self, how_long: Duration) -> Result<(), Exit> {
        tokio::select! {
            _ = self.stop.cancelled() => Err(Exit::Stopped),
            _ = tokio::time::sleep(how_long) => Ok(()),
        }
    }

    /// Admits payloads (now ours in Redis) and passes them to the timer task.
    fn hand_over(&self, payloads: Vec<Vec<u8>>, fetched_us: Option<u64>) -> Result<(), Exit> {
        let items = admit(
            payloads,
            fetched_us,
            &self.owner,
            self.shared,
            self.holdings,
        );
        self.work_tx.send(items).map_err(|_| Exit::Stopped)
    }

    /// Makes what this handler holds equal to its in-flight set in Redis: adopts every member it
    /// does not hold (a fetch whose reply was lost put it there) and forgets every message the
    /// set no longer has (reclaimed while the heartbeat had lapsed; its commit will be refused).
    ///
    /// Cheap when nothing is wrong: one `SCARD`, compared with the count held, while no commit
    /// is in flight (the commit gate) and no fetch is (the fetcher is the caller). The full
    /// `SMEMBERS` comparison runs when they differ, when `full` (a fetch's outcome is unknown),
    /// or after a heartbeat lapse (then the set may have lost members and gained others in equal
    /// numbers, which counts cannot see).
    async fn reconcile(&mut self, full: bool, since: Option<Instant>) -> Result<(), Error> {
        let set = self.keys.inflight(&self.owner);
        match self.reconcile_set(&set, full, since).await {
            Err(Error::Redis(e)) if e.code() == Some("WRONGTYPE") => {
                // Our set was replaced by something else: what it held is gone with it. Set it
                // aside (an error entry names it); the next reconciliation compares afresh.
                let mut call = scripts::SET_ASIDE.prepare_invoke();
                call.key(self.keys.errors())
                    .key(self.keys.stats())
                    .key(&set)
                    .arg("reconcile")
                    .arg("set");
                call.invoke_async::<u64>(&mut self.con).await?;
                tracing::error!(key = %set, "our in-flight set had the wrong type; set it aside");
                Ok(())
            }
            other => other,
        }
    }

    async fn reconcile_set(
        &mut self,
        set: &str,
        full: bool,
        since: Option<Instant>,
    ) -> Result<(), Error> {
        let orphans = {
            let _gate = self.commit_gate.lock().await;
            let lapsed = self.shared.heartbeat_lapsed.swap(false, Ordering::AcqRel);
            let result = self.compare(set, full || lapsed).await;
            if result.is_err() && lapsed {
                self.shared.heartbeat_lapsed.store(true, Ordering::Release);
            }
            result?
        };
        if orphans.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            adopted = orphans.len(),
            since_failed_fetch_ms = since.map(|t| t.elapsed().as_millis() as u64),
            "adopted messages our in-flight set held that we did not (a fetch reply was lost)"
        );
        crate::admin::metrics::adopted(orphans.len() as u64);
        let n = u32::try_from(orphans.len()).unwrap_or(u32::MAX);
        let held = tokio::select! {
            _ = self.stop.cancelled() => return Ok(()),
            p = self.permits.acquire_many(n) => p.expect("the semaphore is never closed"),
        };
        held.forget();
        // The timer task ends only on an error it reports itself.
        let _ = self.hand_over(orphans, None);
        Ok(())
    }

    /// Under the commit gate: the members of `set` not held, after forgetting the held ones
    /// `set` no longer has. `Ok(empty)` at once when `!full` and the counts agree.
    async fn compare(&mut self, set: &str, full: bool) -> Result<Vec<Vec<u8>>, Error> {
        if !full {
            let in_redis: usize = redis::cmd("SCARD")
                .arg(set)
                .query_async(&mut self.con)
                .await?;
            let held = self
                .holdings
                .lock()
                .expect("holdings lock poisoned")
                .payloads
                .len();
            if in_redis == held {
                return Ok(Vec::new());
            }
            tracing::warn!(
                in_redis,
                held,
                "in-flight set and holdings differ; comparing them in full"
            );
        }
        let members: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
            .arg(set)
            .query_async(&mut self.con)
            .await?;
        let mut holdings = self.holdings.lock().expect("holdings lock poisoned");
        let in_redis: HashSet<&[u8]> = members.iter().map(Vec::as_slice).collect();
        let before = holdings.payloads.len();
        holdings.payloads.retain(|p| in_redis.contains(&p[..]));
        let gone = before - holdings.payloads.len();
        if gone > 0 {
            tracing::warn!(
                gone,
                "messages we hold were reclaimed while our heartbeat had lapsed; another handler records them"
            );
        }
        let orphans = members
            .into_iter()
            .filter(|p| !holdings.payloads.contains(&p[..]))
            .collect();
        Ok(orphans)
    }
}

/// Turns payloads into work items: parses them (a bad one is committed as such), records the
/// queue wait (when the fetch time is known), and adds them to the holdings.
fn admit(
    payloads: Vec<Vec<u8>>,
    fetched_us: Option<u64>,
    owner: &Arc<str>,
    shared: &HandlerShared,
    holdings: &Mutex<Holdings>,
) -> Vec<Done> {
    shared
        .in_flight
        .fetch_add(payloads.len() as u64, Ordering::Relaxed);
    let mut items = Vec::with_capacity(payloads.len());
    let mut lat = shared.latencies.lock().expect("latency lock poisoned");
    let mut held = holdings.lock().expect("holdings lock poisoned");
    let mut suspects = shared.suspects.lock().expect("suspect lock poisoned");
    for payload in payloads {
        let parsed = std::str::from_utf8(&payload)
            .map_err(|_| "payload is not UTF-8".to_string())
            .and_then(Message::parse);
        let payload: Arc<[u8]> = payload.into();
        let (message, verdict) = match parsed {
            Ok(m) => {
                if let Some(t) = fetched_us {
                    stats::record(&mut lat.queue_wait_us, t.saturating_sub(m.generated_us));
                }
                if m.reclaims >= 2 {
                    suspects.level = m.reclaims;
                    suspects.count += 1;
                }
                (m, Verdict::Ok)
            }
            Err(reason) => {
                tracing::warn!(payload = %String::from_utf8_lossy(&payload), %reason, "bad message; moving it to the error store");
                (Message::default(), Verdict::Bad(reason))
            }
        };
        held.payloads.insert(payload.clone());
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

/// Forgets committed messages: no longer held.
fn release(batch: &[Done], shared: &HandlerShared, holdings: &Mutex<Holdings>) {
    let mut held = holdings.lock().expect("holdings lock poisoned");
    let mut suspects = shared.suspects.lock().expect("suspect lock poisoned");
    for d in batch {
        held.payloads.remove(&d.payload);
        if d.message.reclaims >= 2 {
            suspects.count = suspects.count.saturating_sub(1);
        }
    }
    if suspects.count == 0 {
        suspects.level = 0;
    }
}

/// Runs `eventHandler` for each message: parks it in one timer wheel for its delay, then passes it
/// on with its verdict. A delay of `timeout` or more is cut at `timeout` with the verdict
/// [`Verdict::TimedOut`].
async fn timer_loop(
    model: OutcomeModel,
    timeout: Duration,
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
                        let mut delay = Duration::from_millis(outcome.delay_ms);
                        if delay >= timeout {
                            d.verdict = Verdict::TimedOut;
                            delay = timeout;
                        } else if outcome.failed {
                            d.verdict = Verdict::Failed;
                        }
                        d.delay_ms = delay.as_millis() as u64;
                        if !delay.is_zero() {
                            waiting.insert((d, started), delay);
                            continue;
                        }
                        crate::admin::metrics::handler_time(started.elapsed());
                    }
                    if done_tx.send(d).is_err() {
                        return Ok(());
                    }
                }
            }
            Some(expired) = poll_fn(|cx| waiting.poll_expired(cx)), if !waiting.is_empty() => {
                let (d, started) = expired.into_inner();
                crate::admin::metrics::handler_time(started.elapsed());
                if done_tx.send(d).is_err() {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn commit_loop(
    mut con: Conn,
    keys: &Keys,
    incarnation: &Incarnation,
    config: &HandlerConfig,
    permits: &Arc<Semaphore>,
    shared: &HandlerShared,
    holdings: &Mutex<Holdings>,
    commit_gate: &tokio::sync::Mutex<()>,
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
        let gate = commit_gate.lock().await;
        let (time_us, refused) =
            commit_with_retry(&mut con, keys, incarnation, config, &batch).await?;
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
                Verdict::Failed | Verdict::TimedOut => errors += 1,
                Verdict::Bad(_) => continue,
            }
            let latency_us = time_us.saturating_sub(d.message.generated_us);
            stats::record(&mut lat.end_to_end_us, latency_us);
            let overhead_us = latency_us.saturating_sub(d.delay_ms * 1000);
            stats::record(&mut lat.overhead_us, overhead_us);
            crate::admin::metrics::end_to_end_us(latency_us);
        }
        drop(lat);
        crate::admin::metrics::committed(processed, errors);
        shared
            .in_flight
            .fetch_sub(batch.len() as u64, Ordering::Relaxed);
        release(&batch, shared, holdings);
        drop(gate);
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
    incarnation: &Incarnation,
    config: &HandlerConfig,
    group: &[Done],
) -> Result<(u64, Vec<usize>), Error> {
    let started = tokio::time::Instant::now();
    let mut failures = 0u32;
    loop {
        match commit(con, keys, group, incarnation).await {
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
