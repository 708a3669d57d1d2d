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

/// A cluster file that cannot be used, with the sentence to show.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

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
    Err(ConfigError(
        "no cluster file: neither cluster.yaml nor cluster.example.yaml is in the current directory; pass -f FILE".into(),
    ))
}

impl Cluster {
    /// Reads and checks a cluster file, including that its ports are free.
    ///
    /// # Errors
    /// The first problem found, as a sentence with file and line.
    pub fn load(file: &Path) -> Result<Cluster, ConfigError> {
        let cluster = Cluster::load_unbound(file)?;
        cluster.check_ports_free()?;
        Ok(cluster)
    }

    /// Reads and checks a cluster file without probing its ports (for
    /// commands that talk to a running cluster).
    ///
    /// # Errors
    /// The first problem found, as a sentence with file and line.
    pub fn load_unbound(file: &Path) -> Result<Cluster, ConfigError> {
        let shown = file.display().to_string();
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError(format!("{shown}: cannot read the cluster file: {e}")))?;
        Cluster::parse(&text, file)
    }

    /// Parses and checks cluster-file text (ports not probed).
    ///
    /// # Errors
    /// Every problem found (one sentence per line, each with file and
    /// line); a file YAML cannot read stops at the first.
    pub fn parse(text: &str, file: &Path) -> Result<Cluster, ConfigError> {
        let shown = file.display().to_string();
        let text = &interpolate(text, |v| std::env::var(v).ok())
            .map_err(|(line, why)| ConfigError(format!("{shown}:{line}: {why}")))?;
        if text.trim().is_empty() {
            return Err(ConfigError(format!(
                "{shown} is empty; a cluster file needs at least `name:` and `nodes:` (cluster.example.yaml documents every key)"
            )));
        }
        let raw: RawCluster = serde_yaml::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!("{shown}:{}:{}", l.line(), l.column()));
            let msg = e.to_string();
            // serde_yaml appends "at line L column C"; we lead with it instead.
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            // Rust type names mean nothing to a YAML author.
            let msg = msg
                .replace("expected u16", "expected a port number from 0 to 65535")
                .replace("expected u64", "expected a whole number")
                .replace("expected u32", "expected a whole number");
            ConfigError(format!("{}: {msg}", at.unwrap_or(shown.clone())))
        })?;
        let line = |key: &str, value: &str, nth: usize| -> String {
            match find_line(text, key, value, nth) {
                Some(l) => format!("{shown}:{l}"),
                None => shown.clone(),
            }
        };
        // Every problem at once, each at its line.
        let mut errors: Vec<String> = Vec::new();
        if let Err(e) = check_cluster_name(&raw.name) {
            errors.push(format!("{}: {e}", line("name", &raw.name, 0)));
        }
        let host: IpAddr = raw.host.parse().unwrap_or_else(|_| {
            errors.push(format!(
                "{}: host {:?} is not an IP address; use an address such as 127.0.0.1",
                line("host", &raw.host, 0),
                raw.host
            ));
            IpAddr::from([127, 0, 0, 1])
        });
        if !(10..=60_000).contains(&raw.heartbeat_ms) {
            errors.push(format!(
                "{}: heartbeat_ms must be between 10 and 60000, got {}",
                line("heartbeat_ms", &raw.heartbeat_ms.to_string(), 0),
                raw.heartbeat_ms
            ));
        }
        let r = &raw.restart;
        if r.backoff_ms == 0 || r.max_backoff_ms < r.backoff_ms {
            errors.push(format!(
                "{}: restart.backoff_ms must be at least 1 and not above max_backoff_ms ({} > {})",
                line("backoff_ms", &r.backoff_ms.to_string(), 0),
                r.backoff_ms,
                r.max_backoff_ms
            ));
        }
        if raw.nodes.is_empty() {
            errors.push(format!("{shown}: nodes is empty; list at least one node"));
        }
        if raw.nodes.len() > 64 {
            errors.push(format!(
                "{shown}: {} nodes listed; p2pctl runs at most 64",
                raw.nodes.len()
            ));
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut ports: HashMap<u16, usize> = HashMap::new();
        let mut name_seen: HashMap<&str, usize> = HashMap::new();
        for (i, n) in raw.nodes.iter().enumerate() {
            let nth = name_seen.entry(n.name.as_str()).or_insert(0);
            let here = line("name", &n.name, *nth);
            *nth += 1;
            if let Err(e) = p2p_proto::limits::check_name(&n.name) {
                errors.push(format!("{here}: node {e}"));
            }
            if let Some(first) = names.insert(&n.name, i) {
                let there = line("name", &n.name, 0);
                errors.push(format!(
                    "{here}: node name {} is used twice (first at {there}, node #{}); give each node its own name",
                    n.name,
                    first + 1
                ));
            }
            if n.port != 0 {
                if let Some(first) = ports.insert(n.port, i) {
                    errors.push(format!(
                        "{}: port {} of node {} is already used by node {}; give each node its own port",
                        line("port", &n.port.to_string(), 1),
                        n.port,
                        n.name,
                        raw.nodes[first].name
                    ));
                }
            }
        }
        let mut plugin_names: HashMap<&str, ()> = HashMap::new();
        for p in &raw.plugins {
            if p.name.is_empty()
                || p.name.len() > 64
                || !p
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
            {
                errors.push(format!(
                    "{}: plugin name {:?} must be 1-64 characters of a-z 0-9 _ -",
                    line("name", &p.name, 0),
                    p.name
                ));
            }
            if plugin_names.insert(&p.name, ()).is_some() {
                errors.push(format!(
                    "{}: plugin {} is listed twice",
                    line("name", &p.name, 1),
                    p.name
                ));
            }
        }
        if !errors.is_empty() {
            return Err(ConfigError(errors.join("\n")));
        }
        let dir = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let state_dir = dir.join(".p2pctl").join(&raw.name);
        let plugin_dir = match &raw.plugin_dir {
            None => None,
            Some(d) => {
                let path = dir.join(d);
                match std::fs::canonicalize(&path) {
                    Ok(abs) if abs.is_dir() => Some(abs),
                    _ => {
                        return Err(ConfigError(format!(
                            "{}: plugin_dir {d:?} is not a directory (relative paths start at the cluster file's directory; e.g. target/release after cargo build --release)",
                            line("plugin_dir", d, 0)
                        )))
                    }
                }
            }
        };
        Ok(Cluster {
            plugin_dir,
            name: raw.name,
            host,
            heartbeat_ms: raw.heartbeat_ms,
            stop_grace_ms: raw.stop_grace_ms,
            restart: raw.restart,
            nodes: raw.nodes,
            plugins: raw.plugins,
            file: file.to_path_buf(),
            state_dir,
            insecure: raw.insecure,
        })
    }

    /// Fails if any fixed port is already taken.
    fn check_ports_free(&self) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        for n in self.nodes.iter().filter(|n| n.port != 0) {
            let addr = SocketAddr::new(self.host, n.port);
            if let Err(e) = TcpListener::bind(addr) {
                let at = match find_line(&text, "port", &n.port.to_string(), 0) {
                    Some(l) => format!("{}:{l}", self.file.display()),
                    None => self.file.display().to_string(),
                };
                let why = if e.kind() == std::io::ErrorKind::AddrInUse {
                    "is already in use".to_string()
                } else {
                    format!("cannot be bound ({e})")
                };
                return Err(ConfigError(format!(
                    "{at}: port {} of node {} {why} on {}; stop what uses it or choose another port",
                    n.port, n.name, self.host
                )));
            }
        }
        Ok(())
    }
}

