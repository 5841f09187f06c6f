//! The processes a run controls: its Redis (its own, or the one `--redis-url` names), the proxy
//! the copies talk through when a fault needs one, and the `app` copies (started, killed and
//! replaced, paused and resumed, stopped), with what they cost in memory and CPU.

use crate::progress::Progress;
use crate::Flags;
use anyhow::{bail, Context};
use leaderq::testkit::procs::{self, AppProcess, RedisCluster, RedisServer};
use leaderq::testkit::proxy::Proxy;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The processes of one run. Fields drop in order: the copies are SIGKILLed before the proxy and
/// the Redis they talk to go away.
pub struct World {
    /// The copies running now, in slots: a killed copy's slot holds its replacement.
    pub apps: Vec<AppProcess>,
    /// Paused copies (pid) and when each is due to get its SIGCONT.
    resumes: Vec<(u32, Instant)>,
    /// Copies started so far: the next one is `app{spawned}`.
    spawned: u32,
    /// Every copy ever started, in order, with its run log and whether a fault hit it.
    pub copies: Vec<Copy>,
    /// Last CPU reading of every app process ever started, by pid (killed ones keep their last).
    app_cpu_s: HashMap<u32, f64>,
    /// The highest peak resident set of any copy seen so far, MB.
    pub rss_mb_max: f64,
    /// The `app` binary, for the copies and for getErrors.
    pub app_bin: PathBuf,
    /// The arguments every copy gets (see [`app_args`]).
    args: Vec<String>,
    /// Where each copy's log goes (`<name>.log`).
    log_dir: PathBuf,
    /// What the copies connect to: the proxy when there is one, else Redis.
    app_url: String,
    /// Sits between the copies and Redis with --lose-replies or --partition-leader.
    pub proxy: Option<Proxy>,
    /// With --redis-cluster and --lose-replies: one proxy in front of each node, which announces
    /// the proxy's port, so every client reaches every node through it. They cut only
    /// connections that sent a script call (the copies' and getErrors's), never the sim's own
    /// reads or the replication links.
    pub node_proxies: Vec<Proxy>,
    /// Redis's own URL: the sim and getErrors use it, never the proxy.
    pub url: String,
    /// The sim's own Redis; `None` with --redis-url or --redis-cluster. Restarted and rolled back
    /// by faults.
    pub server: Option<RedisServer>,
    /// The sim's own Redis Cluster (--redis-cluster N), held so that it stops (on drop) after the
    /// copies. Its masters are killed by --kill-master.
    pub cluster: Option<RedisCluster>,
}

impl World {
    /// Starts the sim's own Redis (with an AOF when it is to be restarted), or takes
    /// `--redis-url`. No copy runs yet.
    pub async fn start_redis(
        flags: &Flags,
        app_bin: PathBuf,
        args: Vec<String>,
        log_dir: PathBuf,
    ) -> anyhow::Result<World> {
        let mut node_proxies = Vec::new();
        let cluster = match flags.redis_cluster {
            0 => None,
            n => {
                // A replica per master, for --kill-master to fail over to.
                let replicas = usize::from(flags.kill_master > 0);
                if flags.lose_replies > 0 {
                    for _ in 0..n as usize * (1 + replicas) {
                        let proxy = Proxy::bind().await.context("starting a node's proxy")?;
                        proxy.scripts_only();
                        node_proxies.push(proxy);
                    }
                }
                let ports: Vec<u16> = node_proxies.iter().map(Proxy::port).collect();
                let proxies = &node_proxies;
                let started = tokio::task::block_in_place(|| {
                    RedisCluster::start_fronted(n as usize, replicas, &ports, |i, port| {
                        if let Some(p) = proxies.get(i) {
                            p.set_upstream(([127, 0, 0, 1], port).into());
                        }
                        Ok(())
                    })
                });
                Some(started.with_context(|| format!("starting a {n}-master Redis Cluster"))?)
            }
        };
        let server = match &flags.redis_url {
            _ if cluster.is_some() => None,
            Some(_) => None,
            None if flags.restart_redis > 0 => Some(
                RedisServer::start_with(&[
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    // A torn last transaction is repaired before the restart (see
                    // RedisServer::crash_and_restart), never half-replayed.
                    "--aof-load-truncated",
                    "no",
                ])
                .context("starting redis-server with an AOF")?,
            ),
            None => Some(RedisServer::start().context("starting redis-server")?),
        };
        let url = match (&server, &cluster, &flags.redis_url) {
            (Some(s), _, _) => s.url(),
            (None, Some(c), _) => c.url(),
            (None, None, Some(u)) => u.clone(),
            (None, None, None) => unreachable!("one of the three is set"),
        };
        Ok(World {
            apps: Vec::new(),
            resumes: Vec::new(),
            spawned: 0,
            copies: Vec::new(),
            app_cpu_s: HashMap::new(),
            rss_mb_max: 0.0,
            app_bin,
            args,
            log_dir,
            app_url: url.clone(),
            proxy: None,
            node_proxies,
            url,
            server,
            cluster,
        })
    }

