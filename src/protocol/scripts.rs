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

/// Every script, once: its file name, whether it is guarded (its reply carries the write count:
/// called only through `Incarnation::invoke`), and its source.
const SOURCES: [(&str, bool, &str); 16] = [
    ("acquire.lua", true, include_str!("lua/acquire.lua")),
    ("renew.lua", true, include_str!("lua/renew.lua")),
    ("release.lua", false, include_str!("lua/release.lua")),
    ("generate.lua", true, include_str!("lua/generate.lua")),
    ("allocate.lua", true, include_str!("lua/allocate.lua")),
    ("append.lua", true, include_str!("lua/append.lua")),
    ("fetch.lua", true, include_str!("lua/fetch.lua")),
    ("commit.lua", true, include_str!("lua/commit.lua")),
    ("reclaim.lua", true, include_str!("lua/reclaim.lua")),
    (
        "errors_take.lua",
        false,
        include_str!("lua/errors_take.lua"),
    ),
    ("errors_ack.lua", false, include_str!("lua/errors_ack.lua")),
    ("presence.lua", false, include_str!("lua/presence.lua")),
    ("sample.lua", false, include_str!("lua/sample.lua")),
    ("prune.lua", false, include_str!("lua/prune.lua")),
    ("set_aside.lua", false, include_str!("lua/set_aside.lua")),
    (
        "settle_shards.lua",
        false,
        include_str!("lua/settle_shards.lua"),
    ),
];

/// Each script as Redis runs it (prelude and wrapping included), with its SHA1, in
/// [`SOURCES`]'s order.
static TEXTS: LazyLock<Vec<(&'static str, String, String)>> = LazyLock::new(|| {
    SOURCES
        .iter()
        .map(|&(name, is_guarded, body)| {
            let text = if is_guarded {
                guarded(body)
            } else {
                with_prelude(body)
            };
            (name, Script::new(&text).get_hash().to_string(), text)
        })
        .collect()
});

/// The `Script` of the file `name` (one of [`SOURCES`]).
fn script(name: &str) -> Script {
    let (_, _, text) = TEXTS
        .iter()
        .find(|(n, _, _)| *n == name)
        .expect("a script of SOURCES");
    Script::new(text)
}

macro_rules! script {
    ($name:ident, $file:literal, $doc:literal) => {
        #[doc = concat!("`src/protocol/lua/", $file, "`", $doc)]
        pub static $name: LazyLock<Script> = LazyLock::new(|| script($file));
    };
}

script!(
    ACQUIRE,
    "acquire.lua",
    " (guarded: called through `Incarnation::invoke`)."
);
script!(
    RENEW,
    "renew.lua",
    " (guarded: called through `Incarnation::invoke`)."
);
script!(RELEASE, "release.lua", ".");
script!(
    GENERATE,
    "generate.lua",
    " (guarded: called through `Incarnation::invoke`)."
);
script!(
    ALLOCATE,
    "allocate.lua",
    " (guarded: called through `Incarnation::invoke`)."
);
script!(
    APPEND,
    "append.lua",
    " (guarded: called through `Incarnation::invoke`)."
);
script!(
    FETCH,
    "fetch.lua",
    " (guarded: called through `Incarnation::invoke`)."
);
script!(
    COMMIT,
    "commit.lua",
    " (guarded: called through `Incarnation::invoke`)."
);
script!(
    RECLAIM,
    "reclaim.lua",
    " (guarded: called through `Incarnation::invoke`)."
);
script!(ERRORS_TAKE, "errors_take.lua", ".");
script!(ERRORS_ACK, "errors_ack.lua", ".");
script!(PRESENCE, "presence.lua", ".");
script!(SAMPLE, "sample.lua", ".");
script!(PRUNE, "prune.lua", ".");
script!(SET_ASIDE, "set_aside.lua", ".");
script!(SETTLE_SHARDS, "settle_shards.lua", ".");

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

/// The script with SHA1 `sha` and the Redis command its line `line` (1-based, as Redis counts
/// `@user_script:<line>`) calls, when that line has a `redis.call('NAME'` (or `pcall`).
pub fn command_at(sha: &str, line: usize) -> Option<(&'static str, String)> {
    let (name, _, text) = TEXTS.iter().find(|(_, s, _)| s == sha)?;
    let source = text.lines().nth(line.checked_sub(1)?)?;
    let call = source.split("call('").nth(1)?;
    Some((name, call.split('\'').next()?.to_string()))
}

/// Loads every script into Redis up front, so the first hot-path call is a plain `EVALSHA` and a
/// syntax error shows at start-up rather than mid-run.
pub async fn load_all<C: redis::aio::ConnectionLike>(con: &mut C) -> redis::RedisResult<()> {
    for (_, _, text) in TEXTS.iter() {
        Script::new(text).load_async(con).await?;
    }
    Ok(())
}
