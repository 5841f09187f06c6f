//! `sim`: the proof. Starts a Redis and K real `app` copies, SIGKILLs the generator at seeded
//! points, runs N messages with the generation delay removed, then checks that every id has
//! exactly one recorded outcome and writes a report (summary, histograms, plots).
//!
//! Exit codes: 0 pass, 1 correctness violation, 2 bad flags, 3 liveness timeout, 4 crash or setup
//! failure.

mod driver;
mod plot;
mod report;

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// Prove the group handles N messages exactly once while its generator is SIGKILLed.
///
/// The seed is printed first; the same seed replays the same kill plan and the same per-message
/// outcomes (delays and errors are a pure function of seed and id).
#[derive(Debug, Parser)]
#[command(name = "sim", version)]
pub struct Flags {
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
    /// How many generator kills with --kill-leader.
    #[arg(long, default_value_t = 3)]
    pub kills: u32,
    /// SIGSTOP the generator this many times, each for twice --lease-ms plus 500 ms, then
    /// SIGCONT it: it must not generate again (fencing) and must step down.
    #[arg(long, default_value_t = 0, value_name = "M")]
    pub pause_leader: u32,
    /// SIGKILL this many handlers while they hold in-flight messages (and start replacements).
    #[arg(long, default_value_t = 0, value_name = "M")]
    pub kill_workers: u32,
    /// Drop every copy's Redis connection (`CLIENT KILL TYPE normal`) this many times.
    #[arg(long, default_value_t = 0, value_name = "M")]
    pub drop_connections: u32,
    /// SIGKILL Redis and restart it from its AOF (`appendfsync always`) this many times. Needs
    /// the sim's own Redis (no --redis-url).
    #[arg(long, default_value_t = 0, value_name = "M")]
    pub restart_redis: u32,
    /// Probability that eventHandler fails a message (the task's 15 %).
    #[arg(long, default_value_t = 0.15)]
    pub error_rate: f64,
    /// eventHandler delay is uniform in 0..this many ms (the task's 1000).
    #[arg(long, default_value_t = 1000)]
    pub handler_delay_max_ms: u64,
    /// Passed to every app: messages a handler holds at once.
    #[arg(long, default_value_t = 50_000)]
    pub max_in_flight: u64,
    /// Passed to every app: messages per fetch.
    #[arg(long, default_value_t = 1000)]
    pub batch: u64,
    /// Passed to every app: backpressure, the generator waits while this many are queued.
    #[arg(long, default_value_t = 5_000)]
    pub queue_max: u64,
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
    #[arg(long)]
    pub redis_url: Option<String>,
    /// The `app` binary (default: the one next to `sim`).
    #[arg(long)]
    pub app_bin: Option<PathBuf>,
    /// Print no progress (only the seed, the summary and the verdict).
    #[arg(long)]
    pub quiet: bool,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    if !(0.0..=1.0).contains(&flags.error_rate) {
        eprintln!(
            "sim: --error-rate {} must be between 0 and 1",
            flags.error_rate
        );
        return ExitCode::from(2);
    }
    if flags.restart_redis > 0 && flags.redis_url.is_some() {
        eprintln!("sim: --restart-redis needs the sim's own Redis; drop --redis-url");
        return ExitCode::from(2);
    }
    if flags.messages == 0 || flags.messages > leaderq::message::ID_MAX + 1 {
        eprintln!(
            "sim: --messages must be between 1 and {}",
            leaderq::message::ID_MAX + 1
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
    match runtime.block_on(driver::run(&flags, seed)) {
        Ok(driver::End::Pass) => ExitCode::SUCCESS,
        Ok(driver::End::Violation) => ExitCode::from(1),
        Ok(driver::End::Timeout) => ExitCode::from(3),
        Err(e) => {
            eprintln!("sim: {e:#}");
            ExitCode::from(4)
        }
    }
}
