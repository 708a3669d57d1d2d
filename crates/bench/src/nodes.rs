//! Starting real `p2pnode` processes for benchmarks and reading their RSS.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub use p2p_ctl::check::Key;

/// `p2pnode` next to this executable (or `$P2PNODE_BIN`).
pub fn node_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("P2PNODE_BIN") {
        return Ok(p.into());
    }
    let bin = std::env::current_exe()?.with_file_name("p2pnode");
    if !bin.exists() {
        bail!(
            "p2pnode not found at {}; build it: cargo build --release -p p2p-node",
            bin.display()
        );
    }
    Ok(bin)
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The key every keyed node of this benchmark process shares: a fresh
/// key file (0600) in a temporary directory, created on first use.
pub fn bench_key() -> anyhow::Result<(PathBuf, Key)> {
    static KEY: std::sync::OnceLock<(PathBuf, Key)> = std::sync::OnceLock::new();
    if let Some(k) = KEY.get() {
        return Ok(k.clone());
    }
    let dir = std::env::temp_dir().join(format!("p2pbench-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("chat.key");
    let _ = std::fs::remove_file(&path);
    let key = p2p_proto::secure::create_key_file(&path)?;
    Ok(KEY.get_or_init(|| (path, Some(std::sync::Arc::new(key)))).clone())
}

/// Removes the benchmark key's directory (at exit).
pub fn remove_bench_key() {
    let _ =
        std::fs::remove_dir_all(std::env::temp_dir().join(format!("p2pbench-key-{}", std::process::id())));
}

/// The arguments that key a node like `key` (`--insecure` for none).
pub fn key_args(insecure: bool) -> anyhow::Result<(Vec<String>, Key)> {
    if insecure {
        return Ok((vec!["--insecure".into()], None));
    }
    let (path, key) = bench_key()?;
    Ok((vec!["--key-file".into(), path.display().to_string()], key))
}

/// A node process; killed when dropped.
pub struct NodeProc {
    pub child: Child,
    pub addr: String,
    /// The key to talk to it with (None: it runs `--insecure`).
    pub key: Key,
    /// JSON event lines (when started with events), else nothing.
    pub events: Option<mpsc::UnboundedReceiver<serde_json::Value>>,
}

impl NodeProc {
    pub fn pid(&self) -> i32 {
        self.child.id().map(|p| p as i32).unwrap_or(0)
    }

    /// CPU time used so far by all of the node's threads, in nanoseconds
    /// (from /proc/PID/task/*/schedstat; exact, unlike wall-clock rates on
    /// a shared machine).
    pub fn cpu_ns(&self) -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return 0;
        };
        tasks
            .filter_map(Result::ok)
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
            .sum()
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("VmRSS:")
                        .map(|v| v.trim().trim_end_matches(" kB").parse().ok())
                })
            })
            .flatten()
            .unwrap_or(0)
    }
}

/// Starts a node on a free port, keyed with the benchmark key unless
/// `extra` holds `--insecure`. With `events`, its JSON events are
/// forwarded; otherwise it prints nothing (`--events none`). Waits until
/// its port accepts connections.
pub async fn start(name: &str, extra: &[String], events: bool) -> anyhow::Result<NodeProc> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let (key_args, key) = key_args(extra.iter().any(|a| a == "--insecure"))?;
    let mut cmd = Command::new(node_bin()?);
    cmd.args(["--name", name, "--listen", &addr, "--headless", "--history", "0"])
        .args(["--events", if events { "json" } else { "none" }])
        .args(extra)
        .args(key_args.iter().filter(|a| *a != "--insecure"))
        .stdin(Stdio::null())
        .stdout(if events { Stdio::piped() } else { Stdio::null() })
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("starting p2pnode")?;
    let events = if events {
        let (tx, rx) = mpsc::unbounded_channel();
        let out = child.stdout.take().context("stdout")?;
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str(&l) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        Some(rx)
    } else {
        None
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        if std::time::Instant::now() > deadline {
            bail!("{name} did not start listening on {addr}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    Ok(NodeProc {
        child,
        addr,
        key,
        events,
    })
}

/// Raises the open-file limit to the hard limit (1,000 members need more
/// than the usual 1,024 descriptors on each side).
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
