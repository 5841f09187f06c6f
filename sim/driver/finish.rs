//! The end of a run: stop the copies, collect what Redis recorded and what every getErrors
//! printed, hand it to the checker, and write the report. After a data loss, the halt is judged
//! instead.

use super::{read_next_id, End, HaltWatch, Run, Usage, APP_EXIT_HALTED};
use crate::drains::DrainOutput;
use crate::faults::{Fault, FaultKind};
use crate::report::{self, KillEvent, Percentiles, Summary, Timeline};
use anyhow::{bail, Context};
use leaderq::stats::Latencies;
use leaderq::testkit::procs::AppProcess;
use leaderq::testkit::snapshot::Snapshot;
use leaderq::testkit::verify::{self, Observed, Printed, Runs, Verdict};
use leaderq::{conn, inspect, Keys};
use std::path::Path;

/// What is left once every copy has stopped: the checker's and the report's inputs.
struct Collected {
    /// Every line the drains during the run and the final getErrors printed, with what became
    /// of each entry.
    printed: Vec<Printed>,
    /// What the drains during the run printed and how they ended (their lines are in
    /// `printed`).
    drained: DrainOutput,
    /// The final drain failing is a finding about getErrors, not a crash of the sim.
    final_drain_failure: Option<String>,
    /// The namespace as Redis recorded it.
    snap: Snapshot,
    /// The latency histograms the copies published on their way out.
    latencies: Latencies,
    /// Redis's INFO memory section.
    memory: std::collections::HashMap<String, String>,
    /// Commands Redis ran during the run (every node summed).
    calls: u64,
    /// Scripts (EVALSHA) Redis ran during the run.
    scripts: u64,
    /// Each Redis node's own CPU time during the run, seconds (one entry without a cluster).
    redis_cpu_per_node_s: Vec<f64>,
}

