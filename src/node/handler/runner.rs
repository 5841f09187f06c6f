//! The runner: the [`Handler`] on every admitted message, all of them concurrently in one task,
//! each under the handler timeout, each outcome passed on to the committer as it finishes.
//!
//! Two ways to run one: a future per message (`handle`), or, for a handler that can say what its
//! handling will be ([`Handler::planned`]: a wait and a result, like the task's `eventHandler`),
//! an entry in a bucket of due times (`waits::Waits`, 100 µs wide), which costs a vector slot
//! instead of a future and a timer of its own.
//!
//! Outcomes go to the committer in vectors (all that finished together), not one send each.

use super::waits::Waits;
use super::{Done, ToCommitter, ToRunner, Verdict};
use crate::error::Error;
use crate::work::Handler;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Runs `handler` on every message that arrives on `work_rx` (a bad payload passes straight
/// through with its verdict), and sends the outcomes on `done_tx`. Ends when `work_rx` is closed
/// and every message has its outcome (the drain), or when the committer is gone.
///
/// [`ToRunner::Abandon`] drops every message not yet finished (their handlers are cancelled, no
/// outcome is made) and tells the committer how many, after every outcome made before.
///
/// The number running at once is bounded by the in-flight permits the fetcher took for them.
pub(super) async fn run<H: Handler>(
    handler: Arc<H>,
    timeout: Duration,
    mut work_rx: mpsc::UnboundedReceiver<ToRunner>,
    done_tx: mpsc::UnboundedSender<ToCommitter>,
    mut run_log: Option<std::fs::File>,
) -> Result<(), Error> {
    let mut running = FuturesUnordered::new();
    // Planned messages waiting out their handling; their verdict and handling time are set.
    let mut waiting: Waits<Done> = Waits::new();
    // Armed for the earliest bucket of `waiting` (far off while nothing waits).
    let far = || Instant::now() + Duration::from_secs(86_400);
    let wake = tokio::time::sleep_until(far());
    tokio::pin!(wake);
    let mut open = true;
    while open || !running.is_empty() || !waiting.is_empty() {
        let mut out = Vec::new();
        // The ids of `out` whose handling ran here (not a bad payload passing through).
        let mut ran: Vec<u64> = Vec::new();
        tokio::select! {
            input = work_rx.recv(), if open => {
                let batch = match input {
                    None => { open = false; continue }
                    Some(ToRunner::Work(batch)) => batch,
                    Some(ToRunner::Abandon(ack)) => {
                        let count = waiting.clear() + running.len();
                        running = FuturesUnordered::new();
                        wake.as_mut().reset(far());
                        if done_tx.send(ToCommitter::Abandoned { count, ack }).is_err() {
                            return Ok(());
                        }
                        continue;
                    }
                };
                let earliest = waiting.next_due();
                let started = Instant::now();
                for mut d in batch {
                    if d.verdict != Verdict::Ok {
                        out.push(d);
                        continue;
                    }
                    match handler.planned(&d.message()) {
                        Some(plan) => {
                            d.verdict = if plan.wait >= timeout {
                                Verdict::TimedOut
                            } else {
                                match plan.result {
                                    Ok(()) => Verdict::Ok,
                                    Err(failure) => Verdict::Failed(failure.stored_reason()),
                                }
                            };
                            let wait = plan.wait.min(timeout);
                            d.handled_us = wait.as_micros() as u64;
                            crate::admin::metrics::handler_time(wait);
                            if wait.is_zero() {
                                ran.push(d.envelope.id);
                                out.push(d);
                            } else {
                                waiting.insert(started + wait, d);
                            }
                        }
                        None => running.push(handle_one(handler.clone(), d, timeout)),
                    }
                }
                if waiting.next_due() != earliest {
                    wake.as_mut().reset(waiting.next_due().unwrap_or_else(far));
                }
            }
            () = &mut wake, if !waiting.is_empty() => {
                // A handling's time is its planned wait plus how late the timer woke us past its
                // bucket's due time (tokio's timer ticks in milliseconds): the time it took as
                // seen from here, as a handler's own future would have taken it.
                let now = Instant::now();
                waiting.take_due(now, &mut out, |due, items| {
                    let late_us = now.saturating_duration_since(due).as_micros() as u64;
                    for d in items {
                        d.handled_us += late_us;
                        ran.push(d.envelope.id);
                    }
                });
                wake.as_mut().reset(waiting.next_due().unwrap_or_else(far));
            }
            Some(d) = running.next(), if !running.is_empty() => {
                ran.push(d.envelope.id);
                out.push(d);
                while let Some(Some(d)) = running.next().now_or_never() {
                    ran.push(d.envelope.id);
                    out.push(d);
                }
            }
        }
        if let (Some(file), false) = (run_log.as_mut(), ran.is_empty()) {
            log_runs(file, &ran)?;
        }
        if !out.is_empty() && done_tx.send(ToCommitter::Done(out)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Appends `ids` (handlings that ran to their end, or to the timeout) to the run log, in one
/// write, before their outcomes go to the committer: every recorded outcome's run is in the log
/// whatever happens to the process after ([`super::HandlerConfig::run_log`]).
fn log_runs(file: &mut std::fs::File, ids: &[u64]) -> Result<(), Error> {
    use std::io::Write;
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    file.write_all(&bytes)
        .map_err(|e| Error::Config(format!("writing the run log: {e}")))
}

/// Runs the handler on one message and sets its verdict: the handler's own, unless it ran for
/// `timeout` or longer (then [`Verdict::TimedOut`], whether it was abandoned at the deadline or
/// finished late), or panicked (a failure naming the panic; the copy goes on).
///
/// The clock starts when this future is first polled, just before the handler's is: so a
/// handler that takes `timeout` or more always times out, whatever the scheduling, and only one
/// that finishes within a scheduling delay of the deadline can be judged late.
async fn handle_one<H: Handler>(handler: Arc<H>, mut d: Done, timeout: Duration) -> Done {
    let message = d.message();
    let started = Instant::now();
    let handled = AssertUnwindSafe(handler.handle(message)).catch_unwind();
    let result = tokio::time::timeout(timeout, handled).await;
    let took = started.elapsed();
    d.verdict = match result {
        _ if took >= timeout => Verdict::TimedOut,
        Err(_elapsed) => Verdict::TimedOut,
        Ok(Ok(Ok(()))) => Verdict::Ok,
        Ok(Ok(Err(failure))) => Verdict::Failed(failure.stored_reason()),
        Ok(Err(panic)) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string payload".into());
            tracing::error!(id = d.envelope.id, panic = %what, "the handler panicked; the message fails");
            Verdict::Failed(
                crate::work::Failure::new(format!("handler panicked: {what}")).stored_reason(),
            )
        }
    };
    let took = took.min(timeout);
    d.handled_us = took.as_micros() as u64;
    crate::admin::metrics::handler_time(took);
    d
}
