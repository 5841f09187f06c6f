//! Criterion benches of leaderq's hot paths, each group against its own throwaway `redis-server`
//! (started by [`RedisServer::start`], killed when the group ends), all reported per message
//! (`Throughput::Elements`), so batch sizes compare directly.
//!
//! - `generate/<batch>_msgs`: one generate.lua call (lease check, `RPUSH` of `batch` payloads,
//!   counter, epoch log). Shows how much batching the generator amortises the round trip by.
//! - `fetch/<count>_msgs`: one fetch.lua call moving `count` messages from the queue into an
//!   in-flight set. The handler's intake cost per message.
//! - `commit/<batch>_msgs`: one commit.lua call recording `batch` outcomes (15% errors, as the
//!   task's `eventHandler` fails). Only the commit is timed; the fetch that fills the in-flight set
//!   and building the items are not. The handler's output cost per message.
//! - `commit_spread/<records>x<per>_of_8000`: one commit.lua call as a handler makes it under
//!   the task's handler at the defaults: outcomes of `per` random indexes in each of `records`
//!   batch records of 8,000 (the outcomes of a batch arrive over a second, so each commit window
//!   carries a slice of many batches). Redis's cost per commit is per record and per outcome.
//! - `pipeline/<n>_msgs`: one lease holder generating N messages (batches of 1,000) while one
//!   handler fetches batches of 1,000 and commits each at once (handler delay 0), on a fresh
//!   database, timed until all N outcomes are recorded. The whole system's Redis + client cost per
//!   message, i.e. the ceiling on throughput when `eventHandler` costs nothing.
//!
//! Setup that is not the measured call (refilling the queue, deleting the in-flight set or error
//! list so memory stays bounded, `FLUSHALL`) is done untimed inside `iter_custom`.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use leaderq::conn::{self, Conn};
use leaderq::node::generator::{self, Generated};
use leaderq::node::handler::{self, Done, Verdict};
use leaderq::node::incarnation::Incarnation;
use leaderq::node::lease::{self, Lease};
use leaderq::outcome;
use leaderq::testkit::procs::RedisServer;
use leaderq::Keys;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// Long enough that the lease never expires during a group.
const LEASE_MS: u64 = 3_600_000;
/// No backpressure in the micro benches: the queue is bounded by deleting it instead.
const QUEUE_UNBOUNDED: u64 = 1 << 40;
/// Messages kept in Redis at most before an untimed `DEL`, so a long run's memory stays bounded.
const KEEP_MAX: u64 = 100_000;
/// Messages per generate call when refilling the queue for the fetch and commit benches.
const REFILL_BATCH: u64 = 10_000;
/// Heartbeat TTL for the bench handlers (long: nothing reclaims here).
const HEARTBEAT_MS: u64 = 60_000;
/// Seed for the outcome model, so the 15% error set is the same every run.
const SEED: u64 = 42;
/// The task's error rate.
const ERROR_RATE: f64 = 0.15;

/// A Redis server for one group, a runtime, a connection and a lease held for the whole group.
struct Bench {
    rt: Runtime,
    con: Conn,
    keys: Keys,
    lease: Lease,
    inc: Incarnation,
    /// Declared last so it is dropped (killed) after the connection.
    _redis: RedisServer,
}

impl Bench {
    /// Owned copies of the connection, keys, lease and incarnation, for one async iteration.
    fn handles(&self) -> (Conn, Keys, Lease, Incarnation) {
        (
            self.con.clone(),
            self.keys.clone(),
            self.lease.clone(),
            self.inc.clone(),
        )
    }

    fn start() -> Bench {
        let redis = RedisServer::start().expect("start redis-server");
        let rt = Runtime::new().expect("tokio runtime");
        let keys = Keys::new("bench").expect("namespace");
        let (con, lease, inc) = rt.block_on(async {
            let mut con = conn::connect(&redis.url(), 5000).await.expect("connect");
            let inc = join(&mut con, &keys).await;
            let lease = acquire(&mut con, &keys, &inc).await;
            (con, lease, inc)
        });
        Bench {
            rt,
            con,
            keys,
            lease,
            inc,
            _redis: redis,
        }
    }
}

/// Joins the bench namespace's incarnation (again after a `FLUSHALL`).
async fn join(con: &mut Conn, keys: &Keys) -> Incarnation {
    Incarnation::join(con, keys, false).await.expect("join")
}

async fn acquire(con: &mut Conn, keys: &Keys, inc: &Incarnation) -> Lease {
    lease::try_acquire(con, keys, "bench", LEASE_MS, inc)
        .await
        .expect("acquire")
        .expect("the lease is free")
}

async fn del(con: &mut Conn, key: &str) {
    let _: i64 = redis::cmd("DEL")
        .arg(key)
        .query_async(con)
        .await
        .expect("DEL");
}

