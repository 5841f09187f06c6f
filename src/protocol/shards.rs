//! How a namespace is spread over shards (docs/PROTOCOL.md, "Sharding"): the shard count stored
//! in the control slot, the connection of each shard, and a shard's queue depth.
//!
//! A namespace has one shard unless its first copy was started with `--shards S`; the count is
//! then stored once (`{ns}:shards`) and every later copy, `getErrors` and `status` follow it, so a
//! copy started with another count is refused instead of leaving a shard unserved.

use crate::conn::Conn;
use crate::error::Error;
use crate::protocol::keys::Keys;

/// The most shards a namespace may be spread over.
pub const SHARDS_MAX: u32 = 64;

/// The shard count stored for the namespace: 1 when none is (unsharded).
pub async fn stored(con: &mut Conn, keys: &Keys) -> Result<u32, Error> {
    let raw: Option<String> = redis::cmd("GET")
        .arg(keys.shard_count())
        .query_async(con)
        .await?;
    match raw {
        None => Ok(1),
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (1..=SHARDS_MAX).contains(&n) => Ok(n),
            _ => Err(Error::Corrupt(format!(
                "{} holds {v:?}, not a shard count 1-{SHARDS_MAX}",
                keys.shard_count()
            ))),
        },
    }
}

/// Makes the namespace's shard count `wanted`, or refuses: the count is set once, by the first
/// copy, and a namespace used unsharded (it has a `next_id`) cannot become sharded, since its
/// queue and records would be left where no sharded copy looks.
pub async fn settle(con: &mut Conn, keys: &Keys, wanted: u32) -> Result<(), Error> {
    if wanted == 0 || wanted > SHARDS_MAX {
        return Err(Error::Config(format!(
            "--shards {wanted} must be between 1 and {SHARDS_MAX}"
        )));
    }
    let refuse = |have: u32| {
        Err(Error::Config(format!(
            "namespace {:?} is spread over {have} shard(s) and this copy was started with --shards {wanted}; \
             start every copy with --shards {have}, or use a fresh --namespace",
            keys.namespace()
        )))
    };
    let set: bool = redis::cmd("EXISTS")
        .arg(keys.shard_count())
        .query_async(con)
        .await?;
    if set {
        let have = stored(con, keys).await?; // set once, never changed: this read is its value
        return if have == wanted { Ok(()) } else { refuse(have) };
    }
    if wanted == 1 {
        return Ok(()); // unsharded: nothing stored, the layout of every earlier version
    }
    let used: bool = redis::cmd("EXISTS")
        .arg(keys.next_id())
        .query_async(con)
        .await?;
    if used {
        return refuse(1);
    }
    let created: Option<String> = redis::cmd("SET")
        .arg(keys.shard_count())
        .arg(wanted)
        .arg("NX")
        .query_async(con)
        .await?;
    if created.is_none() {
        let now = stored(con, keys).await?;
        if now != wanted {
            return refuse(now);
        }
    }
    Ok(())
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
