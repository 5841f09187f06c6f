//! The process driver: starts Redis and the `app` copies, executes the kill plan, waits for the
//! run to complete (bounded), collects what Redis recorded, and hands it to the checker and the
//! report writer. It judges nothing itself.

use crate::faults::{self, Fault, FaultKind};
use crate::progress::Progress;
use crate::report::{self, KillEvent, Percentiles, Summary, Timeline};
use crate::Flags;
use anyhow::{bail, Context};
use leaderq::inspect;
use leaderq::stats::Latencies;
use leaderq::testkit::procs::{self, AppProcess, RedisServer};
use leaderq::testkit::verify::{self, Observed};
use leaderq::{conn, Keys};
use rand::{Rng, SeedableRng};
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
    /// The verdict passed, but some planned faults were never executed.
    FaultsMissed,
}

/// How often the driver looks at Redis (progress, fault plan, crash detection, reclaims).
const TICK: Duration = Duration::from_millis(10);
/// How long a generator fault may wait for the generator to finish its leftover handler work.
const PURE_GENERATOR_WAIT_MAX: Duration = Duration::from_secs(3);
/// How long the run may wait, once every message has an outcome, for planted duplicates to be
/// run and refused (a reconciliation adopts them within 2 s).
const SETTLE_WAIT_MAX: Duration = Duration::from_secs(10);
/// Without a new outcome for this long, the driver looks whether the run can still complete.
const STALL_CHECK_AFTER: Duration = Duration::from_secs(1);
/// Every id generated, nothing queued or in flight, outcomes missing, for this long: stalled.
/// (Longer than a reconciliation period, so an adoption in progress is not mistaken for it.)
const STALL_NOWHERE_FOR: Duration = Duration::from_secs(5);
/// How long the driver watches a killed handler's in-flight sets for the reclaim.
const RECLAIM_WATCH_MAX: Duration = Duration::from_secs(30);

/// After a fault that makes Redis lose data: what the run waits for (every copy exiting with
/// code 5) and what must hold afterwards (nothing generated after the loss).
struct HaltWatch {
    /// What happened, for the report: "redis wipe at N outcomes".
    what: String,
    /// When the fault happened.
    since: Instant,
    /// `next_id` right after the loss (absent = 0 after a wipe; the snapshot's after a rollback):
    /// it must still be this when every copy has stopped.
    next_id_after_loss: u64,
    /// `next_id` just before the loss, for the report.
    next_id_before_loss: u64,
}

/// How long the copies may take to halt after Redis lost data.
const HALT_WAIT_MAX: Duration = Duration::from_secs(20);

/// The exit code of an `app` that halted because Redis lost data.
const APP_EXIT_HALTED: i32 = 5;

/// The arguments every `app` copy gets. The Redis URL is not among them: it goes through the
/// `REDIS_URL` environment variable, so a password in it never shows in `ps`.
fn app_args(flags: &Flags, namespace: &str, seed: u64) -> Vec<String> {
    [
        ("--namespace", namespace.to_string()),
        ("--interval-ms", flags.interval_ms.to_string()),
        ("--queue-max", flags.queue_max.to_string()),
        ("--max-messages", flags.messages.to_string()),
        ("--seed", seed.to_string()),
        ("--error-rate", flags.error_rate.to_string()),
        (
            "--handler-delay-max-ms",
            flags.handler_delay_max_ms.to_string(),
        ),
        ("--handler-timeout-ms", flags.handler_timeout_ms.to_string()),
        ("--max-in-flight", flags.max_in_flight.to_string()),
        ("--batch", flags.batch.to_string()),
        ("--lease-ms", flags.lease_ms.to_string()),
        ("--heartbeat-ms", flags.heartbeat_ms.to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v])
    .collect()
}

/// Peak resident set of a process so far (VmHWM), MB; 0 when unreadable.
/// CPU time a process has used so far (user + system), seconds; 0 when unreadable.
fn cpu_s(pid: u32) -> f64 {
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0)
}

