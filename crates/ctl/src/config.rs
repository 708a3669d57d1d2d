//! The cluster file: its shape, and every check made before anything
//! starts. Each error names the file, the line and what to change.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// When a node that exits is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Never restart.
    Never,
    /// Restart after a crash (non-zero exit or a signal p2pctl did not send).
    OnFailure,
    /// Restart whenever it exits, even after `p2pctl kill`; not after `p2pctl stop`.
    Always,
}

impl std::fmt::Display for Policy {
    /// As written in the cluster file.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::Never => "never",
            Policy::OnFailure => "on-failure",
            Policy::Always => "always",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    #[serde(default = "default_policy")]
    pub policy: Policy,
    /// Restarts allowed before the node is marked failed.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// First delay before a restart; doubles with each restart.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Ceiling for the doubling delay.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

/// What to do when a node exits on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Leave it exited (the policy does not restart this exit).
    Stay,
    /// Start it again after `delay_ms`; this is restart number `nth`.
    Restart { delay_ms: u64, nth: u32 },
    /// Too many restarts in a row: mark it failed.
    Fail,
}

/// A node that ran this long before exiting starts a fresh series of
/// restarts (its counter decays): one crash a day never adds up to
/// `max_restarts`.
pub const RESTART_DECAY_MS: u64 = 60_000;

impl Restart {
    /// The decision for one exit. `killed_by_user`: `p2pctl kill` sent it
    /// (restarted only under `always`); `restarts`: restarts so far in
    /// this series; `ran_ms`: how long this run lasted.
    pub fn after_exit(&self, success: bool, killed_by_user: bool, restarts: u32, ran_ms: u64) -> AfterExit {
        let wanted = match self.policy {
            Policy::Never => false,
            Policy::Always => true,
            Policy::OnFailure => !success && !killed_by_user,
        };
        if !wanted {
            return AfterExit::Stay;
        }
        let done = if ran_ms >= RESTART_DECAY_MS { 0 } else { restarts };
        if done >= self.max_restarts {
            return AfterExit::Fail;
        }
        AfterExit::Restart {
            delay_ms: self
                .backoff_ms
                .saturating_mul(1u64 << done.min(20))
                .min(self.max_backoff_ms),
            nth: done + 1,
        }
    }
}

