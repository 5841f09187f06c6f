//! `app`: one copy of the program. With no command it joins the group (generator if the lease is
//! free, handler otherwise); `app getErrors` prints and deletes every failed message; `app status`
//! shows what the group is doing.
//!
//! Exit codes: 0 clean stop, 1 unexpected failure, 2 bad flags, 3 Redis unreachable, 4 Redis
//! refused the credentials or the TLS handshake failed, 5 the namespace is halted (Redis lost or
//! damaged data; see README, "When Redis forgets"), 6 Redis stayed out of memory past
//! --redis-down-max-ms, 130 a second SIGINT/SIGTERM (exit at once; nothing is lost).

use clap::{Args, Parser, Subcommand, ValueEnum};
use leaderq::admin::errors::{self, DrainConfig, LineFormat};
use leaderq::admin::metrics;
use leaderq::admin::status::{self, ShowOptions};
use leaderq::node::generator::GeneratorConfig;
use leaderq::node::handler::HandlerConfig;
use leaderq::outcome::OutcomeModel;
use leaderq::{
    conn, Config, Counter, Error, Failure, Handler, Keys, Message, Node, Planned, TaskHandler,
};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Many copies of one program sharing work through Redis: one elected generator produces
/// messages 0, 1, 2, … every --interval-ms; every other copy handles them; each outcome is
/// recorded exactly once; failed messages go to an error store that `app getErrors` drains.
#[derive(Debug, Parser)]
#[command(name = "app", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    run: RunFlags,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print every failed message (one per line on stdout, a count on stderr), delete them, exit.
    /// Killed halfway, the next call prints what was left: nothing is lost.
    #[command(name = "getErrors", visible_alias = "get-errors")]
    GetErrors {
        #[command(flatten)]
        common: Common,
        /// Entries printed per Redis round trip.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        chunk: u64,
        /// Print one JSON object a line instead: {"id", "reason", "when" (RFC 3339 UTC)}; id is
        /// null for an entry that is not a failed message, which also gets a "payload" field.
        #[arg(long)]
        json: bool,
        /// Print without deleting anything (what a drain would print, in the same order; no lock
        /// is taken, so a running getErrors is never delayed).
        #[arg(long)]
        peek: bool,
        /// Ride out a dropped connection or a Redis restart for this long mid-drain (every step
        /// is safe to repeat: each entry is still printed once), then exit with code 3.
        #[arg(long, default_value_t = 30_000)]
        redis_down_max_ms: u64,
    },
    /// Recompute the counters that must never be reset (the next id, the epoch) from what Redis
    /// still holds (the epoch log, queued, in-flight and recorded ids), keep a damaged value
    /// beside them, and lift a halt that their damage caused. Run it when `status` says HALTED
    /// with "damaged data"; a halt because Redis lost data needs --accept-data-loss instead.
    Repair {
        #[command(flatten)]
        common: Common,
    },
    /// Show the generator, every copy with its role and in-flight count, queue depth, error-store
    /// size, counters and rates over the last 10 s. Read-only.
    Status {
        #[command(flatten)]
        common: Common,
        /// Print one JSON object (a line per refresh with --watch) instead of text.
        #[arg(long)]
        json: bool,
        /// Refresh once a second until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
}

/// How log lines on stderr look.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Readable lines.
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

