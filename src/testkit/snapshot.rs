//! Reads the recorded state of a namespace for verification (`sim`, tests): what was recorded,
//! what is still queued or in flight, and who generated what. Read-only.

use crate::conn::Conn;
use crate::error::Error;
use crate::protocol::keys::Keys;
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
    /// Messages in any handler's in-flight set.
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
    let mut pipe = redis::pipe();
    pipe.cmd("LLEN")
        .arg(keys.queue())
        .cmd("SCARD")
        .arg(keys.retry());
    for level in crate::protocol::SUSPECT_LEVELS {
        pipe.cmd("LLEN").arg(keys.suspects(level));
    }
    let waiting: Vec<u64> = pipe.query_async(con).await?;
    let queue_len = waiting.iter().sum();
    let error_store_len: u64 = redis::cmd("LLEN")
        .arg(keys.errors())
        .query_async(con)
        .await?;
    let next_id: Option<u64> = redis::cmd("GET")
        .arg(keys.next_id())
        .query_async(con)
        .await?;
    let lease: Option<String> = redis::cmd("GET").arg(keys.lease()).query_async(con).await?;
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

/// Messages in the in-flight sets of handler ids matching `handler_glob` (e.g. `"<instance>.*"`).
/// Bounded SCAN.
pub async fn in_flight_matching(
    con: &mut Conn,
    keys: &Keys,
    handler_glob: &str,
) -> Result<u64, Error> {
    let pattern = keys.inflight(handler_glob);
    let mut cursor: u64 = 0;
    let mut total = 0;
    for _ in 0..100_000 {
        // Sets only: a key set aside as `<set>:quarantine:<time>` also matches the pattern.
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg("set")
            .query_async(con)
            .await?;
        for key in found {
            let n: u64 = redis::cmd("SCARD").arg(&key).query_async(con).await?;
            total += n;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok(total)
}
