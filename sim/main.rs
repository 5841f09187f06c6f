//! `sim`: the proof. Starts a Redis and K real `app` copies, SIGKILLs the generator at seeded
//! points, runs N messages with the generation delay removed, then checks that every id has
//! exactly one recorded outcome and writes a report (summary, histograms, plots).
//!
//! Exit codes: 0 pass, 1 correctness violation, 2 bad flags, 3 liveness timeout, 4 crash or setup
//! failure, 5 the verdict passed but not every planned fault was executed.

mod drains;
mod driver;
mod faults;
mod plot;
mod progress;
mod report;
mod world;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Prove the group handles N messages exactly once while its generator is SIGKILLed.
///
/// The seed is printed first; the same seed replays the same kill plan and the same per-message
/// outcomes (delays and errors are a pure function of seed and id). A failed run ends with a
/// `replay:` line.
///
/// Exit codes: 0 pass, 1 correctness violation, 2 bad flags, 3 liveness timeout (the run did not
/// complete), 4 crash or setup failure, 5 the verdict passed but a planned fault was never
/// executed.
#[derive(Debug, Parser)]
#[command(name = "sim", version)]
pub struct Flags {
    /// Preset settings; any flag given explicitly wins over the profile. `small` is the soak
    /// configuration, where the rare fault windows are hit often: 200,000 messages, --batch 100,
    /// --max-in-flight 2000, --queue-max 1000, --handler-delay-max-ms 200.
    #[arg(long, value_enum, default_value_t = Profile::Default)]
    pub profile: Profile,
    /// Messages to generate and handle (ids 0..N).
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// `app` copies to keep running (one generates, the rest handle).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=64))]
    pub processes: u32,
    /// Seed for the kill plan and every message's outcome; random when absent.
    #[arg(long)]
    pub seed: Option<u64>,
    /// SIGKILL the generator at seeded points of the run (and start a replacement copy).
    #[arg(long)]
    pub kill_leader: bool,
    /// How many generator kills with --kill-leader (an error without it).
    #[arg(long, default_value_t = 3, requires = "kill_leader")]
    pub kills: u32,
    /// SIGSTOP the generator this many times, each for twice --lease-ms plus 500 ms, then
    /// SIGCONT it: it must not generate again (fencing) and must step down.
    #[arg(long, default_value_t = 0, value_name = "M")]
    pub pause_leader: u32,
    /// Hold the generator's requests in the sim's proxy this many times, for twice --lease-ms
    /// plus 500 ms (a network partition): a successor takes over on the TTL, and the held
    /// requests reach Redis afterwards; fencing must refuse them.
    #[arg(long, default_value_t = 0, value_name = "M")]
    pub partition_leader: u32,
    /// This many times, copy one handler's in-flight message into another live copy's set (as a
    /// buggy reclaim could): the duplicate defence must record one outcome and count exactly one
    /// duplicate each time, which the verdict demands.
    #[arg(long, default_value_t = 0, value_name = "M")]
    pub inject_duplicates: u32,
    /// SIGSTOP this many handlers while they hold in-flight messages, for twice --heartbeat-ms
    /// plus 500 ms, then SIGCONT them: their messages are reclaimed and handled elsewhere, and
    /// their late commits must be refused.
    #[arg(long, default_value_t = 0, value_name = "M")]
    pub pause_workers: u32,
    /// SIGKILL this many handlers while they hold in-flight messages (and start replacements).
    #[arg(long, default_value_t = 0, value_name = "M")]
    pub kill_workers: u32,
    /// This many times, every copy's connection loses its next reply: the copies talk to Redis
    /// through the sim's proxy, which cuts each connection the moment Redis starts answering
    /// (the command ran, the caller never learns it). Hits the windows between a script and its
    /// reply that a kill from outside almost never does. With --redis-cluster, a proxy stands in
    /// front of every node (announced as the node's address) and cuts the connections that
    /// make script calls.
    #[arg(long, default_value_t = 0, value_name = "M")]
    pub lose_replies: u32,
    /// Drop every copy's Redis connection (`CLIENT KILL TYPE normal`) this many times.
    #[arg(long, default_value_t = 0, value_name = "M")]
    pub drop_connections: u32,
    /// SIGKILL Redis and restart it from its AOF (`appendfsync always`) this many times. Needs
    /// the sim's own Redis (no --redis-url).
    #[arg(long, default_value_t = 0, value_name = "M")]
    pub restart_redis: u32,
    /// `FLUSHALL` once at a seeded point: Redis forgets everything. The run then passes when
    /// every copy halts (exit code 5) and nothing is generated after the loss. Needs the sim's
    /// own Redis.
    #[arg(long)]
    pub wipe_redis: bool,
    /// Restart Redis once from an RDB snapshot taken before a seeded point (far back, or one
    /// batch back): Redis goes back in time with the namespace's token intact. For half the
    /// seeds the rollback is quiet: the generator is stopped before the snapshot and the restore
    /// follows 20 outcomes later, so no counter goes back and only the copies' write counts can
    /// tell. Judged like --wipe-redis. Needs the sim's own Redis; not with --restart-redis.
    #[arg(long)]
    pub rollback_redis: bool,
    /// With --redis-cluster N (N >= 3: a failover needs a majority of masters), start one
    /// replica per master and, this many times at seeded points of the run, SIGKILL the master
    /// of one of the namespace's slots (the control slot or a shard's, drawn from the seed), wait
    /// (bounded) until its replica is promoted, and start the killed node again (it rejoins as a
    /// replica; a later kill waits until a replica is in sync). Replication is asynchronous: the
    /// promoted replica may lack the last writes the master acknowledged. What must hold is one
    /// of two: nothing acknowledged was lost, the run completes and the usual exactly-once
    /// verdict passes; or a copy finds a loss (invariant 9), and then every copy exits with code
    /// 5, the namespace is marked halted and no id is generated after the halt (judged like
    /// --wipe-redis). Anything else fails: a missing or duplicate outcome, a copy exiting with
    /// another code, or still running 20 s after the kill once one halted.
    #[arg(long, default_value_t = 0, value_name = "M")]
    pub kill_master: u32,
    /// Run the real `app getErrors` this many times during the run, at seeded points while
    /// handlers still write errors: half of them SIGKILLed after a seeded number of lines, one
    /// time in three two at once. The verdict takes everything they printed plus the final
    /// drain: every failed id exactly once, a second print allowed only after a killed drain.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub drain_errors: u32,
    /// Probability that eventHandler fails a message (the task's 15 %).
    #[arg(long, default_value_t = 0.15)]
    pub error_rate: f64,
    /// eventHandler delay is uniform in 0..this many ms (the task's 1000).
    #[arg(long, default_value_t = 1000)]
    pub handler_delay_max_ms: u64,
    /// Passed to every app: an eventHandler that has not called back after this long fails with
    /// "handler timeout". The verdict predicts those failures from the seeded delays.
    #[arg(long, default_value_t = 30_000)]
    pub handler_timeout_ms: u64,
    /// Passed to every app: messages a handler holds at once.
    #[arg(long, default_value_t = 150_000)]
    pub max_in_flight: u64,
    /// Passed to every app: messages per fetch.
    #[arg(long, default_value_t = 8000)]
    pub batch: u64,
    /// Passed to every app: backpressure, the generator waits while this many are queued.
    #[arg(long, default_value_t = 8_000)]
    pub queue_max: u64,
    /// Passed to every app: under load, how long a handler gathers outcomes before committing
    /// them (0 = at once).
    #[arg(long, default_value_t = 50)]
    pub commit_window_ms: u64,
    /// Passed to every app: outcomes per commit call, at most (cuts a commit window short).
    #[arg(long, default_value_t = 8_000)]
    pub commit_max: u64,
    /// Passed to every app: messages per generate call (one queue entry, which becomes one batch
    /// record when a handler fetches it whole).
    #[arg(long, default_value_t = 8_000)]
    pub gen_batch: u64,
    /// Passed to every app: ms between generated messages (0 = as fast as handlers take them).
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
    /// Passed to every app: leader lease TTL.
    #[arg(long, default_value_t = 600)]
    pub lease_ms: u64,
    /// Passed to every app: handler heartbeat TTL. A killed handler's messages are reclaimed
    /// after about this long; a live handler stalled (not scheduled) for longer than this is
    /// presumed dead too, and its messages re-run elsewhere.
    #[arg(long, default_value_t = 750)]
    pub heartbeat_ms: u64,
    /// Fail (exit 3) when the run has not completed after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Where to write the report (default: reports/<UTC timestamp>-seed<seed>/).
    #[arg(long)]
    pub report_dir: Option<PathBuf>,
    /// Use this Redis instead of starting one (a fresh namespace is used; nothing else is touched).
    /// A `redis+cluster://host:port[,host:port…]` URL names a Redis Cluster.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Start a local Redis Cluster of N masters (no replicas; one each with --kill-master) instead
    /// of one redis-server, and run on it: the namespace lives in one slot, on one of the
    /// masters. 0 = one plain redis-server.
    /// Not with --redis-url or with the faults that need the sim's own single Redis
    /// (--restart-redis, --wipe-redis, --rollback-redis, --partition-leader).
    #[arg(long, default_value_t = 0)]
    pub redis_cluster: u32,
    /// Passed to every app: spread the namespace over S shards (hash tags), each on its own
    /// master of a cluster of S masters (docs/PROTOCOL.md, "Sharding"). The verdict merges the
    /// shards (an id recorded in two is a duplicate). Not with --inject-duplicates.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub shards: u32,
    /// Passed to every app: after each script call, wait until this many replicas hold its
    /// writes (Redis `WAIT`), or treat the call as one whose reply was lost. With --kill-master,
    /// 1 makes a master failover lose nothing the group acted on. 0 = no wait.
    #[arg(long, default_value_t = 0)]
    pub wait_replicas: u32,
    /// The `app` binary (default: the one next to `sim`).
    #[arg(long)]
    pub app_bin: Option<PathBuf>,
    /// Print no progress (only the seed, the summary and the verdict).
    #[arg(long)]
    pub quiet: bool,
}