/// Redis's own CPU time so far (INFO cpu), seconds.
async fn redis_cpu_s(con: &mut conn::Conn) -> f64 {
    let Ok(info) = inspect::info(con, "cpu").await else {
        return 0.0;
    };
    ["used_cpu_user", "used_cpu_sys"]
        .iter()
        .filter_map(|k| info.get(*k)?.parse::<f64>().ok())
        .sum()
}

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
    let mut faults = faults::plan_for(flags, seed);
    let plan: Vec<String> = faults
        .iter()
        .map(|f| format!("{}@{}", f.kind.label(), f.at))
        .collect();
    eprintln!(
        "sim: messages={} processes={} error_rate={} handler_delay_max_ms={} report={}",
        flags.messages,
        flags.processes,
        flags.error_rate,
        flags.handler_delay_max_ms,
        report_dir.display()
    );
    eprintln!(
        "sim: fault plan (trigger = generated ids for leader faults, outcomes otherwise): {plan:?}"
    );

    let mut server = match &flags.redis_url {
        Some(_) => None,
        None if flags.restart_redis > 0 => Some(
            RedisServer::start_with(&[
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                // A torn last transaction is repaired before the restart (see
                // RedisServer::crash_and_restart), never half-replayed.
                "--aof-load-truncated",
                "no",
            ])
            .context("starting redis-server with an AOF")?,
        ),
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
    // The copies go through the reply-losing proxy when asked; the sim and getErrors do not.
    let proxy = match flags.lose_replies + flags.partition_leader {
        0 => None,
        _ => {
            let upstream = url_socket_addr(&url)?;
            Some(
                crate::proxy::Proxy::start(upstream)
                    .await
                    .context("starting the proxy")?,
            )
        }
    };
    let app_url = proxy.as_ref().map_or_else(|| url.clone(), |p| p.url());
    let redis_version = inspect::info(&mut con, "server")
        .await?
        .remove("redis_version")
        .unwrap_or_default();
    let (calls_before, scripts_before) = inspect::command_calls(&mut con).await?;
    let redis_cpu_before_s = redis_cpu_s(&mut con).await;
    // Last CPU reading of every app process ever started, by pid (killed ones keep their last).
    let mut app_cpu_s: std::collections::HashMap<u32, f64> = std::collections::HashMap::new();

    let args = app_args(flags, &namespace, seed);
    let spawn = |name: String| -> anyhow::Result<AppProcess> {
        let log = log_dir.join(format!("{name}.log"));
        AppProcess::spawn_with_env(
            &app_bin,
            &name,
            &args,
            &[("REDIS_URL", &app_url)],
            Some(&log),
        )
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
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x7069_636b);
    let mut waiting_since: Option<Instant> = None;
    let mut resumes: Vec<(u32, Instant)> = Vec::new();
    let mut watched: Vec<(String, Instant)> = Vec::new();
    let mut reclaim_ms: Vec<f64> = Vec::new();
    let mut disruptions = 0u64;
    let mut rss_mb_max = 0.0f64;
    let mut spawned = flags.processes;
    let mut timed_out = false;
    let mut last_counters = leaderq::stats::Counters::default();
    let mut redis_errors = 0u32;
    let mut aof_repairs = 0u64;
    let mut halt: Option<HaltWatch> = None;
    let mut drains = crate::drains::Drains::new(seed, &app_bin, &url, &namespace);
    let mut injected = 0u64;
    let mut settle_since: Option<Instant> = None;
    let (mut last_done, mut progressed_at) = (0u64, Instant::now());
    let mut stalled: Option<String> = None;
    // No outcome for this long means stuck: well past the longest handler run and any recovery.
    let stuck_max =
        Duration::from_millis(2 * flags.handler_delay_max_ms.min(flags.handler_timeout_ms))
            + Duration::from_secs(20);
    loop {
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        for (pid, _) in resumes.iter().filter(|(_, due)| *due <= now) {
            let _ = procs::signal(*pid, libc::SIGCONT);
            progress.note(&format!("resumed paused pid {pid}"));
        }
        resumes.retain(|(_, due)| *due > now);
        for app in apps.iter_mut() {
            rss_mb_max = rss_mb_max.max(peak_rss_mb(app.pid()));
            let used = cpu_s(app.pid());
            if used > 0.0 {
                app_cpu_s.insert(app.pid(), used);
            }
            if halt.is_some() {
                continue; // exits are expected now; judged when the wait ends
            }
            if !app.is_running() {
                progress.finish();
                bail!(
                    "app {} exited unexpectedly; see {}",
                    app.instance_id,
                    log_dir.join(format!("{}.log", app.instance_id)).display()
                );
            }
        }
        // Redis may be restarting: keep the last counters and try again next tick.
        let counters = match leaderq::stats::Counters::read(&mut con, &keys).await {
            Ok(c) => {
                redis_errors = 0;
                c
            }
            Err(e) => {
                redis_errors += 1;
                if redis_errors.is_power_of_two() {
                    progress.note(&format!("redis not answering ({e}); retrying"));
                }
                last_counters
            }
        };
        last_counters = counters;
        let done = counters.processed + counters.errors + counters.bad + counters.poisoned;
        let t_s = started.elapsed().as_secs_f64();
        timeline.samples.push((t_s, done));
        let executed = faults.iter().filter(|f| f.done).count();
        progress.update(done, executed, faults.len());
        if let Some(h) = &halt {
            let running = apps
                .iter_mut()
                .map(|a| a.is_running())
                .filter(|r| *r)
                .count();
            if running == 0 || h.since.elapsed() >= HALT_WAIT_MAX {
                break;
            }
            continue;
        }
        if redis_errors == 0 {
            watch_reclaims(&mut con, &keys, &mut watched, &mut reclaim_ms, &progress).await;
        }
        // Done once every message has its outcome, and every planted duplicate has been caught
        // by the defence (bounded: the verdict says so if one never is).
        if done >= flags.messages {
            let settled = counters.duplicates >= injected;
            let waited = *settle_since.get_or_insert(now);
            if settled || now.duration_since(waited) >= SETTLE_WAIT_MAX {
                break;
            }
        }
        if now >= deadline {
            timed_out = true;
            break;
        }
        // A run that can no longer complete ends now, not at the deadline: every id generated,
        // none waiting or in flight, some without an outcome (they are nowhere); or no outcome
        // at all for longer than any handler or recovery takes.
        if done != last_done {
            (last_done, progressed_at) = (done, now);
        } else if now.duration_since(progressed_at) >= STALL_CHECK_AFTER && redis_errors == 0 {
            let snap = leaderq::testkit::snapshot::snapshot(&mut con, &keys).await?;
            let nowhere =
                counters.generated >= flags.messages && snap.queue_len == 0 && snap.in_flight == 0;
            let idle_for = now.duration_since(progressed_at);
            if nowhere && idle_for >= STALL_NOWHERE_FOR {
                stalled = Some(format!(
                    "{} messages are nowhere: every id was generated, none is queued or in flight, and they have no outcome",
                    flags.messages - done
                ));
            } else if idle_for >= stuck_max {
                stalled = Some(format!(
                    "no outcome for {idle_for:?} with {} queued and {} in flight",
                    snap.queue_len, snap.in_flight
                ));
            }
            if stalled.is_some() {
                timed_out = true;
                break;
            }
        }
        if redis_errors > 0 {
            continue;
        }
        // Every due getErrors drain starts now (they disturb nothing); of the other faults, at
        // most one per tick. A due fault that cannot act yet (no pure generator, no busy handler)
        // does not hold up the others.
        for f in faults
            .iter_mut()
            .filter(|f| f.kind == FaultKind::DrainErrors && !f.done && done >= f.at)
        {
            let started_what = drains.start()?;
            (f.t_s, f.done) = (started.elapsed().as_secs_f64(), true);
            progress.note(&format!("getErrors at {done} outcomes: {started_what}"));
        }
        let due: Vec<usize> = (0..faults.len())
            .filter(|&i| {
                let f = &faults[i];
                !f.done
                    && if f.kind.on_generated() {
                        counters.generated >= f.at
                    } else {
                        done >= f.at
                    }
            })
            .collect();
        'due: for i in due {
            let kind = faults[i].kind;
            match kind {
                FaultKind::KillLeader | FaultKind::PauseLeader | FaultKind::PartitionLeader => {
                    let Some((epoch, idx)) = current_generator(&mut con, &keys, &apps).await?
                    else {
                        continue 'due; // a failover is in progress: no generator to hit this tick
                    };
                    if resumes.iter().any(|(pid, _)| *pid == apps[idx].pid()) {
                        continue 'due;
                    }
                    // A fresh generator may still be finishing messages it fetched as a handler;
                    // hitting it then would make those re-run. Wait (bounded) for a pure generator.
                    let busy = leaderq::testkit::snapshot::in_flight_matching(
                        &mut con,
                        &keys,
                        &format!("{}.*", apps[idx].instance_id),
                    )
                    .await?;
                    let waited = waiting_since.get_or_insert(now).elapsed();
                    if busy > 0 && waited < PURE_GENERATOR_WAIT_MAX {
                        continue 'due;
                    }
                    waiting_since = None;
                    if busy > 0 {
                        disruptions += 1;
                    }
                    let redis_us = inspect::redis_time_us(&mut con).await?;
                    let name = apps[idx].instance_id.clone();
                    match kind {
                        FaultKind::KillLeader => {
                            apps[idx].kill();
                            apps[idx] = spawn(format!("app{spawned}"))?;
                            spawned += 1;
                        }
                        FaultKind::PauseLeader => {
                            apps[idx].signal(libc::SIGSTOP)?;
                            resumes.push((apps[idx].pid(), now + pause_for(flags)));
                        }
                        _ => {
                            let proxy = proxy
                                .as_ref()
                                .context("the proxy runs with --partition-leader")?;
                            let Some(port) = lease_holder_port(&mut con, &keys).await? else {
                                continue 'due;
                            };
                            if !proxy.hold(port, pause_for(flags)) {
                                continue 'due;
                            }
                        }
                    }
                    let f = &mut faults[i];
                    (f.t_s, f.epoch, f.redis_us, f.done) =
                        (started.elapsed().as_secs_f64(), epoch, redis_us, true);
                    progress.note(&format!(
                        "{}: {name} (epoch {epoch}, {busy} in flight) at {} generated",
                        kind.label(),
                        counters.generated
                    ));
                }
                FaultKind::InjectDuplicate => {
                    let Some(planted) = plant_duplicate(&mut con, &keys, &apps, &mut rng).await?
                    else {
                        continue 'due;
                    };
                    injected += 1;
                    disruptions += 1;
                    let f = &mut faults[i];
                    (f.t_s, f.done) = (started.elapsed().as_secs_f64(), true);
                    progress.note(&format!("duplicate delivery: {planted} at {done} outcomes"));
                }
                FaultKind::PauseWorker => {
                    let Some((j, n)) =
                        busy_handler(&mut con, &keys, &apps, &resumes, &mut rng).await?
                    else {
                        continue 'due;
                    };
                    let name = apps[j].instance_id.clone();
                    apps[j].signal(libc::SIGSTOP)?;
                    let pause = Duration::from_millis(2 * flags.heartbeat_ms + 500);
                    resumes.push((apps[j].pid(), now + pause));
                    disruptions += 1;
                    let f = &mut faults[i];
                    (f.t_s, f.done) = (started.elapsed().as_secs_f64(), true);
                    progress.note(&format!(
                        "worker pause: {name} holding {n} messages stopped for {pause:?} at {done} outcomes (its messages are reclaimed; its late commits must be refused)"
                    ));
                }
                FaultKind::KillWorker => {
                    let Some((j, n)) =
                        busy_handler(&mut con, &keys, &apps, &resumes, &mut rng).await?
                    else {
                        continue 'due;
                    };
                    let name = apps[j].instance_id.clone();
                    apps[j].kill();
                    apps[j] = spawn(format!("app{spawned}"))?;
                    spawned += 1;
                    watched.push((name.clone(), Instant::now()));
                    disruptions += 1;
                    let f = &mut faults[i];
                    (f.t_s, f.done) = (started.elapsed().as_secs_f64(), true);
                    progress.note(&format!(
                        "worker kill: {name} holding {n} messages at {done} outcomes"
                    ));
                }
                FaultKind::DropConnections => {
                    let dropped: u64 = redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("TYPE")
                        .arg("normal")
                        .arg("SKIPME")
                        .arg("yes")
                        .query_async(&mut con)
                        .await?;
                    disruptions += 1;
                    let f = &mut faults[i];
                    (f.t_s, f.done) = (started.elapsed().as_secs_f64(), true);
                    progress.note(&format!(
                        "connection drop: {dropped} connections killed at {done} outcomes"
                    ));
                }
                FaultKind::DrainErrors => unreachable!("drains start above"),
                FaultKind::SnapshotRedis => {
                    let server = server
                        .as_ref()
                        .context("--rollback-redis needs the sim's own Redis")?;
                    redis::cmd("SAVE").query_async::<()>(&mut con).await?;
                    std::fs::copy(
                        server.dir().join("dump.rdb"),
                        server.dir().join("older.rdb"),
                    )
                    .context("keeping the snapshot")?;
                    let f = &mut faults[i];
                    (f.t_s, f.done) = (started.elapsed().as_secs_f64(), true);
                    progress.note(&format!("redis snapshot taken at {done} outcomes"));
                }
                FaultKind::RollbackRedis | FaultKind::WipeRedis => {
                    let server = server
                        .as_mut()
                        .context("--wipe-redis and --rollback-redis need the sim's own Redis")?;
                    let before = read_next_id(&mut con, &keys).await?;
                    let after = if kind == FaultKind::WipeRedis {
                        redis::cmd("FLUSHALL").query_async::<()>(&mut con).await?;
                        0
                    } else {
                        let older = server.dir().join("older.rdb");
                        let restored = snapshot_next_id(&older, &keys).await?;
                        tokio::task::block_in_place(|| {
                            server.crash_and_restart_with(|dir| {
                                std::fs::copy(&older, dir.join("dump.rdb")).map(|_| ())
                            })
                        })
                        .context("restarting redis-server from the older snapshot")?;
                        restored
                    };
                    disruptions += 1;
                    let f = &mut faults[i];
                    (f.t_s, f.done) = (started.elapsed().as_secs_f64(), true);
                    let what = format!(
                        "{} at {done} outcomes (next_id {before} -> {after})",
                        kind.label()
                    );
                    progress.note(&format!(
                        "{what}: every copy must now halt with exit code {APP_EXIT_HALTED}"
                    ));
                    halt = Some(HaltWatch {
                        what,
                        since: Instant::now(),
                        next_id_after_loss: after,
                        next_id_before_loss: before,
                    });
                }
                FaultKind::LoseReplies => {
                    let proxy = proxy
                        .as_ref()
                        .context("the proxy runs with --lose-replies")?;
                    let before = proxy.cuts();
                    proxy.lose_next_replies();
                    disruptions += 1;
                    let f = &mut faults[i];
                    (f.t_s, f.done) = (started.elapsed().as_secs_f64(), true);
                    progress.note(&format!(
                        "lost replies: every copy's connection loses its next reply, at {done} outcomes ({before} cut so far)"
                    ));
                }
                FaultKind::RestartRedis => {
                    let server = server
                        .as_mut()
                        .context("--restart-redis needs the sim's own Redis")?;
                    let began = Instant::now();
                    let repaired = tokio::task::block_in_place(|| server.crash_and_restart())
                        .context("restarting redis-server")?;
                    disruptions += 1;
                    aof_repairs += u64::from(repaired);
                    let f = &mut faults[i];
                    (f.t_s, f.done) = (started.elapsed().as_secs_f64(), true);
                    progress.note(&format!(
                        "redis restart: SIGKILLed and back from its AOF in {:?} at {done} outcomes{}",
                        began.elapsed(),
                        if repaired { " (torn last transaction cut by redis-check-aof --fix)" } else { "" }
                    ));
                }
            }
            break 'due;
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    progress.finish();
    for (pid, _) in resumes.drain(..) {
        let _ = procs::signal(pid, libc::SIGCONT);
    }
    if let Some(h) = halt {
        drop(drains); // their processes are killed on drop
        let base = Summary {
            seed,
            commit: git_commit(),
            messages: flags.messages,
            processes: flags.processes as u64,
            elapsed_s,
            started_utc,
            redis_version,
            command_line: std::env::args()
                .map(|a| conn::redact(&a))
                .collect::<Vec<_>>()
                .join(" "),
            ..Summary::default()
        };
        let pass = judge_halt(&h, &mut apps, &mut con, &keys, base, &report_dir, &timeline).await?;
        if !pass {
            if let Some(server) = &server {
                keep_redis_data(server.dir(), &report_dir.join("redis-data"));
            }
        }
        return Ok(if pass { End::Pass } else { End::Violation });
    }

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

    let drained = drains.finish().await;
    let mut error_lines = drained.complete_lines;
    // The final drain failing is a finding about getErrors, not a crash of the sim.
    let mut final_drain_failure = None;
    match get_errors(&app_bin, &url, &namespace).await {
        Ok(lines) => error_lines.extend(lines),
        Err(e) => final_drain_failure = Some(format!("the final getErrors failed: {e:#}")),
    }
    let snap = leaderq::testkit::snapshot::snapshot(&mut con, &keys).await?;
    let latencies = Latencies::collect(&mut con, &keys).await?;
    let memory = inspect::info(&mut con, "memory").await?;
    let (calls_after, scripts_after) = inspect::command_calls(&mut con).await?;
    let redis_cpu_used_s = (redis_cpu_s(&mut con).await - redis_cpu_before_s).max(0.0);
    let mut observed = Observed::from_snapshot(
        &snap,
        flags.messages,
        seed,
        flags.error_rate,
        flags.handler_delay_max_ms,
        error_lines,
        disruptions,
    )
    .map_err(anyhow::Error::msg)?;
    observed.handler_timeout_ms = flags.handler_timeout_ms;
    observed.error_lines_killed = drained.killed_lines;
    observed.injected_duplicates = injected;
    let deposing = faults
        .iter()
        .filter(|f| f.done && f.kind.can_depose())
        .count() as u64;
    observed.epochs_max = 2 + 2 * deposing;
    // Failover: from the Redis time of the fault to the first message of the next epoch.
    let failover = |f: &Fault| -> Option<f64> {
        observed
            .epoch_log
            .iter()
            .filter(|b| b.epoch > f.epoch)
            .min_by_key(|b| b.epoch)
            .map(|b| b.time_us.saturating_sub(f.redis_us) as f64 / 1000.0)
    };
    let executed: Vec<&Fault> = faults.iter().filter(|f| f.done).collect();
    let of_kind = |k: FaultKind| executed.iter().filter(move |f| f.kind == k);
    let failover_ms: Vec<f64> = of_kind(FaultKind::KillLeader)
        .filter_map(|f| failover(f))
        .collect();
    let pause_failover_ms: Vec<f64> = of_kind(FaultKind::PauseLeader)
        .filter_map(|f| failover(f))
        .collect();
    let partition_failover_ms: Vec<f64> = of_kind(FaultKind::PartitionLeader)
        .filter_map(|f| failover(f))
        .collect();
    let c = snap.counters;
    let mut verdict = verify::check(&observed);
    let extra: Vec<String> = drained
        .failures
        .into_iter()
        .chain(final_drain_failure)
        .chain(stalled.clone())
        .collect();
    if !extra.is_empty() {
        verdict.violations.extend(extra);
        verdict.pass = false;
    }
    let messages_done = (c.processed + c.errors).max(1) as f64;
    let summary = Summary {
        seed,
        commit: git_commit(),
        messages: flags.messages,
        processes: flags.processes as u64,
        leader_kills: of_kind(FaultKind::KillLeader).count() as u64,
        worker_kills: of_kind(FaultKind::KillWorker).count() as u64,
        processed: verdict.processed,
        errors: verdict.errors,
        missing: verdict.missing,
        duplicates: verdict.duplicates,
        unexpected: verdict.unexpected,
        handler_runs: c.runs,
        reruns: verdict.reruns,
        elapsed_s,
        throughput_msgs_per_s: c.processed.saturating_add(c.errors) as f64 / elapsed_s,
        failover_ms,
        pauses: of_kind(FaultKind::PauseLeader).count() as u64,
        worker_pauses: of_kind(FaultKind::PauseWorker).count() as u64,
        pause_failover_ms,
        partitions: of_kind(FaultKind::PartitionLeader).count() as u64,
        partition_failover_ms,
        duplicates_planted: injected,
        duplicates_detected: c.duplicates,
        reclaim_ms,
        connection_drops: of_kind(FaultKind::DropConnections).count() as u64,
        replies_lost: proxy.as_ref().map_or(0, |p| p.cuts()),
        faults_planned: faults.len() as u64,
        faults_executed: executed.len() as u64,
        redis_restarts: of_kind(FaultKind::RestartRedis).count() as u64,
        aof_repairs,
        drains: drained.started,
        drains_killed: drained.killed,
        reprinted: verdict.reprinted,
        latency_ms: Percentiles::from_histogram_us(&latencies.end_to_end_us),
        queue_wait_ms: Percentiles::from_histogram_us(&latencies.queue_wait_us),
        overhead_ms: Percentiles::from_histogram_us(&latencies.overhead_us),
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
        handler_timeout_ms: flags.handler_timeout_ms,
        timeouts: c.timeouts,
        max_in_flight: flags.max_in_flight,
        batch: flags.batch,
        queue_max: flags.queue_max,
        interval_ms: flags.interval_ms,
        lease_ms: flags.lease_ms,
        heartbeat_ms: flags.heartbeat_ms,
        redis_version,
        redis_used_memory_peak_bytes: memory
            .get("used_memory_peak")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        redis_commands_per_msg: calls_after.saturating_sub(calls_before) as f64 / messages_done,
        redis_scripts_per_msg: scripts_after.saturating_sub(scripts_before) as f64 / messages_done,
        app_peak_rss_mb: rss_mb_max,
        redis_cpu_s: redis_cpu_used_s,
        apps_cpu_s: app_cpu_s.values().sum(),
        command_line: std::env::args()
            .map(|a| conn::redact(&a))
            .collect::<Vec<_>>()
            .join(" "),
        ..Summary::default()
    };
    let kill_events: Vec<KillEvent> = executed
        .iter()
        .map(|f| KillEvent {
            t_s: f.t_s,
            kind: f.kind.label().into(),
            failover_ms: f.kind.on_generated().then(|| failover(f)).flatten(),
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
    if !verdict.pass || timed_out {
        if let Some(server) = &server {
            keep_redis_data(server.dir(), &report_dir.join("redis-data"));
        }
    }
    drop(server);
    let unexecuted = faults.len() - executed.len();
    Ok(if timed_out {
        eprintln!(
            "sim: LIVENESS FAILURE: {} of {} outcomes after {:.0} s: {}",
            c.processed + c.errors,
            flags.messages,
            elapsed_s,
            stalled
                .as_deref()
                .unwrap_or("the run did not complete within --timeout-s")
        );
        End::Timeout
    } else if !verdict.pass {
        End::Violation
    } else if unexecuted > 0 {
        eprintln!(
            "sim: FAULT PLAN NOT EXECUTED: {unexecuted} of {} planned faults never found their moment; the verdict passed but proves less than asked",
            faults.len()
        );
        End::FaultsMissed
    } else {
        End::Pass
    })
}

/// The `host:port` of a `redis://` URL, resolved (for the proxy's upstream).
fn url_socket_addr(url: &str) -> anyhow::Result<std::net::SocketAddr> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)?;
    let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
        bail!("--lose-replies needs a plain redis:// TCP URL");
    };
    std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), *port))?
        .next()
        .context("resolving Redis's address")
}

