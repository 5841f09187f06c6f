//! The library as a program uses it: `Node::builder` with a handler and a source of its own, in
//! this process, against a real redis-server; and the examples, run as their own processes.

use leaderq::admin::errors::{self, DrainConfig, ErrorEntry};
use leaderq::stats::Counters;
use leaderq::testkit::procs::RedisServer;
use leaderq::work::DATA_MAX_BYTES;
use leaderq::{conn, Batch, Error, Failure, Handler, Keys, Message, Node, Source};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Every byte value, colons, tabs and newlines included, in a payload that depends on the id.
fn payload(id: u64) -> Vec<u8> {
    let mut p: Vec<u8> = (0..=255u8).collect();
    p.extend_from_slice(format!(":{id}:\t\n").as_bytes());
    p.rotate_left((id % 256) as usize);
    p
}

struct Binary;

impl Source for Binary {
    async fn batch(&self, first_id: u64, count: usize) -> Result<Batch, Failure> {
        Ok(Batch::Payloads(
            (first_id..first_id + count as u64).map(payload).collect(),
        ))
    }
}

/// Records every call, takes a while, and fails ids divisible by 7 with their own reason.
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<HashMap<u64, Vec<Message>>>>,
}

impl Handler for Recorder {
    async fn handle(&self, message: Message) -> Result<(), Failure> {
        let id = message.id;
        self.calls
            .lock()
            .unwrap()
            .entry(id)
            .or_default()
            .push(message);
        tokio::time::sleep(Duration::from_millis(20)).await;
        if id.is_multiple_of(7) {
            Err(Failure::new(format!("seven\tdivides\n{id}")))
        } else {
            Ok(())
        }
    }
}

/// Two copies with a binary source and a recording handler, cancelled mid-run: both return `Ok`
/// after draining (nothing left in flight), every message handled so far was handled once with
/// its payload intact and has exactly one recorded outcome, failures with the handler's reason
/// (made one line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_built_in_process_stop_on_cancel_and_drain() {
    let redis = RedisServer::start().expect("start redis-server");
    let recorder = Recorder::default();
    let stop = CancellationToken::new();
    let copies: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let node = Node::builder(redis.url())
                .namespace("lib")
                .instance_id(name)
                .interval_ms(0)
                .batch(50)
                .max_in_flight(200)
                .source(Binary)
                .handler(recorder.clone())
                .build()
                .expect("valid settings");
            tokio::spawn(node.run(stop.clone()))
        })
        .collect();
    let calls = recorder.calls.clone();
    let mut waited = 0;
    while calls.lock().unwrap().len() < 1000 && waited < 600 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    stop.cancel();
    for copy in copies {
        copy.await
            .expect("join")
            .expect("a cancelled copy returns Ok");
    }
    let calls = calls.lock().unwrap().clone();
    assert!(
        calls.len() >= 1000,
        "handled {} before the stop",
        calls.len()
    );

    let keys = Keys::new("lib").unwrap();
    let mut con = conn::connect(&redis.url(), 5000).await.unwrap();
    for name in ["a", "b"] {
        let held =
            leaderq::testkit::snapshot::in_flight_matching(&mut con, &keys, &format!("{name}.0"))
                .await
                .unwrap();
        assert_eq!(held, 0, "{name} drained what it held");
    }
    let c = Counters::read(&mut con, &keys).await.unwrap();
    for (id, messages) in &calls {
        assert_eq!(messages.len(), 1, "id {id} handled once");
        let m = &messages[0];
        assert_eq!(&m.payload[..], &payload(*id)[..], "id {id}'s bytes intact");
        assert_eq!(m.delivery, 1);
        assert!(m.epoch >= 1 && m.generated_us > 0);
    }
    let failing = calls.keys().filter(|id| id.is_multiple_of(7)).count() as u64;
    assert_eq!(c.processed + c.errors, calls.len() as u64, "{c:?}");
    assert_eq!((c.errors, c.duplicates), (failing, 0), "{c:?}");

    let config = DrainConfig {
        chunk: 100,
        lock_ms: 5000,
        token: "test".into(),
        retry_for: Duration::from_secs(5),
    };
    let mut failed: Vec<ErrorEntry> = Vec::new();
    errors::drain(&mut con, &keys, &config, &mut failed)
        .await
        .unwrap();
    assert_eq!(failed.len() as u64, failing);
    for e in &failed {
        let json = e.json();
        let id = json["id"].as_u64().expect("a message");
        assert_eq!(e.reason, format!("seven divides {id}"), "one line");
        let data = json["data"].as_str().expect("its data");
        assert_eq!(data, String::from_utf8_lossy(&payload(id)));
    }
}

struct TooBig;

impl Source for TooBig {
    async fn batch(&self, _first_id: u64, _count: usize) -> Result<Batch, Failure> {
        Ok(Batch::Payloads(vec![vec![b'x'; DATA_MAX_BYTES + 1]]))
    }
}

/// A source that gives a payload over the limit stops its copy with an error naming the limit;
/// nothing is generated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_over_the_limit_is_a_clear_error() {
    let redis = RedisServer::start().expect("start redis-server");
    let node = Node::builder(redis.url())
        .namespace("big")
        .interval_ms(0)
        .source(TooBig)
        .build()
        .unwrap();
    let ran = tokio::time::timeout(Duration::from_secs(30), node.run(CancellationToken::new()))
        .await
        .expect("the copy stops by itself");
    match ran {
        Err(Error::Source(msg)) => assert!(msg.contains(&DATA_MAX_BYTES.to_string()), "{msg}"),
        other => panic!("expected a source error, got {other:?}"),
    }
    let mut con = conn::connect(&redis.url(), 5000).await.unwrap();
    let c = Counters::read(&mut con, &Keys::new("big").unwrap())
        .await
        .unwrap();
    assert_eq!(c.generated, 0);
}

