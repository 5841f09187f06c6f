//! One copy of the program: competes for the lease, generates while it holds it, handles
//! otherwise, keeps its heartbeat, reclaims dead handlers' work, and stops cleanly when told.
//!
//! Everything it logs runs inside a `node{instance=…}` span (lines written while generating add a
//! `generator{epoch=…}` span), so every log line says which copy, and which epoch, wrote it.

pub mod builder;
pub mod generator;
pub mod handler;
pub mod incarnation;
pub mod lease;
pub mod liveness;
pub mod redis_config;
pub mod sharded;
pub mod wake;

use crate::config::{Config, Limit};
use crate::conn::{self, Conn};
use crate::error::Error;
use crate::inspect;
use crate::protocol::keys::Keys;
use crate::protocol::scripts;
use crate::work::{Handler, Source};
use generator::{GeneratorConfig, LeadEnd};
use handler::{HandlerShared, Role};
use incarnation::Incarnation;
use liveness::Presence;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use builder::{default_instance_id, Node, NodeBuilder};

/// Runs one copy until `stop` fires (then drains and returns `Ok`) or a fatal error.
///
/// On a fatal error nothing is cleaned up on purpose: the lease and heartbeat expire in Redis and
/// the in-flight messages are reclaimed, exactly as after a SIGKILL.
pub async fn run<H: Handler, S: Source>(
    config: Config,
    handler: Arc<H>,
    source: Arc<S>,
    stop: CancellationToken,
) -> Result<(), Error> {
    let config = config.validate()?;
    let span = tracing::info_span!("node", instance = %config.instance_id);
    run_in_span(config, handler, source, stop)
        .instrument(span)
        .await
}