/// Judges a run in which Redis lost data: every copy must have exited with code 5 (halted), the
/// namespace must be marked halted, and `next_id` must not have moved since the loss (nothing
/// generated from the forgotten state). Writes the report; returns whether all of it held.
async fn judge_halt(
    h: &HaltWatch,
    apps: &mut [AppProcess],
    con: &mut conn::Conn,
    keys: &Keys,
    mut summary: Summary,
    report_dir: &Path,
    timeline: &Timeline,
) -> anyhow::Result<bool> {
    let mut violations = Vec::new();
    let mut codes = Vec::new();
    for app in apps.iter_mut() {
        let code = app.exited().and_then(|s| s.code());
        if code.is_none() {
            app.kill();
        }
        if code != Some(APP_EXIT_HALTED) {
            violations.push(format!(
                "{} {} {:?} after Redis lost data, not exit code {APP_EXIT_HALTED} (halted)",
                app.instance_id,
                if code.is_some() {
                    "exited with"
                } else {
                    "was still running"
                },
                code
            ));
        }
        codes.push(code);
    }
    let halt_ms = h.since.elapsed().as_secs_f64() * 1000.0;
    let now = read_next_id(con, keys).await?;
    if now != h.next_id_after_loss {
        violations.push(format!(
            "ids were generated after Redis lost data: next_id {} -> {now}",
            h.next_id_after_loss
        ));
    }
    let halted = leaderq::node::incarnation::halted(con, keys).await?;
    match &halted {
        Some(why) => println!("halted: {why}"),
        None => violations.push("the namespace was not marked halted".into()),
    }
    summary.redis_lost_data = h.what.clone();
    summary.halt_ms = halt_ms;
    summary.halt_exit_codes = codes;
    summary.halt_reason = halted.unwrap_or_default();
    summary.next_id_before_loss = h.next_id_before_loss;
    summary.verdict = if violations.is_empty() {
        "pass"
    } else {
        "fail"
    }
    .into();
    summary.violations = violations;
    let empty = leaderq::stats::latency_histogram();
    report::write_report(report_dir, &summary, &empty, &empty, timeline, &[])?;
    println!(
        "verdict={} redis_lost_data=\"{}\" halted_copies={}/{} halt_ms={:.0} next_id_before={} next_id_after={}",
        summary.verdict,
        summary.redis_lost_data,
        summary.halt_exit_codes.iter().filter(|c| **c == Some(APP_EXIT_HALTED)).count(),
        summary.halt_exit_codes.len(),
        halt_ms,
        h.next_id_before_loss,
        now
    );
    for v in &summary.violations {
        println!("violation: {v}");
    }
    println!("report: {}", report_dir.display());
    Ok(summary.violations.is_empty())
}

