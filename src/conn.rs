//! Connecting to Redis with a bound: a copy that cannot reach Redis says so and exits instead of
//! hanging, and a copy that loses Redis mid-run reconnects on its own (`ConnectionManager`).

use crate::error::Error;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::{Duration, Instant};

/// The connection every task of a process shares (multiplexed, reconnecting, cheap to clone).
pub type Conn = ConnectionManager;

/// How long one command may wait for its reply before it counts as failed. Generous: a loaded
/// Redis running a 1,000-message commit script answers in milliseconds, not seconds.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects and PINGs, retrying with exponential backoff (50 ms doubling to 1 s) until
/// `connect_timeout_ms` has passed; then fails with [`Error::Unreachable`].
pub async fn connect(url: &str, connect_timeout_ms: u64) -> Result<Conn, Error> {
    let client = redis::Client::open(url)
        .map_err(|e| Error::Config(format!("bad redis url {}: {e}", redact(url))))?;
    let started = Instant::now();
    let bound = Duration::from_millis(connect_timeout_ms);
    let mut delay = Duration::from_millis(50);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let left = bound
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(10));
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(left.min(Duration::from_secs(2))))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let attempt = async {
            let mut con = ConnectionManager::new_with_config(client.clone(), config).await?;
            redis::cmd("PING").query_async::<String>(&mut con).await?;
            Ok::<_, redis::RedisError>(con)
        };
        let last = match tokio::time::timeout(left, attempt).await {
            Ok(Ok(con)) => return Ok(con),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        if started.elapsed() + delay >= bound {
            return Err(Error::Unreachable {
                url: redact(url),
                attempts,
                waited_ms: started.elapsed().as_millis() as u64,
                last,
            });
        }
        tracing::debug!(attempt = attempts, error = %last, "redis not reachable yet");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_credentials() {
        assert_eq!(super::redact("redis://u:pw@h:1/0"), "redis://***@h:1/0");
        assert_eq!(super::redact("redis://h:1"), "redis://h:1");
    }
}
