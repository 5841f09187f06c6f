//! The fetch side of a handler: fetch.lua in batches while this copy is a handler, and the
//! reconciliation that keeps its in-flight set in Redis and what it holds in memory in step
//! (docs/PROTOCOL.md, invariant 5).

use super::{
    admit, BatchTake, Done, HandlerConfig, HandlerShared, Holdings, Role, SuspectHold, ToRunner,
    RECONCILE_EVERY,
};
use crate::conn::Conn;
use crate::error::Error;
use crate::node::incarnation::Incarnation;
use crate::protocol::keys::Keys;
use crate::protocol::message::{parse_batch_record, record_open_count, BatchEntry, Envelope};
use crate::protocol::scripts;
use crate::protocol::SUSPECT_LEVELS;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
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
    /// The batches now recorded whole in the handler's batch records, in the order taken.
    pub batches: Vec<BatchEntry>,
    /// Batch records another handler gave back (hand-back), now this handler's as they were:
    /// each with the indexes of its open messages, the only ones it holds.
    pub returned: Vec<(BatchEntry, Vec<u64>)>,
    /// The payloads now in the handler's in-flight set, in the order taken.
    pub payloads: Vec<Bytes>,
}

impl Fetched {
    /// Messages taken, in batches and payloads.
    pub fn len(&self) -> usize {
        self.payloads.len()
            + self.batches.iter().map(|b| b.count as usize).sum::<usize>()
            + self
                .returned
                .iter()
                .map(|(_, open)| open.len())
                .sum::<usize>()
    }

    /// Nothing was taken.
    pub fn is_empty(&self) -> bool {
        self.payloads.is_empty() && self.batches.is_empty() && self.returned.is_empty()
    }