/// A preset of `sim` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// The flags' own defaults: the headline configuration (1M messages, batches of 8000, 150k in flight per handler).
    Default,
    /// Small batches and few messages in flight, so fault windows are hit often (for soaks).
    Small,
}

impl Flags {
    /// Parses the command line and applies the profile to every flag left at its default.
    fn parse_with_profile() -> Flags {
        let matches = Flags::command().get_matches();
        let mut flags = Flags::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        flags.apply_profile(&matches);
        flags
    }

    fn apply_profile(&mut self, matches: &ArgMatches) {
        let defaulted = |id: &str| matches.value_source(id) == Some(ValueSource::DefaultValue);
        if self.profile == Profile::Small {
            self.apply_small(&defaulted);
        }
        // A batch left at its default never exceeds what a handler may hold (the app refuses an
        // explicit --batch above --max-in-flight).
        if defaulted("batch") {
            self.batch = self.batch.min(self.max_in_flight);
        }
    }

    fn apply_small(&mut self, defaulted: &dyn Fn(&str) -> bool) {
        for (id, field, value) in [
            ("messages", &mut self.messages, 200_000),
            ("batch", &mut self.batch, 100),
            ("max_in_flight", &mut self.max_in_flight, 2_000),
            ("queue_max", &mut self.queue_max, 1_000),
            ("handler_delay_max_ms", &mut self.handler_delay_max_ms, 200),
        ] {
            if defaulted(id) {
                *field = value;
            }
        }
    }
}

