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
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local Redis Cluster of `masters` masters (no replicas), each a [`RedisServer`] killed on
/// drop, the 16384 slots split evenly among them in order.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` (≥ 1) cluster-enabled servers, assigns the slots, introduces the nodes
    /// to each other (`CLUSTER MEET`) and waits (bounded, 20 s) until every node says
    /// `cluster_state:ok` and knows all the others.
    pub fn start(masters: usize) -> std::io::Result<RedisCluster> {
        if masters == 0 {
            return Err(std::io::Error::other("a cluster needs at least one master"));
        }
        let mut nodes = Vec::with_capacity(masters);
        let mut buses = Vec::with_capacity(masters);
        for _ in 0..masters {
            // The cluster bus gets its own free port (the default, port + 10000, may not exist).
            let bus = free_port()?.to_string();
            buses.push(bus.clone());
            nodes.push(RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                &bus,
                "--save",
                "",
                "--appendonly",
                "no",
            ])?);
        }
        let per = 16384 / masters;
        for (i, node) in nodes.iter().enumerate() {
            let lo = i * per;
            let hi = if i + 1 == masters {
                16383
            } else {
                lo + per - 1
            };
            cli(
                node.port(),
                &["CLUSTER", "ADDSLOTSRANGE", &lo.to_string(), &hi.to_string()],
            )?;
        }
        for (node, bus) in nodes.iter().zip(&buses).skip(1) {
            let port = node.port().to_string();
            cli(
                nodes[0].port(),
                &["CLUSTER", "MEET", "127.0.0.1", &port, bus],
            )?;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = nodes.iter().all(|n| {
                cli(n.port(), &["CLUSTER", "INFO"]).is_ok_and(|info| {
                    let known = format!("cluster_known_nodes:{masters}");
                    info.lines().any(|l| l.trim() == "cluster_state:ok")
                        && info.lines().any(|l| l.trim() == known)
                })
            });
            if ready {
                return Ok(RedisCluster { nodes });
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::other(
                    "the local Redis Cluster did not reach cluster_state:ok within 20 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis+cluster://127.0.0.1:<port>,…`: every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The nodes, in slot order.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }
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
