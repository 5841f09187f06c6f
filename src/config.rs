//! The validated configuration of one `app` process: flags become this before any work starts,
//! so a bad value is one clear error at start-up rather than a surprise mid-run.

use crate::error::Error;
use crate::node::generator::GeneratorConfig;
use crate::node::handler::HandlerConfig;
use crate::protocol::keys::Keys;

/// The longest any duration flag may be: a day (Redis accepts more, but no wait here needs it).
pub const DAY_MS: u64 = 86_400_000;
/// The shortest lease: renewed every third of it, it must survive a 100 ms stall.
pub const LEASE_MS_MIN: u64 = 200;
/// The shortest heartbeat: refreshed every fifth of it, it must survive a 100 ms stall.
pub const HEARTBEAT_MS_MIN: u64 = 200;

/// `--max-messages`: the stored limit on generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Generate ids `0..n` at most.
    Ids(u64),
    /// No limit (`--max-messages none`): delete a stored one.
    Lift,
}

impl std::str::FromStr for Limit {
    type Err = String;

    fn from_str(s: &str) -> Result<Limit, String> {
        match s {
            "none" => Ok(Limit::Lift),
            n => n
                .parse()
                .map(Limit::Ids)
                .map_err(|_| format!("{n:?} is neither a number nor \"none\"")),
        }
    }
}

/// Everything `node::run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where Redis is, and how to reach it.
    pub redis: crate::conn::RedisTarget,
    /// Key names of the namespace this copy joins.
    pub keys: Keys,
    /// Unique per process: the lease value and handler ids are built from it.
    pub instance_id: String,
    /// Generation settings (used while this copy holds the lease).
    pub generator: GeneratorConfig,
    /// Handling settings (used while it does not).
    pub handler: HandlerConfig,
    /// What to do with the stored generation limit at start (it lives in Redis, so every later
    /// generator respects it): leave it, set it, or lift it.
    pub max_messages: Option<Limit>,
    /// How long to keep trying to reach Redis at start-up.
    pub connect_timeout_ms: u64,
    /// How long Redis may stay unreachable mid-run before the process gives up (exit code 3).
    pub redis_down_max_ms: u64,
    /// On SIGTERM, how long in-flight messages may take to finish and commit.
    pub drain_timeout_ms: u64,
    /// Join a namespace halted because Redis lost data, clearing the halt: the operator accepts
    /// that ids may repeat and outcomes may be missing (README, "When Redis forgets").
    pub accept_data_loss: bool,
    /// Run on a Redis whose maxmemory-policy may evict keys (refused otherwise: eviction loses
    /// messages silently).
    pub allow_eviction: bool,
    /// How many shards the namespace's hot keys are spread over (1 = unsharded; docs/PROTOCOL.md,
    /// "Sharding"). Stored in Redis by the first copy; a copy started with another count is
    /// refused.
    pub shards: u32,
    /// After each script call, wait until this many replicas hold every write of the call
    /// (`WAIT`, at most [`WAIT_TIMEOUT_MS`]), or treat the call as one whose reply was lost: a
    /// master failover to one of them then loses nothing a copy acted on. 0 = no wait.
    pub wait_replicas: u32,
}

/// How long a script call waits for `--wait-replicas` replicas before it counts as lost.
pub const WAIT_TIMEOUT_MS: u64 = 1000;

impl Config {
    /// Checks every value; returns the config unchanged when it can work.
    pub fn validate(self) -> Result<Config, Error> {
        let bad = |msg: String| Err(Error::Config(msg));
        let id = &self.instance_id;
        if id.is_empty()
            || id.len() > 64
            || id
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '{' || c == '}')
        {
            return bad(format!(
                "--instance-id {id:?} must be 1-64 characters without whitespace or braces"
            ));
        }
        if self.shards == 0 || self.shards > crate::protocol::shards::SHARDS_MAX {
            return bad(format!(
                "--shards {} must be between 1 and {}",
                self.shards,
                crate::protocol::shards::SHARDS_MAX
            ));
        }
        if self.wait_replicas > 16 {
            return bad(format!("--wait-replicas {} exceeds 16", self.wait_replicas));
        }
        let g = &self.generator;
        if g.lease_ms < LEASE_MS_MIN || g.lease_ms > 600_000 {
            return bad(format!(
                "--lease-ms {} must be between {LEASE_MS_MIN} and 600000: a shorter lease is lost to one scheduling hiccup of a loaded machine, and every loss is an election",
                g.lease_ms
            ));
        }
        if g.interval_ms > DAY_MS {
            return bad(format!("--interval-ms {} exceeds a day", g.interval_ms));
        }
        if g.queue_max > 100_000_000 {
            return bad(format!(
                "--queue-max {} exceeds 100000000 (Redis memory)",
                g.queue_max
            ));
        }
        if g.batch_max == 0 || g.batch_max > 100_000 {
            return bad(format!(
                "--gen-batch {} must be between 1 and 100000",
                g.batch_max
            ));
        }
        if g.queue_max == 0 {
            return bad("--queue-max must be at least 1".into());
        }
        let h = &self.handler;
        if h.max_in_flight == 0 || h.max_in_flight > 1_000_000 {
            return bad(format!(
                "--max-in-flight {} must be between 1 and 1000000",
                h.max_in_flight
            ));
        }
        if h.batch == 0 || h.batch > h.max_in_flight as u64 || h.batch > 100_000 {
            return bad(format!(
                "--batch {} must be between 1 and min(--max-in-flight, 100000)",
                h.batch
            ));
        }
        if h.commit_max == 0 || h.commit_max > 100_000 {
            return bad(format!(
                "--commit-max {} must be between 1 and 100000",
                h.commit_max
            ));
        }
        if h.commit_window_ms > 10_000 {
            return bad(format!(
                "--commit-window-ms {} must be between 0 and 10000",
                h.commit_window_ms
            ));
        }
        if h.handler_timeout_ms < 10 || h.handler_timeout_ms > 86_400_000 {
            return bad(format!(
                "--handler-timeout-ms {} must be between 10 and 86400000 (one day)",
                h.handler_timeout_ms
            ));
        }
        if h.heartbeat_ms < HEARTBEAT_MS_MIN || h.heartbeat_ms > DAY_MS {
            return bad(format!(
                "--heartbeat-ms {} must be between {HEARTBEAT_MS_MIN} and {DAY_MS}: a shorter heartbeat lapses on a loaded machine and its messages run twice",
                h.heartbeat_ms
            ));
        }
        for (flag, ms) in [
            ("--connect-timeout-ms", self.connect_timeout_ms),
            ("--redis-down-max-ms", self.redis_down_max_ms),
            ("--drain-timeout-ms", self.drain_timeout_ms),
        ] {
            if !(100..=DAY_MS).contains(&ms) {
                return bad(format!("{flag} {ms} must be between 100 and {DAY_MS}"));
            }
        }
        if let Some(Limit::Ids(max)) = self.max_messages {
            if max > crate::protocol::message::ID_MAX + 1 {
                return bad(format!(
                    "--max-messages {max} exceeds {} (ids index a Redis bitmap)",
                    crate::protocol::message::ID_MAX + 1
                ));
            }
        }
        Ok(self)
    }
}