    /// Plain URLs of every Redis node the run uses (each master of the sim's own cluster, in slot
    /// order, not the replicas; or the one Redis), for reading each node's own CPU and command
    /// counts.
    pub fn node_urls(&self) -> Vec<String> {
        match &self.cluster {
            Some(c) => c.nodes().iter().map(|n| n.url()).collect(),
            None => vec![self.url.clone()],
        }
    }

    /// Starts the reply-losing proxy when a fault needs it. The copies go through it; the sim
    /// and getErrors do not.
    pub async fn start_proxy(&mut self, flags: &Flags) -> anyhow::Result<()> {
        if self.cluster.is_none() && flags.lose_replies + flags.partition_leader > 0 {
            let upstream = url_socket_addr(&self.url)?;
            let proxy = Proxy::start(upstream).await.context("starting the proxy")?;
            self.app_url = proxy.url();
            self.proxy = Some(proxy);
        }
        Ok(())
    }

    /// Every proxy of the run: the one in front of the single Redis, or one per cluster node.
    pub fn proxies(&self) -> impl Iterator<Item = &Proxy> {
        self.proxy.iter().chain(&self.node_proxies)
    }

    /// Starts `count` copies, `app0`, `app1`, ….
    pub fn spawn_copies(&mut self, count: u32) -> anyhow::Result<()> {
        for _ in 0..count {
            let app = self.spawn_next()?;
            self.apps.push(app);
        }
        Ok(())
    }

    /// Starts the next copy, `app{spawned}`, logging to its own file. The Redis URL goes through
    /// the `REDIS_URL` environment variable, so a password in it never shows in `ps`.
    fn spawn_next(&mut self) -> anyhow::Result<AppProcess> {
        let name = format!("app{}", self.spawned);
        let run_log = self.log_dir.join(format!("{name}.runs"));
        let mut args = self.args.clone();
        args.push("--run-log".into());
        args.push(run_log.display().to_string());
        let app = AppProcess::spawn_with_env(
            &self.app_bin,
            &name,
            &args,
            &[("REDIS_URL", &self.app_url)],
            Some(&self.log_path(&name)),
        )
        .with_context(|| format!("starting {}", self.app_bin.display()))?;
        self.spawned += 1;
        self.copies.push(Copy {
            name,
            run_log,
            disturbed: false,
        });
        Ok(app)
    }

    /// SIGKILLs the copy in slot `idx` and starts a fresh one in its place.
    pub fn replace(&mut self, idx: usize) -> anyhow::Result<()> {
        self.disturb(idx);
        self.apps[idx].kill();
        self.apps[idx] = self.spawn_next()?;
        Ok(())
    }

    /// SIGSTOPs the copy in slot `idx`; [`World::resume_due`] continues it at `until`.
    pub fn pause(&mut self, idx: usize, until: Instant) -> anyhow::Result<()> {
        self.disturb(idx);
        self.apps[idx].signal(libc::SIGSTOP)?;
        self.resumes.push((self.apps[idx].pid(), until));
        Ok(())
    }

    /// Marks the copy in slot `idx` as hit by a fault: its work may run elsewhere too.
    pub fn disturb(&mut self, idx: usize) {
        let name = &self.apps[idx].instance_id;
        if let Some(c) = self.copies.iter_mut().find(|c| &c.name == name) {
            c.disturbed = true;
        }
    }