/// `{ns}:next_id` now (absent = 0).
async fn read_next_id(con: &mut conn::Conn, keys: &Keys) -> anyhow::Result<u64> {
    let v: Option<u64> = redis::cmd("GET")
        .arg(keys.next_id())
        .query_async(con)
        .await?;
    Ok(v.unwrap_or(0))
}

/// `{ns}:next_id` in an RDB snapshot, read from a throwaway server started on a copy of it.
async fn snapshot_next_id(rdb: &Path, keys: &Keys) -> anyhow::Result<u64> {
    let scratch = RedisServer::start_from_rdb(rdb).context("starting a server on the snapshot")?;
    let mut con = conn::connect(&scratch.url(), 5000).await?;
    read_next_id(&mut con, keys).await
}

/// Copies the sim's own Redis directory (its log and AOF, the complete command history of a
/// persisted run) next to a failed run's report, so the failure can be traced command by command.
fn keep_redis_data(from: &Path, to: &Path) {
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(from)
        .arg(to)
        .status();
    match copied {
        Ok(s) if s.success() => eprintln!("sim: Redis's data dir kept in {}", to.display()),
        other => eprintln!("sim: could not keep Redis's data dir: {other:?}"),
    }
}

/// The local port of the lease holder's Redis connection as Redis sees it (through the proxy:
/// the port of the proxy's upstream socket for that copy), from `{ns}:lease:conn` and
/// `CLIENT LIST ID`. `None` when there is no holder or its connection is gone.
async fn lease_holder_port(con: &mut conn::Conn, keys: &Keys) -> anyhow::Result<Option<u16>> {
    let id: Option<u64> = redis::cmd("GET")
        .arg(keys.lease_conn())
        .query_async(con)
        .await?;
    let Some(id) = id else { return Ok(None) };
    let listing: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("ID")
        .arg(id)
        .query_async(con)
        .await?;
    Ok(listing
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("addr="))
        .and_then(|addr| addr.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok()))
}

