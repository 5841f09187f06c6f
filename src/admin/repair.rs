//! `app repair`: recomputes the counters that must never be reset (the next id, the epoch) from
//! what Redis still holds, and lifts a halt that their damage caused.
//!
//! A damaged counter halts the group (docs/PROTOCOL.md, invariant 8) because every guess is
//! dangerous: a next id too low repeats ids, an epoch too low reuses a fencing token. What Redis
//! still holds bounds both from below, exactly: every generated id is in the epoch log (ranges
//! `first..first+count`), and also queued, in flight, or recorded (the outcome bitmap, the error
//! store); every epoch that ever held the lease is in the epoch log or the lease. The repair takes
//! the highest of all, never lowers a counter that is still readable, keeps the damaged value
//! beside it (`<key>:quarantine:<time_us>`), and lifts only a halt that damage caused: a halt
//! because Redis *lost* data needs `--accept-data-loss` (nothing can recompute what is gone).

use crate::conn::Conn;
use crate::error::Error;
use crate::protocol::keys::Keys;
use crate::protocol::message::{parse_batch_record, BatchEntry, Envelope};
use crate::protocol::HALTED_PREFIX;

/// What `repair` found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repaired {
    /// `next_id` as found, and as set.
    pub next_id_before: Counter,
    /// `next_id` as set.
    pub next_id_after: u64,
    /// The epoch counter as found, and as set.
    pub epoch_before: Counter,
    /// The epoch counter as set.
    pub epoch_after: u64,
    /// The halt that was lifted, if any.
    pub lifted_halt: Option<String>,
    /// A halt left in place (Redis lost data), if any.
    pub kept_halt: Option<String>,
}

/// A counter as `repair` found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Counter {
    /// No such key.
    #[default]
    Absent,
    /// A non-negative integer.
    Value(u64),
    /// Anything else: what it was.
    Damaged(String),
}

impl std::fmt::Display for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Counter::Absent => write!(f, "absent"),
            Counter::Value(v) => write!(f, "{v}"),
            Counter::Damaged(what) => write!(f, "damaged ({what})"),
        }
    }
}

/// The marker text of a halt caused by damage (see `Error::Damaged`'s message), as opposed to
/// one caused by Redis losing data.
const DAMAGE_MARK: &str = "damaged data";

/// Reads a counter whatever the key holds.
async fn counter(con: &mut Conn, key: &str) -> Result<Counter, Error> {
    let kind: String = redis::cmd("TYPE").arg(key).query_async(con).await?;
    Ok(match kind.as_str() {
        "none" => Counter::Absent,
        "string" => {
            let v: String = redis::cmd("GET").arg(key).query_async(con).await?;
            match v.parse() {
                Ok(n) => Counter::Value(n),
                Err(_) => Counter::Damaged(format!("{:?}", v.chars().take(40).collect::<String>())),
            }
        }
        other => Counter::Damaged(format!("a {other}")),
    })
}

