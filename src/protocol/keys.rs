//! Every Redis key name the project uses, built from one namespace.
//!
//! All keys share the hash tag `{namespace}`, so every key a script touches hashes to one slot and
//! the scripts stay legal on Redis Cluster. Nothing else in the crate formats a key.

use crate::error::Error;

/// The key names of one namespace (one group of cooperating copies).
#[derive(Debug, Clone)]
pub struct Keys {
    /// `{namespace}:` — the prefix of every key, hash tag included.
    prefix: String,
}

impl Keys {
    /// Validates the namespace: non-empty, at most 64 bytes, no braces or whitespace (a brace would
    /// break the hash tag, whitespace would make `redis-cli` sessions ambiguous).
    pub fn new(namespace: &str) -> Result<Keys, Error> {
        // '/' is reserved: shard s of namespace x is `{x/s}` (Keys::shards), so a namespace
        // "x/0" would share its keys with shard 0 of x.
        let ok = !namespace.is_empty()
            && namespace.len() <= 64
            && !namespace
                .chars()
                .any(|c| c == '{' || c == '}' || c == '/' || c.is_whitespace() || c.is_control());
        if !ok {
            return Err(Error::Config(format!(
                "namespace {namespace:?} must be 1-64 characters without braces, '/' (it names a namespace's shards) or whitespace"
            )));
        }
        Ok(Keys {
            prefix: format!("{{{namespace}}}:"),
        })
    }

    /// The prefix, for the one script (reclaim) that derives per-handler keys itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace these keys were built from (inside the hash tag).
    pub fn namespace(&self) -> &str {
        &self.prefix[1..self.prefix.len() - 2]
    }

    /// The keys of shard `index` of a namespace spread over `of` shards (docs/PROTOCOL.md,
    /// "Sharding"): the hash tag `{<namespace>/<index>}`, or `{<namespace>/<index>.<k>}` with
    /// the smallest `k` that puts its slot in the `index`-th `of`-th of the slot space. So the
    /// shards spread evenly over the slots, and on a cluster whose masters own equal ranges of
    /// slots (as `redis-cli --cluster create` assigns them) `of` shards over `of` masters land
    /// one per master. Every copy computes the same tags. With one shard, the namespace's own
    /// keys: an unsharded namespace is shard 0 of 1, laid out exactly as before sharding.
    pub fn shard(&self, index: u32, of: u32) -> Keys {
        if of <= 1 {
            return self.clone();
        }
        let (lo, hi) = (
            u64::from(index) * 16384 / u64::from(of),
            (u64::from(index) + 1) * 16384 / u64::from(of),
        );
        let in_range = |tag: &str| {
            let slot = u64::from(crate::conn::key_slot(tag.as_bytes()));
            (lo..hi).contains(&slot)
        };
        let mut tag = format!("{}/{index}", self.namespace());
        // Bounded: a range is at least 16384/64 slots, so a tag is found within a few hundred
        // tries in expectation; past the bound the last tag is used (still a valid shard).
        for k in 1..100_000u32 {
            if in_range(&tag) {
                break;
            }
            tag = format!("{}/{index}.{k}", self.namespace());
        }
        Keys {
            prefix: format!("{{{tag}}}:"),
        }
    }

