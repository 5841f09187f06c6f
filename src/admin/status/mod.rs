//! `app status`: what the group is doing right now, read from Redis in one consistent snapshot.
//!
//! [`gather`] reads, [`render_text`] formats for people, and [`Status`] serializes for `--json`.
//! Status is read-only: it never deletes a stale registry entry or repairs anything, so running
//! it against a production namespace is always safe. Every time it shows is Redis's clock
//! (`TIME`, script timestamps), so no two machines' clocks are compared.
//!
//! Sources: the lease and its PTTL (the generator), `{ns}:instances` (every copy's self-report,
//! written by liveness.rs), the queue and error lists' lengths, the counters hash, and
//! `{ns}:stats:history` (one counters sample a second from the generator) for rates, the
//! incarnation key (a halted namespace), and `CLIENT LIST` for which copies' Redis connections
//! still exist.
//!
//! Telling the truth: only the lease holder is shown as the generator (a registry entry that
//! still says "generator" is from before its writer stepped down or died), and a copy whose
//! Redis connection is gone is shown `gone` at once (a SIGKILLed process's socket closes within
//! milliseconds) rather than live until its entry goes stale.

use crate::conn::Conn;
use crate::error::Error;
use crate::protocol::keys::Keys;
use crate::protocol::message::queued_messages;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

mod render;
pub use render::{render_text, show, ShowOptions};

/// The rate window `status` aims for; with fewer samples it uses the oldest it has.
pub const RATE_WINDOW_US: u64 = 10_000_000;

/// A registry entry is shown as dead when older than this many heartbeat intervals…
pub const STALE_HEARTBEATS: u64 = 3;
/// …or than this, whichever is longer (entries are rewritten once a second).
pub const STALE_MS_MIN: u64 = 5_000;

/// Everything `app status` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The namespace read.
    pub namespace: String,
    /// Redis's clock when the snapshot was taken, µs.
    pub redis_time_us: u64,
    /// True when no key of the namespace exists: nothing has ever run here.
    pub empty: bool,
    /// Why the namespace is halted, when a copy saw Redis lose data (README, "When Redis
    /// forgets"); `None` while it runs normally.
    pub halted: Option<String>,
    /// The next id the generator would hand out.
    pub next_id: u64,
    /// The stored generation limit (`--max-messages`), if any.
    pub max_messages: Option<u64>,
    /// Why nothing more is generated although a generator may hold the lease: a stored limit
    /// reached, or the id space used up. `None` while generation can go on.
    pub generation_stopped: Option<String>,
    /// Who holds the lease, if anyone.
    pub generator: Option<GeneratorStatus>,
    /// Every registry entry, live ones first.
    pub instances: Vec<InstanceStatus>,
    /// Messages waiting in the queue.
    pub queue_depth: u64,
    /// Messages given back, from dead handlers or by a copy that became the generator, and
    /// waiting to be handled again (retry set, suspect lists, returned batch records).
    pub reclaimed_waiting: u64,
    /// Entries in the error store (what the next `getErrors` takes).
    pub error_store: u64,
    /// Entries in the drain list: taken by a `getErrors` that is running or was killed.
    pub error_draining: u64,
    /// The group's counters (`{ns}:stats`).
    pub counters: Totals,
    /// Rates from the counters history; `None` until two samples exist.
    pub rates: Option<Rates>,
    /// Data that could not be read as expected (wrong key types, unreadable entries).
    pub warnings: Vec<String>,
    /// Redis's memory use against its limit (`INFO memory`), when it says.
    pub memory: Option<Memory>,
    /// Per shard, when the namespace is spread over shards (`--shards`); empty otherwise. The
    /// totals above are their sums.
    #[serde(default)]
    pub shards: Vec<ShardStatus>,
}

/// One shard of a namespace spread over shards: read one after another (not at one instant).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardStatus {
    /// The shard's index (its keys are `{<namespace>/<index>}:…`).
    pub shard: u32,
    /// Messages waiting in its queue.
    pub queue_depth: u64,
    /// Messages given back waiting in its retry set, suspect lists and returned batch records.
    pub reclaimed_waiting: u64,
    /// Entries in its error store.
    pub error_store: u64,
    /// Entries in its drain list.
    pub error_draining: u64,
    /// Its counters.
    pub counters: Totals,
}

