//! `p2pnode`: one peer of a p2pchat group chat.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use p2p_node::core::CoreConfig;
use p2p_node::{run, EventFormat, NodeConfig, Sink};
use p2p_proto::secure::{self, ChatKey};

/// One peer of a p2pchat group chat: start a chat, or join one through any
/// member. Lines typed on stdin are chat messages; /who lists members,
/// /quit leaves.
#[derive(Parser, Debug)]
#[command(
    name = "p2pnode",
    version,
    after_help = "\
Examples:
  p2pnode --name alice --listen 127.0.0.1:7101
  p2pnode --name bob   --listen 127.0.0.1:7102 --join 127.0.0.1:7101
  p2pnode --name carol --listen 127.0.0.1:7103 --join 127.0.0.1:7102,127.0.0.1:7101"
)]
struct Args {
    /// Your name in the chat: 1 to 32 letters, digits, '_', '-' or '.' (e.g. alice.b)
    #[arg(long)]
    name: String,
    /// Address this node's server listens on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Address peers should use to reach this node (default: the listening address).
    #[arg(long)]
    advertise: Option<String>,
    /// A peer to join through; repeat or give a comma list, tried in order.
    /// Without it, a new chat starts with this node as coordinator.
    #[arg(long, value_delimiter = ',')]
    join: Vec<String>,
    /// If no --join peer answers, start a new chat instead of failing.
    #[arg(long)]
    create_if_alone: bool,
    /// Do not read stdin (for supervisors); stop with SIGTERM or SIGINT.
    #[arg(long)]
    headless: bool,
    /// How events are printed on stdout.
    #[arg(long, value_enum, default_value_t = EventFormat::Human)]
    events: EventFormat,
    /// Heartbeat interval; a peer that misses 3 is dead.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    heartbeat_ms: u64,
    /// Messages of history a newcomer receives.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    history: u64,
    /// Time a new connection has to say hello.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    handshake_timeout_ms: u64,
    /// A bot plugin for a chat this node starts: NAME or NAME:CONFIG_JSON
    /// (repeatable; called in this order). A node that joins a chat takes
    /// the chat's plugins instead.
    #[arg(long = "plugin", value_name = "NAME[:CONFIG_JSON]")]
    plugins: Vec<String>,
    /// Directory holding plugin libraries (lib<name>.so); default: the
    /// directory of this executable.
    #[arg(long)]
    plugin_dir: Option<std::path::PathBuf>,
    /// The only directory plugins may write in (the logger's transcript
    /// path is relative to it); created when a plugin loads.
    #[arg(long, value_name = "DIR", default_value = "p2pchat-data")]
    data_dir: std::path::PathBuf,
    /// The chat key (64 hex digits, mode 0600). A node that starts a chat
    /// creates it if missing; joiners need a copy. [default: ./p2pchat.key]
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    key_file: Option<std::path::PathBuf>,
    /// No key, no encryption: anyone who can reach the port can join, read
    /// and disrupt the chat (for measurements and trusted loopback only).
    #[arg(long)]
    insecure: bool,
    /// Load each --plugin (in a scratch data directory), print one JSON line
    /// per plugin (`{"plugin","state":"loaded"|"refused","detail"}`) and
    /// exit: 0 if all load, 2 if not. Joins nothing (p2pctl validate uses
    /// it).
    #[arg(long)]
    check_plugins: bool,
    /// Bytes that may wait unread for one member before it is disconnected.
    #[arg(long, default_value_t = 8 << 20, value_parser = clap::value_parser!(u64).range(65_536..=1 << 30))]
    queue_limit_bytes: u64,
    /// Fault testing: a file listing addresses (one per line) this node is
    /// cut off from, as if the network between them dropped every packet,
    /// or, as `nodial ADDR`, cannot open connections to (one way); read
    /// every heartbeat/4 (cargo xtask torture --partitions and --one-way
    /// write it).
    #[arg(long, value_name = "FILE")]
    cut_file: Option<std::path::PathBuf>,
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
    if let Err(e) = p2p_proto::limits::check_name(&args.name) {
        eprintln!("p2pnode: invalid --name: {e}");
        std::process::exit(2);
    }
    if args.check_plugins {
        std::process::exit(check_plugins(&args));
    }
    p2p_proto::net::keep_buffers_in_heap();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("p2pnode: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(serve(args)) {
        Ok(code) => code,
        Err(e) => {
            p2p_node::output::to_stderr(&format!("p2pnode: {e:#}"));
            1
        }
    };
    // stdin's blocking reader may still be parked; do not wait for it.
    std::process::exit(code);
}

