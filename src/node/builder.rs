//! Starting a copy from a program: [`Node::builder`] with the task's defaults, your [`Handler`]
//! and [`Source`], then [`Node::run`] until a cancellation token fires.
//!
//! The builder collects settings and checks them all at [`NodeBuilder::build`], so a bad value is
//! one clear [`Error::Config`] before anything touches Redis; a [`Node`] exists only validated.

use crate::config::{Config, Limit};
use crate::conn::RedisTarget;
use crate::error::Error;
use crate::node::generator::GeneratorConfig;
use crate::node::handler::HandlerConfig;
use crate::protocol::keys::Keys;
use crate::work::{Counter, Handler, Source, TaskHandler};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// One copy, validated and ready to [`run`](Node::run): it competes for the lease, generates
/// from its [`Source`] while it holds it, and otherwise fetches messages and runs its
/// [`Handler`] on them.
#[derive(Debug)]
pub struct Node<H = TaskHandler, S = Counter> {
    config: Config,
    handler: Arc<H>,
    source: Arc<S>,
}

/// Messages per fetch unless set: one fetch takes one generated batch of the default
/// `--gen-batch` whole (Redis's costs are per batch; reports/PERFORMANCE.md).
pub const DEFAULT_BATCH: u64 = 8000;

/// The fetch size when none is given: [`DEFAULT_BATCH`], or all a handler may hold when that is
/// less (an explicit batch above `max_in_flight` is refused instead).
pub fn default_batch(max_in_flight: usize) -> u64 {
    DEFAULT_BATCH.min(max_in_flight as u64)
}

impl Node {
    /// A builder for a copy that joins the Redis at `redis_url` (`redis://` or `rediss://`),
    /// with the task's handler and counter and the `app` defaults; change what you need.
    pub fn builder(redis_url: impl Into<String>) -> NodeBuilder {
        NodeBuilder {
            redis_url: redis_url.into(),
            namespace: "app".into(),
            instance_id: None,
            generator: GeneratorConfig {
                interval_ms: 500,
                batch_max: 8000,
                queue_max: 8000,
                lease_ms: 600,
            },
            handler_config: HandlerConfig {
                instance_id: String::new(),
                batch: DEFAULT_BATCH,
                max_in_flight: 150_000,
                commit_max: 8000,
                commit_window_ms: 50,
                heartbeat_ms: 750,
                redis_down_max_ms: 30_000,
                handler_timeout_ms: 30_000,
                run_log: None,
            },
            max_messages: None,
            connect_timeout_ms: 5000,
            drain_timeout_ms: 35_000,
            shards: 1,
            wait_replicas: 0,
            handler: TaskHandler::default(),
            source: Counter,
            batch_set: false,
        }
    }
}

impl<H: Handler, S: Source> Node<H, S> {
    /// A copy from a complete [`Config`] (what `app` builds from its flags), checked here.
    pub fn from_config(config: Config, handler: H, source: S) -> Result<Node<H, S>, Error> {
        Ok(Node {
            config: config.validate()?,
            handler: Arc::new(handler),
            source: Arc::new(source),
        })
    }

    /// Its settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs until `stop` fires, then drains (no new fetches; what it holds is handled and
    /// committed within the drain timeout) and returns `Ok`; or until a fatal error. A copy that
    /// is killed instead loses nothing: its lease and heartbeat expire and the others take over.
    pub async fn run(self, stop: CancellationToken) -> Result<(), Error> {
        crate::node::run(self.config, self.handler, self.source, stop).await
    }
}

/// Settings for a [`Node`]; see [`Node::builder`]. Nothing is checked until [`build`](Self::build).
#[derive(Debug, Clone)]
pub struct NodeBuilder<H = TaskHandler, S = Counter> {
    redis_url: String,
    namespace: String,
    instance_id: Option<String>,
    generator: GeneratorConfig,
    handler_config: HandlerConfig,
    max_messages: Option<Limit>,
    connect_timeout_ms: u64,
    drain_timeout_ms: u64,
    shards: u32,
    wait_replicas: u32,
    handler: H,
    source: S,
    /// Whether [`NodeBuilder::batch`] was called (otherwise the batch fits `max_in_flight`).
    batch_set: bool,
}

impl<H: Handler, S: Source> NodeBuilder<H, S> {
    /// The handler every message is given to (default: the task's `eventHandler`).
    pub fn handler<H2: Handler>(self, handler: H2) -> NodeBuilder<H2, S> {
        NodeBuilder {
            handler,
            redis_url: self.redis_url,
            namespace: self.namespace,
            instance_id: self.instance_id,
            generator: self.generator,
            handler_config: self.handler_config,
            batch_set: self.batch_set,
            max_messages: self.max_messages,
            connect_timeout_ms: self.connect_timeout_ms,
            drain_timeout_ms: self.drain_timeout_ms,
            shards: self.shards,
            wait_replicas: self.wait_replicas,
            source: self.source,
        }
    }