impl Run<'_> {
    /// Ends the run once the loop is over: judges it, writes the report, and says how it ended.
    pub(super) async fn finish(mut self) -> anyhow::Result<End> {
        let elapsed_s = self.started.elapsed().as_secs_f64();
        self.progress.finish();
        self.world.resume_all();
        if let Some(h) = self.halt.take() {
            return self.finish_halted(&h, elapsed_s).await;
        }
        self.world.stop_apps()?;
        let mut collected = self.collect().await?;
        let observed = self.observe(&mut collected)?;
        let verdict = self.judge(&observed, &mut collected);
        let summary = self.summary(&collected, &observed, &verdict, elapsed_s);
        let kill_events: Vec<KillEvent> = self
            .faults
            .iter()
            .filter(|f| f.done)
            .map(|f| KillEvent {
                t_s: f.t_s,
                kind: f.kind.label().into(),
                failover_ms: f
                    .kind
                    .on_generated()
                    .then(|| failover_ms(f, &observed))
                    .flatten(),
            })
            .collect();
        report::write_report(
            &self.report_dir,
            &summary,
            &collected.latencies.end_to_end_us,
            &collected.latencies.queue_wait_us,
            &self.timeline,
            &kill_events,
        )?;
        print_summary(&summary, &self.report_dir);
        if !verdict.pass || self.timed_out {
            if let Some(server) = &self.world.server {
                keep_redis_data(server.dir(), &self.report_dir.join("redis-data"));
            }
        }
        drop(self.world.server.take());
        Ok(self.end(&collected.snap, verdict.pass, elapsed_s))
    }

    /// Ends a run in which Redis lost data: the halt is judged instead of the messages, and
    /// what survived the loss (`verify::check_after_loss`): every outcome left is one and as
    /// seeded, and every outcome of the state Redis went back to is still there.
    async fn finish_halted(mut self, h: &HaltWatch, elapsed_s: f64) -> anyhow::Result<End> {
        let base = Summary {
            elapsed_s,
            ..base_summary(&self)
        };
        let exits = halt_exit_codes(&mut self.world.apps);
        let mut after_loss = self.after_loss(h).await;
        if self.flags.wait_replicas > 0 && !self.master_kills.is_empty() {
            // A master failover to a replica that confirmed every script call lost nothing a
            // copy acted on: it must not halt the group.
            after_loss.push(format!(
                "the group halted after a master failover although --wait-replicas {} confirmed every write a copy acted on",
                self.flags.wait_replicas
            ));
        }
        let pass = judge_halt(
            h,
            &mut self.con,
            &self.keys,
            base,
            &self.report_dir,
            &self.timeline,
            exits,
            after_loss,
        )
        .await?;
        if !pass {
            if let Some(server) = &self.world.server {
                keep_redis_data(server.dir(), &self.report_dir.join("redis-data"));
            }
        }
        Ok(if pass { End::Pass } else { End::Violation })
    }

    /// After a loss, once every copy has stopped: what the drains printed, what the final
    /// getErrors prints, and what Redis still holds, judged against what survives a loss.
    async fn after_loss(&mut self, h: &HaltWatch) -> Vec<String> {
        let mut drained = self.drains.finish().await;
        let mut failures = std::mem::take(&mut drained.failures);
        let mut printed = std::mem::take(&mut drained.printed);
        match get_errors(&self.world.app_bin, &self.world.url, &self.namespace).await {
            Ok(lines) => printed.extend(lines),
            Err(e) => failures.push(format!("the final getErrors failed: {e:#}")),
        }
        let snap = match leaderq::testkit::snapshot::snapshot(&mut self.con, &self.keys).await {
            Ok(s) => s,
            Err(e) => return vec![format!("reading what Redis holds after the loss: {e}")],
        };
        let mut observed = Observed {
            messages: h.next_id_before_loss.max(snap.next_id),
            seed: self.seed,
            error_rate: self.flags.error_rate,
            delay_max_ms: self.flags.handler_delay_max_ms,
            handler_timeout_ms: self.flags.handler_timeout_ms,
            ok_bitmap: snap.ok_bitmap,
            printed,
            ..Observed::default()
        };
        observed.counters = snap.counters;
        let mut violations = verify::check_after_loss(&verify::AfterLoss {
            observed,
            kept: h.kept.clone(),
        });
        violations.extend(failures);
        violations
    }

    /// Waits for the drains, runs the final getErrors, and reads what Redis recorded.
    async fn collect(&mut self) -> anyhow::Result<Collected> {
        let mut drained = self.drains.finish().await;
        let mut printed = std::mem::take(&mut drained.printed);
        let mut final_drain_failure = None;
        match get_errors(&self.world.app_bin, &self.world.url, &self.namespace).await {
            Ok(lines) => printed.extend(lines),
            Err(e) => final_drain_failure = Some(format!("the final getErrors failed: {e:#}")),
        }
        let con = &mut self.con;
        let snap = leaderq::testkit::snapshot::snapshot(con, &self.keys).await?;
        let latencies = Latencies::collect(con, &self.keys).await?;
        let memory = inspect::info(con, "memory").await?;
        let mut used = Vec::with_capacity(self.meters.len());
        for meter in &mut self.meters {
            used.push(meter.used().await?);
        }
        let total = used.iter().fold(Usage::default(), |sum, u| sum.plus(*u));
        let redis_cpu_per_node_s: Vec<f64> = used.iter().map(|u| u.cpu_s).collect();
        Ok(Collected {
            printed,
            drained,
            final_drain_failure,
            snap,
            latencies,
            memory,
            calls: total.calls,
            scripts: total.scripts,
            redis_cpu_per_node_s,
        })
    }

    /// The checker's input: the snapshot, every printed error line, and what the fault plan
    /// did (disruptions, planted duplicates, epochs it may have started).
    fn observe(&self, collected: &mut Collected) -> anyhow::Result<Observed> {
        let flags = self.flags;
        let mut observed = Observed::from_snapshot(
            &collected.snap,
            flags.messages,
            self.seed,
            flags.error_rate,
            flags.handler_delay_max_ms,
            std::mem::take(&mut collected.printed),
            self.disruptions,
        )
        .map_err(anyhow::Error::msg)?;
        observed.handler_timeout_ms = flags.handler_timeout_ms;
        observed.injected_duplicates = self.injected;
        observed.runs = Some(Runs {
            copies: self.world.runs()?,
            everyone_disturbed: self.faults.iter().any(|f| {
                f.done
                    && matches!(
                        f.kind,
                        FaultKind::RestartRedis
                            | FaultKind::KillMaster
                            | FaultKind::RollbackRedis
                            | FaultKind::WipeRedis
                    )
            }),
            planted: self.planted.clone(),
        });
        let deposing = self
            .faults
            .iter()
            .filter(|f| f.done && f.kind.can_depose())
            .count() as u64;
        observed.epochs_max = 2 + 2 * deposing;
        Ok(observed)
    }

    /// The checker's verdict, plus what only the driver sees: failed drains and a stall.
    fn judge(&self, observed: &Observed, collected: &mut Collected) -> Verdict {
        let mut verdict = verify::check(observed);
        let extra: Vec<String> = std::mem::take(&mut collected.drained.failures)
            .into_iter()
            .chain(collected.final_drain_failure.take())
            .chain(self.stalled.clone())
            .chain(self.liveness_violations())
            .collect();
        if !extra.is_empty() {
            verdict.violations.extend(extra);
            verdict.pass = false;
        }
        verdict
    }

    /// The report's summary of a run that did not lose data.
    fn summary(
        &self,
        collected: &Collected,
        observed: &Observed,
        verdict: &Verdict,
        elapsed_s: f64,
    ) -> Summary {
        let flags = self.flags;
        let executed: Vec<&Fault> = self.faults.iter().filter(|f| f.done).collect();
        let of_kind = |k: FaultKind| executed.iter().filter(move |f| f.kind == k);
        let count = |k: FaultKind| of_kind(k).count() as u64;
        let failovers = |k: FaultKind| -> Vec<f64> {
            of_kind(k)
                .filter_map(|f| failover_ms(f, observed))
                .collect()
        };
        let c = collected.snap.counters;
        let messages_done = (c.processed + c.errors).max(1) as f64;
        let (calls, scripts) = (collected.calls, collected.scripts);
        let latencies = &collected.latencies;
        Summary {
            leader_kills: count(FaultKind::KillLeader),
            worker_kills: count(FaultKind::KillWorker),
            processed: verdict.processed,
            errors: verdict.errors,
            missing: verdict.missing,
            duplicates: verdict.duplicates,
            unexpected: verdict.unexpected,
            // Where each message really ran (the copies' run logs), not what commits counted (a
            // commit retried after a lost reply counts its runs again).
            handler_runs: observed.runs.as_ref().map_or(c.runs, |r| {
                r.copies.iter().map(|c| c.ids.len() as u64).sum()
            }),
            reruns: verdict.reruns,
            elapsed_s,
            throughput_msgs_per_s: c.processed.saturating_add(c.errors) as f64 / elapsed_s,
            failover_ms: failovers(FaultKind::KillLeader),
            pauses: count(FaultKind::PauseLeader),
            worker_pauses: count(FaultKind::PauseWorker),
            pause_failover_ms: failovers(FaultKind::PauseLeader),
            partitions: count(FaultKind::PartitionLeader),
            partition_failover_ms: failovers(FaultKind::PartitionLeader),
            duplicates_planted: self.injected,
            duplicates_detected: c.duplicates,
            reclaim_ms: self.reclaim_ms.clone(),
            connection_drops: count(FaultKind::DropConnections),
            replies_lost: self.world.proxies().map(|p| p.cuts()).sum(),
            faults_planned: self.faults.len() as u64,
            faults_executed: executed.len() as u64,
            redis_restarts: count(FaultKind::RestartRedis),
            aof_repairs: self.aof_repairs,
            drains: collected.drained.started,
            drains_killed: collected.drained.killed,
            reprinted: verdict.reprinted,
            latency_ms: Percentiles::from_histogram_us(&latencies.end_to_end_us),
            queue_wait_ms: Percentiles::from_histogram_us(&latencies.queue_wait_us),
            overhead_ms: Percentiles::from_histogram_us(&latencies.overhead_us),
            verdict: if verdict.pass && !self.timed_out {
                "pass"
            } else {
                "fail"
            }
            .into(),
            violations: verdict.violations.clone(),
            error_rate: flags.error_rate,
            handler_delay_max_ms: flags.handler_delay_max_ms,
            handler_timeout_ms: flags.handler_timeout_ms,
            timeouts: c.timeouts,
            max_in_flight: flags.max_in_flight,
            batch: flags.batch,
            commit_window_ms: flags.commit_window_ms,
            commit_max: flags.commit_max,
            gen_batch: flags.gen_batch,
            queue_max: flags.queue_max,
            interval_ms: flags.interval_ms,
            lease_ms: flags.lease_ms,
            heartbeat_ms: flags.heartbeat_ms,
            redis_cluster_masters: flags.redis_cluster,
            redis_used_memory_peak_bytes: collected
                .memory
                .get("used_memory_peak")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            redis_commands_per_msg: calls as f64 / messages_done,
            redis_scripts_per_msg: scripts as f64 / messages_done,
            app_peak_rss_mb: self.world.rss_mb_max,
            redis_cpu_s: collected.redis_cpu_per_node_s.iter().sum(),
            redis_cpu_s_per_node: if collected.redis_cpu_per_node_s.len() > 1 {
                collected.redis_cpu_per_node_s.clone()
            } else {
                Vec::new()
            },
            shards: flags.shards,
            apps_cpu_s: self.world.apps_cpu_s(),
            ..base_summary(self)
        }
    }

    /// How the run ended, saying on stderr why when it was not a pass.
    fn end(&self, snap: &Snapshot, pass: bool, elapsed_s: f64) -> End {
        let c = snap.counters;
        let executed = self.faults.iter().filter(|f| f.done).count();
        let unexecuted = self.faults.len() - executed;
        if self.timed_out {
            eprintln!(
                "sim: LIVENESS FAILURE: {} of {} outcomes after {:.0} s: {}",
                c.processed + c.errors,
                self.flags.messages,
                elapsed_s,
                self.stalled
                    .as_deref()
                    .unwrap_or("the run did not complete within --timeout-s")
            );
            End::Timeout
        } else if !pass {
            End::Violation
        } else if unexecuted > 0 {
            eprintln!(
                "sim: FAULT PLAN NOT EXECUTED: {unexecuted} of {} planned faults never found their moment; the verdict passed but proves less than asked",
                self.faults.len()
            );
            End::FaultsMissed
        } else {
            End::Pass
        }
    }
}