/// Redis's memory, from `INFO memory`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// `used_memory`.
    pub used_bytes: u64,
    /// `maxmemory` (0 = no limit).
    pub max_bytes: u64,
    /// At 90 % of the limit or more: with `noeviction` writes are refused (or about to be: memory
    /// hovers at the limit as handlers free a little and fill it again).
    pub full: bool,
}

/// The current lease holder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratorStatus {
    /// Instance id from the lease value.
    pub instance: String,
    /// Fencing epoch from the lease value.
    pub epoch: u64,
    /// Lease TTL left (PTTL); the holder renews it every third of `--lease-ms`.
    pub lease_ms_left: u64,
}

/// One copy, as it last described itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Instance id.
    pub instance: String,
    /// False when the entry was not refreshed within the stale bound (killed, hung, or cut off),
    /// or when its Redis connection is gone.
    pub alive: bool,
    /// "live"; "gone" when its Redis connection no longer exists (killed, or reconnecting: a
    /// live copy rewrites its entry within a second); "dead" when its entry went stale.
    pub state: String,
    /// "generator" for the lease holder only, "handler" otherwise, or "unreadable" for an entry
    /// that did not parse.
    pub role: String,
    /// Epoch of the lease it holds; 0 while handling.
    pub epoch: u64,
    /// The Redis connection id it last reported (0 when unknown).
    pub client_id: u64,
    /// Messages it had fetched and not yet committed.
    pub in_flight: u64,
    /// Its handler id (`<instance>.0`): the suffix of its in-flight set and heartbeat keys.
    pub handler: String,
    /// Redis time of its last registry write, µs.
    pub seen_us: u64,
    /// Milliseconds from that write to this snapshot.
    pub seen_ms_ago: u64,
    /// Redis time when it joined, µs.
    pub started_us: u64,
    /// Its heartbeat TTL (the stale bound is a multiple of it).
    pub heartbeat_ms: u64,
}

/// The counters of `{ns}:stats` (one struct with `stats`, the field names in one place).
pub use crate::stats::Counters as Totals;

/// Per-second rates between two history samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Seconds between the two samples (about 10 once the generator has run that long).
    pub window_s: f64,
    /// Seconds since the newest sample: large when no generator has sampled lately.
    pub age_s: f64,
    /// Messages generated per second.
    pub generated_per_s: f64,
    /// Successful outcomes per second.
    pub processed_per_s: f64,
    /// Failed outcomes per second.
    pub errors_per_s: f64,
    /// Duplicates per second.
    pub duplicates_per_s: f64,
    /// Reclaimed messages per second.
    pub reclaimed_per_s: f64,
}

/// One entry of `{ns}:stats:history` (sample.lua's JSON).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Redis time of the sample, µs.
    pub time_us: u64,
    /// Counter values at that time.
    #[serde(default)]
    pub generated: u64,
    /// See [`Totals::processed`].
    #[serde(default)]
    pub processed: u64,
    /// See [`Totals::errors`].
    #[serde(default)]
    pub errors: u64,
    /// See [`Totals::duplicates`].
    #[serde(default)]
    pub duplicates: u64,
    /// See [`Totals::reclaimed`].
    #[serde(default)]
    pub reclaimed: u64,
}

/// The registry entry as presence.lua stores it.
#[derive(Debug, Deserialize)]
struct Entry {
    role: String,
    #[serde(default)]
    epoch: u64,
    #[serde(default)]
    in_flight: u64,
    #[serde(default)]
    started_us: u64,
    #[serde(default)]
    handler: String,
    #[serde(default)]
    heartbeat_ms: u64,
    #[serde(default)]
    client_id: u64,
    seen_us: u64,
}

