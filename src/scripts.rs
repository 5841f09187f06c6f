//! The Lua scripts, one `.lua` file each (read their headers for the KEYS/ARGV/Returns contract),
//! each compiled into a `Script` exactly once per process, `lua/prelude.lua` (shared helpers: the
//! Redis time, the incarnation check) in front of each.
//!
//! `Script::invoke_async` sends `EVALSHA` and reloads the script on `NOSCRIPT` (after a Redis
//! restart, say), so callers never need to think about loading.

use redis::Script;
use std::sync::LazyLock;

macro_rules! script {
    ($name:ident, $file:literal) => {
        #[doc = concat!("`src/lua/", $file, "`.")]
        pub static $name: LazyLock<Script> = LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/prelude.lua"),
                include_str!(concat!("lua/", $file))
            ))
        });
    };
}

script!(ACQUIRE, "acquire.lua");
script!(RENEW, "renew.lua");
script!(RELEASE, "release.lua");
script!(GENERATE, "generate.lua");
script!(FETCH, "fetch.lua");
script!(COMMIT, "commit.lua");
script!(RECLAIM, "reclaim.lua");
script!(ERRORS_TAKE, "errors_take.lua");
script!(ERRORS_ACK, "errors_ack.lua");
script!(PRESENCE, "presence.lua");
script!(SAMPLE, "sample.lua");
script!(PRUNE, "prune.lua");
script!(SET_ASIDE, "set_aside.lua");

/// Loads every script into Redis up front, so the first hot-path call is a plain `EVALSHA` and a
/// syntax error shows at start-up rather than mid-run.
pub async fn load_all<C: redis::aio::ConnectionLike>(con: &mut C) -> redis::RedisResult<()> {
    for s in [
        &*ACQUIRE,
        &*RENEW,
        &*RELEASE,
        &*GENERATE,
        &*FETCH,
        &*COMMIT,
        &*RECLAIM,
        &*ERRORS_TAKE,
        &*ERRORS_ACK,
        &*PRESENCE,
        &*SAMPLE,
        &*PRUNE,
        &*SET_ASIDE,
    ] {
        s.load_async(con).await?;
    }
    Ok(())
}
