//! `getErrors`: print every failed message, delete it, exit — and lose nothing if killed halfway.
//!
//! errors_take.lua RENAMEs the whole error store into a drain list under a lock (so errors
//! arriving meanwhile go to the next call). Entries are printed from the head in chunks, stdout is
//! flushed, and only then errors_ack.lua trims what was printed. A `getErrors` killed after
//! printing and before trimming leaves those entries for the next call, which prints them again:
//! an entry can be printed twice after a crash, never lost. Only the lock holder may trim, so two
//! concurrent calls cannot trim each other's unprinted entries.

use crate::conn::Conn;
use crate::error::Error;
use crate::keys::Keys;
use crate::lease;
use crate::scripts;
use std::io::Write;

/// One entry of the error store, `"<payload>\t<reason>\t<time_us>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorEntry {
    /// The message payload as it was in the queue (raw bytes for garbage).
    pub payload: Vec<u8>,
    /// Why it is here: "handler error", or what was wrong with it.
    pub reason: String,
    /// Redis time when it was recorded, µs.
    pub time_us: u64,
}

impl ErrorEntry {
    /// Splits an entry from the right (a garbage payload may itself contain tabs).
    pub fn parse(raw: &[u8]) -> ErrorEntry {
        let mut fields = raw.rsplitn(3, |&b| b == b'\t');
        let time = fields.next().unwrap_or_default();
        let reason = fields.next();
        let payload = fields.next();
        match (
            payload,
            reason,
            std::str::from_utf8(time).ok().and_then(|t| t.parse().ok()),
        ) {
            (Some(p), Some(r), Some(time_us)) => ErrorEntry {
                payload: p.to_vec(),
                reason: String::from_utf8_lossy(r).into_owned(),
                time_us,
            },
            _ => ErrorEntry {
                payload: raw.to_vec(),
                reason: "unrecognised entry".into(),
                time_us: 0,
            },
        }
    }

    /// The line `getErrors` prints: the message id for a failed message (the task's message is
    /// `getMessage()`'s value), or the raw payload, newlines escaped, for anything else.
    pub fn line(&self) -> String {
        let text = String::from_utf8_lossy(&self.payload);
        match crate::message::Message::parse(&text) {
            Ok(m) => m.id.to_string(),
            Err(_) => text
                .replace('\\', "\\\\")
                .replace('\n', "\\n")
                .replace('\r', "\\r"),
        }
    }
}

/// Settings of one drain.
#[derive(Debug, Clone)]
pub struct DrainConfig {
    /// Entries printed per round trip.
    pub chunk: usize,
    /// Drain lock TTL, extended on every chunk. A call finding the lock held waits up to this long
    /// (a killed getErrors's lock expires by then).
    pub lock_ms: u64,
    /// Unique token of this call.
    pub token: String,
}

/// What a drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Entries printed and deleted.
    pub printed: u64,
    /// Of those, entries that were not a failed message (garbage, quarantined keys).
    pub bad: u64,
}

/// Prints every error entry to `out` (one line each) and deletes it: first what a killed earlier
/// call left in the drain list, then the whole store as it is now.
pub async fn drain(
    con: &mut Conn,
    keys: &Keys,
    config: &DrainConfig,
    out: &mut impl Write,
) -> Result<Drained, Error> {
    let mut total = Drained::default();
    let result = async {
        let mut waited_ms = 0;
        let mut modes = ["resume", "take"].into_iter().peekable();
        while let Some(&mode) = modes.peek() {
            let left: i64 = scripts::ERRORS_TAKE
                .key(keys.errors_lock())
                .key(keys.errors())
                .key(keys.errors_drain())
                .arg(&config.token)
                .arg(config.lock_ms)
                .arg(mode)
                .invoke_async(con)
                .await?;
            if left < 0 {
                // Another getErrors holds the lock (or a killed one did): wait for it, bounded
                // by the lock's TTL, then take over what it left.
                waited_ms += 100;
                if waited_ms > config.lock_ms + 1000 {
                    return Err(Error::DrainLockLost);
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
            drain_list(con, keys, config, out, &mut total).await?;
            modes.next();
        }
        Ok(())
    }
    .await;
    // Release even after a failure, so the next call need not wait for the TTL.
    let _ = lease::release_lock(con, &keys.errors_lock(), &config.token).await;
    result.map(|()| total)
}

/// Prints and trims the drain list chunk by chunk until it is empty. Bounded: the list only
/// shrinks (nothing else appends to it), so this ends after at most `len / chunk + 1` rounds.
async fn drain_list(
    con: &mut Conn,
    keys: &Keys,
    config: &DrainConfig,
    out: &mut impl Write,
    total: &mut Drained,
) -> Result<(), Error> {
    loop {
        let raw: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(keys.errors_drain())
            .arg(0)
            .arg(config.chunk as i64 - 1)
            .query_async(con)
            .await?;
        if raw.is_empty() {
            return Ok(());
        }
        for entry in raw.iter().map(|r| ErrorEntry::parse(r)) {
            writeln!(out, "{}", entry.line())?;
            if entry.reason != "handler error" {
                total.bad += 1;
            }
        }
        out.flush()?;
        let left: i64 = scripts::ERRORS_ACK
            .key(keys.errors_lock())
            .key(keys.errors_drain())
            .arg(&config.token)
            .arg(raw.len())
            .arg(config.lock_ms)
            .invoke_async(con)
            .await?;
        if left < 0 {
            return Err(Error::DrainLockLost);
        }
        total.printed += raw.len() as u64;
        if left == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_from_the_right() {
        let e = ErrorEntry::parse(b"12:3:1700000000000000\thandler error\t1700000000000123");
        assert_eq!(e.reason, "handler error");
        assert_eq!(e.time_us, 1_700_000_000_000_123);
        assert_eq!(e.line(), "12");
        let g = ErrorEntry::parse(b"a\tb\nc\tfield id is bad\t5");
        assert_eq!(g.payload, b"a\tb\nc");
        assert_eq!(g.line(), "a\tb\\nc");
        let odd = ErrorEntry::parse(b"no tabs here");
        assert_eq!(odd.reason, "unrecognised entry");
    }
}
