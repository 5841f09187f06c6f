//! Issue 13: Redis Cluster and sharding.
//!
//! Unsharded, a namespace's keys share the hash tag `{ns}`, so they live in one slot; every
//! command of a copy is sent to that slot's master (`Conn::pinned`), keyless ones too. Against a
//! real 3-master local cluster.
//!
//! Sharded (`--shards S`, docs/PROTOCOL.md "Sharding"), the two-step generation (allocate in the
//! control slot, append to a shard) keeps ids gap-free and unique across shards when a generator
//! dies between the steps, and a deposed generator can write to no shard. Against a real
//! redis-server (the shards are hash tags; on one Redis they share the server) and real `app`
//! processes.

mod common;

use common::{app_bin, outcomes, wait_for, Fixture, Workload, NS};
use leaderq::node::generator::Generated;
use leaderq::node::incarnation::Incarnation;
use leaderq::node::lease::{self, Lease};
use leaderq::node::sharded::{self, Appended, Range, Shard, ShardedGen};
use leaderq::protocol::shards;
use leaderq::testkit::procs::{AppProcess, RedisCluster};
use leaderq::testkit::verify::{self, Observed};
use leaderq::{conn, Error, Keys};
use std::time::Duration;

/// Our slot computation agrees with Redis's (`CLUSTER KEYSLOT`), for hash-tagged keys and not.
#[tokio::test]
async fn key_slots_agree_with_redis() {
    let cluster = RedisCluster::start(1).expect("start a one-node cluster");
    let mut con = conn::connect(&cluster.url(), 5000).await.expect("connect");
    for key in [
        "{t}:queue",
        "{sim-7-1234}:done",
        "plain",
        "{}:empty-tag",
        "a{b}c",
        "x{}{y}",
        "{unclosed",
    ] {
        let redis_slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut con)
            .await
            .expect("CLUSTER KEYSLOT");
        assert_eq!(conn::key_slot(key.as_bytes()), redis_slot, "{key}");
    }
}

