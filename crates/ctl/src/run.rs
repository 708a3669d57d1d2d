//! Bringing a cluster up: in the foreground (progress, then the event
//! stream, Ctrl-C stops it), or detached (`-d`: a background supervisor,
//! and this process returns once every node is ready).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::net::UnixListener;
use tokio::sync::broadcast;

use crate::config::Cluster;
use crate::control::{self, Request};
use crate::display::Display;
use crate::supervisor::{CtlEvent, Handle, Supervisor};

/// Finds `p2pnode`: `$P2PNODE_BIN`, else next to this executable.
///
/// # Errors
/// When it is not there, with how to build it.
pub fn node_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("P2PNODE_BIN") {
        let p = PathBuf::from(p);
        // Nodes run in the state directory: keep the path absolute.
        return p
            .canonicalize()
            .with_context(|| format!("P2PNODE_BIN={} does not exist", p.display()));
    }
    let exe = std::env::current_exe().context("while locating the p2pctl executable")?;
    let bin = exe.with_file_name("p2pnode");
    if !bin.exists() {
        bail!(
            "p2pnode not found at {}; build it with `cargo build -p p2p-node` (or `cargo xtask demo`), or set P2PNODE_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// A supervisor running in this process, with its control socket.
pub struct Running {
    pub handle: Handle,
    pub events: broadcast::Receiver<CtlEvent>,
    task: Option<tokio::task::JoinHandle<()>>,
    serve: tokio::task::JoinHandle<()>,
    state_dir: PathBuf,
    /// Let go after the socket and pid file are removed.
    _lock: StateLock,
}

/// One supervisor per state directory: an exclusive `flock` on
/// `supervisor.lock`, held for the supervisor's life. The kernel lets go
/// when the process ends, however it ends, so a crashed supervisor leaves
/// no stale lock. Without it, two `up`s started together could both find
/// no supervisor answering and both start one: the second took over the
/// control socket, and the first one's nodes ran on out of reach of `down`.
pub struct StateLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

/// Takes the cluster's state-directory lock (creating the directory).
///
/// # Errors
/// When another supervisor of this cluster holds it, or the directory
/// cannot be created.
pub fn lock_state_dir(cluster: &Cluster) -> anyhow::Result<StateLock> {
    use nix::fcntl::{Flock, FlockArg};
    let dir = &cluster.state_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    let path = dir.join("supervisor.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(StateLock(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(already_running(cluster)),
        Err((_, e)) => bail!("cannot lock {}: {e}", path.display()),
    }
}

fn already_running(cluster: &Cluster) -> anyhow::Error {
    let pid = std::fs::read_to_string(cluster.state_dir.join("supervisor.pid")).unwrap_or_default();
    let pid = match pid.trim() {
        "" => String::new(),
        pid => format!(" (supervisor pid {pid})"),
    };
    anyhow::anyhow!(
        "cluster {:?} is already running{pid}; stop it with `p2pctl -f {} down` first",
        cluster.name,
        cluster.file.display()
    )
}

/// Sends this process's stdout and stderr to `path` (created or
/// truncated): the background supervisor's log, opened only once it
/// holds the state directory's lock, so a second `up -d` that loses the
/// race neither empties the running supervisor's log nor writes into it.
///
/// # Errors
/// If the file cannot be created.
pub fn output_to(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let log = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let _ = std::io::stdout().flush();
    for fd in [1, 2] {
        nix::unistd::dup2(log.as_raw_fd(), fd)
            .with_context(|| format!("cannot write to {}", path.display()))?;
    }
    Ok(())
}

impl Running {
    /// Waits for the supervisor to finish (after `down` or the shutdown
    /// signal), then removes the socket and pid file.
    pub async fn finish(mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.serve.abort();
        cleanup(&self.state_dir);
    }

    /// Waits for the next event; `None` once the supervisor has stopped
    /// (events already queued are still returned first).
    pub async fn next_event(&mut self) -> Option<CtlEvent> {
        loop {
            let Some(task) = self.task.as_mut() else {
                return self.events.try_recv().ok();
            };
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Ok(ev) => return Some(ev),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return None,
                },
                _ = task => { self.task = None; }
            }
        }
    }
}

fn cleanup(state_dir: &Path) {
    let _ = std::fs::remove_file(control::socket_path(state_dir));
    let _ = std::fs::remove_file(state_dir.join("supervisor.pid"));
}

/// Refuses to start a cluster whose supervisor already answers.
///
/// # Errors
/// When it is running.
pub async fn ensure_not_running(cluster: &Cluster) -> anyhow::Result<()> {
    if control::connect(&cluster.state_dir, &cluster.name).await.is_ok() {
        return Err(already_running(cluster));
    }
    Ok(())
}

