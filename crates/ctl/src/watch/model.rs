//! What the dashboard knows, built only from what the supervisor says
//! (`ps`, `plugins`, and its event stream). No terminal here: the render
//! tests and the event loop share it.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use serde_json::Value;

use crate::supervisor::CtlEvent;

/// Chat lines kept for display (the newest).
const CHAT_KEPT: usize = 400;
/// Failovers kept in the timeline (the newest).
const FAILOVERS_KEPT: usize = 50;
/// Seqs remembered per node to compare with the others.
const SEQS_KEPT: usize = 4096;

/// One node as the dashboard shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeRow {
    pub name: String,
    pub pid: Option<u64>,
    pub state: String,
    pub role: Option<String>,
    pub epoch: u64,
    pub voter: bool,
    pub restarts: u64,
    pub uptime_ms: Option<u64>,
    /// Why it cannot make progress (its last `waiting` event), if it waits.
    pub waiting: Option<String>,
    /// Highest seq this node delivered (from its `message` events).
    pub last_seq: u64,
    /// The first seq where this node delivered something other than the
    /// others did (`None`: it agrees on every seq seen).
    pub differs_at: Option<u64>,
}

/// One line of the merged chat.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatLine {
    Message {
        seq: u64,
        epoch: u64,
        from: String,
        text: String,
        bot: bool,
    },
    /// A bot dropped or rewrote a message.
    Verdict {
        plugin: String,
        action: String,
        member: String,
        rule: String,
    },
    /// Membership and coordinator news.
    Notice(String),
}

/// One failover, from what triggered it to chat flowing again.
#[derive(Debug, Clone, PartialEq)]
pub struct Failover {
    /// What happened to the coordinator (`SIGKILL by p2pctl`, `exited`,
    /// `lost: missed heartbeats`…).
    pub cause: String,
    pub lost: String,
    /// Epoch of the lost coordinator.
    pub from_epoch: u64,
    pub started: Instant,
    /// First survivor noticing (its `electing` event), since `started`.
    pub detected_ms: Option<f64>,
    pub new_coordinator: Option<String>,
    pub epoch: Option<u64>,
    /// As the new coordinator measured it (loss to new reign).
    pub election_ms: Option<u64>,
    /// Until the first message of the new epoch was delivered, since
    /// `started`.
    pub flowing_ms: Option<f64>,
}

/// A bot as the coordinator reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct BotRow {
    pub name: String,
    pub version: String,
    pub state: String,
    pub calls: u64,
    pub drops: u64,
    pub time_us: u64,
    pub error: Option<String>,
}

/// What the dashboard asks for in its prompt line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// A line to say as this node.
    Say(String),
    /// `NAME [CONFIG]` of a bot to attach.
    Attach,
    /// The name of a bot to detach.
    Detach,
}

/// The dashboard's state.
#[derive(Debug)]
pub struct Model {
    pub cluster: String,
    pub nodes: Vec<NodeRow>,
    pub chat: VecDeque<ChatLine>,
    pub failovers: VecDeque<Failover>,
    pub bots: Vec<BotRow>,
    pub coordinator: Option<(String, u64)>,
    pub selected: usize,
    /// The result of the last action, or what is going on.
    pub status: String,
    pub prompt: Option<(Prompt, String)>,
    /// Set by `q`: the loop ends.
    pub quit: bool,
    /// Highest seq shown in the chat.
    shown_seq: u64,
    /// (from, text) per seq as first reported, to compare nodes with.
    reference: BTreeMap<u64, (String, String)>,
}

impl Model {
    pub fn new(cluster: &str) -> Model {
        Model {
            cluster: cluster.to_string(),
            nodes: Vec::new(),
            chat: VecDeque::new(),
            failovers: VecDeque::new(),
            bots: Vec::new(),
            coordinator: None,
            selected: 0,
            status: String::from("connected"),
            prompt: None,
            quit: false,
            shown_seq: 0,
            reference: BTreeMap::new(),
        }
    }

    pub fn selected_node(&self) -> Option<&str> {
        self.nodes.get(self.selected).map(|n| n.name.as_str())
    }

    pub fn select(&mut self, delta: isize) {
        if self.nodes.is_empty() {
            return;
        }
        let n = self.nodes.len() as isize;
        self.selected = (self.selected as isize + delta).rem_euclid(n) as usize;
    }

