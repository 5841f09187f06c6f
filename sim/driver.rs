//! The process driver: starts Redis and the `app` copies, executes the kill plan, waits for the
//! run to complete (bounded), collects what Redis recorded, and hands it to the checker and the
//! report writer. It judges nothing itself.
//!
//! `run` is the whole run: `Run::start`, then one `Run::tick` every `TICK` until the run
//! is over, then `Run::finish`. Executing the fault plan is in `execute`, the teardown, the
//! verdict's inputs and the report in `finish`; the processes themselves in `crate::world`.

mod execute;
mod finish;

use crate::drains::Drains;
use crate::faults::{self, Fault};
use crate::progress::Progress;
use crate::report::{self, Timeline};
use crate::world::{self, World};
use crate::Flags;
use anyhow::Context;
use leaderq::stats::Counters;
use leaderq::testkit::procs;
use leaderq::{conn, inspect, Keys};
use rand::SeedableRng;
use std::ops::ControlFlow;
use std::path::PathBuf;
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
    /// `next_id` from which on nothing may be generated: right after the loss (absent = 0 after
    /// a wipe; the snapshot's after a rollback), or, after a master kill, when the first copy
    /// was seen halted (the promoted replica may hand out ids legitimately until a copy finds
    /// that a write it was told of is gone). It must still be this when every copy has stopped.
    next_id_after_loss: u64,
    /// Since when `next_id_after_loss` holds, for the verdict's words: "Redis lost data".
    frozen_since: &'static str,
    /// `next_id` just before the loss, for the report.
    next_id_before_loss: u64,
    /// The ids with an outcome in the state Redis went back to (none after a wipe; the
    /// snapshot's after a rollback), which must still have it at the end; `None` when unknown
    /// (a master failover).
    kept: Option<Vec<u64>>,
}

/// One executed `--kill-master`: the master of a namespace slot SIGKILLed, its replica promoted.
struct MasterKill {
    /// What happened, for the report and a halt's description.
    what: String,
    /// When the master was SIGKILLed.
    killed_at: Instant,
    /// From the SIGKILL until every live node said `cluster_state:ok` and the slot was served by
    /// the promoted replica, ms (20 ms polling plus `redis-cli` round trips).
    promotion_ms: f64,
    /// `next_id` read just before the kill, for a halt's report.
    next_id_before: u64,
}

/// How long the copies may take to halt after Redis lost data.
const HALT_WAIT_MAX: Duration = Duration::from_secs(20);

/// The exit code of an `app` that halted because Redis lost data.
const APP_EXIT_HALTED: i32 = 5;

/// What Redis looked like before the first copy started (what the run itself cost is in the
/// [`Meter`]s).
struct Baseline {
    /// When the run started, for the report.
    started_utc: String,
    /// Redis's `redis_version`, for the report.
    redis_version: String,
}

/// What a Redis node has run so far (`INFO commandstats`, `INFO cpu`), or during the run.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    /// Commands run.
    calls: u64,
    /// Script calls (EVALSHA, EVAL).
    scripts: u64,
    /// CPU time, user + system, seconds; 0 when unreadable.
    cpu_s: f64,
}

impl Usage {
    /// What the node at `con` has run since it started.
    async fn read(con: &mut conn::Conn) -> anyhow::Result<Usage> {
        let (calls, scripts) = inspect::command_calls(con).await?;
        let cpu_s = match inspect::info(con, "cpu").await {
            Ok(info) => ["used_cpu_user", "used_cpu_sys"]
                .iter()
                .filter_map(|k| info.get(*k)?.parse::<f64>().ok())
                .sum(),
            Err(_) => 0.0,
        };
        Ok(Usage {
            calls,
            scripts,
            cpu_s,
        })
    }

    /// `self - earlier`, never below 0 (a restarted Redis starts its counts again).
    fn since(self, earlier: Usage) -> Usage {
        Usage {
            calls: self.calls.saturating_sub(earlier.calls),
            scripts: self.scripts.saturating_sub(earlier.scripts),
            cpu_s: (self.cpu_s - earlier.cpu_s).max(0.0),
        }
    }

