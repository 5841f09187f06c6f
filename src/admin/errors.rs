//! `getErrors`: print every failed message, delete it, exit — and lose nothing if killed halfway.
//!
//! errors_take.lua RENAMEs the whole error store into a drain list under a lock (so errors
//! arriving meanwhile go to the next call). Entries are printed from the head in chunks, stdout is
//! flushed, and only then errors_ack.lua trims what was printed. Every step is safe to retry when
//! the connection drops (the take and the lock are idempotent for their holder, the trim is keyed
//! by the list's length), so one `getErrors` rides out a dropped connection or a Redis restart
//! within `retry_for` and still prints each entry once. A `getErrors` killed after
//! printing and before trimming leaves those entries for the next call, which prints them again:
//! an entry can be printed twice after a crash, never lost. Only the lock holder may trim, so two
//! concurrent calls cannot trim each other's unprinted entries.
//!
//! `getErrors --peek` ([`peek`]) prints the same entries in the same order without the lock and
//! without deleting anything, and `--json` ([`LineFormat::Json`]) prints one JSON object a line.

use crate::conn::Conn;
use crate::error::Error;
use crate::node::lease;
use crate::protocol::keys::Keys;
use crate::protocol::message::Envelope;
use crate::protocol::scripts;
use std::io::Write;

/// One entry of the error store, `"<payload>\t<reason>\t<time_us>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorEntry {
    /// The message payload as it was in the queue (raw bytes for garbage).
    pub payload: Vec<u8>,
    /// Why it is here: "handler error", "handler timeout", or what was wrong with it.
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

    /// True for a message whose handler failed or timed out (as opposed to garbage, a
    /// quarantined key or a poison message).
    pub fn is_failed_message(&self) -> bool {
        Envelope::parse(&self.payload).is_ok() && !self.reason.starts_with("poison")
    }

    /// The message's id and data, when the payload is a message.
    fn message(&self) -> Option<(u64, &[u8])> {
        let (envelope, at) = Envelope::parse(&self.payload).ok()?;
        Some((envelope.id, &self.payload[at..]))
    }

    /// The line `getErrors` prints: the message id for a failed message (the task's message is
    /// `getMessage()`'s value), then a tab and its data when it carries any; or the raw payload
    /// for anything else. Data and raw payloads are printed with backslash, newline and carriage
    /// return escaped, so one entry is always one line.
    pub fn line(&self) -> String {
        match self.message() {
            Some((id, [])) => id.to_string(),
            Some((id, data)) => format!("{id}\t{}", escaped(data)),
            None => escaped(&self.payload),
        }
    }

    /// The entry as one JSON object: `id` (null for anything but a message), `reason`, `when`
    /// (RFC 3339 UTC from `time_us`, null when the entry carries no time), the message's `data`
    /// when it carries any, and for anything but a message the raw `payload` (both lossy UTF-8)
    /// so nothing is hidden.
    pub fn json(&self) -> serde_json::Value {
        let when = (self.time_us > 0).then(|| rfc3339_utc(self.time_us));
        match self.message() {
            Some((id, [])) => serde_json::json!({"id": id, "reason": self.reason, "when": when}),
            Some((id, data)) => serde_json::json!({
                "id": id,
                "reason": self.reason,
                "when": when,
                "data": String::from_utf8_lossy(data),
            }),
            None => serde_json::json!({
                "id": null,
                "reason": self.reason,
                "when": when,
                "payload": String::from_utf8_lossy(&self.payload),
            }),
        }
    }

    /// The entry printed in `format`, without the newline.
    pub fn render(&self, format: LineFormat) -> String {
        match format {
            LineFormat::Plain => self.line(),
            LineFormat::Json => self.json().to_string(),
        }
    }
}

/// Bytes as one line of text: lossy UTF-8 with `\\`, `\n` and `\r` escaped.
fn escaped(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

/// How `getErrors` prints an entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LineFormat {
    /// [`ErrorEntry::line`]: the id, or the escaped payload (the task's output).
    #[default]
    Plain,
    /// [`ErrorEntry::json`]: one JSON object a line, for machines.
    Json,
}

