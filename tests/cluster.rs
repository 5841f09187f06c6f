//! Issue 13, first step: the unchanged protocol on a Redis Cluster. A namespace's keys share the
//! hash tag `{ns}`, so they live in one slot; every command of a copy is sent to that slot's
//! master (`Conn::pinned`), keyless ones too. Against a real 3-master local cluster.

mod common;

use common::{app_bin, outcomes, wait_for, Workload, NS};
use leaderq::testkit::procs::{AppProcess, RedisCluster};
use leaderq::testkit::verify::{self, Observed};
use leaderq::{conn, Keys};
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
