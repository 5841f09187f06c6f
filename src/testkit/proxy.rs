//! A TCP proxy between clients and a Redis node that can lose replies, or hold requests, on
//! purpose (`sim`'s `--lose-replies` and `--partition-leader`, and tests of lost replies).
//!
//! It forwards every byte both ways. When told to ([`Proxy::lose_next_replies`]), each
//! connection is cut the moment Redis starts answering its next request: the request ran (and was
//! persisted), its reply never arrives. That is the riskiest window the protocol has — a fetch
//! that moved messages into an in-flight set, a commit that recorded outcomes, a lease renewal, a
//! `getErrors` trim, each without the caller knowing — and a fault injected from outside at a
//! random instant would almost never land in it. Both sides of a cut connection are closed, so
//! Redis sees the client gone exactly as after a crash. [`Proxy::cut_reply_to`] does the same to
//! the one request that carries given bytes (a script's SHA, say).
//!
//! It can also hold one connection's requests for a while ([`Proxy::hold`]): a network partition
//! of one copy. Its requests then reach Redis late, in order — a generator's `generate.lua` sent
//! before its lease expired arrives after a successor took over, the very case fencing is for.
//!
//! In front of a Redis Cluster node (the node announcing the proxy's port, so that every client
//! reaches it through the proxy), [`Proxy::scripts_only`] leaves alone the connections that never
//! sent a script call: the driver's own reads, replication links, subscriptions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Per-connection hold deadlines, keyed by the local port of the connection's upstream socket
/// (what Redis's `CLIENT LIST` shows as its `addr`).
type Holds = Arc<Mutex<HashMap<u16, Arc<Mutex<Option<Instant>>>>>>;

/// A one-shot cut: the bytes a request must contain, and whether its reply's first chunk is
/// delivered before the cut.
type CutOn = (Vec<u8>, bool);

/// The proxy; it stops (and closes every connection) on drop.
pub struct Proxy {
    port: u16,
    shared: Shared,
    task: JoinHandle<()>,
}

/// What the proxy and every pipe share.
#[derive(Clone)]
struct Shared {
    /// Where connections go; `None` until [`Proxy::set_upstream`] (connections are closed).
    upstream: Arc<Mutex<Option<SocketAddr>>>,
    /// Raised by `lose_next_replies`; a connection that sees it above the value it last acted on
    /// cuts itself at the next reply.
    armed: Arc<AtomicU64>,
    /// Only connections that sent a script call (`EVALSHA`/`EVAL`) lose replies.
    scripts_only: Arc<AtomicBool>,
    /// Bytes whose request's reply is to be cut (one-shot): see [`Proxy::cut_reply_to`]; with
    /// `true`, the reply is delivered first ([`Proxy::cut_after_reply_to`]).
    cut_on: Arc<Mutex<Option<CutOn>>>,
    /// Connections cut so far.
    cuts: Arc<AtomicU64>,
    /// Open connections' hold deadlines.
    holds: Holds,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let proxy = Proxy::bind().await?;
        proxy.set_upstream(upstream);
        Ok(proxy)
    }

    /// Listens on a free loopback port, forwarding nowhere yet: its port can be announced (a
    /// cluster node's `cluster-announce-port`) before the node it fronts runs.
    pub async fn bind() -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Shared {
            upstream: Arc::default(),
            armed: Arc::default(),
            scripts_only: Arc::default(),
            cut_on: Arc::default(),
            cuts: Arc::default(),
            holds: Arc::default(),
        };
        let task = tokio::spawn(serve(listener, shared.clone()));
        Ok(Proxy { port, shared, task })
    }

    /// Where new connections go from now on.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock().expect("upstream") = Some(upstream);
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL the copies use instead of Redis's own.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// From now on only connections that have sent a script call lose replies.
    pub fn scripts_only(&self) {
        self.shared.scripts_only.store(true, Ordering::SeqCst);
    }

    /// Every connection open now loses its next reply (and is closed).
    pub fn lose_next_replies(&self) {
        self.shared.armed.fetch_add(1, Ordering::SeqCst);
    }

    /// The next request that contains `bytes` (a script's SHA, say) loses its reply: its
    /// connection is cut the moment Redis starts answering after it was forwarded. One-shot.
    pub fn cut_reply_to(&self, bytes: &[u8]) {
        *self.shared.cut_on.lock().expect("cut_on") = Some((bytes.to_vec(), false));
    }

    /// Like [`Proxy::cut_reply_to`], but the first chunk of the reply is delivered before the
    /// connection is cut: the caller got its answer, and whatever it sends next on that
    /// connection is lost.
    pub fn cut_after_reply_to(&self, bytes: &[u8]) {
        *self.shared.cut_on.lock().expect("cut_on") = Some((bytes.to_vec(), true));
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::SeqCst)
    }

    /// Holds the requests of the connection whose upstream socket has local port `port` for
    /// `how_long`; they are forwarded, in order, afterwards. False when no such connection is
    /// open.
    pub fn hold(&self, port: u16, how_long: Duration) -> bool {
        let holds = self.shared.holds.lock().expect("holds");
        match holds.get(&port) {
            Some(until) => {
                *until.lock().expect("hold") = Some(Instant::now() + how_long);
                true
            }
            None => false,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections until aborted; each is piped by its own task (aborted with this one's
/// `JoinSet`).
async fn serve(listener: TcpListener, shared: Shared) {
    let mut pipes = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                pipes.spawn(pipe(client, shared.clone()));
            }
            Some(_) = pipes.join_next(), if !pipes.is_empty() => {}
        }
    }
}

