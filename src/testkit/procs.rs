//! Local processes that tests, benches and `sim` start: a throwaway `redis-server` and `app`
//! copies. Each is a guard that SIGKILLs and reaps its process on drop, so a failing test or a
//! panicking `sim` leaves nothing running.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Sends `signal` to `pid` (SIGKILL, SIGTERM, SIGSTOP, SIGCONT).
pub fn signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: kill(2) has no memory effects; a stale pid yields ESRCH, reported as an error.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A `redis-server` on a free loopback port, in its own temp dir, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// The extra arguments it was started with (a restart uses them again).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a throwaway server (no persistence).
    pub fn start() -> std::io::Result<RedisServer> {
        Self::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// Starts a throwaway server (no persistence) on a copy of the RDB snapshot `rdb`: what a
    /// Redis restored from that backup holds.
    pub fn start_from_rdb(rdb: &Path) -> std::io::Result<RedisServer> {
        Self::start_in(&["--save", "", "--appendonly", "no"], |dir| {
            std::fs::copy(rdb, dir.join("dump.rdb")).map(|_| ())
        })
    }

    /// Starts a server with extra `redis-server` arguments (e.g. AOF settings).
    pub fn start_with(extra: &[&str]) -> std::io::Result<RedisServer> {
        Self::start_in(extra, |_| Ok(()))
    }

    /// Starts a server with `extra` arguments after `prepare` has run on its fresh directory.
    fn start_in(
        extra: &[&str],
        prepare: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> std::io::Result<RedisServer> {
        let dir = tempfile::Builder::new()
            .prefix("leaderq-redis-")
            .tempdir()?;
        prepare(dir.path())?;
        let mut last = None;
        // A free port can be taken between our probe and the server's bind: try a few.
        for _ in 0..5 {
            let port = free_port()?;
            match Self::spawn_on(dir.path(), port, extra) {
                Ok(child) => {
                    let extra = extra.iter().map(|s| s.to_string()).collect();
                    return Ok(RedisServer {
                        child,
                        port,
                        dir,
                        extra,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("redis-server did not start")))
    }

    fn spawn_on(dir: &Path, port: u16, extra: &[&str]) -> std::io::Result<Child> {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(dir)
            .args(["--logfile", "redis.log", "--daemonize", "no"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    std::io::Error::new(
                        e.kind(),
                        "redis-server not found on PATH; install it (Debian/Ubuntu: apt-get install -y redis-server)",
                    )
                } else {
                    e
                }
            })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "redis-server exited at start: {status}"
                )));
            }
            if ping(port) {
                return Ok(child);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(std::io::Error::other(
            "redis-server did not answer PING within 10 s",
        ))
    }

    /// SIGKILLs the server and starts it again on the same port and directory (so an AOF, if
    /// configured, is replayed): a crash and recovery of Redis itself. Returns whether the AOF had
    /// to be repaired first.
    ///
    /// A SIGKILL can land in the middle of the AOF write of a script's effects (a `MULTI` block).
    /// Started with `aof-load-truncated no`, Redis then refuses to load the file, and this does
    /// what the operator should: `redis-check-aof --fix`, which cuts the file before the
    /// incomplete `MULTI`, then starts Redis again. (With `aof-load-truncated yes`, Redis 7.0
    /// cuts only the torn command and leaves the `MULTI` open, so the next restart replays the
    /// torn script's first writes inside the following transaction: valkey-io/valkey#4342.)
    pub fn crash_and_restart(&mut self) -> std::io::Result<bool> {
        self.crash_and_restart_with(|_| Ok(()))
    }

    /// Like [`RedisServer::crash_and_restart`], with `prepare` run on the server's directory
    /// while it is down: e.g. to put an older snapshot in place (a restore from backup).
    pub fn crash_and_restart_with(
        &mut self,
        prepare: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> std::io::Result<bool> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        prepare(self.dir.path())?;
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let mut last = None;
        let mut repaired = false;
        // The port is free again once the process is reaped; retry briefly in case of TIME_WAIT.
        for _ in 0..50 {
            match Self::spawn_on(self.dir.path(), self.port, &extra) {
                Ok(child) => {
                    self.child = child;
                    return Ok(repaired);
                }
                Err(e) if !repaired && self.aof_needs_repair() => {
                    self.repair_aof()?;
                    repaired = true;
                    last = Some(e);
                    continue;
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("redis-server did not restart")))
    }

    /// True when the server's last start ended in refusing a truncated AOF.
    fn aof_needs_repair(&self) -> bool {
        let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
        let refused = log.rfind("Unexpected end of file reading the append only file");
        let ready = log.rfind("Ready to accept connections");
        match (refused, ready) {
            (Some(r), Some(s)) => r > s,
            (Some(_), None) => true,
            _ => false,
        }
    }

    /// Runs `redis-check-aof --fix` on the server's AOF (multi-part manifest or single file).
    fn repair_aof(&self) -> std::io::Result<()> {
        let manifest = self
            .dir
            .path()
            .join("appendonlydir/appendonly.aof.manifest");
        let target = if manifest.exists() {
            manifest
        } else {
            self.dir.path().join("appendonly.aof")
        };
        let mut child = Command::new("redis-check-aof")
            .arg("--fix")
            .arg(&target)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        // It asks before it truncates.
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"y\n");
        }
        let status = child.wait()?;
        if !status.success() {
            return Err(std::io::Error::other(format!(
                "redis-check-aof --fix {} failed: {status}",
                target.display()
            )));
        }
        Ok(())
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's working directory (its log and any AOF live there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILLs the server and reaps it (a crash: nothing flushed). Harmless when it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local Redis Cluster of `masters` masters, each with `replicas_per_master` replicas (none with
/// [`RedisCluster::start`]), each node a [`RedisServer`] killed on drop (a node killed by
/// [`RedisCluster::kill_node`] too: killing a reaped process again is harmless), the 16384 slots
/// split evenly among the masters in order.
#[derive(Debug)]
pub struct RedisCluster {
    /// Every node started: the masters in slot order, then the replicas (replica `k` of master
    /// `i` at `masters + i * replicas_per_master + k`). A failover changes roles, not positions.
    nodes: Vec<RedisServer>,
    /// How many nodes were started as masters (the first ones in `nodes`).
    masters: usize,
    /// Nodes SIGKILLed by [`RedisCluster::kill_node`] and not restarted since.
    dead: Vec<bool>,
    /// The client port each node announces, when not its own (a proxy in front of it): what
    /// `CLUSTER NODES` and `CLUSTER SLOTS` show, and so what every client connects to.
    announced: Vec<Option<u16>>,
}

/// How long a cluster may take to form (meet, replicate, sync) at start.
const CLUSTER_FORM_MAX: Duration = Duration::from_secs(30);

/// `cluster-node-timeout` without replicas: nothing fails over, so only the slowness that marks a
/// node failing matters.
const NODE_TIMEOUT_MS: u64 = 2000;

/// `cluster-node-timeout` with replicas: a killed master is flagged failing after this long, and
/// its replica promoted about 0.5-1 s later. 1 s leaves a busy node (a long script, a 2-core
/// machine shared with the copies) ample time to answer the cluster bus's pings, so nothing fails
/// over that was not killed.
const NODE_TIMEOUT_WITH_REPLICAS_MS: u64 = 1000;

impl RedisCluster {
    /// Starts `masters` (≥ 1) cluster-enabled servers, assigns the slots, introduces the nodes
    /// to each other (`CLUSTER MEET`) and waits (bounded, 30 s) until every node says
    /// `cluster_state:ok` and knows all the others.
    pub fn start(masters: usize) -> std::io::Result<RedisCluster> {
        Self::start_with_replicas(masters, 0)
    }

    /// Like [`RedisCluster::start`], with `replicas_per_master` replicas of each master: each is
    /// introduced like a master, then made a replica (`CLUSTER REPLICATE <master id>`), and the
    /// wait (bounded, 30 s) also covers every replica being in sync (its master lists it
    /// `state=online`) and known as a replica by every node (a master votes only for a node it
    /// knows as the replica of the failed one). With replicas the node timeout is
    /// 1,000 ms, so a killed master's replica is promoted within ~2-3 s.
    pub fn start_with_replicas(
        masters: usize,
        replicas_per_master: usize,
    ) -> std::io::Result<RedisCluster> {
        Self::start_fronted(masters, replicas_per_master, &[], |_, _| Ok(()))
    }

    /// Like [`RedisCluster::start_with_replicas`], each node `i` with an entry in `announce`
    /// announcing that port to clients (`cluster-announce-port`) instead of its own: a proxy in
    /// front of it ([`crate::testkit::proxy::Proxy`]), so that every client, which learns node
    /// addresses from `CLUSTER SLOTS`, goes through it. `started(i, port)` is called as soon as
    /// node `i` answers on its own `port`, before the cluster forms (replicas reach their
    /// masters at the announced address): the place to point the proxy at it.
    pub fn start_fronted(
        masters: usize,
        replicas_per_master: usize,
        announce: &[u16],
        mut started: impl FnMut(usize, u16) -> std::io::Result<()>,
    ) -> std::io::Result<RedisCluster> {
        if masters == 0 {
            return Err(std::io::Error::other("a cluster needs at least one master"));
        }
        let total = masters * (1 + replicas_per_master);
        let timeout_ms = if replicas_per_master > 0 {
            NODE_TIMEOUT_WITH_REPLICAS_MS
        } else {
            NODE_TIMEOUT_MS
        }
        .to_string();
        let mut nodes = Vec::with_capacity(total);
        let mut buses = Vec::with_capacity(total);
        for i in 0..total {
            // The cluster bus gets its own free port (the default, port + 10000, may not exist).
            let bus = free_port()?.to_string();
            buses.push(bus.clone());
            let announce_args: Vec<String> = match announce.get(i) {
                Some(port) => vec![
                    "--cluster-announce-port".into(),
                    port.to_string(),
                    "--cluster-announce-bus-port".into(),
                    bus.clone(),
                ],
                None => Vec::new(),
            };
            let mut args: Vec<&str> = vec![
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &timeout_ms,
                "--cluster-port",
                &bus,
                "--save",
                "",
                "--appendonly",
                "no",
                // A replica (re)joining gets its full copy at once, not after the 5 s default
                // wait for more replicas to share the transfer.
                "--repl-diskless-sync-delay",
                "0",
            ];
            args.extend(announce_args.iter().map(String::as_str));
            let node = RedisServer::start_with(&args)?;
            started(i, node.port())?;
            nodes.push(node);
        }
        let cluster = RedisCluster {
            nodes,
            masters,
            dead: vec![false; total],
            announced: (0..total).map(|i| announce.get(i).copied()).collect(),
        };
        for i in 0..masters {
            let (lo, hi) = cluster.range(i);
            cli(
                cluster.nodes[i].port(),
                &["CLUSTER", "ADDSLOTSRANGE", &lo.to_string(), &hi.to_string()],
            )?;
        }
        for (node, bus) in cluster.nodes.iter().zip(&buses).skip(1) {
            let port = node.port().to_string();
            cli(
                cluster.nodes[0].port(),
                &["CLUSTER", "MEET", "127.0.0.1", &port, bus],
            )?;
        }
        let deadline = Instant::now() + CLUSTER_FORM_MAX;
        let known = format!("cluster_known_nodes:{total}");
        let knows_all = |port: u16| {
            cli(port, &["CLUSTER", "INFO"])
                .is_ok_and(|info| info.lines().any(|l| l.trim() == known))
        };
        if replicas_per_master > 0 {
            // CLUSTER REPLICATE needs the replica to know its master already.
            cluster.wait_until(deadline, "every node to know every other", || {
                cluster.nodes.iter().all(|n| knows_all(n.port()))
            })?;
            for i in 0..masters {
                let id = cli(cluster.nodes[i].port(), &["CLUSTER", "MYID"])?;
                for k in 0..replicas_per_master {
                    let replica = &cluster.nodes[masters + i * replicas_per_master + k];
                    cli(replica.port(), &["CLUSTER", "REPLICATE", id.trim()])?;
                }
            }
        }
        let replicas = masters * replicas_per_master;
        cluster.wait_until(
            deadline,
            "cluster_state:ok with every replica in sync",
            || {
                cluster.nodes.iter().all(|n| {
                    let view = cluster_view(n.port()).unwrap_or_default();
                    cluster_ok(n.port())
                        && knows_all(n.port())
                        && view.iter().filter(|v| !v.master).count() == replicas
                }) && cluster.nodes[..masters]
                    .iter()
                    .all(|m| online_replicas(m.port()) >= replicas_per_master)
            },
        )?;
        Ok(cluster)
    }

    /// Polls `ready` every 100 ms until it holds; an error naming `what` past `deadline`.
    fn wait_until(
        &self,
        deadline: Instant,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> std::io::Result<()> {
        loop {
            if ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "the local Redis Cluster: no {what} within {CLUSTER_FORM_MAX:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The slots master `i` was given at start, `lo..=hi`.
    fn range(&self, i: usize) -> (usize, usize) {
        let per = 16384 / self.masters;
        let lo = i * per;
        (
            lo,
            if i + 1 == self.masters {
                16383
            } else {
                lo + per - 1
            },
        )
    }

    /// Which of the start's slot ranges `slot` is in: the index, in slot order, of the master
    /// it was given to (and of that master's entry in [`RedisCluster::nodes`]).
    pub fn slot_range(&self, slot: u16) -> usize {
        (0..self.masters)
            .find(|&i| usize::from(slot) <= self.range(i).1)
            .unwrap_or(self.masters - 1)
    }

    /// `redis+cluster://127.0.0.1:<port>,…`: every node as a seed (at the port it announces).
    pub fn url(&self) -> String {
        let seeds: Vec<String> = (0..self.nodes.len())
            .map(|i| format!("127.0.0.1:{}", self.client_port(i)))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The nodes started as masters, in slot order (a failover may since have made one a
    /// replica, or killed it).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes[..self.masters]
    }

    /// Node `idx` of all those started (masters first, then replicas).
    pub fn node(&self, idx: usize) -> &RedisServer {
        &self.nodes[idx]
    }

    /// The node that serves `slot` as a master, as the first live node sees it (its index among
    /// all nodes started); an error when that node knows of no live master for it.
    pub fn master_of(&self, slot: u16) -> std::io::Result<usize> {
        let asked = self
            .live()
            .next()
            .ok_or_else(|| std::io::Error::other("no live node in the cluster"))?;
        self.master_in_view(asked, slot)?.ok_or_else(|| {
            std::io::Error::other(format!(
                "node {} knows no live master for slot {slot}",
                self.nodes[asked].port()
            ))
        })
    }

    /// The live master that node `asked` says serves `slot` (not flagged failing), if any.
    fn master_in_view(&self, asked: usize, slot: u16) -> std::io::Result<Option<usize>> {
        let view = cluster_view(self.nodes[asked].port())?;
        Ok(view
            .iter()
            .find(|v| v.master && !v.failing && v.serves(slot))
            .and_then(|v| self.index_of_port(v.port))
            .filter(|&i| !self.dead[i]))
    }

    /// True when master `idx` has at least one replica in sync (`state=online` in its `INFO
    /// replication`) and every live node says `cluster_state:ok`: a kill of `idx` can then be
    /// followed by a promotion.
    pub fn can_fail_over(&self, idx: usize) -> bool {
        !self.dead[idx]
            && online_replicas(self.nodes[idx].port()) >= 1
            && self.live().all(|i| cluster_ok(self.nodes[i].port()))
    }

    /// SIGKILLs node `idx` and reaps it: a crash, nothing flushed.
    pub fn kill_node(&mut self, idx: usize) {
        self.nodes[idx].kill();
        self.dead[idx] = true;
    }

    /// After node `killed` (the master of `slot`) was SIGKILLed: waits (bounded by `bound`)
    /// until every live node says `cluster_state:ok` and that `slot` is served by one and the
    /// same live master (the promoted replica). Returns that node's index.
    pub fn wait_promoted(
        &self,
        slot: u16,
        killed: usize,
        bound: Duration,
    ) -> std::io::Result<usize> {
        let deadline = Instant::now() + bound;
        loop {
            let mut agreed: Option<Option<usize>> = None;
            for i in self.live() {
                let seen = match cluster_ok(self.nodes[i].port()) {
                    true => self.master_in_view(i, slot).ok().flatten(),
                    false => None,
                };
                let seen = seen.filter(|&m| m != killed);
                agreed = match agreed {
                    None => Some(seen),
                    Some(prev) if prev == seen => Some(seen),
                    Some(_) => Some(None),
                };
                if agreed == Some(None) {
                    break;
                }
            }
            if let Some(Some(promoted)) = agreed {
                return Ok(promoted);
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "slot {slot}: no replica promoted in place of node {} within {bound:?}",
                    self.nodes[killed].port()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts killed node `idx` again on its port and directory: it reads its cluster config
    /// (`nodes.conf`), learns that its slots have a new owner and rejoins as that owner's replica
    /// (a full copy, since it persisted no data). Does not wait for the copy:
    /// [`RedisCluster::can_fail_over`] tells when it is in sync.
    pub fn restart_node(&mut self, idx: usize) -> std::io::Result<()> {
        self.nodes[idx].crash_and_restart()?;
        self.dead[idx] = false;
        Ok(())
    }

    /// Node `idx`'s replication offset (`master_repl_offset`: on a master, how much it has
    /// written to its replication stream; on a replica, how much of its master's it applied).
    pub fn repl_offset(&self, idx: usize) -> Option<u64> {
        let info = cli(self.nodes[idx].port(), &["INFO", "replication"]).ok()?;
        info.lines()
            .find_map(|l| l.trim().strip_prefix("master_repl_offset:"))
            .and_then(|v| v.parse().ok())
    }

    /// The highest replication offset among master `idx`'s live replicas (as the first live
    /// node sees who they are): after the master is killed, how much of its stream the best
    /// candidate for promotion has.
    pub fn replica_offset(&self, idx: usize) -> Option<u64> {
        let asked = self.live().next()?;
        let view = cluster_view(self.nodes[asked].port()).ok()?;
        let id = &view.iter().find(|v| v.port == self.client_port(idx))?.id;
        view.iter()
            .filter(|v| &v.master_id == id)
            .filter_map(|v| self.index_of_port(v.port))
            .filter(|&r| !self.dead[r])
            .filter_map(|r| self.repl_offset(r))
            .max()
    }

    /// Indexes of the nodes not killed.
    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| !self.dead[i])
    }

    /// Node `idx`'s port as clients and other nodes see it: the one it announces, else its own.
    fn client_port(&self, idx: usize) -> u16 {
        self.announced[idx].unwrap_or_else(|| self.nodes[idx].port())
    }

    /// The node whose own or announced client port is `port`.
    fn index_of_port(&self, port: u16) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| self.nodes[i].port() == port || self.client_port(i) == port)
    }
}

/// One line of `CLUSTER NODES`: a node as another node sees it.
#[derive(Debug, Default)]
struct NodeView {
    /// Its node id.
    id: String,
    /// Its client port.
    port: u16,
    /// The id of its master, for a replica (`-` for a master).
    master_id: String,
    /// Flagged `master` (else a replica).
    master: bool,
    /// Flagged `fail` or `fail?`.
    failing: bool,
    /// The slot ranges it serves, `lo..=hi`.
    slots: Vec<(u16, u16)>,
}

impl NodeView {
    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(lo, hi)| (lo..=hi).contains(&slot))
    }
}

/// `CLUSTER NODES` as node `port` sees the cluster.
fn cluster_view(port: u16) -> std::io::Result<Vec<NodeView>> {
    let text = cli(port, &["CLUSTER", "NODES"])?;
    Ok(text.lines().filter_map(parse_node_line).collect())
}

/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>…`; slots
/// are `n` or `lo-hi` (entries in brackets are slots being migrated: skipped).
fn parse_node_line(line: &str) -> Option<NodeView> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let addr = fields.get(1)?.split(['@', ',']).next()?;
    let port = addr.rsplit_once(':')?.1.parse().ok()?;
    let flags: Vec<&str> = fields.get(2)?.split(',').collect();
    let slots = fields
        .iter()
        .skip(8)
        .filter(|s| !s.starts_with('['))
        .filter_map(|s| match s.split_once('-') {
            Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
            None => s.parse().ok().map(|n| (n, n)),
        })
        .collect();
    Some(NodeView {
        id: fields.first()?.to_string(),
        port,
        master_id: fields.get(3)?.to_string(),
        master: flags.contains(&"master"),
        failing: flags.contains(&"fail") || flags.contains(&"fail?"),
        slots,
    })
}

/// True when node `port` says `cluster_state:ok`.
fn cluster_ok(port: u16) -> bool {
    cli(port, &["CLUSTER", "INFO"])
        .is_ok_and(|info| info.lines().any(|l| l.trim() == "cluster_state:ok"))
}

/// How many replicas master `port` lists in sync (`slaveN:…,state=online,…`); 0 when it does not
/// answer.
fn online_replicas(port: u16) -> usize {
    cli(port, &["INFO", "replication"]).map_or(0, |info| {
        info.lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .count()
    })
}

/// Runs one `redis-cli -p <port>` command; its output, or an error naming the command.
fn cli(port: u16, args: &[&str]) -> std::io::Result<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || text.starts_with("ERR") {
        return Err(std::io::Error::other(format!(
            "redis-cli -p {port} {}: {text}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(text)
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// True when something on `port` answers a RESP `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut line = String::new();
    // A server with a password answers -NOAUTH: it is up all the same.
    BufReader::new(s).read_line(&mut line).is_ok()
        && (line.starts_with("+PONG") || line.starts_with("-NOAUTH"))
}

/// A running `app` copy, SIGKILLed on drop.
#[derive(Debug)]
pub struct AppProcess {
    child: Child,
    /// The `--instance-id` it was started with.
    pub instance_id: String,
}

impl AppProcess {
    /// Starts `bin` with `args` plus `--instance-id instance_id`; stderr goes to `log` (or nowhere).
    pub fn spawn(
        bin: &Path,
        instance_id: &str,
        args: &[String],
        log: Option<&Path>,
    ) -> std::io::Result<AppProcess> {
        AppProcess::spawn_with_env(bin, instance_id, args, &[], log)
    }

    /// [`AppProcess::spawn`] with extra environment variables: how a secret (a `REDIS_URL` with
    /// a password) reaches the process without showing in `ps`.
    pub fn spawn_with_env(
        bin: &Path,
        instance_id: &str,
        args: &[String],
        env: &[(&str, &str)],
        log: Option<&Path>,
    ) -> std::io::Result<AppProcess> {
        let stderr = match log {
            Some(p) => Stdio::from(std::fs::File::create(p)?),
            None => Stdio::null(),
        };
        let child = Command::new(bin)
            .args(args)
            .args(["--instance-id", instance_id])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()?;
        Ok(AppProcess {
            child,
            instance_id: instance_id.to_string(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: libc::c_int) -> std::io::Result<()> {
        signal(self.pid(), sig)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `bound` for the process to exit by itself; `None` when it is still running.
    pub fn wait_timeout(
        &mut self,
        bound: Duration,
    ) -> std::io::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status once the process has exited by itself; `None` while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for AppProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `app` binary next to the running executable (how `sim` finds it), if it exists.
pub fn sibling_app_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("app"), dir.join("../app")]
        .into_iter()
        .find(|p| p.is_file())
}
