//! The wake-up channel: idle handlers learn of new messages within a round trip instead of at
//! their next poll.
//!
//! generate.lua PUBLISHes on `{ns}:wake` after every batch. Each process keeps one pub/sub
//! connection subscribed and turns each notification into a permit on a `Notify` the fetcher
//! waits on while idle. Pub/sub is not durable, and that is fine: the fetcher still polls (at a
//! slow rate when idle), so a lost notification costs latency, never a message.

use crate::protocol::keys::Keys;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Listens on the wake-up channel until `stop`, reconnecting with backoff (100 ms doubling to
/// 2 s) whenever the connection fails. Never fails the process: without it handlers only poll.
pub async fn listen(
    target: crate::conn::RedisTarget,
    keys: Keys,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            let client = target.client().map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "client",
                    e.to_string(),
                ))
            })?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(keys.wake()).await?;
            let mut messages = pubsub.on_message();
            while messages.next().await.is_some() {
                wake.notify_one();
            }
            Ok::<_, redis::RedisError>(())
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = attempt => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "wake-up channel unavailable; handlers poll until it is back");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