/// Bad settings are refused at build time, each with the setting named.
#[test]
fn the_builder_refuses_bad_settings() {
    let cases: [(&str, Result<Node, Error>); 4] = [
        (
            "--batch",
            Node::builder("redis://127.0.0.1:1").batch(0).build(),
        ),
        (
            "--lease-ms",
            Node::builder("redis://127.0.0.1:1").lease_ms(5).build(),
        ),
        (
            "namespace",
            Node::builder("redis://127.0.0.1:1")
                .namespace("a b")
                .build(),
        ),
        ("redis", Node::builder("http://nope").build()),
    ];
    for (what, built) in cases {
        let err = built.expect_err(what).to_string();
        assert!(
            err.to_lowercase().contains(&what.to_lowercase()) || what == "redis",
            "{what}: {err}"
        );
    }
}

/// The examples, as CI runs them: each starts three copies of its own, then checks exactly-once
/// itself (exit code 0) and says so.
#[test]
fn the_examples_run_exactly_once() {
    let redis = RedisServer::start().expect("start redis-server");
    let examples = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("examples"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let orders = dir.path().join("orders.jsonl");
    let text: String = (0..600)
        .map(|i| {
            format!(
                "{{\"order\":{i},\"amount\":{},\"note\":\"a:b\"}}\n",
                (i * 37) % 101 - 10
            )
        })
        .collect();
    std::fs::write(&orders, text).unwrap();
    let out = dir.path().join("out.txt");
    let runs = [
        (
            "append_to_file",
            vec![
                redis.url(),
                "ex1".into(),
                out.display().to_string(),
                "3000".into(),
            ],
        ),
        (
            "json_lines",
            vec![redis.url(), "ex2".into(), orders.display().to_string()],
        ),
    ];
    for (name, args) in runs {
        let output = std::process::Command::new(examples.join(name))
            .args(&args)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "run example {name} from {}: {e} (scripts/test.sh builds them first: \
                     cargo build --release --examples)",
                    examples.display()
                )
            });
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains(", 0 problems"),
            "{name}: {:?}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Never returns for ids divisible by 3, panics for ids 1 mod 3, succeeds otherwise.
struct Unruly;

impl Handler for Unruly {
    async fn handle(&self, message: Message) -> Result<(), Failure> {
        match message.id % 3 {
            0 => std::future::pending().await,
            1 => panic!("unruly {}", message.id),
            _ => Ok(()),
        }
    }
}

/// A handler future that never finishes fails its message with "handler timeout" once the
/// timeout passes, and one that panics fails it with the panic's text; the copy goes on and
/// every message gets exactly one outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_and_panicking_handlers_fail_their_messages_once() {
    // With RUST_BACKTRACE=1 (as in CI) the default hook prints a backtrace for each of the 20
    // planned panics; they are silenced, and any other panic reports as usual.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let planned = info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|m| m.starts_with("unruly "));
        if !planned {
            default_hook(info)
        }
    }));
    let redis = RedisServer::start().expect("start redis-server");
    let stop = CancellationToken::new();
    let node = Node::builder(redis.url())
        .namespace("unruly")
        .interval_ms(0)
        .max_messages(60)
        .handler_timeout_ms(300)
        .handler(Unruly)
        .build()
        .unwrap();
    let copy = tokio::spawn(node.run(stop.clone()));
    // Either copy may win the lease, so both generate as fast as taken (the builder's default
    // is the task's 500 ms: when this copy won the lease, 60 messages took 30 s and the test
    // gave up after 15).
    let second = Node::builder(redis.url())
        .namespace("unruly")
        .interval_ms(0)
        .max_messages(60)
        .handler(Unruly)
        .handler_timeout_ms(300)
        .build()
        .unwrap();
    let copy2 = tokio::spawn(second.run(stop.clone()));
    let keys = Keys::new("unruly").unwrap();
    let mut con = conn::connect(&redis.url(), 5000).await.unwrap();
    let mut c = Counters::default();
    for _ in 0..300 {
        c = Counters::read(&mut con, &keys).await.unwrap();
        if c.processed + c.errors >= 60 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    copy.await.unwrap().expect("clean stop");
    copy2.await.unwrap().expect("clean stop");
    let c2 = Counters::read(&mut con, &keys).await.unwrap();
    assert_eq!(c, c2, "nothing more after the stop");
    assert_eq!((c.processed, c.errors, c.timeouts), (20, 40, 20), "{c:?}");
    assert_eq!(c.duplicates, 0);
    let config = DrainConfig {
        chunk: 100,
        lock_ms: 5000,
        token: "test".into(),
        retry_for: Duration::from_secs(5),
    };
    let mut failed: Vec<ErrorEntry> = Vec::new();
    errors::drain(&mut con, &keys, &config, &mut failed)
        .await
        .unwrap();
    let mut ids: Vec<u64> = failed.iter().map(|e| e.line().parse().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..60).filter(|i| i % 3 != 2).collect::<Vec<_>>());
    for e in &failed {
        let id: u64 = e.line().parse().unwrap();
        let want = match id % 3 {
            0 => "handler timeout".to_string(),
            _ => format!("handler panicked: unruly {id}"),
        };
        assert_eq!(e.reason, want);
    }
}