/// `time_us` (µs since the Unix epoch) as RFC 3339 UTC with microseconds,
/// e.g. `2023-11-14T22:13:20.000123Z`. Written out (Hinnant's civil-from-days) rather than
/// pulling in a date crate for one format.
pub fn rfc3339_utc(time_us: u64) -> String {
    let secs = time_us / 1_000_000;
    let micros = time_us % 1_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{micros:06}Z")
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
    /// How long a step may keep failing with Redis unreachable before the drain gives up.
    pub retry_for: std::time::Duration,
}

/// Where a drain puts the entries it takes, a chunk at a time.
///
/// The drain deletes a chunk from Redis as soon as [`accept`](ErrorSink::accept) returns `Ok`,
/// so `accept` must have made the entries durable by then (written and flushed, committed to a
/// database); an `Err` stops the drain and leaves the chunk in Redis for the next one. A sink
/// that dies between the two sees the chunk again from the next drain: at least once, never lost.
pub trait ErrorSink {
    /// Takes a chunk of entries, in store order.
    fn accept(&mut self, entries: &[ErrorEntry]) -> std::io::Result<()>;

    /// The last `count` entries accepted are deleted from Redis now. (The CLI says so on
    /// stderr, naming the output lines, so whoever reads both can tell which printed entries
    /// were deleted and which a later `getErrors` prints again.)
    fn deleted(&mut self, _count: usize) {}
}

/// `getErrors`'s sink: each entry as one line in `format`, flushed after every chunk; each
/// deletion reported on stderr as `getErrors: deleted output lines <a>-<b>` (1-based lines of
/// this run's stdout).
#[derive(Debug)]
pub struct Lines<W> {
    /// Where the lines go.
    out: W,
    /// How each entry is printed.
    format: LineFormat,
    /// Lines written so far.
    written: u64,
}

impl<W: Write> Lines<W> {
    /// Lines in `format` to `out`.
    pub fn new(out: W, format: LineFormat) -> Lines<W> {
        Lines {
            out,
            format,
            written: 0,
        }
    }
}

impl<W: Write> ErrorSink for Lines<W> {
    fn accept(&mut self, entries: &[ErrorEntry]) -> std::io::Result<()> {
        for entry in entries {
            writeln!(self.out, "{}", entry.render(self.format))?;
        }
        self.out.flush()?;
        self.written += entries.len() as u64;
        Ok(())
    }

    fn deleted(&mut self, count: usize) {
        let last = self.written;
        let first = last + 1 - (count as u64).min(last);
        eprintln!("{DELETED_LINES}{first}-{last}");
    }
}

/// How the CLI's sink starts each report of a deletion on stderr, followed by `<a>-<b>`: the
/// 1-based output lines whose entries were deleted (`sim` reads it to tell deleted entries from
/// ones a killed `getErrors` printed without deleting).
pub const DELETED_LINES: &str = "getErrors: deleted output lines ";

/// Collects the entries in memory (for programs that handle them themselves, and tests).
impl ErrorSink for Vec<ErrorEntry> {
    fn accept(&mut self, entries: &[ErrorEntry]) -> std::io::Result<()> {
        self.extend_from_slice(entries);
        Ok(())
    }
}

/// What a drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Entries printed and deleted.
    pub printed: u64,
    /// Of those, entries that were not a failed message (garbage, quarantined keys).
    pub bad: u64,
}

