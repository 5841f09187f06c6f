//! Detecting a Redis that forgot (docs/PROTOCOL.md, invariant 9): the namespace's incarnation
//! token and this copy's high-water marks.
//!
//! Exactly-once rests on Redis keeping what it acknowledged. A Redis restarted without
//! persistence, a `FLUSHALL`, a restore from an older snapshot or a failover to a lagging replica
//! breaks that: the counter goes back (ids are generated twice), the epoch goes back (fencing
//! tokens are reused), outcomes vanish. No protocol can undo that, so the group must notice and
//! stop. Each namespace carries a random token created once (`{ns}:incarnation`); each copy joins
//! with the token it read and remembers the highest epoch and next id it has seen. The hot
//! scripts refuse (a `FORGOTTEN` error, nothing written) when the token differs or a counter is
//! below the copy's mark; the copy then marks the namespace halted (the token replaced by
//! `halted:<why>`, so every other copy stops at its next script call and `app status` shows why)
//! and exits with its own exit code. An operator decides what next (README, "When Redis forgets").

use crate::conn::Conn;
use crate::error::Error;
use crate::protocol::keys::Keys;
use crate::protocol::HALTED_PREFIX;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The incarnation this copy joined, and the highest counters it has seen since.
#[derive(Debug, Clone)]
pub struct Incarnation {
    /// The token read (or created) at join; every guarded script compares it with Redis's.
    token: Arc<str>,
    /// Highest epoch seen (lease polls): the epoch counter must never be found below it.
    max_epoch: Arc<AtomicU64>,
    /// Highest next id seen (lease polls, own generation): `next_id` must never be below it.
    max_next_id: Arc<AtomicU64>,
    /// This copy's random id in `{ns}:writes`.
    copy: Arc<str>,
    /// The highest count of this copy's guarded script calls Redis has reported (each reply
    /// carries it): Redis counts each call in `{ns}:writes`, so finding fewer there means Redis
    /// went back on a write it acknowledged.
    acked: Arc<AtomicU64>,
}