fn check_cluster_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 40
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "cluster name {name:?} must be 1-40 characters of A-Z a-z 0-9 _ - (it names the state directory)"
        ));
    }
    Ok(())
}

/// The 1-based line of the `nth` (0-based) `key: value` in `text`, written
/// either as `key: value` or `- key: value`, quoted or not.
impl Cluster {
    /// `FILE:LINE` of a plugin's entry (just `FILE` if it cannot be found).
    pub fn plugin_location(&self, name: &str) -> String {
        let shown = self.file.display().to_string();
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        match find_line(&text, "name", name, 0) {
            Some(l) => format!("{shown}:{l}"),
            None => shown,
        }
    }

    /// Loads every plugin of the file with `node_bin --check-plugins`, the
    /// way a coordinator will, so a missing library or a bad configuration
    /// is reported before anything starts, at its line in the file.
    ///
    /// # Errors
    /// Each refusal, one per line, naming the plugin, its line and why.
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
        let out = cmd.output().map_err(|e| {
            ConfigError(format!(
                "cannot run {} to check the plugins: {e}",
                node_bin.display()
            ))
        })?;
        let mut refused = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["state"] != "loaded" {
                let name = v["plugin"].as_str().unwrap_or_default();
                refused.push(format!(
                    "{}: plugin {name} cannot be loaded: {}",
                    self.plugin_location(name),
                    v["detail"].as_str().unwrap_or("no reason given")
                ));
            }
        }
        if refused.is_empty() && !out.status.success() {
            refused.push(format!(
                "{} --check-plugins failed: {}",
                node_bin.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(refused.join("\n")))
        }
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

    #[test]
    fn unknown_key_names_line() {
        let e = parse("name: demo\nnodez: []\n").unwrap_err().0;
        assert!(e.starts_with("c.yaml:2:"), "{e}");
        assert!(e.contains("unknown field `nodez`"), "{e}");
    }

    #[test]
    fn duplicate_name_names_both_lines() {
        let e = parse("name: demo\nnodes:\n  - name: a\n    port: 1\n  - name: a\n    port: 2\n")
            .unwrap_err()
            .0;
        assert!(e.starts_with("c.yaml:5:"), "{e}");
        assert!(e.contains("used twice") && e.contains("c.yaml:3"), "{e}");
    }

    #[test]
    fn duplicate_port_names_line() {
        let e = parse("name: demo\nnodes:\n  - name: a\n    port: 7\n  - name: b\n    port: 7\n")
            .unwrap_err()
            .0;
        assert!(e.starts_with("c.yaml:6:"), "{e}");
        assert!(e.contains("port 7 of node b is already used by node a"), "{e}");
    }

    #[test]
    fn bad_host_and_values() {
        let e = parse("name: demo\nhost: over.there\nnodes:\n  - name: a\n    port: 1\n")
            .unwrap_err()
            .0;
        assert!(
            e.starts_with("c.yaml:2:") && e.contains("not an IP address"),
            "{e}"
        );
        let e = parse("name: demo\nheartbeat_ms: 1\nnodes:\n  - name: a\n    port: 1\n")
            .unwrap_err()
            .0;
        assert!(e.contains("heartbeat_ms"), "{e}");
        let e = parse("name: demo\nnodes: []\n").unwrap_err().0;
        assert!(e.contains("nodes is empty"), "{e}");
        let e = parse("name: demo\nnodes:\n  - name: a b\n    port: 1\n")
            .unwrap_err()
            .0;
        assert!(e.starts_with("c.yaml:3:"), "{e}");
        let e = parse("name: demo\nrestart:\n  policy: sometimes\nnodes:\n  - name: a\n    port: 1\n")
            .unwrap_err()
            .0;
        assert!(e.starts_with("c.yaml:3:") && e.contains("sometimes"), "{e}");
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
        let e = Cluster::load(&file).unwrap_err().0;
        assert!(e.contains(":4:") && e.contains("already in use"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
