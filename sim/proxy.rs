//! A TCP proxy between the copies and Redis that can lose replies on purpose.
//!
//! It forwards every byte both ways. When told to ([`Proxy::lose_next_replies`]), each
//! connection is cut the moment Redis starts answering its next request: the request ran (and was
//! persisted), its reply never arrives. That is the riskiest window the protocol has — a fetch
//! that moved messages into an in-flight set, a commit that recorded outcomes, a lease renewal, a
//! `getErrors` trim, each without the caller knowing — and a fault injected from outside at a
//! random instant would almost never land in it. Both sides of a cut connection are closed, so
//! Redis sees the client gone exactly as after a crash.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The proxy; it stops (and closes every connection) on drop.
pub struct Proxy {
    port: u16,
    /// Raised by `lose_next_replies`; a connection that sees it above the value it last acted on
    /// cuts itself at the next reply.
    armed: Arc<AtomicU64>,
    /// Connections cut so far.
    cuts: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let armed = Arc::new(AtomicU64::new(0));
        let cuts = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(listener, upstream, armed.clone(), cuts.clone()));
        Ok(Proxy {
            port,
            armed,
            cuts,
            task,
        })
    }

    /// The URL the copies use instead of Redis's own.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Every connection open now loses its next reply (and is closed).
    pub fn lose_next_replies(&self) {
        self.armed.fetch_add(1, Ordering::SeqCst);
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections until aborted; each is piped by its own task (aborted with this one's
/// `JoinSet`).
async fn serve(
    listener: TcpListener,
    upstream: SocketAddr,
    armed: Arc<AtomicU64>,
    cuts: Arc<AtomicU64>,
) {
    let mut pipes = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                pipes.spawn(pipe(client, upstream, armed.clone(), cuts.clone()));
            }
            Some(_) = pipes.join_next(), if !pipes.is_empty() => {}
        }
    }
}

/// Forwards one client connection; returns when either side closes or the connection is cut.
async fn pipe(
    client: TcpStream,
    upstream: SocketAddr,
    armed: Arc<AtomicU64>,
    cuts: Arc<AtomicU64>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // Redis is down: the client sees its connection closed, as it would
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut acted_on = armed.load(Ordering::SeqCst);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = tokio::io::copy(&mut client_read, &mut server_write);
    let replies = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let now = armed.load(Ordering::SeqCst);
            if now > acted_on {
                acted_on = now;
                cuts.fetch_add(1, Ordering::SeqCst);
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
}