    /// What the generator puts into messages (default: nothing, the id is the message).
    pub fn source<S2: Source>(self, source: S2) -> NodeBuilder<H, S2> {
        NodeBuilder {
            source,
            redis_url: self.redis_url,
            namespace: self.namespace,
            instance_id: self.instance_id,
            generator: self.generator,
            handler_config: self.handler_config,
            batch_set: self.batch_set,
            max_messages: self.max_messages,
            connect_timeout_ms: self.connect_timeout_ms,
            drain_timeout_ms: self.drain_timeout_ms,
            shards: self.shards,
            wait_replicas: self.wait_replicas,
            handler: self.handler,
        }
    }

    /// The key prefix every copy of one group shares (default `app`, as `app --namespace`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// This copy's unique name (default: host, pid and a random suffix).
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Pause between generated messages (default 500, the task's); 0 generates as fast as the
    /// handlers take them, in batches.
    pub fn interval_ms(mut self, ms: u64) -> Self {
        self.generator.interval_ms = ms;
        self
    }

    /// Generate ids `0..count` at most (stored in Redis, so every later generator respects it).
    pub fn max_messages(mut self, count: u64) -> Self {
        self.max_messages = Some(Limit::Ids(count));
        self
    }

    /// Backpressure: generate only while the queue holds fewer messages (default 8000).
    pub fn queue_max(mut self, messages: u64) -> Self {
        self.generator.queue_max = messages;
        self
    }

    /// Messages per fetch (default [`DEFAULT_BATCH`], or `max_in_flight` when that is smaller).
    pub fn batch(mut self, messages: u64) -> Self {
        self.handler_config.batch = messages;
        self.batch_set = true;
        self
    }

    /// Messages fetched and not yet committed, at most: how many handler calls run at once
    /// (default 150000).
    pub fn max_in_flight(mut self, messages: usize) -> Self {
        self.handler_config.max_in_flight = messages;
        self
    }

    /// Under load, how long outcomes may gather before a commit (default 50; 0 = commit at
    /// once). Light traffic is always committed at once.
    pub fn commit_window_ms(mut self, ms: u64) -> Self {
        self.handler_config.commit_window_ms = ms;
        self
    }

    /// A handler call still running after this long fails its message with "handler timeout"
    /// (default 30000).
    pub fn handler_timeout_ms(mut self, ms: u64) -> Self {
        self.handler_config.handler_timeout_ms = ms;
        self
    }

    /// The generator lease's TTL: a dead generator is replaced within it (default 600).
    pub fn lease_ms(mut self, ms: u64) -> Self {
        self.generator.lease_ms = ms;
        self
    }

    /// The heartbeat's TTL: a dead handler's messages are given back after it (default 750).
    pub fn heartbeat_ms(mut self, ms: u64) -> Self {
        self.handler_config.heartbeat_ms = ms;
        self
    }

    /// After `stop`, how long what this copy holds may take to finish (default 35000).
    pub fn drain_timeout_ms(mut self, ms: u64) -> Self {
        self.drain_timeout_ms = ms;
        self
    }

    /// Spreads the namespace's hot keys over this many shards (default 1; docs/PROTOCOL.md,
    /// "Sharding"): on a Redis Cluster they land on different masters. Every copy of a group
    /// must use the same count; messages without data only.
    pub fn shards(mut self, shards: u32) -> Self {
        self.shards = shards;
        self
    }

    /// After each script call, wait until this many replicas hold its writes (default 0: no
    /// wait); a call they do not confirm in time counts as one whose reply was lost. See
    /// docs/PROTOCOL.md, "Durability".
    pub fn wait_replicas(mut self, replicas: u32) -> Self {
        self.wait_replicas = replicas;
        self
    }

    /// Checks every setting and makes the [`Node`].
    pub fn build(mut self) -> Result<Node<H, S>, Error> {
        if !self.batch_set {
            self.handler_config.batch = default_batch(self.handler_config.max_in_flight);
        }
        let instance_id = self.instance_id.unwrap_or_else(default_instance_id);
        let config = Config {
            redis: RedisTarget::new(&self.redis_url)?,
            keys: Keys::new(&self.namespace)?,
            instance_id: instance_id.clone(),
            generator: self.generator,
            handler: HandlerConfig {
                instance_id,
                ..self.handler_config
            },
            max_messages: self.max_messages,
            connect_timeout_ms: self.connect_timeout_ms,
            redis_down_max_ms: self.handler_config.redis_down_max_ms,
            drain_timeout_ms: self.drain_timeout_ms,
            accept_data_loss: false,
            allow_eviction: false,
            shards: self.shards,
            wait_replicas: self.wait_replicas,
        };
        Node::from_config(config, self.handler, self.source)
    }
}

/// A name unique to this process: the host name (up to 24 characters), the pid and 32 random
/// bits, e.g. `web-3-81234-9f3a0c1e`.
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(24)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}
