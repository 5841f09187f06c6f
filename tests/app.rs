//! Integration tests of `app` against real `redis-server` and real `app` processes.

mod common;

use common::{wait_for, Fixture, Workload};
use leaderq::inspect;
use leaderq::node::incarnation::Incarnation;
use leaderq::node::{generator, lease};
use leaderq::stats::Counters;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_handle_every_message_once_under_one_generator() {
    let mut fx = Fixture::new();
    // One generator is asserted: a lease that outlives any CPU starvation on a loaded machine.
    let work = Workload::new(
        20000,
        7,
        50,
        &["--heartbeat-ms", "3000", "--lease-ms", "5000"],
    );
    let flags = work.flags();
    fx.spawn_all(&["a", "b", "c"], &flags);
    let mut con = fx.con().await;
    let keys = fx.keys.clone();
    let done = fx.wait_outcomes(20000, Duration::from_secs(90)).await;
    assert!(
        done.is_some(),
        "20000 outcomes not recorded in time; logs:\n{}",
        fx.log("a")
    );
    let codes = fx.stop_all();
    assert_eq!(codes, vec![Some(0); 3], "every copy exits 0 on SIGTERM");
    let (verdict, observed) = fx.verdict(&work, 0).await;
    assert!(verdict.pass, "{:?}", verdict.violations);
    assert_eq!(
        observed.epoch_log.len(),
        1,
        "one generator for the whole run: {:?}",
        observed.epoch_log
    );
    let snap = leaderq::testkit::snapshot::snapshot(&mut con, &keys)
        .await
        .unwrap();
    assert_eq!(snap.lease, None, "a stopped generator releases its lease");
    assert_eq!(snap.error_store_len, 0, "getErrors emptied the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_sigkill_fails_over_and_ids_continue_without_gap_or_repeat() {
    let mut fx = Fixture::new();
    let work = Workload::new(
        40000,
        11,
        20,
        &[
            "--gen-batch",
            "200",
            "--queue-max",
            "2000",
            "--heartbeat-ms",
            "3000",
        ],
    );
    let flags = work.flags();
    fx.spawn_all(&["a", "b", "c"], &flags);
    let mut con = fx.con().await;
    let keys = fx.keys.clone();
    let started = wait_for(Duration::from_secs(30), || {
        let (mut con, keys) = (con.clone(), keys.clone());
        async move { (Counters::read(&mut con, &keys).await.ok()?.generated >= 5000).then_some(()) }
    })
    .await;
    assert!(started.is_some(), "generation did not start");
    let (epoch, victim) = fx
        .generator(&mut con)
        .await
        .expect("a generator holds the lease");
    let held = leaderq::testkit::snapshot::in_flight_matching(
        &mut con,
        &keys,
        &format!("{}.*", fx.apps[victim].instance_id),
    )
    .await
    .unwrap();
    let killed_at = inspect::redis_time_us(&mut con).await.unwrap();
    let killed_instant = Instant::now();
    fx.apps[victim].kill();
    let successor = wait_for(Duration::from_secs(10), || {
        let mut con = con.clone();
        let keys = keys.clone();
        async move {
            let log: Vec<String> = redis::cmd("LRANGE")
                .arg(keys.epochs())
                .arg(0)
                .arg(-1)
                .query_async(&mut con)
                .await
                .ok()?;
            log.iter()
                .find(|e| e.split(':').next().and_then(|x| x.parse::<u64>().ok()) > Some(epoch))
                .cloned()
        }
    })
    .await
    .expect("another copy generates after the generator's SIGKILL");
    let first_us: u64 = successor.rsplit(':').next().unwrap().parse().unwrap();
    eprintln!(
        "failover: {} ms (Redis clock), {} ms wall until observed",
        first_us.saturating_sub(killed_at) / 1000,
        killed_instant.elapsed().as_millis()
    );
    let done = fx.wait_outcomes(40000, Duration::from_secs(90)).await;
    assert!(done.is_some(), "run did not complete after failover");
    fx.stop_all();
    let (verdict, observed) = fx.verdict(&work, u64::from(held > 0)).await;
    assert!(verdict.pass, "{:?}", verdict.violations);
    assert!(
        observed.epoch_log.len() >= 2,
        "a second epoch generated: {:?}",
        observed.epoch_log
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_sigkill_mid_flight_loses_nothing() {
    let mut fx = Fixture::new();
    let work = Workload::new(
        20000,
        3,
        400,
        &["--heartbeat-ms", "500", "--max-in-flight", "3000"],
    );
    let flags = work.flags();
    fx.spawn_all(&["a", "b", "c"], &flags);
    let mut con = fx.con().await;
    let keys = fx.keys.clone();
    let busy = fx.wait_outcomes(2000, Duration::from_secs(30)).await;
    assert!(busy.is_some(), "handling did not start");
    let (_, generator) = fx.generator(&mut con).await.expect("a generator");
    let victim = (0..3).find(|&i| i != generator).unwrap();
    // Freeze the victim before counting what it holds: a running handler
    // keeps committing, so a count taken while it runs can exceed what is
    // left to reclaim at the moment of the kill. The pause lets commands
    // already on the wire reach Redis; it is far below the 500 ms heartbeat.
    fx.apps[victim].signal(libc::SIGSTOP).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let held = leaderq::testkit::snapshot::in_flight_matching(
        &mut con,
        &keys,
        &format!("{}.*", fx.apps[victim].instance_id),
    )
    .await
    .unwrap();
    assert!(held > 0, "the victim holds messages in flight");
    fx.apps[victim].kill();
    let done = fx.wait_outcomes(20000, Duration::from_secs(90)).await;
    assert!(
        done.is_some(),
        "run did not complete after a handler's SIGKILL"
    );
    fx.stop_all();
    let (verdict, observed) = fx.verdict(&work, 1).await;
    assert!(verdict.pass, "{:?}", verdict.violations);
    assert!(
        observed.counters.reclaimed >= held,
        "the victim's {held} messages were reclaimed: {:?}",
        observed.counters
    );
}

/// Puts `n` error entries for ids 0..n straight into the store.
async fn fill_error_store(fx: &Fixture, n: u64) {
    let mut con = fx.con().await;
    for start in (0..n).step_by(10_000) {
        let entries: Vec<String> = (start..(start + 10_000).min(n))
            .map(|id| format!("{id}:1:100\thandler error\t200"))
            .collect();
        redis::cmd("RPUSH")
            .arg(fx.keys.errors())
            .arg(entries)
            .query_async::<()>(&mut con)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_errors_prints_everything_once_and_deletes_it() {
    let fx = Fixture::new();
    fill_error_store(&fx, 5000).await;
    let lines = fx.get_errors();
    let expected: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
    assert_eq!(lines, expected);
    let mut con = fx.con().await;
    let snap = leaderq::testkit::snapshot::snapshot(&mut con, &fx.keys)
        .await
        .unwrap();
    assert_eq!(snap.error_store_len, 0);
    let drain: u64 = redis::cmd("LLEN")
        .arg(fx.keys.errors_drain())
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(drain, 0);
    assert!(fx.get_errors().is_empty(), "an empty store prints nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_errors_killed_halfway_loses_nothing() {
    let fx = Fixture::new();
    let n = 100_000u64;
    fill_error_store(&fx, n).await;
    let mut child = Command::new(common::app_bin())
        .arg("getErrors")
        .args(fx.args(&["--chunk", "100"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut first: Vec<String> = Vec::new();
    let mut line = String::new();
    while first.len() < 1000 && reader.read_line(&mut line).unwrap() > 0 {
        first.push(line.trim_end().to_string());
        line.clear();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Whatever it flushed before dying is still in the pipe.
    for l in reader.lines() {
        first.push(l.unwrap());
    }
    assert!(
        (first.len() as u64) < n,
        "killed before the end ({} lines)",
        first.len()
    );
    // Errors arriving meanwhile go to the next call, not lost either.
    let mut con = fx.con().await;
    redis::cmd("RPUSH")
        .arg(fx.keys.errors())
        .arg(format!("{n}:1:100\thandler error\t200"))
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    let second = fx.get_errors();
    let mut seen = vec![0u8; n as usize + 1];
    for l in first.iter().chain(second.iter()) {
        seen[l.parse::<usize>().expect("an id")] += 1;
    }
    let missing = seen.iter().filter(|&&c| c == 0).count();
    let twice = seen.iter().filter(|&&c| c > 1).count();
    assert_eq!(missing, 0, "nothing lost");
    assert!(
        twice <= 100,
        "only the chunk in flight at the kill may print twice ({twice})"
    );
    assert!(fx.get_errors().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_goes_to_the_error_store_with_a_reason() {
    let mut fx = Fixture::new();
    let mut con = fx.con().await;
    let keys = fx.keys.clone();
    redis::cmd("RPUSH")
        .arg(keys.queue())
        .arg(vec!["hello", "1:2", "5:1:100", "\u{1}\n"])
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    // One copy generates (nothing: max 0), the other handles what is queued.
    for name in ["a", "b"] {
        fx.spawn(
            name,
            &["--max-messages", "0", "--handler-delay-max-ms", "10"],
        );
    }
    let handled = wait_for(Duration::from_secs(20), || {
        let (mut con, keys) = (con.clone(), keys.clone());
        async move {
            let c = Counters::read(&mut con, &keys).await.ok()?;
            (c.bad == 3 && c.processed + c.errors == 1).then_some(())
        }
    })
    .await;
    assert!(
        handled.is_some(),
        "garbage moved aside and the good message handled"
    );
    let raw: Vec<String> = redis::cmd("LRANGE")
        .arg(keys.errors())
        .arg(0)
        .arg(-1)
        .query_async(&mut con)
        .await
        .unwrap();
    let reasons: Vec<&str> = raw.iter().filter_map(|e| e.rsplit('\t').nth(1)).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("not a non-negative integer")),
        "{raw:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("missing field")),
        "{raw:?}"
    );

    // A queue key of the wrong type is quarantined, not crashed on.
    redis::cmd("SET")
        .arg(keys.queue())
        .arg("not a list")
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    let moved = wait_for(Duration::from_secs(20), || {
        let (mut con, keys) = (con.clone(), keys.clone());
        async move { (Counters::read(&mut con, &keys).await.ok()?.bad == 4).then_some(()) }
    })
    .await;
    assert!(moved.is_some(), "wrong-type queue quarantined");
    let kind: String = redis::cmd("TYPE")
        .arg(keys.queue())
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(kind, "none");
    for app in fx.apps.iter_mut() {
        assert!(app.is_running(), "garbage never crashes a copy");
    }
    fx.stop_all();
    let lines = fx.get_errors();
    assert!(lines.contains(&"hello".to_string()), "{lines:?}");
    assert!(
        lines.contains(&"\u{1}\\n".to_string()),
        "newlines escaped: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains(":quarantine:")),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_generator_cannot_generate() {
    let fx = Fixture::new();
    let mut con = fx.con().await;
    let keys = &fx.keys;
    let inc = Incarnation::join(&mut con, keys, false).await.unwrap();
    let a = lease::try_acquire(&mut con, keys, "a", 60_000, &inc)
        .await
        .unwrap()
        .expect("free lease");
    assert_eq!(
        lease::try_acquire(&mut con, keys, "b", 60_000, &inc)
            .await
            .unwrap(),
        None,
        "held"
    );
    assert!(matches!(
        generator::generate(&mut con, keys, &a, 10, 1000, &inc, None)
            .await
            .unwrap(),
        generator::Generated::Batch {
            first_id: 0,
            count: 10,
            ..
        }
    ));
    // A pause longer than the TTL: the lease expires and b takes it under a higher epoch.
    redis::cmd("DEL")
        .arg(keys.lease())
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    let b = lease::try_acquire(&mut con, keys, "b", 60_000, &inc)
        .await
        .unwrap()
        .expect("free again");
    assert!(b.epoch > a.epoch);
    assert_eq!(
        generator::generate(&mut con, keys, &a, 10, 1000, &inc, None)
            .await
            .unwrap(),
        generator::Generated::Fenced
    );
    assert!(
        !lease::renew(&mut con, keys, &a, 60_000, &inc)
            .await
            .unwrap(),
        "a cannot renew b's lease"
    );
    assert!(
        !lease::release(&mut con, keys, &a).await.unwrap(),
        "nor release it"
    );
    // Even the same instance id under an old epoch is fenced.
    let stale = lease::Lease {
        epoch: a.epoch,
        value: format!("{}:b", a.epoch),
    };
    assert_eq!(
        generator::generate(&mut con, keys, &stale, 10, 1000, &inc, None)
            .await
            .unwrap(),
        generator::Generated::Fenced
    );
    assert!(matches!(
        generator::generate(&mut con, keys, &b, 10, 1000, &inc, None)
            .await
            .unwrap(),
        generator::Generated::Batch {
            first_id: 10,
            count: 10,
            ..
        }
    ));
    let snap = leaderq::testkit::snapshot::snapshot(&mut con, keys)
        .await
        .unwrap();
    assert_eq!(snap.next_id, 20);
    assert_eq!(snap.queue_len, 20);
    assert_eq!(snap.epoch_log.len(), 2, "{:?}", snap.epoch_log);
    assert!(
        snap.epoch_log[0].starts_with(&format!("{}:0:10:", a.epoch)),
        "{:?}",
        snap.epoch_log
    );
    assert!(
        snap.epoch_log[1].starts_with(&format!("{}:10:10:", b.epoch)),
        "{:?}",
        snap.epoch_log
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_respects_max_and_queue_bound() {
    let fx = Fixture::new();
    let mut con = fx.con().await;
    let keys = &fx.keys;
    let inc = Incarnation::join(&mut con, keys, false).await.unwrap();
    let a = lease::try_acquire(&mut con, keys, "a", 60_000, &inc)
        .await
        .unwrap()
        .unwrap();
    redis::cmd("SET")
        .arg(keys.max())
        .arg(25)
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    // Room for 15: a batch cut short by the queue bound ends on a multiple of 8 when it can (8),
    // then the rest of the room (7, which cannot).
    assert!(matches!(
        generator::generate(&mut con, keys, &a, 100, 15, &inc, None)
            .await
            .unwrap(),
        generator::Generated::Batch { count: 8, .. }
    ));
    assert!(matches!(
        generator::generate(&mut con, keys, &a, 100, 15, &inc, None)
            .await
            .unwrap(),
        generator::Generated::Batch {
            first_id: 8,
            count: 7,
            ..
        }
    ));
    assert_eq!(
        generator::generate(&mut con, keys, &a, 100, 15, &inc, None)
            .await
            .unwrap(),
        generator::Generated::QueueFull
    );
    redis::cmd("DEL")
        .arg(keys.queue())
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    assert!(matches!(
        generator::generate(&mut con, keys, &a, 100, 100, &inc, None)
            .await
            .unwrap(),
        generator::Generated::Batch {
            first_id: 15,
            count: 10,
            ..
        }
    ));
    assert_eq!(
        generator::generate(&mut con, keys, &a, 100, 100, &inc, None)
            .await
            .unwrap(),
        generator::Generated::Finished
    );
    // A corrupt counter stops generation loudly; it is never reset to 0.
    redis::cmd("SET")
        .arg(keys.next_id())
        .arg("garbage")
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    let err = generator::generate(&mut con, keys, &a, 100, 100, &inc, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("next_id"), "{err}");
}

#[test]
fn unreachable_redis_fails_within_its_bound_with_one_clear_line() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    for args in [
        vec!["--redis-url", &url, "--connect-timeout-ms", "800"],
        vec![
            "getErrors",
            "--redis-url",
            &url,
            "--connect-timeout-ms",
            "800",
        ],
    ] {
        let started = Instant::now();
        let out = Command::new(common::app_bin())
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("app: redis at") && last.contains("unreachable"),
            "{stderr}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "bounded: {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn bad_flags_exit_2_with_the_reason() {
    for (args, needle) in [
        (vec!["--error-rate", "2"], "error-rate"),
        (vec!["--batch", "0"], "batch"),
        (vec!["--namespace", "a b"], "namespace"),
        (vec!["--lease-ms", "5"], "lease-ms"),
        (vec!["--lease-ms", "30", "--heartbeat-ms", "50"], "lease-ms"),
        (
            vec!["--heartbeat-ms", "18446744073709551615"],
            "heartbeat-ms",
        ),
        (vec!["--redis-down-max-ms", "0"], "redis-down-max-ms"),
        (vec!["--max-messages", "lots"], "max-messages"),
        (vec!["--interval-ms", "soon"], "interval-ms"),
    ] {
        let out = Command::new(common::app_bin())
            .args(&args)
            .arg("--redis-url")
            .arg("redis://127.0.0.1:1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_and_exits_0() {
    let mut fx = Fixture::new();
    let flags = [
        "--interval-ms",
        "0",
        "--max-messages",
        "100000",
        "--seed",
        "5",
        "--handler-delay-max-ms",
        "300",
        "--max-in-flight",
        "2000",
        // No reclaim is asserted: a heartbeat that outlives any CPU starvation on a loaded
        // machine, so only a stop that left messages behind could cause one (and in_flight
        // would show those).
        "--heartbeat-ms",
        "5000",
    ];
    fx.spawn_all(&["a", "b"], &flags);
    let mut con = fx.con().await;
    let keys = fx.keys.clone();
    let busy = fx.wait_outcomes(1000, Duration::from_secs(30)).await;
    assert!(busy.is_some());
    assert_eq!(fx.stop_all(), vec![Some(0), Some(0)]);
    let snap = leaderq::testkit::snapshot::snapshot(&mut con, &keys)
        .await
        .unwrap();
    assert_eq!(
        snap.in_flight, 0,
        "in-flight messages were finished and committed"
    );
    assert_eq!(snap.counters.reclaimed, 0, "nothing needed reclaiming");
    assert_eq!(
        snap.counters.runs,
        snap.counters.processed + snap.counters.errors,
        "no re-runs"
    );
    assert_eq!(snap.lease, None, "lease released");
}

/// Found by `sim --profile small --seed 6` (getErrors inside the verdict): a getErrors waiting
/// for the drain lock gave up after a fixed 6 s, though the holder was making progress (or a
/// killed drain's lock had been taken over by another drain, itself killed). It must wait while
/// the lock's holder keeps extending it, then drain everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_errors_waits_for_a_lock_holder_that_makes_progress() {
    let fx = Fixture::new();
    fill_error_store(&fx, 2000).await;
    let mut con = fx.con().await;
    let lock = fx.keys.errors_lock();
    let set = |con: &mut leaderq::conn::Conn| {
        let mut con = con.clone();
        let lock = lock.clone();
        async move {
            redis::cmd("SET")
                .arg(&lock)
                .arg("another-drain")
                .arg("PX")
                .arg(3000)
                .query_async::<()>(&mut con)
                .await
                .unwrap();
        }
    };
    set(&mut con).await;
    let waiter = std::thread::spawn({
        let args = fx.args(&[]);
        move || {
            Command::new(common::app_bin())
                .arg("getErrors")
                .args(args)
                .output()
                .unwrap()
        }
    });
    // The other holder extends its 3 s lock every second for 8 s (longer than any fixed wait
    // based on one TTL), then lets it expire.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        set(&mut con).await;
    }
    let out = waiter.join().unwrap();
    assert!(
        out.status.success(),
        "the waiter drained once the lock was free: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(lines, 2000);
}

/// A getErrors whose connection is dropped again and again mid-drain reconnects and goes on,
/// printing every entry exactly once (found by `sim --drop-connections` with getErrors inside
/// the verdict: it used to exit with "broken pipe").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_errors_rides_out_dropped_connections() {
    let fx = Fixture::new();
    let n = 50_000u64;
    fill_error_store(&fx, n).await;
    let mut con = fx.con().await;
    let child = std::thread::spawn({
        let args = fx.args(&["--chunk", "10"]);
        move || {
            Command::new(common::app_bin())
                .arg("getErrors")
                .args(args)
                .output()
                .unwrap()
        }
    });
    // Drop its connection every 50 ms for a second (not forever: a drain needs a connection to
    // live a few milliseconds to make any progress at all).
    let mut drops = 0;
    for _ in 0..20 {
        if child.is_finished() {
            break;
        }
        let killed: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes")
            .query_async(&mut con)
            .await
            .unwrap();
        drops += u64::from(killed > 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = child.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        drops >= 3,
        "the drain's connection was dropped ({drops} times)"
    );
    let mut ids: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..n).collect::<Vec<_>>(), "each entry once");
}

/// The trim is keyed by the drain list's length: repeating an ack whose reply was lost trims
/// nothing more (a retry that trimmed again would delete entries never printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_errors_ack_trims_once() {
    let fx = Fixture::new();
    let mut con = fx.con().await;
    let keys = &fx.keys;
    redis::cmd("RPUSH")
        .arg(keys.errors_drain())
        .arg(
            (0..10)
                .map(|i| format!("{i}:1:1\thandler error\t1"))
                .collect::<Vec<_>>(),
        )
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    redis::cmd("SET")
        .arg(keys.errors_lock())
        .arg("me")
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    let ack = |con: &mut leaderq::conn::Conn| {
        let mut con = con.clone();
        async move {
            leaderq::protocol::scripts::ERRORS_ACK
                .key(keys.errors_lock())
                .key(keys.errors_drain())
                .key(keys.errors())
                .key(keys.stats())
                .arg("me")
                .arg(4)
                .arg(5000)
                .arg(10)
                .invoke_async::<i64>(&mut con)
                .await
        }
    };
    assert_eq!(ack(&mut con).await.unwrap(), 6);
    assert_eq!(
        ack(&mut con).await.unwrap(),
        6,
        "the retry trims nothing more"
    );
    redis::cmd("RPUSH")
        .arg(keys.errors_drain())
        .arg("intruder")
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    assert!(
        ack(&mut con).await.is_err(),
        "a list changed under its holder is refused"
    );
}
