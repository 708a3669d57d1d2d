//! `p2pctl`: bring up, watch, break and repair a local p2pchat cluster.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Parser, Subcommand};
use p2p_ctl::config::{default_file, Cluster};
use p2p_ctl::control::{self, Request, Response};
use p2p_ctl::display::ps_table;
use p2p_ctl::{demo, logs, run};

#[derive(Parser, Debug)]
#[command(
    name = "p2pctl",
    version,
    about = "Bring up, watch, break and repair a local p2pchat cluster",
    after_help = "\
Examples:
  p2pctl demo                         # the whole story in one command
  p2pctl up -d                        # start cluster.yaml (or cluster.example.yaml) in the background
  p2pctl ps
  p2pctl kill --coordinator           # SIGKILL whoever coordinates now; watch the re-election
  p2pctl say bob hello everyone
  p2pctl logs -f
  p2pctl check                        # do all nodes agree on the delivered sequence?
  p2pctl down"
)]
struct Args {
    /// Cluster file (default: cluster.yaml, else cluster.example.yaml).
    #[arg(short, long)]
    file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `-f FILE` after the command name (`p2pctl up -f my.yaml`).
#[derive(clap::Args, Debug, Default)]
struct FileArg {
    /// Cluster file (default: cluster.yaml, else cluster.example.yaml).
    #[arg(short, long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start every node and supervise them; on a terminal the live
    /// dashboard opens (q or Ctrl-C stops the cluster).
    Up {
        #[command(flatten)]
        f: FileArg,
        /// Return once all nodes are ready, leaving the supervisor in the background.
        #[arg(short, long)]
        detach: bool,
        /// Print the event stream instead of opening the dashboard (the
        /// default when stdout is not a terminal).
        #[arg(long, conflicts_with = "detach")]
        stream: bool,
        /// Internal: run as the background supervisor.
        #[arg(long, hide = true)]
        supervise: bool,
    },
    /// Check the cluster file and the ports, start nothing.
    Validate {
        #[command(flatten)]
        f: FileArg,
    },
    /// One row per node: pid, address, state, role, epoch, restarts, uptime.
    Ps {
        #[command(flatten)]
        f: FileArg,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send a signal to a node, or to whichever node is coordinator now.
    #[command(override_usage = "p2pctl kill [--signal SIGNAL] <NODE | --coordinator>")]
    Kill {
        #[command(flatten)]
        f: FileArg,
        /// The node to signal.
        #[arg(required_unless_present = "coordinator", conflicts_with = "coordinator")]
        node: Option<String>,
        /// Signal the current coordinator.
        #[arg(long)]
        coordinator: bool,
        /// KILL, TERM, INT, STOP or CONT.
        #[arg(long, short, default_value = "KILL")]
        signal: String,
    },
    /// Start a stopped node; it rejoins through any live peer.
    Start {
        #[command(flatten)]
        f: FileArg,
        node: String,
    },
    /// Stop a node (TERM, then KILL after the grace period); it stays down.
    Stop {
        #[command(flatten)]
        f: FileArg,
        node: String,
    },
    /// Stop a node and start it again.
    Restart {
        #[command(flatten)]
        f: FileArg,
        node: String,
    },
    /// Post a chat message as a node.
    Say {
        #[command(flatten)]
        f: FileArg,
        node: String,
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Live dashboard of a running cluster: nodes, chat, failovers, bots;
    /// keys to kill, stop, restart, say, attach and check. q leaves it
    /// (the cluster keeps running).
    Watch {
        #[command(flatten)]
        f: FileArg,
    },
    /// Show node logs, merged with name prefixes unless a node is named.
    Logs {
        /// Cluster file (default: cluster.yaml, else cluster.example.yaml).
        #[arg(long = "file", value_name = "FILE")]
        file: Option<PathBuf>,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines (then follow, with -f).
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        node: Option<String>,
    },
    /// Attach (or reconfigure) a bot plugin on the running cluster.
    Attach {
        #[command(flatten)]
        f: FileArg,
        /// Plugin name (a lib<name>.so in the nodes' plugin directory).
        name: String,
        /// Configuration as YAML/JSON text, or @FILE to read it from a file.
        #[arg(long)]
        config: Option<String>,
    },
    /// Detach a bot plugin from the running cluster.
    Detach {
        #[command(flatten)]
        f: FileArg,
        name: String,
    },
    /// Plugins of the chat: name, version, state, calls, drops, time spent.
    Plugins {
        #[command(flatten)]
        f: FileArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check that all live nodes delivered the same messages in the same order.
    Check {
        #[command(flatten)]
        f: FileArg,
        /// Print the result as JSON (agreement, message seqs, per node).
        #[arg(long)]
        json: bool,
    },
    /// Stop the cluster and its supervisor.
    Down {
        #[command(flatten)]
        f: FileArg,
    },
    /// The story: up, chat, kill the coordinator, re-election, restart, check, down.
    Demo {
        #[command(flatten)]
        f: FileArg,
        /// Pause between steps so the story can be followed (0 for none).
        #[arg(long, default_value_t = 700)]
        pace_ms: u64,
    },
    /// Print a shell completion script (e.g. `p2pctl completions bash >
    /// ~/.local/share/bash-completion/completions/p2pctl`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; `p2pctl man | man -l -`).
    Man,
}

impl Cmd {
    /// The `-f FILE` given after the command name, if any.
    fn file(&self) -> Option<&PathBuf> {
        match self {
            Cmd::Logs { file, .. } => file.as_ref(),
            Cmd::Up { f, .. }
            | Cmd::Validate { f }
            | Cmd::Ps { f, .. }
            | Cmd::Kill { f, .. }
            | Cmd::Start { f, .. }
            | Cmd::Stop { f, .. }
            | Cmd::Restart { f, .. }
            | Cmd::Say { f, .. }
            | Cmd::Attach { f, .. }
            | Cmd::Detach { f, .. }
            | Cmd::Plugins { f, .. }
            | Cmd::Check { f, .. }
            | Cmd::Down { f }
            | Cmd::Demo { f, .. }
            | Cmd::Watch { f } => f.file.as_ref(),
            Cmd::Completions { .. } | Cmd::Man => None,
        }
    }
}

/// A line on stdout ([`p2p_ctl::run::say`]: a reader that left early or a
/// full disk loses it, and never panics the command).
macro_rules! out {
    ($($arg:tt)*) => {
        p2p_ctl::run::say(&format!($($arg)*))
    };
}

/// Text that ends its own lines (a table), on stdout the same way.
macro_rules! out_text {
    ($($arg:tt)*) => {
        p2p_ctl::run::say_text(&format!($($arg)*))
    };
}

/// Writes `bytes` to stdout. A reader that left early (`p2pctl man |
/// head`) is not an error; a full disk is.
fn write_out(bytes: &[u8]) -> anyhow::Result<i32> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::anyhow!("cannot write to stdout: {e}"))
        }
        _ => Ok(0),
    }
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // One thread: node processes are spawned from it, and their
    // parent-death signal is tied to the spawning thread.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("p2pctl: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(dispatch(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("p2pctl: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

async fn call(cluster: &Cluster, req: Request) -> anyhow::Result<serde_json::Value> {
    let resp: Response = control::call(&cluster.state_dir, &cluster.name, &req).await?;
    if !resp.ok {
        bail!(resp.error.unwrap_or_else(|| "the supervisor refused".into()));
    }
    Ok(resp.data.unwrap_or(serde_json::Value::Null))
}

/// Waits for what became of the line `node` queued under `client_seq`:
/// delivered (maybe rewritten by a bot) or dropped by a bot. Other lines
/// posted at the same node meanwhile carry other numbers. Without a number
/// (a node from before the `posted` answer), the node's first own line
/// delivered or rejected counts. Returns the exit code.
async fn say_outcome(
    events: &mut tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    node: &str,
    text: &str,
    client_seq: Option<u64>,
) -> i32 {
    let ours = |event: &serde_json::Value| client_seq.is_none_or(|cs| event["client_seq"] == cs);
    let wait = async {
        while let Ok(Some(line)) = events.next_line().await {
            let Ok(p2p_ctl::supervisor::CtlEvent::Node { node: n, event }) = serde_json::from_str(&line)
            else {
                continue;
            };
            if n != node || !ours(&event) {
                continue;
            }
            match event["event"].as_str() {
                Some("message")
                    if event["from"] == node && event["bot"].is_null() && event["replay"] != true =>
                {
                    let seq = &event["seq"];
                    return match event["text"].as_str() {
                        Some(t) if t == text => {
                            out!("delivered at seq {seq}");
                            0
                        }
                        Some(t) => {
                            out!("delivered at seq {seq}, rewritten by a bot to: {t}");
                            0
                        }
                        None => 0,
                    };
                }
                Some("rejected") => {
                    eprintln!(
                        "p2pctl: not delivered: {}",
                        event["reason"].as_str().unwrap_or("a bot dropped it")
                    );
                    return 1;
                }
                _ => {}
            }
        }
        0
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), wait).await {
        Ok(code) => code,
        Err(_) => {
            out!(
                "queued at {node}; not delivered within 5 s (is a majority of the voters running? p2pctl ps)"
            );
            0
        }
    }
}