    /// Takes a `ps --json` answer (process facts; seqs stay ours).
    pub fn apply_ps(&mut self, rows: &Value) {
        let Some(rows) = rows.as_array() else { return };
        let mut nodes = Vec::with_capacity(rows.len());
        for r in rows {
            let name = r["name"].as_str().unwrap_or_default().to_string();
            let old = self.nodes.iter().find(|n| n.name == name);
            nodes.push(NodeRow {
                pid: r["pid"].as_u64(),
                state: r["state"].as_str().unwrap_or("?").to_string(),
                role: r["role"].as_str().map(str::to_string),
                epoch: r["epoch"].as_u64().unwrap_or(0),
                voter: r["voter"].as_bool().unwrap_or(false),
                restarts: r["restarts"].as_u64().unwrap_or(0),
                uptime_ms: r["uptime_ms"].as_u64(),
                waiting: r["waiting"].as_str().map(str::to_string),
                last_seq: old.map_or(0, |o| o.last_seq),
                differs_at: old.and_then(|o| o.differs_at),
                name,
            });
        }
        if let Some(c) = nodes.iter().find(|n| n.role.as_deref() == Some("coordinator")) {
            if self.coordinator.as_ref().is_none_or(|(_, e)| c.epoch >= *e) {
                self.coordinator = Some((c.name.clone(), c.epoch));
            }
        }
        self.nodes = nodes;
        self.selected = self.selected.min(self.nodes.len().saturating_sub(1));
    }

    /// Takes a `plugins` answer.
    pub fn apply_plugins(&mut self, data: &Value) {
        let Some(list) = data["plugins"].as_array() else {
            return;
        };
        self.bots = list
            .iter()
            .map(|p| BotRow {
                name: p["name"].as_str().unwrap_or_default().to_string(),
                version: p["version"].as_str().unwrap_or_default().to_string(),
                state: p["state"].as_str().unwrap_or_default().to_string(),
                calls: p["calls"].as_u64().unwrap_or(0),
                drops: p["drops"].as_u64().unwrap_or(0),
                time_us: p["time_us"].as_u64().unwrap_or(0),
                error: p["error"].as_str().map(str::to_string),
            })
            .collect();
    }

    /// Takes one supervisor event. Returns true when the process table or
    /// the bots may have changed (the caller refreshes them).
    pub fn apply_event(&mut self, ev: &CtlEvent, now: Instant) -> bool {
        match ev {
            CtlEvent::Node { node, event } => self.node_event(node, event, now),
            CtlEvent::Process { node, what } => {
                let is_coordinator = self.coordinator.as_ref().is_some_and(|(c, _)| c == node);
                let fatal = what.starts_with("sent SIGKILL")
                    || what.starts_with("sent SIGSTOP")
                    || what.starts_with("sent SIGTERM")
                    || what.starts_with("killed")
                    || what.starts_with("exited");
                if is_coordinator && fatal && !self.failover_open() {
                    // "sent SIGKILL by p2pctl kill" → "SIGKILL (p2pctl)".
                    let cause = match what.strip_prefix("sent ") {
                        Some(rest) => format!("{} (p2pctl)", rest.split(' ').next().unwrap_or(rest)),
                        None => what.clone(),
                    };
                    self.open_failover(node, cause, now);
                }
                self.notice(format!("{node}: {what}"));
                true
            }
            CtlEvent::Coordinator {
                node,
                epoch,
                election_ms,
                ..
            } => {
                self.coordinator = Some((node.clone(), *epoch));
                if let Some(f) = self.failovers.back_mut() {
                    if f.new_coordinator.is_none() && *epoch > f.from_epoch {
                        f.new_coordinator = Some(node.clone());
                        f.epoch = Some(*epoch);
                        f.election_ms = *election_ms;
                    }
                }
                self.notice(format!("★ {node} coordinates epoch {epoch}"));
                true
            }
            CtlEvent::AllReady { nodes } => {
                self.notice(format!("cluster up: {nodes} nodes ready"));
                true
            }
            CtlEvent::StartFailed { reason } => {
                self.status = format!("start-up failed: {reason}");
                true
            }
        }
    }