/// Starts the supervisor in this process: binds the control socket, spawns
/// the nodes. Stops when `down` arrives or `shutdown` completes.
///
/// Callers check the plugins first ([`Cluster::check_plugins`]), once,
/// and hold the state directory's lock ([`lock_state_dir`]).
///
/// # Errors
/// If the state directory or control socket cannot be set up.
pub async fn start(
    cluster: Cluster,
    lock: StateLock,
    node_bin: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Running> {
    let mut cluster = cluster;
    std::fs::create_dir_all(cluster.state_dir.join("logs")).with_context(|| {
        format!(
            "cannot create the state directory {}",
            cluster.state_dir.display()
        )
    })?;
    // Nodes run in the state directory: every path they are given (key
    // file, data directory) must not depend on where p2pctl was started.
    cluster.state_dir = std::fs::canonicalize(&cluster.state_dir).with_context(|| {
        format!(
            "cannot resolve the state directory {}",
            cluster.state_dir.display()
        )
    })?;
    let state_dir = cluster.state_dir.clone();
    let sock = control::socket_path(&state_dir);
    let _ = std::fs::remove_file(&sock); // stale: nobody answered on it
    let listener = UnixListener::bind(&sock)
        .with_context(|| format!("cannot create the control socket {}", sock.display()))?;
    std::fs::write(state_dir.join("supervisor.pid"), std::process::id().to_string())
        .with_context(|| format!("cannot write {}", state_dir.join("supervisor.pid").display()))?;
    for n in &cluster.nodes {
        // Each run starts fresh logs.
        let _ = std::fs::remove_file(state_dir.join("logs").join(format!("{}.log", n.name)));
    }
    let key_file = state_dir.join("chat.key");
    let key = if cluster.insecure {
        None
    } else {
        let (key, _) = p2p_proto::secure::read_or_create_key_file(&key_file)
            .with_context(|| format!("cannot use the cluster's chat key {}", key_file.display()))?;
        Some(std::sync::Arc::new(key))
    };
    let sup = Supervisor::new(cluster, node_bin, key, key_file);
    let handle = sup.handle();
    let events = handle.subscribe();
    let serve = tokio::spawn(crate::supervisor::serve_control(listener, handle.clone()));
    let task = tokio::spawn(sup.run(shutdown));
    Ok(Running {
        handle,
        events,
        task: Some(task),
        serve,
        state_dir,
        _lock: lock,
    })
}

/// Completes on SIGINT or SIGTERM.
pub async fn signals() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

fn progress(n: usize) -> ProgressBar {
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} starting nodes [{bar:20}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(80));
    bar
}

/// How start-up ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Startup {
    /// Every node is ready.
    Ready,
    /// A node could not start; the supervisor is stopping.
    Failed,
    /// The supervisor stopped first, as asked (`down`, Ctrl-C, SIGTERM).
    Stopped,
}

/// Waits for start-up to finish, advancing a progress bar. A `down` or a
/// signal during start-up ends it too ([`Startup::Stopped`]): waiting on
/// the event stream alone, a foreground `up` then waited for ever, its
/// nodes gone.
pub async fn wait_ready(running: &mut Running, display: &mut Display, n: usize, quiet: bool) -> Startup {
    let bar = (!quiet).then(|| progress(n));
    loop {
        match running.next_event().await {
            Some(CtlEvent::AllReady { .. }) => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                return Startup::Ready;
            }
            Some(ev @ CtlEvent::StartFailed { .. }) => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                if let Some(l) = display.line(&ev) {
                    let _ = writeln!(std::io::stderr(), "{l}");
                }
                return Startup::Failed;
            }
            Some(ev) => {
                if let (Some(b), CtlEvent::Node { node, event }) = (&bar, &ev) {
                    if event["event"] == "ready" {
                        b.inc(1);
                        b.set_message(format!("{node} ready"));
                    }
                }
                let line = display.line(&ev);
                if let (Some(l), false) = (line, quiet) {
                    match &bar {
                        Some(b) if !b.is_hidden() => b.println(l),
                        _ => say(&l),
                    }
                }
            }
            None => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                return Startup::Stopped;
            }
        }
    }
}