async fn dispatch(args: Args) -> anyhow::Result<i32> {
    // These need no cluster file.
    match &args.cmd {
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            // Into a buffer first: `generate` panics when a write fails.
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Args::command(), "p2pctl", &mut script);
            return write_out(&script);
        }
        Cmd::Man => {
            use clap::CommandFactory;
            let mut page = Vec::new();
            clap_mangen::Man::new(Args::command()).render(&mut page)?;
            return write_out(&page);
        }
        _ => {}
    }
    let file = default_file(args.cmd.file().or(args.file.as_ref()).map(PathBuf::as_path))?;
    match args.cmd {
        Cmd::Validate { .. } => {
            let c = Cluster::load(&file)?;
            c.check_plugins(&run::node_bin()?)?;
            use p2p_ctl::display::count;
            out!(
                "{}: cluster {} is valid: {} on {}, {} (each loads), restart policy {}",
                file.display(),
                c.name,
                count(&c.nodes.len().into(), "node", "nodes"),
                c.host,
                count(&c.plugins.len().into(), "plugin", "plugins"),
                c.restart.policy
            );
            Ok(0)
        }
        Cmd::Up { detach: true, .. } => run::up_detached(&Cluster::load(&file)?).await,
        // `--supervise` (the background half of `up -d`) runs the same
        // foreground supervisor; its output goes to supervisor.log.
        // The `up -d` that started it has checked the plugins already.
        Cmd::Up { supervise: true, .. } => {
            let cluster = Cluster::load(&file)?;
            let lock = run::lock_state_dir(&cluster)?;
            run::output_to(&cluster.state_dir.join("supervisor.log"))?;
            run::up_foreground(cluster, lock, false).await
        }
        Cmd::Up { stream, .. } => {
            use std::io::IsTerminal;
            let cluster = Cluster::load(&file)?;
            cluster.check_plugins(&run::node_bin()?)?;
            let lock = run::lock_state_dir(&cluster)?;
            if stream || !std::io::stdout().is_terminal() {
                run::up_foreground(cluster, lock, false).await
            } else {
                run::up_dashboard(cluster, lock).await
            }
        }
        Cmd::Watch { .. } => {
            let cluster = Cluster::load_unbound(&file)?;
            p2p_ctl::watch::watch(&cluster, p2p_ctl::watch::Owner::Attached).await
        }
        Cmd::Demo { pace_ms, .. } => {
            demo::demo(Cluster::load(&file)?, std::time::Duration::from_millis(pace_ms)).await
        }
        Cmd::Logs {
            follow, tail, node, ..
        } => logs::logs(&Cluster::load_unbound(&file)?, node.as_deref(), follow, tail).await,
        cmd => {
            let cluster = Cluster::load_unbound(&file)?;
            client(&cluster, cmd).await
        }
    }
}

