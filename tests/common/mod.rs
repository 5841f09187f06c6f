//! Shared test fixtures: a real `redis-server` per test, real `app` processes, and the one
//! verifier (`leaderq::testkit::verify`) applied to what Redis recorded.
#![allow(dead_code)]

use leaderq::testkit::procs::{AppProcess, RedisServer};
use leaderq::testkit::verify::{self, Observed, Verdict};
use leaderq::{conn, Keys};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const NS: &str = "t";

pub fn app_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_app"))
}

/// One workload, written once: the flags every copy gets and, from the same values, what the
/// verifier predicts (so the two cannot drift apart). Messages come as fast as they are taken
/// (`--interval-ms 0`), with the task's 15 % error rate.
pub struct Workload {
    pub messages: u64,
    pub seed: u64,
    pub error_rate: f64,
    pub delay_max_ms: u64,
    rendered: Vec<String>,
}

impl Workload {
    /// `messages` messages, the handler seeded with `seed` and delayed 0..`delay_max_ms`, plus
    /// `extra` flags for every copy.
    pub fn new(messages: u64, seed: u64, delay_max_ms: u64, extra: &[&str]) -> Workload {
        let error_rate = 0.15;
        let mut rendered: Vec<String> = vec![
            "--interval-ms".into(),
            "0".into(),
            "--max-messages".into(),
            messages.to_string(),
            "--seed".into(),
            seed.to_string(),
            "--error-rate".into(),
            error_rate.to_string(),
            "--handler-delay-max-ms".into(),
            delay_max_ms.to_string(),
        ];
        rendered.extend(extra.iter().map(|s| s.to_string()));
        Workload {
            messages,
            seed,
            error_rate,
            delay_max_ms,
            rendered,
        }
    }

    /// The app flags, for [`Fixture::spawn`] and friends.
    pub fn flags(&self) -> Vec<&str> {
        self.rendered.iter().map(String::as_str).collect()
    }
}

