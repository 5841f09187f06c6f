//! The optional Prometheus `/metrics` endpoint (`app --metrics-addr HOST:PORT`).
//!
//! Instrumented code calls the small functions below. Each is one `OnceLock` load and, only when
//! the exporter was installed, an atomic add on a pre-registered handle: without `--metrics-addr`
//! nothing is registered and nothing is recorded. Counters are bumped once per batch (the caller
//! passes the batch's count); latencies are recorded per message into the exporter's lock-free
//! buckets, which costs about what the per-message HdrHistogram record next to it already costs.
//!
//! These counters are this process's own. The group's totals are the Redis counters that
//! `app status` shows; a Prometheus `sum()` over all copies gives the same numbers, minus whatever
//! copies that have since exited counted.

use crate::error::Error;
use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::PrometheusBuilder;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::OnceLock;

/// Messages this process generated (ids handed out while it held the lease).
pub const GENERATED: &str = "leaderq_generated_total";
/// Successful outcomes this process recorded.
pub const PROCESSED: &str = "leaderq_processed_total";
/// Failed outcomes (eventHandler errors and unparseable messages) this process recorded.
pub const ERRORS: &str = "leaderq_errors_total";
/// Messages this process gave back from dead handlers (to the retry set or a suspect list).
pub const RECLAIMED: &str = "leaderq_reclaimed_total";
/// Messages this process found in its own in-flight set without holding them (a fetch reply was
/// lost) and adopted, so they run instead of waiting in Redis.
pub const ADOPTED: &str = "leaderq_adopted_total";
/// Messages fetched by this process and not yet committed.
pub const IN_FLIGHT: &str = "leaderq_in_flight";
/// 1 while this process is the generator, 0 while it handles.
pub const ROLE: &str = "leaderq_role_generator";
/// The fencing epoch of the lease this process holds; 0 when it holds none.
pub const EPOCH: &str = "leaderq_epoch";
/// How long eventHandler took per message, seconds.
pub const HANDLER_SECONDS: &str = "leaderq_handler_seconds";
/// Generation to committed outcome per message, seconds (Redis clock).
pub const END_TO_END_SECONDS: &str = "leaderq_end_to_end_seconds";

/// Histogram bucket bounds, seconds: from 1 ms (a fast commit) to a minute (a long backlog).
const BUCKETS_SECONDS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Handles registered once at install, so the hot path never looks a name up.
struct Handles {
    generated: Counter,
    processed: Counter,
    errors: Counter,
    reclaimed: Counter,
    adopted: Counter,
    in_flight: Gauge,
    role: Gauge,
    epoch: Gauge,
    handler_seconds: Histogram,
    end_to_end_seconds: Histogram,
}

/// Set by [`install`]; empty (and every recording function a no-op) without `--metrics-addr`.
static HANDLES: OnceLock<Handles> = OnceLock::new();

/// Resolves `addr` (`HOST:PORT`), binds the `/metrics` listener on the current tokio runtime and
/// installs the global recorder. A bad or busy address is an [`Error::Config`], so the process
/// exits with code 2 before it joins the group rather than running unobserved.
pub fn install(addr: &str) -> Result<SocketAddr, Error> {
    let bad = |why: String| Error::Config(format!("--metrics-addr {addr:?}: {why}"));
    let socket = addr
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("resolves to no address".into()))?;
    PrometheusBuilder::new()
        .with_http_listener(socket)
        .set_buckets(&BUCKETS_SECONDS)
        .and_then(|b| b.install())
        .map_err(|e| bad(e.to_string()))?;
    describe();
    let handles = Handles {
        generated: counter!(GENERATED),
        processed: counter!(PROCESSED),
        errors: counter!(ERRORS),
        reclaimed: counter!(RECLAIMED),
        adopted: counter!(ADOPTED),
        in_flight: gauge!(IN_FLIGHT),
        role: gauge!(ROLE),
        epoch: gauge!(EPOCH),
        handler_seconds: histogram!(HANDLER_SECONDS),
        end_to_end_seconds: histogram!(END_TO_END_SECONDS),
    };
    // Touch every series so a scrape lists all of them from the start, zeros included.
    handles.generated.increment(0);
    handles.processed.increment(0);
    handles.errors.increment(0);
    handles.reclaimed.increment(0);
    handles.adopted.increment(0);
    handles.in_flight.set(0.0);
    handles.role.set(0.0);
    handles.epoch.set(0.0);
    if HANDLES.set(handles).is_err() {
        return Err(bad("the exporter is already installed".into()));
    }
    tracing::info!(%socket, "serving Prometheus metrics at /metrics");
    Ok(socket)
}

