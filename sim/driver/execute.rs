//! Executing the fault plan: every tick, the due getErrors drains start, and of the other due
//! faults the first that can act does. Each fault's code says what it needs (a pure generator, a
//! busy handler, the sim's own Redis, the proxy) and returns `None` while it cannot act yet.

use super::{read_next_id, HaltWatch, MasterKill, Run, APP_EXIT_HALTED};
use crate::faults::FaultKind;
use crate::Flags;
use anyhow::{bail, Context};
use leaderq::protocol::message::parse_batch_record;
use leaderq::stats::Counters;
use leaderq::testkit::procs::{AppProcess, RedisServer};
use leaderq::{conn, inspect, Keys};
use rand::Rng;
use std::path::Path;
use std::time::{Duration, Instant};

/// Outcomes between a quiet rollback's snapshot and the rollback: handlers' commits the restore
/// takes back, while no counter moves. The generator stays stopped for half its lease meanwhile,
/// so no successor takes over.
const QUIET_ROLLBACK_AFTER: u64 = 20;
/// How long a killed master's replica may take to be promoted (with the replica cluster's 1 s
/// node timeout it takes ~2-3 s); past it the cluster is broken and the run ends as a crash.
const PROMOTION_WAIT_MAX: Duration = Duration::from_secs(30);
/// How often a due master kill looks whether it can act (its master has a replica in sync, the
/// cluster is ok): each look runs a few `redis-cli`.
const MASTER_CHECK_EVERY: Duration = Duration::from_millis(200);

