//! The report directory of one run: summary (JSON and Markdown), histograms (.hgrm) and plots.

use crate::plot;
use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Latency percentiles in milliseconds, the unit people read latencies in.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// Reads a microsecond histogram; an empty one gives all zeros.
    pub fn from_histogram_us(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Percentiles {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        }
    }
}

/// One process the sim killed, for the throughput plot and the failover list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KillEvent {
    /// Seconds since the run started.
    pub t_s: f64,
    /// What happened, as the plot labels it: "leader kill", "leader pause", "worker kill",
    /// "connection drop", "redis restart".
    pub kind: String,
    /// Time until the next generator produced again; `None` if it never did.
    pub failover_ms: Option<f64>,
}

/// The run's summary; the field names are a published contract, do not rename them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub seed: u64,
    pub commit: String,
    pub messages: u64,
    pub processes: u64,
    pub leader_kills: u64,
    pub worker_kills: u64,
    /// Handlers SIGSTOPped past their heartbeat, then resumed.
    pub worker_pauses: u64,
    pub processed: u64,
    pub errors: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub unexpected: u64,
    pub handler_runs: u64,
    pub reruns: u64,
    pub elapsed_s: f64,
    pub throughput_msgs_per_s: f64,
    pub failover_ms: Vec<f64>,
    /// Generator paused (SIGSTOP) past its lease, then resumed.
    pub pauses: u64,
    /// Pause → the successor's first message, ms (detected by lease TTL, not by a closed socket).
    pub pause_failover_ms: Vec<f64>,
    /// Generator partitions (its requests held by the proxy past its lease).
    pub partitions: u64,
    /// Partition → the successor's first message, ms (TTL-detected, like a pause).
    pub partition_failover_ms: Vec<f64>,
    /// Duplicate deliveries planted (`--inject-duplicates`), and duplicate outcomes the app
    /// detected and refused (must be equal).
    pub duplicates_planted: u64,
    pub duplicates_detected: u64,
    /// Handler SIGKILL → its in-flight messages back in the queue, ms (10 ms sampling).
    pub reclaim_ms: Vec<f64>,
    /// `CLIENT KILL TYPE normal` rounds: every copy's connection dropped at once.
    pub connection_drops: u64,
    /// Connections the proxy cut right after Redis started answering (`--lose-replies`).
    pub replies_lost: u64,
    /// Faults in the seeded plan, and how many were executed before the run completed.
    pub faults_planned: u64,
    pub faults_executed: u64,
    /// Redis SIGKILLed and restarted from its AOF (`appendfsync always`).
    pub redis_restarts: u64,
    /// Restarts whose AOF ended in a torn transaction, cut by `redis-check-aof --fix` first.
    pub aof_repairs: u64,
    /// `getErrors` runs during the run, how many were SIGKILLed mid-drain, and the error entries
    /// printed a second time because of that (allowed).
    pub drains: u64,
    pub drains_killed: u64,
    pub reprinted: u64,
    /// `--wipe-redis` / `--rollback-redis`: what Redis lost ("" when nothing was); such a run
    /// passes when every copy halts (exit 5) and nothing is generated after the loss.
    pub redis_lost_data: String,
    /// From the loss to the last copy's exit, ms.
    pub halt_ms: f64,
    /// Each copy's exit code after the loss (5 = halted; null = still running at the bound).
    pub halt_exit_codes: Vec<Option<i32>>,
    /// What the namespace's halt marker says.
    pub halt_reason: String,
    /// `next_id` just before the loss.
    pub next_id_before_loss: u64,
    pub latency_ms: Percentiles,
    pub queue_wait_ms: Percentiles,
    /// End-to-end latency minus each message's own eventHandler delay: the queue's overhead.
    pub overhead_ms: Percentiles,
    /// "pass" or "fail".
    pub verdict: String,
    pub violations: Vec<String>,
    pub started_utc: String,
    pub error_rate: f64,
    pub handler_delay_max_ms: u64,
    pub handler_timeout_ms: u64,
    /// Error outcomes that were handler timeouts.
    pub timeouts: u64,
    pub max_in_flight: u64,
    pub batch: u64,
    pub commit_window_ms: u64,
    pub commit_max: u64,
    pub gen_batch: u64,
    pub queue_max: u64,
    pub interval_ms: u64,
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
    /// Masters of the sim's own Redis Cluster (0: one plain redis-server, or --redis-url).
    pub redis_cluster_masters: u32,
    pub redis_version: String,
    pub redis_used_memory_peak_bytes: u64,
    pub redis_commands_per_msg: f64,
    /// Script calls (EVALSHA) per message: how well batching amortises round trips.
    pub redis_scripts_per_msg: f64,
    pub app_peak_rss_mb: f64,
    /// CPU seconds Redis spent during the run (INFO cpu; restarts reset it); on a cluster, the
    /// sum over its masters.
    pub redis_cpu_s: f64,
    /// On a cluster, each master's CPU seconds, in slot order (empty otherwise).
    #[serde(default)]
    pub redis_cpu_s_per_node: Vec<f64>,
    /// Shards the namespace was spread over (`--shards`).
    #[serde(default)]
    pub shards: u32,
    /// `--kill-master`: cluster masters SIGKILLed (each the master of one of the namespace's
    /// slots), and for each, from the kill until every live node said `cluster_state:ok` with
    /// the slot served by the promoted replica, ms.
    #[serde(default)]
    pub master_kills: u64,
    #[serde(default)]
    pub promotion_ms: Vec<f64>,
    /// CPU seconds all app processes spent (sampled every 10 ms; a killed one keeps its last).
    pub apps_cpu_s: f64,
    pub command_line: String,
}