    /// The keys of every shard of a namespace spread over `of` shards, in shard order.
    pub fn shards(&self, of: u32) -> Vec<Keys> {
        (0..of.max(1)).map(|i| self.shard(i, of)).collect()
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// String: the namespace's incarnation token, created once; `halted:<why>` once a copy saw
    /// Redis lose data. The hot scripts refuse to run for a copy that joined another value.
    pub fn incarnation(&self) -> String {
        self.key("incarnation")
    }
    /// Hash: a copy's random id -> how many of its guarded script calls passed the incarnation
    /// check. A copy knows how many of its calls it saw succeed, so a Redis that went back in time
    /// on any of them is caught at its next call (docs/PROTOCOL.md, invariant 9). One field per
    /// copy started; never pruned while the namespace lives (a pruned field would read as a
    /// rollback).
    pub fn writes(&self) -> String {
        self.key("writes")
    }
    /// String `"<epoch>:<instance>"` with a TTL: who generates now.
    pub fn lease(&self) -> String {
        self.key("lease")
    }
    /// Integer: the Redis connection id (`CLIENT ID`) of the lease holder when it took the lease.
    /// When that connection is gone (a SIGKILLed process's socket closes at once) candidates may
    /// take the lease without waiting for its TTL.
    pub fn lease_conn(&self) -> String {
        self.key("lease:conn")
    }
    /// Integer, INCR on every lease acquisition: the fencing token.
    pub fn epoch(&self) -> String {
        self.key("epoch")
    }
    /// Integer: the next id `getMessage` returns. Survives failover because it lives here.
    pub fn next_id(&self) -> String {
        self.key("next_id")
    }
    /// Integer, optional: generation stops after id `max - 1`.
    pub fn max(&self) -> String {
        self.key("max")
    }
    /// List of message payloads waiting for a handler.
    pub fn queue(&self) -> String {
        self.key("queue")
    }
    /// Set of payloads reclaimed once from a dead handler, fetched in random samples.
    pub fn retry(&self) -> String {
        self.key("retry")
    }
    /// Hash of batch records a live handler gave back when its copy became the generator
    /// (reclaim.lua's hand-back), in the batch record format, waiting for fetch.lua to take them
    /// whole (or split at a byte of their mask).
    pub fn returned(&self) -> String {
        self.key("returned")
    }
    /// List of payloads reclaimed `level` times (2 or more): suspects, handled in groups that
    /// shrink tenfold per level so a message that keeps killing its handler is singled out.
    pub fn suspects(&self, level: u64) -> String {
        self.key(&format!("suspects:{level}"))
    }
    /// Pub/sub channel: generate.lua publishes after each batch so idle handlers fetch at once
    /// instead of waiting for their next poll (a lost notification only delays, never loses).
    pub fn wake(&self) -> String {
        self.key("wake")
    }
    /// List of `"epoch:first_id:count:time_us"`: which epoch generated which id range, and when.
    pub fn epochs(&self) -> String {
        self.key("epochs")
    }
    /// Set of handler ids that may hold in-flight messages (scanned by reclaim).
    pub fn handlers(&self) -> String {
        self.key("handlers")
    }
    /// Set of payloads handler `handler` has fetched and not yet committed.
    pub fn inflight(&self, handler: &str) -> String {
        self.key(&format!("inflight:{handler}"))
    }
    /// Hash of the batches handler `handler` has fetched whole or in part: field `<first_id>`,
    /// value `"<open>:<count>:<epoch>:<generated_us>:<mask>"` (see fetch.lua): the bitmap of the
    /// batch's messages it still owns without an outcome.
    pub fn batches(&self, handler: &str) -> String {
        self.key(&format!("batches:{handler}"))
    }
    /// Heartbeat of handler `handler`, with a TTL; gone means dead.
    pub fn heartbeat(&self, handler: &str) -> String {
        self.key(&format!("hb:{handler}"))
    }
    /// Bitmap: bit `id` set once an outcome (success or error) was recorded for `id`.
    pub fn done(&self) -> String {
        self.key("done")
    }
    /// Bitmap: bit `id` set when `id` was handled successfully.
    pub fn ok(&self) -> String {
        self.key("ok")
    }
    /// Scratch string `i` (1..=6) of commit.lua: it combines bitmaps there with `BITOP` and deletes
    /// them before it returns, without replicating them; no key outlives a call.
    pub fn scratch(&self, i: u8) -> String {
        self.key(&format!("scratch:{i}"))
    }
    /// List of error entries, `"<payload>\t<reason>\t<time_us>"`: the task's place for failures.
    pub fn errors(&self) -> String {
        self.key("errors")
    }
    /// List: error entries taken by a `getErrors` and not yet printed and deleted.
    pub fn errors_drain(&self) -> String {
        self.key("errors:drain")
    }
    /// String with a TTL: the token of the one `getErrors` allowed to trim the drain list.
    pub fn errors_lock(&self) -> String {
        self.key("errors:lock")
    }
    /// Hash of counters: generated, processed, errors, duplicates, runs, reclaimed, refused, bad.
    pub fn stats(&self) -> String {
        self.key("stats")
    }
    /// Hash of serialized latency histograms written by instance `instance`.
    pub fn histograms(&self, instance: &str) -> String {
        self.key(&format!("hist:{instance}"))
    }
    /// Pattern matching every instance's histogram hash (for `sim`).
    pub fn histograms_pattern(&self) -> String {
        self.key("hist:*")
    }
    /// Hash, field = instance id, value = that process's self-description as JSON (role, epoch,
    /// in-flight count, Redis time of its last write): what `app status` lists. Each process writes
    /// only its own field (presence.lua) and deletes it on a clean stop; a SIGKILLed process's entry
    /// goes stale, which `status` shows as dead, and a later join prunes it (prune.lua).
    pub fn instances(&self) -> String {
        self.key("instances")
    }
    /// Integer: how many shards the namespace is spread over, set once by its first copy to join
    /// (settle_shards.lua; absent before, read as 1). Copies started with another `--shards` are
    /// refused.
    pub fn shard_count(&self) -> String {
        self.key("shards")
    }
    /// String `"<epoch>:<first_id>:<count>:<shard>:<time_us>"`: the last id range allocated
    /// (allocate.lua). It is appended to its shard by append.lua; a generator that dies between
    /// the two leaves it here, and its successor appends it before allocating anything itself.
    pub fn pending(&self) -> String {
        self.key("pending")
    }
    /// Integer, on a shard: the end of the highest id range appended to it. append.lua appends a
    /// range only at or past it, so a retried or repeated append adds nothing.
    pub fn alloc_mark(&self) -> String {
        self.key("alloc_mark")
    }
    /// Integer, on a shard: the highest generator epoch the shard accepted (a takeover seals
    /// every shard with its epoch). append.lua refuses older epochs: the fencing token the
    /// storage checks.
    pub fn epoch_seen(&self) -> String {
        self.key("epoch_seen")
    }
    /// List of counter samples, newest first, at most 16: one a second from the generator
    /// (sample.lua), so `status` can compute rates over the last ~10 s without any process
    /// keeping state for it.
    pub fn stats_history(&self) -> String {
        self.key("stats:history")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("app").unwrap();
        assert_eq!(k.lease(), "{app}:lease");
        assert_eq!(k.inflight("h1"), "{app}:inflight:h1");
        assert_eq!(k.batches("h1"), "{app}:batches:h1");
        assert!(k.histograms("x").starts_with("{app}:"));
    }

    #[test]
    fn shards_have_their_own_hash_tags() {
        let k = Keys::new("app").unwrap();
        assert_eq!(k.namespace(), "app");
        assert_eq!(k.shard(0, 1).queue(), "{app}:queue");
        let shards = k.shards(3);
        assert_eq!(shards.len(), 3);
        for (i, shard) in shards.iter().enumerate() {
            assert!(
                shard.queue().starts_with(&format!("{{app/{i}")),
                "{}",
                shard.queue()
            );
            let slot = crate::conn::key_slot(shard.queue().as_bytes()) as usize;
            assert!(
                (i * 16384 / 3..(i + 1) * 16384 / 3).contains(&slot),
                "shard {i} slot {slot}"
            );
            assert_eq!(
                shard.inflight("h.0"),
                format!("{}inflight:h.0", shard.prefix())
            );
        }
        assert_eq!(
            k.shards(3)[1].prefix(),
            shards[1].prefix(),
            "every copy computes the same tags"
        );
    }

    #[test]
    fn bad_namespaces_are_refused() {
        for ns in ["", "a{b", "a}b", "a b", &"x".repeat(65)] {
            assert!(Keys::new(ns).is_err(), "{ns:?}");
        }
    }
}
