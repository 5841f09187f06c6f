//! The library's error type: Redis failures kept apart from the domain's own refusals, so the
//! binaries can map each class to its own exit code.

/// Everything the library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Redis command or script failed (connection, protocol, or a script's `error_reply`).
    #[error(transparent)]
    Redis(redis::RedisError),
    /// Redis lost data this copy relied on (wiped, restarted empty, restored from an older copy),
    /// or another copy saw that and halted the namespace: nothing more may be generated or
    /// recorded until an operator decides (README, "When Redis forgets").
    #[error("redis lost data: {0}")]
    RedisForgot(String),
    /// A counter that must never be reset (next id, epoch, max) holds something other than a
    /// non-negative integer: the group halts instead of guessing, and `app repair` recomputes it.
    #[error(
        "redis holds damaged data: {0}; run `app repair` (see README, \"When Redis forgets\")"
    )]
    Damaged(String),
    /// Redis could not be reached within the configured bound.
    #[error("redis at {url} unreachable after {attempts} attempts over {waited_ms} ms: {last}")]
    Unreachable {
        /// The URL, with any password removed.
        url: String,
        /// How many connection attempts were made.
        attempts: u32,
        /// How long we kept trying.
        waited_ms: u64,
        /// The last error seen.
        last: String,
    },
    /// Redis refused this client's credentials or permissions (wrong password, unknown user, an
    /// ACL that denies a command the protocol needs). Not retried.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The TLS handshake with Redis failed (untrusted certificate, missing client certificate).
    /// Not retried.
    #[error("{0}")]
    Tls(String),
    /// Redis refused a write because it reached `maxmemory` (with `noeviction`). Retried while it
    /// lasts (getErrors frees memory, an operator may raise the limit); an error past the bound.
    #[error("redis is out of memory (maxmemory reached; writes refused): {0}. Drain the error store with `app getErrors`, or raise maxmemory")]
    OutOfMemory(String),
    /// A flag or setting that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The message source failed in a way retrying cannot cure (a payload over the size limit).
    #[error("the message source: {0}")]
    Source(String),
    /// Data in Redis that breaks the protocol and cannot be quarantined (e.g. a non-integer counter).
    #[error("corrupt data in redis: {0}")]
    Corrupt(String),
    /// `getErrors` lost its drain lock to another `getErrors` (nothing is lost: the other one prints).
    #[error(
        "another getErrors holds the error drain and made no progress for longer than its lock's TTL (or took ours over); nothing was lost, run it again"
    )]
    DrainLockLost,
    /// A task of the process panicked or was cancelled unexpectedly.
    #[error("internal task failure: {0}")]
    Task(String),
    /// Writing to stdout failed (e.g. a closed pipe) before the entries were deleted.
    #[error("writing the errors out failed: {0}")]
    Output(#[from] std::io::Error),
}

impl From<redis::RedisError> for Error {
    /// A guarded script's `FORGOTTEN` refusal becomes [`Error::RedisForgot`], a missing ACL
    /// permission [`Error::Auth`] naming the command; anything else stays a Redis error.
    fn from(e: redis::RedisError) -> Error {
        if let Some(why) = permission_refused(&e) {
            return Error::Auth(why);
        }
        if e.code() == Some("FORGOTTEN") {
            return Error::RedisForgot(e.detail().unwrap_or("(no detail)").to_string());
        }
        if e.code() == Some("OOM") {
            return Error::OutOfMemory(e.to_string());
        }
        if e.code() == Some("DAMAGED") {
            return Error::Damaged(e.detail().unwrap_or("(no detail)").to_string());
        }
        Error::Redis(e)
    }
}

/// Redis refused a command for want of an ACL permission: why, naming the command. A plain
/// command's refusal (`NOPERM`) names it; a script's ("The user executing the script can't run
/// this command or subcommand script: <sha>, on @user_script:<line>") names only the script's
/// line, so the command is read off that line of our own script.
fn permission_refused(e: &redis::RedisError) -> Option<String> {
    let text = crate::conn::redact_all(&e.to_string());
    if e.code() == Some("NOPERM")
        || text.contains("NOPERM")
        || text.contains("no permissions to run")
    {
        return Some(format!(
            "Redis refused a command for want of an ACL permission: {text}"
        ));
    }
    let at = text.find("can't run this command or subcommand")?;
    let tail = &text[at..];
    let sha = tail
        .split("script: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("")
        .trim();
    let line = tail.split("@user_script:").nth(1).and_then(|s| {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<usize>()
            .ok()
    });
    let what = match line.and_then(|l| crate::protocol::scripts::command_at(sha, l)) {
        Some((script, command)) => format!(
            "the ACL user may not run {} (called by {script}); grant +{} (README, \"TLS, ACL users, secrets\")",
            command.to_uppercase(),
            command.to_lowercase()
        ),
        None => "the ACL user may not run a command one of our scripts calls (README, \"TLS, ACL users, secrets\", lists them all)".into(),
    };
    Some(format!("{what}: {text}"))
}

impl Error {
    /// True for what no retry can cure and every copy must stop for: Redis lost data, or a
    /// counter that must never be reset is damaged. The copy halts the group (README, "When
    /// Redis forgets").
    pub fn halts_the_group(&self) -> bool {
        matches!(self, Error::RedisForgot(_) | Error::Damaged(_))
    }

    /// True for what stops this copy at once, whatever loop meets it: what halts the group,
    /// and what no retry cures here (a refused permission or TLS, a setting that cannot work).
    pub fn stops_the_copy(&self) -> bool {
        self.halts_the_group() || matches!(self, Error::Auth(_) | Error::Tls(_) | Error::Config(_))
    }

    /// True when retrying later can succeed: Redis unreachable, or a server state that passes
    /// (loading its dataset after a restart, failing over).
    pub fn is_transient(&self) -> bool {
        self.is_connection()
            || matches!(self, Error::OutOfMemory(_))
            // NOSCRIPT: the script did not run. A cluster node restarted or promoted has an empty
            // script cache, and redis-rs's one reload can land on another node while the slot
            // map changes (seen under `sim --kill-master`): the next try loads it again.
            || matches!(self, Error::Redis(e) if matches!(e.code(), Some("LOADING" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN" | "READONLY" | "NOSCRIPT")))
    }

    /// True when the error is Redis being unreachable rather than refusing something: the reply
    /// to a command sent may have been lost, so its effect is unknown.
    pub fn is_connection(&self) -> bool {
        match self {
            Error::Unreachable { .. } => true,
            // A cluster redirect or a cluster without a master for the slot (a failover under
            // way, seen under `sim --kill-master`): the command may or may not have run on a
            // master that is now gone, so its effect is as unknown as a lost reply's.
            Error::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || e.is_cluster_error()
                    || e.code() == Some("MASTERDOWN")
                    // The cluster client has no connection to the node right now (it reconnects
                    // in the background after a drop, and re-sends nothing on its own).
                    || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
            }
            _ => false,
        }
    }
}
