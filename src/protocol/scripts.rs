//! The Lua scripts, one `.lua` file each (read their headers for the KEYS/ARGV/Returns contract),
//! each compiled into a `Script` exactly once per process, `lua/prelude.lua` (shared helpers: the
//! Redis time, the incarnation check, the type guard) in front of each. A script whose first line
//! is a shebang (`#!lua flags=allow-oom`) keeps it first: Redis reads flags only there.
//!
//! `Script::invoke_async` sends `EVALSHA` and reloads the script on `NOSCRIPT` (after a Redis
//! restart, say), so callers never need to think about loading.
//!
//! The *guarded* scripts (those that call the prelude's `forgotten`, docs/PROTOCOL.md invariant 9)
//! are wrapped: their body runs as a function, and a reply that is not an error comes back as
//! `{writes, reply}`, `writes` being Redis's count of the calling copy's guarded calls after this
//! one. The copy catches up with it ([`crate::node::incarnation::Incarnation::invoke`]), so a call
//! whose reply was lost leaves the copy's count behind Redis's for one call, not for ever.

use redis::Script;
use std::sync::LazyLock;

macro_rules! script {
    ($name:ident, $file:literal) => {
        #[doc = concat!("`src/protocol/lua/", $file, "`.")]
        pub static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(&with_prelude(include_str!(concat!("lua/", $file)))));
    };
}

/// A guarded script: called only through `Incarnation::invoke`, which reads the write count its
/// reply carries (see the module docs).
macro_rules! guarded_script {
    ($name:ident, $file:literal) => {
        #[doc = concat!("`src/protocol/lua/", $file, "` (guarded: called through `Incarnation::invoke`).")]
        pub static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(&guarded(include_str!(concat!("lua/", $file)))));
    };
}

guarded_script!(ACQUIRE, "acquire.lua");
guarded_script!(RENEW, "renew.lua");
script!(RELEASE, "release.lua");
guarded_script!(GENERATE, "generate.lua");
guarded_script!(ALLOCATE, "allocate.lua");
guarded_script!(APPEND, "append.lua");
guarded_script!(FETCH, "fetch.lua");
guarded_script!(COMMIT, "commit.lua");
guarded_script!(RECLAIM, "reclaim.lua");
script!(ERRORS_TAKE, "errors_take.lua");
script!(ERRORS_ACK, "errors_ack.lua");
script!(PRESENCE, "presence.lua");
script!(SAMPLE, "sample.lua");
script!(PRUNE, "prune.lua");
script!(SET_ASIDE, "set_aside.lua");
script!(SETTLE_SHARDS, "settle_shards.lua");

/// `body` with the prelude in front of it, after its shebang line if it has one.
fn with_prelude(body: &str) -> String {
    let (shebang, body) = split_shebang(body);
    let prelude = include_str!("lua/prelude.lua");
    format!("{shebang}{prelude}{body}")
}

/// A guarded script's `body` with the prelude in front, run as a function whose reply, unless it
/// is an error (or status) reply, is returned as `{writes, reply}`: `writes` is what the
/// prelude's `forgotten` left in `guard_writes`, Redis's count of the caller's guarded calls
/// after this one (-1 if the body never counted the call, which `Incarnation::invoke` refuses).
/// A reply of nil becomes false, so the pair keeps its two elements (Redis sends both as nil).
fn guarded(body: &str) -> String {
    let (shebang, body) = split_shebang(body);
    let prelude = include_str!("lua/prelude.lua");
    format!(
        "{shebang}{prelude}local function guarded_script()\n{body}\nend\n\
         local reply = guarded_script()\n\
         if type(reply) == 'table' and (reply.err or reply.ok) then return reply end\n\
         if reply == nil then reply = false end\n\
         return {{guard_writes or -1, reply}}\n"
    )
}

/// A script's shebang line (`#!lua flags=…`, newline included; Redis reads flags only from the
/// first line), or "", and the rest.
fn split_shebang(body: &str) -> (String, &str) {
    match body
        .strip_prefix("#!")
        .and_then(|rest| rest.split_once('\n'))
    {
        Some((flags, rest)) => (format!("#!{flags}\n"), rest),
        None => (String::new(), body),
    }
}

/// Loads every script into Redis up front, so the first hot-path call is a plain `EVALSHA` and a
/// syntax error shows at start-up rather than mid-run.
pub async fn load_all<C: redis::aio::ConnectionLike>(con: &mut C) -> redis::RedisResult<()> {
    for s in [
        &*ACQUIRE,
        &*RENEW,
        &*RELEASE,
        &*GENERATE,
        &*ALLOCATE,
        &*APPEND,
        &*FETCH,
        &*COMMIT,
        &*RECLAIM,
        &*ERRORS_TAKE,
        &*ERRORS_ACK,
        &*PRESENCE,
        &*SAMPLE,
        &*PRUNE,
        &*SET_ASIDE,
        &*SETTLE_SHARDS,
    ] {
        s.load_async(con).await?;
    }
    Ok(())
}