/// True when `haystack` contains `needle` (ASCII case-insensitive when `fold`).
fn contains(haystack: &[u8], needle: &[u8], fold: bool) -> bool {
    !needle.is_empty()
        && haystack.windows(needle.len()).any(|w| {
            if fold {
                w.eq_ignore_ascii_case(needle)
            } else {
                w == needle
            }
        })
}

/// Forwards one client connection; returns when either side closes or the connection is cut.
async fn pipe(client: TcpStream, shared: Shared) {
    let upstream = *shared.upstream.lock().expect("upstream");
    let Some(upstream) = upstream else {
        return; // nothing to forward to yet: the client sees its connection closed
    };
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // Redis is down: the client sees its connection closed, as it would
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let Ok(local) = server.local_addr() else {
        return;
    };
    let hold = Arc::new(Mutex::new(None::<Instant>));
    shared
        .holds
        .lock()
        .expect("holds")
        .insert(local.port(), hold.clone());
    let mut acted_on = shared.armed.load(Ordering::SeqCst);
    // Set by the request side: this connection sent a script call; its next reply is to be cut.
    let scripted = AtomicBool::new(false);
    let cut_next = AtomicBool::new(false);
    let deliver_first = AtomicBool::new(false);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let sent = &buf[..n];
            if contains(sent, b"\r\nEVAL", true) {
                scripted.store(true, Ordering::SeqCst);
            }
            {
                let mut cut_on = shared.cut_on.lock().expect("cut_on");
                if let Some((bytes, after)) = cut_on.as_ref() {
                    if contains(sent, bytes, false) {
                        deliver_first.store(*after, Ordering::SeqCst);
                        cut_next.store(true, Ordering::SeqCst);
                        *cut_on = None;
                    }
                }
            }
            let until = *hold.lock().expect("hold");
            if let Some(until) = until {
                tokio::time::sleep_until(until.into()).await;
            }
            if server_write.write_all(sent).await.is_err() {
                return;
            }
        }
    };
    let replies = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let now = shared.armed.load(Ordering::SeqCst);
            let eligible =
                !shared.scripts_only.load(Ordering::SeqCst) || scripted.load(Ordering::SeqCst);
            let armed = now > acted_on && eligible;
            if armed || cut_next.load(Ordering::SeqCst) {
                acted_on = now;
                shared.cuts.fetch_add(1, Ordering::SeqCst);
                if !armed && deliver_first.load(Ordering::SeqCst) {
                    let _ = client_write.write_all(&buf[..n]).await;
                }
                return; // the reply is dropped; both sockets close when this pipe ends
            }
            if now > acted_on {
                acted_on = now; // not eligible for this round
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = requests => {}
        _ = replies => {}
    }
    shared.holds.lock().expect("holds").remove(&local.port());
}