/// Flags every command takes.
#[derive(Debug, Args)]
struct Common {
    /// Redis to use: redis://[USER:PASSWORD@]HOST:PORT[/DB], rediss://… for TLS, or
    /// unix:///PATH[?db=N&user=U&pass=P]. Prefer the REDIS_URL environment variable for a URL with
    /// a password (argv is visible to other users through ps); its value is never printed.
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// With rediss://: trust this CA certificate (PEM) instead of the system's, e.g. a private CA.
    #[arg(long, value_name = "FILE")]
    tls_ca_cert: Option<PathBuf>,
    /// With rediss://: this client's certificate (PEM), for mutual TLS (with --tls-key).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// With rediss://: this client's private key (PEM), for mutual TLS (with --tls-cert).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Namespace of the group: every key lives under `{NAMESPACE}:` (one Redis Cluster slot).
    #[arg(long, default_value = "app")]
    namespace: String,
    /// Give up with exit code 3 when Redis stays unreachable this long at start-up (100 ms to a
    /// day).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=leaderq::config::DAY_MS))]
    connect_timeout_ms: u64,
    /// Log format on stderr; levels come from RUST_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Flags of the default command (join the group).
#[derive(Debug, Args)]
struct RunFlags {
    /// Milliseconds between generated messages (the task's 500); 0 = as fast as handlers take them.
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
    /// Stop generating after id N-1. Stored in Redis, so a successor generator (and every later
    /// run in this namespace) respects it; `none` lifts a stored limit. `status` shows a limit
    /// that stops generation.
    #[arg(long, value_name = "N|none")]
    max_messages: Option<leaderq::config::Limit>,
    /// Seed the handler: each message's delay and error become a pure function of (seed, id).
    /// Random when absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Append the id of every message this copy's handler ran to FILE (8 bytes little-endian
    /// each), before its outcome is committed, so a verifier can tell where each message really
    /// ran (`sim` gives each copy one). Off by default.
    #[arg(long, value_name = "FILE")]
    run_log: Option<std::path::PathBuf>,
    /// Probability that eventHandler fails a message, 0 to 1 (the task's 15 %).
    #[arg(long, default_value_t = 0.15, allow_negative_numbers = true)]
    error_rate: f64,
    /// eventHandler waits a uniform integer delay in 0..this many ms (the task's 1000).
    #[arg(long, default_value_t = 1000)]
    handler_delay_max_ms: u64,
    /// Give up on an eventHandler that has not called back after this long: the message is
    /// recorded as failed with the reason "handler timeout" (exactly once, like any outcome) and
    /// its slot is freed, so a stuck handler never holds messages forever.
    #[arg(long, default_value_t = 30_000)]
    handler_timeout_ms: u64,
    /// Leader lease TTL: a paused or silently dead generator is replaced after about this long.
    /// (A SIGKILLed one is replaced at once: its Redis connection closes.)
    #[arg(long, default_value_t = 600)]
    lease_ms: u64,
    /// Handler heartbeat TTL. A SIGKILLed handler's messages are reclaimed within about this long.
    #[arg(long, default_value_t = 750)]
    heartbeat_ms: u64,
    /// Messages per fetch (one script call each; a handler fetches once it has room for this
    /// many, and takes what is queued, up to this many). Default 8000, or --max-in-flight when
    /// that is smaller.
    #[arg(long)]
    batch: Option<u64>,
    /// Messages a handler holds at once (fetched, not yet committed; about 300 bytes of memory
    /// each, measured). With the task's 0-999 ms handler a handler completes about this many per 0.5 s
    /// (see reports/PERFORMANCE.md).
    #[arg(long, default_value_t = 150_000)]
    max_in_flight: usize,
    /// Outcomes per commit (one script call each), at most.
    #[arg(long, default_value_t = 8000)]
    commit_max: usize,
    /// Under load, how long a handler gathers outcomes before committing them, so each commit
    /// carries many outcomes per batch (Redis's cost is per batch per commit). Light traffic
    /// (fewer than 64 outcomes expected in the window) is committed at once. 0 = always at once.
    #[arg(long, default_value_t = 50)]
    commit_window_ms: u64,
    /// Messages per generate call when --interval-ms is 0: one queue entry, which a handler that
    /// takes it whole holds as one batch record (Redis's costs are per batch).
    #[arg(long, default_value_t = 8000)]
    gen_batch: u64,
    /// Backpressure: the generator waits while this many messages are queued (bounds Redis
    /// memory and the time a message waits before a handler takes it).
    #[arg(long, default_value_t = 8_000)]
    queue_max: u64,
    /// Unique id of this copy (default: host-pid-random).
    #[arg(long)]
    instance_id: Option<String>,
    /// Exit with code 3 when Redis stays unreachable this long mid-run.
    #[arg(long, default_value_t = 30_000)]
    redis_down_max_ms: u64,
    /// On SIGTERM/SIGINT, wait at most this long for in-flight messages to commit
    /// (default: the smaller of --handler-delay-max-ms and --handler-timeout-ms, plus 5000).
    /// A second signal exits at once.
    #[arg(long)]
    drain_timeout_ms: Option<u64>,
    /// Fault injection for tests: handling this message id aborts the process, every time (a
    /// poison message). Hidden: never use it in production.
    #[arg(long, hide = true)]
    fault_crash_on_id: Option<u64>,
    /// Join a namespace that a copy halted because Redis lost data (exit code 5), clearing the
    /// halt: you accept that ids may repeat and outcomes may be missing. Drain getErrors first;
    /// a fresh --namespace is the clean alternative. See README, "When Redis forgets".
    #[arg(long)]
    accept_data_loss: bool,
    /// Run even though Redis's maxmemory-policy may evict keys. Refused by default: an evicted
    /// queue, in-flight set or outcome bitmap loses messages without an error.
    #[arg(long)]
    allow_eviction: bool,
    /// Spread the namespace's hot keys (queue, in-flight records, outcome bitmaps, error store)
    /// over this many hash tags, `{NAMESPACE/0}` .. `{NAMESPACE/S-1}`, so that on a Redis Cluster
    /// they land on different masters; the lease, epoch and id counter stay in `{NAMESPACE}`.
    /// Set by the first copy and stored; every copy of the group must use the same count.
    /// Messages without data only (the task's counter). See docs/PROTOCOL.md, "Sharding".
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// After every script call, wait (Redis `WAIT`, up to 1000 ms) until this many replicas hold
    /// its writes; a call they do not confirm is treated like one whose reply was lost. With
    /// replicas that a failover promotes, a master killed and replaced by one then loses nothing
    /// the group acted on (`sim --kill-master` proves it). 0 = do not wait: a failover to a
    /// replica that missed writes is detected and the group halts (exit code 5).
    #[arg(long, default_value_t = 0)]
    wait_replicas: u32,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (default: no exporter, no cost).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let common = match &cli.command {
        Some(Command::GetErrors { common, .. })
        | Some(Command::Status { common, .. })
        | Some(Command::Repair { common }) => common,
        None => &cli.common,
    };
    init_logs(common.log_format);
    // One thread. A copy's work is I/O-bound and never blocks a thread, while every copy shares
    // the machine's cores with the others and with Redis: a multi-thread runtime's cross-thread
    // wake-ups (futex, epoll) and idle spinning cost about a tenth of the copies' CPU in the 1M
    // run (perf and alternated runs, 2026-11-30; reports/PERFORMANCE.md).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("app: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("app: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Logs to stderr (stdout is for getErrors' and status's output), filtered by RUST_LOG.
fn init_logs(format: LogFormat) {
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        );
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

impl Common {
    /// The validated Redis target (URL plus TLS files).
    fn target(&self) -> Result<conn::RedisTarget, Error> {
        let files = conn::TlsFiles {
            ca_cert: self.tls_ca_cert.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        };
        conn::RedisTarget::with_tls(&self.redis_url, &files)
    }
}

fn exit_code(e: &Error) -> u8 {
    match e {
        Error::Config(_) => 2,
        Error::Auth(_) | Error::Tls(_) => 4,
        Error::OutOfMemory(_) => 6,
        e if e.halts_the_group() => 5,
        e if e.is_connection() => 3,
        _ => 1,
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Some(Command::GetErrors {
            common,
            chunk,
            json,
            peek,
            redis_down_max_ms,
        }) => get_errors(common, chunk, json, peek, redis_down_max_ms).await,
        Some(Command::Status {
            common,
            json,
            watch,
        }) => show_status(common, json, watch).await,
        Some(Command::Repair { common }) => repair(common).await,
        None => join(cli.common, cli.run).await,
    }
}

async fn repair(common: Common) -> Result<(), Error> {
    let keys = Keys::new(&common.namespace)?;
    let mut con = conn::connect_to(&common.target()?, common.connect_timeout_ms)
        .await?
        .pinned(&keys);
    let r = leaderq::admin::repair::repair(&mut con, &keys).await?;
    eprintln!(
        "repair: next_id {} -> {}, epoch {} -> {}",
        r.next_id_before, r.next_id_after, r.epoch_before, r.epoch_after
    );
    if let Some(why) = &r.lifted_halt {
        eprintln!("repair: lifted the halt ({why}); copies may join again");
    }
    if let Some(why) = &r.kept_halt {
        eprintln!("repair: the namespace stays halted: {why}");
        eprintln!("repair: Redis lost data there; start a copy with --accept-data-loss, or use a fresh --namespace");
    }
    Ok(())
}

async fn join(common: Common, f: RunFlags) -> Result<(), Error> {
    let instance_id = f
        .instance_id
        .unwrap_or_else(leaderq::node::default_instance_id);
    let config = Config {
        redis: common.target()?,
        keys: Keys::new(&common.namespace)?,
        instance_id: instance_id.clone(),
        generator: GeneratorConfig {
            interval_ms: f.interval_ms,
            batch_max: f.gen_batch,
            queue_max: f.queue_max,
            lease_ms: f.lease_ms,
        },
        handler: HandlerConfig {
            instance_id,
            batch: f
                .batch
                .unwrap_or_else(|| leaderq::node::builder::default_batch(f.max_in_flight)),
            max_in_flight: f.max_in_flight,
            commit_max: f.commit_max,
            commit_window_ms: f.commit_window_ms,
            heartbeat_ms: f.heartbeat_ms,
            redis_down_max_ms: f.redis_down_max_ms,
            handler_timeout_ms: f.handler_timeout_ms,
            run_log: f.run_log.clone(),
        },
        max_messages: f.max_messages,
        connect_timeout_ms: common.connect_timeout_ms,
        redis_down_max_ms: f.redis_down_max_ms,
        accept_data_loss: f.accept_data_loss,
        allow_eviction: f.allow_eviction,
        shards: f.shards,
        wait_replicas: f.wait_replicas,
        drain_timeout_ms: f
            .drain_timeout_ms
            .unwrap_or(f.handler_delay_max_ms.min(f.handler_timeout_ms) + 5000),
    }
    .validate()?;
    let handler = CrashOn {
        inner: TaskHandler::new(OutcomeModel {
            seed: f.seed,
            error_rate: f.error_rate,
            delay_max_ms: f.handler_delay_max_ms,
        })?,
        id: f.fault_crash_on_id,
    };
    let node = Node::from_config(config, handler, Counter)?;
    let stop = CancellationToken::new();
    {
        // So these lines, and the signal handler's, carry the instance like node::run's.
        let _span = tracing::info_span!("node", instance = %node.config().instance_id).entered();
        if let Some(addr) = &f.metrics_addr {
            metrics::install(addr)?;
        }
        spawn_signal_handler(stop.clone());
    }
    node.run(stop).await
}

/// `--fault-crash-on-id`: the task's handler, except that handling one id aborts the process (a
/// poison message, for the tests and `sim`). A wrapper here, so the library's handler path has no
/// such hook.
struct CrashOn<H> {
    inner: H,
    id: Option<u64>,
}

impl<H: Handler> Handler for CrashOn<H> {
    async fn handle(&self, message: Message) -> Result<(), Failure> {
        if self.id == Some(message.id) {
            tracing::error!(id = message.id, "fault injection: crashing on this message");
            std::process::abort();
        }
        self.inner.handle(message).await
    }