    fn plus(self, other: Usage) -> Usage {
        Usage {
            calls: self.calls + other.calls,
            scripts: self.scripts + other.scripts,
            cpu_s: self.cpu_s + other.cpu_s,
        }
    }
}

/// What the run cost one Redis node: the one Redis, or one master's slot range of a cluster.
/// When `--kill-master` kills that master, what it ran until then is carried over and its
/// promoted replica is metered from its promotion on (what it ran as a replica is not the run's
/// cost on that range: it replayed the master's writes).
struct Meter {
    /// A connection to the node serving the range now.
    con: conn::Conn,
    /// That node's usage when its metering began.
    from: Usage,
    /// What the range's earlier masters ran during the run.
    carried: Usage,
}

impl Meter {
    async fn start(mut con: conn::Conn) -> anyhow::Result<Meter> {
        let from = Usage::read(&mut con).await?;
        Ok(Meter {
            con,
            from,
            carried: Usage::default(),
        })
    }

    /// What the range's nodes have run during the run so far.
    async fn used(&mut self) -> anyhow::Result<Usage> {
        let con = &self.con;
        let now = read_again(|| {
            let mut con = con.clone();
            async move { Usage::read(&mut con).await }
        })
        .await?;
        Ok(now.since(self.from).plus(self.carried))
    }

    /// The range's master was killed (having run `used` during the run, read just before): go
    /// on metering at `con`, the promoted replica.
    async fn hand_over(&mut self, used: Usage, con: conn::Conn) -> anyhow::Result<()> {
        *self = Meter {
            carried: used,
            ..Meter::start(con).await?
        };
        Ok(())
    }
}

/// One run: its processes, the fault plan and what the loop has seen so far. Fields drop in
/// order, so on an early error the drains and the copies go before Redis.
struct Run<'f> {
    /// What the run was asked to do.
    flags: &'f Flags,
    /// The seed every copy, the fault plan and the picks derive from.
    seed: u64,
    /// Where the report (and the copies' logs) go.
    report_dir: PathBuf,
    /// The run's own namespace on Redis, for getErrors.
    namespace: String,
    /// The namespace's key names.
    keys: Keys,
    /// The getErrors drains started by the fault plan; they outlive the loop for the verdict.
    drains: Drains,
    /// The bar or the plain lines on stderr, and the notes on what each fault did.
    progress: Progress,
    /// The seeded fault plan; each fault records when and on what it was executed.
    faults: Vec<Fault>,
    /// Redis, the proxy and the copies.
    world: World,
    /// The sim's own connection to Redis (never through the proxy).
    con: conn::Conn,
    /// What each Redis node (each master's slot range of a cluster) has run, for CPU and commands.
    meters: Vec<Meter>,
    /// Redis before the first copy started.
    baseline: Baseline,
    /// When the loop started: fault times and the timeline are seconds since then.
    started: Instant,
    /// `--timeout-s` after `started`.
    deadline: Instant,
    /// No outcome for this long means stuck: well past the longest handler run and any recovery.
    stuck_max: Duration,
    /// Outcomes over time, for the report's plot.
    timeline: Timeline,
    /// Picks which copies the worker and duplicate faults hit.
    rng: rand_chacha::ChaCha8Rng,
    /// Killed handlers (name, when) whose in-flight sets are watched for the reclaim.
    watched: Vec<(String, Instant)>,
    /// How long each killed handler's messages took to be reclaimed, ms.
    reclaim_ms: Vec<f64>,
    /// Killed handlers whose messages were still not reclaimed after [`RECLAIM_WATCH_MAX`].
    never_reclaimed: Vec<String>,
    /// Ids of which a second delivery was planted (`--inject-duplicates`): they may run twice.
    planted: Vec<u64>,
    /// Faults that disturbed work in flight (the checker allows that many re-runs' worth).
    disruptions: u64,
    /// Duplicates planted: the verdict demands that many caught.
    injected: u64,
    /// Redis restarts whose torn last AOF transaction had to be cut.
    aof_repairs: u64,
    /// Set by a fault that made Redis lose data: the loop then only waits for the copies to halt.
    halt: Option<HaltWatch>,
    /// The `--kill-master` faults executed so far.
    master_kills: Vec<MasterKill>,
    /// When a due master kill last looked whether it could act (a look costs a few `redis-cli`).
    master_checked_at: Option<Instant>,
    /// The counters last read; kept while Redis does not answer.
    last_counters: Counters,
    /// Reads of the counters failed in a row (Redis restarting): no probes, no faults meanwhile.
    redis_errors: u32,
    /// Since when every message has had its outcome (waiting for planted duplicates).
    settle_since: Option<Instant>,
    /// Outcomes at the last change.
    last_done: u64,
    /// When the outcomes last changed.
    progressed_at: Instant,
    /// Why the run can no longer complete, when it cannot.
    stalled: Option<String>,
    /// The run ended without completing (deadline or stall).
    timed_out: bool,
}

