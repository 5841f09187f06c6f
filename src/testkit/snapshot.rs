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
}

/// Takes a snapshot. Not atomic across keys: call it when the group is idle or stopped.
pub async fn snapshot(con: &mut Conn, keys: &Keys) -> Result<Snapshot, Error> {
    let ok_bitmap: Option<Vec<u8>> = redis::cmd("GET").arg(keys.ok()).query_async(con).await?;
    let epoch_log: Vec<String> = redis::cmd("LRANGE")
        .arg(keys.epochs())
        .arg(0)
        .arg(-1)
        .query_async(con)
        .await?;
    let counters = Counters::read(con, keys).await?;
    let (entries, head): (u64, Option<Vec<u8>>) = redis::pipe()
        .cmd("LLEN")
        .arg(keys.queue())
        .cmd("LINDEX")
        .arg(keys.queue())
        .arg(0)
        .query_async(con)
        .await?;
    let mut pipe = redis::pipe();
    pipe.cmd("SCARD").arg(keys.retry());
    for level in crate::protocol::SUSPECT_LEVELS {
        pipe.cmd("LLEN").arg(keys.suspects(level));
    }
    let waiting: Vec<u64> = pipe.query_async(con).await?;
    let reclaimed: u64 = waiting.iter().sum();
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
    let in_flight = in_flight_matching(con, keys, "*").await?;
    Ok(Snapshot {
        ok_bitmap: ok_bitmap.unwrap_or_default(),
        epoch_log,
        counters,
        queue_len,
        in_flight,
        error_store_len,
        next_id: next_id.unwrap_or(0),
        lease,
    })
}

/// Messages in the in-flight sets and the open messages of the batch records of handler ids
/// matching `handler_glob` (e.g. `"<instance>.*"`). Bounded SCANs.
pub async fn in_flight_matching(
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
