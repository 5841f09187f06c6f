//! Issue 12's first measurement: what would Redis spend per message if the *batch*, not the
//! message, were the unit it stores and moves? A prototype (`benches/batch_unit/*.lua`, not the
//! protocol, used by nothing else) against today's scripts, on the same workload, side by side.
//!
//! The workload has the shape of the 1M run: the generator produces batches of 1,000; a handler
//! holds `HOLD_BATCHES` batches at once (≈ its share of `--max-in-flight 50000` with 3 handlers)
//! and, since its handler delays are random, commits them in random order, `COMMIT_GROUP`
//! outcomes per call (15 % errors, the task's rate). Each phase runs alone, so its Redis CPU is
//! read from `INFO cpu` before and after, and its commands from `INFO commandstats` (which
//! counts the commands scripts call too). Wall time includes the client's work and the round
//! trips, so the Redis figures are the ones to compare.
//!
//! `cargo bench --bench batch_unit [-- MESSAGES [ROUNDS [COMMIT_GROUP]]]` (defaults 200,000, 3
//! and 200). Prints
//! one table row per variant and round: Redis CPU µs per message for generate, fetch and commit
//! and their sum, Redis commands per message (in scripts included), script calls per message.

use leaderq::conn::{self, Conn};
use leaderq::node::generator::{self, Generated};
use leaderq::node::handler::{self, Done, Verdict};
use leaderq::node::incarnation::Incarnation;
use leaderq::node::lease::{self, Lease};
use leaderq::outcome;
use leaderq::testkit::procs::RedisServer;
use leaderq::Keys;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// The generator's and the prototype's batch size (the app's default `--batch`).
const BATCH: u64 = 1_000;
/// Batches one handler holds at a time: 50k in flight over 3 handlers is ≈ 16 batches.
const HOLD_BATCHES: u64 = 16;
/// Outcomes per commit call by default: what a handler's committer gathers during one round
/// trip at ≈ 33k outcomes/s per handler.
const COMMIT_GROUP: usize = 200;
/// The task's error rate, and the outcome model's seed.
const ERROR_RATE: f64 = 0.15;
const SEED: u64 = 42;
const LEASE_MS: u64 = 3_600_000;
const HEARTBEAT_MS: u64 = 3_600_000;

const GENERATE2: &str = include_str!("batch_unit/generate2.lua");
const FETCH2: &str = include_str!("batch_unit/fetch2.lua");
const COMMIT2: &str = include_str!("batch_unit/commit2.lua");

/// Redis's CPU seconds, total commands and script calls so far.
#[derive(Clone, Copy)]
struct Meter {
    cpu_s: f64,
    commands: u64,
    scripts: u64,
    at: Instant,
}