impl Run<'_> {
    /// Every due getErrors drain starts now (they disturb nothing); of the other faults, at most
    /// one per tick. A due fault that cannot act yet (no pure generator, no busy handler) does
    /// not hold up the others.
    pub(super) async fn execute_due_faults(
        &mut self,
        now: Instant,
        done: u64,
        counters: &Counters,
    ) -> anyhow::Result<()> {
        for f in self
            .faults
            .iter_mut()
            .filter(|f| f.kind == FaultKind::DrainErrors && !f.done && done >= f.at)
        {
            let started_what = self.drains.start()?;
            (f.t_s, f.done) = (self.started.elapsed().as_secs_f64(), true);
            self.progress
                .note(&format!("getErrors at {done} outcomes: {started_what}"));
        }
        let due: Vec<usize> = (0..self.faults.len())
            .filter(|&i| {
                let f = &self.faults[i];
                !f.done
                    && if f.kind.on_generated() {
                        counters.generated >= f.at
                    } else {
                        done >= f.at
                    }
            })
            .collect();
        for i in due {
            if self.execute_fault(i, now, done, counters).await? {
                break;
            }
        }
        Ok(())
    }

    /// Executes fault `i` if it can act now, marks it done and notes what it did. Returns
    /// whether it acted.
    async fn execute_fault(
        &mut self,
        i: usize,
        now: Instant,
        done: u64,
        counters: &Counters,
    ) -> anyhow::Result<bool> {
        let kind = self.faults[i].kind;
        let note = match kind {
            FaultKind::KillLeader | FaultKind::PauseLeader | FaultKind::PartitionLeader => {
                self.hit_generator(i, now, counters.generated).await?
            }
            FaultKind::InjectDuplicate => self.inject_duplicate(done).await?,
            FaultKind::PauseWorker => self.pause_worker(now, done).await?,
            FaultKind::KillWorker => self.kill_worker(done).await?,
            FaultKind::DropConnections => Some(self.drop_connections(done).await?),
            FaultKind::DrainErrors => unreachable!("drains start above"),
            FaultKind::SnapshotRedis => Some(self.snapshot_redis(i, now, done).await?),
            FaultKind::RollbackRedis | FaultKind::WipeRedis => {
                Some(self.lose_redis_data(kind, done).await?)
            }
            FaultKind::LoseReplies => Some(self.lose_replies(done)?),
            FaultKind::RestartRedis => Some(self.restart_redis(done)?),
            FaultKind::KillMaster => self.kill_master(i, now, done).await?,
        };
        let Some(note) = note else {
            return Ok(false);
        };
        let f = &mut self.faults[i];
        (f.t_s, f.done) = (self.started.elapsed().as_secs_f64(), true);
        self.progress.note(&note);
        Ok(true)
    }

    /// Kills, pauses or partitions the generator (fault `i`), recording its epoch and the Redis
    /// time for the failover measurement. `None` when there is no generator to hit this tick.
    async fn hit_generator(
        &mut self,
        i: usize,
        now: Instant,
        generated: u64,
    ) -> anyhow::Result<Option<String>> {
        let kind = self.faults[i].kind;
        let (con, keys) = (&mut self.con, &self.keys);
        let Some((epoch, idx)) = current_generator(con, keys, &self.world.apps).await? else {
            return Ok(None); // a failover is in progress: no generator to hit this tick
        };
        let pid = self.world.apps[idx].pid();
        if self.world.paused().iter().any(|(p, _)| *p == pid) {
            return Ok(None);
        }
        // A new generator gives its handler work back at once (reclaim.lua's hand-back); hit
        // in the moment before, what it still holds is reclaimed and run again elsewhere.
        let pattern = format!("{}.*", self.world.apps[idx].instance_id);
        let busy = leaderq::testkit::snapshot::in_flight_matching(con, keys, &pattern).await?;
        if busy > 0 {
            self.disruptions += 1;
        }
        let redis_us = inspect::redis_time_us(con).await?;
        let name = self.world.apps[idx].instance_id.clone();
        match kind {
            FaultKind::KillLeader => self.world.replace(idx)?,
            FaultKind::PauseLeader => self.world.pause(idx, now + pause_for(self.flags))?,
            _ => {
                let proxy = self
                    .world
                    .proxy
                    .as_ref()
                    .context("the proxy runs with --partition-leader")?;
                let Some(port) = lease_holder_port(con, keys).await? else {
                    return Ok(None);
                };
                if !proxy.hold(port, pause_for(self.flags)) {
                    return Ok(None);
                }
                self.world.disturb(idx);
            }
        }
        let f = &mut self.faults[i];
        (f.epoch, f.redis_us, f.hit_at) = (epoch, redis_us, Some(now));
        Ok(Some(format!(
            "{}: {name} (epoch {epoch}, {busy} in flight) at {generated} generated",
            kind.label(),
        )))
    }

    /// Plants a copy of an in-flight message in another copy's set. `None` when no two copies
    /// qualify right now.
    async fn inject_duplicate(&mut self, done: u64) -> anyhow::Result<Option<String>> {
        let apps = &self.world.apps;
        let Some((planted, id)) =
            plant_duplicate(&mut self.con, &self.keys, apps, &mut self.rng).await?
        else {
            return Ok(None);
        };
        self.injected += 1;
        self.planted.push(id);
        self.disruptions += 1;
        Ok(Some(format!(
            "duplicate delivery: {planted} at {done} outcomes"
        )))
    }

    /// SIGSTOPs a busy handler past its heartbeat. `None` when no handler holds messages.
    async fn pause_worker(&mut self, now: Instant, done: u64) -> anyhow::Result<Option<String>> {
        let Some((j, n)) = self.busy_handler().await? else {
            return Ok(None);
        };
        let name = self.world.apps[j].instance_id.clone();
        let pause = Duration::from_millis(2 * self.flags.heartbeat_ms + 500);
        self.world.pause(j, now + pause)?;
        self.disruptions += 1;
        Ok(Some(format!(
            "worker pause: {name} holding {n} messages stopped for {pause:?} at {done} outcomes (its messages are reclaimed; its late commits must be refused)"
        )))
    }

    /// SIGKILLs a busy handler, starts a replacement and watches for the reclaim. `None` when no
    /// handler holds messages.
    async fn kill_worker(&mut self, done: u64) -> anyhow::Result<Option<String>> {
        let Some((j, n)) = self.busy_handler().await? else {
            return Ok(None);
        };
        let name = self.world.apps[j].instance_id.clone();
        self.world.replace(j)?;
        self.watched.push((name.clone(), Instant::now()));
        self.disruptions += 1;
        Ok(Some(format!(
            "worker kill: {name} holding {n} messages at {done} outcomes"
        )))
    }

    /// Kills every normal client connection but the sim's own.
    async fn drop_connections(&mut self, done: u64) -> anyhow::Result<String> {
        let dropped: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes")
            .query_async(&mut self.con)
            .await?;
        self.disruptions += 1;
        Ok(format!(
            "connection drop: {dropped} connections killed at {done} outcomes"
        ))
    }

    /// Keeps an RDB snapshot for a later rollback.
    async fn snapshot_redis(
        &mut self,
        i: usize,
        now: Instant,
        done: u64,
    ) -> anyhow::Result<String> {
        let mut quiet = String::new();
        if self.faults[i].quiet {
            let found = current_generator(&mut self.con, &self.keys, &self.world.apps).await?;
            if let Some((_, idx)) = found {
                let half_lease = Duration::from_millis(self.flags.lease_ms / 2);
                self.world.pause(idx, now + half_lease)?;
                // Let what it already sent reach Redis before the snapshot.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let name = &self.world.apps[idx].instance_id;
                quiet = format!(" (quiet: generator {name} stopped first)");
            }
            if let Some(rollback) = self
                .faults
                .iter_mut()
                .find(|f| f.kind == FaultKind::RollbackRedis && !f.done)
            {
                rollback.at = rollback.at.min(done + QUIET_ROLLBACK_AFTER);
            }
        }
        let server = self
            .world
            .server
            .as_ref()
            .context("--rollback-redis needs the sim's own Redis")?;
        redis::cmd("SAVE").query_async::<()>(&mut self.con).await?;
        std::fs::copy(
            server.dir().join("dump.rdb"),
            server.dir().join("older.rdb"),
        )
        .context("keeping the snapshot")?;
        Ok(format!("redis snapshot taken at {done} outcomes{quiet}"))
    }

    /// Wipes Redis, or restarts it from the older snapshot; from now on the loop only waits for
    /// every copy to halt.
    async fn lose_redis_data(&mut self, kind: FaultKind, done: u64) -> anyhow::Result<String> {
        let server = self
            .world
            .server
            .as_mut()
            .context("--wipe-redis and --rollback-redis need the sim's own Redis")?;
        let before = read_next_id(&mut self.con, &self.keys).await?;
        // The outcomes Redis goes back to: none after a wipe, the snapshot's after a rollback.
        let mut kept = Some(Vec::new());
        let after = if kind == FaultKind::WipeRedis {
            redis::cmd("FLUSHALL")
                .query_async::<()>(&mut self.con)
                .await?;
            0
        } else {
            let older = server.dir().join("older.rdb");
            let (restored, outcomes) = snapshot_state(&older, &self.keys).await?;
            kept = Some(outcomes);
            tokio::task::block_in_place(|| {
                server.crash_and_restart_with(|dir| {
                    std::fs::copy(&older, dir.join("dump.rdb")).map(|_| ())
                })
            })
            .context("restarting redis-server from the older snapshot")?;
            restored
        };
        self.disruptions += 1;
        let what = format!(
            "{} at {done} outcomes (next_id {before} -> {after})",
            kind.label()
        );
        let note = format!("{what}: every copy must now halt with exit code {APP_EXIT_HALTED}");
        self.halt = Some(HaltWatch {
            what,
            since: Instant::now(),
            next_id_after_loss: after,
            frozen_since: "Redis lost data",
            next_id_before_loss: before,
            kept,
        });
        Ok(note)
    }

    /// Makes every copy's connection lose its next reply (through the proxy, or every cluster
    /// node's proxy).
    fn lose_replies(&mut self, done: u64) -> anyhow::Result<String> {
        if self.world.proxies().next().is_none() {
            bail!("the proxy runs with --lose-replies");
        }
        let before: u64 = self.world.proxies().map(|p| p.cuts()).sum();
        self.world.proxies().for_each(|p| p.lose_next_replies());
        self.disruptions += 1;
        Ok(format!(
            "lost replies: every copy's connection loses its next reply, at {done} outcomes ({before} cut so far)"
        ))
    }

    /// SIGKILLs Redis and restarts it from its AOF.
    fn restart_redis(&mut self, done: u64) -> anyhow::Result<String> {
        let server = self
            .world
            .server
            .as_mut()
            .context("--restart-redis needs the sim's own Redis")?;
        let began = Instant::now();
        let repaired = tokio::task::block_in_place(|| server.crash_and_restart())
            .context("restarting redis-server")?;
        self.disruptions += 1;
        self.aof_repairs += u64::from(repaired);
        Ok(format!(
            "redis restart: SIGKILLed and back from its AOF in {:?} at {done} outcomes{}",
            began.elapsed(),
            if repaired {
                " (torn last transaction cut by redis-check-aof --fix)"
            } else {
                ""
            }
        ))
    }

    /// SIGKILLs the master of the namespace slot fault `i` targets, waits (bounded) until its
    /// replica is promoted, starts the killed node again (it rejoins as the new master's
    /// replica) and moves that slot range's meter to the promoted node. `None` while that master
    /// has no replica in sync or the cluster is not ok (a restarted node still copying).
    async fn kill_master(
        &mut self,
        i: usize,
        now: Instant,
        done: u64,
    ) -> anyhow::Result<Option<String>> {
        let looked = self.master_checked_at.replace(now);
        if looked.is_some_and(|t| now.duration_since(t) < MASTER_CHECK_EVERY) {
            self.master_checked_at = looked;
            return Ok(None);
        }
        let slots = namespace_slots(&self.keys, self.flags.shards);
        let (tag, slot) = slots[self.faults[i].target as usize % slots.len()].clone();
        let cluster = self
            .world
            .cluster
            .as_mut()
            .context("--kill-master needs --redis-cluster")?;
        let victim = match tokio::task::block_in_place(|| cluster.master_of(slot)) {
            Ok(v) if tokio::task::block_in_place(|| cluster.can_fail_over(v)) => v,
            _ => return Ok(None),
        };
        let range = cluster.slot_range(slot);
        let used = self.meters[range].used().await?;
        let (con, keys) = (&self.con, &self.keys);
        let next_id_before = super::read_again(|| {
            let mut con = con.clone();
            async move { read_next_id(&mut con, keys).await }
        })
        .await?;
        let port = cluster.node(victim).port();
        let (offset_before, killed_at, replica_offset, promoted) =
            tokio::task::block_in_place(|| {
                let offset_before = cluster.repl_offset(victim);
                let killed_at = Instant::now();
                cluster.kill_node(victim);
                // The replica's data is frozen until its promotion: it starts from what it has now.
                let replica_offset = cluster.replica_offset(victim);
                let promoted = cluster.wait_promoted(slot, victim, PROMOTION_WAIT_MAX);
                promoted.map(|p| (offset_before, killed_at, replica_offset, p))
            })
            .with_context(|| format!("--kill-master: after killing node {port}"))?;
        let promotion_ms = killed_at.elapsed().as_secs_f64() * 1000.0;
        tokio::task::block_in_place(|| cluster.restart_node(victim))
            .with_context(|| format!("restarting the killed node {port}"))?;
        let new_master = cluster.node(promoted);
        let (new_port, url) = (new_master.port(), new_master.url());
        self.meters[range]
            .hand_over(used, conn::connect(&url, 5000).await?)
            .await?;
        self.disruptions += 1;
        let lag = match (offset_before, replica_offset) {
            (Some(m), Some(r)) if r >= m => format!(
                "replica at replication offset {r}, master at {m} just before the kill: it had all the master wrote before then"
            ),
            (Some(m), Some(r)) => format!(
                "replica at replication offset {r}, master at {m} just before the kill: {} bytes behind",
                m - r
            ),
            _ => "replication offsets unreadable".into(),
        };
        let what = format!(
            "master kill at {done} outcomes: node {port} (master of slot {slot}, {tag}) SIGKILLed, replica {new_port} promoted in {promotion_ms:.0} ms"
        );
        let note = format!("{what}; {lag}; the killed node restarts as a replica");
        self.master_kills.push(MasterKill {
            what,
            killed_at,
            promotion_ms,
            next_id_before,
        });
        Ok(Some(note))
    }

    /// A handler (not the generator, not paused) holding in-flight messages, picked at random:
    /// its index in `apps` and how many it holds. `None` when no handler holds any right now.
    async fn busy_handler(&mut self) -> anyhow::Result<Option<(usize, u64)>> {
        let (con, keys, apps) = (&mut self.con, &self.keys, &self.world.apps);
        let generator = current_generator(con, keys, apps).await?.map(|(_, i)| i);
        let mut busy = Vec::new();
        for (j, app) in apps.iter().enumerate() {
            let paused = self.world.paused().iter().any(|(pid, _)| *pid == app.pid());
            if Some(j) == generator || paused {
                continue;
            }
            let pattern = format!("{}.*", app.instance_id);
            let n = leaderq::testkit::snapshot::in_flight_matching(con, keys, &pattern).await?;
            if n > 0 {
                busy.push((j, n));
            }
        }
        if busy.is_empty() {
            return Ok(None);
        }
        Ok(Some(busy[self.rng.random_range(0..busy.len())]))
    }
}

