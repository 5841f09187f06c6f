//! Connecting to Redis with a bound: a copy that cannot reach Redis says so and exits instead of
//! hanging, and a copy that loses Redis mid-run reconnects on its own (`ConnectionManager`).
//!
//! A [`RedisTarget`] is where Redis is and how to reach it: the URL (`redis://`, `rediss://` for
//! TLS, `unix://`), with a user and password if the deployment uses ACLs, and optional TLS files
//! (a private CA, a client certificate and key for mutual TLS). It never prints its password:
//! every message, log line and report shows [`redact`]ed URLs only.
//!
//! A Redis Cluster is named `redis+cluster://[user:password@]host:port[,host:port…]` (or
//! `rediss+cluster://` for TLS): seed nodes, from which redis-rs learns the slot map and follows
//! `MOVED`/`ASK` on its own. A namespace's keys all carry the hash tag `{ns}`, so they live in one
//! slot, on one master: [`Conn::pinned`] sends every command of a namespace there, also those with
//! no key (`CLIENT ID`, `INFO`, `TIME`, `SCAN`, `SCRIPT LOAD`), so the protocol runs on a cluster
//! exactly as on one Redis — a master failover in the cluster looks like a Redis restart to it.
//!
//! Failures that retrying cannot cure — a wrong password, a user without permission, a TLS
//! handshake refused — fail at once with [`Error::Auth`] or [`Error::Tls`] instead of retrying
//! for the whole connect bound.

use crate::error::Error;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The connection every task of a process shares (multiplexed, reconnecting, cheap to clone): to
/// one Redis, or to a Redis Cluster (see the module docs).
#[derive(Clone)]
pub struct Conn(Link, Option<Wait>);

/// `--wait-replicas`: after each script call, `WAIT` until this many replicas have every write
/// this connection made, or fail the call as if its reply were lost.
#[derive(Debug, Clone, Copy)]
struct Wait {
    replicas: u32,
    timeout_ms: u64,
}

#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster {
        con: ClusterConnection,
        /// The slot every command goes to (its master), once [`Conn::pinned`]; before that,
        /// redis-rs routes by key, and a command without a key goes to a random node.
        home: Option<u16>,
    },
}

impl Conn {
    /// This connection with every command sent to the master of the slot of `keys`' namespace
    /// (on one Redis, the same connection). Every part of a copy uses a pinned connection.
    pub fn pinned(self, keys: &crate::protocol::keys::Keys) -> Conn {
        match self.0 {
            Link::Cluster { con, .. } => Conn(
                Link::Cluster {
                    con,
                    home: Some(key_slot(keys.prefix().as_bytes())),
                },
                self.1,
            ),
            single => Conn(single, self.1),
        }
    }

    /// This connection with every script call (`EVALSHA`, `EVAL`) followed by `WAIT replicas
    /// timeout_ms` in the same pipeline, on the same connection: the call succeeds only once
    /// `replicas` replicas hold every write made so far, and otherwise fails as a connection
    /// error, i.e. as a call whose reply was lost (its effect unknown; every caller already copes
    /// with that). So whatever a copy acts on survives the failover of its master to one of those
    /// replicas (docs/PROTOCOL.md, "Durability"). 0 replicas: no `WAIT`.
    pub fn waiting_for(self, replicas: u32, timeout_ms: u64) -> Conn {
        let wait = (replicas > 0).then_some(Wait {
            replicas,
            timeout_ms,
        });
        Conn(self.0, wait)
    }

