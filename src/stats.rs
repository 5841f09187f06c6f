//! Counters and latency histograms.
//!
//! Counters live in one Redis hash, bumped by the scripts in the same atomic step as the change
//! they count. Latencies are measured on Redis's clock (generation, fetch and commit times all come
//! from `TIME` inside the scripts) and kept per process in HdrHistograms, which are written to
//! `{ns}:hist:<instance>` every second so `sim` can merge them without a per-message write.

use crate::conn::Conn;
use crate::error::Error;
use crate::protocol::keys::Keys;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use std::collections::HashMap;

/// The counters in `{ns}:stats`; absent fields are 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Messages generated (ids handed out).
    pub generated: u64,
    /// Successful outcomes recorded.
    pub processed: u64,
    /// Error outcomes recorded (entries pushed to the error store by handlers).
    pub errors: u64,
    /// Outcomes refused because one was already recorded for the id (must stay 0).
    pub duplicates: u64,
    /// eventHandler runs whose outcome reached a commit (recorded or refused).
    pub runs: u64,
    /// Messages given back from dead handlers, to the retry set or a suspect list (each time).
    pub reclaimed: u64,
    /// Commits refused because the handler no longer owned the message.
    pub refused: u64,
    /// Unparseable messages or keys moved to the error store.
    pub bad: u64,
    /// Poison messages moved to the error store after [`MAX_RECLAIMS`](crate::protocol::MAX_RECLAIMS) handler deaths.
    pub poisoned: u64,
    /// Error outcomes that were handler timeouts (also counted in `errors`).
    pub timeouts: u64,
    /// Messages a live handler gave back when its copy became the generator (reclaim.lua's
    /// hand-back), to the retry set or their suspect list, reclaim counts unchanged.
    pub handed_back: u64,
}

impl Counters {
    /// The hash fields of `{ns}:stats`, as the scripts name them (`HINCRBY`), in struct order.
    pub const FIELDS: [&'static str; 11] = [
        "generated",
        "processed",
        "errors",
        "duplicates",
        "runs",
        "reclaimed",
        "refused",
        "bad",
        "poisoned",
        "timeouts",
        "handed_back",
    ];

    /// The counters from a lookup by field name (absent = 0).
    pub fn from_fields(mut get: impl FnMut(&str) -> u64) -> Counters {
        let [generated, processed, errors, duplicates, runs, reclaimed, refused, bad, poisoned, timeouts, handed_back] =
            Counters::FIELDS.map(&mut get);
        Counters {
            generated,
            processed,
            errors,
            duplicates,
            runs,
            reclaimed,
            refused,
            bad,
            poisoned,
            timeouts,
            handed_back,
        }
    }

    /// Reads the namespace's counters: `{ns}:stats`, or the sum of every shard's when the
    /// namespace is spread over shards.
    pub async fn read(con: &mut Conn, keys: &Keys) -> Result<Counters, Error> {
        let mut total = Counters::read_one(con, keys).await?;
        let lanes = crate::protocol::shards::lanes(con, keys).await?;
        if lanes.len() > 1 {
            // The control slot's own hash counts only keys it set aside; the shards count the rest.
            for (mut con, keys) in lanes {
                total.add(&Counters::read_one(&mut con, &keys).await?);
            }
        }
        Ok(total)
    }

    /// Reads one shard's `stats` hash (an unsharded namespace's only one).
    pub async fn read_one(con: &mut Conn, keys: &Keys) -> Result<Counters, Error> {
        let map: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(keys.stats())
            .query_async(con)
            .await?;
        Ok(Counters::from_fields(|k| map.get(k).copied().unwrap_or(0)))
    }

    /// Adds `other` to these counters, field by field.
    pub fn add(&mut self, other: &Counters) {
        self.generated += other.generated;
        self.processed += other.processed;
        self.errors += other.errors;
        self.duplicates += other.duplicates;
        self.runs += other.runs;
        self.reclaimed += other.reclaimed;
        self.refused += other.refused;
        self.bad += other.bad;
        self.poisoned += other.poisoned;
        self.timeouts += other.timeouts;
        self.handed_back += other.handed_back;
    }
}

/// How long a process's histograms outlive its last write: a day, for `sim` and people to read.
pub const HISTOGRAMS_TTL_MS: u64 = 86_400_000;

/// Highest latency a histogram tracks: one hour, in µs (larger values are clamped).
const LATENCY_US_MAX: u64 = 3_600_000_000;

/// A latency histogram in microseconds, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("static bounds are valid")
}

/// The latencies one process has measured.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// Generation → outcome committed, µs (Redis clock).
    pub end_to_end_us: Histogram<u64>,
    /// Generation → fetched by a handler, µs (Redis clock).
    pub queue_wait_us: Histogram<u64>,
    /// End-to-end minus the message's own eventHandler delay, µs: what the queue costs.
    pub overhead_us: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            end_to_end_us: latency_histogram(),
            queue_wait_us: latency_histogram(),
            overhead_us: latency_histogram(),
        }
    }
}

/// Records `value_us` into `h`, clamped into range (a clock step must not drop a sample).
pub fn record(h: &mut Histogram<u64>, value_us: u64) {
    h.saturating_record(value_us.clamp(1, LATENCY_US_MAX));
}

/// Records `value_us` `count` times (the messages of one batch share a wait), clamped the same way.
pub fn record_n(h: &mut Histogram<u64>, value_us: u64, count: u64) {
    h.saturating_record_n(value_us.clamp(1, LATENCY_US_MAX), count);
}

impl Latencies {
    /// Writes the histograms to `{ns}:hist:<instance>` (overwriting: each is cumulative), to
    /// expire [`HISTOGRAMS_TTL_MS`] after this process last wrote them: one key per process ever
    /// started would otherwise pile up forever.
    pub async fn publish(&self, con: &mut Conn, keys: &Keys, instance: &str) -> Result<(), Error> {
        let e2e = serialize(&self.end_to_end_us);
        let wait = serialize(&self.queue_wait_us);
        let overhead = serialize(&self.overhead_us);
        let key = keys.histograms(instance);
        redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("e2e_us")
            .arg(e2e)
            .arg("wait_us")
            .arg(wait)
            .arg("overhead_us")
            .arg(overhead)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(HISTOGRAMS_TTL_MS)
            .ignore()
            .query_async::<()>(con)
            .await?;
        Ok(())
    }

    /// Reads and merges every instance's histograms in the namespace (bounded SCAN).
    pub async fn collect(con: &mut Conn, keys: &Keys) -> Result<Latencies, Error> {
        let mut all = Latencies::default();
        let mut cursor: u64 = 0;
        for _ in 0..10_000 {
            let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(keys.histograms_pattern())
                .arg("COUNT")
                .arg(1000)
                .query_async(con)
                .await?;
            for key in found {
                let fields: HashMap<String, Vec<u8>> =
                    redis::cmd("HGETALL").arg(&key).query_async(con).await?;
                for (name, target) in [
                    ("e2e_us", &mut all.end_to_end_us),
                    ("wait_us", &mut all.queue_wait_us),
                    ("overhead_us", &mut all.overhead_us),
                ] {
                    if let Some(h) = fields.get(name).and_then(|b| deserialize(b)) {
                        // Same bounds on both sides, so add cannot fail; ignore defensively.
                        let _ = target.add(&h);
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        Ok(all)
    }
}

fn serialize(h: &Histogram<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut out)
        .expect("serializing into a Vec cannot fail");
    out
}

fn deserialize(bytes: &[u8]) -> Option<Histogram<u64>> {
    Deserializer::new()
        .deserialize(&mut std::io::Cursor::new(bytes))
        .ok()
}
