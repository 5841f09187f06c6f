//! A TCP proxy between the copies and Redis that can lose replies, or hold requests, on purpose.
//!
//! It forwards every byte both ways. When told to ([`Proxy::lose_next_replies`]), each
//! connection is cut the moment Redis starts answering its next request: the request ran (and was
//! persisted), its reply never arrives. That is the riskiest window the protocol has — a fetch
//! that moved messages into an in-flight set, a commit that recorded outcomes, a lease renewal, a
//! `getErrors` trim, each without the caller knowing — and a fault injected from outside at a
//! random instant would almost never land in it. Both sides of a cut connection are closed, so
//! Redis sees the client gone exactly as after a crash.
//!
//! It can also hold one connection's requests for a while ([`Proxy::hold`]): a network partition
//! of one copy. Its requests then reach Redis late, in order — a generator's `generate.lua` sent
//! before its lease expired arrives after a successor took over, the very case fencing is for.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Per-connection hold deadlines, keyed by the local port of the connection's upstream socket
/// (what Redis's `CLIENT LIST` shows as its `addr`).
type Holds = Arc<Mutex<HashMap<u16, Arc<Mutex<Option<Instant>>>>>>;

/// The proxy; it stops (and closes every connection) on drop.
pub struct Proxy {
    port: u16,
    shared: Shared,
    task: JoinHandle<()>,
}

/// What the proxy and every pipe share.
#[derive(Clone)]
struct Shared {
    upstream: SocketAddr,
    /// Raised by `lose_next_replies`; a connection that sees it above the value it last acted on
    /// cuts itself at the next reply.
    armed: Arc<AtomicU64>,
    /// Connections cut so far.
    cuts: Arc<AtomicU64>,
    /// Open connections' hold deadlines.
    holds: Holds,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Shared {
            upstream,
            armed: Arc::default(),
            cuts: Arc::default(),
            holds: Arc::default(),
        };
        let task = tokio::spawn(serve(listener, shared.clone()));
        Ok(Proxy { port, shared, task })
    }

    /// The URL the copies use instead of Redis's own.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Every connection open now loses its next reply (and is closed).
    pub fn lose_next_replies(&self) {
        self.shared.armed.fetch_add(1, Ordering::SeqCst);
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

/// Forwards one client connection; returns when either side closes or the connection is cut.
async fn pipe(client: TcpStream, shared: Shared) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
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
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let until = *hold.lock().expect("hold");
            if let Some(until) = until {
                tokio::time::sleep_until(until.into()).await;
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
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
            if now > acted_on {
                acted_on = now;
                shared.cuts.fetch_add(1, Ordering::SeqCst);
                return; // the reply is dropped; both sockets close when this pipe ends
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