/// Copies one in-flight message of a live handler into another live copy's in-flight set (as a
/// buggy reclaim could): that copy adopts and runs it at its next reconciliation, and the
/// duplicate defence must record one outcome. Returns what it did, `None` when no two copies
/// qualify right now.
async fn plant_duplicate(
    con: &mut conn::Conn,
    keys: &Keys,
    apps: &[AppProcess],
    rng: &mut rand_chacha::ChaCha8Rng,
) -> anyhow::Result<Option<String>> {
    let mut holders = Vec::new();
    for app in apps {
        let set = keys.inflight(&format!("{}.0", app.instance_id));
        let member: Option<Vec<u8>> = redis::cmd("SRANDMEMBER").arg(&set).query_async(con).await?;
        if let Some(m) = member {
            holders.push((app.instance_id.clone(), m));
        }
    }
    if holders.is_empty() || apps.len() < 2 {
        return Ok(None);
    }
    let (from, payload) = holders[rng.random_range(0..holders.len())].clone();
    let others: Vec<&AppProcess> = apps.iter().filter(|a| a.instance_id != from).collect();
    let to = &others[rng.random_range(0..others.len())].instance_id;
    let handler = format!("{to}.0");
    redis::pipe()
        .cmd("SADD")
        .arg(keys.inflight(&handler))
        .arg(&payload)
        .cmd("SADD")
        .arg(keys.handlers())
        .arg(&handler)
        .query_async::<()>(con)
        .await?;
    Ok(Some(format!(
        "{} from {from}'s set planted in {to}'s",
        String::from_utf8_lossy(&payload)
    )))
}