/// Hands every error entry to `sink` and deletes it: first what a killed earlier call left in the
/// drain list, then the whole store as it is now. In a namespace spread over shards, every
/// shard's store in turn (after the control slot's own, which holds only keys set aside), each
/// with the same protocol and its own lock: a call killed halfway leaves each store in a state
/// the next call resumes from.
pub async fn drain(
    con: &mut Conn,
    keys: &Keys,
    config: &DrainConfig,
    sink: &mut impl ErrorSink,
) -> Result<Drained, Error> {
    // Read first, and retried like every step: Redis may be restarting.
    let lanes = retrying(config, con, |mut con| async move {
        crate::protocol::shards::lanes(&mut con, keys).await
    })
    .await?;
    let mut total = drain_store(con, keys, config, sink).await?;
    if lanes.len() > 1 {
        for (mut con, keys) in lanes {
            let d = drain_store(&mut con, &keys, config, sink).await?;
            total.printed += d.printed;
            total.bad += d.bad;
        }
    }
    Ok(total)
}

/// [`drain`] of one error store (one shard's, or an unsharded namespace's).
async fn drain_store(
    con: &mut Conn,
    keys: &Keys,
    config: &DrainConfig,
    sink: &mut impl ErrorSink,
) -> Result<Drained, Error> {
    let mut total = Drained::default();
    // Deleting needs the master: a read-only replica is refused with its name.
    retrying(config, con, |mut con| async move {
        crate::node::redis_config::refuse_replica(&mut con).await
    })
    .await?;
    let result = async {
        let mut wait = LockWait::new(config.lock_ms);
        let mut losses = 0u32;
        let mut modes = ["resume", "take"].into_iter().peekable();
        while let Some(&mode) = modes.peek() {
            let asked = std::time::Instant::now();
            let left: i64 = retrying(config, con, |mut con| async move {
                let mut call = scripts::ERRORS_TAKE.prepare_invoke();
                call.key(keys.errors_lock())
                    .key(keys.errors())
                    .key(keys.errors_drain())
                    .key(keys.stats())
                    .arg(&config.token)
                    .arg(config.lock_ms)
                    .arg(mode);
                Ok(call.invoke_async(&mut con).await?)
            })
            .await?;
            if left < 0 {
                // Another getErrors holds the lock (or a killed one did): wait while it makes
                // progress or until its lock expires, then take over what it left.
                let ttl_ms: i64 = retrying(config, con, |mut con| async move {
                    Ok(redis::cmd("PTTL")
                        .arg(keys.errors_lock())
                        .query_async(&mut con)
                        .await?)
                })
                .await?;
                // While Redis was away (restarting, say) the holder could not progress either:
                // that time does not count against it.
                wait.redis_was_away(asked.elapsed().saturating_sub(ROUND_TRIP_SLOW));
                if !wait.still_worth_it(ttl_ms) {
                    return Err(Error::DrainLockLost);
                }
                tokio::time::sleep(LOCK_POLL).await;
                continue;
            }
            match drain_list(con, keys, config, left as u64, sink, &mut total).await {
                Ok(()) => {
                    modes.next();
                }
                // Our lock expired under us: Redis was away for longer than its TTL (a restart
                // loading a large AOF), or this call was stalled. Take it again (or wait for
                // whoever has it) and go on from the drain list's head; the chunk printed but
                // not trimmed is printed again: at least once, never lost. Bounded.
                Err(Error::DrainLockLost) if losses < LOCK_LOSSES_MAX => {
                    losses += 1;
                    tracing::warn!(
                        losses,
                        "getErrors lost its drain lock (it expired); taking it again"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    .await;
    // Release even after a failure, so the next call need not wait for the TTL.
    let _ = lease::release_lock(con, &keys.errors_lock(), &config.token).await;
    result.map(|()| total)
}

/// How often a `getErrors` waiting for another one's drain lock looks again.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// How many times one `getErrors` takes its drain lock again after losing it before it gives up.
const LOCK_LOSSES_MAX: u32 = 5;

/// A lock step slower than this means Redis was away (a round trip takes milliseconds).
const ROUND_TRIP_SLOW: std::time::Duration = std::time::Duration::from_millis(500);

/// The longest a `getErrors` waits for other drains in all, however much they progress.
const LOCK_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(600);

/// How long a `getErrors` keeps waiting for the drain lock. Whoever holds it extends it on every
/// chunk it prints, so a rising TTL means progress (or another getErrors took the lock over): keep
/// waiting. A holder that stops (killed) lets the lock expire within `lock_ms`; one that holds it
/// without progress (e.g. its stdout blocked) for longer than `lock_ms` plus a second makes
/// this one give up, with an error saying so. Bounded in all by [`LOCK_WAIT_MAX`].
#[derive(Debug)]
struct LockWait {
    lock_ms: u64,
    started: std::time::Instant,
    progressed: std::time::Instant,
    last_ttl_ms: i64,
}

impl LockWait {
    fn new(lock_ms: u64) -> LockWait {
        let now = std::time::Instant::now();
        LockWait {
            lock_ms,
            started: now,
            progressed: now,
            last_ttl_ms: i64::MAX,
        }
    }

    /// Redis was unreachable for about `away`: the holder could not progress meanwhile, so that
    /// time is not held against it.
    fn redis_was_away(&mut self, away: std::time::Duration) {
        self.progressed = (self.progressed + away).min(std::time::Instant::now());
    }

    /// Takes the lock's current PTTL; false when waiting longer is pointless.
    fn still_worth_it(&mut self, ttl_ms: i64) -> bool {
        if ttl_ms > self.last_ttl_ms {
            self.progressed = std::time::Instant::now();
        }
        self.last_ttl_ms = ttl_ms;
        let stalled = self.progressed.elapsed().as_millis() as u64 > self.lock_ms + 1000;
        !stalled && self.started.elapsed() < LOCK_WAIT_MAX
    }
}

/// Runs `step` until it succeeds, retrying (50 ms doubling to 1 s) while Redis is unreachable,
/// for at most `config.retry_for`. Only for steps that are safe to repeat.
async fn retrying<T, F, Fut>(config: &DrainConfig, con: &mut Conn, mut step: F) -> Result<T, Error>
where
    F: FnMut(Conn) -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let started = std::time::Instant::now();
    let mut backoff = std::time::Duration::from_millis(50);
    loop {
        match step(con.clone()).await {
            Err(e) if e.is_transient() && started.elapsed() < config.retry_for => {
                tracing::debug!(error = %e, "getErrors step failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Prints and trims the drain list chunk by chunk until it is empty; `len` is its length now.
/// Bounded: the list only shrinks (nothing else appends to it), so this ends after at most
/// `len / chunk + 1` rounds.
async fn drain_list(
    con: &mut Conn,
    keys: &Keys,
    config: &DrainConfig,
    mut len: u64,
    sink: &mut impl ErrorSink,
    total: &mut Drained,
) -> Result<(), Error> {
    loop {
        let raw: Vec<Vec<u8>> = retrying(config, con, |mut con| async move {
            Ok(redis::cmd("LRANGE")
                .arg(keys.errors_drain())
                .arg(0)
                .arg(config.chunk as i64 - 1)
                .query_async(&mut con)
                .await?)
        })
        .await?;
        if raw.is_empty() {
            return Ok(());
        }
        let entries: Vec<ErrorEntry> = raw.iter().map(|r| ErrorEntry::parse(r)).collect();
        sink.accept(&entries)?;
        total.bad += entries.iter().filter(|e| !e.is_failed_message()).count() as u64;
        let printed = raw.len();
        let left: i64 = retrying(config, con, |mut con| async move {
            let mut call = scripts::ERRORS_ACK.prepare_invoke();
            call.key(keys.errors_lock())
                .key(keys.errors_drain())
                .key(keys.errors())
                .key(keys.stats())
                .arg(&config.token)
                .arg(printed)
                .arg(config.lock_ms)
                .arg(len);
            Ok(call.invoke_async(&mut con).await?)
        })
        .await?;
        if left < 0 {
            return Err(Error::DrainLockLost);
        }
        sink.deleted(printed);
        total.printed += printed as u64;
        len = left as u64;
        if left == 0 {
            return Ok(());
        }
    }
}

/// What a peek printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peeked {
    /// Entries of the drain list (left by a getErrors that was killed or is running now).
    pub draining: u64,
    /// Entries of the store.
    pub stored: u64,
}

/// `getErrors --peek`: prints every entry, in the order a drain would (the drain list, then the
/// store), and deletes nothing. It takes no lock, so it never delays a real `getErrors`.
///
/// Each list's length is read first and only that many entries are walked, so the walk ends even
/// while handlers keep appending. A concurrent drain trimming the drain list meanwhile can make
/// this skip or repeat a few entries: peek is for looking; the drain is the record.
pub async fn peek(
    con: &mut Conn,
    keys: &Keys,
    chunk: usize,
    format: LineFormat,
    out: &mut impl Write,
) -> Result<Peeked, Error> {
    let mut total = peek_store(con, keys, chunk, format, out).await?;
    let lanes = crate::protocol::shards::lanes(con, keys).await?;
    if lanes.len() > 1 {
        for (mut con, keys) in lanes {
            let p = peek_store(&mut con, &keys, chunk, format, out).await?;
            total.draining += p.draining;
            total.stored += p.stored;
        }
    }
    Ok(total)
}

/// [`peek`] of one error store.
async fn peek_store(
    con: &mut Conn,
    keys: &Keys,
    chunk: usize,
    format: LineFormat,
    out: &mut impl Write,
) -> Result<Peeked, Error> {
    let chunk = chunk.max(1);
    let mut counts = [0u64; 2];
    for (list, count) in [keys.errors_drain(), keys.errors()].iter().zip(&mut counts) {
        // Read-only: a damaged list is named, not set aside (the next getErrors does that).
        let kind: String = redis::cmd("TYPE").arg(list).query_async(con).await?;
        if kind != "list" && kind != "none" {
            tracing::warn!(key = %list, %kind, "not a list: the next getErrors sets it aside");
            continue;
        }
        let len: u64 = redis::cmd("LLEN").arg(list).query_async(con).await?;
        while *count < len {
            let last = (*count + chunk as u64).min(len) - 1;
            let raw: Vec<Vec<u8>> = redis::cmd("LRANGE")
                .arg(list)
                .arg(*count)
                .arg(last)
                .query_async(con)
                .await?;
            if raw.is_empty() {
                break; // trimmed under us
            }
            for entry in raw.iter().map(|r| ErrorEntry::parse(r)) {
                writeln!(out, "{}", entry.render(format))?;
            }
            *count += raw.len() as u64;
        }
    }
    out.flush()?;
    Ok(Peeked {
        draining: counts[0],
        stored: counts[1],
    })
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

    #[test]
    fn json_lines_name_the_id_or_show_the_payload() {
        let e = ErrorEntry::parse(b"12:3:1700000000000000\thandler error\t1700000000000123");
        assert_eq!(
            e.render(LineFormat::Json),
            r#"{"id":12,"reason":"handler error","when":"2023-11-14T22:13:20.000123Z"}"#
        );
        let g = ErrorEntry::parse(b"a\"b\tmissing field epoch\t5").json();
        assert_eq!(g["id"], serde_json::Value::Null);
        assert_eq!(g["payload"], "a\"b");
        assert_eq!(g["when"], "1970-01-01T00:00:00.000005Z");
        let odd = ErrorEntry::parse(b"no tabs here").json();
        assert_eq!(odd["when"], serde_json::Value::Null);
        assert_eq!(odd["payload"], "no tabs here");
    }

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29 (a leap day in a century leap year) 12:34:56.789012 UTC.
        assert_eq!(
            rfc3339_utc(951_827_696_789_012),
            "2000-02-29T12:34:56.789012Z"
        );
        assert_eq!(
            rfc3339_utc(4_102_444_799_000_000),
            "2099-12-31T23:59:59.000000Z"
        );
    }
}
