//! Operability, end to end against a real `redis-server` and real `app` processes: `status`,
//! graceful stops seen from outside, the Prometheus endpoint, logs, and `getErrors --peek/--json`.

mod common;

use common::{free_port, http_get, outcomes, parse_prometheus, wait_for, Fixture, Workload};
use leaderq::inspect;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

/// Length of a Redis list.
async fn llen(con: &mut leaderq::conn::Conn, key: &str) -> u64 {
    redis::cmd("LLEN")
        .arg(key)
        .query_async(con)
        .await
        .expect("LLEN")
}

/// The status entry of `instance`, if listed.
fn entry<'a>(status: &'a Value, instance: &str) -> Option<&'a Value> {
    status["instances"]
        .as_array()?
        .iter()
        .find(|i| i["instance"] == instance)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_generator_instances_counters_and_rates() {
    let mut fx = Fixture::new();
    let flags = [
        "--interval-ms",
        "0",
        "--max-messages",
        "5000",
        "--seed",
        "1",
        "--handler-delay-max-ms",
        "50",
        // One generator and no reclaim are asserted: lease and heartbeat that outlive CPU
        // starvation on a loaded machine (the stale bound stays at its 5 s floor).
        "--lease-ms",
        "2000",
        "--heartbeat-ms",
        "1500",
    ];
    fx.spawn_all(&["a", "b", "c"], &flags);
    let mut con = fx.con().await;
    let keys = fx.keys.clone();
    // All handled, and at least three history samples (two seconds of rates).
    let ready = wait_for(Duration::from_secs(60), || {
        let (mut con, keys) = (con.clone(), keys.clone());
        async move {
            let done = outcomes(&mut con, &keys).await >= 5000;
            (done && llen(&mut con, &keys.stats_history()).await >= 3).then_some(())
        }
    })
    .await;
    assert!(ready.is_some(), "run did not finish; log:\n{}", fx.log("a"));
    let (epoch, gen) = fx.generator(&mut con).await.expect("a generator");
    let gen_name = fx.apps[gen].instance_id.clone();

    let s = fx.status_json();
    assert_eq!(s["empty"], false);
    assert_eq!(s["namespace"], common::NS);
    assert_eq!(s["generator"]["instance"], gen_name.as_str());
    assert_eq!(s["generator"]["epoch"], epoch);
    let left = s["generator"]["lease_ms_left"].as_u64().unwrap();
    assert!(left > 0 && left <= 2000, "lease_ms_left {left}");
    let instances = s["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 3, "{s}");
    for i in instances {
        assert_eq!(i["alive"], true, "{i}");
        let name = i["instance"].as_str().unwrap();
        assert_eq!(i["handler"], format!("{name}.0"), "{i}");
        assert!(
            i["in_flight"].is_u64() && i["seen_us"].as_u64() > Some(0),
            "{i}"
        );
        if name == gen_name {
            assert_eq!(
                (&i["role"], &i["epoch"]),
                (&"generator".into(), &epoch.into())
            );
        } else {
            assert_eq!((&i["role"], &i["epoch"]), (&"handler".into(), &0.into()));
        }
    }
    let c = &s["counters"];
    assert_eq!(c["generated"], 5000);
    let (processed, errors) = (
        c["processed"].as_u64().unwrap(),
        c["errors"].as_u64().unwrap(),
    );
    assert_eq!(processed + errors, 5000);
    assert!(errors > 0, "15 % fail: {c}");
    assert_eq!(c["duplicates"], 0);
    assert_eq!(c["reclaimed"], 0);
    assert_eq!(s["queue_depth"], 0);
    assert_eq!(s["error_store"], errors);
    let rates = &s["rates"];
    assert!(rates["window_s"].as_f64().unwrap() >= 1.0, "{rates}");
    assert!(rates["generated_per_s"].as_f64().unwrap() >= 0.0, "{rates}");
    assert_eq!(s["warnings"], serde_json::json!([]));

    let out = fx.run_command("status", &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    for needle in [
        format!("generator   {gen_name}   epoch {epoch}"),
        "3 live, 0 dead".into(),
        "generated 5000".into(),
        format!("errors {errors}"),
        "queue       0 messages".into(),
        "rates       generated".into(),
    ] {
        assert!(text.contains(&needle), "{needle:?} in\n{text}");
    }

    // A SIGKILLed copy cannot say goodbye: it is shown dead (after the stale bound), not deleted.
    let victim = (0..3).find(|&i| i != gen).unwrap();
    let victim_name = fx.apps[victim].instance_id.clone();
    fx.apps[victim].kill();
    let dead = wait_for(Duration::from_secs(20), || {
        let s = fx.status_json();
        let dead = entry(&s, &victim_name).is_some_and(|i| i["alive"] == false);
        async move { dead.then_some(()) }
    })
    .await;
    assert!(dead.is_some(), "the killed copy is shown dead");
    let text = String::from_utf8_lossy(&fx.run_command("status", &[]).stdout).into_owned();
    assert!(text.contains("2 live, 1 dead"), "{text}");

    // A clean stop removes its own entry; the dead one stays (status never deletes).
    let codes = fx.stop_all();
    assert_eq!(
        codes.iter().filter(|c| **c == Some(0)).count(),
        2,
        "{codes:?}"
    );
    let s = fx.status_json();
    assert_eq!(s["generator"], Value::Null, "the lease was released");
    let listed: Vec<&str> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec![victim_name.as_str()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_on_an_empty_redis_says_so_and_exits_0() {
    let fx = Fixture::new();
    let out = fx.run_command("status", &[]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no data yet"), "{text}");
    let s = fx.status_json();
    assert_eq!(s["empty"], true);
    assert_eq!(s["generator"], Value::Null);
    assert_eq!(s["instances"], serde_json::json!([]));
    assert_eq!(s["counters"]["generated"], 0);
    assert_eq!(s["rates"], Value::Null);
    let mut con = fx.con().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(keys.is_empty(), "status wrote nothing: {keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_sigterm_hands_over_without_waiting_for_the_lease_ttl() {
    const LEASE_MS: u64 = 10_000;
    let mut fx = Fixture::new();
    let lease = LEASE_MS.to_string();
    let flags = [
        "--interval-ms",
        "20",
        "--lease-ms",
        &lease,
        "--handler-delay-max-ms",
        "10",
        "--log-format",
        "json",
    ];
    fx.spawn("a", &flags);
    let mut con = fx.con().await;
    let keys = fx.keys.clone();
    let first = wait_for(Duration::from_secs(20), || {
        let mut con = con.clone();
        let fx = &fx;
        async move { fx.generator(&mut con).await }
    })
    .await;
    let (epoch, gen) = first.expect("a became the generator");
    assert_eq!(gen, 0);
    fx.spawn("b", &flags);
    let joined = wait_for(Duration::from_secs(20), || {
        let s = fx.status_json();
        let seen = entry(&s, "b").is_some();
        async move { seen.then_some(()) }
    })
    .await;
    assert!(joined.is_some(), "b registered");

    let stopped_at_us = inspect::redis_time_us(&mut con).await.unwrap();
    fx.apps[0].signal(libc::SIGTERM).unwrap();
    let status = fx.apps[0].wait_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "a exits 0");
    // Bounded past the TTL, so a regression (waiting for expiry) fails on the assert below with
    // a number rather than on a timeout.
    let successor = wait_for(Duration::from_secs(15), || {
        let (mut con, keys) = (con.clone(), keys.clone());
        async move {
            let log: Vec<String> = redis::cmd("LRANGE")
                .arg(keys.epochs())
                .arg(0)
                .arg(-1)
                .query_async(&mut con)
                .await
                .ok()?;
            log.into_iter()
                .find(|e| e.split(':').next().and_then(|x| x.parse::<u64>().ok()) > Some(epoch))
        }
    })
    .await
    .expect("b generates after a's SIGTERM");
    let first_us: u64 = successor.rsplit(':').next().unwrap().parse().unwrap();
    let handover_ms = first_us.saturating_sub(stopped_at_us) / 1000;
    eprintln!("handover after SIGTERM: {handover_ms} ms (lease {LEASE_MS} ms)");
    assert!(
        handover_ms < LEASE_MS / 3,
        "the released lease is taken at once, not after its TTL: {handover_ms} ms"
    );

    // JSON logs: every line parses, and the role change names instance and epoch.
    let log = fx.log("b");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let became = lines
        .iter()
        .find(|l| l["fields"]["message"] == "became the generator")
        .unwrap_or_else(|| panic!("no role change logged:\n{log}"));
    assert_eq!(became["span"]["instance"], "b", "{became}");
    assert!(became["fields"]["epoch"].as_u64() > Some(epoch), "{became}");
    let a_log = fx.log("a");
    assert!(
        a_log.lines().any(|l| l.contains("generator stopped")),
        "{a_log}"
    );
    fx.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_sigterm_exits_0_and_nothing_is_reclaimed_or_rerun() {
    let mut fx = Fixture::new();
    let work = Workload::new(
        20000,
        9,
        300,
        &["--max-in-flight", "2000", "--lease-ms", "5000"],
    );
    let flags = work.flags();
    // The others get a heartbeat that outlives CPU starvation on a loaded machine, so any
    // reclaim can only be of the victim's messages; the victim's is short, so a stop that left
    // messages behind would see them reclaimed within the test.
    let calm = [&flags[..], &["--heartbeat-ms", "5000"]].concat();
    fx.spawn_all(&["a", "b"], &calm);
    let mut con = fx.con().await;
    let keys = fx.keys.clone();
    let busy = fx.wait_outcomes(1000, Duration::from_secs(30)).await;
    assert!(busy.is_some(), "handling started");
    let victim = fx.spawn("c", &[&flags[..], &["--heartbeat-ms", "500"]].concat());
    let (_, gen) = fx.generator(&mut con).await.expect("a generator");
    assert_ne!(gen, victim, "the generator was elected before c joined");
    let pattern = format!("{}.*", fx.apps[victim].instance_id);
    let holding = wait_for(Duration::from_secs(10), || {
        let (mut con, keys, pattern) = (con.clone(), keys.clone(), pattern.clone());
        async move {
            let n = leaderq::testkit::snapshot::in_flight_matching(&mut con, &keys, &pattern)
                .await
                .ok()?;
            (n > 0).then_some(n)
        }
    })
    .await;
    assert!(holding.is_some(), "the victim holds messages when stopped");
    fx.apps[victim].signal(libc::SIGTERM).unwrap();
    let status = fx.apps[victim]
        .wait_timeout(Duration::from_secs(20))
        .unwrap();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "the handler exits 0"
    );
    let done = fx.wait_outcomes(20000, Duration::from_secs(90)).await;
    assert!(done.is_some(), "the others finish the run");
    // Longer than the heartbeat TTL: a reclaim, had anything been left, would have happened.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fx.stop_all();
    let snap = leaderq::testkit::snapshot::snapshot(&mut con, &keys)
        .await
        .unwrap();
    let c = snap.counters;
    assert_eq!(c.reclaimed, 0, "nothing was left to reclaim: {c:?}");
    assert_eq!(
        c.runs,
        c.processed + c.errors,
        "no message ran twice: {c:?}"
    );
    assert_eq!(c.duplicates, 0, "{c:?}");
    assert_eq!(snap.in_flight, 0);
    let (verdict, _) = fx.verdict(&work, 0).await;
    assert!(verdict.pass, "{:?}", verdict.violations);
}

/// Scrapes `addr` until `done(series)` holds (bounded), returning the last scrape.
async fn scrape_until(
    addr: &str,
    done: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let mut last = HashMap::new();
    for _ in 0..100 {
        if let Some(body) = http_get(addr, "/metrics") {
            last = parse_prometheus(&body);
            if done(&last) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_counters_gauges_and_histograms() {
    let mut fx = Fixture::new();
    let addrs: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    for (name, addr) in ["a", "b"].iter().zip(&addrs) {
        fx.spawn(
            name,
            &[
                "--interval-ms",
                "0",
                "--max-messages",
                "3000",
                "--handler-delay-max-ms",
                "20",
                "--metrics-addr",
                addr,
            ],
        );
    }
    let mut con = fx.con().await;
    let done = fx.wait_outcomes(3000, Duration::from_secs(60)).await;
    assert!(done.is_some(), "run finished; log:\n{}", fx.log("a"));
    let (epoch, gen) = fx.generator(&mut con).await.expect("a generator");
    let handler = 1 - gen;
    let generator_page = scrape_until(&addrs[gen], |m| {
        m.get("leaderq_generated_total") == Some(&3000.0)
    })
    .await;
    let handler_page = scrape_until(&addrs[handler], |m| {
        m.get("leaderq_processed_total").copied().unwrap_or(0.0)
            + m.get("leaderq_errors_total").copied().unwrap_or(0.0)
            >= 3000.0
    })
    .await;
    for page in [&generator_page, &handler_page] {
        for name in [
            "leaderq_generated_total",
            "leaderq_processed_total",
            "leaderq_errors_total",
            "leaderq_reclaimed_total",
            "leaderq_in_flight",
            "leaderq_role_generator",
            "leaderq_epoch",
        ] {
            assert!(page.contains_key(name), "{name} missing: {page:?}");
        }
    }
    assert_eq!(generator_page["leaderq_generated_total"], 3000.0);
    assert_eq!(generator_page["leaderq_role_generator"], 1.0);
    assert_eq!(generator_page["leaderq_epoch"], epoch as f64);
    assert_eq!(handler_page["leaderq_role_generator"], 0.0);
    let handled = handler_page["leaderq_processed_total"] + handler_page["leaderq_errors_total"];
    assert_eq!(handled, 3000.0, "the only handler recorded every outcome");
    assert!(handler_page["leaderq_errors_total"] > 0.0);
    assert_eq!(handler_page["leaderq_end_to_end_seconds_count"], 3000.0);
    assert_eq!(handler_page["leaderq_handler_seconds_count"], 3000.0);
    assert_eq!(
        handler_page["leaderq_end_to_end_seconds_bucket{le=\"+Inf\"}"],
        3000.0
    );
    assert_eq!(fx.stop_all(), vec![Some(0), Some(0)]);

    // A bad address is a flag error, before joining.
    let out = std::process::Command::new(common::app_bin())
        .args(fx.args(&["--metrics-addr", "not an address"]))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics-addr"));
}

/// Error entries: two failed messages and a garbage payload.
const STORE: [&str; 2] = [
    "7:1:100\thandler error\t1700000000000123",
    "hello\tmissing field epoch\t1700000000000000",
];

async fn fill(fx: &Fixture, key: &str, entries: &[&str]) {
    let mut con = fx.con().await;
    redis::cmd("RPUSH")
        .arg(key)
        .arg(entries)
        .query_async::<()>(&mut con)
        .await
        .unwrap();
}

fn stdout_lines(out: &std::process::Output) -> Vec<String> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_errors_peek_leaves_the_store_intact() {
    let fx = Fixture::new();
    fill(&fx, &fx.keys.errors(), &STORE).await;
    // What a killed getErrors left behind comes first, as in a real drain.
    fill(
        &fx,
        &fx.keys.errors_drain(),
        &["3:1:100\thandler error\t50"],
    )
    .await;
    let expected = vec!["3".to_string(), "7".into(), "hello".into()];
    for _ in 0..2 {
        let lines = stdout_lines(&fx.run_command("getErrors", &["--peek", "--chunk", "1"]));
        assert_eq!(lines, expected);
    }
    let mut con = fx.con().await;
    assert_eq!(llen(&mut con, &fx.keys.errors()).await, 2);
    assert_eq!(llen(&mut con, &fx.keys.errors_drain()).await, 1);
    let lock: Option<String> = redis::cmd("GET")
        .arg(fx.keys.errors_lock())
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(lock, None, "peek takes no lock");
    // The real drain prints the same and then deletes.
    assert_eq!(fx.get_errors(), expected);
    assert!(stdout_lines(&fx.run_command("getErrors", &["--peek"])).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_errors_json_lines_parse() {
    let fx = Fixture::new();
    fill(&fx, &fx.keys.errors(), &STORE).await;
    fill(&fx, &fx.keys.errors(), &["no tabs at all"]).await;
    let peeked = stdout_lines(&fx.run_command("getErrors", &["--json", "--peek"]));
    let drained = stdout_lines(&fx.run_command("getErrors", &["--json"]));
    assert_eq!(peeked, drained, "peek shows exactly what the drain prints");
    let objects: Vec<Value> = drained
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(
        objects[0],
        serde_json::json!({"id": 7, "reason": "handler error", "when": "2023-11-14T22:13:20.000123Z"})
    );
    assert_eq!(
        objects[1],
        serde_json::json!({
            "id": null,
            "reason": "missing field epoch",
            "when": "2023-11-14T22:13:20.000000Z",
            "payload": "hello",
        })
    );
    assert_eq!(objects[2]["id"], Value::Null);
    assert_eq!(objects[2]["when"], Value::Null);
    assert_eq!(objects[2]["payload"], "no tabs at all");
    assert_eq!(objects.len(), 3);
    assert!(fx.get_errors().is_empty(), "--json drained the store");
}
