//! The process driver: starts Redis and the `app` copies, executes the kill plan, waits for the
//! run to complete (bounded), collects what Redis recorded, and hands it to the checker and the
//! report writer. It judges nothing itself.

use crate::report::{self, KillEvent, Percentiles, Summary, Timeline};
use crate::Flags;
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use leaderq::inspect;
use leaderq::procs::{self, AppProcess, RedisServer};
use leaderq::stats::Latencies;
use leaderq::verify::{self, Observed};
use leaderq::{conn, Keys};
use rand::{Rng, SeedableRng};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How a run ended, for the exit code.
pub enum End {
    /// The checker found nothing wrong.
    Pass,
    /// The checker found a violation.
    Violation,
    /// The run did not complete within `--timeout-s`.
    Timeout,
}

/// How often the driver looks at Redis (progress, kill plan, crash detection).
const TICK: Duration = Duration::from_millis(50);
/// How long a kill may wait for the generator to finish its leftover handler work.
const KILL_WAIT_MAX: Duration = Duration::from_secs(3);

/// One planned or executed generator kill.
struct Kill {
    /// Kill once this many messages have been generated: mid-generation, so the failover
    /// (kill → the successor's first message) is measured while there is work to generate.
    at_generated: u64,
    /// Seconds since the start when it happened.
    t_s: f64,
    /// The epoch of the killed generator.
    epoch: u64,
    /// Redis time just before the SIGKILL, µs.
    redis_us: u64,
}

/// The seeded kill plan: `kills` generation points drawn uniformly from 10 %..90 % of the ids.
fn kill_plan(seed: u64, messages: u64, kills: u32) -> Vec<u64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x6b69_6c6c);
    let mut plan: Vec<u64> = (0..kills)
        .map(|_| (messages as f64 * rng.random_range(0.1..0.9)) as u64)
        .collect();
    plan.sort_unstable();
    plan
}

/// The arguments every `app` copy gets.
fn app_args(flags: &Flags, url: &str, namespace: &str, seed: u64) -> Vec<String> {
    [
        ("--redis-url", url.to_string()),
        ("--namespace", namespace.to_string()),
        ("--interval-ms", "0".into()),
        ("--max-messages", flags.messages.to_string()),
        ("--seed", seed.to_string()),
        ("--error-rate", flags.error_rate.to_string()),
        (
            "--handler-delay-max-ms",
            flags.handler_delay_max_ms.to_string(),
        ),
        ("--max-in-flight", flags.max_in_flight.to_string()),
        ("--batch", flags.batch.to_string()),
        ("--lease-ms", flags.lease_ms.to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v])
    .collect()
}