/// A group of the micro benches: 15 samples of 3 s after 1 s of warm-up.
fn short_group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(15)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group
}

/// Appends `n` messages to the queue (untimed setup for fetch and commit).
async fn refill(con: &mut Conn, keys: &Keys, lease: &Lease, inc: &Incarnation, n: u64) {
    refill_in(con, keys, lease, inc, n, REFILL_BATCH).await
}

/// Appends `n` messages to the queue in generated batches (queue entries) of `batch`.
async fn refill_in(
    con: &mut Conn,
    keys: &Keys,
    lease: &Lease,
    inc: &Incarnation,
    n: u64,
    batch: u64,
) {
    let mut left = n;
    while left > 0 {
        match generator::generate(
            con,
            keys,
            lease,
            left.min(batch),
            QUEUE_UNBOUNDED,
            inc,
            None,
        )
        .await
        .expect("generate")
        {
            Generated::Batch { count, .. } => left -= count,
            other => panic!("refill: generate returned {other:?}"),
        }
    }
}

/// One commit.lua call for `items`, timed; every outcome must be recorded (none refused).
async fn timed_commit(con: &mut Conn, keys: &Keys, items: &[Done], inc: &Incarnation) -> Duration {
    let start = Instant::now();
    let (_, refused) = handler::commit(con, keys, items, inc)
        .await
        .expect("commit");
    let took = start.elapsed();
    assert!(refused.is_empty(), "commit refused {refused:?}");
    took
}

/// The outcome the task's `eventHandler` would give message `id` (delay 0).
fn verdict(id: u64) -> Verdict {
    if outcome::seeded(SEED, id, ERROR_RATE, 0).failed {
        Verdict::Failed(leaderq::work::HANDLER_ERROR.into())
    } else {
        Verdict::Ok
    }
}

/// Decided items for commit.lua, as the handler builds them.
fn done_items(owner: &Arc<str>, fetched: handler::Fetched) -> Vec<Done> {
    let mut items = fetched.into_items(owner);
    for d in &mut items {
        d.verdict = verdict(d.envelope.id);
    }
    items
}

/// Generation cost per message by batch size: the round trip and the script's fixed work
/// (lease check, TIME, counter, epoch log) amortised over the batch.
fn bench_generate(c: &mut Criterion) {
    let b = Bench::start();
    let mut group = short_group(c, "generate");
    for batch in [1u64, 10, 100, 1_000, 10_000] {
        group.throughput(Throughput::Elements(batch));
        group.bench_function(format!("{batch}_msgs"), |bencher| {
            bencher.to_async(&b.rt).iter_custom(|iters| {
                let (mut con, keys, lease, inc) = b.handles();
                async move {
                    let mut queued = 0;
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        if queued + batch > KEEP_MAX {
                            del(&mut con, &keys.queue()).await;
                            queued = 0;
                        }
                        let start = Instant::now();
                        let r = generator::generate(
                            &mut con,
                            &keys,
                            &lease,
                            batch,
                            QUEUE_UNBOUNDED,
                            &inc,
                            None,
                        )
                        .await
                        .expect("generate");
                        timed += start.elapsed();
                        assert!(matches!(r, Generated::Batch { count, .. } if count == batch));
                        queued += batch;
                    }
                    del(&mut con, &keys.queue()).await;
                    timed
                }
            });
        });
    }
    group.finish();
}

/// Fetch cost per message by batch size: `LPOP count` plus `SADD` into the in-flight set, plus
/// the heartbeat and registry writes every fetch makes.
fn bench_fetch(c: &mut Criterion) {
    let b = Bench::start();
    let mut group = short_group(c, "fetch");
    let handler_id = "bench-fetch";
    for count in [1u64, 10, 100, 1_000, 8_000] {
        group.throughput(Throughput::Elements(count));
        group.bench_function(format!("{count}_msgs"), |bencher| {
            bencher.to_async(&b.rt).iter_custom(|iters| {
                let (mut con, keys, lease, inc) = b.handles();
                async move {
                    del(&mut con, &keys.queue()).await;
                    del(&mut con, &keys.inflight(handler_id)).await;
                    del(&mut con, &keys.batches(handler_id)).await;
                    let (mut queued, mut inflight) = (0, 0);
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        if queued < count {
                            refill(&mut con, &keys, &lease, &inc, KEEP_MAX).await;
                            queued += KEEP_MAX;
                        }
                        if inflight + count > KEEP_MAX {
                            del(&mut con, &keys.inflight(handler_id)).await;
                            del(&mut con, &keys.batches(handler_id)).await;
                            inflight = 0;
                        }
                        let start = Instant::now();
                        let fetched =
                            handler::fetch(&mut con, &keys, handler_id, count, HEARTBEAT_MS, &inc)
                                .await
                                .expect("fetch");
                        timed += start.elapsed();
                        // A split batch leaves its rest starting on a multiple of 8: up to 7
                        // fewer than asked.
                        let got = fetched.len() as u64;
                        assert!(got <= count && got + 7 >= count, "{got} of {count}");
                        black_box(fetched);
                        queued -= got;
                        inflight += got;
                    }
                    timed
                }
            });
        });
    }
    group.finish();
}