impl Default for Restart {
    fn default() -> Restart {
        Restart {
            policy: default_policy(),
            max_restarts: default_max_restarts(),
            backoff_ms: default_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}

fn default_policy() -> Policy {
    Policy::OnFailure
}
fn default_max_restarts() -> u32 {
    5
}
fn default_backoff_ms() -> u64 {
    200
}
fn default_max_backoff_ms() -> u64 {
    5000
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_heartbeat() -> u64 {
    100
}
fn default_grace() -> u64 {
    3000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    /// 0 lets the system pick a free port at each start.
    pub port: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    pub name: String,
    #[serde(default)]
    pub config: serde_yaml::Value,
}

impl PluginSpec {
    /// The configuration as JSON text (`{}` when absent).
    pub fn config_json(&self) -> String {
        yaml_to_json(&self.config)
    }
}

/// YAML configuration → JSON text for a plugin (`{}` for null).
pub fn yaml_to_json(v: &serde_yaml::Value) -> String {
    if v.is_null() {
        return "{}".into();
    }
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: String,
    #[serde(default = "default_host")]
    host: String,
    #[serde(default = "default_heartbeat")]
    heartbeat_ms: u64,
    #[serde(default = "default_grace")]
    stop_grace_ms: u64,
    #[serde(default)]
    restart: Restart,
    nodes: Vec<NodeSpec>,
    #[serde(default)]
    plugins: Vec<PluginSpec>,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    plugin_dir: Option<String>,
}

/// A checked cluster description.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub host: IpAddr,
    pub heartbeat_ms: u64,
    /// Time between SIGTERM and SIGKILL when stopping a node.
    pub stop_grace_ms: u64,
    pub restart: Restart,
    pub nodes: Vec<NodeSpec>,
    pub plugins: Vec<PluginSpec>,
    /// Where nodes load plugin libraries from (absolute); `None`: next to
    /// the p2pnode binary.
    pub plugin_dir: Option<PathBuf>,
    /// The file it came from.
    pub file: PathBuf,
    /// `.p2pctl/<name>/` next to the file.
    pub state_dir: PathBuf,
    /// Run the nodes without a chat key (`insecure: true`): for
    /// measurements only. Otherwise the key is `<state_dir>/chat.key`.
    pub insecure: bool,
}

/// Where in a cluster file something is: the file, and its line (and
/// column) when known. Shown as `FILE`, `FILE:LINE` or `FILE:LINE:COL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl Location {
    fn file(file: &Path) -> Location {
        Location {
            file: file.to_path_buf(),
            line: None,
            column: None,
        }
    }

    fn line(file: &Path, line: Option<usize>) -> Location {
        Location {
            line,
            ..Location::file(file)
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        Ok(())
    }
}

/// Largest cluster file read (a real one is a few KiB of YAML).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// A cluster file's text: at most [`MAX_FILE_BYTES`], and UTF-8.
fn read_text(file: &Path) -> Result<String, ConfigError> {
    read_small_text(file, MAX_FILE_BYTES, "a cluster file is a few KiB of YAML").map_err(|why| {
        ConfigError::Unreadable {
            file: file.to_path_buf(),
            why,
        }
    })
}

/// A small text file a person wrote: at most `max` bytes, and UTF-8.
/// Otherwise the reason, in words (`what` says what the file should be).
///
/// # Errors
/// The file cannot be read, holds more than `max` bytes, or a line of it
/// is not UTF-8.
pub fn read_small_text(file: &Path, max: u64, what: &str) -> Result<String, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!("it holds more than {} KiB; {what}", max >> 10));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|b| **b == b'\n').count();
        format!("line {line} is not UTF-8 text; write the file in UTF-8")
    })
}

/// A cluster file that cannot be used. Its `Display` is the sentence to
/// show: where, what, and what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no cluster file: neither cluster.yaml nor cluster.example.yaml is in the current directory; pass -f FILE")]
    NoFile,
    #[error("{}: cannot read the cluster file: {why}", .file.display())]
    Unreadable { file: PathBuf, why: String },
    #[error("{} is empty; a cluster file needs at least `name:` and `nodes:` (cluster.example.yaml documents every key)", .file.display())]
    Empty { file: PathBuf },
    /// Text YAML cannot read, or a `${VAR}` that cannot be replaced.
    #[error("{at}: {why}")]
    Syntax { at: Location, why: String },
    /// Every problem found in a readable file, each at its line.
    #[error("{}", join_lines(.0))]
    Invalid(Vec<Problem>),
    #[error("{at}: port {port} of node {node} {} on {host}; stop what uses it or choose another port",
            if *.in_use { "is already in use".to_string() } else { format!("cannot be bound ({})", .why) })]
    PortUnavailable {
        at: Location,
        node: String,
        port: u16,
        host: IpAddr,
        in_use: bool,
        why: String,
    },
    /// Plugins `p2pnode --check-plugins` refused, each at its line.
    #[error("{}", join_lines(.0))]
    PluginsRefused(Vec<PluginRefusal>),
    #[error("cannot run {} to check the plugins: {why}", .bin.display())]
    CheckerMissing { bin: PathBuf, why: std::io::Error },
    #[error("{} --check-plugins failed: {stderr}", .bin.display())]
    CheckerFailed { bin: PathBuf, stderr: String },
}

impl ConfigError {
    /// The problems of an [`ConfigError::Invalid`] file (none otherwise).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(p) => p,
            _ => &[],
        }
    }
}

fn join_lines<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// One problem in a cluster file, at its line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {kind}")]
pub struct Problem {
    pub at: Location,
    pub kind: ProblemKind,
}

