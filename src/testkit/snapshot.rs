//! Reads the recorded state of a namespace for verification (`sim`, tests): what was recorded,
//! what is still queued or in flight, and who generated what. Read-only.

use crate::conn::Conn;
use crate::error::Error;
use crate::protocol::keys::Keys;
use crate::protocol::message::{queued_messages, record_open_count};
use crate::stats::Counters;
/// The recorded state of one namespace.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The success bitmap (`{ns}:ok`), MSB-first per byte like `SETBIT`.
    pub ok_bitmap: Vec<u8>,
    /// The epoch log (`{ns}:epochs`), `"epoch:first_id:count:time_us"` entries.
    pub epoch_log: Vec<String>,
    /// The counters.
    pub counters: Counters,
    /// Messages still waiting: fresh in the queue, reclaimed in the retry set and suspect lists.
    pub queue_len: u64,
    /// Messages in any handler's in-flight set or open in its batch records.
    pub in_flight: u64,
    /// Entries in the error store (not yet drained).
    pub error_store_len: u64,
    /// The next id the generator would hand out.
    pub next_id: u64,
    /// The current lease value, `"epoch:instance"`, if held.
    pub lease: Option<String>,
    /// Shards the namespace is spread over (1 = unsharded).
    pub shards: u32,
    /// Ids whose success bit is set in more than one shard (each id is generated into one shard,
    /// so any is a duplicate outcome the merged bitmap would hide).
    pub ok_in_two_shards: Vec<u64>,
}

/// Takes a snapshot. Not atomic across keys: call it when the group is idle or stopped. A
/// namespace spread over shards reads as one: the success bitmaps merged, the other counts
/// summed.
pub async fn snapshot(con: &mut Conn, keys: &Keys) -> Result<Snapshot, Error> {
    let lanes = crate::protocol::shards::lanes(con, keys).await?;
    if lanes.len() == 1 {
        return snapshot_one(con, keys).await;
    }
    let mut snap = snapshot_one(con, keys).await?; // control: epoch log, next id, lease
    snap.shards = lanes.len() as u32;
    snap.counters = Counters::read(con, keys).await?;
    for (mut con, keys) in lanes {
        let ok: Option<Vec<u8>> = redis::cmd("GET")
            .arg(keys.ok())
            .query_async(&mut con)
            .await?;
        let ok = ok.unwrap_or_default();
        if snap.ok_bitmap.len() < ok.len() {
            snap.ok_bitmap.resize(ok.len(), 0);
        }
        for (i, (merged, byte)) in snap.ok_bitmap.iter_mut().zip(&ok).enumerate() {
            let both = *merged & byte;
            for bit in 0..8 {
                if both & (0x80 >> bit) != 0 {
                    snap.ok_in_two_shards.push(i as u64 * 8 + bit);
                }
            }
            *merged |= byte;
        }
        let queued = crate::protocol::shards::queued(&mut con, &keys, u64::MAX / 2).await?;
        snap.queue_len += queued + reclaimed_waiting(&mut con, &keys).await?;
        snap.error_store_len += redis::cmd("LLEN")
            .arg(keys.errors())
            .query_async::<u64>(&mut con)
            .await?;
        snap.in_flight += in_flight_matching_one(&mut con, &keys, "*").await?;
    }
    Ok(snap)
}

/// Messages waiting in the retry set and the suspect lists.
async fn reclaimed_waiting(con: &mut Conn, keys: &Keys) -> Result<u64, Error> {
    let mut pipe = redis::pipe();
    pipe.cmd("SCARD").arg(keys.retry());
    for level in crate::protocol::SUSPECT_LEVELS {
        pipe.cmd("LLEN").arg(keys.suspects(level));
    }
    let waiting: Vec<u64> = pipe.query_async(con).await?;
    Ok(waiting.iter().sum::<u64>() + crate::protocol::shards::returned_waiting(con, keys).await?)
}

