//! Small reads of Redis's own state every part needs: its clock and its `INFO` sections.

use crate::conn::Conn;
use crate::error::Error;

/// The Redis server's clock, µs (for timing events against script timestamps).
pub async fn redis_time_us(con: &mut Conn) -> Result<u64, Error> {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(con).await?;
    Ok(s * 1_000_000 + us)
}

/// One `INFO <section>` as `field -> value`.
pub async fn info(
    con: &mut Conn,
    section: &str,
) -> Result<std::collections::HashMap<String, String>, Error> {
    let text: String = redis::cmd("INFO").arg(section).query_async(con).await?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect())
}

/// Total calls and script calls from `INFO commandstats` (`cmdstat_x:calls=N,...`).
pub async fn command_calls(con: &mut Conn) -> Result<(u64, u64), Error> {
    let stats = info(con, "commandstats").await?;
    let mut total = 0;
    let mut scripts = 0;
    for (name, value) in &stats {
        let Some(cmd) = name.strip_prefix("cmdstat_") else {
            continue;
        };
        let calls = value
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        total += calls;
        if cmd == "evalsha" || cmd == "eval" {
            scripts += calls;
        }
    }
    Ok((total, scripts))
}
