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
        let ok = !namespace.is_empty()
            && namespace.len() <= 64
            && !namespace
                .chars()
                .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control());
        if !ok {
            return Err(Error::Config(format!(
                "namespace {namespace:?} must be 1-64 characters without braces or whitespace"
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
    fn bad_namespaces_are_refused() {
        for ns in ["", "a{b", "a}b", "a b", &"x".repeat(65)] {
            assert!(Keys::new(ns).is_err(), "{ns:?}");
        }
    }
}