/// Reads the status of `keys`' namespace in one MULTI, so every number comes from the same
/// instant. Fails only when Redis cannot be asked; data of the wrong shape becomes a warning.
pub async fn gather(con: &mut Conn, keys: &Keys) -> Result<Status, Error> {
    let mut warnings = Vec::new();
    let replies = match read(con, keys, true).await {
        Ok(replies) => replies,
        // Out of memory, Redis refuses every command queued in a MULTI, reads included: read
        // them one by one instead (status is most wanted exactly then).
        Err(e) if matches!(e.code(), Some("EXECABORT" | "OOM")) => {
            warnings.push(
                "Redis is out of memory: these numbers were read one by one, not at one instant"
                    .to_string(),
            );
            read(con, keys, false).await?
        }
        Err(e) => return Err(e.into()),
    };
    let memory = crate::inspect::info(con, "memory")
        .await
        .unwrap_or_default();
    let used = memory
        .get("used_memory")
        .and_then(|v| v.parse::<u64>().ok());
    let max = memory.get("maxmemory").and_then(|v| v.parse::<u64>().ok());
    let memory = match (used, max) {
        (Some(used_bytes), Some(max_bytes)) => Some(Memory {
            used_bytes,
            max_bytes,
            full: max_bytes > 0 && used_bytes * 10 >= max_bytes * 9,
        }),
        _ => None,
    };
    let mut status = interpret(keys, replies, warnings)?;
    status.memory = memory;
    status.reclaimed_waiting += crate::protocol::shards::returned_waiting(con, keys).await?;
    let lanes = crate::protocol::shards::lanes(con, keys).await?;
    if lanes.len() > 1 {
        for (index, (mut con, keys)) in lanes.into_iter().enumerate() {
            let shard = shard_status(&mut con, &keys, index as u32).await?;
            status.queue_depth += shard.queue_depth;
            status.reclaimed_waiting += shard.reclaimed_waiting;
            status.error_store += shard.error_store;
            status.error_draining += shard.error_draining;
            status.counters.add(&shard.counters);
            status.empty &= shard.counters == Totals::default() && shard.queue_depth == 0;
            status.shards.push(shard);
        }
    }
    let ids: Vec<u64> = status
        .instances
        .iter()
        .map(|i| i.client_id)
        .filter(|&id| id > 0)
        .collect();
    let connected = connected_clients(con, &ids).await;
    let holder = status.generator.as_ref().map(|g| g.instance.clone());
    for i in &mut status.instances {
        judge(i, holder.as_deref(), connected.as_ref());
    }
    status
        .instances
        .sort_by(|a, b| b.alive.cmp(&a.alive).then(a.instance.cmp(&b.instance)));
    Ok(status)
}

/// One shard's depths and counters.
async fn shard_status(con: &mut Conn, keys: &Keys, shard: u32) -> Result<ShardStatus, Error> {
    let mut pipe = redis::pipe();
    pipe.cmd("SCARD").arg(keys.retry());
    for level in crate::protocol::SUSPECT_LEVELS {
        pipe.cmd("LLEN").arg(keys.suspects(level));
    }
    let mut waiting: Vec<u64> = pipe.query_async(con).await?;
    waiting.push(crate::protocol::shards::returned_waiting(con, keys).await?);
    let (error_store, error_draining): (u64, u64) = redis::pipe()
        .cmd("LLEN")
        .arg(keys.errors())
        .cmd("LLEN")
        .arg(keys.errors_drain())
        .query_async(con)
        .await?;
    Ok(ShardStatus {
        shard,
        queue_depth: crate::protocol::shards::queued(con, keys, u32::MAX as u64).await?,
        reclaimed_waiting: waiting.iter().sum(),
        error_store,
        error_draining,
        counters: Totals::read_one(con, keys).await?,
    })
}

/// Sends the status reads, in one MULTI when `atomic`.
async fn read(
    con: &mut Conn,
    keys: &Keys,
    atomic: bool,
) -> redis::RedisResult<Vec<redis::RedisResult<redis::Value>>> {
    let mut pipe = redis::pipe();
    if atomic {
        pipe.atomic();
    }
    pipe.ignore_errors();
    pipe.cmd("TIME")
        .cmd("GET")
        .arg(keys.lease())
        .cmd("PTTL")
        .arg(keys.lease())
        .cmd("LLEN")
        .arg(keys.queue())
        .cmd("LINDEX")
        .arg(keys.queue())
        .arg(0)
        .cmd("SCARD")
        .arg(keys.retry());
    for level in crate::protocol::SUSPECT_LEVELS {
        pipe.cmd("LLEN").arg(keys.suspects(level));
    }
    pipe.cmd("LLEN")
        .arg(keys.errors())
        .cmd("LLEN")
        .arg(keys.errors_drain())
        .cmd("HGETALL")
        .arg(keys.stats())
        .cmd("HGETALL")
        .arg(keys.instances())
        .cmd("LRANGE")
        .arg(keys.stats_history())
        .arg(0)
        .arg(-1)
        .cmd("EXISTS")
        .arg(keys.lease())
        .arg(keys.epoch())
        .arg(keys.next_id())
        .arg(keys.queue())
        .arg(keys.stats())
        .arg(keys.errors())
        .arg(keys.errors_drain())
        .arg(keys.instances())
        .arg(keys.epochs())
        .cmd("GET")
        .arg(keys.incarnation())
        .cmd("GET")
        .arg(keys.next_id())
        .cmd("GET")
        .arg(keys.max());
    pipe.query_async(con).await
}