/// Runs the whole simulation.
pub async fn run(flags: &Flags, seed: u64) -> anyhow::Result<End> {
    let mut run = Run::start(flags, seed).await?;
    loop {
        tokio::time::sleep(TICK).await;
        if run.tick().await?.is_break() {
            break;
        }
    }
    run.finish().await
}

impl<'f> Run<'f> {
    /// Creates the report directory, prints the fault plan, starts Redis (and the proxy), reads
    /// the baseline and starts the copies.
    async fn start(flags: &'f Flags, seed: u64) -> anyhow::Result<Run<'f>> {
        let started_utc = report::utc_iso8601(report::unix_now_s());
        let report_dir = flags
            .report_dir
            .clone()
            .unwrap_or_else(|| report::default_report_dir(seed));
        let log_dir = report_dir.join("logs");
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        let app_bin: PathBuf = match &flags.app_bin {
            Some(p) => p.clone(),
            None => procs::sibling_app_binary()
                .context("cannot find the app binary next to sim; pass --app-bin")?,
        };
        let faults = faults::plan_for(flags, seed);
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

        let namespace = format!("sim-{seed}-{}", std::process::id());
        let args = world::app_args(flags, &namespace, seed);
        let mut world = World::start_redis(flags, app_bin, args, log_dir).await?;
        let keys = Keys::new(&namespace)?;
        let mut con = conn::connect(&world.url, 5000).await?.pinned(&keys);
        world.start_proxy(flags).await?;
        let redis_version = inspect::info(&mut con, "server")
            .await?
            .remove("redis_version")
            .unwrap_or_default();
        let mut meters = Vec::new();
        for url in world.node_urls() {
            meters.push(
                Meter::start(match world.node_urls().len() {
                    1 => con.clone(),
                    _ => conn::connect(&url, 5000).await?,
                })
                .await?,
            );
        }
        let baseline = Baseline {
            started_utc,
            redis_version,
        };
        world.spawn_copies(flags.processes)?;

        let started = Instant::now();
        Ok(Run {
            flags,
            seed,
            report_dir,
            drains: Drains::new(seed, &world.app_bin, &world.url, &namespace),
            namespace,
            keys,
            progress: Progress::new(flags.messages, flags.quiet),
            faults,
            world,
            con,
            meters,
            baseline,
            started,
            deadline: started + Duration::from_secs(flags.timeout_s),
            stuck_max: Duration::from_millis(
                2 * flags.handler_delay_max_ms.min(flags.handler_timeout_ms),
            ) + Duration::from_secs(20),
            timeline: Timeline {
                samples: vec![(0.0, 0)],
            },
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x7069_636b),
            watched: Vec::new(),
            reclaim_ms: Vec::new(),
            never_reclaimed: Vec::new(),
            planted: Vec::new(),
            disruptions: 0,
            injected: 0,
            aof_repairs: 0,
            halt: None,
            master_kills: Vec::new(),
            master_checked_at: None,
            last_counters: Counters::default(),
            redis_errors: 0,
            settle_since: None,
            last_done: 0,
            progressed_at: Instant::now(),
            stalled: None,
            timed_out: false,
        })
    }

