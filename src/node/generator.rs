//! The generator: `getMessage()` in batches, while and only while this process holds the lease.
//! What goes into each message comes from the [`Source`]; ids, fencing and limits are the
//! script's (generate.lua).

use crate::conn::Conn;
use crate::error::Error;
use crate::node::incarnation::Incarnation;
use crate::node::lease::{self, Lease};
use crate::protocol::keys::Keys;
use crate::protocol::scripts;
use crate::work::{Batch, Source, DATA_MAX_BYTES};
use std::time::Duration;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// What one call of generate.lua did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generated {
    /// Ids `first_id .. first_id + count` were appended at Redis time `time_us`.
    Batch {
        /// The first id generated.
        first_id: u64,
        /// How many.
        count: u64,
        /// Redis `TIME` of the batch, µs.
        time_us: u64,
    },
    /// The queue holds `queue_max` messages: wait for the handlers.
    QueueFull,
    /// `max_messages` were generated: nothing left to do.
    Finished,
    /// Every id the outcome bitmaps can index (2^32) was generated: a fresh namespace is needed.
    IdSpaceUsedUp,
    /// The lease is not ours any more: step down.
    Fenced,
    /// Sharded: a range allocated earlier and not seen appended (a lost reply, a predecessor's)
    /// was appended instead of allocating: generate again at once.
    PendingAppended,
    /// The data given was for other ids: the next id is `next_id` (ask the source again).
    Misaligned {
        /// The id the next message gets.
        next_id: u64,
    },
}

/// The data for the messages that begin at `first_id`, one entry per message.
#[derive(Debug, Clone, Copy)]
pub struct Data<'a> {
    /// The id the first entry is for.
    pub first_id: u64,
    /// One payload per message, in id order.
    pub payloads: &'a [Vec<u8>],
}

/// Runs generate.lua once: at most `batch_max` messages (and at most one per entry of `data`,
/// when given), only under `lease`, and only while Redis still holds `incarnation` and a next id
/// no lower than any this copy has seen.
pub async fn generate(
    con: &mut Conn,
    keys: &Keys,
    lease: &Lease,
    batch_max: u64,
    queue_max: u64,
    incarnation: &Incarnation,
    data: Option<Data<'_>>,
) -> Result<Generated, Error> {
    let mut call = scripts::GENERATE.prepare_invoke();
    call.key(keys.lease())
        .key(keys.next_id())
        .key(keys.max())
        .key(keys.queue())
        .key(keys.epochs())
        .key(keys.stats())
        .key(keys.wake())
        .key(keys.incarnation())
        .key(keys.errors())
        .key(keys.writes())
        .arg(&lease.value)
        .arg(lease.epoch)
        .arg(batch_max)
        .arg(queue_max)
        .arg(incarnation.guard())
        .arg(incarnation.max_next_id())
        .arg(crate::protocol::message::ID_MAX + 1);
    if let Some(data) = data {
        call.arg(data.first_id);
        for payload in data.payloads {
            call.arg(&payload[..]);
        }
    }
    let (status, first_id, count, time_us): (i64, u64, u64, u64) = incarnation
        .invoke(&call, con)
        .await
        .map_err(|e| match e.code() {
            Some("ERR") if e.to_string().contains("generate:") => Error::Corrupt(e.to_string()),
            _ => Error::from(e),
        })?;
    if status > 0 {
        incarnation.saw_next_id(first_id + count);
    }
    Ok(match status {
        1 => Generated::Batch {
            first_id,
            count,
            time_us,
        },
        2 => Generated::QueueFull,
        3 => Generated::Finished,
        4 => Generated::IdSpaceUsedUp,
        5 => Generated::Misaligned { next_id: first_id },
        _ => Generated::Fenced,
    })
}

/// How the generator knows when and how much to generate.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Pause between messages (the task's 500 ms); 0 = as fast as the handlers take them.
    pub interval_ms: u64,
    /// Messages per script call when `interval_ms` is 0.
    pub batch_max: u64,
    /// Backpressure: generate only while the queue holds fewer messages.
    pub queue_max: u64,
    /// Lease TTL; renewed every third of it.
    pub lease_ms: u64,
}

/// Why [`lead`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeadEnd {
    /// `stop` fired; the lease was released (or found already gone).
    Stopped,
    /// The lease was lost (fenced, not renewed in time): go back to handling.
    Lost,
}