fn main() -> ExitCode {
    let flags = Flags::parse_with_profile();
    if !(0.0..=1.0).contains(&flags.error_rate) {
        eprintln!(
            "sim: --error-rate {} must be between 0 and 1",
            flags.error_rate
        );
        return ExitCode::from(2);
    }
    let own_redis = flags.restart_redis > 0 || flags.wipe_redis || flags.rollback_redis;
    if own_redis && flags.redis_url.is_some() {
        eprintln!("sim: --restart-redis, --wipe-redis and --rollback-redis need the sim's own Redis; drop --redis-url");
        return ExitCode::from(2);
    }
    if flags.redis_cluster > 0
        && (own_redis || flags.redis_url.is_some() || flags.partition_leader > 0)
    {
        eprintln!("sim: --redis-cluster starts its own cluster: not with --redis-url, --restart-redis, --wipe-redis, --rollback-redis or --partition-leader (they need one plain Redis)");
        return ExitCode::from(2);
    }
    if flags.kill_master > 0 && flags.redis_cluster == 0 {
        eprintln!("sim: --kill-master kills masters of the sim's own Redis Cluster: add --redis-cluster N (N >= 3)");
        return ExitCode::from(2);
    }
    if flags.kill_master > 0 && flags.redis_cluster < 3 {
        eprintln!(
            "sim: --kill-master needs --redis-cluster 3 or more (got {}): a replica is promoted only by a majority of the masters, which a cluster of fewer than 3 loses with one",
            flags.redis_cluster
        );
        return ExitCode::from(2);
    }
    if flags.shards > 1 && flags.inject_duplicates > 0 {
        eprintln!("sim: --inject-duplicates plants copies in one slot's in-flight sets: not with --shards above 1");
        return ExitCode::from(2);
    }
    if flags.rollback_redis && (flags.restart_redis > 0 || flags.wipe_redis) {
        eprintln!("sim: --rollback-redis restores an RDB snapshot: not with --restart-redis (AOF) or --wipe-redis");
        return ExitCode::from(2);
    }
    if flags.messages == 0 || flags.messages > leaderq::protocol::message::ID_MAX + 1 {
        eprintln!(
            "sim: --messages must be between 1 and {}",
            leaderq::protocol::message::ID_MAX + 1
        );
        return ExitCode::from(2);
    }
    let seed = flags.seed.unwrap_or_else(rand::random);
    println!("seed={seed}");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sim: cannot start the runtime: {e}");
            return ExitCode::from(4);
        }
    };
    let code = match runtime.block_on(driver::run(&flags, seed)) {
        Ok(driver::End::Pass) => return ExitCode::SUCCESS,
        Ok(driver::End::Violation) => 1,
        Ok(driver::End::Timeout) => 3,
        Ok(driver::End::FaultsMissed) => 5,
        Err(e) => {
            eprintln!("sim: {e:#}");
            4
        }
    };
    println!("replay: {}", replay_command(std::env::args(), seed));
    ExitCode::from(code)
}