/// A Redis for this test only, plus the app processes it starts; all killed on drop.
pub struct Fixture {
    pub redis: RedisServer,
    pub apps: Vec<AppProcess>,
    pub logs: tempfile::TempDir,
    pub keys: Keys,
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::with_redis(RedisServer::start().expect("start redis-server"))
    }

    /// A fixture around a server started with settings of the test's own.
    pub fn with_redis(redis: RedisServer) -> Fixture {
        Fixture {
            redis,
            apps: Vec::new(),
            logs: tempfile::tempdir().expect("tempdir"),
            keys: Keys::new(NS).unwrap(),
        }
    }

    pub fn url(&self) -> String {
        self.redis.url()
    }

    pub async fn con(&self) -> conn::Conn {
        conn::connect(&self.url(), 5000).await.expect("connect")
    }

    /// A connection, and the namespace joined on it as a copy would (for tests that call the
    /// library's script wrappers directly).
    pub async fn joined(&self) -> (conn::Conn, leaderq::node::incarnation::Incarnation) {
        let mut con = self.con().await;
        let inc = leaderq::node::incarnation::Incarnation::join(&mut con, &self.keys, false)
            .await
            .expect("join");
        (con, inc)
    }

    /// Common flags plus `extra`.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["--redis-url", &self.url(), "--namespace", NS]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Starts an app copy named `name`; returns its index in `apps`.
    pub fn spawn(&mut self, name: &str, extra: &[&str]) -> usize {
        let log = self.logs.path().join(format!("{name}.log"));
        let app =
            AppProcess::spawn(&app_bin(), name, &self.args(extra), Some(&log)).expect("spawn app");
        self.apps.push(app);
        self.apps.len() - 1
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits (polling every 20 ms, at most `bound`) until `n` outcomes are recorded.
    pub async fn wait_outcomes(&self, n: u64, bound: Duration) -> Option<()> {
        let con = self.con().await;
        let keys = self.keys.clone();
        wait_for(bound, || {
            let (mut con, keys) = (con.clone(), keys.clone());
            async move { (outcomes(&mut con, &keys).await >= n).then_some(()) }
        })
        .await
    }

    /// Starts one app copy per name, all with the same flags.
    pub fn spawn_all(&mut self, names: &[&str], extra: &[&str]) {
        for name in names {
            self.spawn(name, extra);
        }
    }

    /// Index of the app whose instance id holds the lease, with the epoch.
    pub async fn generator(&self, con: &mut conn::Conn) -> Option<(u64, usize)> {
        let value = leaderq::node::lease::holder(con, &self.keys).await.ok()??;
        let (epoch, instance) = value.split_once(':')?;
        let i = self.apps.iter().position(|a| a.instance_id == instance)?;
        Some((epoch.parse().ok()?, i))
    }

    /// SIGTERMs every app and waits for all to exit (bounded); returns their exit codes.
    pub fn stop_all(&mut self) -> Vec<Option<i32>> {
        for a in &self.apps {
            let _ = a.signal(libc::SIGTERM);
        }
        self.apps
            .iter_mut()
            .map(|a| match a.wait_timeout(Duration::from_secs(20)) {
                Ok(Some(status)) => status.code(),
                Ok(None) => {
                    a.kill();
                    None
                }
                Err(_) => None,
            })
            .collect()
    }

    /// Runs `app getErrors` to completion and returns its stdout lines.
    pub fn get_errors(&self) -> Vec<String> {
        let out = std::process::Command::new(app_bin())
            .arg("getErrors")
            .args(self.args(&[]))
            .output()
            .expect("run getErrors");
        assert!(
            out.status.success(),
            "getErrors failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Drains the error store and checks everything the verifier checks.
    /// The verdict on what Redis and `getErrors` hold after `work` ran, with `worker_kills`
    /// disruptions allowed to re-run messages.
    pub async fn verdict(&self, work: &Workload, worker_kills: u64) -> (Verdict, Observed) {
        let error_lines = self.get_errors();
        let mut con = self.con().await;
        let snap = leaderq::testkit::snapshot::snapshot(&mut con, &self.keys)
            .await
            .expect("snapshot");
        let observed = Observed::from_snapshot(
            &snap,
            work.messages,
            work.seed,
            work.error_rate,
            work.delay_max_ms,
            leaderq::testkit::verify::Printed::all_deleted(error_lines),
            worker_kills,
        )
        .expect("epoch log parses");
        (verify::check(&observed), observed)
    }
}

/// Runs the real `sim` (with the real `app`) writing its report to `report`; returns its output.
pub fn run_sim(report: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sim"))
        .args(args)
        .arg("--report-dir")
        .arg(report)
        .arg("--app-bin")
        .arg(app_bin())
        .output()
        .expect("run sim")
}

/// Polls `f` every 20 ms until it returns `Some`, at most `bound`.
pub async fn wait_for<T, F, Fut>(bound: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Outcomes recorded so far.
pub async fn outcomes(con: &mut conn::Conn, keys: &Keys) -> u64 {
    let c = leaderq::stats::Counters::read(con, keys)
        .await
        .expect("counters");
    c.processed + c.errors
}

impl Fixture {
    /// Runs `app <command> <common flags> <extra>` to completion (bounded by the command itself:
    /// status and getErrors end on their own).
    pub fn run_command(&self, command: &str, extra: &[&str]) -> std::process::Output {
        std::process::Command::new(app_bin())
            .arg(command)
            .args(self.args(extra))
            .output()
            .expect("run app")
    }

    /// `app status --json`, parsed; panics with stderr when it fails.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.run_command("status", &["--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status --json prints one JSON object")
    }
}

/// A port that was free a moment ago (for `--metrics-addr`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// Plain HTTP/1.0 GET over a std `TcpStream` (2 s timeouts); the body, or `None` on any failure.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let socket: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&socket, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status_line = head.lines().next()?;
    (status_line.starts_with("HTTP/1.") && status_line.contains(" 200 ")).then(|| body.to_string())
}

/// Prometheus text format → `series -> value` (series = name plus any `{labels}`).
pub fn parse_prometheus(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}
