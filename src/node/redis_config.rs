//! The start-up check of Redis's own configuration: settings under which Redis may silently drop
//! or replay data the protocol relies on are refused or named, before a copy joins.
//!
//! - `maxmemory-policy` other than `noeviction`: Redis may evict a queue, an in-flight set or an
//!   outcome bitmap under memory pressure, losing messages without an error. Refused unless the
//!   operator passes `--allow-eviction`.
//! - No persistence at all (`appendonly no`, `save ""`): a restart loses everything. Allowed
//!   (the copies detect it and halt, docs/PROTOCOL.md invariant 9), but named in a warning.
//! - AOF with `aof-load-truncated yes`: after a crash that tears the AOF's last transaction, Redis
//!   7.0 leaves the transaction open and a later restart replays its first writes
//!   (valkey-io/valkey#4342); named in a warning with the fix.
//!
//! The facts come from `INFO` (allowed to nearly every user) and, where permitted, `CONFIG GET`;
//! a fact Redis will not tell is skipped, never guessed.

use crate::conn::Conn;
use crate::error::Error;
use crate::inspect;

/// What the check found that the operator should know; each is logged once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning(pub String);

/// Reads Redis's configuration and refuses an evicting one (unless `allow_eviction`); returns
/// the warnings to log.
pub async fn check(con: &mut Conn, allow_eviction: bool) -> Result<Vec<Warning>, Error> {
    refuse_replica(con).await?;
    let mut warnings = Vec::new();
    let memory = inspect::info(con, "memory").await?;
    let policy = memory.get("maxmemory_policy").cloned().unwrap_or_default();
    if !policy.is_empty() && policy != "noeviction" {
        let why = format!(
            "Redis's maxmemory-policy is {policy}: under memory pressure it may evict a queue, an in-flight set or an outcome bitmap and lose messages without an error"
        );
        if !allow_eviction {
            return Err(Error::Config(format!(
                "{why}. Set `maxmemory-policy noeviction` (then a full Redis refuses writes and the copies retry), or pass --allow-eviction to accept the risk"
            )));
        }
        warnings.push(Warning(format!("{why} (--allow-eviction given)")));
    }
    let persistence = inspect::info(con, "persistence").await?;
    let aof = persistence.get("aof_enabled").map(String::as_str) == Some("1");
    let save = config_get(con, "save").await;
    if !aof && save.as_deref() == Some("") {
        warnings.push(Warning(
            "Redis has no persistence (appendonly no, save \"\"): a Redis restart loses every message and outcome; the copies will detect it, halt and exit 5".into(),
        ));
    }
    if aof && config_get(con, "aof-load-truncated").await.as_deref() == Some("yes") {
        warnings.push(Warning(
            "Redis loads a truncated AOF (aof-load-truncated yes): after a crash that tears the AOF's last transaction, Redis 7.0 replays part of it on a later restart (valkey-io/valkey#4342), which can record an outcome twice. Set aof-load-truncated no and repair a refused AOF with redis-check-aof --fix".into(),
        ));
    }
    Ok(warnings)
}

/// Refuses a read-only replica: every write would fail with READONLY. Named with its master, so
/// the operator knows where to point the copies.
pub async fn refuse_replica(con: &mut Conn) -> Result<(), Error> {
    // On a cluster every command is routed to its slot's master; a replica answering can only be
    // a slot map gone stale during a failover (seen under `sim --kill-master`), which passes.
    if con.is_cluster() {
        return Ok(());
    }
    let replication = inspect::info(con, "replication").await?;
    if replication.get("role").map(String::as_str) == Some("slave") {
        let master = format!(
            "{}:{}",
            replication.get("master_host").map_or("?", String::as_str),
            replication.get("master_port").map_or("?", String::as_str)
        );
        return Err(Error::Config(format!(
            "connected to a read-only replica (of {master}); point --redis-url at the master, or use Sentinel"
        )));
    }
    Ok(())
}

/// `CONFIG GET name`'s value, or `None` when Redis does not allow or know it.
async fn config_get(con: &mut Conn, name: &str) -> Option<String> {
    let pairs: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(con)
        .await
        .ok()?;
    pairs.get(1).cloned()
}