/// Turns the replies of [`read`] into a [`Status`].
fn interpret(
    keys: &Keys,
    replies: Vec<redis::RedisResult<redis::Value>>,
    mut warnings: Vec<String>,
) -> Result<Status, Error> {
    let mut replies = replies.into_iter();
    let mut next = |what: &str| -> Option<redis::Value> {
        match replies.next() {
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => {
                warnings.push(format!("{what}: {e}"));
                None
            }
            None => {
                warnings.push(format!("{what}: no reply"));
                None
            }
        }
    };
    let time: Option<(u64, u64)> = next("TIME").and_then(|v| redis::from_redis_value(v).ok());
    let lease: Option<String> = next(&keys.lease()).and_then(|v| redis::from_redis_value(v).ok());
    let pttl: Option<i64> = next(&keys.lease()).and_then(|v| redis::from_redis_value(v).ok());
    let queue_entries: u64 = next(&keys.queue())
        .and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or(0);
    let queue_head: Option<Vec<u8>> =
        next(&keys.queue()).and_then(|v| redis::from_redis_value(v).ok());
    let mut len = |key: String| -> u64 {
        next(&key)
            .and_then(|v| redis::from_redis_value(v).ok())
            .unwrap_or(0)
    };
    let mut reclaimed_waiting = len(keys.retry());
    for level in crate::protocol::SUSPECT_LEVELS {
        reclaimed_waiting += len(keys.suspects(level));
    }
    let error_store = len(keys.errors());
    let error_draining = len(keys.errors_drain());
    let stats: HashMap<String, String> = next(&keys.stats())
        .and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or_default();
    let registry: HashMap<String, String> = next(&keys.instances())
        .and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or_default();
    let history: Vec<String> = next(&keys.stats_history())
        .and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or_default();
    let existing: u64 = next("EXISTS")
        .and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or(0);
    let incarnation: Option<String> =
        next(&keys.incarnation()).and_then(|v| redis::from_redis_value(v).ok());
    let halted = incarnation.and_then(|v| {
        v.strip_prefix(crate::protocol::HALTED_PREFIX)
            .map(str::to_string)
    });
    let next_id: Option<String> =
        next(&keys.next_id()).and_then(|v| redis::from_redis_value(v).ok());
    let max: Option<String> = next(&keys.max()).and_then(|v| redis::from_redis_value(v).ok());
    let next_id: u64 = next_id.and_then(|v| v.parse().ok()).unwrap_or(0);
    let queue_depth = queued_messages(queue_entries, queue_head.as_deref(), next_id);
    let max_messages: Option<u64> = max.and_then(|v| v.parse().ok());
    let generation_stopped = stopped_by(next_id, max_messages);

    let redis_time_us = time.map(|(s, us)| s * 1_000_000 + us).unwrap_or(0);
    let generator = lease.and_then(|value| {
        let parsed = value
            .split_once(':')
            .and_then(|(e, i)| Some((e.parse::<u64>().ok()?, i.to_string())));
        match parsed {
            Some((epoch, instance)) => Some(GeneratorStatus {
                instance,
                epoch,
                lease_ms_left: pttl.unwrap_or(0).max(0) as u64,
            }),
            None => {
                warnings.push(format!(
                    "{}: unreadable lease value {value:?}",
                    keys.lease()
                ));
                None
            }
        }
    });
    if pttl == Some(-1) {
        warnings.push(format!("{}: the lease has no TTL", keys.lease()));
    }
    let counters = totals(&stats, &mut warnings);
    let instances: Vec<InstanceStatus> = registry
        .iter()
        .map(|(id, raw)| instance(id, raw, redis_time_us))
        .collect();
    let samples: Vec<Sample> = history
        .iter()
        .filter_map(|raw| match serde_json::from_str(raw) {
            Ok(s) => Some(s),
            Err(_) => {
                warnings.push(format!(
                    "{}: unreadable sample {raw:?}",
                    keys.stats_history()
                ));
                None
            }
        })
        .collect();
    Ok(Status {
        namespace: namespace(keys),
        redis_time_us,
        empty: existing == 0,
        halted,
        next_id,
        max_messages,
        generation_stopped,
        generator,
        instances,
        queue_depth,
        reclaimed_waiting,
        error_store,
        error_draining,
        counters,
        rates: rates(&samples, redis_time_us),
        warnings,
        memory: None,
        shards: Vec::new(),
    })
}