impl Incarnation {
    /// Joins the namespace: reads its token, creating one when there is none (a fresh namespace;
    /// also one made by a version without tokens, or one wiped while no copy was running, which
    /// no one can tell apart), and takes the current counters as the first high-water marks.
    ///
    /// A halted namespace is refused with [`Error::RedisForgot`] unless `accept_data_loss`: then
    /// the halt is replaced by a fresh token and the group starts over from what Redis holds now.
    pub async fn join(
        con: &mut Conn,
        keys: &Keys,
        accept_data_loss: bool,
    ) -> Result<Incarnation, Error> {
        let key = keys.incarnation();
        let mut current: Option<String> = redis::cmd("GET").arg(&key).query_async(con).await?;
        if let Some(halted) = current.clone().filter(|v| v.starts_with(HALTED_PREFIX)) {
            if !accept_data_loss {
                return Err(Error::RedisForgot(format!(
                    "the namespace is halted ({}); see README \"When Redis forgets\", or start one copy with --accept-data-loss",
                    &halted[HALTED_PREFIX.len()..]
                )));
            }
            tracing::warn!(halt = %halted, "--accept-data-loss: clearing the halt; the group starts over from what Redis holds now");
            // Compare-and-delete, then create: two copies accepting at once agree on one token.
            crate::node::lease::release_lock(con, &key, &halted).await?;
            // A write-count hash of the wrong type (damage is one way to halt) would refuse
            // every call again; a valid one is kept (another copy accepting at the same time
            // may already be counting in it).
            let writes = keys.writes();
            let kind: String = redis::cmd("TYPE").arg(&writes).query_async(con).await?;
            if kind != "none" && kind != "hash" {
                let () = redis::cmd("DEL").arg(&writes).query_async(con).await?;
            }
            current = None;
        }
        let token = match current {
            Some(token) => token,
            None => {
                let fresh = format!("{:016x}", rand::random::<u64>());
                let created: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&fresh)
                    .arg("NX")
                    .query_async(con)
                    .await?;
                if created.is_some() {
                    tracing::info!(token = %fresh, "created the namespace's incarnation token");
                }
                redis::cmd("GET").arg(&key).query_async(con).await?
            }
        };
        let (epoch, next_id): (Option<String>, Option<String>) = redis::cmd("MGET")
            .arg(keys.epoch())
            .arg(keys.next_id())
            .query_async(con)
            .await?;
        // A corrupt counter reads as 0 here; the scripts that use it report it by name.
        let number = |v: Option<String>| v.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        Ok(Incarnation {
            token: Arc::from(token),
            max_epoch: Arc::new(AtomicU64::new(number(epoch))),
            max_next_id: Arc::new(AtomicU64::new(number(next_id))),
            copy: Arc::from(format!("{:016x}", rand::random::<u64>())),
            acked: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The token this copy joined.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The argument every guarded script takes (prelude.lua, `forgotten`):
    /// `"<token>/<copy>/<acked>"`. Taken when the call is built: any call that succeeds after
    /// that only raises Redis's count further.
    pub fn guard(&self) -> String {
        format!(
            "{}/{}/{}",
            self.token,
            self.copy,
            self.acked.load(Ordering::Relaxed)
        )
    }

    /// Runs `call`, a guarded script (scripts.rs, `guarded_script!`) whose guard argument came
    /// from [`Incarnation::guard`], and returns its reply. The reply carries Redis's count of
    /// this copy's guarded calls after this one, and the copy's own count catches up with it:
    /// a call whose reply was lost (it may have run, the copy cannot tell) leaves the copy's
    /// count lower only until the next reply that comes back, so a rollback that takes back any
    /// call acknowledged by then is refused at the next call (docs/PROTOCOL.md, invariant 9).
    /// Redis's count only grows while Redis keeps its writes, so taking the higher of the two
    /// never makes a faithful Redis look forgetful.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        call: &redis::ScriptInvocation<'_>,
        con: &mut Conn,
    ) -> redis::RedisResult<T> {
        let (writes, reply): (i64, redis::Value) = call.invoke_async(con).await?;
        let Ok(writes) = u64::try_from(writes) else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "a guarded script returned without counting the call (no write count)",
            )));
        };
        self.acked.fetch_max(writes, Ordering::Relaxed);
        Ok(T::from_redis_value(reply)?)
    }

    /// How many of this copy's guarded calls Redis counted, as far as this copy knows.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Raises the epoch high-water mark.
    pub fn saw_epoch(&self, epoch: u64) {
        self.max_epoch.fetch_max(epoch, Ordering::Relaxed);
    }

    /// Raises the next-id high-water mark.
    pub fn saw_next_id(&self, next_id: u64) {
        self.max_next_id.fetch_max(next_id, Ordering::Relaxed);
    }

    /// The highest epoch seen.
    pub fn max_epoch(&self) -> u64 {
        self.max_epoch.load(Ordering::Relaxed)
    }

    /// The highest next id seen.
    pub fn max_next_id(&self) -> u64 {
        self.max_next_id.load(Ordering::Relaxed)
    }
}

/// Marks the namespace halted with `why` (unless it already is), so that every copy stops at its
/// next guarded script and `app status` says why. Unconditional: a halt must win over a token a
/// new copy may have created on the emptied Redis meanwhile.
pub async fn halt(con: &mut Conn, keys: &Keys, why: &str) -> Result<(), Error> {
    let key = keys.incarnation();
    let current: Option<String> = redis::cmd("GET").arg(&key).query_async(con).await?;
    if current.is_some_and(|v| v.starts_with(HALTED_PREFIX)) {
        return Ok(());
    }
    redis::cmd("SET")
        .arg(&key)
        .arg(format!("{HALTED_PREFIX}{why}"))
        .query_async::<()>(con)
        .await?;
    Ok(())
}

/// The halt reason if the namespace is halted (for `app status`).
pub async fn halted(con: &mut Conn, keys: &Keys) -> Result<Option<String>, Error> {
    let current: Option<String> = redis::cmd("GET")
        .arg(keys.incarnation())
        .query_async(con)
        .await?;
    Ok(current.and_then(|v| v.strip_prefix(HALTED_PREFIX).map(str::to_string)))
}
