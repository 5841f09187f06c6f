//! The leader lease: who may generate, under which fencing epoch.
//!
//! `SET NX PX` with a unique value, renewed by compare-and-pexpire, released by compare-and-delete.
//! Every acquisition INCRs the epoch, and generate.lua refuses any epoch that does not hold the
//! lease right now, so an old leader that was paused past its TTL can never generate again.
//! All timing is Redis's (PX TTLs); no two machines' clocks are ever compared.

use crate::conn::Conn;
use crate::error::Error;
use crate::node::incarnation::Incarnation;
use crate::protocol::keys::Keys;
use crate::protocol::scripts;

/// A lease this process holds (or held: Redis is the judge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The fencing token: strictly greater than every earlier holder's.
    pub epoch: u64,
    /// The lease key's value, `"<epoch>:<instance>"`: what renew and release compare against.
    pub value: String,
}

/// Takes the lease if it is free, or if its holder's Redis connection is gone. `Ok(None)` when a
/// live holder has it.
///
/// A SIGKILLed process's socket is closed by the kernel at once, so Redis drops the holder's
/// connection within milliseconds; waiting for the TTL would waste up to `lease_ms`. Taking over
/// early is safe even when the holder is alive but disconnected: the old value is deleted only if
/// unchanged (compare-and-delete), the new holder gets a higher epoch, and the old one is fenced.
/// A paused holder keeps its connection, so the TTL remains the detector for silent deaths.
///
/// Every call also checks, and raises, `incarnation`'s high-water marks: a Redis that went back
/// in time fails it with [`Error::RedisForgot`].
pub async fn try_acquire(
    con: &mut Conn,
    keys: &Keys,
    instance: &str,
    lease_ms: u64,
    incarnation: &Incarnation,
) -> Result<Option<Lease>, Error> {
    for _ in 0..2 {
        let client_id: u64 = redis::cmd("CLIENT").arg("ID").query_async(con).await?;
        let mut call = scripts::ACQUIRE.prepare_invoke();
        call.key(keys.lease())
            .key(keys.epoch())
            .key(keys.lease_conn())
            .key(keys.incarnation())
            .key(keys.next_id())
            .key(keys.errors())
            .key(keys.stats())
            .key(keys.writes())
            .arg(instance)
            .arg(lease_ms)
            .arg(client_id)
            .arg(incarnation.guard())
            .arg(incarnation.max_epoch())
            .arg(incarnation.max_next_id());
        let (epoch, value, epoch_now, next_id_now): (u64, String, u64, u64) =
            incarnation.invoke(&call, con).await?;
        incarnation.saw_epoch(epoch_now);
        incarnation.saw_next_id(next_id_now);
        if epoch > 0 {
            return Ok(Some(Lease { epoch, value }));
        }
        if !holder_disconnected(con, keys).await?
            || !release_lock(con, &keys.lease(), &value).await?
        {
            return Ok(None);
        }
        tracing::info!(holder = %value, "lease holder's connection is gone; taking over without waiting for the TTL");
    }
    Ok(None)
}

/// True when the connection recorded by the lease holder no longer exists in Redis.
async fn holder_disconnected(con: &mut Conn, keys: &Keys) -> Result<bool, Error> {
    let id: Option<String> = redis::cmd("GET")
        .arg(keys.lease_conn())
        .query_async(con)
        .await?;
    // Unknown (absent, or not a number): rely on the TTL.
    let Some(id) = id.and_then(|v| v.parse::<u64>().ok()) else {
        return Ok(false);
    };
    let listing: Result<String, redis::RedisError> = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("ID")
        .arg(id)
        .query_async(con)
        .await;
    match listing {
        Ok(listing) => Ok(listing.trim().is_empty()),
        // An ACL user without `client|list`: unknown, so rely on the TTL.
        Err(e) if e.code() == Some("NOPERM") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Extends the lease if it is still ours; `Ok(false)` means it is lost and we must step down.
pub async fn renew(
    con: &mut Conn,
    keys: &Keys,
    lease: &Lease,
    lease_ms: u64,
    incarnation: &Incarnation,
) -> Result<bool, Error> {
    let mut call = scripts::RENEW.prepare_invoke();
    call.key(keys.lease())
        .key(keys.incarnation())
        .key(keys.errors())
        .key(keys.stats())
        .key(keys.writes())
        .arg(&lease.value)
        .arg(lease_ms)
        .arg(incarnation.guard());
    let renewed: i64 = incarnation.invoke(&call, con).await?;
    Ok(renewed == 1)
}

/// Deletes the lease if it is still ours, so a successor need not wait for the TTL.
pub async fn release(con: &mut Conn, keys: &Keys, lease: &Lease) -> Result<bool, Error> {
    release_lock(con, &keys.lease(), &lease.value).await
}

/// Compare-and-delete of any lock key (the lease, the getErrors drain lock).
pub async fn release_lock(con: &mut Conn, key: &str, value: &str) -> Result<bool, Error> {
    let released: i64 = scripts::RELEASE
        .key(key)
        .arg(value)
        .invoke_async(con)
        .await?;
    Ok(released == 1)
}

/// The current lease value, if any (for `sim` and status output).
pub async fn holder(con: &mut Conn, keys: &Keys) -> Result<Option<String>, Error> {
    Ok(redis::cmd("GET").arg(keys.lease()).query_async(con).await?)
}