/// The commands that talk to a running cluster's supervisor; returns the
/// exit code.
async fn client(cluster: &Cluster, cmd: Cmd) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Ps { json, .. } => {
            let rows = call(cluster, Request::Ps).await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                out_text!("{}", ps_table(rows.as_array().map(Vec::as_slice).unwrap_or(&[])));
            }
        }
        Cmd::Kill {
            node,
            coordinator,
            signal,
            ..
        } => {
            let d = call(
                cluster,
                Request::Kill {
                    node,
                    coordinator,
                    signal,
                },
            )
            .await?;
            let role = if d["was_coordinator"] == true {
                " (the coordinator)"
            } else {
                ""
            };
            out!(
                "sent SIG{} to {}{role}, pid {}",
                d["signal"].as_str().unwrap_or("?").trim_start_matches("SIG"),
                d["node"].as_str().unwrap_or("?"),
                d["pid"]
            );
        }
        Cmd::Start { node, .. } => {
            call(cluster, Request::Start { node: node.clone() }).await?;
            out!("starting {node}");
        }
        Cmd::Stop { node, .. } => {
            let d = call(cluster, Request::Stop { node: node.clone() }).await?;
            if d["was"] == "not running" {
                out!("{node} is not running (stopped already)");
            } else {
                out!("stopping {node}");
            }
        }
        Cmd::Restart { node, .. } => {
            call(cluster, Request::Restart { node: node.clone() }).await?;
            out!("restarting {node}");
        }
        Cmd::Say { node, text, .. } => return say(cluster, node, text.join(" ")).await,
        Cmd::Attach { name, config, .. } => {
            let config = plugin_config_arg(config)?;
            let d = call(
                cluster,
                Request::Attach {
                    name: name.clone(),
                    config,
                },
            )
            .await?;
            out!(
                "attached {name} (coordinator {})",
                d["coordinator"].as_str().unwrap_or("?")
            );
        }
        Cmd::Detach { name, .. } => {
            call(cluster, Request::Detach { name: name.clone() }).await?;
            out!("detached {name}");
        }
        Cmd::Plugins { json, .. } => {
            let d = call(cluster, Request::Plugins).await?;
            let list = d["plugins"].as_array().cloned().unwrap_or_default();
            if json {
                out!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                out_text!(
                    "{}",
                    plugins_table(&list, d["coordinator"].as_str().unwrap_or("?"))
                );
            }
        }
        Cmd::Check { json, .. } => {
            let d = call(cluster, Request::Check).await?;
            if json {
                out!("{d}");
            } else {
                out_text!("{}", check_report(&d));
            }
            return Ok(if d["agree"] == true { 0 } else { 1 });
        }
        Cmd::Down { .. } => down(cluster).await?,
        _ => unreachable!("handled in dispatch"),
    }
    Ok(0)
}