/// Why generation has stopped for good, if it has.
pub fn stopped_by(next_id: u64, max_messages: Option<u64>) -> Option<String> {
    if next_id > crate::protocol::message::ID_MAX {
        return Some(
            "the id space is used up (every id 0..2^32 was generated): use a fresh namespace"
                .into(),
        );
    }
    match max_messages {
        Some(max) if next_id >= max => Some(format!(
            "the stored limit --max-messages {max} is reached (ids 0..{max} generated); `app --max-messages none` lifts it, a higher --max-messages raises it"
        )),
        _ => None,
    }
}

/// `{ns}:` without its braces and colon.
fn namespace(keys: &Keys) -> String {
    let p = keys.prefix();
    p.strip_prefix('{')
        .and_then(|p| p.strip_suffix("}:"))
        .unwrap_or(p)
        .to_string()
}

fn totals(stats: &HashMap<String, String>, warnings: &mut Vec<String>) -> Totals {
    let mut get = |name: &str| match stats.get(name).map(|v| v.parse::<u64>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            warnings.push(format!("counter {name} is not a non-negative integer"));
            0
        }
    };
    Totals::from_fields(&mut get)
}

/// Which of `ids` are connected now (`CLIENT LIST ID …`); `None` when Redis will not say (an
/// ACL user without `client|list`), and then no entry is judged by its connection.
async fn connected_clients(con: &mut Conn, ids: &[u64]) -> Option<std::collections::HashSet<u64>> {
    if ids.is_empty() {
        return Some(Default::default());
    }
    let listing: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("ID")
        .arg(ids)
        .query_async(con)
        .await
        .ok()?;
    Some(
        listing
            .lines()
            .filter_map(|l| l.strip_prefix("id=")?.split(' ').next()?.parse().ok())
            .collect(),
    )
}

/// Settles an entry's state and role against what Redis knows now: only the lease `holder` is
/// the generator; an entry whose connection is not among `connected` is gone.
pub fn judge(
    i: &mut InstanceStatus,
    holder: Option<&str>,
    connected: Option<&std::collections::HashSet<u64>>,
) {
    if i.role == "unreadable" {
        return;
    }
    let is_holder = holder == Some(i.instance.as_str());
    if !is_holder {
        i.role = "handler".into();
        i.epoch = 0;
    } else {
        i.role = "generator".into();
    }
    if i.alive && i.client_id > 0 && connected.is_some_and(|c| !c.contains(&i.client_id)) {
        i.alive = false;
        i.state = "gone".into();
    }
}

/// One registry entry judged against `now_us`: dead when older than
/// max([`STALE_MS_MIN`], [`STALE_HEARTBEATS`] × its heartbeat).
pub fn instance(id: &str, raw: &str, now_us: u64) -> InstanceStatus {
    match serde_json::from_str::<Entry>(raw) {
        Ok(e) => {
            let heartbeat_ms = if e.heartbeat_ms == 0 {
                1000
            } else {
                e.heartbeat_ms
            };
            let stale_ms = (STALE_HEARTBEATS * heartbeat_ms).max(STALE_MS_MIN);
            let seen_ms_ago = now_us.saturating_sub(e.seen_us) / 1000;
            let alive = seen_ms_ago <= stale_ms;
            InstanceStatus {
                instance: id.to_string(),
                alive,
                state: if alive { "live" } else { "dead" }.into(),
                role: e.role,
                epoch: e.epoch,
                client_id: e.client_id,
                in_flight: e.in_flight,
                handler: e.handler,
                seen_us: e.seen_us,
                seen_ms_ago,
                started_us: e.started_us,
                heartbeat_ms,
            }
        }
        Err(_) => InstanceStatus {
            instance: id.to_string(),
            alive: false,
            state: "dead".into(),
            role: "unreadable".into(),
            epoch: 0,
            client_id: 0,
            in_flight: 0,
            handler: String::new(),
            seen_us: 0,
            seen_ms_ago: 0,
            started_us: 0,
            heartbeat_ms: 0,
        },
    }
}