async fn serve(args: Args) -> anyhow::Result<i32> {
    // Every --join entry is an address: an empty one (an unset variable,
    // a stray comma) started a chat of its own instead of joining.
    for j in &args.join {
        if j.trim().is_empty() {
            anyhow::bail!(
                "--join holds an empty address (an unset variable?); give HOST:PORT of a peer, or leave --join out to start a new chat"
            );
        }
        p2p_proto::limits::check_addr(j).map_err(|e| anyhow::anyhow!("--join {j}: {e}"))?;
    }
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
            "cannot listen on {}: the port is in use (another node?); choose another --listen",
            args.listen
        ),
        Err(e) => anyhow::bail!(
            "cannot listen on {}: {e}; give --listen HOST:PORT, e.g. 127.0.0.1:7101 (port 0 picks a free one)",
            args.listen
        ),
    };
    let local = listener
        .local_addr()
        .context("while reading the listening address")?;
    let advertise = match args.advertise {
        Some(a) => a,
        None if local.ip().is_unspecified() => {
            anyhow::bail!(
                "--listen {} is a wildcard address; give --advertise HOST:PORT so peers can reach this node",
                args.listen
            )
        }
        None => local.to_string(),
    };
    p2p_proto::limits::check_addr(&advertise).map_err(|e| anyhow::anyhow!("--advertise: {e}"))?;
    let starts = args.join.is_empty() || args.create_if_alone;
    let key = if args.insecure {
        None
    } else {
        let path = args
            .key_file
            .clone()
            .unwrap_or_else(|| secure::DEFAULT_KEY_FILE.into());
        Some(load_key(&path, starts)?)
    };
    let mut core = CoreConfig::new(args.name, advertise);
    core.session = p2p_proto::random_u64();
    core.chat_id = format!("{:016x}{:016x}", p2p_proto::random_u64(), p2p_proto::random_u64());
    core.join = args.join;
    core.create_if_alone = args.create_if_alone;
    core.heartbeat_ms = args.heartbeat_ms;
    core.replay = args.history as usize;
    core.message_events = args.events != EventFormat::None;
    for spec in &args.plugins {
        core.plugins
            .push(plugin_ref(spec).map_err(|e| anyhow::anyhow!("--plugin {spec}: {e}"))?);
    }
    let mut cfg = NodeConfig::new(core);
    cfg.handshake_timeout = Duration::from_millis(args.handshake_timeout_ms);
    cfg.queue_bytes = args.queue_limit_bytes as usize;
    cfg.read_stdin = !args.headless;
    if let Some(dir) = args.plugin_dir {
        cfg.plugin_dir = dir;
    }
    cfg.data_dir = args.data_dir;
    cfg.cut_file = args.cut_file;
    let mut sink = Sink::stdout(args.events);
    {
        use std::io::IsTerminal;
        sink.set_style(p2p_node::output::HumanStyle {
            colour: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
            typed_here: !args.headless && std::io::stdin().is_terminal(),
            times: std::io::stdout().is_terminal(),
        });
    }
    match &key {
        Some((k, path, created)) => sink.key(Some((&k.id(), path, *created))),
        None => sink.key(None),
    }
    cfg.security = key.map(|(k, _, _)| std::sync::Arc::new(k));
    run(listener, cfg, sink, shutdown_signal()).await
}

/// A `--plugin NAME[:JSON]` argument (no configuration is `{}`), checked.
fn plugin_ref(spec: &str) -> Result<p2p_proto::PluginRef, p2p_node::core::PluginRefError> {
    let (name, config) = spec.split_once(':').unwrap_or((spec, "{}"));
    p2p_node::core::check_plugin_name(name)?;
    p2p_node::core::check_plugin_config(name, config)?;
    Ok(p2p_proto::PluginRef {
        name: name.to_string(),
        config: config.to_string(),
    })
}

/// `--check-plugins`: loads every `--plugin` the way a coordinator would,
/// in a scratch data directory, and says what each did.
fn check_plugins(args: &Args) -> i32 {
    use p2p_node::core::hooks::{Hooks, PluginEvent};
    let scratch = std::env::temp_dir().join(format!("p2pnode-check-{}", std::process::id()));
    let plugin_dir = args
        .plugin_dir
        .clone()
        .unwrap_or_else(p2p_node::default_plugin_dir);
    let mut host = p2p_node::plugins::PluginHost::new(plugin_dir, scratch.clone());
    let mut set = Vec::new();
    let mut code = 0;
    for spec in &args.plugins {
        match plugin_ref(spec) {
            Ok(p) => set.push(p),
            Err(detail) => {
                let name = spec.split_once(':').map_or(spec.as_str(), |(n, _)| n);
                println!(
                    "{}",
                    serde_json::json!({"plugin": name, "state": "refused", "detail": detail.to_string()})
                );
                code = 2;
            }
        }
    }
    for r in host.set_plugins("check", &set) {
        let state = match r.state {
            PluginEvent::Loaded => "loaded",
            _ => {
                code = 2;
                "refused"
            }
        };
        println!(
            "{}",
            serde_json::json!({"plugin": r.plugin, "state": state, "detail": r.detail})
        );
    }
    drop(host);
    let _ = std::fs::remove_dir_all(&scratch);
    code
}

/// Reads the chat key; a node starting a chat creates it when missing.
fn load_key(path: &std::path::Path, starts: bool) -> anyhow::Result<(ChatKey, std::path::PathBuf, bool)> {
    let (key, created) = if starts {
        secure::read_or_create_key_file(path)?
    } else {
        (secure::read_key_file(path)?, false)
    };
    Ok((key, path.to_path_buf(), created))
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending::<()>().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