/// Three copies on a 3-master cluster, the generator SIGKILLed once mid-run: every message is
/// recorded exactly once, and `status` and `getErrors` work against the cluster URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_on_a_cluster_survives_a_leader_kill_exactly_once() {
    let cluster = RedisCluster::start(3).expect("start a 3-master cluster");
    let url = cluster.url();
    let keys = Keys::new(NS).unwrap();
    let work = Workload::new(3000, 13, 20, &["--lease-ms", "1000"]);
    let logs = tempfile::tempdir().unwrap();
    let args = |extra: &[&str]| -> Vec<String> {
        ["--redis-url", &url, "--namespace", NS]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let mut apps: Vec<AppProcess> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let log = logs.path().join(format!("{name}.log"));
            AppProcess::spawn(&app_bin(), name, &args(&work.flags()), Some(&log)).expect("spawn")
        })
        .collect();
    let log = |name: &str| {
        std::fs::read_to_string(logs.path().join(format!("{name}.log"))).unwrap_or_default()
    };
    let mut con = conn::connect(&url, 5000)
        .await
        .expect("connect")
        .pinned(&keys);
    assert!(con.is_cluster());

    // Kill the generator once a third of the messages are recorded.
    let third = wait_for(Duration::from_secs(60), || {
        let (mut con, keys) = (con.clone(), keys.clone());
        async move { (outcomes(&mut con, &keys).await >= work.messages / 3).then_some(()) }
    })
    .await;
    assert!(third.is_some(), "a third recorded; log of a:\n{}", log("a"));
    let holder = leaderq::node::lease::holder(&mut con, &keys)
        .await
        .unwrap()
        .expect("a generator holds the lease");
    let instance = holder.split_once(':').unwrap().1.to_string();
    let victim = apps
        .iter()
        .position(|a| a.instance_id == instance)
        .expect("the holder is one of ours");
    apps[victim].kill();

    let all = wait_for(Duration::from_secs(120), || {
        let (mut con, keys) = (con.clone(), keys.clone());
        async move { (outcomes(&mut con, &keys).await >= work.messages).then_some(()) }
    })
    .await;
    let names = ["a", "b", "c"];
    assert!(
        all.is_some(),
        "all recorded; logs:\n{}",
        names.iter().map(|n| log(n)).collect::<Vec<_>>().join("\n")
    );

    // `app status` and `app getErrors` against the cluster URL must both succeed.
    let run = |command: &str| {
        let out = std::process::Command::new(app_bin())
            .arg(command)
            .args(args(&[]))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{command} on a cluster: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    run("status");
    let drained = run("getErrors");
    let error_lines: Vec<String> = String::from_utf8_lossy(&drained.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let snap = leaderq::testkit::snapshot::snapshot(&mut con, &keys)
        .await
        .expect("snapshot");
    let observed = Observed::from_snapshot(
        &snap,
        work.messages,
        work.seed,
        work.error_rate,
        work.delay_max_ms,
        error_lines,
        1,
    )
    .expect("epoch log parses");
    let verdict = verify::check(&observed);
    assert!(verdict.pass, "{verdict:?}");
    assert!(
        snap.counters.errors > 0,
        "the 15 % error rate produced errors"
    );
}

/// The shards of `keys`' namespace as a copy joins them: settled to `count`, each with its own
/// connection and incarnation.
async fn join_shards(con: &mut conn::Conn, keys: &Keys, count: u32) -> Vec<Shard> {
    shards::settle(con, keys, count).await.expect("settle");
    let mut joined = Vec::new();
    for (index, k) in keys.shards(count).into_iter().enumerate() {
        let mut c = shards::conn_for(con, &k);
        let incarnation = Incarnation::join(&mut c, &k, false)
            .await
            .expect("join shard");
        joined.push(Shard {
            index: index as u32,
            con: c,
            keys: k,
            incarnation,
        });
    }
    joined
}

/// Every queue entry of every shard as (first id, count, epoch), sorted by first id.
async fn queued_ranges(con: &mut conn::Conn, keys: &Keys, count: u32) -> Vec<(u64, u64, u64)> {
    let mut ranges = Vec::new();
    for k in keys.shards(count) {
        let entries: Vec<String> = redis::cmd("LRANGE")
            .arg(k.queue())
            .arg(0)
            .arg(-1)
            .query_async(con)
            .await
            .unwrap();
        for e in entries {
            let f: Vec<u64> = e
                .trim_start_matches('*')
                .split(':')
                .map(|x| x.parse().unwrap())
                .collect();
            ranges.push((f[0], f[1], f[2]));
        }
    }
    ranges.sort();
    ranges
}

async fn acquire(con: &mut conn::Conn, keys: &Keys, name: &str, inc: &Incarnation) -> Lease {
    lease::try_acquire(con, keys, name, 60_000, inc)
        .await
        .expect("acquire")
        .expect("the lease is free")
}

/// A generator dies between allocating a range and appending it: its successor appends that
/// range (with the old epoch) before allocating its own, so the ids in the shards' queues are
/// exactly 0..next_id, each once; the deposed generator's retry appends nothing, and it can
/// write to no shard nor allocate again.
#[tokio::test]
async fn a_range_allocated_by_a_dead_generator_is_appended_once_by_its_successor() {
    let fx = Fixture::new();
    let keys = &fx.keys;
    let (mut con, inc) = fx.joined().await;
    let mut shard_set = join_shards(&mut con, keys, 3).await;

    // Generator 1: one full step (takeover, allocate, append), then an allocation whose append
    // never happens (it "dies" between the two steps).
    let lease1 = acquire(&mut con, keys, "g1", &inc).await;
    let mut g1 = ShardedGen::new(shard_set.clone());
    let first = g1
        .step(&mut con, keys, &lease1, &inc, 100, 1000)
        .await
        .unwrap();
    assert!(
        matches!(
            first,
            Generated::Batch {
                first_id: 0,
                count: 100,
                ..
            }
        ),
        "{first:?}"
    );
    let (allocated, lost) = sharded::allocate(&mut con, keys, &lease1, &inc, 100, false, 2)
        .await
        .unwrap();
    let lost = lost.expect("allocated");
    assert!(matches!(
        allocated,
        Generated::Batch {
            first_id: 100,
            count: 100,
            ..
        }
    ));
    assert_eq!(
        queued_ranges(&mut con, keys, 3).await.len(),
        1,
        "ids 100..200 are not queued yet"
    );

    // Its lease ends; generator 2 takes over and generates once.
    let () = redis::cmd("DEL")
        .arg(keys.lease())
        .query_async(&mut con)
        .await
        .unwrap();
    let lease2 = acquire(&mut con, keys, "g2", &inc).await;
    assert!(lease2.epoch > lease1.epoch);
    let mut g2 = ShardedGen::new(shard_set.clone());
    let made = g2
        .step(&mut con, keys, &lease2, &inc, 100, 1000)
        .await
        .unwrap();
    assert!(
        matches!(
            made,
            Generated::Batch {
                first_id: 200,
                count: 100,
                ..
            }
        ),
        "{made:?}"
    );
    let ranges = queued_ranges(&mut con, keys, 3).await;
    assert_eq!(
        ranges
            .iter()
            .map(|&(first, n, _)| (first, n))
            .collect::<Vec<_>>(),
        vec![(0, 100), (100, 100), (200, 100)],
        "gap-free and unique across shards"
    );
    assert_eq!(
        ranges[1].2, lease1.epoch,
        "the dead generator's range keeps its epoch"
    );
    assert_eq!(ranges[2].2, lease2.epoch);

    // The deposed generator wakes up: its retried append finds the range appended, a range of its
    // epoch is refused by every shard (sealed by the successor), and it cannot allocate.
    let shard = &mut shard_set[lost.shard as usize];
    assert_eq!(
        sharded::append(shard, &lost).await.unwrap(),
        Appended::Already
    );
    for shard in shard_set.iter_mut() {
        let forged = Range {
            first_id: 10_000,
            ..lost
        };
        assert_eq!(
            sharded::append(shard, &forged).await.unwrap(),
            Appended::Fenced
        );
    }
    let (fenced, none) = sharded::allocate(&mut con, keys, &lease1, &inc, 100, false, 0)
        .await
        .unwrap();
    assert_eq!((fenced, none), (Generated::Fenced, None));
    assert_eq!(
        queued_ranges(&mut con, keys, 3).await.len(),
        3,
        "nothing more was queued"
    );
}

/// A generator whose allocation ran but whose reply was lost (a Redis restart mid-call) does
/// not know that range; its next step still appends it before allocating anything, so no id is
/// left out. (Seen in a soak: `sim --profile small --restart-redis 2 --shards 3 --seed 2` left
/// 480 ids nowhere before the fix.)
#[tokio::test]
async fn an_allocation_whose_reply_was_lost_is_appended_before_the_next() {
    let fx = Fixture::new();
    let keys = &fx.keys;
    let (mut con, inc) = fx.joined().await;
    let shard_set = join_shards(&mut con, keys, 3).await;
    let lease = acquire(&mut con, keys, "g", &inc).await;
    let mut g = ShardedGen::new(shard_set);
    g.step(&mut con, keys, &lease, &inc, 100, 1000)
        .await
        .unwrap();
    // The same generator's allocation, as if its reply never arrived: g does not see it.
    let (_, lost) = sharded::allocate(&mut con, keys, &lease, &inc, 100, false, 2)
        .await
        .unwrap();
    assert!(lost.is_some());
    g.step(&mut con, keys, &lease, &inc, 100, 1000)
        .await
        .unwrap();
    let ranges: Vec<(u64, u64)> = queued_ranges(&mut con, keys, 3)
        .await
        .iter()
        .map(|&(first, n, _)| (first, n))
        .collect();
    assert_eq!(ranges, vec![(0, 100), (100, 100), (200, 100)]);
}

/// A generator whose append reply was lost retries it: the retry appends nothing more.
#[tokio::test]
async fn a_retried_append_is_idempotent() {
    let fx = Fixture::new();
    let keys = &fx.keys;
    let (mut con, inc) = fx.joined().await;
    let mut shard_set = join_shards(&mut con, keys, 2).await;
    let lease = acquire(&mut con, keys, "g", &inc).await;
    let (_, range) = sharded::allocate(&mut con, keys, &lease, &inc, 64, false, 1)
        .await
        .unwrap();
    let range = range.unwrap();
    let shard = &mut shard_set[1];
    assert_eq!(sharded::append(shard, &range).await.unwrap(), Appended::Now);
    assert_eq!(
        sharded::append(shard, &range).await.unwrap(),
        Appended::Already
    );
    assert_eq!(
        queued_ranges(&mut con, keys, 2).await,
        vec![(0, 64, lease.epoch)]
    );
}

/// The shard count is set once, by the first copy to join, unsharded or not: a copy with another
/// count is refused, and so is a sharded start on a namespace used before counts were stored.
#[tokio::test]
async fn the_shard_count_is_set_once() {
    let fx = Fixture::new();
    let mut con = fx.con().await;
    let keys = Keys::new("counted").unwrap();
    shards::settle(&mut con, &keys, 3)
        .await
        .expect("first copy sets 3");
    shards::settle(&mut con, &keys, 3)
        .await
        .expect("same count joins");
    for other in [1, 2, 4] {
        let refused = shards::settle(&mut con, &keys, other).await;
        assert!(
            matches!(&refused, Err(Error::Config(m)) if m.contains("--shards 3")),
            "{other}: {refused:?}"
        );
    }
    assert!(shards::settle(&mut con, &keys, 0).await.is_err());
    let used = Keys::new("used").unwrap();
    let () = redis::cmd("SET")
        .arg(used.next_id())
        .arg(5)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(shards::settle(&mut con, &used, 1).await.is_ok());
    assert!(shards::settle(&mut con, &used, 2).await.is_err());
    // An unsharded first copy stores its count too, so a sharded copy after it is refused (an
    // unsharded copy once stored nothing, and a sharded one joining at the same moment passed).
    let plain = Keys::new("plain").unwrap();
    shards::settle(&mut con, &plain, 1)
        .await
        .expect("first copy, unsharded");
    assert_eq!(shards::stored(&mut con, &plain).await.unwrap(), 1);
    assert!(shards::settle(&mut con, &plain, 3).await.is_err());
    // Copies joining at once with different counts: one count is stored, every copy started
    // with it joins, every other is refused.
    let raced = Keys::new("raced").unwrap();
    let mut joins = Vec::new();
    for wanted in [1, 3, 2, 3, 1, 2, 3, 1] {
        let mut c = fx.con().await;
        let k = raced.clone();
        joins.push(tokio::spawn(async move {
            (wanted, shards::settle(&mut c, &k, wanted).await.is_ok())
        }));
    }
    let mut joined = Vec::new();
    for j in joins {
        joined.push(j.await.unwrap());
    }
    let won = shards::stored(&mut con, &raced).await.unwrap();
    for (wanted, ok) in joined {
        assert_eq!(ok, wanted == won, "--shards {wanted} with {won} stored");
    }
}

/// Three copies with `--shards 3` and the generator SIGKILLed once: every message is recorded
/// exactly once across the shards, every shard got messages, `status` shows each shard, and
/// `getErrors` empties every shard's store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_group_survives_a_leader_kill_exactly_once() {
    let mut fx = Fixture::new();
    // Few in flight and a short queue, so generation is paced by handling and the kill lands
    // while ids are still being allocated and appended.
    let flags = [
        "--shards",
        "3",
        "--gen-batch",
        "96",
        "--queue-max",
        "200",
        "--max-in-flight",
        "300",
    ];
    let work = Workload::new(6000, 31, 50, &flags);
    fx.spawn_all(&["a", "b", "c"], &work.flags());
    let mut con = fx.con().await;
    assert!(
        fx.wait_outcomes(work.messages / 3, Duration::from_secs(60))
            .await
            .is_some(),
        "a third recorded; log of a:\n{}",
        fx.log("a")
    );
    let (_, i) = fx.generator(&mut con).await.expect("a generator");
    fx.apps[i].kill();
    fx.spawn("d", &work.flags());
    assert!(
        fx.wait_outcomes(work.messages, Duration::from_secs(120))
            .await
            .is_some(),
        "all recorded; log of d:\n{}",
        fx.log("d")
    );
    let status = fx.status_json();
    let listed = status["shards"]
        .as_array()
        .expect("status lists the shards");
    assert_eq!(listed.len(), 3, "{status}");
    for shard in listed {
        assert!(
            shard["counters"]["generated"].as_u64().unwrap_or(0) > 0,
            "every shard got messages: {status}"
        );
    }
    fx.stop_all();
    let (verdict, observed) = fx.verdict(&work, 0).await;
    assert!(verdict.pass, "{:?}", verdict.violations);
    let epochs: std::collections::BTreeSet<u64> =
        observed.epoch_log.iter().map(|b| b.epoch).collect();
    assert!(
        epochs.len() >= 2,
        "a successor generated after the kill: {epochs:?}"
    );
    for k in fx.keys.shards(3) {
        let left: u64 = redis::cmd("LLEN")
            .arg(k.errors())
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(left, 0, "getErrors drained {}", k.errors());
    }
}