/// The summary fields every report has, whatever happened in the run (`elapsed_s` left 0).
fn base_summary(run: &Run<'_>) -> Summary {
    Summary {
        seed: run.seed,
        commit: git_commit(),
        messages: run.flags.messages,
        processes: run.flags.processes as u64,
        started_utc: run.baseline.started_utc.clone(),
        redis_version: run.baseline.redis_version.clone(),
        command_line: std::env::args()
            .map(|a| conn::redact(&a))
            .collect::<Vec<_>>()
            .join(" "),
        master_kills: run.master_kills.len() as u64,
        promotion_ms: run.master_kills.iter().map(|k| k.promotion_ms).collect(),
        ..Summary::default()
    }
}

impl Run<'_> {
    /// The liveness the driver measured, judged (`verify::check_liveness`): every generator a
    /// fault hit replaced within its lease plus [`LIVENESS_SLACK_MS`], every killed handler's
    /// messages reclaimed within its heartbeat TTL plus the same.
    fn liveness_violations(&self) -> Vec<String> {
        let takeovers: Vec<(String, Option<f64>)> = self
            .faults
            .iter()
            .filter(|f| f.done && f.kind.on_generated())
            .map(|f| {
                (
                    format!("{} at {:.2} s (epoch {})", f.kind.label(), f.t_s, f.epoch),
                    f.takeover_ms,
                )
            })
            .collect();
        let mut reclaims: Vec<Option<f64>> = self.reclaim_ms.iter().map(|&ms| Some(ms)).collect();
        reclaims.extend(self.never_reclaimed.iter().map(|_| None));
        verify::check_liveness(
            self.flags.lease_ms,
            self.flags.heartbeat_ms,
            LIVENESS_SLACK_MS,
            &takeovers,
            &reclaims,
        )
    }
}