/// Prints a line of the supervisor's story. Output that cannot be written
/// (a full disk under `up -d`'s log, a reader gone from `p2pctl up |
/// head`) is lost; the cluster carries on (`println!` panicked, and the
/// nodes died with the supervisor).
pub fn say(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// [`say`] for text that ends its own lines (a table).
pub fn say_text(text: &str) {
    let _ = std::io::stdout().write_all(text.as_bytes());
}

/// `p2pctl up` in the foreground.
///
/// # Errors
/// If the supervisor cannot start.
pub async fn up_foreground(cluster: Cluster, lock: StateLock, quiet: bool) -> anyhow::Result<i32> {
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let n = names.len();
    let name = cluster.name.clone();
    let file = cluster.file.clone();
    let mut running = start(cluster, lock, node_bin()?, signals()).await?;
    let mut display = Display::new(&names);
    let startup = wait_ready(&mut running, &mut display, n, quiet).await;
    if startup == Startup::Ready && !quiet {
        say(&format!(
            "cluster {name} is up ({n} nodes). Ctrl-C stops it; from another terminal: p2pctl -f {} ps | kill --coordinator | logs -f",
            file.display()
        ));
    }
    while let Some(ev) = running.next_event().await {
        if let (Some(l), false) = (display.line(&ev), quiet) {
            say(&l);
        }
    }
    running.finish().await;
    if !quiet {
        say(&format!("cluster {name} stopped"));
    }
    Ok(if startup == Startup::Failed { 1 } else { 0 })
}

/// `p2pctl up` on a terminal: the supervisor runs here, the dashboard
/// shows it; quitting the dashboard stops the cluster.
///
/// # Errors
/// As [`start`], or if the terminal cannot be set up.
pub async fn up_dashboard(cluster: Cluster, lock: StateLock) -> anyhow::Result<i32> {
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let n = names.len();
    let view = cluster.clone();
    let mut running = start(cluster, lock, node_bin()?, signals()).await?;
    let mut display = Display::new(&names);
    match wait_ready(&mut running, &mut display, n, false).await {
        Startup::Ready => {}
        startup => {
            running.finish().await;
            return Ok(if startup == Startup::Failed { 1 } else { 0 });
        }
    }
    // The dashboard talks to this very supervisor over its socket; events
    // for the stream display are not needed meanwhile.
    let shown = crate::watch::watch(&view, crate::watch::Owner::Foreground).await;
    let _ = crate::control::call(&view.state_dir, &view.name, &crate::control::Request::Down).await;
    while running.next_event().await.is_some() {}
    running.finish().await;
    shown
}

/// `p2pctl up -d`: starts a background supervisor and waits until every
/// node is running.
///
/// # Errors
/// If it cannot start, or start-up fails (with the supervisor's log tail).
pub async fn up_detached(cluster: &Cluster) -> anyhow::Result<i32> {
    ensure_not_running(cluster).await?;
    cluster.check_plugins(&node_bin()?)?;
    // The background supervisor takes the state directory's lock, then
    // makes supervisor.log its output. Until then its stderr comes here:
    // a second `up -d` racing this one says why it stopped.
    let log_path = cluster.state_dir.join("supervisor.log");
    let exe = std::env::current_exe().context("while locating p2pctl")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("-f")
        .arg(&cluster.file)
        .args(["up", "--supervise"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe; it detaches the supervisor from
    // this terminal so closing it does not stop the cluster.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("while starting the background supervisor")?;
    let n = cluster.nodes.len();
    let bar = progress(n);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bar.finish_and_clear();
            let mut early = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut err, &mut early);
            }
            if !early.trim().is_empty() {
                // It stopped before its log was its own: what it said is here.
                bail!("{}", early.trim().trim_start_matches("p2pctl: "));
            }
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = tail
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            bail!(
                "the background supervisor stopped during start-up ({status}); its log {} ends with:\n{}",
                log_path.display(),
                tail.join("\n")
            );
        }
        if let Ok(resp) = control::call(&cluster.state_dir, &cluster.name, &Request::Ps).await {
            let rows = resp.data.and_then(|d| d.as_array().cloned()).unwrap_or_default();
            let ready = rows.iter().filter(|r| r["state"] == "running").count();
            bar.set_position(ready as u64);
            if ready == n {
                bar.finish_and_clear();
                let coord = rows
                    .iter()
                    .find(|r| r["role"] == "coordinator")
                    .and_then(|r| r["name"].as_str());
                say(&format!(
                    "cluster {} is up in the background: {n} nodes, coordinator {} (supervisor pid {}); `p2pctl -f {} down` stops it",
                    cluster.name,
                    coord.unwrap_or("?"),
                    child.id(),
                    cluster.file.display()
                ));
                return Ok(0);
            }
        }
        if Instant::now() > deadline {
            bar.finish_and_clear();
            bail!(
                "the cluster did not become ready within 30 s; see {} and {}",
                log_path.display(),
                cluster.state_dir.join("logs").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