/// What is wrong, with the values involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProblemKind {
    #[error("cluster name {0:?} must be 1-40 characters of A-Z a-z 0-9 _ - (it names the state directory)")]
    ClusterName(String),
    #[error("host {0:?} is not an IP address; use an address such as 127.0.0.1")]
    Host(String),
    #[error("heartbeat_ms must be between 10 and 60000, got {0}")]
    Heartbeat(u64),
    #[error("restart.backoff_ms must be at least 1 and not above max_backoff_ms ({backoff_ms} > {max_backoff_ms})")]
    Backoff { backoff_ms: u64, max_backoff_ms: u64 },
    #[error("nodes is empty; list at least one node")]
    NoNodes,
    #[error("{0} nodes listed; p2pctl runs at most {MAX_NODES}")]
    TooManyNodes(usize),
    /// A node name the protocol refuses; `why` is its rule.
    #[error("node {why}")]
    NodeName { name: String, why: String },
    #[error("node name {name} is used twice (first at {first}, node #{}); give each node its own name", .first_index + 1)]
    NodeNameTwice {
        name: String,
        first: Location,
        first_index: usize,
    },
    #[error("port {port} of node {node} is already used by node {other}; give each node its own port")]
    PortTwice { port: u16, node: String, other: String },
    #[error("plugin name {0:?} must be 1-64 characters of a-z 0-9 _ -")]
    PluginName(String),
    #[error("plugin {0} is listed twice")]
    PluginTwice(String),
    #[error("plugin_dir {0:?} is not a directory (relative paths start at the cluster file's directory; e.g. target/release after cargo build --release)")]
    PluginDir(String),
}

/// A plugin of the file that a node would refuse, at its line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: plugin {plugin} cannot be loaded: {why}")]
pub struct PluginRefusal {
    pub at: Location,
    pub plugin: String,
    pub why: String,
}

/// The most nodes one cluster file may list.
pub const MAX_NODES: usize = 64;

/// Picks the cluster file: `-f FILE`, else `cluster.yaml`, else
/// `cluster.example.yaml` in the current directory.
///
/// # Errors
/// When none is given and neither default exists.
pub fn default_file(given: Option<&Path>) -> Result<PathBuf, ConfigError> {
    if let Some(f) = given {
        return Ok(f.to_path_buf());
    }
    for name in ["cluster.yaml", "cluster.example.yaml"] {
        if Path::new(name).exists() {
            return Ok(PathBuf::from(name));
        }
    }
    Err(ConfigError::NoFile)
}

/// The text of a cluster file, to find the line of a key.
struct Lines<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Lines<'_> {
    /// Where the `nth` (0-based) `key: value` is.
    fn at(&self, key: &str, value: &str, nth: usize) -> Location {
        Location::line(self.file, find_line(self.text, key, value, nth))
    }
}

impl Cluster {
    /// Reads and checks a cluster file, including that its ports are free.
    ///
    /// # Errors
    /// The problems found, each with file and line.
    pub fn load(file: &Path) -> Result<Cluster, ConfigError> {
        let cluster = Cluster::load_unbound(file)?;
        cluster.check_ports_free()?;
        Ok(cluster)
    }

    /// Reads and checks a cluster file without probing its ports (for
    /// commands that talk to a running cluster).
    ///
    /// # Errors
    /// The problems found, each with file and line.
    pub fn load_unbound(file: &Path) -> Result<Cluster, ConfigError> {
        Cluster::parse(&read_text(file)?, file)
    }