    /// One look at the run: resumes due pauses, checks the copies, reads the counters, then
    /// decides whether the run is over (halted, complete, out of time, stalled) and, if not,
    /// executes the due faults. `Break` when the run is over.
    async fn tick(&mut self) -> anyhow::Result<ControlFlow<()>> {
        let now = Instant::now();
        self.world.resume_due(now, &self.progress);
        self.world.sample_usage();
        // After a data loss, exits are expected: they are judged when the wait ends.
        if self.halt.is_none() && self.watch_master_kill_halt().await {
            if let Err(e) = self.world.check_running() {
                self.progress.finish();
                return Err(e);
            }
        }
        let counters = self.read_counters().await;
        let done = counters.processed + counters.errors + counters.bad + counters.poisoned;
        let t_s = self.started.elapsed().as_secs_f64();
        self.timeline.samples.push((t_s, done));
        let executed = self.faults.iter().filter(|f| f.done).count();
        self.progress.update(done, executed, self.faults.len());
        if let Some(h) = &self.halt {
            let waited_out = h.since.elapsed() >= HALT_WAIT_MAX;
            return Ok(if self.world.running() == 0 || waited_out {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            });
        }
        if self.redis_errors == 0 {
            self.watch_reclaims().await;
            self.watch_takeovers().await;
        }
        if self.complete(now, done, &counters) {
            // A fault still due (its moment came in this last tick) acts now rather than never.
            for _ in 0..self.faults.len() {
                self.execute_due_faults(now, done, &counters).await?;
            }
            return Ok(ControlFlow::Break(()));
        }
        if now >= self.deadline {
            self.timed_out = true;
            return Ok(ControlFlow::Break(()));
        }
        if self.watch_stall(now, done, &counters).await? {
            self.timed_out = true;
            return Ok(ControlFlow::Break(()));
        }
        if self.redis_errors > 0 {
            return Ok(ControlFlow::Continue(()));
        }
        self.execute_due_faults(now, done, &counters).await?;
        Ok(ControlFlow::Continue(()))
    }

    /// The counters now. Redis may be restarting: then the last counters, and a note now and
    /// then; the next tick tries again.
    async fn read_counters(&mut self) -> Counters {
        let counters = match Counters::read(&mut self.con, &self.keys).await {
            Ok(c) => {
                self.redis_errors = 0;
                c
            }
            Err(e) => {
                self.redis_errors += 1;
                if self.redis_errors.is_power_of_two() {
                    self.progress
                        .note(&format!("redis not answering ({e}); retrying"));
                }
                self.last_counters
            }
        };
        self.last_counters = counters;
        counters
    }

    /// Done once every message has its outcome, and every planted duplicate has been caught by
    /// the defence (bounded: the verdict says so if one never is).
    fn complete(&mut self, now: Instant, done: u64, counters: &Counters) -> bool {
        if done < self.flags.messages {
            return false;
        }
        let settled = counters.duplicates >= self.injected;
        let waited = *self.settle_since.get_or_insert(now);
        settled || now.duration_since(waited) >= SETTLE_WAIT_MAX
    }

    /// Whether the run can no longer complete, so it ends now, not at the deadline: every id
    /// generated, none waiting or in flight, some without an outcome (they are nowhere); or no
    /// outcome at all for longer than any handler or recovery takes. Says why in `stalled`.
    async fn watch_stall(
        &mut self,
        now: Instant,
        done: u64,
        counters: &Counters,
    ) -> anyhow::Result<bool> {
        if done != self.last_done {
            (self.last_done, self.progressed_at) = (done, now);
            return Ok(false);
        }
        // Every outcome is in: what is left is the wait for planted duplicates to be counted,
        // which `SETTLE_WAIT_MAX` bounds (a planted copy can merge with its original in the retry
        // set and never be counted: soak seed 37, `all`).
        if done >= self.flags.messages {
            return Ok(false);
        }
        let idle_for = now.duration_since(self.progressed_at);
        if idle_for < STALL_CHECK_AFTER || self.redis_errors != 0 {
            return Ok(false);
        }
        let snap = leaderq::testkit::snapshot::snapshot(&mut self.con, &self.keys).await?;
        let nowhere =
            counters.generated >= self.flags.messages && snap.queue_len == 0 && snap.in_flight == 0;
        if nowhere && idle_for >= STALL_NOWHERE_FOR {
            self.stalled = Some(format!(
                "{} messages are nowhere: every id was generated, none is queued or in flight, and they have no outcome",
                self.flags.messages - done
            ));
        } else if idle_for >= self.stuck_max {
            self.stalled = Some(format!(
                "no outcome for {idle_for:?} with {} queued and {} in flight",
                snap.queue_len, snap.in_flight
            ));
        }
        Ok(self.stalled.is_some())
    }

