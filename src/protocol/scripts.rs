//! The Lua scripts, one `.lua` file each (read their headers for the KEYS/ARGV/Returns contract),
//! each compiled into a `Script` exactly once per process, `lua/prelude.lua` (shared helpers: the
//! Redis time, the incarnation check, the type guard) in front of each. A script whose first line
//! is a shebang (`#!lua flags=allow-oom`) keeps it first: Redis reads flags only there.
//!
//! `Script::invoke_async` sends `EVALSHA` and reloads the script on `NOSCRIPT` (after a Redis
//! restart, say), so callers never need to think about loading.

use redis::Script;
use std::sync::LazyLock;

macro_rules! script {
    ($name:ident, $file:literal) => {
        #[doc = concat!("`src/protocol/lua/", $file, "`.")]
        pub static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(&with_prelude(include_str!(concat!("lua/", $file)))));
    };
}

script!(ACQUIRE, "acquire.lua");
script!(RENEW, "renew.lua");
script!(RELEASE, "release.lua");
script!(GENERATE, "generate.lua");
script!(ALLOCATE, "allocate.lua");
script!(APPEND, "append.lua");
script!(FETCH, "fetch.lua");
script!(COMMIT, "commit.lua");
script!(RECLAIM, "reclaim.lua");
script!(ERRORS_TAKE, "errors_take.lua");
script!(ERRORS_ACK, "errors_ack.lua");
script!(PRESENCE, "presence.lua");
script!(SAMPLE, "sample.lua");
script!(PRUNE, "prune.lua");
script!(SET_ASIDE, "set_aside.lua");
script!(SETTLE_SHARDS, "settle_shards.lua");

/// `body` with the prelude in front of it, after its shebang line if it has one.
fn with_prelude(body: &str) -> String {
    let prelude = include_str!("lua/prelude.lua");
    match body
        .strip_prefix("#!")
        .and_then(|rest| rest.split_once('\n'))
    {
        Some((flags, rest)) => format!("#!{flags}\n{prelude}{rest}"),
        None => format!("{prelude}{body}"),
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
