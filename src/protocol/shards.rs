//! How a namespace is spread over shards (docs/PROTOCOL.md, "Sharding"): the shard count stored
//! in the control slot, the connection of each shard, and a shard's queue depth.
//!
//! A namespace has the shard count its first copy was started with (`--shards S`, default 1),
//! stored once (`{ns}:shards`); every later copy, `getErrors` and `status` follow it, so a copy
//! started with another count is refused instead of leaving a shard unserved.

use crate::conn::Conn;
use crate::error::Error;
use crate::protocol::keys::Keys;

/// The most shards a namespace may be spread over.
pub const SHARDS_MAX: u32 = 64;

/// The shard count stored for the namespace: 1 when none is (unsharded, or not yet joined).
pub async fn stored(con: &mut Conn, keys: &Keys) -> Result<u32, Error> {
    let raw: Option<String> = redis::cmd("GET")
        .arg(keys.shard_count())
        .query_async(con)
        .await?;
    raw.map_or(Ok(1), |v| parse_count(keys, &v))
}

/// A stored shard count, checked.
fn parse_count(keys: &Keys, v: &str) -> Result<u32, Error> {
    match v.parse::<u32>() {
        Ok(n) if (1..=SHARDS_MAX).contains(&n) => Ok(n),
        _ => Err(Error::Corrupt(format!(
            "{} holds {v:?}, not a shard count 1-{SHARDS_MAX}",
            keys.shard_count()
        ))),
    }
}

/// Makes the namespace's shard count `wanted`, or refuses: the count is stored once, by the
/// first copy to join (settle_shards.lua, one atomic step, unsharded copies included), and a
/// namespace used before any count was stored (it has a `next_id`) is unsharded, since its queue
/// and records are where no sharded copy looks.
pub async fn settle(con: &mut Conn, keys: &Keys, wanted: u32) -> Result<(), Error> {
    if wanted == 0 || wanted > SHARDS_MAX {
        return Err(Error::Config(format!(
            "--shards {wanted} must be between 1 and {SHARDS_MAX}"
        )));
    }
    let have: String = crate::protocol::scripts::SETTLE_SHARDS
        .key(keys.shard_count())
        .key(keys.next_id())
        .arg(wanted)
        .invoke_async(con)
        .await?;
    let have = parse_count(keys, &have)?;
    if have == wanted {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "namespace {:?} is spread over {have} shard(s) and this copy was started with --shards {wanted}; \
             start every copy with --shards {have}, or use a fresh --namespace",
            keys.namespace()
        )))
    }
}

/// A connection for shard `keys` (on a cluster, pinned to its slot's master; on one Redis, the
/// same connection).
pub fn conn_for(con: &Conn, keys: &Keys) -> Conn {
    con.clone().pinned(keys)
}

/// Each shard's keys and connection, in shard order; the namespace's own when unsharded.
pub async fn lanes(con: &mut Conn, keys: &Keys) -> Result<Vec<(Conn, Keys)>, Error> {
    let count = stored(con, keys).await?;
    Ok(keys
        .shards(count)
        .into_iter()
        .map(|k| (conn_for(con, &k), k))
        .collect())
}

/// Messages waiting in the batch records handlers gave back (`{ns}:returned`, reclaim.lua's
/// hand-back), by their open messages.
pub async fn returned_waiting(con: &mut Conn, keys: &Keys) -> Result<u64, Error> {
    let records: Vec<Vec<u8>> = redis::cmd("HVALS")
        .arg(keys.returned())
        .query_async(con)
        .await?;
    Ok(records
        .iter()
        .map(|r| crate::protocol::message::record_open_count(r))
        .sum())
}

/// Messages in a shard's queue, counting at most `cap` entries (a batch entry counts its
/// messages, anything else one): ids in a shard's queue are not contiguous, so the depth is the
/// sum of its entries, and `cap` bounds the read (an entry holds at least one message).
pub async fn queued(con: &mut Conn, keys: &Keys, cap: u64) -> Result<u64, Error> {
    let entries: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(keys.queue())
        .arg(0)
        .arg(cap.max(1) as i64 - 1)
        .query_async(con)
        .await?;
    Ok(entries
        .iter()
        .map(|e| {
            e.strip_prefix(b"*")
                .and_then(|b| crate::protocol::message::BatchEntry::parse(b).ok())
                .map_or(1, |b| b.count)
        })
        .sum())
}