    /// After a master kill, a copy that exited with code 5 found that Redis lost a write (the
    /// promoted replica lacked it): from now on the loop waits for every copy to halt, and the
    /// run is judged like a wipe. Returns whether the copies' exits are to be checked as usual
    /// (not when one halted: if `next_id` cannot be read yet, the next tick tries again).
    async fn watch_master_kill_halt(&mut self) -> bool {
        let Some(kill) = self.master_kills.last() else {
            return true;
        };
        let Some(name) = self.world.exited_with(APP_EXIT_HALTED) else {
            return true;
        };
        if let Ok(next_id) = read_next_id(&mut self.con, &self.keys).await {
            let what = format!("{}; {name} halted first", kill.what);
            self.progress.note(&format!(
                "{what}: every copy must now halt with exit code {APP_EXIT_HALTED}"
            ));
            self.halt = Some(HaltWatch {
                what,
                since: kill.killed_at,
                next_id_after_loss: next_id,
                frozen_since: "the first copy halted",
                next_id_before_loss: kill.next_id_before,
                kept: None,
            });
        }
        false
    }

    /// Checks killed handlers' in-flight sets; records how long each took to be reclaimed.
    async fn watch_reclaims(&mut self) {
        let mut still = Vec::new();
        for (name, killed) in self.watched.drain(..) {
            let pattern = format!("{name}.*");
            match leaderq::testkit::snapshot::in_flight_matching(
                &mut self.con,
                &self.keys,
                &pattern,
            )
            .await
            {
                Ok(0) => self
                    .reclaim_ms
                    .push(killed.elapsed().as_secs_f64() * 1000.0),
                Ok(_) if killed.elapsed() < RECLAIM_WATCH_MAX => still.push((name, killed)),
                Ok(n) => {
                    self.progress.note(&format!(
                        "{name}: {n} messages still not reclaimed after {RECLAIM_WATCH_MAX:?}"
                    ));
                    self.never_reclaimed.push(name);
                }
                Err(_) => still.push((name, killed)),
            }
        }
        self.watched = still;
    }
}

impl Run<'_> {
    /// For every generator fault not yet followed by a takeover: once the lease holds a later
    /// epoch than the one hit, how long that took (the liveness verdict bounds it).
    async fn watch_takeovers(&mut self) {
        if !self
            .faults
            .iter()
            .any(|f| f.hit_at.is_some() && f.takeover_ms.is_none())
        {
            return;
        }
        let Ok(Some(value)) = leaderq::node::lease::holder(&mut self.con, &self.keys).await else {
            return;
        };
        let Some(epoch) = value
            .split_once(':')
            .and_then(|(e, _)| e.parse::<u64>().ok())
        else {
            return;
        };
        for f in &mut self.faults {
            if let (Some(hit), None) = (f.hit_at, f.takeover_ms) {
                if epoch > f.epoch {
                    f.takeover_ms = Some(hit.elapsed().as_secs_f64() * 1000.0);
                }
            }
        }
    }
}

/// Runs one of the sim's own idempotent reads, again (up to 5 times, 50 ms apart) when it failed:
/// `--drop-connections` kills the sim's connections to other nodes too, and the read after that
/// finds its connection gone once before it reconnects.
async fn read_again<T, F, Fut>(mut read: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut tries = 0;
    loop {
        match read().await {
            Ok(v) => return Ok(v),
            Err(e) if tries >= 4 => return Err(e),
            Err(_) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// `{ns}:next_id` now (absent = 0).
async fn read_next_id(con: &mut conn::Conn, keys: &Keys) -> anyhow::Result<u64> {
    let v: Option<u64> = redis::cmd("GET")
        .arg(keys.next_id())
        .query_async(con)
        .await?;
    Ok(v.unwrap_or(0))
}