/// Progress over time: `(seconds since start, messages with a committed outcome so far)`.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub samples: Vec<(f64, u64)>,
}

/// Writes the six report files into `dir`, creating it first.
pub fn write_report(
    dir: &Path,
    s: &Summary,
    latency_us: &Histogram<u64>,
    queue_wait_us: &Histogram<u64>,
    timeline: &Timeline,
    kills: &[KillEvent],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("summary.json", serde_json::to_string_pretty(s)? + "\n")?;
    write("summary.md", summary_markdown(s))?;
    write("latency.hgrm", hgrm_ms(latency_us))?;
    write("queue_wait.hgrm", hgrm_ms(queue_wait_us))?;
    let series = [
        ("end-to-end latency", latency_us),
        ("queue wait", queue_wait_us),
    ];
    plot::latency_percentiles_svg(&dir.join("latency.svg"), &series)?;
    plot::throughput_svg(&dir.join("throughput.svg"), timeline, kills)
}

/// The summary as Markdown: the verdict and violations first, then one table row per field.
fn summary_markdown(s: &Summary) -> String {
    let pct = |p: &Percentiles| {
        let (p50, p90, p99, p999, max) = (p.p50, p.p90, p.p99, p.p999, p.max);
        format!("p50 {p50:.3} · p90 {p90:.3} · p99 {p99:.3} · p99.9 {p999:.3} · max {max:.3}")
    };
    let failovers: Vec<String> = s.failover_ms.iter().map(|ms| format!("{ms:.0}")).collect();
    let (elapsed, rate) = (
        format!("{:.3}", s.elapsed_s),
        format!("{:.1}", s.throughput_msgs_per_s),
    );
    let (cmds, rss) = (
        format!(
            "{:.2} ({:.4} scripts)",
            s.redis_commands_per_msg, s.redis_scripts_per_msg
        ),
        format!("{:.1}", s.app_peak_rss_mb),
    );
    let cpu = (
        format!("{:.2}", s.redis_cpu_s),
        format!("{:.2}", s.apps_cpu_s),
    );
    let (latency, queue_wait, overhead) = (
        pct(&s.latency_ms),
        pct(&s.queue_wait_ms),
        pct(&s.overhead_ms),
    );
    let command_line = format!("`{}`", s.command_line);
    let pause_failovers: Vec<String> = s
        .pause_failover_ms
        .iter()
        .map(|ms| format!("{ms:.0}"))
        .collect();
    let reclaims: Vec<String> = s.reclaim_ms.iter().map(|ms| format!("{ms:.0}")).collect();
    let partition_failovers: Vec<String> = s
        .partition_failover_ms
        .iter()
        .map(|ms| format!("{ms:.0}"))
        .collect();
    let partition_failovers = partition_failovers.join(", ");
    let (pause_failovers, reclaims) = (pause_failovers.join(", "), reclaims.join(", "));
    let halt_ms = format!("{:.0}", s.halt_ms);
    let halt_codes: Vec<String> = s
        .halt_exit_codes
        .iter()
        .map(|c| c.map_or("running".into(), |c| c.to_string()))
        .collect();
    let halt_codes = halt_codes.join(", ");
    let per_node = format!(
        "{:?}",
        s.redis_cpu_s_per_node
            .iter()
            .map(|c| (c * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
    let promotions: Vec<String> = s.promotion_ms.iter().map(|ms| format!("{ms:.0}")).collect();
    let promotions = promotions.join(", ");
    let rows: [(&str, &dyn Display); 69] = [
        ("verdict", &s.verdict),
        ("seed", &s.seed),
        ("commit", &s.commit),
        ("started_utc", &s.started_utc),
        ("command_line", &command_line),
        ("messages", &s.messages),
        ("processes", &s.processes),
        ("leader_kills", &s.leader_kills),
        ("worker_kills", &s.worker_kills),
        ("worker_pauses", &s.worker_pauses),
        ("processed", &s.processed),
        ("errors", &s.errors),
        ("missing", &s.missing),
        ("duplicates", &s.duplicates),
        ("unexpected", &s.unexpected),
        ("handler_runs", &s.handler_runs),
        ("reruns", &s.reruns),
        ("elapsed_s", &elapsed),
        ("throughput_msgs_per_s", &rate),
        ("failover_ms", &failovers.join(", ")),
        ("pauses", &s.pauses),
        ("pause_failover_ms", &pause_failovers),
        ("partitions", &s.partitions),
        ("partition_failover_ms", &partition_failovers),
        ("duplicates_planted", &s.duplicates_planted),
        ("duplicates_detected", &s.duplicates_detected),
        ("reclaim_ms", &reclaims),
        ("connection_drops", &s.connection_drops),
        ("replies_lost", &s.replies_lost),
        ("faults_planned", &s.faults_planned),
        ("faults_executed", &s.faults_executed),
        ("redis_restarts", &s.redis_restarts),
        ("aof_repairs", &s.aof_repairs),
        ("master_kills", &s.master_kills),
        ("promotion_ms", &promotions),
        ("drains", &s.drains),
        ("drains_killed", &s.drains_killed),
        ("reprinted", &s.reprinted),
        ("redis_lost_data", &s.redis_lost_data),
        ("halt_ms", &halt_ms),
        ("halt_exit_codes", &halt_codes),
        ("halt_reason", &s.halt_reason),
        ("next_id_before_loss", &s.next_id_before_loss),
        ("latency_ms", &latency),
        ("queue_wait_ms", &queue_wait),
        ("overhead_ms", &overhead),
        ("error_rate", &s.error_rate),
        ("handler_delay_max_ms", &s.handler_delay_max_ms),
        ("handler_timeout_ms", &s.handler_timeout_ms),
        ("timeouts", &s.timeouts),
        ("max_in_flight", &s.max_in_flight),
        ("batch", &s.batch),
        ("commit_window_ms", &s.commit_window_ms),
        ("commit_max", &s.commit_max),
        ("gen_batch", &s.gen_batch),
        ("queue_max", &s.queue_max),
        ("interval_ms", &s.interval_ms),
        ("lease_ms", &s.lease_ms),
        ("heartbeat_ms", &s.heartbeat_ms),
        ("redis_cluster_masters", &s.redis_cluster_masters),
        ("shards", &s.shards),
        ("redis_version", &s.redis_version),
        (
            "redis_used_memory_peak_bytes",
            &s.redis_used_memory_peak_bytes,
        ),
        ("redis_commands_per_msg", &cmds),
        ("app_peak_rss_mb", &rss),
        ("redis_cpu_s", &cpu.0),
        ("redis_cpu_s_per_node", &per_node),
        ("apps_cpu_s", &cpu.1),
        ("violations", &s.violations.len()),
    ];
    let mut md = format!("# Simulation report, seed {}\n\n", s.seed);
    md += &format!("**Verdict: {}**\n\n", s.verdict.to_uppercase());
    for v in &s.violations {
        md += &format!("- {}\n", v.replace('\n', " "));
    }
    md += if s.violations.is_empty() { "" } else { "\n" };
    md += "| field | value |\n|---|---|\n";
    for (name, value) in rows {
        let value = value.to_string().replace('|', "\\|").replace('\n', " ");
        md += &format!("| {name} | {value} |\n");
    }
    md
}

/// HdrHistogram's `outputPercentileDistribution` text (µs recorded, ms printed), so the file
/// opens in the usual HdrHistogram plotters.
fn hgrm_ms(h: &Histogram<u64>) -> String {
    let [a, b, c, d] = ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"];
    let mut out = format!("{a:>12} {b:>14} {c:>10} {d:>14}\n\n");
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let (value, q) = (ms(v.value_iterated_to()), v.quantile_iterated_to());
        out += &format!("{value:12.3} {q:2.12} {total:10}");
        out += &if q < 1.0 {
            format!(" {:14.2}\n", 1.0 / (1.0 - q))
        } else {
            "\n".into()
        };
    }
    // HdrHistogram's sub-bucket count: the power of two at or above 2 * 10^sigfig.
    let sub_buckets = (2 * 10u64.pow(u32::from(h.sigfig()))).next_power_of_two();
    let (mean, sd, max) = (h.mean() / 1000.0, h.stdev() / 1000.0, ms(h.max()));
    let (count, buckets) = (h.len(), h.buckets());
    out += &format!("#[Mean    = {mean:12.3}, StdDeviation   = {sd:12.3}]\n");
    out += &format!("#[Max     = {max:12.3}, Total count    = {count:12}]\n");
    out + &format!("#[Buckets = {buckets:12}, SubBuckets     = {sub_buckets:12}]\n")
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// `reports/<UTC timestamp>-seed<seed>`: sorts by time and never collides between runs.
pub fn default_report_dir(seed: u64) -> PathBuf {
    let (y, mo, d, h, mi, s) = utc_fields(unix_now_s());
    let stamp = format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z");
    PathBuf::from("reports").join(format!("{stamp}-seed{seed}"))
}

/// ISO 8601 UTC, e.g. `2026-11-27T23:15:00Z`, for `Summary::started_utc`.
pub fn utc_iso8601(unix_s: u64) -> String {
    let (y, mo, d, h, mi, s) = utc_fields(unix_s);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// Seconds since the Unix epoch; a clock before 1970 reads as 0 rather than failing the run.
pub fn unix_now_s() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH);
    since_epoch.map_or(0, |d| d.as_secs())
}

/// `(year, month, day, hour, minute, second)` in UTC.
fn utc_fields(unix_s: u64) -> (i64, u32, u32, u64, u64, u64) {
    let (days, secs) = (unix_s / 86_400, unix_s % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    (y, m, d, secs / 3600, secs / 60 % 60, secs % 60)
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`),
/// written out to avoid a date crate for one directory name.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..146097
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era, 0..400
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year from March 1st
    let mp = (5 * doy + 2) / 153; // month from March, 0..12
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_are_right() {
        assert_eq!(utc_iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_iso8601(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc_iso8601(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_iso8601(4_102_444_799), "2099-12-31T23:59:59Z");
        let dir = default_report_dir(42).display().to_string();
        let shape = dir.starts_with("reports/20") && dir.ends_with("Z-seed42");
        assert!(
            shape && dir.len() == "reports/20261127T231500Z-seed42".len(),
            "{dir}"
        );
    }

    #[test]
    fn writes_all_six_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = dir.path().join("nested/run");
        let empty = Histogram::<u64>::new_with_max(60_000_000, 3).expect("valid bounds");
        let mut latency = empty.clone();
        (1..=10_000u64).for_each(|i| latency.saturating_record(i * 10)); // 0.01..100 ms
        let mut s = Summary::default();
        (s.seed, s.verdict, s.failover_ms) = (42, "fail".into(), vec![812.5]);
        s.violations = vec!["id 7 has no outcome (missing)".into()];
        s.command_line = "sim --seed 42 | tee".into();
        s.latency_ms = Percentiles::from_histogram_us(&latency);
        let samples = vec![(0.0, 0), (0.5, 4_000), (1.0, 10_000)];
        let kill = KillEvent {
            t_s: 0.6,
            kind: "leader".into(),
            failover_ms: Some(812.5),
        };
        write_report(
            &report,
            &s,
            &latency,
            &empty,
            &Timeline { samples },
            &[kill],
        )
        .expect("report");

        let read = |name: &str| std::fs::read_to_string(report.join(name)).expect(name);
        let svgs = [read("latency.svg"), read("throughput.svg")];
        assert!(svgs.iter().all(|svg| svg.contains("<svg")));
        let json: serde_json::Value = serde_json::from_str(&read("summary.json")).expect("json");
        let back: Summary = serde_json::from_value(json.clone()).expect("every field present");
        assert_eq!(json.as_object().map(|o| o.len()), Some(70));
        assert_eq!(
            (json["seed"].as_u64(), back.verdict.as_str()),
            (Some(42), "fail")
        );
        let p99_ms = json["latency_ms"]["p99"].as_f64().unwrap_or(0.0);
        assert!((p99_ms - 99.0).abs() < 0.5, "{json}");
        for key in [
            "throughput_msgs_per_s",
            "failover_ms",
            "queue_wait_ms",
            "elapsed_s",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }

        let hgrm = read("latency.hgrm");
        assert!(hgrm.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)\n\n"));
        assert!(hgrm.contains("#[Max     =      100.031, Total count    =        10000]"));
        assert!(hgrm.contains("#[Buckets =") && hgrm.ends_with("SubBuckets     =         2048]\n"));
        assert!(read("queue_wait.hgrm").contains("Total count    =            0]"));
        let md = read("summary.md");
        assert!(md.contains("**Verdict: FAIL**") && md.contains("- id 7 has no outcome"));
        assert!(
            md.contains("| failover_ms | 812 |") && md.contains("\\| tee"),
            "{md}"
        );
    }
}
