//! Generation in a namespace spread over shards (docs/PROTOCOL.md, "Sharding"): ids are
//! allocated in the control slot (allocate.lua, fenced by the lease) and appended to one shard
//! (append.lua, fenced by the shard's `epoch_seen`), strictly in turn: allocate.lua allocates
//! only when `{ns}:pending` is the range its caller saw appended, so at most one allocated range
//! is not yet appended, the one in `{ns}:pending`, and whoever allocates next appends it first.
//! Ids stay gap-free and unique across shards, a repeated allocation allocates nothing twice,
//! and a deposed generator can write to no shard.

use crate::conn::Conn;
use crate::error::Error;
use crate::node::generator::Generated;
use crate::node::incarnation::Incarnation;
use crate::node::lease::Lease;
use crate::protocol::keys::Keys;
use crate::protocol::{scripts, shards};

/// One shard as the generator and the handlers reach it.
#[derive(Clone)]
pub struct Shard {
    /// Its index, 0-based.
    pub index: u32,
    /// A connection pinned to its slot.
    pub con: Conn,
    /// Its keys (`{ns/index}`).
    pub keys: Keys,
    /// The shard's incarnation as this copy joined it (its scripts are guarded by it).
    pub incarnation: Incarnation,
}

/// An id range allocated and not yet seen appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// The epoch that allocated it.
    pub epoch: u64,
    /// First id.
    pub first_id: u64,
    /// How many ids.
    pub count: u64,
    /// The shard it goes to.
    pub shard: u32,
    /// Its generation time (Redis µs at allocation).
    pub time_us: u64,
}

impl Range {
    /// Parses `{ns}:pending`, `"<epoch>:<first_id>:<count>:<shard>:<time_us>"`.
    pub fn parse(raw: &str) -> Option<Range> {
        let mut f = raw.split(':').map(|x| x.parse::<u64>().ok());
        let r = Range {
            epoch: f.next()??,
            first_id: f.next()??,
            count: f.next()??,
            shard: u32::try_from(f.next()??).ok()?,
            time_us: f.next()??,
        };
        f.next().is_none().then_some(r)
    }
}

/// What append.lua answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Appended now (or, for a seal, the shard's `epoch_seen` raised).
    Now,
    /// Appended before (by an earlier try, or by a successor).
    Already,
    /// The shard has seen a later epoch: this generator is deposed.
    Fenced,
}

/// Appends `range` to `shard` (append.lua); a count of 0 only seals the shard with its epoch.
pub async fn append(shard: &mut Shard, range: &Range) -> Result<Appended, Error> {
    let keys = &shard.keys;
    let mut call = scripts::APPEND.prepare_invoke();
    call.key(keys.queue())
        .key(keys.alloc_mark())
        .key(keys.epoch_seen())
        .key(keys.stats())
        .key(keys.wake())
        .key(keys.incarnation())
        .key(keys.errors())
        .key(keys.writes())
        .arg(range.epoch)
        .arg(range.first_id)
        .arg(range.count)
        .arg(range.time_us)
        .arg(shard.incarnation.guard());
    let (status, _mark, _seen): (i64, u64, u64) = shard
        .incarnation
        .invoke(&call, &mut shard.con)
        .await
        .map_err(|e| match e.code() {
            Some("ERR") if e.to_string().contains("append:") => Error::Corrupt(e.to_string()),
            _ => Error::from(e),
        })?;
    Ok(match status {
        1 => Appended::Now,
        2 => Appended::Already,
        _ => Appended::Fenced,
    })
}

/// What allocate.lua answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocated {
    /// A range was allocated and recorded as pending; the pending value as Redis holds it.
    Range(Range, String),
    /// Redis holds another pending value than the caller saw appended ("" for none): nothing was
    /// allocated; the caller appends it (or finds it appended) before it allocates again.
    Pending(String),
    /// Nothing allocated: [`Generated::Finished`], [`Generated::IdSpaceUsedUp`] or
    /// [`Generated::Fenced`].
    Stopped(Generated),
}

/// What [`allocate`] is given as the pending value last seen appended to learn what is pending
/// without allocating anything: no pending value is ever `"?"`.
const ASK_PENDING: &str = "?";

