//! The leader lease: who may generate, under which fencing epoch.
//!
//! `SET NX PX` with a unique value, renewed by compare-and-pexpire, released by compare-and-delete.
//! Every acquisition INCRs the epoch, and generate.lua refuses any epoch that does not hold the
//! lease right now, so an old leader that was paused past its TTL can never generate again.
//! All timing is Redis's (PX TTLs); no two machines' clocks are ever compared.

use crate::conn::Conn;
use crate::error::Error;
use crate::keys::Keys;
use crate::scripts;

/// A lease this process holds (or held: Redis is the judge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The fencing token: strictly greater than every earlier holder's.
    pub epoch: u64,
    /// The lease key's value, `"<epoch>:<instance>"`: what renew and release compare against.
    pub value: String,
}

/// Takes the lease if it is free. `Ok(None)` when someone holds it.
pub async fn try_acquire(
    con: &mut Conn,
    keys: &Keys,
    instance: &str,
    lease_ms: u64,
) -> Result<Option<Lease>, Error> {
    let (epoch, value): (u64, String) = scripts::ACQUIRE
        .key(keys.lease())
        .key(keys.epoch())
        .arg(instance)
        .arg(lease_ms)
        .invoke_async(con)
        .await?;
    Ok((epoch > 0).then_some(Lease { epoch, value }))
}

/// Extends the lease if it is still ours; `Ok(false)` means it is lost and we must step down.
pub async fn renew(
    con: &mut Conn,
    keys: &Keys,
    lease: &Lease,
    lease_ms: u64,
) -> Result<bool, Error> {
    let renewed: i64 = scripts::RENEW
        .key(keys.lease())
        .arg(&lease.value)
        .arg(lease_ms)
        .invoke_async(con)
        .await?;
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