/// `say`: posts as `node`, then waits for its delivery or the reason it
/// was dropped (exit 1).
async fn say(cluster: &Cluster, node: String, text: String) -> anyhow::Result<i32> {
    p2p_proto::limits::check_text(&text).map_err(|e| anyhow::anyhow!("cannot send that: {e}"))?;
    // Listen first, so the outcome cannot slip past.
    let mut events = control::subscribe(&cluster.state_dir, &cluster.name).await?;
    let posted = call(
        cluster,
        Request::Say {
            node: node.clone(),
            text: text.clone(),
        },
    )
    .await?;
    Ok(say_outcome(&mut events, &node, &text, posted["client_seq"].as_u64()).await)
}

/// `attach --config`: YAML or JSON text, or `@FILE`; none is `{}`.
fn plugin_config_arg(config: Option<String>) -> anyhow::Result<String> {
    let Some(c) = config else {
        return Ok("{}".to_string());
    };
    let text = match c.strip_prefix('@') {
        Some(path) => p2p_ctl::config::read_small_text(
            std::path::Path::new(path),
            64 << 10,
            "a plugin's configuration is at most 8 KiB of JSON",
        )
        .map_err(|why| anyhow::anyhow!("cannot read the plugin configuration file {path}: {why}"))?,
        None => c,
    };
    let v: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("--config is neither YAML nor JSON: {e}"))?;
    Ok(p2p_ctl::config::yaml_to_json(&v))
}