/// Allocates up to `wanted` ids for shard `shard` under `lease` (allocate.lua), provided the
/// pending range in Redis is `seen`, the one this generator last saw appended (`""`: none):
/// otherwise nothing is allocated and the pending value is returned, so a call repeated after
/// its reply was lost allocates nothing twice. `cut`: the count was bounded by the shard's room,
/// so the range is cut to end on a multiple of 8 when it can (batches then stay aligned with the
/// outcome bitmaps' bytes, as generate.lua keeps them).
#[allow(clippy::too_many_arguments)]
pub async fn allocate(
    con: &mut Conn,
    keys: &Keys,
    lease: &Lease,
    incarnation: &Incarnation,
    wanted: u64,
    cut: bool,
    shard: u32,
    seen: &str,
) -> Result<Allocated, Error> {
    let mut call = scripts::ALLOCATE.prepare_invoke();
    call.key(keys.lease())
        .key(keys.next_id())
        .key(keys.max())
        .key(keys.epochs())
        .key(keys.pending())
        .key(keys.incarnation())
        .key(keys.errors())
        .key(keys.stats())
        .key(keys.writes())
        .arg(&lease.value)
        .arg(lease.epoch)
        .arg(wanted)
        .arg(incarnation.guard())
        .arg(incarnation.max_next_id())
        .arg(crate::protocol::message::ID_MAX + 1)
        .arg(shard)
        .arg(u8::from(cut))
        .arg(seen);
    let (status, first_id, count, time_us, pending): (i64, u64, u64, u64, String) = incarnation
        .invoke(&call, con)
        .await
        .map_err(|e| match e.code() {
            Some("ERR") if e.to_string().contains("allocate:") => Error::Corrupt(e.to_string()),
            _ => Error::from(e),
        })?;
    if status == 1 {
        incarnation.saw_next_id(first_id + count);
    }
    Ok(match status {
        1 => Allocated::Range(
            Range {
                epoch: lease.epoch,
                first_id,
                count,
                shard,
                time_us,
            },
            pending,
        ),
        6 => Allocated::Pending(pending),
        3 => Allocated::Stopped(Generated::Finished),
        4 => Allocated::Stopped(Generated::IdSpaceUsedUp),
        _ => Allocated::Stopped(Generated::Fenced),
    })
}

/// The generator's state across calls in a sharded namespace.
pub struct ShardedGen {
    /// Every shard, in order.
    pub shards: Vec<Shard>,
    /// The shard asked first next time (round robin).
    next: usize,
    /// `None` until this lease has appended what was pending when it took over and sealed every
    /// shard; then the pending value it last saw appended, which allocate.lua must still find
    /// to allocate anything.
    appended: Option<String>,
}

impl ShardedGen {
    /// State for a fresh lease over `shards`.
    pub fn new(shards: Vec<Shard>) -> ShardedGen {
        ShardedGen {
            shards,
            next: 0,
            appended: None,
        }
    }

    /// Starts a new lease: the pending range is appended and every shard sealed again before
    /// the first allocation.
    pub fn reset(&mut self) {
        self.appended = None;
    }

    /// Appends `range` to its shard. `Ok(false)`: fenced (the shard has seen a later epoch).
    async fn finish(&mut self, range: Range) -> Result<bool, Error> {
        let count = self.shards.len();
        let shard = self.shards.get_mut(range.shard as usize).ok_or_else(|| {
            Error::Corrupt(format!("a range names shard {} of {count}", range.shard))
        })?;
        match append(shard, &range).await? {
            Appended::Now | Appended::Already => Ok(true),
            Appended::Fenced => Ok(false),
        }
    }

    /// Makes sure the pending range `raw` (as `{ns}:pending` held it; "" for none) is appended:
    /// a predecessor that died between allocation and append, an append whose reply was lost,
    /// or an allocation whose reply was lost (the script ran, the caller never learnt the range:
    /// seen in a sharded soak with Redis restarts, `--restart-redis 2 --shards 3 --seed 2`). The
    /// range keeps the epoch that allocated it, which every shard still accepts: only a takeover
    /// seals a shard, and it runs this first.
    async fn append_pending(&mut self, keys: &Keys, raw: &str) -> Result<(), Error> {
        if raw.is_empty() {
            return Ok(());
        }
        let range = Range::parse(raw).ok_or_else(|| {
            Error::Corrupt(format!(
                "{} holds {raw:?}, not epoch:first:count:shard:time",
                keys.pending()
            ))
        })?;
        if !self.finish(range).await? {
            // A shard that refuses the pending range without having appended it would leave a
            // gap in the ids: damage, said loudly (generation stops) rather than skipped.
            return Err(Error::Corrupt(format!(
                "shard {} refuses the pending range {raw:?} (it has seen a later epoch) but never appended it: ids {}..{} would be missing",
                range.shard,
                range.first_id,
                range.first_id + range.count
            )));
        }
        Ok(())
    }