/// The namespace's slots a master kill can hit, each with its hash tag: the control slot `{ns}`
/// first, then each shard's (with `--shards` above 1; unsharded, the control slot holds all).
fn namespace_slots(keys: &Keys, shards: u32) -> Vec<(String, u16)> {
    let slot = |k: &Keys| {
        let tag = k.prefix().trim_end_matches(':').to_string();
        let slot = conn::key_slot(k.prefix().as_bytes());
        (tag, slot)
    };
    let mut slots = vec![slot(keys)];
    if shards > 1 {
        slots.extend(keys.shards(shards).iter().map(slot));
    }
    slots
}

/// How long a paused generator stays stopped: past its lease, so a successor takes over.
fn pause_for(flags: &Flags) -> Duration {
    Duration::from_millis(2 * flags.lease_ms + 500)
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

/// `{ns}:next_id` in an RDB snapshot and the ids with an outcome there, read from a throwaway
/// server started on a copy of it.
async fn snapshot_state(rdb: &Path, keys: &Keys) -> anyhow::Result<(u64, Vec<u64>)> {
    let scratch = RedisServer::start_from_rdb(rdb).context("starting a server on the snapshot")?;
    let mut con = conn::connect(&scratch.url(), 5000).await?;
    let next_id = read_next_id(&mut con, keys).await?;
    let outcomes = leaderq::testkit::snapshot::outcome_ids(&mut con, keys).await?;
    Ok((next_id, outcomes))
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

/// Copies one in-flight message of a live handler (a member of its in-flight set, or an open
/// message of one of its batch records) into another live copy's in-flight set (as a buggy
/// reclaim could): that copy adopts and runs it at its next reconciliation, and the
/// duplicate defence must record one outcome. Returns what it did and the message's id, `None`
/// when no two copies qualify right now.
async fn plant_duplicate(
    con: &mut conn::Conn,
    keys: &Keys,
    apps: &[AppProcess],
    rng: &mut rand_chacha::ChaCha8Rng,
) -> anyhow::Result<Option<(String, u64)>> {
    let mut holders = Vec::new();
    for app in apps {
        let handler = format!("{}.0", app.instance_id);
        let set = keys.inflight(&handler);
        let member: Option<Vec<u8>> = redis::cmd("SRANDMEMBER").arg(&set).query_async(con).await?;
        if let Some(m) = member {
            holders.push((app.instance_id.clone(), m));
            continue;
        }
        // Most messages are held as batch records: copy one open message of one as a payload.
        let record: Vec<Vec<u8>> = redis::cmd("HRANDFIELD")
            .arg(keys.batches(&handler))
            .arg(1)
            .arg("WITHVALUES")
            .query_async(con)
            .await?;
        if let [field, value] = &record[..] {
            let first = String::from_utf8_lossy(field).parse::<u64>();
            if let Ok((entry, open)) = first
                .map_err(|e| e.to_string())
                .and_then(|f| parse_batch_record(f, value))
            {
                if !open.is_empty() {
                    let index = open[rng.random_range(0..open.len())];
                    holders.push((app.instance_id.clone(), entry.envelope(index).encode(b"")));
                }
            }
        }
    }
    if holders.is_empty() || apps.len() < 2 {
        return Ok(None);
    }
    let (from, payload) = holders[rng.random_range(0..holders.len())].clone();
    let others: Vec<&AppProcess> = apps.iter().filter(|a| a.instance_id != from).collect();
    let to = &others[rng.random_range(0..others.len())].instance_id;
    let handler = format!("{to}.0");
    let (added, _): (u64, u64) = redis::pipe()
        .cmd("SADD")
        .arg(keys.inflight(&handler))
        .arg(&payload)
        .cmd("SADD")
        .arg(keys.handlers())
        .arg(&handler)
        .query_async(con)
        .await?;
    // Already a member (the payload was taken from a set that held a planted copy, and put back
    // into its original holder's set, which still held it): nothing was planted; try again later.
    // Counting it made the verdict wait for a duplicate that could never come (soak, seed 35).
    if added == 0 {
        return Ok(None);
    }
    let id = leaderq::protocol::message::Envelope::parse(&payload)
        .map(|(e, _)| e.id)
        .unwrap_or(u64::MAX);
    Ok(Some((
        format!(
            "{} from {from}'s set planted in {to}'s",
            String::from_utf8_lossy(&payload)
        ),
        id,
    )))
}