/// The `plugins` table.
fn plugins_table(list: &[serde_json::Value], coordinator: &str) -> String {
    if list.is_empty() {
        return format!("no plugins attached (coordinator {coordinator})\n");
    }
    let mut out = format!(
        "{:<14} {:<9} {:<13} {:<12} {:>8} {:>6} {:>10}\n",
        "NAME", "VERSION", "BUILD", "STATE", "CALLS", "DROPS", "TIME"
    );
    for p in list {
        out.push_str(&format!(
            "{:<14} {:<9} {:<13} {:<12} {:>8} {:>6} {:>8}us{}\n",
            p["name"].as_str().unwrap_or(""),
            p["version"].as_str().unwrap_or(""),
            p["build"].as_str().unwrap_or("-"),
            p["state"].as_str().unwrap_or(""),
            p["calls"].to_string(),
            p["drops"].to_string(),
            p["time_us"].to_string(),
            p["error"]
                .as_str()
                .map(|e| format!("  ({e})"))
                .or_else(|| {
                    let hears: Vec<String> = p["hears"].as_array()?.iter().map(|h| format!("{h}")).collect();
                    (!hears.is_empty()).then(|| format!("  (hears only {})", hears.join(", ")))
                })
                .unwrap_or_default()
        ));
    }
    out
}

/// What `check` prints: one line if the nodes agree, else the difference
/// and each node's position.
fn check_report(d: &serde_json::Value) -> String {
    let nodes = d["nodes"].as_array().cloned().unwrap_or_default();
    if d["agree"] == true {
        return format!(
            "ok: {} agree on {} ({} up to seq {}; same order, no gaps, no duplicates)\n",
            p2p_ctl::display::count(&nodes.len().into(), "node", "nodes"),
            p2p_ctl::display::count(&d["messages"], "message", "messages"),
            p2p_ctl::display::count(&d["entries"], "log entry", "log entries"),
            d["last_seq"]
        );
    }
    let mut out = format!("DISAGREE: {}\n", d["difference"].as_str().unwrap_or("?"));
    for n in nodes {
        out.push_str(&format!(
            "  {} last_seq {} held {} gaps {}\n",
            n["name"].as_str().unwrap_or(""),
            n["last_seq"],
            n["held"],
            n["gaps"]
        ));
    }
    out
}

/// `down`: stops the cluster and waits for the supervisor to be gone.
async fn down(cluster: &Cluster) -> anyhow::Result<()> {
    let pid = std::fs::read_to_string(cluster.state_dir.join("supervisor.pid")).unwrap_or_default();
    match control::call(&cluster.state_dir, &cluster.name, &Request::Down).await {
        Err(control::ClientError::NotRunning { .. }) => {
            out!("cluster {}: nothing running", cluster.name);
            return Ok(());
        }
        Err(e) => return Err(anyhow::Error::new(e).context("while stopping the cluster")),
        Ok(r) if !r.ok => bail!(r.error.unwrap_or_else(|| "the supervisor refused".into())),
        Ok(_) => {}
    }
    if let Ok(pid) = pid.trim().parse::<i32>() {
        let pid = nix::unistd::Pid::from_raw(pid);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while nix::sys::signal::kill(pid, None).is_ok() {
            if std::time::Instant::now() > end {
                bail!("the nodes stopped but the supervisor (pid {pid}) is still running; kill it");
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    out!("cluster {} stopped", cluster.name);
    Ok(())
}