    /// Seals every shard with `lease`'s epoch: from now on they refuse appends of older epochs.
    /// `Ok(false)`: a shard has seen a later epoch (this lease is deposed).
    async fn seal(&mut self, lease: &Lease) -> Result<bool, Error> {
        for i in 0..self.shards.len() {
            let seal = Range {
                epoch: lease.epoch,
                first_id: 0,
                count: 0,
                shard: i as u32,
                time_us: 0,
            };
            if append(&mut self.shards[i], &seal).await? == Appended::Fenced {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The first step of a lease: learn what is pending (allocate.lua asked with a value no
    /// range has, so it allocates nothing), append it, seal every shard. `Ok(false)`: fenced.
    async fn take_over(
        &mut self,
        con: &mut Conn,
        keys: &Keys,
        lease: &Lease,
        incarnation: &Incarnation,
    ) -> Result<bool, Error> {
        let pending =
            match allocate(con, keys, lease, incarnation, 1, false, 0, ASK_PENDING).await? {
                Allocated::Pending(raw) => raw,
                Allocated::Stopped(Generated::Fenced) => return Ok(false),
                other => {
                    return Err(Error::Corrupt(format!(
                        "allocate.lua answered {other:?} when only asked what is pending"
                    )))
                }
            };
        self.append_pending(keys, &pending).await?;
        if !self.seal(lease).await? {
            return Ok(false);
        }
        self.appended = Some(pending);
        Ok(true)
    }

    /// One generation step: at the start of a lease, what is pending appended and every shard
    /// sealed; then one range of at most `batch_max` ids for the next shard (round robin) whose
    /// queue holds fewer than `queue_max` messages, allocated and appended. When allocate.lua
    /// finds a pending range this generator has not seen appended (an earlier call whose reply
    /// was lost), that range is appended instead ([`Generated::PendingAppended`]).
    pub async fn step(
        &mut self,
        con: &mut Conn,
        keys: &Keys,
        lease: &Lease,
        incarnation: &Incarnation,
        batch_max: u64,
        queue_max: u64,
    ) -> Result<Generated, Error> {
        if self.appended.is_none() && !self.take_over(con, keys, lease, incarnation).await? {
            return Ok(Generated::Fenced);
        }
        // `queue_max` bounds each shard's queue (each master's memory): a share of it would cut
        // batches to queue_max/S messages, and Redis's costs are per batch.
        let share = queue_max.max(1);
        for _ in 0..self.shards.len() {
            let i = self.next;
            self.next = (self.next + 1) % self.shards.len();
            let shard = &mut self.shards[i];
            let queued = shards::queued(&mut shard.con, &shard.keys, share).await?;
            let room = share.saturating_sub(queued);
            if room == 0 {
                continue;
            }
            let wanted = batch_max.min(room);
            let seen = self.appended.clone().unwrap_or_default();
            let allocated = allocate(
                con,
                keys,
                lease,
                incarnation,
                wanted,
                wanted < batch_max,
                i as u32,
                &seen,
            )
            .await?;
            return match allocated {
                Allocated::Range(range, raw) => {
                    // Should this append fail, the next allocation finds the range pending and
                    // unseen, and it is appended then.
                    if !self.finish(range).await? {
                        return Ok(Generated::Fenced);
                    }
                    self.appended = Some(raw);
                    Ok(Generated::Batch {
                        first_id: range.first_id,
                        count: range.count,
                        time_us: range.time_us,
                    })
                }
                Allocated::Pending(raw) => {
                    self.append_pending(keys, &raw).await?;
                    self.appended = Some(raw);
                    Ok(Generated::PendingAppended)
                }
                Allocated::Stopped(generated) => Ok(generated),
            };
        }
        Ok(Generated::QueueFull)
    }
}