    /// Every copy's logged runs, for the verdict (a log that cannot be read is an error: the
    /// verdict would be blind).
    pub fn runs(&self) -> anyhow::Result<Vec<leaderq::testkit::verify::CopyRuns>> {
        self.copies
            .iter()
            .map(|c| {
                let bytes = match std::fs::read(&c.run_log) {
                    Ok(b) => b,
                    // A copy killed before its first commit never wrote one.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                    Err(e) => {
                        return Err(e).with_context(|| format!("reading {}", c.run_log.display()))
                    }
                };
                Ok(leaderq::testkit::verify::CopyRuns {
                    name: c.name.clone(),
                    disturbed: c.disturbed,
                    ids: leaderq::node::handler::commit::read_run_log(&bytes),
                })
            })
            .collect()
    }

    /// The paused copies (pid) and when each is due to be resumed.
    pub fn paused(&self) -> &[(u32, Instant)] {
        &self.resumes
    }

    /// SIGCONTs every paused copy whose pause is over.
    pub fn resume_due(&mut self, now: Instant, progress: &Progress) {
        for (pid, _) in self.resumes.iter().filter(|(_, due)| *due <= now) {
            let _ = procs::signal(*pid, libc::SIGCONT);
            progress.note(&format!("resumed paused pid {pid}"));
        }
        self.resumes.retain(|(_, due)| *due > now);
    }

    /// SIGCONTs every paused copy, due or not: the run is over.
    pub fn resume_all(&mut self) {
        for (pid, _) in self.resumes.drain(..) {
            let _ = procs::signal(pid, libc::SIGCONT);
        }
    }

    /// Takes every copy's peak RSS and CPU time so far.
    pub fn sample_usage(&mut self) {
        for app in &self.apps {
            self.rss_mb_max = self.rss_mb_max.max(peak_rss_mb(app.pid()));
            let used = cpu_s(app.pid());
            if used > 0.0 {
                self.app_cpu_s.insert(app.pid(), used);
            }
        }
    }

    /// Fails when a copy has exited: nothing in a run without data loss makes one exit.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self
            .apps
            .iter_mut()
            .find_map(|a| (!a.is_running()).then_some(&a.instance_id))
        {
            Some(name) => bail!(
                "app {name} exited unexpectedly; see {}",
                self.log_dir.join(format!("{name}.log")).display()
            ),
            None => Ok(()),
        }
    }

    /// A copy that has exited with `code`, if any (its name).
    pub fn exited_with(&mut self, code: i32) -> Option<String> {
        self.apps
            .iter_mut()
            .find_map(|a| (a.exited()?.code() == Some(code)).then(|| a.instance_id.clone()))
    }

    /// How many copies are still running.
    pub fn running(&mut self) -> usize {
        self.apps
            .iter_mut()
            .map(|a| a.is_running())
            .filter(|r| *r)
            .count()
    }

    /// The CPU time all copies ever started have used, seconds.
    pub fn apps_cpu_s(&self) -> f64 {
        self.app_cpu_s.values().sum()
    }

    /// Stops every copy cleanly (they publish their latency histograms on the way out); one that
    /// does not stop in time is killed.
    pub fn stop_apps(&mut self) -> anyhow::Result<()> {
        for app in &self.apps {
            let _ = app.signal(libc::SIGTERM);
        }
        for app in self.apps.iter_mut() {
            if tokio::task::block_in_place(|| app.wait_timeout(Duration::from_secs(20)))?.is_none()
            {
                eprintln!(
                    "sim: {} did not stop within 20 s of SIGTERM; killing it",
                    app.instance_id
                );
                app.kill();
            }
        }
        Ok(())
    }

    /// A copy's log file.
    fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }
}

/// One copy started in the run.
#[derive(Debug, Clone)]
pub struct Copy {
    /// Its instance id, `app<N>`.
    pub name: String,
    /// Where it logs the ids its handler ran (`app --run-log`).
    pub run_log: PathBuf,
    /// A fault hit it (SIGKILL, SIGSTOP, a partition).
    pub disturbed: bool,
}

/// The arguments every `app` copy gets. The Redis URL is not among them: it goes through the
/// `REDIS_URL` environment variable, so a password in it never shows in `ps`.
pub fn app_args(flags: &Flags, namespace: &str, seed: u64) -> Vec<String> {
    [
        ("--namespace", namespace.to_string()),
        ("--interval-ms", flags.interval_ms.to_string()),
        ("--queue-max", flags.queue_max.to_string()),
        ("--max-messages", flags.messages.to_string()),
        ("--seed", seed.to_string()),
        ("--error-rate", flags.error_rate.to_string()),
        (
            "--handler-delay-max-ms",
            flags.handler_delay_max_ms.to_string(),
        ),
        ("--handler-timeout-ms", flags.handler_timeout_ms.to_string()),
        ("--max-in-flight", flags.max_in_flight.to_string()),
        ("--batch", flags.batch.to_string()),
        ("--commit-window-ms", flags.commit_window_ms.to_string()),
        ("--commit-max", flags.commit_max.to_string()),
        ("--gen-batch", flags.gen_batch.to_string()),
        ("--lease-ms", flags.lease_ms.to_string()),
        ("--heartbeat-ms", flags.heartbeat_ms.to_string()),
        ("--shards", flags.shards.to_string()),
        ("--wait-replicas", flags.wait_replicas.to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v])
    .collect()
}

/// CPU time a process has used so far (user + system), seconds; 0 when unreadable.
fn cpu_s(pid: u32) -> f64 {
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0)
}

/// Peak resident set of a process so far (VmHWM), MB; 0 when unreadable.
fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The `host:port` of a `redis://` URL, resolved (for the proxy's upstream).
fn url_socket_addr(url: &str) -> anyhow::Result<std::net::SocketAddr> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)?;
    let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
        bail!("--lose-replies needs a plain redis:// TCP URL");
    };
    std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), *port))?
        .next()
        .context("resolving Redis's address")
}
