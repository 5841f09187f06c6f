//! The commit side of a handler: outcomes in batches through commit.lua, retried while Redis is
//! away, then released from what the handler holds.

use super::{release, Done, HandlerConfig, HandlerShared, Holdings, ToCommitter, Verdict};
use crate::conn::Conn;
use crate::error::Error;
use crate::node::incarnation::Incarnation;
use crate::protocol::keys::Keys;
use crate::protocol::scripts;
use crate::stats;
use crate::work::HANDLER_ERROR;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

/// The outcomes of one batch record's messages in one commit call, as commit.lua takes them.
#[derive(Debug, Default)]
struct Group<'a> {
    /// Bitmap of the indexes with an outcome (bit i, MSB first, is message first + i).
    sel: Vec<u8>,
    /// Bitmap of the indexes handled ok.
    oks: Vec<u8>,
    /// The others: index, kind (1 handler error, 2 timeout, 3 error with its reason), reason.
    failed: Vec<(u64, u64, Option<&'a str>)>,
}

/// Sets bit `index` (MSB first) of `bitmap`, growing it as needed; false if it was set already.
fn set_bit(bitmap: &mut Vec<u8>, index: u64) -> bool {
    let byte = (index / 8) as usize;
    if bitmap.len() <= byte {
        bitmap.resize(byte + 1, 0);
    }
    let bit = 0x80 >> (index % 8);
    let fresh = bitmap[byte] & bit == 0;
    bitmap[byte] |= bit;
    fresh
}