    fn send<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Link::Single(con) => con.req_packed_command(cmd),
            Link::Cluster {
                con,
                home: Some(slot),
            } => {
                let route = RoutingInfo::SingleNode(home_route(*slot));
                Box::pin(con.route_command(cmd.clone(), route))
            }
            Link::Cluster { con, home: None } => con.req_packed_command(cmd),
        }
    }

    /// True when connected to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.0, Link::Cluster { .. })
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let is_script = matches!(
            cmd.args_iter().next(),
            Some(redis::Arg::Simple(name)) if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL")
        );
        let Some(wait) = self.1.filter(|_| is_script) else {
            return self.send(cmd);
        };
        Box::pin(async move {
            // The script and its WAIT go as one pipeline, in one write on one connection, and
            // neither is ever sent again: a WAIT sent alone after a reconnect would be the first
            // command of a new connection, which Redis answers at once with every connected
            // replica, confirming nothing (issue 22). A reply of the pipeline that is lost is a
            // lost reply, like any other.
            let mut both = redis::pipe();
            both.add_command(cmd.clone())
                .cmd("WAIT")
                .arg(wait.replicas)
                .arg(wait.timeout_ms);
            let mut replies = self.req_packed_commands(&both, 0, 2).await?.into_iter();
            let (Some(reply), Some(answer)) = (replies.next(), replies.next()) else {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "a script with its WAIT did not get two replies",
                )));
            };
            // A script that failed (NOSCRIPT, a refusal) wrote nothing to confirm: its error
            // goes back as it is (redis-rs then loads the script on NOSCRIPT and calls again).
            if matches!(reply, Value::ServerError(_)) {
                return Ok(reply);
            }
            // Anything but enough replicas (fewer, an error reply, the slot's master gone)
            // leaves the write unconfirmed: a lost reply.
            let answer = match answer {
                Value::Int(acked) if acked >= i64::from(wait.replicas) => return Ok(reply),
                Value::Int(acked) => format!("reached {acked} of the {} replicas", wait.replicas),
                other => format!("got {other:?}"),
            };
            Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the write was not confirmed by --wait-replicas {} within {} ms (WAIT {answer}): treated as a lost reply",
                    wait.replicas, wait.timeout_ms
                ),
            )))
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Link::Single(con) => con.req_packed_commands(pipeline, offset, count),
            Link::Cluster {
                con,
                home: Some(slot),
            } => Box::pin(con.route_pipeline(pipeline.clone(), offset, count, home_route(*slot))),
            Link::Cluster { con, home: None } => con.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Link::Single(con) => con.get_db(),
            Link::Cluster { .. } => 0,
        }
    }
}

fn home_route(slot: u16) -> SingleNodeRoutingInfo {
    SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master))
}

/// The cluster hash slot of `key`, as Redis computes it: CRC16 (XMODEM) of the key's hash tag
/// (the part between the first `{` and the next `}`, when not empty), or of the whole key,
/// modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in tagged {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// How long one command may wait for its reply before it counts as failed. Generous: a loaded
/// Redis running a 1,000-message commit script answers in milliseconds, not seconds.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS files for a `rediss://` target, each PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// A CA to trust instead of the system's (a private CA).
    pub ca_cert: Option<PathBuf>,
    /// This client's certificate, for mutual TLS (with `key`).
    pub cert: Option<PathBuf>,
    /// This client's private key, for mutual TLS (with `cert`).
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    fn is_empty(&self) -> bool {
        self.ca_cert.is_none() && self.cert.is_none() && self.key.is_none()
    }
}

/// Where Redis is and how to reach it. Its `Debug` shows the URL redacted.
#[derive(Clone)]
pub struct RedisTarget {
    /// The URL as given, password included: only ever handed to redis-rs.
    url: String,
    /// Parsed from `url`, without redis-rs's `CLIENT SETINFO` on connect (one command fewer
    /// for a least-privilege ACL user, and one round trip fewer per connection).
    info: redis::ConnectionInfo,
    /// The TLS material read from [`TlsFiles`] (read once, at start-up).
    tls: Option<redis::TlsCertificates>,
    /// For a `redis+cluster://` URL, every seed node (`info` is the first).
    cluster: Option<Vec<redis::ConnectionInfo>>,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &redact(&self.url))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl RedisTarget {
    /// A target without extra TLS files (a `rediss://` URL still uses TLS, trusting the system's
    /// CAs).
    pub fn new(url: &str) -> Result<RedisTarget, Error> {
        RedisTarget::with_tls(url, &TlsFiles::default())
    }

    /// A target with TLS files. Refuses (naming the flag or file) TLS files with a non-TLS URL,
    /// a certificate without its key or the reverse, and unreadable files.
    pub fn with_tls(url: &str, files: &TlsFiles) -> Result<RedisTarget, Error> {
        let parse = |one: &str| {
            let parsed = redis::IntoConnectionInfo::into_connection_info(one)
                .map_err(|e| Error::Config(format!("bad redis url {}: {e}", redact(url))))?;
            let settings = parsed.redis_settings().clone().set_skip_set_lib_name();
            Ok::<_, Error>(parsed.set_redis_settings(settings))
        };
        let cluster = match cluster_seeds(url)? {
            Some(seeds) => Some(
                seeds
                    .iter()
                    .map(|s| parse(s))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        let parsed = match &cluster {
            Some(seeds) => seeds[0].clone(),
            None => parse(url)?,
        };
        if files.is_empty() {
            return Ok(RedisTarget {
                url: url.to_string(),
                info: parsed,
                tls: None,
                cluster,
            });
        }
        if !matches!(parsed.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            return Err(Error::Config(format!(
                "--tls-ca-cert, --tls-cert and --tls-key need a rediss:// URL, not {}",
                redact(url)
            )));
        }
        let read = |flag: &str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| Error::Config(format!("{flag} {}: {e}", path.display())))
        };
        let client_tls = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read("--tls-cert", cert)?,
                client_key: read("--tls-key", key)?,
            }),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "--tls-cert and --tls-key go together (mutual TLS needs both)".into(),
                ))
            }
        };
        let root_cert = match &files.ca_cert {
            Some(ca) => Some(read("--tls-ca-cert", ca)?),
            None => None,
        };
        Ok(RedisTarget {
            url: url.to_string(),
            info: parsed,
            tls: Some(redis::TlsCertificates {
                client_tls,
                root_cert,
            }),
            cluster,
        })
    }

    /// True for a `redis+cluster://` (or `rediss+cluster://`) target.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The URL without its password, for messages.
    pub fn redacted(&self) -> String {
        redact(&self.url)
    }

    /// A redis-rs client for this target (for a cluster: its first seed node; the wake-up
    /// channel subscribes there, and a cluster delivers a `PUBLISH` to every node).
    pub fn client(&self) -> Result<redis::Client, Error> {
        let built = match &self.tls {
            Some(certs) => redis::Client::build_with_tls(self.info.clone(), certs.clone()),
            None => redis::Client::open(self.info.clone()),
        };
        built.map_err(|e| Error::Config(format!("bad redis url {}: {e}", self.redacted())))
    }
}