/// A handler (not the generator, not paused) holding in-flight messages, picked at random: its
/// index in `apps` and how many it holds. `None` when no handler holds any right now.
async fn busy_handler(
    con: &mut conn::Conn,
    keys: &Keys,
    apps: &[AppProcess],
    paused: &[(u32, Instant)],
    rng: &mut rand_chacha::ChaCha8Rng,
) -> anyhow::Result<Option<(usize, u64)>> {
    let generator = current_generator(con, keys, apps).await?.map(|(_, i)| i);
    let mut busy = Vec::new();
    for (j, app) in apps.iter().enumerate() {
        if Some(j) == generator || paused.iter().any(|(pid, _)| *pid == app.pid()) {
            continue;
        }
        let n = leaderq::testkit::snapshot::in_flight_matching(
            con,
            keys,
            &format!("{}.*", app.instance_id),
        )
        .await?;
        if n > 0 {
            busy.push((j, n));
        }
    }
    if busy.is_empty() {
        return Ok(None);
    }
    Ok(Some(busy[rng.random_range(0..busy.len())]))
}

/// How long a paused generator stays stopped: past its lease, so a successor takes over.
fn pause_for(flags: &Flags) -> Duration {
    Duration::from_millis(2 * flags.lease_ms + 500)
}

/// Checks killed handlers' in-flight sets; records how long each took to be reclaimed.
async fn watch_reclaims(
    con: &mut conn::Conn,
    keys: &Keys,
    watched: &mut Vec<(String, Instant)>,
    reclaim_ms: &mut Vec<f64>,
    progress: &Progress,
) {
    let mut still = Vec::new();
    for (name, killed) in watched.drain(..) {
        match leaderq::testkit::snapshot::in_flight_matching(con, keys, &format!("{name}.*")).await
        {
            Ok(0) => reclaim_ms.push(killed.elapsed().as_secs_f64() * 1000.0),
            Ok(_) if killed.elapsed() < RECLAIM_WATCH_MAX => still.push((name, killed)),
            Ok(n) => progress.note(&format!(
                "{name}: {n} messages still not reclaimed after {RECLAIM_WATCH_MAX:?}"
            )),
            Err(_) => still.push((name, killed)),
        }
    }
    *watched = still;
}