async fn run_in_span<H: Handler, S: Source>(
    config: Config,
    handler: Arc<H>,
    source: Arc<S>,
    stop: CancellationToken,
) -> Result<(), Error> {
    let keys = config.keys.clone();
    let mut con = conn::connect_to(&config.redis, config.connect_timeout_ms)
        .await?
        .waiting_for(config.wait_replicas, crate::config::WAIT_TIMEOUT_MS)
        .pinned(&keys);
    // The start-up steps, the Redis configuration check among them, are idempotent: retry them
    // while Redis is briefly away (a dropped connection, a lost reply, a restart still loading
    // its AOF), within the connect bound. (A copy started during a sim fault once exited with
    // "broken pipe" from the configuration check alone.)
    let deadline = tokio::time::Instant::now() + Duration::from_millis(config.connect_timeout_ms);
    let ((started_us, incarnation), shards) = loop {
        let attempt = async {
            let warnings =
                crate::node::redis_config::check(&mut con, config.allow_eviction).await?;
            let joined = start_up(&mut con, &keys, &config).await?;
            let shards = join_shards(&mut con, &keys, &config).await?;
            Ok::<_, Error>((joined, shards, warnings))
        };
        match attempt.await {
            Ok((joined, shards, warnings)) => {
                for warning in warnings {
                    tracing::warn!("{}", warning.0);
                }
                break (joined, shards);
            }
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "start-up failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    };
    match liveness::prune(&mut con, &keys, liveness::PRUNE_AFTER_MS).await {
        Ok(0) => {}
        Ok(pruned) => tracing::info!(
            pruned,
            "pruned long-dead entries from the instance registry"
        ),
        Err(e) => tracing::warn!(error = %e, "could not prune the instance registry"),
    }
    tracing::info!("joined");

    let (role_tx, role_rx) = watch::channel(Role::Handler);
    let shared = HandlerShared::default();
    // Liveness and publishing outlive the handler's drain, so they have their own token.
    let background = CancellationToken::new();
    // One lane per shard, each a handler of today's kind against that shard's keys; unsharded,
    // one lane on the namespace itself. The lanes share the in-flight gauge and the histograms.
    let sharded = shards.len() > 1;
    let lanes: Vec<Lane> = if sharded {
        let each = (config.handler.max_in_flight / shards.len()).max(1);
        shards
            .iter()
            .map(|s| {
                Lane::new(
                    &config,
                    s.con.clone(),
                    s.keys.clone(),
                    s.incarnation.clone(),
                    &shared,
                    each,
                )
            })
            .collect()
    } else {
        vec![Lane::new(
            &config,
            con.clone(),
            keys.clone(),
            incarnation.clone(),
            &shared,
            config.handler.max_in_flight,
        )]
    };

    let mut leader = spawn(leader_loop(
        con.clone(),
        keys.clone(),
        incarnation.clone(),
        config.instance_id.clone(),
        config.generator.clone(),
        source,
        sharded.then(|| sharded::ShardedGen::new(shards.clone())),
        role_tx,
        stop.clone(),
    ));
    let mut handling = spawn({
        let runs: Vec<_> = lanes
            .iter()
            .map(|lane| {
                handler::run(
                    handler.clone(),
                    lane.con.clone(),
                    lane.keys.clone(),
                    lane.incarnation.clone(),
                    lane.config.clone(),
                    role_rx.clone(),
                    lane.owner_tx.clone(),
                    lane.shared.clone(),
                    stop.clone(),
                )
            })
            .collect();
        async move { futures_util::future::try_join_all(runs).await.map(|_| ()) }
    });
    let presence = Presence {
        instance: config.instance_id.clone(),
        role: role_rx.clone(),
        in_flight: shared.in_flight.clone(),
        started_us,
        sharded,
    };
    let beat = |lane: &Lane| liveness::Beat {
        owner: lane.owner_tx.subscribe(),
        lapsed: lane.shared.heartbeat_lapsed.clone(),
        incarnation: lane.incarnation.clone(),
    };
    let (heartbeat_ms, down_ms) = (config.handler.heartbeat_ms, config.redis_down_max_ms);
    let mut beats = Vec::new();
    if sharded {
        // The control slot keeps the registry entry and the history; each shard its heartbeat.
        beats.push(liveness::run(
            con.clone(),
            keys.clone(),
            None,
            Some(presence),
            heartbeat_ms,
            down_ms,
            background.clone(),
        ));
        for lane in &lanes {
            beats.push(liveness::run(
                lane.con.clone(),
                lane.keys.clone(),
                Some(beat(lane)),
                None,
                heartbeat_ms,
                down_ms,
                background.clone(),
            ));
        }
    } else {
        beats.push(liveness::run(
            con.clone(),
            keys.clone(),
            Some(beat(&lanes[0])),
            Some(presence),
            heartbeat_ms,
            down_ms,
            background.clone(),
        ));
    }
    let mut alive =
        spawn(async move { futures_util::future::try_join_all(beats).await.map(|_| ()) });
    let wakes: Vec<_> = lanes
        .iter()
        .map(|lane| {
            tokio::spawn(crate::node::wake::listen(
                config.redis.clone(),
                lane.keys.clone(),
                lane.shared.wake.clone(),
                background.clone(),
            ))
        })
        .collect();
    let mut publisher = spawn(publish_loop(
        con.clone(),
        keys.clone(),
        config.instance_id.clone(),
        shared.clone(),
        background.clone(),
    ));

    // Until `stop`, any task ending is fatal (none of them returns on its own). Biased: once
    // `stop` fires, tasks that end because of it must not be mistaken for failures.
    let fatal = tokio::select! {
        biased;
        _ = stop.cancelled() => None,
        r = &mut leader => Some(r),
        r = &mut handling => Some(r),
        r = &mut alive => Some(r),
        r = &mut publisher => Some(r),
    };
    if let Some(r) = fatal {
        stop.cancel();
        background.cancel();
        let e = joined(r)
            .err()
            .unwrap_or_else(|| Error::Task("a task ended before stop".into()));
        if e.halts_the_group() {
            halt_group(&mut con, &keys, &config.instance_id, &e.to_string()).await;
        }
        return Err(e);
    }

    tracing::info!("stopping: releasing the lease, finishing in-flight messages");
    joined(leader.await)?;
    let drain = Duration::from_millis(config.drain_timeout_ms);
    match tokio::time::timeout(drain, &mut handling).await {
        Ok(r) => joined(r)?,
        Err(_) => {
            handling.abort();
            tracing::warn!(
                in_flight = shared.in_flight.load(Ordering::Relaxed),
                "drain timed out; the rest will be reclaimed by the other copies"
            );
        }
    }
    background.cancel();
    let _ = alive.await;
    let _ = publisher.await;
    for wake in wakes {
        let _ = wake.await;
    }
    let latencies = shared
        .latencies
        .lock()
        .expect("latency lock poisoned")
        .clone();
    latencies
        .publish(&mut con, &keys, &config.instance_id)
        .await?;
    if shared.in_flight.load(Ordering::Relaxed) == 0 {
        for lane in &lanes {
            let owner = lane.owner_tx.borrow().clone();
            liveness::forget(&mut lane.con.clone(), &lane.keys, &owner).await?;
        }
    }
    liveness::leave(&mut con, &keys, &config.instance_id).await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// One shard as this copy's handler works it: its connection, keys and incarnation, the handler
/// settings (its share of `--max-in-flight`), the handler id it heartbeats, its own suspects,
/// wake-up and lapse flag, and the process's shared in-flight gauge and histograms.
struct Lane {
    con: Conn,
    keys: Keys,
    incarnation: Incarnation,
    config: handler::HandlerConfig,
    owner_tx: watch::Sender<Arc<str>>,
    shared: HandlerShared,
}

impl Lane {
    fn new(
        config: &Config,
        con: Conn,
        keys: Keys,
        incarnation: Incarnation,
        process: &HandlerShared,
        max_in_flight: usize,
    ) -> Lane {
        let mut handler = config.handler.clone();
        handler.max_in_flight = max_in_flight;
        handler.batch = handler.batch.min(max_in_flight as u64);
        let (owner_tx, _) =
            watch::channel::<Arc<str>>(Arc::from(format!("{}.0", config.instance_id)));
        Lane {
            con,
            keys,
            incarnation,
            config: handler,
            owner_tx,
            shared: HandlerShared {
                in_flight: process.in_flight.clone(),
                latencies: process.latencies.clone(),
                ..HandlerShared::default()
            },
        }
    }
}

/// Settles the namespace's shard count (`--shards`, stored once) and, when it is above 1, joins
/// every shard: its connection (pinned to its slot), its scripts and its incarnation. Empty when
/// unsharded.
async fn join_shards(
    con: &mut Conn,
    keys: &Keys,
    config: &Config,
) -> Result<Vec<sharded::Shard>, Error> {
    crate::protocol::shards::settle(con, keys, config.shards).await?;
    if config.shards <= 1 {
        return Ok(Vec::new());
    }
    let mut shards = Vec::new();
    for (index, shard_keys) in keys.shards(config.shards).into_iter().enumerate() {
        let mut shard_con = crate::protocol::shards::conn_for(con, &shard_keys);
        scripts::load_all(&mut shard_con).await?;
        let incarnation =
            Incarnation::join(&mut shard_con, &shard_keys, config.accept_data_loss).await?;
        shards.push(sharded::Shard {
            index: index as u32,
            con: shard_con,
            keys: shard_keys,
            incarnation,
        });
    }
    Ok(shards)
}

/// Loads the scripts, joins the namespace's incarnation, stores `--max-messages`, and returns
/// the Redis time of the join.
async fn start_up(
    con: &mut Conn,
    keys: &Keys,
    config: &Config,
) -> Result<(u64, Incarnation), Error> {
    scripts::load_all(con).await?;
    let incarnation = Incarnation::join(con, keys, config.accept_data_loss).await?;
    match config.max_messages {
        Some(Limit::Ids(max)) => {
            redis::cmd("SET")
                .arg(keys.max())
                .arg(max)
                .query_async::<()>(con)
                .await?
        }
        Some(Limit::Lift) => {
            let lifted: u64 = redis::cmd("DEL").arg(keys.max()).query_async(con).await?;
            if lifted > 0 {
                tracing::info!("--max-messages none: lifted the stored generation limit");
            }
        }
        None => {}
    }
    // A limit stored by an earlier run silently stops generation: say so once, with the way out.
    let (next_id, max): (Option<String>, Option<String>) = redis::cmd("MGET")
        .arg(keys.next_id())
        .arg(keys.max())
        .query_async(con)
        .await?;
    let number = |v: Option<String>| v.and_then(|s| s.parse::<u64>().ok());
    if let Some(why) = crate::admin::status::stopped_by(number(next_id).unwrap_or(0), number(max)) {
        tracing::warn!("nothing will be generated: {why}");
    }
    Ok((inspect::redis_time_us(con).await?, incarnation))
}

/// This copy saw Redis lose data: it says so once, loudly, and marks the namespace halted so
/// every other copy stops too (best effort: they detect it on their own as well).
async fn halt_group(con: &mut Conn, keys: &Keys, instance: &str, why: &str) {
    tracing::error!(
        reason = %why,
        "REDIS LOST OR DAMAGED DATA: stopping; nothing more is generated or recorded until an operator decides (README, \"When Redis forgets\")"
    );
    let marker = format!("{instance} saw: {why}");
    if why.contains("the namespace was halted") {
        return; // another copy's halt: already marked
    }
    if let Err(e) = incarnation::halt(con, keys, &marker).await {
        tracing::warn!(error = %e, "could not mark the namespace halted; the other copies detect the loss on their own");
    }
}

fn spawn<F>(f: F) -> JoinHandle<Result<(), Error>>
where
    F: std::future::Future<Output = Result<(), Error>> + Send + 'static,
{
    // Spawned tasks do not inherit the caller's span by themselves.
    tokio::spawn(f.in_current_span())
}

fn joined(r: Result<Result<(), Error>, tokio::task::JoinError>) -> Result<(), Error> {
    r.map_err(|e| Error::Task(e.to_string()))?
}

/// Competes for the lease every `lease_ms / 10` (5..100 ms); generates while holding it.
#[allow(clippy::too_many_arguments)]
async fn leader_loop<S: Source>(
    mut con: Conn,
    keys: Keys,
    incarnation: Incarnation,
    instance: String,
    config: GeneratorConfig,
    source: Arc<S>,
    mut sharded: Option<sharded::ShardedGen>,
    role: watch::Sender<Role>,
    stop: CancellationToken,
) -> Result<(), Error> {
    let poll = Duration::from_millis((config.lease_ms / 10).clamp(5, 100));
    let mut failures = 0u32;
    loop {
        match lease::try_acquire(&mut con, &keys, &instance, config.lease_ms, &incarnation).await {
            Ok(Some(lease)) => {
                failures = 0;
                tracing::info!(epoch = lease.epoch, "became the generator");
                role.send_replace(Role::Generator { epoch: lease.epoch });
                crate::admin::metrics::role(Some(lease.epoch));
                let end = generator::lead(
                    &mut con,
                    &keys,
                    &lease,
                    &config,
                    &incarnation,
                    &*source,
                    sharded.as_mut(),
                    &stop,
                )
                .instrument(tracing::info_span!("generator", epoch = lease.epoch))
                .await;
                role.send_replace(Role::Handler);
                crate::admin::metrics::role(None);
                match end? {
                    LeadEnd::Stopped => return Ok(()),
                    LeadEnd::Lost => {
                        tracing::info!(epoch = lease.epoch, "no longer the generator; handling")
                    }
                }
            }
            Ok(None) => failures = 0,
            Err(e) if e.stops_the_copy() => return Err(e),
            Err(e) => {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, "lease check failed; retrying");
                }
            }
        }
        let backoff = poll * failures.clamp(1, 10);
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}

/// Publishes this process's latency histograms once a second.
async fn publish_loop(
    mut con: Conn,
    keys: Keys,
    instance: String,
    shared: HandlerShared,
    stop: CancellationToken,
) -> Result<(), Error> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let snapshot = shared
            .latencies
            .lock()
            .expect("latency lock poisoned")
            .clone();
        if let Err(e) = snapshot.publish(&mut con, &keys, &instance).await {
            tracing::debug!(error = %e, "publishing latencies failed; next second");
        }
    }
}