/// Commit cost per message by batch size: one `SREM` (ownership), one or two `SETBIT`s, and an
/// error-list `RPUSH` for the 15% that failed, per message; stats once per batch.
fn bench_commit(c: &mut Criterion) {
    let b = Bench::start();
    let mut group = short_group(c, "commit");
    let owner: Arc<str> = Arc::from("bench-commit");
    for batch in [1u64, 10, 100, 1_000, 8_000] {
        group.throughput(Throughput::Elements(batch));
        group.bench_function(format!("{batch}_msgs"), |bencher| {
            bencher.to_async(&b.rt).iter_custom(|iters| {
                let (mut con, keys, lease, inc) = b.handles();
                let owner = owner.clone();
                async move {
                    del(&mut con, &keys.queue()).await;
                    del(&mut con, &keys.inflight(&owner)).await;
                    del(&mut con, &keys.batches(&owner)).await;
                    let (mut queued, mut errors) = (0, 0);
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        if queued < batch {
                            refill(&mut con, &keys, &lease, &inc, KEEP_MAX).await;
                            queued += KEEP_MAX;
                        }
                        if errors + batch > KEEP_MAX {
                            del(&mut con, &keys.errors()).await;
                            errors = 0;
                        }
                        // A split batch leaves its rest starting on a multiple of 8, so a
                        // fetch may bring up to 7 fewer: fetch again for the rest.
                        let mut items: Vec<Done> = Vec::with_capacity(batch as usize);
                        while (items.len() as u64) < batch {
                            let want = batch - items.len() as u64;
                            let fetched =
                                handler::fetch(&mut con, &keys, &owner, want, HEARTBEAT_MS, &inc)
                                    .await
                                    .expect("fetch");
                            assert!(!fetched.is_empty(), "the queue ran dry");
                            items.extend(done_items(&owner, fetched));
                        }
                        queued -= batch;
                        errors += items
                            .iter()
                            .filter(|d| matches!(d.verdict, Verdict::Failed(_)))
                            .count() as u64;
                        timed += timed_commit(&mut con, &keys, &items, &inc).await;
                    }
                    timed
                }
            });
        });
    }
    group.finish();
}

/// Messages per pipeline iteration.
const PIPELINE_N: u64 = 20_000;
/// Generator batch and handler fetch/commit batch in the pipeline (the app's defaults).
const PIPELINE_BATCH: u64 = 1_000;
/// The app's default backpressure bound.
const PIPELINE_QUEUE_MAX: u64 = 50_000;

/// Generates until `{ns}:max` is reached, as `generator::lead` does at interval 0.
async fn pipeline_generator(mut con: Conn, keys: Keys, lease: Lease, inc: Incarnation) {
    loop {
        match generator::generate(
            &mut con,
            &keys,
            &lease,
            PIPELINE_BATCH,
            PIPELINE_QUEUE_MAX,
            &inc,
            None,
        )
        .await
        .expect("generate")
        {
            Generated::Batch { .. } => {}
            Generated::QueueFull => tokio::time::sleep(Duration::from_millis(1)).await,
            Generated::Finished => return,
            other => panic!("pipeline generator: {other:?}"),
        }
    }
}

/// Fetches and immediately commits until `n` outcomes are recorded.
async fn pipeline_handler(mut con: Conn, keys: Keys, inc: Incarnation, n: u64) {
    let owner: Arc<str> = Arc::from("bench-pipeline");
    let mut committed = 0;
    while committed < n {
        let fetched = handler::fetch(&mut con, &keys, &owner, PIPELINE_BATCH, HEARTBEAT_MS, &inc)
            .await
            .expect("fetch");
        if fetched.is_empty() {
            tokio::task::yield_now().await;
            continue;
        }
        let items = done_items(&owner, fetched);
        let (_, refused) = handler::commit(&mut con, &keys, &items, &inc)
            .await
            .expect("commit");
        assert!(refused.is_empty(), "commit refused {refused:?}");
        committed += items.len() as u64;
    }
}