    fn node_event(&mut self, node: &str, e: &Value, now: Instant) -> bool {
        let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
        let from_coordinator = self.coordinator.as_ref().is_some_and(|(c, _)| c == node);
        match e["event"].as_str().unwrap_or_default() {
            "message" => {
                let seq = e["seq"].as_u64().unwrap_or(0);
                let epoch = e["epoch"].as_u64().unwrap_or(0);
                self.delivered(node, seq, (s("from"), s("text")));
                if seq > self.shown_seq {
                    self.shown_seq = seq;
                    self.push_chat(ChatLine::Message {
                        seq,
                        epoch,
                        from: s("from"),
                        text: s("text"),
                        bot: e["bot"].is_string(),
                    });
                }
                if let Some(f) = self.failovers.back_mut() {
                    if f.flowing_ms.is_none() && f.epoch.is_some_and(|n| epoch >= n) {
                        f.flowing_ms = Some(ms_since(f.started, now));
                    }
                }
                false
            }
            "electing" => {
                let lost = s("lost");
                if !self.failover_open() {
                    let reason = s("reason");
                    self.open_failover(&lost, format!("lost: {reason}"), now);
                }
                if let Some(f) = self.failovers.back_mut() {
                    if f.detected_ms.is_none() && f.lost == lost {
                        f.detected_ms = Some(ms_since(f.started, now));
                    }
                }
                true
            }
            "verdict" if from_coordinator => {
                self.push_chat(ChatLine::Verdict {
                    plugin: s("plugin"),
                    action: s("action"),
                    member: s("member"),
                    rule: s("rule"),
                });
                true
            }
            "joined" | "left" if from_coordinator => {
                let what = if e["event"] == "joined" {
                    "joined".to_string()
                } else {
                    s("reason")
                };
                self.notice(format!("{} {what}", s("name")));
                true
            }
            "plugin" if from_coordinator || e["state"] != "loaded" => {
                let detail = s("detail");
                let mut text = format!("bot {} {}", s("name"), s("state"));
                if !detail.is_empty() {
                    text.push_str(&format!(": {detail}"));
                }
                self.notice(text);
                true
            }
            "waiting" => {
                self.notice(format!("{node} waits: {}", s("reason")));
                true
            }
            "resumed" => {
                self.notice(format!("{node}: {}", s("reason")));
                true
            }
            "plugin" | "ready" | "role" | "following" => true,
            _ => false,
        }
    }

    /// Records that `node` delivered `entry` at `seq`, and whether it
    /// agrees with what others delivered there.
    fn delivered(&mut self, node: &str, seq: u64, entry: (String, String)) {
        let differs = match self.reference.get(&seq) {
            Some(known) => *known != entry,
            None => {
                self.reference.insert(seq, entry);
                while self.reference.len() > SEQS_KEPT {
                    self.reference.pop_first();
                }
                false
            }
        };
        if let Some(n) = self.nodes.iter_mut().find(|n| n.name == node) {
            n.last_seq = n.last_seq.max(seq);
            if differs && n.differs_at.is_none() {
                n.differs_at = Some(seq);
            }
        }
    }

    fn failover_open(&self) -> bool {
        self.failovers.back().is_some_and(|f| f.flowing_ms.is_none())
    }

    fn open_failover(&mut self, lost: &str, cause: String, now: Instant) {
        let from_epoch = self.coordinator.as_ref().map_or(0, |(_, e)| *e);
        self.failovers.push_back(Failover {
            cause,
            lost: lost.to_string(),
            from_epoch,
            started: now,
            detected_ms: None,
            new_coordinator: None,
            epoch: None,
            election_ms: None,
            flowing_ms: None,
        });
        while self.failovers.len() > FAILOVERS_KEPT {
            self.failovers.pop_front();
        }
    }

    fn notice(&mut self, text: String) {
        self.push_chat(ChatLine::Notice(text));
    }

    fn push_chat(&mut self, line: ChatLine) {
        self.chat.push_back(line);
        while self.chat.len() > CHAT_KEPT {
            self.chat.pop_front();
        }
    }

    /// How many nodes disagree with the others somewhere.
    pub fn disagreeing(&self) -> usize {
        self.nodes.iter().filter(|n| n.differs_at.is_some()).count()
    }
}