    fn planned(&self, message: &Message) -> Option<Planned> {
        if self.id == Some(message.id) {
            tracing::error!(id = message.id, "fault injection: crashing on this message");
            std::process::abort();
        }
        self.inner.planned(message)
    }
}

async fn get_errors(
    common: Common,
    chunk: u64,
    json: bool,
    peek: bool,
    redis_down_max_ms: u64,
) -> Result<(), Error> {
    let keys = Keys::new(&common.namespace)?;
    let mut con = conn::connect_to(&common.target()?, common.connect_timeout_ms)
        .await?
        .pinned(&keys);
    let format = if json {
        LineFormat::Json
    } else {
        LineFormat::Plain
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if peek {
        let seen = errors::peek(&mut con, &keys, chunk as usize, format, &mut out).await?;
        eprintln!(
            "getErrors --peek: printed {} entries ({} being drained, {} in the store); deleted nothing",
            seen.draining + seen.stored,
            seen.draining,
            seen.stored
        );
        return Ok(());
    }
    let config = DrainConfig {
        chunk: chunk as usize,
        lock_ms: 5_000,
        token: leaderq::node::default_instance_id(),
        retry_for: Duration::from_millis(redis_down_max_ms),
    };
    let mut sink = errors::Lines::new(out, format);
    let drained = errors::drain(&mut con, &keys, &config, &mut sink).await?;
    eprintln!(
        "getErrors: printed and deleted {} entries ({} failed messages, {} other)",
        drained.printed,
        drained.printed - drained.bad,
        drained.bad
    );
    Ok(())
}

async fn show_status(common: Common, json: bool, watch: bool) -> Result<(), Error> {
    let keys = Keys::new(&common.namespace)?;
    let mut con = conn::connect_to(&common.target()?, common.connect_timeout_ms)
        .await?
        .pinned(&keys);
    let options = ShowOptions {
        json,
        watch_every: watch.then_some(Duration::from_secs(1)),
        clear_screen: std::io::stdout().is_terminal(),
    };
    let stop = CancellationToken::new();
    if watch {
        spawn_signal_handler(stop.clone());
    }
    let mut out = std::io::stdout().lock();
    status::show(&mut con, &keys, options, &stop, &mut out).await
}

/// First SIGTERM/SIGINT: stop cleanly (release the lease, drain). Second: exit at once, which is
/// safe — whatever was in flight is reclaimed by the other copies.
fn spawn_signal_handler(stop: CancellationToken) {
    use tracing::Instrument;
    let task = async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!("cannot install signal handlers; stop with SIGKILL (nothing is lost)");
            return;
        };
        for n in 0..2 {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if n == 0 {
                tracing::info!("signal received: stopping (a second signal exits at once)");
                stop.cancel();
            } else {
                tracing::warn!("second signal: exiting now; in-flight messages will be reclaimed");
                std::process::exit(130);
            }
        }
    };
    tokio::spawn(task.in_current_span());
}
