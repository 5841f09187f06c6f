//! Real deployments against real `redis-server` processes: TLS with a private CA and mutual TLS
//! (certificates made by the test), the README's least-privilege ACL user (checked with Redis's
//! own `ACL LOG`), refused credentials, and passwords kept out of everything printed.

mod common;

use common::{outcomes, wait_for};
use leaderq::testkit::procs::{AppProcess, RedisServer};
use leaderq::{conn, Keys};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// A private CA with a server certificate (localhost, 127.0.0.1) and a client certificate, as
/// PEM files in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "leaderq test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca_cert.pem());
        for (name, sans) in [
            (
                "server",
                vec!["localhost".to_string(), "127.0.0.1".to_string()],
            ),
            ("client", vec!["leaderq-client".to_string()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// A Redis with a TLS port (and its plain port, for the fixture's readiness check).
    fn server(&self, auth_clients: bool) -> (RedisServer, u16) {
        let tls_port = common::free_port();
        let server = RedisServer::start_with(&[
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &self.arg("server.pem"),
            "--tls-key-file",
            &self.arg("server.key"),
            "--tls-ca-cert-file",
            &self.arg("ca.pem"),
            "--tls-auth-clients",
            if auth_clients { "yes" } else { "no" },
        ])
        .unwrap();
        (server, tls_port)
    }
}

/// Runs `app <args>` to completion (status and getErrors end on their own; a join is bounded by
/// its own failure here).
fn app(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(common::app_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Two copies joined with `redis` (args and env) handle 300 messages; judged over `plain_url`.
async fn two_copies_handle(
    redis: &[&str],
    env: &[(&str, &str)],
    plain_url: &str,
    logs: &Path,
) -> Vec<AppProcess> {
    let mut args: Vec<String> = redis.iter().map(|s| s.to_string()).collect();
    for flag in [
        "--namespace",
        "app",
        "--interval-ms",
        "0",
        "--max-messages",
        "300",
        "--handler-delay-max-ms",
        "20",
    ] {
        args.push(flag.to_string());
    }
    let apps: Vec<AppProcess> = ["a", "b"]
        .iter()
        .map(|name| {
            let log = logs.join(format!("{name}.log"));
            AppProcess::spawn_with_env(&common::app_bin(), name, &args, env, Some(&log)).unwrap()
        })
        .collect();
    let con = conn::connect(plain_url, 5000).await.unwrap();
    let keys = Keys::new("app").unwrap();
    let done = wait_for(Duration::from_secs(30), || {
        let (mut con, keys) = (con.clone(), keys.clone());
        async move { (outcomes(&mut con, &keys).await >= 300).then_some(()) }
    })
    .await;
    let log = |n: &str| std::fs::read_to_string(logs.join(format!("{n}.log"))).unwrap_or_default();
    assert!(done.is_some(), "300 outcomes:\n{}\n{}", log("a"), log("b"));
    apps
}

/// Issue 9: `rediss://` with a private CA (`--tls-ca-cert`): the copies, getErrors and status
/// all work over TLS; without the CA the certificate is refused at once with exit code 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let pki = Pki::new();
    let (server, tls_port) = pki.server(false);
    let url = format!("rediss://localhost:{tls_port}");
    let ca = pki.arg("ca.pem");
    let logs = tempfile::tempdir().unwrap();
    let tls = ["--redis-url", url.as_str(), "--tls-ca-cert", ca.as_str()];
    let apps = two_copies_handle(&tls, &[], &server.url(), logs.path()).await;
    drop(apps);
    let mut args = vec!["getErrors"];
    args.extend_from_slice(&tls);
    let errors = app(&args, &[]);
    assert!(
        errors.status.success(),
        "{}",
        String::from_utf8_lossy(&errors.stderr)
    );
    assert!(!errors.stdout.is_empty(), "some of 300 messages failed");
    let mut args = vec!["status", "--json"];
    args.extend_from_slice(&tls);
    let status = app(&args, &[]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    let untrusted = app(
        &[
            "status",
            "--redis-url",
            &url,
            "--connect-timeout-ms",
            "60000",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert_eq!(untrusted.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("TLS"), "{stderr}");
}

/// Issue 9: mutual TLS (`--tls-auth-clients yes`): with `--tls-cert`/`--tls-key` the copies
/// work; without, the handshake is refused with exit code 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let pki = Pki::new();
    let (server, tls_port) = pki.server(true);
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let (ca, cert, key) = (
        pki.arg("ca.pem"),
        pki.arg("client.pem"),
        pki.arg("client.key"),
    );
    let logs = tempfile::tempdir().unwrap();
    let mtls = [
        "--redis-url",
        url.as_str(),
        "--tls-ca-cert",
        ca.as_str(),
        "--tls-cert",
        cert.as_str(),
        "--tls-key",
        key.as_str(),
    ];
    let apps = two_copies_handle(&mtls, &[], &server.url(), logs.path()).await;
    drop(apps);
    let refused = app(
        &[
            "status",
            "--redis-url",
            &url,
            "--tls-ca-cert",
            &ca,
            "--connect-timeout-ms",
            "60000",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(4), "{stderr}");
}

/// The ACL line the README gives, for the namespace `app`.
fn readme_acl_line() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let after = readme
        .split("<!-- acl-line:")
        .nth(1)
        .expect("the README marks its ACL line");
    after
        .lines()
        .find(|l| l.starts_with("ACL SETUSER"))
        .expect("an ACL SETUSER line after the marker")
        .to_string()
}

/// Issue 9: the README's least-privilege ACL user runs two copies, getErrors and status, and
/// Redis logs no denied command (`ACL LOG`); a wrong password fails at once with exit code 4
/// and is never printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_acl_user_is_enough_and_a_wrong_password_is_refused() {
    let server = RedisServer::start().unwrap();
    let mut admin = conn::connect(&server.url(), 5000).await.unwrap();
    let line = readme_acl_line().replace(">PASSWORD", ">s3cret-pw");
    let words: Vec<&str> = line.split_whitespace().collect();
    redis::cmd(words[0])
        .arg(&words[1..])
        .query_async::<()>(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("the README's ACL line is valid: {e}"));
    let url = format!("redis://leaderq:s3cret-pw@127.0.0.1:{}", server.port());
    let env = [("REDIS_URL", url.as_str())];
    let logs = tempfile::tempdir().unwrap();
    let apps = two_copies_handle(&[], &env, &server.url(), logs.path()).await;
    drop(apps);
    for args in [
        vec!["getErrors"],
        vec!["status"],
        vec!["getErrors", "--peek"],
    ] {
        let mut all = args.clone();
        all.extend_from_slice(&["--namespace", "app"]);
        let out = app(&all, &env);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Each entry: [count, n, reason, r, context, c, object, command, ...]. The start-up check's
    // CONFIG GET is denied on purpose (it would expose every setting); nothing else may be.
    let denied: Vec<Vec<redis::Value>> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(&mut admin)
        .await
        .unwrap();
    let objects: Vec<String> = denied
        .iter()
        .filter_map(|entry| redis::from_redis_value(entry.get(7)?.clone()).ok())
        .collect();
    assert_eq!(objects.len(), denied.len(), "{denied:?}");
    let missing: Vec<&String> = objects.iter().filter(|o| *o != "config|get").collect();
    assert!(
        missing.is_empty(),
        "the README's ACL line misses permissions: {missing:?}"
    );

    let wrong = format!("redis://leaderq:not-the-pw@127.0.0.1:{}", server.port());
    let out = app(
        &["--namespace", "app", "--connect-timeout-ms", "60000"],
        &[("REDIS_URL", wrong.as_str())],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("authentication failed"), "{stderr}");
    assert!(!stderr.contains("not-the-pw"), "{stderr}");
}

/// Issue 9 and 14: a password in the URL is never printed: not by `--help` (REDIS_URL set), not
/// in the error for an unreachable `unix://…?pass=` URL.
#[test]
fn passwords_are_never_printed() {
    let env = [("REDIS_URL", "redis://alice:hunter2-secret@127.0.0.1:1")];
    for args in [
        vec!["--help"],
        vec!["status", "--help"],
        vec!["getErrors", "--help"],
    ] {
        let out = app(&args, &env);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("REDIS_URL"), "{args:?}: {text}");
        assert!(!text.contains("hunter2"), "{args:?}: {text}");
    }
    let out = app(
        &[
            "status",
            "--redis-url",
            "unix:///nonexistent/redis.sock?pass=hunter2-secret",
            "--connect-timeout-ms",
            "300",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    let out = app(
        &["status", "--connect-timeout-ms", "300"],
        &[("REDIS_URL", "redis://alice:hunter2-secret@127.0.0.1:1")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("redis://***@127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// Issue 9 and 14: `sim` against a Redis with a password keeps it out of its reports (and gives
/// it to the copies through the environment, not argv).
#[test]
fn sim_reports_never_hold_the_password() {
    let server = RedisServer::start_with(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--requirepass",
        "hunter2-secret",
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r");
    let url = format!("redis://:hunter2-secret@127.0.0.1:{}", server.port());
    let out = common::run_sim(
        &report,
        &[
            "--redis-url",
            &url,
            "--messages",
            "2000",
            "--seed",
            "3",
            "--quiet",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["summary.json", "summary.md"] {
        let text = std::fs::read_to_string(report.join(name)).unwrap();
        assert!(!text.contains("hunter2"), "{name}: {text}");
        assert!(
            text.contains("redis://***@127.0.0.1"),
            "{name} shows the redacted URL"
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("hunter2"), "{stdout}");
}

/// Issue 23: a user missing any one permission of the README's ACL line is stopped at once with
/// exit code 4 and a message naming what is missing. Before, a missing `evalsha`, `script|load`,
/// `info`, `setrange` or `hincrby` ended in exit 1, and a missing `incr`, `publish` or `rename`
/// (refused inside a script, where Redis names only the script's line) was retried for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_missing_permission_stops_a_copy_with_exit_4_naming_it() {
    let server = RedisServer::start().unwrap();
    let mut admin = conn::connect(&server.url(), 5000).await.unwrap();
    let line = readme_acl_line().replace(">PASSWORD", ">s3cret-pw");
    for missing in [
        "evalsha",
        "script|load",
        "info",
        "setrange",
        "hincrby",
        "incr",
        "publish",
        "hlen",
    ] {
        let user = format!("no-{}", missing.replace('|', "-"));
        let mut words: Vec<String> = line
            .split_whitespace()
            .filter(|w| *w != format!("+{missing}"))
            .map(str::to_string)
            .collect();
        assert!(
            words.len() < line.split_whitespace().count(),
            "{missing} is in the line"
        );
        words[2] = user.clone();
        redis::cmd(&words[0])
            .arg(&words[1..])
            .query_async::<()>(&mut admin)
            .await
            .unwrap();
        // A fresh namespace each time (the ACL line grants only `{app}`).
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut admin)
            .await
            .unwrap();
        let url = format!("redis://{user}:s3cret-pw@127.0.0.1:{}", server.port());
        let started = std::time::Instant::now();
        // Two copies: one generates, the other handles (a lone copy only generates), so every
        // script runs.
        let logs = tempfile::tempdir().unwrap();
        let args: Vec<String> = [
            "--namespace",
            "app",
            "--interval-ms",
            "0",
            "--max-messages",
            "50",
            "--handler-delay-max-ms",
            "5",
            "--redis-down-max-ms",
            "60000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut apps: Vec<(AppProcess, PathBuf)> = ["a", "b"]
            .iter()
            .map(|name| {
                let log = logs.path().join(format!("{name}.log"));
                let app = AppProcess::spawn_with_env(
                    &common::app_bin(),
                    name,
                    &args,
                    &[("REDIS_URL", url.as_str())],
                    Some(&log),
                )
                .unwrap();
                (app, log)
            })
            .collect();
        let mut stopped = None;
        while stopped.is_none() && started.elapsed() < Duration::from_secs(20) {
            for (app, log) in apps.iter_mut() {
                if let Some(status) = app.exited() {
                    stopped = Some((status.code(), std::fs::read_to_string(&*log).unwrap()));
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(apps);
        let (code, stderr) =
            stopped.unwrap_or_else(|| panic!("without {missing}: no copy stopped within 20 s"));
        assert_eq!(code, Some(4), "without {missing}: {stderr}");
        let named = missing.split('|').next().unwrap();
        assert!(
            stderr.to_lowercase().contains(named),
            "without {missing}, the message names it: {stderr}"
        );
        assert!(!stderr.contains("s3cret-pw"), "{stderr}");
    }
    // getErrors takes the store with RENAME (in errors_take.lua).
    let user = "no-rename";
    let words: Vec<String> = line
        .split_whitespace()
        .filter(|w| *w != "+rename")
        .map(|w| {
            if w == "leaderq" {
                user.to_string()
            } else {
                w.to_string()
            }
        })
        .collect();
    redis::cmd(&words[0])
        .arg(&words[1..])
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    redis::cmd("RPUSH")
        .arg("{app}:errors")
        .arg("7:1:1700000000000000\thandler error\t1700000000000001")
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://{user}:s3cret-pw@127.0.0.1:{}", server.port());
    let out = app(&["getErrors", "--namespace", "app"], &[("REDIS_URL", &url)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(4),
        "getErrors without rename: {stderr}"
    );
    assert!(stderr.contains("RENAME"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing printed, nothing deleted");
}