/// The generator right now: its epoch and its index in `apps`, from the lease value.
async fn current_generator(
    con: &mut conn::Conn,
    keys: &Keys,
    apps: &[AppProcess],
) -> anyhow::Result<Option<(u64, usize)>> {
    let Some(value) = leaderq::node::lease::holder(con, keys).await? else {
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
        .args(["getErrors", "--namespace", namespace])
        .env("REDIS_URL", url)
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
    // Only the faults this run had, so a line stays readable whatever the mix.
    let round = |v: &[f64]| format!("{:?}", v.iter().map(|f| f.round()).collect::<Vec<_>>());
    let faults: Vec<String> = [
        ("pauses", s.pauses, round(&s.pause_failover_ms)),
        ("partitions", s.partitions, round(&s.partition_failover_ms)),
        ("worker_kills", s.worker_kills, round(&s.reclaim_ms)),
        ("worker_pauses", s.worker_pauses, String::new()),
        ("connection_drops", s.connection_drops, String::new()),
        ("replies_lost", s.replies_lost, String::new()),
        (
            "redis_restarts",
            s.redis_restarts,
            format!("aof_repairs={}", s.aof_repairs),
        ),
        (
            "drains",
            s.drains,
            format!("killed={} reprinted={}", s.drains_killed, s.reprinted),
        ),
        (
            "duplicates_planted",
            s.duplicates_planted,
            format!("detected={}", s.duplicates_detected),
        ),
    ]
    .into_iter()
    .filter(|(_, n, _)| *n > 0)
    .map(|(name, n, more)| format!("{name}={n} {more}").trim_end().to_string())
    .collect();
    if !faults.is_empty() {
        println!("{} reruns={}", faults.join(" "), s.reruns);
    }
    println!(
        "latency_ms p50={:.1} p99={:.1} max={:.1}; queue_wait_ms p50={:.1} p99={:.1}; overhead_ms p50={:.1} p99={:.1}; redis commands/msg={:.2} scripts/msg={:.4}",
        s.latency_ms.p50, s.latency_ms.p99, s.latency_ms.max, s.queue_wait_ms.p50, s.queue_wait_ms.p99, s.overhead_ms.p50, s.overhead_ms.p99, s.redis_commands_per_msg, s.redis_scripts_per_msg
    );
    for v in &s.violations {
        println!("violation: {v}");
    }
    println!("report: {}", dir.display());
}