fn ms_since(start: Instant, now: Instant) -> f64 {
    now.saturating_duration_since(start).as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn ps(coord: &str, epoch: u64) -> Value {
        json!(["alice", "bob", "carol"]
            .iter()
            .map(|n| json!({"name": n, "pid": 100, "state": "running",
                "role": if *n == coord { "coordinator" } else { "member" },
                "epoch": epoch, "voter": true, "restarts": 0, "uptime_ms": 1500}))
            .collect::<Vec<_>>())
    }

    fn msg(node: &str, seq: u64, epoch: u64, text: &str) -> CtlEvent {
        CtlEvent::Node {
            node: node.into(),
            event: json!({"event":"message","seq":seq,"epoch":epoch,"from":"bob","text":text,"bot":null}),
        }
    }

    #[test]
    fn a_kill_of_the_coordinator_becomes_one_timed_failover() {
        let t0 = Instant::now();
        let mut m = Model::new("demo");
        m.apply_ps(&ps("alice", 1));
        m.apply_event(&msg("bob", 5, 1, "before"), t0);
        let kill = CtlEvent::Process {
            node: "alice".into(),
            what: "sent SIGKILL by p2pctl kill".into(),
        };
        m.apply_event(&kill, t0);
        let electing = CtlEvent::Node {
            node: "bob".into(),
            event: json!({"event":"electing","lost":"alice","reason":"connection closed"}),
        };
        m.apply_event(&electing, t0 + Duration::from_millis(1));
        m.apply_event(&electing, t0 + Duration::from_millis(2));
        let reign = CtlEvent::Coordinator {
            node: "bob".into(),
            epoch: 2,
            election_ms: Some(2),
            since_kill_ms: Some(3.0),
        };
        m.apply_event(&reign, t0 + Duration::from_millis(3));
        m.apply_event(&msg("carol", 6, 2, "after"), t0 + Duration::from_millis(5));
        assert_eq!(m.failovers.len(), 1);
        let f = &m.failovers[0];
        assert_eq!(f.lost, "alice");
        assert!(f.cause.contains("SIGKILL"));
        assert_eq!(f.detected_ms, Some(1.0));
        assert_eq!(f.new_coordinator.as_deref(), Some("bob"));
        assert_eq!((f.epoch, f.election_ms), (Some(2), Some(2)));
        assert_eq!(f.flowing_ms, Some(5.0));
        assert_eq!(m.coordinator, Some(("bob".into(), 2)));
    }

    #[test]
    fn nodes_are_compared_seq_by_seq() {
        let t = Instant::now();
        let mut m = Model::new("demo");
        m.apply_ps(&ps("alice", 1));
        m.apply_event(&msg("alice", 1, 1, "a"), t);
        m.apply_event(&msg("bob", 1, 1, "a"), t);
        m.apply_event(&msg("carol", 1, 1, "forked"), t);
        m.apply_event(&msg("alice", 2, 1, "b"), t);
        assert_eq!(m.nodes[0].last_seq, 2);
        assert_eq!(m.nodes[1].differs_at, None);
        assert_eq!(m.nodes[2].differs_at, Some(1));
        assert_eq!(m.disagreeing(), 1);
        // The chat shows each seq once, as first delivered.
        let texts: Vec<_> = m
            .chat
            .iter()
            .filter_map(|l| match l {
                ChatLine::Message { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(texts, ["a", "b"]);
        // A process table refresh keeps what the events taught us.
        m.apply_ps(&ps("alice", 1));
        assert_eq!(m.nodes[2].differs_at, Some(1));
        m.select(-1);
        assert_eq!(m.selected_node(), Some("carol"));
    }

    #[test]
    fn a_hang_detected_by_the_members_is_a_failover_too() {
        let t = Instant::now();
        let mut m = Model::new("demo");
        m.apply_ps(&ps("alice", 1));
        m.apply_event(
            &CtlEvent::Node {
                node: "carol".into(),
                event: json!({"event":"electing","lost":"alice","reason":"missed heartbeats"}),
            },
            t,
        );
        assert_eq!(m.failovers.len(), 1);
        assert!(m.failovers[0].cause.contains("missed heartbeats"));
        assert_eq!(m.failovers[0].detected_ms, Some(0.0));
    }
}
