//! Heartbeats and reclaim: how a SIGKILLed handler's in-flight messages come back.
//!
//! Every process keeps `{ns}:hb:<handler>` alive (TTL `heartbeat_ms`, refreshed every fifth of it)
//! and every process runs reclaim.lua on the same beat: a handler whose heartbeat has expired is
//! dead, and its in-flight set goes back to waiting (the retry set, or a suspect list once a
//! message has been reclaimed more than once; see reclaim.lua). No cleanup code is needed on
//! death, so SIGKILL loses nothing.
//!
//! The same beat keeps this process's entry in the instance registry (`{ns}:instances`) fresh for
//! `app status` (presence.lua, at most once a second or on a role change), and, while this process
//! is the generator, pushes a counters sample to `{ns}:stats:history` once a second (sample.lua)
//! so `status` can show rates. Both are best effort: failing them never stops the process.

use crate::conn::Conn;
use crate::error::Error;
use crate::node::handler::Role;
use crate::node::incarnation::Incarnation;
use crate::protocol::keys::Keys;
use crate::protocol::scripts;
use crate::protocol::MAX_RECLAIMS;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Refreshes `handler`'s heartbeat. Returns `false` when the key had expired (or never
/// existed): reclaim.lua may then have taken the handler's in-flight set.
pub async fn heartbeat(
    con: &mut Conn,
    keys: &Keys,
    handler: &str,
    heartbeat_ms: u64,
) -> Result<bool, Error> {
    let key = keys.heartbeat(handler);
    let before: Result<Option<Vec<u8>>, redis::RedisError> = redis::cmd("SET")
        .arg(&key)
        .arg(1)
        .arg("PX")
        .arg(heartbeat_ms)
        .arg("GET")
        .query_async(con)
        .await;
    match before {
        Ok(before) => Ok(before.is_some()),
        // A key of another type cannot be read back; a plain SET replaces it (a heartbeat holds
        // nothing worth keeping), and the refresh counts as a lapse, to be safe.
        Err(e) if e.code() == Some("WRONGTYPE") => {
            redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("PX")
                .arg(heartbeat_ms)
                .query_async::<()>(con)
                .await?;
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Deletes `handler`'s heartbeat (clean stop, nothing in flight): its registry entry is then
/// cleaned up by the next reclaim at once instead of after the TTL.
pub async fn forget(con: &mut Conn, keys: &Keys, handler: &str) -> Result<(), Error> {
    redis::cmd("DEL")
        .arg(keys.heartbeat(handler))
        .query_async::<()>(con)
        .await?;
    Ok(())
}

/// How often the generator prunes the instance registry of long-dead entries.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Counter samples kept in `{ns}:stats:history`: 16 one-second samples cover the 10 s rate
/// window of `app status` with room for a late tick.
pub const HISTORY_LEN: u64 = 16;

/// Registry entries not refreshed for this long are pruned when a process joins: long enough that
/// `status` shows a dead copy for a good while, short enough that the hash stays small.
pub const PRUNE_AFTER_MS: u64 = 3_600_000;

/// What this process says about itself in the instance registry.
#[derive(Debug, Clone)]
pub struct Presence {
    /// The instance id (the registry field).
    pub instance: String,
    /// The current role (generator under an epoch, or handler).
    pub role: watch::Receiver<Role>,
    /// Messages fetched and not yet committed.
    pub in_flight: Arc<AtomicU64>,
    /// Redis time when this process joined, µs.
    pub started_us: u64,
    /// The namespace is spread over shards: the history's counters are summed over them.
    pub sharded: bool,
}

impl Presence {
    /// The entry's JSON without its closing brace and without `seen_us`'s value (presence.lua
    /// appends Redis's time). Fields: `role`, `epoch` (0 while handling), `in_flight`,
    /// `started_us`, `handler` (the current handler id), `heartbeat_ms` (so `status` judges
    /// staleness by this process's own beat), `client_id` (its Redis connection: `status` shows
    /// the copy dead as soon as that connection is gone), then `seen_us`.
    fn body(&self, role: Role, handler: &str, heartbeat_ms: u64, client_id: u64) -> String {
        let (name, epoch) = match role {
            Role::Generator { epoch } => ("generator", epoch),
            Role::Handler => ("handler", 0),
        };
        format!(
            "{{\"role\":\"{name}\",\"epoch\":{epoch},\"in_flight\":{},\"started_us\":{},\"handler\":{},\"heartbeat_ms\":{heartbeat_ms},\"client_id\":{client_id},\"seen_us\":",
            self.in_flight.load(Ordering::Relaxed),
            self.started_us,
            serde_json::Value::from(handler),
        )
    }
}

/// Writes this process's registry entry (presence.lua). Returns the Redis time written, µs.
pub async fn announce(
    con: &mut Conn,
    keys: &Keys,
    presence: &Presence,
    handler: &str,
    heartbeat_ms: u64,
) -> Result<u64, Error> {
    let role = *presence.role.borrow();
    let client_id: u64 = redis::cmd("CLIENT").arg("ID").query_async(con).await?;
    let seen_us: u64 = scripts::PRESENCE
        .key(keys.instances())
        .key(keys.errors())
        .key(keys.stats())
        .arg(&presence.instance)
        .arg(presence.body(role, handler, heartbeat_ms, client_id))
        .invoke_async(con)
        .await?;
    Ok(seen_us)
}

/// Deletes `instance`'s registry entry (end of a clean stop: `status` then stops listing it).
pub async fn leave(con: &mut Conn, keys: &Keys, instance: &str) -> Result<(), Error> {
    redis::cmd("HDEL")
        .arg(keys.instances())
        .arg(instance)
        .query_async::<()>(con)
        .await?;
    Ok(())
}

/// Deletes registry entries older than `max_age_ms` (prune.lua). Returns how many.
pub async fn prune(con: &mut Conn, keys: &Keys, max_age_ms: u64) -> Result<u64, Error> {
    let deleted: u64 = scripts::PRUNE
        .key(keys.instances())
        .key(keys.errors())
        .key(keys.stats())
        .arg(max_age_ms)
        .invoke_async(con)
        .await?;
    Ok(deleted)
}

/// Pushes one counters sample to the history if `lease_value` still holds the lease
/// (sample.lua). Returns whether it did.
pub async fn sample(
    con: &mut Conn,
    keys: &Keys,
    lease_value: &str,
    sharded: bool,
) -> Result<bool, Error> {
    // Sharded: the counters live in the shards' slots, so they are summed here and passed in.
    let summed = if sharded {
        let c = crate::stats::Counters::read(con, keys).await?;
        format!(
            "{},{},{},{},{}",
            c.generated, c.processed, c.errors, c.duplicates, c.reclaimed
        )
    } else {
        String::new()
    };
    let pushed: i64 = scripts::SAMPLE
        .key(keys.lease())
        .key(keys.stats())
        .key(keys.stats_history())
        .key(keys.errors())
        .arg(lease_value)
        .arg(HISTORY_LEN)
        .arg(summed)
        .invoke_async(con)
        .await?;
    Ok(pushed == 1)
}

/// Runs reclaim.lua once. Returns (dead handlers, messages re-queued).
pub async fn reclaim(
    con: &mut Conn,
    keys: &Keys,
    incarnation: &Incarnation,
) -> Result<(u64, u64), Error> {
    reclaim_call(con, keys, incarnation, "").await
}

/// Gives every message `handler` holds back (reclaim.lua's hand-back): what its in-flight set
/// and batch records hold goes to the retry set (or, for a suspect, its suspect list) as it was,
/// and both are deleted. Called by a live handler whose copy became the generator, once it has
/// stopped handling and committed every outcome it had: the generator only generates, and a
/// SIGKILL of it leaves no handler work to be reclaimed after the heartbeat's TTL. Idempotent (a
/// repeat finds nothing left). Returns how many messages were given back.
pub async fn hand_back(
    con: &mut Conn,
    keys: &Keys,
    incarnation: &Incarnation,
    handler: &str,
) -> Result<u64, Error> {
    Ok(reclaim_call(con, keys, incarnation, handler).await?.1)
}

/// reclaim.lua, for every dead handler (`own` empty) or as `own`'s hand-back.
async fn reclaim_call(
    con: &mut Conn,
    keys: &Keys,
    incarnation: &Incarnation,
    own: &str,
) -> Result<(u64, u64), Error> {
    let mut call = scripts::RECLAIM.prepare_invoke();
    call.key(keys.handlers())
        .key(keys.retry())
        .key(keys.done())
        .key(keys.errors())
        .key(keys.stats());
    for level in crate::protocol::SUSPECT_LEVELS {
        call.key(keys.suspects(level));
    }
    call.key(keys.incarnation())
        .key(keys.writes())
        .key(keys.returned());
    call.arg(keys.prefix())
        .arg(MAX_RECLAIMS)
        .arg(incarnation.guard())
        .arg(own);
    let (dead, moved, poisoned): (u64, u64, u64) = incarnation.invoke(&call, con).await?;
    if poisoned > 0 {
        tracing::warn!(poisoned, "poison messages moved to the error store: every handler holding them died {MAX_RECLAIMS} times");
    }
    Ok((dead, moved))
}

/// Whose heartbeat this process keeps, and where it reports a lapse.
#[derive(Debug, Clone)]
pub struct Beat {
    /// The current handler id.
    pub owner: watch::Receiver<Arc<str>>,
    /// Set when a refresh finds the heartbeat expired (the fetcher then reconciles in full).
    pub lapsed: Arc<AtomicBool>,
    /// The namespace incarnation this process joined (reclaim is guarded by it).
    pub incarnation: Incarnation,
}

/// Heartbeats the current handler id and reclaims dead handlers' messages every
/// `heartbeat_ms / 5`, until `stop`; keeps the registry entry and, as generator, the counters
/// history fresh once a second. Fails with [`Error::Unreachable`] when Redis has not answered
/// for `redis_down_max_ms` (the process then exits; its messages are reclaimed by the others).
///
/// In a namespace spread over shards, each shard runs its own beat (`presence` `None`: its
/// handler's heartbeat and reclaim), and the control slot one with `beat` `None` (the registry
/// entry and the history, summed over the shards).
pub async fn run(
    mut con: Conn,
    keys: Keys,
    beat: Option<Beat>,
    presence: Option<Presence>,
    heartbeat_ms: u64,
    redis_down_max_ms: u64,
    stop: CancellationToken,
) -> Result<(), Error> {
    let every_s = Duration::from_secs(1);
    let mut tick = tokio::time::interval(Duration::from_millis((heartbeat_ms / 5).max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ok = Instant::now();
    // `None`: due now. The registry is also rewritten at once when the role changes.
    let mut announced: Option<(Instant, Role)> = None;
    let mut sampled: Option<Instant> = None;
    let mut pruned: Option<Instant> = None;
    let mut quiet_failures = 0u32;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let handler = beat.as_ref().map(|b| b.owner.borrow().clone());
        let swept = match (&beat, &handler) {
            (Some(beat), Some(handler)) => {
                match heartbeat(&mut con, &keys, handler, heartbeat_ms).await {
                    Ok(alive) => {
                        if !alive {
                            beat.lapsed.store(true, Ordering::Release);
                        }
                        reclaim(&mut con, &keys, &beat.incarnation).await
                    }
                    Err(e) => Err(e),
                }
            }
            _ => Ok((0, 0)),
        };
        let role = presence
            .as_ref()
            .map_or(Role::Handler, |p| *p.role.borrow());
        if let (Some(presence), true) = (&presence, swept.is_ok()) {
            crate::admin::metrics::in_flight(presence.in_flight.load(Ordering::Relaxed));
            let handler = handler
                .clone()
                .unwrap_or_else(|| Arc::from(format!("{}.0", presence.instance)));
            let due = announced.is_none_or(|(at, r)| r != role || at.elapsed() >= every_s);
            let mut result = Ok(());
            if due {
                result = announce(&mut con, &keys, presence, &handler, heartbeat_ms)
                    .await
                    .map(|_| announced = Some((Instant::now(), role)));
            }
            if let Role::Generator { epoch } = role {
                if result.is_ok() && sampled.is_none_or(|at| at.elapsed() >= every_s) {
                    let lease_value = format!("{epoch}:{}", presence.instance);
                    result = sample(&mut con, &keys, &lease_value, presence.sharded)
                        .await
                        .map(|_| sampled = Some(Instant::now()));
                }
                // The generator keeps the registry bounded while it runs, not only at joins.
                if result.is_ok() && pruned.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                    result = prune(&mut con, &keys, PRUNE_AFTER_MS)
                        .await
                        .map(|_| pruned = Some(Instant::now()));
                }
            }
            match result {
                Ok(()) => quiet_failures = 0,
                Err(e) => {
                    quiet_failures += 1;
                    if quiet_failures.is_power_of_two() {
                        tracing::warn!(error = %e, failures = quiet_failures, "status registry or history write failed; retrying");
                    }
                }
            }
        }
        match swept {
            Ok((dead, moved)) => {
                last_ok = Instant::now();
                if dead > 0 {
                    crate::admin::metrics::reclaimed(moved);
                    let epoch = match role {
                        Role::Generator { epoch } => Some(epoch),
                        Role::Handler => None,
                    };
                    tracing::info!(
                        dead,
                        moved,
                        ?epoch,
                        "reclaimed the in-flight messages of dead handlers"
                    );
                }
            }
            Err(e) if e.stops_the_copy() => return Err(e),
            // Out of memory past the bound: say so, not "unreachable".
            Err(e @ Error::OutOfMemory(_))
                if last_ok.elapsed() >= Duration::from_millis(redis_down_max_ms) =>
            {
                return Err(e);
            }
            Err(e) if last_ok.elapsed() >= Duration::from_millis(redis_down_max_ms) => {
                return Err(Error::Unreachable {
                    url: "(connected earlier)".into(),
                    attempts: 0,
                    waited_ms: last_ok.elapsed().as_millis() as u64,
                    last: e.to_string(),
                });
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat/reclaim failed; retrying"),
        }
    }
}