/// Generates while `lease` holds, renewing it every `lease_ms / 3`.
///
/// Correctness does not depend on this loop noticing a lost lease quickly: generate.lua checks
/// the lease on every call. Noticing only matters so the process goes back to handling.
#[allow(clippy::too_many_arguments)]
pub async fn lead<S: Source>(
    con: &mut Conn,
    keys: &Keys,
    lease: &Lease,
    config: &GeneratorConfig,
    incarnation: &Incarnation,
    source: &S,
    mut sharded: Option<&mut crate::node::sharded::ShardedGen>,
    stop: &CancellationToken,
) -> Result<LeadEnd, Error> {
    if let Some(g) = sharded.as_deref_mut() {
        g.reset();
    }
    let renew_every = Duration::from_millis((config.lease_ms / 3).max(1));
    let lease_ttl = Duration::from_millis(config.lease_ms);
    let interval = Duration::from_millis(config.interval_ms);
    let batch = if config.interval_ms == 0 {
        config.batch_max
    } else {
        1
    };
    let mut renewed_at = Instant::now();
    let mut next_renew = renewed_at + renew_every;
    let mut next_generate = Instant::now();
    let mut failures = 0u32;
    // The id the source is asked for next: a guess until generate.lua says (a wrong one costs one
    // round trip: the script names the right one and generates nothing).
    let mut next_id_guess = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                match lease::release(con, keys, lease).await {
                    Ok(released) => tracing::info!(epoch = lease.epoch, released, "generator stopped"),
                    Err(e) => tracing::warn!(epoch = lease.epoch, error = %e, "could not release the lease; it expires by itself"),
                }
                return Ok(LeadEnd::Stopped);
            }
            _ = sleep_until(next_renew) => {
                match lease::renew(con, keys, lease, config.lease_ms, incarnation).await {
                    Ok(true) => renewed_at = Instant::now(),
                    Ok(false) => {
                        tracing::warn!(epoch = lease.epoch, "lease lost; stepping down");
                        return Ok(LeadEnd::Lost);
                    }
                    Err(e) if e.stops_the_copy() => return Err(e),
                    Err(e) if renewed_at.elapsed() >= lease_ttl => {
                        tracing::warn!(epoch = lease.epoch, error = %e, "lease not renewed within its TTL; stepping down");
                        return Ok(LeadEnd::Lost);
                    }
                    Err(e) => tracing::warn!(epoch = lease.epoch, error = %e, "lease renewal failed; retrying"),
                }
                next_renew = Instant::now() + renew_every;
            }
            _ = sleep_until(next_generate) => {
                let now = Instant::now();
                let asked = tokio::time::timeout(renew_every, source.batch(next_id_guess, batch as usize)).await;
                let payloads = match asked {
                    Ok(Ok(Batch::Ids)) => None,
                    Ok(Ok(Batch::Payloads(list))) if list.is_empty() => {
                        // Nothing to generate now: ask again after the interval.
                        next_generate = now + interval.max(Duration::from_millis(100));
                        continue;
                    }
                    Ok(Ok(Batch::Payloads(mut list))) => {
                        list.truncate(batch as usize);
                        if let Some((i, big)) = list.iter().enumerate().find(|(_, p)| p.len() > DATA_MAX_BYTES) {
                            return Err(Error::Source(format!(
                                "it gave message {} {} bytes of data; the most one message may carry is {DATA_MAX_BYTES}",
                                next_id_guess + i as u64,
                                big.len()
                            )));
                        }
                        Some(list)
                    }
                    Ok(Err(failure)) => {
                        failures += 1;
                        tracing::warn!(reason = %failure, failures, "the message source failed; asking again");
                        next_generate = now + Duration::from_millis(10 * u64::from(failures.min(50)));
                        continue;
                    }
                    Err(_) => {
                        failures += 1;
                        tracing::warn!(waited_ms = renew_every.as_millis() as u64, failures, "the message source did not answer within a third of the lease; asking again");
                        next_generate = Instant::now();
                        continue;
                    }
                };
                let data = payloads.as_deref().map(|payloads| Data { first_id: next_id_guess, payloads });
                let made = match (sharded.as_deref_mut(), data) {
                    (Some(_), Some(_)) => Err(Error::Config(
                        "a namespace spread over shards (--shards above 1) takes messages without data only; this source gave data".into(),
                    )),
                    (Some(g), None) => g.step(con, keys, lease, incarnation, batch, config.queue_max).await,
                    (None, data) => generate(con, keys, lease, batch, config.queue_max, incarnation, data).await,
                };
                next_generate = match made {
                    Ok(Generated::Batch { first_id, count, .. }) => {
                        failures = 0;
                        next_id_guess = first_id + count;
                        crate::admin::metrics::generated(count);
                        // Pace from the planned time, but never burst to catch up after a stall.
                        (next_generate + interval).max(now)
                    }
                    Ok(Generated::Misaligned { next_id }) => {
                        next_id_guess = next_id;
                        now
                    }
                    Ok(Generated::PendingAppended) => now,
                    Ok(Generated::QueueFull) => now + Duration::from_millis(1),
                    Ok(Generated::Finished) => now + Duration::from_millis(100),
                    Ok(Generated::IdSpaceUsedUp) => {
                        failures += 1;
                        if failures.is_power_of_two() {
                            tracing::error!("the id space is used up: every id 0..2^32 was generated; nothing more can be generated in this namespace (start a fresh --namespace)");
                        }
                        now + Duration::from_millis(1000)
                    }
                    Ok(Generated::Fenced) => {
                        tracing::warn!(epoch = lease.epoch, "generation fenced: another epoch holds the lease; stepping down");
                        return Ok(LeadEnd::Lost);
                    }
                    Err(e) if e.stops_the_copy() => return Err(e),
                    Err(e @ Error::Config(_)) => return Err(e),
                    Err(Error::Corrupt(msg)) => {
                        // Never reset the counter: ids would repeat. Keep the lease (so no one
                        // else trips over the same data in a loop) and say so, loudly and rarely.
                        failures += 1;
                        if failures.is_power_of_two() {
                            tracing::error!(error = %msg, "cannot generate: fix or delete the key named above");
                        }
                        now + Duration::from_millis(500)
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, failures, "generate failed; retrying");
                        now + Duration::from_millis(10 * u64::from(failures.min(50)))
                    }
                };
            }
        }
    }
}