    /// Parses and checks cluster-file text (ports not probed).
    ///
    /// # Errors
    /// Every problem found, each with file and line
    /// ([`ConfigError::Invalid`]); a file YAML cannot read stops at the
    /// first ([`ConfigError::Syntax`]).
    pub fn parse(text: &str, file: &Path) -> Result<Cluster, ConfigError> {
        let original = text;
        let text =
            &interpolate(text, |v| std::env::var(v).ok()).map_err(|(line, why)| ConfigError::Syntax {
                at: Location::line(file, Some(line)),
                why,
            })?;
        let raw = read_yaml(text, file).map_err(|e| match e {
            // A variable's value is put in the text as it is, so YAML reads
            // it as syntax: say which variable came from where.
            ConfigError::Syntax { at, why } => {
                let vars = at
                    .line
                    .and_then(|l| original.lines().nth(l.saturating_sub(1)))
                    .map(variables_in)
                    .unwrap_or_default();
                let why = match vars.first() {
                    Some(v) => format!(
                        "{why} (this line takes ${{{v}}} from the environment: a value holding YAML syntax such as `: `, ` #` or a leading `[`, `{{`, `*`, `&` or `!` must be quoted, e.g. \"${{{v}}}\")"
                    ),
                    None => why,
                };
                ConfigError::Syntax { at, why }
            }
            e => e,
        })?;
        let lines = Lines { text, file };
        let mut problems = raw.problems(&lines);
        let host: IpAddr = raw.host.parse().unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let dir = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let plugin_dir = raw
            .plugin_dir
            .as_ref()
            .and_then(|d| match std::fs::canonicalize(dir.join(d)) {
                Ok(abs) if abs.is_dir() => Some(abs),
                _ => {
                    problems.push(Problem {
                        at: lines.at("plugin_dir", d, 0),
                        kind: ProblemKind::PluginDir(d.clone()),
                    });
                    None
                }
            });
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Cluster {
            plugin_dir,
            state_dir: dir.join(".p2pctl").join(&raw.name),
            name: raw.name,
            host,
            heartbeat_ms: raw.heartbeat_ms,
            stop_grace_ms: raw.stop_grace_ms,
            restart: raw.restart,
            nodes: raw.nodes,
            plugins: raw.plugins,
            file: file.to_path_buf(),
            insecure: raw.insecure,
        })
    }

    /// Fails if any fixed port is already taken.
    fn check_ports_free(&self) -> Result<(), ConfigError> {
        let text = read_text(&self.file).unwrap_or_default();
        let lines = Lines {
            text: &text,
            file: &self.file,
        };
        for n in self.nodes.iter().filter(|n| n.port != 0) {
            if let Err(e) = TcpListener::bind(SocketAddr::new(self.host, n.port)) {
                return Err(ConfigError::PortUnavailable {
                    at: lines.at("port", &n.port.to_string(), 0),
                    node: n.name.clone(),
                    port: n.port,
                    host: self.host,
                    in_use: e.kind() == std::io::ErrorKind::AddrInUse,
                    why: e.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// YAML text → the raw file, or where and why YAML cannot read it.
fn read_yaml(text: &str, file: &Path) -> Result<RawCluster, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError::Empty {
            file: file.to_path_buf(),
        });
    }
    serde_yaml::from_str(text).map_err(|e| {
        let at = Location {
            file: file.to_path_buf(),
            line: e.location().map(|l| l.line()),
            column: e.location().map(|l| l.column()),
        };
        let msg = e.to_string();
        // serde_yaml appends "at line L column C"; we lead with it instead.
        let msg = msg.split(" at line ").next().unwrap_or(&msg);
        // Rust type names mean nothing to a YAML author.
        let why = msg
            .replace("expected u16", "expected a port number from 0 to 65535")
            .replace("expected u64", "expected a whole number")
            .replace("expected u32", "expected a whole number");
        ConfigError::Syntax { at, why }
    })
}

impl RawCluster {
    /// Every problem of a file YAML could read, each at its line.
    fn problems(&self, lines: &Lines) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut add = |at: Location, kind: ProblemKind| problems.push(Problem { at, kind });
        if !valid_cluster_name(&self.name) {
            add(
                lines.at("name", &self.name, 0),
                ProblemKind::ClusterName(self.name.clone()),
            );
        }
        if self.host.parse::<IpAddr>().is_err() {
            add(
                lines.at("host", &self.host, 0),
                ProblemKind::Host(self.host.clone()),
            );
        }
        if !(10..=60_000).contains(&self.heartbeat_ms) {
            add(
                lines.at("heartbeat_ms", &self.heartbeat_ms.to_string(), 0),
                ProblemKind::Heartbeat(self.heartbeat_ms),
            );
        }
        let r = &self.restart;
        if r.backoff_ms == 0 || r.max_backoff_ms < r.backoff_ms {
            add(
                lines.at("backoff_ms", &r.backoff_ms.to_string(), 0),
                ProblemKind::Backoff {
                    backoff_ms: r.backoff_ms,
                    max_backoff_ms: r.max_backoff_ms,
                },
            );
        }
        if self.nodes.is_empty() {
            add(Location::file(lines.file), ProblemKind::NoNodes);
        }
        if self.nodes.len() > MAX_NODES {
            add(
                Location::file(lines.file),
                ProblemKind::TooManyNodes(self.nodes.len()),
            );
        }
        problems.extend(self.node_problems(lines));
        problems.extend(self.plugin_problems(lines));
        problems
    }

    /// Node names the protocol refuses, names and ports used twice.
    fn node_problems(&self, lines: &Lines) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut ports: HashMap<u16, usize> = HashMap::new();
        let mut name_seen: HashMap<&str, usize> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let nth = name_seen.entry(n.name.as_str()).or_insert(0);
            let here = lines.at("name", &n.name, *nth);
            *nth += 1;
            if let Err(why) = p2p_proto::limits::check_name(&n.name) {
                problems.push(Problem {
                    at: here.clone(),
                    kind: ProblemKind::NodeName {
                        name: n.name.clone(),
                        why,
                    },
                });
            }
            if let Some(first) = names.insert(&n.name, i) {
                problems.push(Problem {
                    at: here,
                    kind: ProblemKind::NodeNameTwice {
                        name: n.name.clone(),
                        first: lines.at("name", &n.name, 0),
                        first_index: first,
                    },
                });
            }
            if n.port == 0 {
                continue;
            }
            if let Some(first) = ports.insert(n.port, i) {
                problems.push(Problem {
                    at: lines.at("port", &n.port.to_string(), 1),
                    kind: ProblemKind::PortTwice {
                        port: n.port,
                        node: n.name.clone(),
                        other: self.nodes[first].name.clone(),
                    },
                });
            }
        }
        problems
    }

    /// Plugin names that cannot name a library, plugins listed twice.
    fn plugin_problems(&self, lines: &Lines) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in &self.plugins {
            if !p2p_proto::limits::valid_plugin_name(&p.name) {
                problems.push(Problem {
                    at: lines.at("name", &p.name, 0),
                    kind: ProblemKind::PluginName(p.name.clone()),
                });
            }
            if !seen.insert(p.name.as_str()) {
                problems.push(Problem {
                    at: lines.at("name", &p.name, 1),
                    kind: ProblemKind::PluginTwice(p.name.clone()),
                });
            }
        }
        problems
    }
}

fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl Cluster {
    /// Where a plugin's entry is in the file (just the file if it cannot be
    /// found).
    pub fn plugin_location(&self, name: &str) -> Location {
        let text = read_text(&self.file).unwrap_or_default();
        Location::line(&self.file, find_line(&text, "name", name, 0))
    }

    /// Loads every plugin of the file with `node_bin --check-plugins`, the
    /// way a coordinator will, so a missing library or a bad configuration
    /// is reported before anything starts, at its line in the file.
    ///
    /// # Errors
    /// Each refusal ([`ConfigError::PluginsRefused`]), or why the check
    /// could not run.
    pub fn check_plugins(&self, node_bin: &Path) -> Result<(), ConfigError> {
        if self.plugins.is_empty() {
            return Ok(());
        }
        let mut cmd = std::process::Command::new(node_bin);
        cmd.args(["--name", "check", "--check-plugins"]);
        if let Some(dir) = &self.plugin_dir {
            cmd.arg("--plugin-dir").arg(dir);
        }
        for p in &self.plugins {
            cmd.arg("--plugin").arg(format!("{}:{}", p.name, p.config_json()));
        }
        let out = cmd.output().map_err(|why| ConfigError::CheckerMissing {
            bin: node_bin.to_path_buf(),
            why,
        })?;
        let mut refused = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["state"] != "loaded" {
                let name = v["plugin"].as_str().unwrap_or_default();
                refused.push(PluginRefusal {
                    at: self.plugin_location(name),
                    plugin: name.to_string(),
                    why: v["detail"].as_str().unwrap_or("no reason given").to_string(),
                });
            }
        }
        if !refused.is_empty() {
            return Err(ConfigError::PluginsRefused(refused));
        }
        if !out.status.success() {
            return Err(ConfigError::CheckerFailed {
                bin: node_bin.to_path_buf(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
}

/// Replaces `${VAR}` with the environment variable `VAR` and
/// `${VAR:-default}` with it or `default` when unset or empty; `$$` is a
/// literal `$`. Errors name the line and the variable.
fn interpolate(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<String, (usize, String)> {
    let mut out = String::with_capacity(text.len());
    for (n, whole) in text.split_inclusive('\n').enumerate() {
        // Comments are left as written.
        let (line, comment) = whole.split_at(comment_start(whole).unwrap_or(whole.len()));
        let mut rest = line;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            if let Some(more) = after.strip_prefix('$') {
                out.push('$');
                rest = more;
            } else if let Some(body) = after.strip_prefix('{') {
                let Some(end) = body.find('}') else {
                    return Err((n + 1, "`${` without a closing `}`".into()));
                };
                let (name, default) = match body[..end].split_once(":-") {
                    Some((name, d)) => (name, Some(d)),
                    None => (&body[..end], None),
                };
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err((n + 1, format!("`${{{}}}` is not a variable name", &body[..end])));
                }
                match (env(name).filter(|v| !v.is_empty()), default) {
                    (Some(v), _) if v.contains(['\n', '\r']) => {
                        return Err((
                            n + 1,
                            format!("environment variable {name} holds a line break; a cluster file takes one-line values"),
                        ))
                    }
                    (Some(v), _) => out.push_str(&v),
                    (None, Some(d)) => out.push_str(d),
                    (None, None) => {
                        return Err((
                            n + 1,
                            format!(
                                "environment variable {name} is not set (give a default: ${{{name}:-value}})"
                            ),
                        ))
                    }
                }
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        out.push_str(comment);
    }
    Ok(out)
}

/// The names of the `${VAR}`s on a line, outside its comment.
fn variables_in(line: &str) -> Vec<&str> {
    let line = &line[..comment_start(line).unwrap_or(line.len())];
    line.split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}'))
        .map(|(body, _)| body.split(":-").next().unwrap_or(body))
        .collect()
}

/// Where a YAML comment starts on this line: a `#` at the start or after
/// whitespace, outside quotes.
fn comment_start(line: &str) -> Option<usize> {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev.is_whitespace() => return Some(i),
            _ => {}
        }
        prev = c;
    }
    None
}

fn find_line(text: &str, key: &str, value: &str, nth: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let l = l.trim_start().trim_start_matches("- ").trim_start();
            let Some(rest) = l.strip_prefix(key).and_then(|r| r.strip_prefix(':')) else {
                return false;
            };
            let v = rest
                .split(" #")
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches(['"', '\'']);
            v == value
        })
        .map(|(i, _)| i + 1)
        .nth(nth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_follow_the_policy_double_their_delay_and_decay() {
        let r = |policy| Restart {
            policy,
            max_restarts: 3,
            backoff_ms: 100,
            max_backoff_ms: 250,
        };
        let on = r(Policy::OnFailure);
        assert_eq!(on.after_exit(true, false, 0, 10), AfterExit::Stay, "a clean exit");
        assert_eq!(on.after_exit(false, true, 0, 10), AfterExit::Stay, "p2pctl kill");
        let delays: Vec<AfterExit> = (0..4).map(|n| on.after_exit(false, false, n, 10)).collect();
        assert_eq!(
            delays,
            [
                AfterExit::Restart {
                    delay_ms: 100,
                    nth: 1
                },
                AfterExit::Restart {
                    delay_ms: 200,
                    nth: 2
                },
                AfterExit::Restart {
                    delay_ms: 250,
                    nth: 3
                },
                AfterExit::Fail,
            ]
        );
        assert_eq!(
            on.after_exit(false, false, 3, RESTART_DECAY_MS),
            AfterExit::Restart {
                delay_ms: 100,
                nth: 1
            },
            "a long run starts a new series"
        );
        assert_eq!(r(Policy::Never).after_exit(false, false, 0, 10), AfterExit::Stay);
        assert_eq!(
            r(Policy::Always).after_exit(true, true, 0, 10),
            AfterExit::Restart {
                delay_ms: 100,
                nth: 1
            }
        );
    }

    #[test]
    fn variables_are_taken_from_the_environment() {
        let env = |v: &str| match v {
            "PORT" => Some("7200".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        assert_eq!(
            interpolate(
                "port: ${PORT} # not ${THIS}\nhost: ${HOST:-127.0.0.1}\nx: ${EMPTY:-d} $$5 $x\n# ${NOR_THIS}\ny: \"#${PORT}\"\n",
                env
            )
            .unwrap(),
            "port: 7200 # not ${THIS}\nhost: 127.0.0.1\nx: d $5 $x\n# ${NOR_THIS}\ny: \"#7200\"\n"
        );
        let (line, why) = interpolate("a: 1\nb: ${NOPE}\n", env).unwrap_err();
        assert_eq!(line, 2);
        assert!(
            why.contains("NOPE is not set") && why.contains("${NOPE:-value}"),
            "{why}"
        );
        assert_eq!(interpolate("a: ${X\n", env).unwrap_err().0, 1);
        let env = |v: &str| (v == "TWO").then(|| "a\nb: c".to_string());
        let (line, why) = interpolate("a: 1\nb: ${TWO}\n", env).unwrap_err();
        assert_eq!(line, 2);
        assert!(why.contains("TWO holds a line break"), "{why}");
        assert!(interpolate("a: ${X Y}\n", env)
            .unwrap_err()
            .1
            .contains("not a variable name"));
    }

    fn parse(text: &str) -> Result<Cluster, ConfigError> {
        Cluster::parse(text, Path::new("c.yaml"))
    }

    const GOOD: &str = "name: demo\nnodes:\n  - name: a\n    port: 7001\n  - name: b\n    port: 7002\n";

    #[test]
    fn defaults_apply() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.host.to_string(), "127.0.0.1");
        assert_eq!(c.heartbeat_ms, 100);
        assert_eq!(c.restart.policy, Policy::OnFailure);
        assert_eq!(c.state_dir, Path::new(".").join(".p2pctl").join("demo"));
    }

    /// The problems of text that must be refused, as (line, kind).
    fn problems(text: &str) -> Vec<(Option<usize>, ProblemKind)> {
        match parse(text) {
            Err(ConfigError::Invalid(p)) => p.into_iter().map(|p| (p.at.line, p.kind)).collect(),
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn unknown_key_names_line() {
        let Err(ConfigError::Syntax { at, why }) = parse("name: demo\nnodez: []\n") else {
            panic!("a syntax error expected");
        };
        assert_eq!(at.line, Some(2));
        assert!(why.contains("unknown field `nodez`"), "{why}");
        assert!(ConfigError::Syntax { at, why }
            .to_string()
            .starts_with("c.yaml:2:"));
    }

    #[test]
    fn duplicate_name_names_both_lines() {
        let p = problems("name: demo\nnodes:\n  - name: a\n    port: 1\n  - name: a\n    port: 2\n");
        let first = Location::line(Path::new("c.yaml"), Some(3));
        assert_eq!(
            p,
            vec![(
                Some(5),
                ProblemKind::NodeNameTwice {
                    name: "a".into(),
                    first,
                    first_index: 0
                }
            )]
        );
        let shown = parse("name: demo\nnodes:\n  - name: a\n    port: 1\n  - name: a\n    port: 2\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            shown,
            "c.yaml:5: node name a is used twice (first at c.yaml:3, node #1); give each node its own name"
        );
    }

    #[test]
    fn duplicate_port_names_line() {
        let p = problems("name: demo\nnodes:\n  - name: a\n    port: 7\n  - name: b\n    port: 7\n");
        assert_eq!(
            p,
            vec![(
                Some(6),
                ProblemKind::PortTwice {
                    port: 7,
                    node: "b".into(),
                    other: "a".into()
                }
            )]
        );
    }

    #[test]
    fn bad_host_and_values() {
        assert_eq!(
            problems("name: demo\nhost: over.there\nnodes:\n  - name: a\n    port: 1\n"),
            vec![(Some(2), ProblemKind::Host("over.there".into()))]
        );
        assert_eq!(
            problems("name: demo\nheartbeat_ms: 1\nnodes:\n  - name: a\n    port: 1\n"),
            vec![(Some(2), ProblemKind::Heartbeat(1))]
        );
        assert_eq!(
            problems("name: demo\nnodes: []\n"),
            vec![(None, ProblemKind::NoNodes)]
        );
        let p = problems("name: demo\nnodes:\n  - name: a b\n    port: 1\n");
        assert!(
            matches!(&p[..], [(Some(3), ProblemKind::NodeName { name, .. })] if name == "a b"),
            "{p:?}"
        );
        let Err(ConfigError::Syntax { at, why }) =
            parse("name: demo\nrestart:\n  policy: sometimes\nnodes:\n  - name: a\n    port: 1\n")
        else {
            panic!("an unknown policy is a syntax error");
        };
        assert_eq!(at.line, Some(3));
        assert!(why.contains("sometimes"), "{why}");
    }

    #[test]
    fn every_problem_is_reported_at_once_each_at_its_line() {
        let p = problems(
            "name: \"bad name\"\nheartbeat_ms: 5\nrestart:\n  backoff_ms: 0\nnodes:\n  - name: a\n    port: 7\n  - name: b\n    port: 7\nplugins:\n  - name: Echo\n  - name: x\n  - name: x\nplugin_dir: nowhere\n",
        );
        assert_eq!(
            p,
            vec![
                (Some(1), ProblemKind::ClusterName("bad name".into())),
                (Some(2), ProblemKind::Heartbeat(5)),
                (
                    Some(4),
                    ProblemKind::Backoff {
                        backoff_ms: 0,
                        max_backoff_ms: Restart::default().max_backoff_ms
                    }
                ),
                (
                    Some(9),
                    ProblemKind::PortTwice {
                        port: 7,
                        node: "b".into(),
                        other: "a".into()
                    }
                ),
                (Some(11), ProblemKind::PluginName("Echo".into())),
                (Some(13), ProblemKind::PluginTwice("x".into())),
                (Some(14), ProblemKind::PluginDir("nowhere".into())),
            ]
        );
        assert_eq!(parse("").unwrap_err().to_string().lines().count(), 1);
        assert!(matches!(parse("  \n"), Err(ConfigError::Empty { .. })));
    }

    /// A file that is not a cluster file (binary, endless, a directory)
    /// gets one sentence naming it, read no further than the limit.
    #[test]
    fn unreadable_files_are_named_once() {
        let dir = std::env::temp_dir().join(format!("p2pctl-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let latin1 = dir.join("latin1.yaml");
        std::fs::write(&latin1, b"name: demo\n# caf\xe9\nnodes: []\n").unwrap();
        let cases = [
            (latin1.clone(), "line 2 is not UTF-8 text"),
            (PathBuf::from("/dev/zero"), "holds more than 1024 KiB"),
            (dir.clone(), "Is a directory"),
            (dir.join("missing.yaml"), "No such file"),
        ];
        for (file, want) in cases {
            let e = Cluster::load_unbound(&file).unwrap_err();
            let shown = format!("{:#}", anyhow::Error::from(e));
            assert!(
                shown.starts_with(&format!("{}: cannot read the cluster file: ", file.display()))
                    && shown.matches(want).count() == 1,
                "{shown}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn taken_port_is_refused() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("p2pctl-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.yaml");
        std::fs::write(
            &file,
            format!("name: demo\nnodes:\n  - name: a\n    port: {port}\n"),
        )
        .unwrap();
        let e = Cluster::load(&file).unwrap_err();
        assert!(
            matches!(&e, ConfigError::PortUnavailable { at, port: p, in_use: true, .. } if at.line == Some(4) && *p == port),
            "{e:?}"
        );
        assert!(e.to_string().contains("already in use"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
