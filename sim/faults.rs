//! The fault plan: which faults a run injects and at which points, drawn from the seed. The
//! driver executes it; the report and the verdict read what was executed.

use crate::Flags;
use rand::{Rng, SeedableRng};

/// The faults `sim` can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    KillLeader,
    PauseLeader,
    /// The proxy holds the generator's requests past its lease: they reach Redis after a
    /// successor took over (fencing must refuse them).
    PartitionLeader,
    /// Plant a copy of one handler's in-flight message in another live handler's set, as a buggy
    /// reclaim could: the duplicate defence (`done` bitmap) must record one outcome and count
    /// one duplicate.
    InjectDuplicate,
    KillWorker,
    PauseWorker,
    DropConnections,
    LoseReplies,
    RestartRedis,
    /// Take the RDB snapshot a later `RollbackRedis` restores (planned at half its trigger).
    SnapshotRedis,
    /// Restart Redis from that older snapshot: Redis goes back in time; the group must halt.
    RollbackRedis,
    /// `FLUSHALL`: Redis forgets everything; the group must halt.
    WipeRedis,
    /// Start an `app getErrors` (or two) that may be SIGKILLed mid-drain.
    DrainErrors,
    /// SIGKILL the cluster master of one of the namespace's slots; its replica is promoted. The
    /// group must either lose nothing it was told, or halt.
    KillMaster,
}

impl FaultKind {
    /// The label in logs and plots.
    pub fn label(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "leader kill",
            FaultKind::PauseLeader => "leader pause",
            FaultKind::PartitionLeader => "leader partition",
            FaultKind::InjectDuplicate => "duplicate delivery",
            FaultKind::KillWorker => "worker kill",
            FaultKind::PauseWorker => "worker pause",
            FaultKind::DropConnections => "connection drop",
            FaultKind::LoseReplies => "lost replies",
            FaultKind::RestartRedis => "redis restart",
            FaultKind::SnapshotRedis => "redis snapshot",
            FaultKind::RollbackRedis => "redis rollback",
            FaultKind::WipeRedis => "redis wipe",
            FaultKind::DrainErrors => "getErrors drain",
            FaultKind::KillMaster => "master kill",
        }
    }

    /// Generator faults trigger on generated ids (so a failover is measured while there is work
    /// to generate); the others on recorded outcomes (so handlers are busy).
    pub fn on_generated(self) -> bool {
        matches!(
            self,
            FaultKind::KillLeader | FaultKind::PauseLeader | FaultKind::PartitionLeader
        )
    }

    /// Faults that can depose the generator (each at most twice: a takeover, and a second one
    /// if the first successor is hit by the same event).
    pub fn can_depose(self) -> bool {
        matches!(
            self,
            FaultKind::KillLeader
                | FaultKind::PauseLeader
                | FaultKind::PartitionLeader
                | FaultKind::DropConnections
                | FaultKind::LoseReplies
                | FaultKind::RestartRedis
                | FaultKind::KillMaster
        )
    }
}

/// One planned (then executed) fault.
pub struct Fault {
    pub kind: FaultKind,
    /// Trigger once this many ids are generated (generator faults) or outcomes recorded (others).
    pub at: u64,
    /// Executed yet?
    pub done: bool,
    /// Seconds since the start when it happened.
    pub t_s: f64,
    /// The epoch of the generator it hit (generator faults).
    pub epoch: u64,
    /// Redis time just before the fault, µs.
    pub redis_us: u64,
    /// For a snapshot: stop the generator first and roll back a few outcomes later, before it
    /// resumes, so the rollback puts back no counter (only handlers' calls are lost).
    pub quiet: bool,
    /// For a master kill: which of the namespace's slots it hits, 0 = the control slot `{ns}`,
    /// `s + 1` = shard `s` (taken modulo the slots there are).
    pub target: u32,
    /// For a generator fault: when it hit, and how long until another epoch held the lease (the
    /// driver looks every tick), ms.
    pub hit_at: Option<std::time::Instant>,
    pub takeover_ms: Option<f64>,
}

/// The seeded fault plan: for each kind, `count` trigger points drawn uniformly from 10 %..90 %
/// of the run, each kind from its own stream so adding one kind does not move the others.
fn fault_plan(seed: u64, messages: u64, counts: &[(FaultKind, u32)]) -> Vec<Fault> {
    let mut plan = Vec::new();
    for (salt, &(kind, count)) in counts.iter().enumerate() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (0x6b69_6c6c + salt as u64));
        let mut points: Vec<u64> = (0..count)
            .map(|_| (messages as f64 * rng.random_range(0.1..0.9)) as u64)
            .collect();
        points.sort_unstable();
        for at in points {
            if kind == FaultKind::RollbackRedis {
                // The state it goes back to: taken between halfway to the rollback and just
                // before it (a restore from a backup, or a failover to a replica lagging by a few
                // batches: then the restored lease may still be the live generator's, and only
                // its own high-water mark stops it from generating ids again).
                let lag = if rng.random_bool(0.5) {
                    rng.random_range(0.5..0.9)
                } else {
                    rng.random_range(0.97..0.995)
                };
                // Half the rollbacks are quiet: the generator is stopped before the snapshot and
                // the rollback follows within a few outcomes, so next_id and the epoch come back
                // unchanged and only the write counts (invariant 9) can see what was lost.
                let mut snapshot = Fault::new(FaultKind::SnapshotRedis, (at as f64 * lag) as u64);
                snapshot.quiet = rng.random_bool(0.5);
                plan.push(snapshot);
            }
            let mut fault = Fault::new(kind, at);
            if kind == FaultKind::KillMaster {
                fault.target = rng.random();
            }
            plan.push(fault);
        }
    }
    plan
}

impl Fault {
    fn new(kind: FaultKind, at: u64) -> Fault {
        Fault {
            kind,
            at,
            done: false,
            t_s: 0.0,
            epoch: 0,
            redis_us: 0,
            quiet: false,
            target: 0,
            hit_at: None,
            takeover_ms: None,
        }
    }
}

/// The seeded fault plan a run's flags ask for.
pub fn plan_for(flags: &Flags, seed: u64) -> Vec<Fault> {
    let kills = if flags.kill_leader { flags.kills } else { 0 };
    fault_plan(
        seed,
        flags.messages,
        &[
            (FaultKind::KillLeader, kills),
            (FaultKind::PauseLeader, flags.pause_leader),
            (FaultKind::PartitionLeader, flags.partition_leader),
            (FaultKind::InjectDuplicate, flags.inject_duplicates),
            (FaultKind::KillWorker, flags.kill_workers),
            (FaultKind::PauseWorker, flags.pause_workers),
            (FaultKind::DropConnections, flags.drop_connections),
            (FaultKind::LoseReplies, flags.lose_replies),
            (FaultKind::RestartRedis, flags.restart_redis),
            (FaultKind::RollbackRedis, u32::from(flags.rollback_redis)),
            (FaultKind::WipeRedis, u32::from(flags.wipe_redis)),
            (FaultKind::DrainErrors, flags.drain_errors),
            (FaultKind::KillMaster, flags.kill_master),
        ],
    )
}