/// Connects to `url` (no TLS files): [`connect_to`] for tests, benches and tools.
pub async fn connect(url: &str, connect_timeout_ms: u64) -> Result<Conn, Error> {
    connect_to(&RedisTarget::new(url)?, connect_timeout_ms).await
}

/// Connects and PINGs, retrying with exponential backoff (50 ms doubling to 1 s) until
/// `connect_timeout_ms` has passed; then fails with [`Error::Unreachable`]. A refused password
/// or permission, or a failed TLS handshake, fails at once ([`Error::Auth`], [`Error::Tls`]).
pub async fn connect_to(target: &RedisTarget, connect_timeout_ms: u64) -> Result<Conn, Error> {
    let client = target.client()?;
    let started = Instant::now();
    let bound = Duration::from_millis(connect_timeout_ms);
    let mut delay = Duration::from_millis(50);
    let mut attempts = 0u32;
    // The most telling error seen: a later attempt cut short by the bound says only "timed out".
    let mut telling: Option<String> = None;
    loop {
        attempts += 1;
        let left = bound
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(10));
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(left.min(Duration::from_secs(2))))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            // Reconnection attempts after a drop. A `ConnectionManager` never re-sends a
            // request: one whose connection dropped fails to its caller (outcome unknown).
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let attempt = async {
            let mut con = match &target.cluster {
                None => Conn(
                    Link::Single(ConnectionManager::new_with_config(client.clone(), config).await?),
                    None,
                ),
                Some(seeds) => {
                    // No retries: redis-rs's cluster client re-sends a request whose
                    // connection dropped, and a script that already ran would run twice (an
                    // allocate.lua re-sent lost ids for good: issue 22). Every error, a redirect
                    // included, goes to the caller, for whom a connection error means "outcome
                    // unknown", as on one Redis; the slot map is refreshed all the same.
                    let mut builder = redis::cluster::ClusterClientBuilder::new(seeds.clone())
                        .connection_timeout(left.min(Duration::from_secs(2)))
                        .response_timeout(RESPONSE_TIMEOUT)
                        .retries(0);
                    if let Some(certs) = &target.tls {
                        builder = builder.certs(certs.clone());
                    }
                    let con = builder.build()?.get_async_connection().await?;
                    Conn(Link::Cluster { con, home: None }, None)
                }
            };
            redis::cmd("PING").query_async::<String>(&mut con).await?;
            Ok::<_, redis::RedisError>(con)
        };
        let last = match tokio::time::timeout(left, attempt).await {
            Ok(Ok(con)) => return Ok(con),
            Ok(Err(e)) => {
                if let Some(fatal) = refusal(&e, target) {
                    return Err(fatal);
                }
                let text = e.to_string();
                telling = Some(text.clone());
                text
            }
            Err(_) => telling.clone().unwrap_or_else(|| "timed out".to_string()),
        };
        if started.elapsed() + delay >= bound {
            let last = redact_all(&last);
            let last = if last.contains("lookup address") {
                format!("cannot resolve the host name ({last})")
            } else {
                last
            };
            return Err(Error::Unreachable {
                url: target.redacted(),
                attempts,
                waited_ms: started.elapsed().as_millis() as u64,
                last,
            });
        }
        tracing::debug!(attempt = attempts, error = %redact_all(&last), "redis not reachable yet");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// A connection error that retrying cannot cure, as the error to fail with at once.
