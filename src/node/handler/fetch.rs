//! The fetch side of a handler: fetch.lua in batches while this copy is a handler, and the
//! reconciliation that keeps its in-flight set in Redis and what it holds in memory in step
//! (docs/PROTOCOL.md, invariant 5).

use super::{
    admit, Done, HandlerConfig, HandlerShared, Holdings, Role, SuspectHold, RECONCILE_EVERY,
};
use crate::conn::Conn;
use crate::error::Error;
use crate::node::incarnation::Incarnation;
use crate::protocol::keys::Keys;
use crate::protocol::scripts;
use crate::protocol::SUSPECT_LEVELS;
use bytes::Bytes;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest pause between polls of an idle handler; the wake-up channel usually ends it sooner.
const IDLE_POLL_MAX: Duration = Duration::from_millis(50);

/// Pause before retrying a reconciliation that failed (Redis away).
const RECONCILE_RETRY: Duration = Duration::from_millis(100);

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
    pub payloads: Vec<Bytes>,
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
            redis::Value::BulkString(b) => Bytes::from(b),
            other => Bytes::from(format!("{other:?}")),
        })
        .collect();
    Ok(Fetched {
        time_us,
        heartbeat_lapsed: lapsed == 1,
        payloads,
    })
}

/// The fetch side of one handler: takes batches while this process is a handler, and keeps its
/// in-flight set reconciled with what it holds in every role.
pub(super) struct Fetcher<'a> {
    pub(super) con: Conn,
    pub(super) keys: &'a Keys,
    pub(super) incarnation: &'a Incarnation,
    pub(super) config: &'a HandlerConfig,
    /// This process's handler id (`<instance>.0`): whose in-flight set it fills.
    pub(super) owner: Arc<str>,
    /// One permit per message held, `max_in_flight` in all.
    pub(super) permits: &'a Arc<Semaphore>,
    pub(super) shared: &'a HandlerShared,
    pub(super) holdings: &'a Mutex<Holdings>,
    pub(super) commit_gate: &'a tokio::sync::Mutex<()>,
    /// To the runner: batches of messages to handle.
    pub(super) work_tx: mpsc::UnboundedSender<Vec<Done>>,
    pub(super) stop: &'a CancellationToken,
}

/// Why [`Fetcher::run`] ends.
enum Exit {
    /// Told to stop, or the runner is gone (its error is reported there).
    Stopped,
    /// An error retrying cannot cure (Redis lost data).
    Fatal(Error),
}

impl Fetcher<'_> {
    pub(super) async fn run(mut self, mut role: watch::Receiver<Role>) -> Result<(), Error> {
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

    /// Admits payloads (now ours in Redis) and passes them to the runner.
    fn hand_over(&self, payloads: Vec<Bytes>, fetched_us: Option<u64>) -> Result<(), Exit> {
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
        // The runner ends only on an error it reports itself.
        let _ = self.hand_over(orphans, None);
        Ok(())
    }

    /// Under the commit gate: the members of `set` not held, after forgetting the held ones
    /// `set` no longer has. `Ok(empty)` at once when `!full` and the counts agree.
    async fn compare(&mut self, set: &str, full: bool) -> Result<Vec<Bytes>, Error> {
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
        let members: Vec<Bytes> = redis::cmd("SMEMBERS")
            .arg(set)
            .query_async(&mut self.con)
            .await?;
        let mut holdings = self.holdings.lock().expect("holdings lock poisoned");
        let in_redis: HashSet<&[u8]> = members.iter().map(|m| &m[..]).collect();
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