/// [`snapshot`] of an unsharded namespace, or of a sharded one's control slot.
async fn snapshot_one(con: &mut Conn, keys: &Keys) -> Result<Snapshot, Error> {
    let ok_bitmap: Option<Vec<u8>> = redis::cmd("GET").arg(keys.ok()).query_async(con).await?;
    let epoch_log: Vec<String> = redis::cmd("LRANGE")
        .arg(keys.epochs())
        .arg(0)
        .arg(-1)
        .query_async(con)
        .await?;
    let counters = Counters::read_one(con, keys).await?;
    let (entries, head): (u64, Option<Vec<u8>>) = redis::pipe()
        .cmd("LLEN")
        .arg(keys.queue())
        .cmd("LINDEX")
        .arg(keys.queue())
        .arg(0)
        .query_async(con)
        .await?;
    let reclaimed = reclaimed_waiting(con, keys).await?;
    let error_store_len: u64 = redis::cmd("LLEN")
        .arg(keys.errors())
        .query_async(con)
        .await?;
    let next_id: Option<u64> = redis::cmd("GET")
        .arg(keys.next_id())
        .query_async(con)
        .await?;
    let lease: Option<String> = redis::cmd("GET").arg(keys.lease()).query_async(con).await?;
    let queue_len = reclaimed + queued_messages(entries, head.as_deref(), next_id.unwrap_or(0));
    let in_flight = in_flight_matching_one(con, keys, "*").await?;
    Ok(Snapshot {
        ok_bitmap: ok_bitmap.unwrap_or_default(),
        epoch_log,
        counters,
        queue_len,
        in_flight,
        error_store_len,
        next_id: next_id.unwrap_or(0),
        lease,
        shards: 1,
        ok_in_two_shards: Vec::new(),
    })
}

/// The ids with an outcome in the namespace now: its ok bits and the ids of its error store and
/// drain list (every shard's). What a Redis that goes back to this state must keep.
pub async fn outcome_ids(con: &mut Conn, keys: &Keys) -> Result<Vec<u64>, Error> {
    let snap = snapshot(con, keys).await?;
    let mut ids: Vec<u64> = snap
        .ok_bitmap
        .iter()
        .enumerate()
        .flat_map(|(i, &byte)| {
            (0..8u64)
                .filter(move |j| byte & (0x80 >> j) != 0)
                .map(move |j| i as u64 * 8 + j)
        })
        .collect();
    for (mut con, keys) in crate::protocol::shards::lanes(con, keys).await? {
        for list in [keys.errors(), keys.errors_drain()] {
            let entries: Vec<Vec<u8>> = redis::cmd("LRANGE")
                .arg(&list)
                .arg(0)
                .arg(-1)
                .query_async(&mut con)
                .await?;
            ids.extend(entries.iter().filter_map(|raw| {
                let entry = crate::admin::errors::ErrorEntry::parse(raw);
                crate::protocol::message::Envelope::parse(&entry.payload)
                    .ok()
                    .map(|(e, _)| e.id)
            }));
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Messages in the in-flight sets and the open messages of the batch records of handler ids
/// matching `handler_glob` (e.g. `"<instance>.*"`), over every shard. Bounded SCANs.
pub async fn in_flight_matching(
    con: &mut Conn,
    keys: &Keys,
    handler_glob: &str,
) -> Result<u64, Error> {
    let mut total = 0;
    for (mut con, keys) in crate::protocol::shards::lanes(con, keys).await? {
        total += in_flight_matching_one(&mut con, &keys, handler_glob).await?;
    }
    Ok(total)
}

/// [`in_flight_matching`] in one shard.
async fn in_flight_matching_one(
    con: &mut Conn,
    keys: &Keys,
    handler_glob: &str,
) -> Result<u64, Error> {
    let mut total = 0;
    // Sets and hashes only: a key set aside as `<key>:quarantine:<time>` also matches.
    for key in scan(con, &keys.inflight(handler_glob), "set").await? {
        let n: u64 = redis::cmd("SCARD").arg(&key).query_async(con).await?;
        total += n;
    }
    for key in scan(con, &keys.batches(handler_glob), "hash").await? {
        let records: Vec<Vec<u8>> = redis::cmd("HVALS").arg(&key).query_async(con).await?;
        total += records.iter().map(|r| record_open_count(r)).sum::<u64>();
    }
    Ok(total)
}

/// The keys matching `pattern` of type `kind`, by a bounded SCAN.
async fn scan(con: &mut Conn, pattern: &str, kind: &str) -> Result<Vec<String>, Error> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    for _ in 0..100_000 {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg(kind)
            .query_async(con)
            .await?;
        keys.extend(found);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok(keys)
}