fn refusal(e: &redis::RedisError, target: &RedisTarget) -> Option<Error> {
    let text = redact_all(&e.to_string());
    let code = e.code().unwrap_or_default();
    if text.contains("DB index is out of range") {
        return Some(Error::Config(format!(
            "{}: that database number does not exist on this server ({text})",
            target.redacted()
        )));
    }
    if e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(code, "WRONGPASS" | "NOAUTH" | "NOPERM")
    {
        return Some(Error::Auth(format!(
            "{} refused this client: {text}",
            target.redacted()
        )));
    }
    let lower = text.to_lowercase();
    let tls_words = [
        "certificate",
        "handshake",
        "tls",
        "alert",
        "peer sent no certificates",
    ];
    if target.redacted().starts_with("rediss://") && tls_words.iter().any(|w| lower.contains(w)) {
        return Some(Error::Tls(format!(
            "TLS with {} failed: {text}",
            target.redacted()
        )));
    }
    None
}

/// The seed node URLs of a `redis+cluster://[user:password@]host:port[,host:port…][/]` URL
/// (`rediss+cluster://` for TLS), each as `redis://[user:password@]host:port`; `None` for any
/// other URL.
fn cluster_seeds(url: &str) -> Result<Option<Vec<String>>, Error> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return Ok(None);
    };
    let rest = rest.trim_end_matches('/');
    let (user, hosts) = match rest.rsplit_once('@') {
        Some((user, hosts)) => (format!("{user}@"), hosts),
        None => (String::new(), rest),
    };
    let seeds: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{user}{h}"))
        .collect();
    if seeds.is_empty() || hosts.contains('/') || hosts.contains('?') {
        return Err(Error::Config(format!(
            "bad cluster url {}: expected {scheme}+cluster://[user:password@]host:port[,host:port…] (a cluster has no database number)",
            redact(url)
        )));
    }
    Ok(Some(seeds))
}

/// The URL without its password, for messages: `scheme://user:password@host` keeps only the
/// scheme and host, and a `password=` or `pass=` query parameter (unix sockets) is masked.
pub fn redact(url: &str) -> String {
    // The credentials end at the last '@' of the authority, which ends at the first '/' or '?'
    // after the scheme (a unix socket's has none: `unix:///path?pass=a@b` has no user part, and
    // an '@' in its query is the password's).
    let authority = url.find("://").map(|s| {
        let rest = &url[s + 3..];
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        (s, &rest[..end])
    });
    let mut out = match authority {
        Some((s, auth)) => match auth.rfind('@') {
            Some(at) => format!("{}***{}", &url[..s + 3], &url[s + 3 + at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    };
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let masked: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if matches!(k, "pass" | "password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{head}{}", masked.join("&"));
    }
    out
}

/// `text` with every URL in it [`redact`]ed (error messages may quote the URL).
pub fn redact_all(text: &str) -> String {
    text.split(' ')
        .map(|word| {
            if word.contains("://") {
                redact(word)
            } else {
                word.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_credentials() {
        assert_eq!(redact("redis://u:pw@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact("rediss://:pw@h:1"), "rediss://***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        assert_eq!(
            redact("unix:///run/redis.sock?db=2&pass=secret&user=alice"),
            "unix:///run/redis.sock?db=2&pass=***&user=alice"
        );
        assert_eq!(
            redact_all("connecting to redis://a:b@h:1 failed"),
            "connecting to redis://***@h:1 failed"
        );
        // Issue 23: a unix socket's password with an '@' in it leaked its tail.
        assert_eq!(
            redact("unix:///run/redis.sock?user=u&pass=Pa@Zq9SeCrEt77"),
            "unix:///run/redis.sock?user=u&pass=***"
        );
        assert_eq!(
            redact("redis://u:p@ss@h:1/0?x=a@b"),
            "redis://***@h:1/0?x=a@b"
        );
    }

    #[test]
    fn tls_files_are_checked_before_any_connection() {
        let files = TlsFiles {
            ca_cert: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        };
        let plain = RedisTarget::with_tls("redis://h:1", &files).unwrap_err();
        assert!(plain.to_string().contains("rediss://"), "{plain}");
        let missing = RedisTarget::with_tls("rediss://h:1", &files).unwrap_err();
        assert!(missing.to_string().contains("--tls-ca-cert"), "{missing}");
        let half = TlsFiles {
            cert: Some("/x".into()),
            ..TlsFiles::default()
        };
        let half = RedisTarget::with_tls("rediss://h:1", &half).unwrap_err();
        assert!(half.to_string().contains("go together"), "{half}");
        let t = RedisTarget::new("redis://alice:s3cret@h:1").unwrap();
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