/// Peak resident set of a process so far (VmHWM), MB; 0 when unreadable.
fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Runs the whole simulation.
pub async fn run(flags: &Flags, seed: u64) -> anyhow::Result<End> {
    let started_utc = report::utc_iso8601(report::unix_now_s());
    let report_dir = flags
        .report_dir
        .clone()
        .unwrap_or_else(|| report::default_report_dir(seed));
    let log_dir = report_dir.join("logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let app_bin: PathBuf = match &flags.app_bin {
        Some(p) => p.clone(),
        None => procs::sibling_app_binary()
            .context("cannot find the app binary next to sim; pass --app-bin")?,
    };
    let kills_planned = if flags.kill_leader { flags.kills } else { 0 };
    let plan = kill_plan(seed, flags.messages, kills_planned);
    eprintln!(
        "sim: messages={} processes={} kills at generated ids {:?} error_rate={} handler_delay_max_ms={} report={}",
        flags.messages,
        flags.processes,
        plan,
        flags.error_rate,
        flags.handler_delay_max_ms,
        report_dir.display()
    );

    let server = match &flags.redis_url {
        Some(_) => None,
        None => Some(RedisServer::start().context("starting redis-server")?),
    };
    let url = match (&server, &flags.redis_url) {
        (Some(s), _) => s.url(),
        (None, Some(u)) => u.clone(),
        (None, None) => unreachable!("one of the two is set"),
    };
    let namespace = format!("sim-{seed}-{}", std::process::id());
    let keys = Keys::new(&namespace)?;
    let mut con = conn::connect(&url, 5000).await?;
    let redis_version = inspect::info(&mut con, "server")
        .await?
        .remove("redis_version")
        .unwrap_or_default();
    let (calls_before, scripts_before) = inspect::command_calls(&mut con).await?;

    let args = app_args(flags, &url, &namespace, seed);
    let spawn = |name: String| -> anyhow::Result<AppProcess> {
        let log = log_dir.join(format!("{name}.log"));
        AppProcess::spawn(&app_bin, &name, &args, Some(&log))
            .with_context(|| format!("starting {}", app_bin.display()))
    };
    let mut apps: Vec<AppProcess> = (0..flags.processes)
        .map(|i| spawn(format!("app{i}")))
        .collect::<anyhow::Result<_>>()?;

    let progress = Progress::new(flags.messages, flags.quiet);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(flags.timeout_s);
    let mut timeline = Timeline {
        samples: vec![(0.0, 0)],
    };
    let mut kills: Vec<Kill> = plan
        .iter()
        .map(|&at_generated| Kill {
            at_generated,
            t_s: 0.0,
            epoch: 0,
            redis_us: 0,
        })
        .collect();
    let mut next_kill = 0usize;
    let mut kill_waiting_since: Option<Instant> = None;
    let mut rss_mb_max = 0.0f64;
    let mut replacements = 0u32;
    let mut timed_out = false;
    loop {
        tokio::time::sleep(TICK).await;
        let counters = leaderq::stats::Counters::read(&mut con, &keys).await?;
        let done = counters.processed + counters.errors + counters.bad;
        let t_s = started.elapsed().as_secs_f64();
        timeline.samples.push((t_s, done));
        progress.update(done, next_kill, kills.len());
        for app in apps.iter_mut() {
            rss_mb_max = rss_mb_max.max(peak_rss_mb(app.pid()));
            if !app.is_running() {
                progress.finish();
                bail!(
                    "app {} exited unexpectedly; see {}",
                    app.instance_id,
                    log_dir.join(format!("{}.log", app.instance_id)).display()
                );
            }
        }
        if done >= flags.messages {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        if next_kill < kills.len() && counters.generated >= kills[next_kill].at_generated {
            let Some((epoch, idx)) = current_generator(&mut con, &keys, &apps).await? else {
                continue; // a failover is in progress: no generator to kill this tick
            };
            // A fresh generator may still be finishing messages it fetched as a handler; killing
            // it then would make those re-run. Wait (bounded) until it is a pure generator.
            let busy = inspect::in_flight_matching(
                &mut con,
                &keys,
                &format!("{}.*", apps[idx].instance_id),
            )
            .await?;
            let waited = kill_waiting_since
                .get_or_insert_with(Instant::now)
                .elapsed();
            if busy > 0 && waited < KILL_WAIT_MAX {
                continue;
            }
            kill_waiting_since = None;
            let redis_us = inspect::redis_time_us(&mut con).await?;
            apps[idx].kill();
            let k = &mut kills[next_kill];
            k.t_s = started.elapsed().as_secs_f64();
            k.epoch = epoch;
            k.redis_us = redis_us;
            progress.note(&format!(
                "killed generator {} (epoch {epoch}, {busy} in flight) at {done} outcomes",
                apps[idx].instance_id
            ));
            replacements += 1;
            apps[idx] = spawn(format!(
                "app{}r{replacements}",
                flags.processes + replacements - 1
            ))?;
            next_kill += 1;
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    progress.finish();

    // Stop every copy cleanly (they publish their latency histograms on the way out).
    for app in &apps {
        let _ = app.signal(libc::SIGTERM);
    }
    for app in apps.iter_mut() {
        if tokio::task::block_in_place(|| app.wait_timeout(Duration::from_secs(20)))?.is_none() {
            eprintln!(
                "sim: {} did not stop within 20 s of SIGTERM; killing it",
                app.instance_id
            );
            app.kill();
        }
    }

    let error_lines = get_errors(&app_bin, &url, &namespace).await?;
    let snap = inspect::snapshot(&mut con, &keys).await?;
    let latencies = Latencies::collect(&mut con, &keys).await?;
    let memory = inspect::info(&mut con, "memory").await?;
    let (calls_after, scripts_after) = inspect::command_calls(&mut con).await?;
    let executed: Vec<&Kill> = kills.iter().take(next_kill).collect();
    let observed = Observed::from_snapshot(
        &snap,
        flags.messages,
        seed,
        flags.error_rate,
        flags.handler_delay_max_ms,
        error_lines,
        0,
    )
    .map_err(anyhow::Error::msg)?;
    // Failover: from the Redis time of the SIGKILL to the first message of the next epoch.
    let failover_ms: Vec<f64> = executed
        .iter()
        .filter_map(|k| {
            observed
                .epoch_log
                .iter()
                .filter(|b| b.epoch > k.epoch)
                .min_by_key(|b| b.epoch)
                .map(|b| b.time_us.saturating_sub(k.redis_us) as f64 / 1000.0)
        })
        .collect();
    let c = snap.counters;
    let verdict = verify::check(&observed);
    let messages_done = (c.processed + c.errors).max(1) as f64;
    let summary = Summary {
        seed,
        commit: git_commit(),
        messages: flags.messages,
        processes: flags.processes as u64,
        leader_kills: executed.len() as u64,
        worker_kills: 0,
        processed: verdict.processed,
        errors: verdict.errors,
        missing: verdict.missing,
        duplicates: verdict.duplicates,
        unexpected: verdict.unexpected,
        handler_runs: c.runs,
        reruns: verdict.reruns,
        elapsed_s,
        throughput_msgs_per_s: c.processed.saturating_add(c.errors) as f64 / elapsed_s,
        failover_ms: failover_ms.clone(),
        latency_ms: Percentiles::from_histogram_us(&latencies.end_to_end_us),
        queue_wait_ms: Percentiles::from_histogram_us(&latencies.queue_wait_us),
        verdict: if verdict.pass && !timed_out {
            "pass"
        } else {
            "fail"
        }
        .into(),
        violations: verdict.violations.clone(),
        started_utc,
        error_rate: flags.error_rate,
        handler_delay_max_ms: flags.handler_delay_max_ms,
        max_in_flight: flags.max_in_flight,
        batch: flags.batch,
        redis_version,
        redis_used_memory_peak_bytes: memory
            .get("used_memory_peak")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        redis_commands_per_msg: calls_after.saturating_sub(calls_before) as f64 / messages_done,
        redis_scripts_per_msg: scripts_after.saturating_sub(scripts_before) as f64 / messages_done,
        app_peak_rss_mb: rss_mb_max,
        command_line: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let kill_events: Vec<KillEvent> = executed
        .iter()
        .enumerate()
        .map(|(i, k)| KillEvent {
            t_s: k.t_s,
            kind: "leader".into(),
            failover_ms: failover_ms.get(i).copied(),
        })
        .collect();
    report::write_report(
        &report_dir,
        &summary,
        &latencies.end_to_end_us,
        &latencies.queue_wait_us,
        &timeline,
        &kill_events,
    )?;
    print_summary(&summary, &report_dir);
    drop(server);
    Ok(if timed_out {
        eprintln!(
            "sim: LIVENESS FAILURE: {} of {} outcomes after {} s",
            c.processed + c.errors,
            flags.messages,
            flags.timeout_s
        );
        End::Timeout
    } else if verdict.pass {
        End::Pass
    } else {
        End::Violation
    })
}

/// The generator right now: its epoch and its index in `apps`, from the lease value.
async fn current_generator(
    con: &mut conn::Conn,
    keys: &Keys,
    apps: &[AppProcess],
) -> anyhow::Result<Option<(u64, usize)>> {
    let Some(value) = leaderq::lease::holder(con, keys).await? else {
        return Ok(None);
    };
    let Some((epoch, instance)) = value.split_once(':') else {
        bail!("lease value {value:?} is not epoch:instance");
    };
    let epoch: u64 = epoch
        .parse()
        .with_context(|| format!("lease value {value:?}"))?;
    Ok(apps
        .iter()
        .position(|a| a.instance_id == instance)
        .map(|i| (epoch, i)))
}

/// Runs the real `app getErrors` and returns its stdout lines.
async fn get_errors(app_bin: &Path, url: &str, namespace: &str) -> anyhow::Result<Vec<String>> {
    let out = tokio::process::Command::new(app_bin)
        .args(["getErrors", "--redis-url", url, "--namespace", namespace])
        .kill_on_drop(true)
        .output()
        .await
        .context("running app getErrors")?;
    if !out.status.success() {
        bail!(
            "app getErrors failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

fn print_summary(s: &Summary, dir: &Path) {
    println!(
        "verdict={} messages={} processed={} errors={} missing={} duplicates={} unexpected={} handler_runs={}",
        s.verdict, s.messages, s.processed, s.errors, s.missing, s.duplicates, s.unexpected, s.handler_runs
    );
    println!(
        "elapsed_s={:.2} throughput_msgs_per_s={:.0} leader_kills={} failover_ms={:?}",
        s.elapsed_s,
        s.throughput_msgs_per_s,
        s.leader_kills,
        s.failover_ms.iter().map(|f| f.round()).collect::<Vec<_>>()
    );
    println!(
        "latency_ms p50={:.1} p99={:.1} max={:.1}; queue_wait_ms p50={:.1} p99={:.1}; redis commands/msg={:.2} scripts/msg={:.4}",
        s.latency_ms.p50, s.latency_ms.p99, s.latency_ms.max, s.queue_wait_ms.p50, s.queue_wait_ms.p99, s.redis_commands_per_msg, s.redis_scripts_per_msg
    );
    for v in &s.violations {
        println!("violation: {v}");
    }
    println!("report: {}", dir.display());
}

/// A progress bar on a terminal, a plain line every 2 s otherwise, nothing with --quiet.
struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    total: u64,
    last_line: std::cell::Cell<Option<Instant>>,
}

impl Progress {
    fn new(total: u64, quiet: bool) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = (!quiet && terminal).then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:40}] {pos}/{len} {per_sec} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
        Progress {
            bar,
            plain: !quiet && !terminal,
            total,
            last_line: std::cell::Cell::new(None),
        }
    }

    fn update(&self, done: u64, kills_done: usize, kills: usize) {
        if let Some(b) = &self.bar {
            b.set_position(done);
            b.set_message(format!("kills {kills_done}/{kills}"));
        } else if self.plain
            && self
                .last_line
                .get()
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(2))
        {
            self.last_line.set(Some(Instant::now()));
            eprintln!(
                "sim: {done}/{} outcomes, kills {kills_done}/{kills}",
                self.total
            );
        }
    }

    fn note(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(format!("sim: {msg}")),
            None if self.plain => eprintln!("sim: {msg}"),
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