/// The command line that replays this run: the same flags, the seed made explicit, without
/// `--report-dir` (a replay writes a report of its own), passwords in URLs redacted.
fn replay_command(args: impl Iterator<Item = String>, seed: u64) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut args = args.peekable();
    let mut has_seed = false;
    while let Some(arg) = args.next() {
        if arg == "--report-dir" {
            args.next();
            continue;
        }
        if arg.starts_with("--report-dir=") {
            continue;
        }
        has_seed |= arg == "--seed" || arg.starts_with("--seed=");
        out.push(leaderq::conn::redact(&arg));
    }
    if !has_seed {
        out.push(format!("--seed {seed}"));
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> impl Iterator<Item = String> + '_ {
        line.split(' ').map(str::to_string)
    }

    #[test]
    fn replay_makes_the_seed_explicit_and_drops_the_report_dir() {
        assert_eq!(
            replay_command(
                args("sim --profile small --report-dir /tmp/x --kill-leader"),
                7
            ),
            "sim --profile small --kill-leader --seed 7"
        );
        assert_eq!(
            replay_command(args("sim --seed 9 --report-dir=/tmp/x"), 9),
            "sim --seed 9"
        );
        assert_eq!(
            replay_command(args("sim --redis-url redis://u:secret@h:1"), 3),
            "sim --redis-url redis://***@h:1 --seed 3"
        );
    }

    #[test]
    fn kills_without_kill_leader_is_refused() {
        let refused = Flags::command().try_get_matches_from(["sim", "--kills", "2"]);
        assert!(refused.unwrap_err().to_string().contains("--kill-leader"));
        let matches = Flags::command()
            .try_get_matches_from(["sim", "--kill-leader", "--kills", "2"])
            .unwrap();
        assert_eq!(Flags::from_arg_matches(&matches).unwrap().kills, 2);
    }

    #[test]
    fn the_small_profile_fills_only_what_was_not_given() {
        let matches = Flags::command()
            .try_get_matches_from(["sim", "--profile", "small", "--batch", "7"])
            .unwrap();
        let mut flags = Flags::from_arg_matches(&matches).unwrap();
        flags.apply_profile(&matches);
        assert_eq!(
            (
                flags.messages,
                flags.batch,
                flags.max_in_flight,
                flags.queue_max
            ),
            (200_000, 7, 2_000, 1_000)
        );
        assert_eq!(flags.handler_delay_max_ms, 200);
    }
}