/// Rates between the newest sample and the one about [`RATE_WINDOW_US`] older (or the oldest
/// there is). `samples` are newest first, as LPUSH leaves them. `None` with fewer than two
/// usable samples.
pub fn rates(samples: &[Sample], now_us: u64) -> Option<Rates> {
    let newest = samples.first()?;
    // Half a second of slack: samples are a second apart, give or take a tick.
    let wanted_us = RATE_WINDOW_US - 500_000;
    let older = samples
        .iter()
        .find(|s| newest.time_us.saturating_sub(s.time_us) >= wanted_us)
        .or(samples.last())?;
    if older.time_us >= newest.time_us {
        return None;
    }
    let window_s = (newest.time_us - older.time_us) as f64 / 1e6;
    let per_s = |new: u64, old: u64| new.saturating_sub(old) as f64 / window_s;
    Some(Rates {
        window_s,
        age_s: now_us.saturating_sub(newest.time_us) as f64 / 1e6,
        generated_per_s: per_s(newest.generated, older.generated),
        processed_per_s: per_s(newest.processed, older.processed),
        errors_per_s: per_s(newest.errors, older.errors),
        duplicates_per_s: per_s(newest.duplicates, older.duplicates),
        reclaimed_per_s: per_s(newest.reclaimed, older.reclaimed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(time_s: u64, generated: u64) -> Sample {
        Sample {
            time_us: time_s * 1_000_000,
            generated,
            processed: generated / 2,
            ..Sample::default()
        }
    }

    #[test]
    fn rates_use_the_sample_about_ten_seconds_back() {
        // Newest first, one a second: 20 s .. 5 s.
        let samples: Vec<Sample> = (5..=20).rev().map(|t| sample(t, t * 100)).collect();
        let r = rates(&samples, 21_000_000).unwrap();
        assert_eq!(r.window_s, 10.0);
        assert_eq!(r.generated_per_s, 100.0);
        assert_eq!(r.processed_per_s, 50.0);
        assert_eq!(r.age_s, 1.0);
        // Only 3 s of history: use the oldest.
        let short = rates(&samples[..4], 21_000_000).unwrap();
        assert_eq!(short.window_s, 3.0);
        assert!(rates(&samples[..1], 21_000_000).is_none());
        assert!(rates(&[], 0).is_none());
        // A counter going backwards (namespace reset) gives 0, not a wrap.
        let reset = [sample(10, 0), sample(5, 500)];
        assert_eq!(rates(&reset, 10_000_000).unwrap().generated_per_s, 0.0);
    }

    #[test]
    fn entries_go_stale_after_three_heartbeats_or_five_seconds() {
        let raw = |seen_us: u64, hb: u64| {
            format!(
                r#"{{"role":"handler","epoch":0,"in_flight":7,"started_us":1,"handler":"a.0","heartbeat_ms":{hb},"seen_us":{seen_us}}}"#
            )
        };
        let now = 100_000_000;
        assert!(instance("a", &raw(now - 4_900_000, 1000), now).alive);
        assert!(!instance("a", &raw(now - 5_100_000, 1000), now).alive);
        assert!(instance("a", &raw(now - 8_000_000, 3000), now).alive);
        assert!(!instance("a", &raw(now - 9_100_000, 3000), now).alive);
        let i = instance("a", &raw(now - 1000, 1000), now);
        assert_eq!(
            (i.in_flight, i.handler.as_str(), i.seen_ms_ago),
            (7, "a.0", 1)
        );
        let bad = instance("x", "not json", now);
        assert_eq!((bad.role.as_str(), bad.alive), ("unreadable", false));
    }

    #[test]
    fn only_the_lease_holder_is_the_generator_and_a_lost_connection_is_gone() {
        let entry = |id: &str, role: &str, client: u64| {
            instance(
                id,
                &format!(
                    r#"{{"role":"{role}","epoch":4,"in_flight":0,"started_us":1,"handler":"{id}.0","heartbeat_ms":1000,"client_id":{client},"seen_us":999000}}"#
                ),
                1_000_000,
            )
        };
        let connected: std::collections::HashSet<u64> = [7].into();
        let mut old = entry("old", "generator", 5);
        judge(&mut old, Some("new"), Some(&connected));
        assert_eq!((old.role.as_str(), old.epoch), ("handler", 0));
        assert_eq!((old.state.as_str(), old.alive), ("gone", false));
        let mut new = entry("new", "handler", 7);
        judge(&mut new, Some("new"), Some(&connected));
        assert_eq!(
            (new.role.as_str(), new.state.as_str()),
            ("generator", "live")
        );
        let mut unknown = entry("x", "handler", 9);
        judge(&mut unknown, None, None);
        assert_eq!(
            unknown.state, "live",
            "no CLIENT LIST: judged by staleness only"
        );
    }
}