/// How far past its lease (or heartbeat TTL) a replacement may come and still count as in time:
/// a poll period, a round trip, and a loaded 2-core machine's scheduling.
const LIVENESS_SLACK_MS: u64 = 1000;

/// Failover: from the Redis time of the fault to the first message of the next epoch, ms.
fn failover_ms(f: &Fault, observed: &Observed) -> Option<f64> {
    observed
        .epoch_log
        .iter()
        .filter(|b| b.epoch > f.epoch)
        .min_by_key(|b| b.epoch)
        .map(|b| b.time_us.saturating_sub(f.redis_us) as f64 / 1000.0)
}

/// Judges a run in which Redis lost data: every copy must have exited with code 5 (halted), the
/// namespace must be marked halted, and `next_id` must not have moved since the loss (nothing
/// generated from the forgotten state). Writes the report; returns whether all of it held.
#[allow(clippy::too_many_arguments)]
async fn judge_halt(
    h: &HaltWatch,
    con: &mut conn::Conn,
    keys: &Keys,
    mut summary: Summary,
    report_dir: &Path,
    timeline: &Timeline,
    (codes, mut violations): (Vec<Option<i32>>, Vec<String>),
    after_loss: Vec<String>,
) -> anyhow::Result<bool> {
    let halt_ms = h.since.elapsed().as_secs_f64() * 1000.0;
    let now = read_next_id(con, keys).await?;
    if now != h.next_id_after_loss {
        violations.push(format!(
            "ids were generated after {}: next_id {} -> {now}",
            h.frozen_since, h.next_id_after_loss
        ));
    }
    let halted = leaderq::node::incarnation::halted(con, keys).await?;
    match &halted {
        Some(why) => println!("halted: {why}"),
        None => violations.push("the namespace was not marked halted".into()),
    }
    violations.extend(after_loss);
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

/// Every copy's exit code after a loss (each still running is killed: it did not halt), and a
/// violation for each that did not exit with code 5.
fn halt_exit_codes(apps: &mut [AppProcess]) -> (Vec<Option<i32>>, Vec<String>) {
    let (mut codes, mut violations) = (Vec::new(), Vec::new());
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
    (codes, violations)
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

/// Runs the real `app getErrors` and returns its stdout lines.
async fn get_errors(app_bin: &Path, url: &str, namespace: &str) -> anyhow::Result<Vec<Printed>> {
    let out = tokio::process::Command::new(app_bin)
        .args(["getErrors", "--json", "--namespace", namespace])
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
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    Ok(verify::printed_by(
        &lines,
        &String::from_utf8_lossy(&out.stderr),
        false,
    ))
}

/// Prints the summary lines: the verdict and counts, timing, the faults this run had, latency.
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
        ("master_kills", s.master_kills, round(&s.promotion_ms)),
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

/// The commit the sim was built from, for the report ("unknown" outside a git checkout).
fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}