fn describe() {
    describe_counter!(
        GENERATED,
        Unit::Count,
        "Messages generated by this process."
    );
    describe_counter!(
        PROCESSED,
        Unit::Count,
        "Successful outcomes recorded by this process."
    );
    describe_counter!(
        ERRORS,
        Unit::Count,
        "Failed outcomes recorded by this process."
    );
    describe_counter!(
        RECLAIMED,
        Unit::Count,
        "Messages this process re-queued from dead handlers."
    );
    describe_counter!(
        ADOPTED,
        Unit::Count,
        "Messages found in this process's own in-flight set after a lost fetch reply, and adopted."
    );
    describe_gauge!(
        IN_FLIGHT,
        Unit::Count,
        "Messages fetched and not yet committed."
    );
    describe_gauge!(
        ROLE,
        "1 while this process is the generator, 0 while it handles."
    );
    describe_gauge!(
        EPOCH,
        "Fencing epoch of the lease this process holds (0: none)."
    );
    describe_histogram!(
        HANDLER_SECONDS,
        Unit::Seconds,
        "eventHandler run time per message."
    );
    describe_histogram!(
        END_TO_END_SECONDS,
        Unit::Seconds,
        "Generation to committed outcome per message (Redis clock)."
    );
}

/// `count` messages generated (one call per generate batch).
pub fn generated(count: u64) {
    if let Some(h) = HANDLES.get() {
        h.generated.increment(count);
    }
}

/// One commit's recorded outcomes (one call per commit batch).
pub fn committed(processed: u64, errors: u64) {
    if let Some(h) = HANDLES.get() {
        h.processed.increment(processed);
        h.errors.increment(errors);
    }
}

/// `count` messages re-queued by one reclaim.
pub fn reclaimed(count: u64) {
    if let Some(h) = HANDLES.get() {
        h.reclaimed.increment(count);
    }
}

/// `count` messages adopted by one reconciliation.
pub fn adopted(count: u64) {
    if let Some(h) = HANDLES.get() {
        h.adopted.increment(count);
    }
}

/// The in-flight gauge (set from the heartbeat loop, not the hot path).
pub fn in_flight(count: u64) {
    if let Some(h) = HANDLES.get() {
        h.in_flight.set(count as f64);
    }
}

/// The role and epoch gauges: `Some(epoch)` while this copy is the generator under `epoch`,
/// `None` while it handles. Plain values, so that the metrics module does not depend on the node.
pub fn role(generator_epoch: Option<u64>) {
    if let Some(h) = HANDLES.get() {
        let (generator, epoch) = match generator_epoch {
            Some(epoch) => (1.0, epoch as f64),
            None => (0.0, 0.0),
        };
        h.role.set(generator);
        h.epoch.set(epoch);
    }
}

/// One message's eventHandler run time, as measured (the drawn delay plus timer lateness).
pub fn handler_time(elapsed: std::time::Duration) {
    if let Some(h) = HANDLES.get() {
        h.handler_seconds.record(elapsed.as_secs_f64());
    }
}

/// One message's generation-to-commit latency.
pub fn end_to_end_us(latency_us: u64) {
    if let Some(h) = HANDLES.get() {
        h.end_to_end_seconds.record(latency_us as f64 / 1e6);
    }
}

/// True when [`install`] ran: callers skip work that only feeds the exporter.
pub fn enabled() -> bool {
    HANDLES.get().is_some()
}