async fn meter(con: &mut Conn) -> Meter {
    let cpu = leaderq::inspect::info(con, "cpu").await.expect("INFO cpu");
    let field = |k: &str| {
        cpu.get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (commands, scripts) = leaderq::inspect::command_calls(con)
        .await
        .expect("INFO commandstats");
    Meter {
        cpu_s: field("used_cpu_user") + field("used_cpu_sys"),
        commands,
        scripts,
        at: Instant::now(),
    }
}

/// One phase's cost per message.
#[derive(Default, Clone, Copy)]
struct Cost {
    redis_cpu_us: f64,
    commands: f64,
    scripts: f64,
    wall_us: f64,
}

impl Cost {
    fn between(a: Meter, b: Meter, messages: u64) -> Cost {
        let n = messages as f64;
        // The two INFO calls of a reading are in the next one's command count: take them out.
        Cost {
            redis_cpu_us: (b.cpu_s - a.cpu_s) * 1e6 / n,
            commands: (b.commands - a.commands).saturating_sub(2) as f64 / n,
            scripts: (b.scripts - a.scripts) as f64 / n,
            wall_us: (b.at - a.at).as_secs_f64() * 1e6 / n,
        }
    }
}

/// The fetch and commit phases' readings, summed over the rounds of a run.
#[derive(Default)]
struct Phases {
    fetch: Totals,
    commit: Totals,
}

#[derive(Default)]
struct Totals {
    wall_s: f64,
    cpu_s: f64,
    commands: u64,
    scripts: u64,
}

impl Totals {
    fn add(&mut self, (a, b): (Meter, Meter)) {
        self.wall_s += (b.at - a.at).as_secs_f64();
        self.cpu_s += b.cpu_s - a.cpu_s;
        // The two INFO calls of a reading are in the next one's command count: take them out.
        self.commands += (b.commands - a.commands).saturating_sub(2);
        self.scripts += b.scripts - a.scripts;
    }

    fn per_message(&self, messages: u64) -> Cost {
        let n = messages as f64;
        Cost {
            redis_cpu_us: self.cpu_s * 1e6 / n,
            commands: self.commands as f64 / n,
            scripts: self.scripts as f64 / n,
            wall_us: self.wall_s * 1e6 / n,
        }
    }
}

impl Phases {
    /// One round: the readings around its fetch and around its commits.
    fn add(&mut self, fetch: (Meter, Meter), commit: (Meter, Meter)) {
        self.fetch.add(fetch);
        self.commit.add(commit);
    }

    fn row(&self, variant: &'static str, generate: Cost, messages: u64) -> Row {
        Row {
            variant,
            generate,
            fetch: self.fetch.per_message(messages),
            commit: self.commit.per_message(messages),
        }
    }
}

/// The costs of generate, fetch and commit.
struct Row {
    variant: &'static str,
    generate: Cost,
    fetch: Cost,
    commit: Cost,
}

fn ok(id: u64) -> bool {
    !outcome::seeded(SEED, id, ERROR_RATE, 0).failed
}

/// A fresh database with the lease held.
async fn fresh(con: &mut Conn, keys: &Keys) -> (Lease, Incarnation) {
    let _: String = redis::cmd("FLUSHALL")
        .query_async(con)
        .await
        .expect("FLUSHALL");
    let inc = Incarnation::join(con, keys, false).await.expect("join");
    let lease = lease::try_acquire(con, keys, "bench", LEASE_MS, &inc)
        .await
        .expect("acquire")
        .expect("the lease is free");
    (lease, inc)
}

/// Today's scripts: generate.lua, fetch.lua, commit.lua, as the app calls them.
async fn today(con: &mut Conn, keys: &Keys, messages: u64, group_size: usize) -> Row {
    let (lease, inc) = fresh(con, keys).await;
    let owner: Arc<str> = Arc::from("bench");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(SEED);
    let m0 = meter(con).await;
    let mut left = messages;
    while left > 0 {
        match generator::generate(
            con,
            keys,
            &lease,
            left.min(BATCH),
            u64::MAX >> 8,
            &inc,
            None,
        )
        .await
        .expect("generate")
        {
            Generated::Batch { count, .. } => left -= count,
            other => panic!("generate returned {other:?}"),
        }
    }
    let m1 = meter(con).await;
    let mut phases = Phases::default();
    let mut taken = 0;
    while taken < messages {
        // Fetch a handler's hold, then commit it in random order.
        let a = meter(con).await;
        let mut items: Vec<Done> = Vec::new();
        for _ in 0..HOLD_BATCHES {
            let got = handler::fetch(con, keys, &owner, BATCH, HEARTBEAT_MS, &inc)
                .await
                .expect("fetch");
            if got.is_empty() {
                break;
            }
            items.extend(got.into_items(&owner));
        }
        let b = meter(con).await;
        taken += items.len() as u64;
        for d in &mut items {
            if !ok(d.envelope.id) {
                d.verdict = Verdict::Failed(leaderq::work::HANDLER_ERROR.into());
            }
        }
        items.shuffle(&mut rng);
        let c = meter(con).await;
        for group in items.chunks(group_size) {
            let (_, refused) = handler::commit(con, keys, group, &inc)
                .await
                .expect("commit");
            assert!(refused.is_empty());
        }
        let d = meter(con).await;
        phases.add((a, b), (c, d));
    }
    let row = phases.row("today", Cost::between(m0, m1, messages), messages);
    check(con, keys, messages).await;
    row
}

/// The prototype: one queue entry per batch, per-batch in-flight records, commits that change a
/// batch's bitmap bytes once per call.
async fn batches(con: &mut Conn, keys: &Keys, messages: u64, group_size: usize) -> Row {
    let (lease, _inc) = fresh(con, keys).await;
    let (generate2, fetch2, commit2) = (
        redis::Script::new(GENERATE2),
        redis::Script::new(FETCH2),
        redis::Script::new(COMMIT2),
    );
    let queue = format!("{}q2", keys.prefix());
    let inflight = format!("{}inflight2:bench", keys.prefix());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(SEED);
    let m0 = meter(con).await;
    let mut left = messages;
    while left > 0 {
        let n = left.min(BATCH);
        let _: u64 = generate2
            .key(keys.lease())
            .key(keys.next_id())
            .key(&queue)
            .arg(&lease.value)
            .arg(n)
            .invoke_async(con)
            .await
            .expect("generate2");
        left -= n;
    }
    let m1 = meter(con).await;
    let mut phases = Phases::default();
    let mut taken = 0;
    while taken < messages {
        let a = meter(con).await;
        let entries: Vec<String> = fetch2
            .key(&queue)
            .key(&inflight)
            .arg(HOLD_BATCHES)
            .invoke_async(con)
            .await
            .expect("fetch2");
        let b = meter(con).await;
        // (first, n, index) for every message held.
        let mut held: Vec<(u64, u64, u64)> = Vec::new();
        for e in &entries {
            let mut parts = e.split(':');
            let first: u64 = parts.next().unwrap().parse().unwrap();
            let n: u64 = parts.next().unwrap().parse().unwrap();
            held.extend((0..n).map(|i| (first, n, i)));
        }
        taken += held.len() as u64;
        held.shuffle(&mut rng);
        let c = meter(con).await;
        for group in held.chunks(group_size) {
            let mut by_batch: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new();
            for &(first, n, i) in group {
                by_batch
                    .entry((first, n))
                    .or_default()
                    .push(i * 2 + u64::from(ok(first + i)));
            }
            let mut call = commit2.prepare_invoke();
            call.key(&inflight)
                .key(keys.done())
                .key(keys.ok())
                .key(keys.errors())
                .key(keys.stats())
                .arg(by_batch.len());
            for ((first, n), tokens) in &by_batch {
                let packed: Vec<u8> = tokens
                    .iter()
                    .flat_map(|&t| (t as u16).to_be_bytes())
                    .collect();
                call.arg(first).arg(n).arg(packed);
            }
            let (_, _, refused, dup): (u64, u64, u64, u64) =
                call.invoke_async(con).await.expect("commit2");
            assert_eq!((refused, dup), (0, 0));
        }
        let d = meter(con).await;
        phases.add((a, b), (c, d));
    }
    let row = phases.row("batch-unit", Cost::between(m0, m1, messages), messages);
    let open: u64 = redis::cmd("HLEN")
        .arg(&inflight)
        .query_async(con)
        .await
        .expect("HLEN");
    assert_eq!(open, 0, "every batch fully committed");
    check(con, keys, messages).await;
    row
}

/// Both variants must have recorded every id exactly once, with the same outcomes.
async fn check(con: &mut Conn, keys: &Keys, messages: u64) {
    let done: u64 = redis::cmd("BITCOUNT")
        .arg(keys.done())
        .query_async(con)
        .await
        .expect("BITCOUNT done");
    let oks: u64 = redis::cmd("BITCOUNT")
        .arg(keys.ok())
        .query_async(con)
        .await
        .expect("BITCOUNT ok");
    let errors: u64 = redis::cmd("LLEN")
        .arg(keys.errors())
        .query_async(con)
        .await
        .expect("LLEN");
    let want_ok = (0..messages).filter(|&id| ok(id)).count() as u64;
    assert_eq!(done, messages, "one outcome per id");
    assert_eq!(
        (oks, errors),
        (want_ok, messages - want_ok),
        "same outcomes"
    );
}

fn print(rows: &[Row]) {
    println!(
        "| variant | Redis CPU µs/msg: generate | fetch | commit | total | Redis commands/msg (in scripts too) | script calls/msg | wall µs/msg (client + RTT) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let total = r.generate.redis_cpu_us + r.fetch.redis_cpu_us + r.commit.redis_cpu_us;
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | **{:.2}** | {:.3} | {:.4} | {:.2} |",
            r.variant,
            r.generate.redis_cpu_us,
            r.fetch.redis_cpu_us,
            r.commit.redis_cpu_us,
            total,
            r.generate.commands + r.fetch.commands + r.commit.commands,
            r.generate.scripts + r.fetch.scripts + r.commit.scripts,
            r.generate.wall_us + r.fetch.wall_us + r.commit.wall_us,
        );
    }
}

fn main() {
    // `cargo bench` passes "--bench"; numbers after it are ours.
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let messages = numbers.first().copied().unwrap_or(200_000);
    let rounds = numbers.get(1).copied().unwrap_or(3);
    let group = numbers.get(2).copied().unwrap_or(COMMIT_GROUP as u64) as usize;
    let redis = RedisServer::start().expect("start redis-server");
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let keys = Keys::new("bench").expect("namespace");
    println!(
        "batch_unit: {messages} messages, batches of {BATCH}, {HOLD_BATCHES} batches held, commits of {group}, {rounds} rounds, alternating"
    );
    let rows = rt.block_on(async {
        let mut con = conn::connect(&redis.url(), 5000).await.expect("connect");
        let mut rows = Vec::new();
        for _ in 0..rounds {
            rows.push(today(&mut con, &keys, messages, group).await);
            rows.push(batches(&mut con, &keys, messages, group).await);
        }
        rows
    });
    print(&rows);
}