    /// The messages taken as work items owned by `owner`, batches first, each not yet handled
    /// (a payload that does not parse: [`super::Verdict::Bad`]): for benches and tests that
    /// drive fetch.lua and commit.lua directly.
    pub fn into_items(self, owner: &Arc<str>) -> Vec<Done> {
        let mut items = Vec::with_capacity(self.len());
        for entry in self.batches {
            items.extend((0..entry.count).map(|index| Done::in_batch(&entry, index, owner)));
        }
        for (entry, open) in self.returned {
            items.extend(
                open.into_iter()
                    .map(|index| Done::in_batch(&entry, index, owner)),
            );
        }
        for payload in self.payloads {
            let parsed = Envelope::parse(&payload);
            items.push(Done::from_payload(payload, parsed, owner));
        }
        items
    }
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
    call.key(keys.incarnation())
        .key(keys.batches(handler))
        .key(keys.writes())
        .key(keys.returned());
    call.arg(handler)
        .arg(limits.count)
        .arg(heartbeat_ms)
        .arg(limits.retry_max)
        .arg(limits.hold.level)
        .arg(limits.hold.count)
        .arg(limits.suspect_base)
        .arg(incarnation.guard());
    let reply: Vec<redis::Value> = incarnation.invoke(&call, con).await?;
    let mut items = reply.into_iter();
    let (time_us, lapsed, b) = match (items.next(), items.next(), items.next()) {
        (Some(redis::Value::Int(t)), Some(redis::Value::Int(l)), Some(redis::Value::Int(b))) => {
            (t as u64, l, b.max(0) as usize)
        }
        other => {
            return Err(Error::Corrupt(format!(
                "fetch.lua returned {other:?} before the batches"
            )))
        }
    };
    let mut batches = Vec::with_capacity(b);
    for v in items.by_ref().take(b) {
        let redis::Value::BulkString(raw) = v else {
            return Err(Error::Corrupt(format!(
                "fetch.lua returned {v:?} as a batch"
            )));
        };
        batches.push(BatchEntry::parse(&raw).map_err(Error::Corrupt)?);
    }
    let r = match items.next() {
        Some(redis::Value::Int(r)) => r.max(0) as usize,
        other => {
            return Err(Error::Corrupt(format!(
                "fetch.lua returned {other:?} before the returned records"
            )))
        }
    };
    let mut returned = Vec::with_capacity(r);
    for _ in 0..r {
        let (Some(redis::Value::BulkString(field)), Some(redis::Value::BulkString(value))) =
            (items.next(), items.next())
        else {
            return Err(Error::Corrupt(
                "fetch.lua returned a returned record that is not a field and a value".into(),
            ));
        };
        let first = std::str::from_utf8(&field)
            .ok()
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| Error::Corrupt(format!("returned record field {field:?}")))?;
        returned.push(parse_batch_record(first, &value).map_err(Error::Corrupt)?);
    }
    let payloads = items
        .map(|v| match v {
            redis::Value::BulkString(b) => Bytes::from(b),
            other => Bytes::from(format!("{other:?}")),
        })
        .collect();
    Ok(Fetched {
        time_us,
        heartbeat_lapsed: lapsed == 1,
        batches,
        returned,
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
    /// To the runner: batches of messages to handle (or: drop them all).
    pub(super) work_tx: mpsc::UnboundedSender<ToRunner>,
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
        // Set once this handler gave its messages back for the current generator term.
        let mut handed_back = false;
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
                    Err(e) if e.stops_the_copy() => return Err(Exit::Fatal(e)),
                    Err(e) => {
                        tracing::warn!(error = %e, "in-flight reconciliation failed; retrying");
                        outcome_unknown = true;
                        unknown_since.get_or_insert_with(Instant::now);
                        self.pause(RECONCILE_RETRY).await?;
                        continue;
                    }
                }
            }
            // A generator does not handle: it gives back what it holds (once per term), fetches
            // nothing, and its set is still reconciled on schedule.
            if *role.borrow_and_update() != Role::Handler {
                if !handed_back {
                    self.hand_back().await?;
                    handed_back = true;
                }
                tokio::select! {
                    _ = self.stop.cancelled() => return Err(Exit::Stopped),
                    r = role.changed() => if r.is_err() { return Err(Exit::Stopped) },
                    _ = tokio::time::sleep_until(next_check) => {}
                }
                continue;
            }
            handed_back = false;
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
                    self.permits
                        .add_permits((batch as usize).saturating_sub(f.len()));
                    if f.is_empty() {
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
                    let takes = f
                        .batches
                        .into_iter()
                        .map(BatchTake::whole)
                        .chain(
                            f.returned
                                .into_iter()
                                .map(|(entry, indexes)| BatchTake { entry, indexes }),
                        )
                        .collect();
                    self.hand_over(f.payloads, takes, Some(f.time_us))?;
                }
                Err(e) if e.stops_the_copy() => {
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

    /// This copy became the generator: the runner drops every message it has not finished, the
    /// committer commits every outcome made before that, and then (under the commit gate, so no
    /// commit is in flight) reclaim.lua's hand-back gives everything the in-flight set and batch
    /// records hold back for the other handlers, and the holdings are forgotten. Retried while
    /// Redis is unreachable (it is idempotent), for at most `redis_down_max_ms`.
    async fn hand_back(&mut self) -> Result<(), Exit> {
        let (ack_tx, ack_rx) = tokio::sync::oneshot::channel();
        self.work_tx
            .send(ToRunner::Abandon(ack_tx))
            .map_err(|_| Exit::Stopped)?;
        tokio::select! {
            _ = self.stop.cancelled() => return Err(Exit::Stopped),
            acked = ack_rx => acked.map_err(|_| Exit::Stopped)?,
        }
        let started = Instant::now();
        let mut failures = 0u32;
        loop {
            let given = {
                let _gate = self.commit_gate.lock().await;
                let given = crate::node::liveness::hand_back(
                    &mut self.con,
                    self.keys,
                    self.incarnation,
                    &self.owner,
                )
                .await;
                if given.is_ok() {
                    let mut held = self.holdings.lock().expect("holdings lock poisoned");
                    *held = Holdings::default();
                    *self.shared.suspects.lock().expect("suspect lock poisoned") =
                        SuspectHold::default();
                }
                given
            };
            match given {
                Ok(given) => {
                    if given > 0 {
                        tracing::info!(
                            given,
                            handler = %self.owner,
                            "became the generator: gave our messages back to the other handlers"
                        );
                    }
                    return Ok(());
                }
                Err(e)
                    if e.is_transient()
                        && started.elapsed()
                            < Duration::from_millis(self.config.redis_down_max_ms) =>
                {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "giving our messages back failed; retrying");
                    self.pause(Duration::from_millis(20 * u64::from(failures.min(50))))
                        .await?;
                }
                Err(e) => return Err(Exit::Fatal(e)),
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

    /// Admits payloads and batches (now ours in Redis) and passes them to the runner.
    fn hand_over(
        &self,
        payloads: Vec<Bytes>,
        batches: Vec<BatchTake>,
        fetched_us: Option<u64>,
    ) -> Result<(), Exit> {
        let items = admit(
            payloads,
            batches,
            fetched_us,
            &self.owner,
            self.shared,
            self.holdings,
        );
        self.work_tx
            .send(ToRunner::Work(items))
            .map_err(|_| Exit::Stopped)
    }

    /// Makes what this handler holds equal to its in-flight set and batch records in Redis:
    /// adopts every member and every open message it does not hold (a fetch whose reply was lost
    /// put them there) and forgets what Redis no longer has (reclaimed while the heartbeat had
    /// lapsed; its commit will be refused).
    ///
    /// Cheap when nothing is wrong: one `SCARD` and one `HVALS`, compared with the counts held,
    /// while no commit is in flight (the commit gate) and no fetch is (the fetcher is the caller).
    /// The full comparison (`SMEMBERS`, `HGETALL`) runs when they differ, when `full` (a fetch's
    /// outcome is unknown), or after a heartbeat lapse (then Redis may have lost records and
    /// gained others in equal numbers, which counts cannot see). A batch record counts by its
    /// open messages too: bits set that this copy does not hold are adopted, bits it holds that
    /// are clear are forgotten.
    async fn reconcile(&mut self, full: bool, since: Option<Instant>) -> Result<(), Error> {
        let set = self.keys.inflight(&self.owner);
        let records = self.keys.batches(&self.owner);
        match self.reconcile_held(&set, &records, full, since).await {
            Err(Error::Redis(e)) if e.code() == Some("WRONGTYPE") => {
                // Our set or records were replaced by something else: what they held is gone
                // with them. Set aside (an error entry names it); the next reconciliation
                // compares afresh.
                let mut call = scripts::SET_ASIDE.prepare_invoke();
                call.key(self.keys.errors())
                    .key(self.keys.stats())
                    .key(&set)
                    .key(&records)
                    .arg("reconcile")
                    .arg("set")
                    .arg("hash");
                call.invoke_async::<u64>(&mut self.con).await?;
                tracing::error!(set = %set, records = %records, "our in-flight set or batch records had the wrong type; set aside");
                Ok(())
            }
            other => other,
        }
    }

    async fn reconcile_held(
        &mut self,
        set: &str,
        records: &str,
        full: bool,
        since: Option<Instant>,
    ) -> Result<(), Error> {
        let (orphans, batches) = {
            let _gate = self.commit_gate.lock().await;
            let lapsed = self.shared.heartbeat_lapsed.swap(false, Ordering::AcqRel);
            let result = self.compare(set, records, full || lapsed).await;
            if result.is_err() && lapsed {
                self.shared.heartbeat_lapsed.store(true, Ordering::Release);
            }
            result?
        };
        let adopted = orphans.len() + batches.iter().map(|b| b.indexes.len()).sum::<usize>();
        if adopted == 0 {
            return Ok(());
        }
        tracing::warn!(
            adopted,
            since_failed_fetch_ms = since.map(|t| t.elapsed().as_millis() as u64),
            "adopted messages our in-flight set or batch records held that we did not (a fetch reply was lost)"
        );
        crate::admin::metrics::adopted(adopted as u64);
        let n = u32::try_from(adopted).unwrap_or(u32::MAX);
        let held = tokio::select! {
            _ = self.stop.cancelled() => return Ok(()),
            p = self.permits.acquire_many(n) => p.expect("the semaphore is never closed"),
        };
        held.forget();
        // The runner ends only on an error it reports itself.
        let _ = self.hand_over(orphans, batches, None);
        Ok(())
    }

    /// Under the commit gate: the members of `set` and the open messages of the batch `records`
    /// not held, after forgetting what is held and Redis no longer has. `Ok(empty)` at once when
    /// `!full` and the counts agree (payloads; records and their open messages).
    async fn compare(
        &mut self,
        set: &str,
        records: &str,
        full: bool,
    ) -> Result<(Vec<Bytes>, Vec<BatchTake>), Error> {
        if !full {
            // Separate commands, not a pipeline: a key of the wrong type must fail with its own
            // WRONGTYPE error, which the caller sets aside.
            let in_set: usize = redis::cmd("SCARD")
                .arg(set)
                .query_async(&mut self.con)
                .await?;
            let values: Vec<Vec<u8>> = redis::cmd("HVALS")
                .arg(records)
                .query_async(&mut self.con)
                .await?;
            let open: u64 = values.iter().map(|v| record_open_count(v)).sum();
            let held = self.holdings.lock().expect("holdings lock poisoned");
            let held_open = held.batch_messages();
            if in_set == held.payloads.len()
                && values.len() == held.batches.len()
                && open == held_open
            {
                return Ok((Vec::new(), Vec::new()));
            }
            tracing::warn!(
                in_set,
                records = values.len(),
                open,
                held_payloads = held.payloads.len(),
                held_batches = held.batches.len(),
                held_open,
                "in-flight set or batch records and holdings differ; comparing them in full"
            );
        }
        let members: Vec<Bytes> = redis::cmd("SMEMBERS")
            .arg(set)
            .query_async(&mut self.con)
            .await?;
        let fields: HashMap<String, Bytes> = redis::cmd("HGETALL")
            .arg(records)
            .query_async(&mut self.con)
            .await?;
        let mut holdings = self.holdings.lock().expect("holdings lock poisoned");
        let in_redis: HashSet<&[u8]> = members.iter().map(|m| &m[..]).collect();
        let before = holdings.payloads.len() as u64 + holdings.batch_messages();
        holdings.payloads.retain(|p| in_redis.contains(&p[..]));
        let mut open = HashMap::with_capacity(fields.len());
        for (field, value) in &fields {
            let parsed = field
                .parse::<u64>()
                .map_err(|_| format!("field {field:?} is not a first id"))
                .and_then(|first| parse_batch_record(first, value));
            match parsed {
                Ok((entry, indexes)) => {
                    open.insert(entry.first_id, (entry, indexes));
                }
                // Left for reclaim.lua, which reports it, if this copy dies; never run.
                Err(why) => {
                    tracing::error!(key = %records, %field, %why, "unreadable batch record")
                }
            }
        }
        // Held messages whose bit is no longer set in Redis were taken from us (reclaimed).
        holdings.batches.retain(|first, hold| {
            let Some((_, indexes)) = open.get(first) else {
                return false;
            };
            let in_redis: HashSet<u64> = indexes.iter().copied().collect();
            let held: Vec<u64> = (0..hold.mask.len() as u64 * 8)
                .filter(|&i| hold.holds(i))
                .collect();
            for i in held {
                if !in_redis.contains(&i) {
                    hold.remove(i);
                }
            }
            hold.count > 0
        });
        let gone = before - holdings.payloads.len() as u64 - holdings.batch_messages();
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
        let batches = open
            .into_values()
            .map(|(entry, indexes)| {
                let hold = holdings.batches.get(&entry.first_id);
                let indexes = indexes
                    .into_iter()
                    .filter(|&i| !hold.is_some_and(|h| h.holds(i)))
                    .collect();
                BatchTake { entry, indexes }
            })
            .filter(|take| !take.indexes.is_empty())
            .collect();
        Ok((orphans, batches))
    }
}