/// Recomputes `next_id` and the epoch counter, and lifts a damage halt.
pub async fn repair(con: &mut Conn, keys: &Keys) -> Result<Repaired, Error> {
    let mut r = Repaired {
        next_id_before: counter(con, &keys.next_id()).await?,
        epoch_before: counter(con, &keys.epoch()).await?,
        ..Repaired::default()
    };
    let lease = string(con, &keys.lease()).await;
    let incarnation = string(con, &keys.incarnation()).await;
    let (mut next_id, mut epoch) = (0u64, 0u64);
    for entry in list(con, &keys.epochs()).await {
        if let Ok(b) =
            crate::protocol::epoch_log::parse_epoch_batch(&String::from_utf8_lossy(&entry))
        {
            next_id = next_id.max(b.first_id + b.count);
            epoch = epoch.max(b.epoch);
        }
    }
    if let Some(e) = lease.as_deref().and_then(|v| v.split_once(':')) {
        epoch = epoch.max(e.0.parse().unwrap_or(0));
    }
    // Every id still queued, given back, in flight or in the error store was generated.
    let mut payloads = list(con, &keys.queue()).await;
    payloads.extend(list(con, &keys.errors()).await);
    payloads.extend(list(con, &keys.errors_drain()).await);
    for level in crate::protocol::SUSPECT_LEVELS {
        payloads.extend(list(con, &keys.suspects(level)).await);
    }
    payloads.extend(members(con, &keys.retry()).await);
    let mut batches = fields(con, &keys.returned()).await;
    for handler in members(con, &keys.handlers()).await {
        let h = String::from_utf8_lossy(&handler).into_owned();
        payloads.extend(members(con, &keys.inflight(&h)).await);
        batches.extend(fields(con, &keys.batches(&h)).await);
    }
    // Batch entries ("*<first>:<count>:…") of the queue, and batch records (field = first id).
    for p in &payloads {
        if let Some(Ok(b)) = p.strip_prefix(b"*").map(BatchEntry::parse) {
            next_id = next_id.max(b.first_id + b.count);
        }
    }
    for (field, value) in &batches {
        let first = String::from_utf8_lossy(field).parse::<u64>();
        if let Ok(Ok((b, _))) = first.map(|f| parse_batch_record(f, value)) {
            next_id = next_id.max(b.first_id + b.count);
        }
    }
    for p in &payloads {
        // An error entry is "<payload>\t<reason>\t<time>": the envelope's fields come before
        // the first tab (data may hold more tabs; only the id matters here).
        let head = p.split(|&b| b == b'\t').next().unwrap_or_default();
        if let Ok((m, _)) = Envelope::parse(head) {
            next_id = next_id.max(m.id + 1);
        }
    }
    // The highest id with a recorded outcome.
    if let Some(bits) = string_bytes(con, &keys.done()).await {
        if let Some((i, byte)) = bits.iter().enumerate().rev().find(|(_, b)| **b != 0) {
            let last = i as u64 * 8 + 7 - u64::from(byte.trailing_zeros());
            next_id = next_id.max(last + 1);
        }
    }
    let value = |c: &Counter| match c {
        Counter::Value(v) => *v,
        _ => 0,
    };
    r.next_id_after = next_id.max(value(&r.next_id_before));
    r.epoch_after = epoch.max(value(&r.epoch_before));

    let now: (u64, u64) = redis::cmd("TIME").query_async(con).await?;
    let stamp = now.0 * 1_000_000 + now.1;
    let mut pipe = redis::pipe();
    pipe.atomic();
    for (key, before, after) in [
        (keys.next_id(), &r.next_id_before, r.next_id_after),
        (keys.epoch(), &r.epoch_before, r.epoch_after),
    ] {
        if matches!(before, Counter::Damaged(_)) {
            // Kept beside it, for the record.
            pipe.cmd("RENAME")
                .arg(&key)
                .arg(format!("{key}:quarantine:{stamp}"))
                .ignore();
        }
        if *before != Counter::Value(after) && (after > 0 || *before != Counter::Absent) {
            pipe.cmd("SET").arg(&key).arg(after).ignore();
        }
    }
    match incarnation
        .as_deref()
        .and_then(|v| v.strip_prefix(HALTED_PREFIX))
    {
        Some(why) if why.contains(DAMAGE_MARK) => {
            pipe.cmd("SET")
                .arg(keys.incarnation())
                .arg(format!("{:016x}", rand::random::<u64>()))
                .ignore();
            r.lifted_halt = Some(why.to_string());
        }
        Some(why) => r.kept_halt = Some(why.to_string()),
        None => {}
    }
    pipe.query_async::<()>(con).await?;
    Ok(r)
}

/// A string key's value, or `None` when absent or not a string.
async fn string(con: &mut Conn, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(con)
        .await
        .ok()
        .flatten()
}

/// A string key's bytes, or `None` when absent or not a string.
async fn string_bytes(con: &mut Conn, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET")
        .arg(key)
        .query_async(con)
        .await
        .ok()
        .flatten()
}

/// A list's items, or none when the key is absent or not a list.
async fn list(con: &mut Conn, key: &str) -> Vec<Vec<u8>> {
    redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(con)
        .await
        .unwrap_or_default()
}

/// A set's members, or none when the key is absent or not a set.
async fn members(con: &mut Conn, key: &str) -> Vec<Vec<u8>> {
    redis::cmd("SMEMBERS")
        .arg(key)
        .query_async(con)
        .await
        .unwrap_or_default()
}

/// The (field, value) pairs of the hash `key`; none if it is not one.
async fn fields(con: &mut Conn, key: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    redis::cmd("HGETALL")
        .arg(key)
        .query_async(con)
        .await
        .unwrap_or_default()
}
