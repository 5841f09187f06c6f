//! Heartbeats and reclaim: how a SIGKILLed handler's in-flight messages come back.
//!
//! Every process keeps `{ns}:hb:<handler>` alive (TTL `heartbeat_ms`, refreshed every fifth of it)
//! and every process runs reclaim.lua on the same beat: a handler whose heartbeat has expired is
//! dead, and its in-flight set goes back to the head of the queue. No cleanup code is needed on
//! death, so SIGKILL loses nothing.

use crate::conn::Conn;
use crate::error::Error;
use crate::keys::Keys;
use crate::scripts;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Refreshes `handler`'s heartbeat.
pub async fn heartbeat(
    con: &mut Conn,
    keys: &Keys,
    handler: &str,
    heartbeat_ms: u64,
) -> Result<(), Error> {
    redis::cmd("SET")
        .arg(keys.heartbeat(handler))
        .arg(1)
        .arg("PX")
        .arg(heartbeat_ms)
        .query_async::<()>(con)
        .await?;
    Ok(())
}

/// Deletes `handler`'s heartbeat (clean stop, nothing in flight): its registry entry is then
/// cleaned up by the next reclaim at once instead of after the TTL.
pub async fn forget(con: &mut Conn, keys: &Keys, handler: &str) -> Result<(), Error> {
    redis::cmd("DEL")
        .arg(keys.heartbeat(handler))
        .query_async::<()>(con)
        .await?;
    Ok(())
}

/// Runs reclaim.lua once. Returns (dead handlers, messages re-queued).
pub async fn reclaim(con: &mut Conn, keys: &Keys) -> Result<(u64, u64), Error> {
    let (dead, moved): (u64, u64) = scripts::RECLAIM
        .key(keys.handlers())
        .key(keys.queue())
        .key(keys.stats())
        .arg(keys.prefix())
        .invoke_async(con)
        .await?;
    Ok((dead, moved))
}

/// Heartbeats the current handler id and reclaims dead handlers' messages every
/// `heartbeat_ms / 5`, until `stop`. Fails with [`Error::Unreachable`] when Redis has not answered
/// for `redis_down_max_ms` (the process then exits; its messages are reclaimed by the others).
pub async fn run(
    mut con: Conn,
    keys: Keys,
    owner: watch::Receiver<Arc<str>>,
    heartbeat_ms: u64,
    redis_down_max_ms: u64,
    stop: CancellationToken,
) -> Result<(), Error> {
    let mut tick = tokio::time::interval(Duration::from_millis((heartbeat_ms / 5).max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let handler = owner.borrow().clone();
        let beat = heartbeat(&mut con, &keys, &handler, heartbeat_ms).await;
        let swept = match beat {
            Ok(()) => reclaim(&mut con, &keys).await,
            Err(e) => Err(e),
        };
        match swept {
            Ok((dead, moved)) => {
                last_ok = Instant::now();
                if dead > 0 {
                    tracing::info!(
                        dead,
                        moved,
                        "reclaimed the in-flight messages of dead handlers"
                    );
                }
            }
            Err(e) if last_ok.elapsed() >= Duration::from_millis(redis_down_max_ms) => {
                return Err(Error::Unreachable {
                    url: "(connected earlier)".into(),
                    attempts: 0,
                    waited_ms: last_ok.elapsed().as_millis() as u64,
                    last: e.to_string(),
                });
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat/reclaim failed; retrying"),
        }
    }
}