/// End-to-end cost per message with a free `eventHandler`: generator and handler running at once
/// on separate connections, so it includes their contention on the one Redis.
fn bench_pipeline(c: &mut Criterion) {
    let redis = RedisServer::start().expect("start redis-server");
    let rt = Runtime::new().expect("tokio runtime");
    let keys = Keys::new("bench").expect("namespace");
    let (gen_con, handler_con) = rt.block_on(async {
        let g = conn::connect(&redis.url(), 5000).await.expect("connect");
        let h = conn::connect(&redis.url(), 5000).await.expect("connect");
        (g, h)
    });
    let mut group = c.benchmark_group("pipeline");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(PIPELINE_N));
    group.bench_function(format!("{PIPELINE_N}_msgs"), |bencher| {
        bencher.to_async(&rt).iter_custom(|iters| {
            let (mut gen_con, handler_con, keys) =
                (gen_con.clone(), handler_con.clone(), keys.clone());
            async move {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    // Ids restart at 0 only on an empty database; otherwise the done bitmap
                    // would make every commit a duplicate.
                    let _: String = redis::cmd("FLUSHALL")
                        .query_async(&mut gen_con)
                        .await
                        .expect("FLUSHALL");
                    let _: String = redis::cmd("SET")
                        .arg(keys.max())
                        .arg(PIPELINE_N)
                        .query_async(&mut gen_con)
                        .await
                        .expect("SET max");
                    let inc = join(&mut gen_con, &keys).await;
                    let lease = acquire(&mut gen_con, &keys, &inc).await;
                    let start = Instant::now();
                    let generator = tokio::spawn(pipeline_generator(
                        gen_con.clone(),
                        keys.clone(),
                        lease,
                        inc.clone(),
                    ));
                    let handler = tokio::spawn(pipeline_handler(
                        handler_con.clone(),
                        keys.clone(),
                        inc,
                        PIPELINE_N,
                    ));
                    generator.await.expect("generator task");
                    handler.await.expect("handler task");
                    timed += start.elapsed();
                    let (processed, errors): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
                        .arg(keys.stats())
                        .arg("processed")
                        .arg("errors")
                        .query_async(&mut gen_con)
                        .await
                        .expect("HMGET stats");
                    assert_eq!(
                        processed.unwrap_or(0) + errors.unwrap_or(0),
                        PIPELINE_N,
                        "every message recorded exactly once"
                    );
                }
                timed
            }
        });
    });
    group.finish();
    drop(rt);
    drop(redis);
}

/// Records of the default batch size, and how a commit at the defaults spreads over them.
const SPREAD_RECORD: u64 = 8_000;

/// Commit as the default 1M run makes it: `per` outcomes from each of `records` records of
/// 8,000, at random indexes, so each record is committed in `8000 / per` slices. The fetches that
/// make the records and building the items are untimed.
fn bench_commit_spread(c: &mut Criterion) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let b = Bench::start();
    let mut group = short_group(c, "commit_spread");
    let owner: Arc<str> = Arc::from("bench-spread");
    for (records, per) in [(40u64, 200u64), (20, 400)] {
        group.throughput(Throughput::Elements(records * per));
        group.bench_function(format!("{records}x{per}_of_8000"), |bencher| {
            bencher.to_async(&b.rt).iter_custom(|iters| {
                let (mut con, keys, lease, inc) = b.handles();
                let owner = owner.clone();
                async move {
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(SEED);
                    // Each round: `per` items of every record; a new set of records when spent.
                    let mut rounds: Vec<Vec<Done>> = Vec::new();
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        if rounds.is_empty() {
                            for key in [keys.queue(), keys.inflight(&owner), keys.batches(&owner)] {
                                del(&mut con, &key).await;
                            }
                            del(&mut con, &keys.errors()).await;
                            let n = records * SPREAD_RECORD;
                            refill_in(&mut con, &keys, &lease, &inc, n, SPREAD_RECORD).await;
                            let slices = (SPREAD_RECORD / per) as usize;
                            rounds = (0..slices).map(|_| Vec::new()).collect();
                            for _ in 0..records {
                                let fetched = handler::fetch(
                                    &mut con,
                                    &keys,
                                    &owner,
                                    SPREAD_RECORD,
                                    HEARTBEAT_MS,
                                    &inc,
                                )
                                .await
                                .expect("fetch");
                                assert_eq!(fetched.len() as u64, SPREAD_RECORD);
                                let mut items = done_items(&owner, fetched);
                                items.shuffle(&mut rng);
                                for (round, chunk) in
                                    rounds.iter_mut().zip(items.chunks(per as usize))
                                {
                                    round.extend_from_slice(chunk);
                                }
                            }
                        }
                        let items = rounds.pop().expect("a round");
                        timed += timed_commit(&mut con, &keys, &items, &inc).await;
                    }
                    timed
                }
            });
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_generate,
    bench_fetch,
    bench_commit,
    bench_commit_spread,
    bench_pipeline
);
criterion_main!(benches);