/// Runs commit.lua for `items`, which must all have the same owner.
/// Returns the Redis time of the commit (µs) and the indexes of the items it refused.
///
/// The messages of batches go as one group per batch record (bitmaps of the indexes with an
/// outcome and of those ok, and a 3-byte token per failure; see commit.lua), the payloads as one
/// triple each.
pub async fn commit(
    con: &mut Conn,
    keys: &Keys,
    items: &[Done],
    incarnation: &Incarnation,
) -> Result<(u64, Vec<usize>), Error> {
    let Some(first) = items.first() else {
        return Ok((0, Vec::new()));
    };
    // The items of the triples, in the order commit.lua numbers them.
    let mut singles: Vec<usize> = Vec::new();
    let mut groups: BTreeMap<u64, Group> = BTreeMap::new();
    // A second outcome for the same message in one call (never made by a handler): refused here,
    // as commit.lua would refuse it after the first cleared the mask bit.
    let mut repeated: Vec<usize> = Vec::new();
    for (i, d) in items.iter().enumerate() {
        debug_assert!(Arc::ptr_eq(&d.owner, &first.owner) || d.owner == first.owner);
        let Some(batch_first) = d.batch else { continue };
        let Group { sel, oks, failed } = groups.entry(batch_first).or_default();
        let index = d.envelope.id - batch_first;
        if !set_bit(sel, index) {
            repeated.push(i);
            continue;
        }
        failed.push(match &d.verdict {
            Verdict::Ok => {
                set_bit(oks, index);
                continue;
            }
            Verdict::Failed(reason) if reason == HANDLER_ERROR || reason.is_empty() => {
                (index, 1, None)
            }
            Verdict::TimedOut => (index, 2, None),
            Verdict::Failed(reason) => (index, 3, Some(reason.as_str())),
            // A batch message is made by the handler from its record: never unparseable.
            Verdict::Bad(_) => (index, 1, None),
        });
    }
    // Per group: the failures' tokens in index order, and the reasons of the kind-3 ones in the
    // same order.
    let mut packed: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(groups.len());
    for group in groups.values_mut() {
        group.failed.sort_unstable_by_key(|f| f.0);
        let (mut errs, mut reasons) = (Vec::with_capacity(group.failed.len() * 3), Vec::new());
        for &(index, kind, reason) in &group.failed {
            errs.extend_from_slice(&((index << 2) | kind).to_be_bytes()[5..]);
            if let Some(reason) = reason {
                if !reasons.is_empty() {
                    reasons.push(b'\n');
                }
                // One line each (stored_reason makes it so); a stray newline would shift the
                // reasons of every later token.
                reasons.extend(reason.bytes().map(|b| if b == b'\n' { b' ' } else { b }));
            }
        }
        packed.push((errs, reasons));
    }
    let mut call = scripts::COMMIT.prepare_invoke();
    call.key(keys.inflight(&first.owner))
        .key(keys.done())
        .key(keys.ok())
        .key(keys.errors())
        .key(keys.stats())
        .key(keys.incarnation())
        .key(keys.batches(&first.owner))
        .key(keys.writes());
    for i in 1..=6 {
        call.key(keys.scratch(i));
    }
    call.arg(incarnation.guard()).arg(groups.len());
    for ((batch_first, group), (errs, reasons)) in groups.iter().zip(&packed) {
        call.arg(batch_first)
            .arg(&group.sel[..])
            .arg(&group.oks[..])
            .arg(&errs[..])
            .arg(&reasons[..]);
    }
    for (i, d) in items.iter().enumerate() {
        if d.batch.is_some() {
            continue;
        }
        singles.push(i);
        match &d.verdict {
            Verdict::Ok => call.arg("o").arg(&d.payload[..]).arg(d.envelope.id),
            Verdict::Failed(reason) if reason == HANDLER_ERROR => {
                call.arg("e").arg(&d.payload[..]).arg(d.envelope.id)
            }
            Verdict::Failed(reason) => call
                .arg("e")
                .arg(&d.payload[..])
                .arg(format!("{}\t{reason}", d.envelope.id)),
            Verdict::TimedOut => call.arg("t").arg(&d.payload[..]).arg(d.envelope.id),
            Verdict::Bad(reason) => call.arg("b").arg(&d.payload[..]).arg(reason.as_str()),
        };
    }
    let reply: Vec<u64> = incarnation.invoke(&call, con).await?;
    let time_us = reply.first().copied().unwrap_or(0);
    let ids = reply.get(1).copied().unwrap_or(0) as usize;
    let refused_ids: HashSet<u64> = reply.iter().skip(2).take(ids).copied().collect();
    let mut refused: Vec<usize> = reply
        .iter()
        .skip(2 + ids)
        .filter_map(|&n| singles.get((n as usize).checked_sub(1)?).copied())
        .collect();
    refused.append(&mut repeated);
    if !refused_ids.is_empty() {
        refused.extend(
            items
                .iter()
                .enumerate()
                .filter(|(_, d)| d.batch.is_some() && refused_ids.contains(&d.envelope.id))
                .map(|(i, _)| i),
        );
    }
    refused.sort_unstable();
    refused.dedup();
    Ok((time_us, refused))
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn commit_loop(
    mut con: Conn,
    keys: &Keys,
    incarnation: &Incarnation,
    config: &HandlerConfig,
    permits: &Arc<Semaphore>,
    shared: &HandlerShared,
    holdings: &Mutex<Holdings>,
    commit_gate: &tokio::sync::Mutex<()>,
    mut done_rx: mpsc::UnboundedReceiver<ToCommitter>,
) -> Result<(), Error> {
    let mut batch: Vec<Done> = Vec::with_capacity(config.commit_max);
    // Outcomes received beyond `commit_max`: the first of the next commit.
    let mut carry: Vec<Done> = Vec::new();
    // Messages the runner abandoned, and whom to tell once everything before them is committed:
    // nothing more is read until then, so "before" is exact.
    let mut abandoned: Option<(usize, tokio::sync::oneshot::Sender<()>)> = None;
    let window = Duration::from_millis(config.commit_window_ms);
    let mut rate = OutcomeRate::default();
    loop {
        if carry.is_empty() && abandoned.is_none() {
            match done_rx.recv().await {
                Some(ToCommitter::Done(chunk)) => carry = chunk,
                Some(ToCommitter::Abandoned { count, ack }) => abandoned = Some((count, ack)),
                None => break,
            }
        }
        let opened = tokio::time::Instant::now();
        let mut closed = false;
        take_upto(&mut batch, &mut carry, config.commit_max);
        while batch.len() < config.commit_max && abandoned.is_none() {
            match done_rx.try_recv() {
                Ok(ToCommitter::Done(chunk)) => {
                    carry = chunk;
                    take_upto(&mut batch, &mut carry, config.commit_max);
                }
                Ok(ToCommitter::Abandoned { count, ack }) => abandoned = Some((count, ack)),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        // Under load, gather for up to one window: a commit's cost in Redis is mostly per batch
        // group, so more outcomes per call means fewer groups per outcome.
        if !closed
            && abandoned.is_none()
            && rate.per_s * window.as_secs_f64() >= super::WINDOW_MIN_OUTCOMES
        {
            // One timer for the whole window, not one per outcome received.
            let closes = tokio::time::sleep_until(opened + window);
            tokio::pin!(closes);
            while batch.len() < config.commit_max && abandoned.is_none() {
                tokio::select! {
                    chunk = done_rx.recv() => match chunk {
                        Some(ToCommitter::Done(chunk)) => {
                            carry = chunk;
                            take_upto(&mut batch, &mut carry, config.commit_max);
                        }
                        Some(ToCommitter::Abandoned { count, ack }) => abandoned = Some((count, ack)),
                        None => break,
                    },
                    _ = &mut closes => break,
                }
            }
        }
        if batch.is_empty() {
            // Only an abandonment can leave nothing to commit: once every outcome before it is
            // committed, its messages' permits come back and the fetcher hears so.
            if carry.is_empty() {
                if let Some((count, ack)) = abandoned.take() {
                    shared.in_flight.fetch_sub(count as u64, Ordering::Relaxed);
                    permits.add_permits(count);
                    let _ = ack.send(());
                }
            }
            continue;
        }
        rate.observe(batch.len());
        // One owner per process (`<instance>.0`), so the whole batch is one commit.
        let gate = commit_gate.lock().await;
        let (time_us, refused) =
            commit_with_retry(&mut con, keys, incarnation, config, &batch).await?;
        if !refused.is_empty() {
            tracing::warn!(refused = refused.len(), "outcomes refused: those messages were reclaimed while we held them and are handled elsewhere");
        }
        let mut lat = shared.latencies.lock().expect("latency lock poisoned");
        let mut refused = refused.into_iter().peekable();
        let (mut processed, mut errors) = (0, 0);
        for (i, d) in batch.iter().enumerate() {
            if refused.peek() == Some(&i) {
                refused.next();
                continue;
            }
            match d.verdict {
                Verdict::Ok => processed += 1,
                Verdict::Failed(_) | Verdict::TimedOut => errors += 1,
                Verdict::Bad(_) => continue,
            }
            let latency_us = time_us.saturating_sub(d.envelope.generated_us);
            stats::record(&mut lat.end_to_end_us, latency_us);
            let overhead_us = latency_us.saturating_sub(d.handled_us);
            stats::record(&mut lat.overhead_us, overhead_us);
            crate::admin::metrics::end_to_end_us(latency_us);
        }
        drop(lat);
        crate::admin::metrics::committed(processed, errors);
        shared
            .in_flight
            .fetch_sub(batch.len() as u64, Ordering::Relaxed);
        release(&batch, shared, holdings);
        drop(gate);
        permits.add_permits(batch.len());
        batch.clear();
    }
    Ok(())
}

/// Reads a run log ([`super::HandlerConfig::run_log`]): the ids, one per run; a last record cut
/// short (the process was killed mid-write) is dropped.
pub fn read_run_log(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Moves outcomes from the front of `from` to `batch` until it holds `max` (the rest stay in
/// `from`, in order).
fn take_upto(batch: &mut Vec<Done>, from: &mut Vec<Done>, max: usize) {
    let room = max.saturating_sub(batch.len());
    if from.len() <= room {
        batch.append(from);
    } else {
        batch.extend(from.drain(..room));
    }
}

/// The recent rate of outcomes reaching the committer (an exponentially weighted average over
/// commits), which decides whether waiting out a commit window can pay off.
#[derive(Debug)]
struct OutcomeRate {
    per_s: f64,
    since: tokio::time::Instant,
}

impl Default for OutcomeRate {
    fn default() -> Self {
        OutcomeRate {
            per_s: 0.0,
            since: tokio::time::Instant::now(),
        }
    }
}

impl OutcomeRate {
    /// `n` outcomes were taken for a commit now.
    fn observe(&mut self, n: usize) {
        let now = tokio::time::Instant::now();
        let secs = now.duration_since(self.since).as_secs_f64().max(1e-4);
        self.per_s = 0.7 * self.per_s + 0.3 * (n as f64 / secs);
        self.since = now;
    }
}

/// Commits, retrying while Redis is unreachable or loading (a lost reply is safe to retry: a
/// commit that did land makes the retry's SREM find nothing, so nothing is recorded twice). Any other failure is a
/// bug or corrupt data, and fatal: the process exits, its heartbeat expires, and its messages are
/// reclaimed by the others.
async fn commit_with_retry(
    con: &mut Conn,
    keys: &Keys,
    incarnation: &Incarnation,
    config: &HandlerConfig,
    group: &[Done],
) -> Result<(u64, Vec<usize>), Error> {
    let started = tokio::time::Instant::now();
    let mut failures = 0u32;
    loop {
        match commit(con, keys, group, incarnation).await {
            Ok(r) => return Ok(r),
            Err(e)
                if e.is_transient()
                    && started.elapsed() < Duration::from_millis(config.redis_down_max_ms) =>
            {
                failures += 1;
                tracing::warn!(error = %e, failures, "commit failed; retrying");
                tokio::time::sleep(Duration::from_millis(20 * u64::from(failures.min(50)))).await;
            }
            Err(e) => return Err(e),
        }
    }
}
