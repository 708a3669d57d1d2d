//! Turning supervisor and node events into the lines `p2pctl` prints:
//! a colored node-name prefix, each chat message once (not once per node),
//! membership changes as the coordinator saw them.

use std::collections::{HashMap, HashSet};

use console::Style;
use serde_json::Value;

use crate::supervisor::CtlEvent;

const PALETTE: [console::Color; 6] = [
    console::Color::Cyan,
    console::Color::Magenta,
    console::Color::Yellow,
    console::Color::Green,
    console::Color::Blue,
    console::Color::Red,
];

/// Stateful formatter for the event stream.
pub struct Display {
    width: usize,
    colors: HashMap<String, Style>,
    shown_seq: u64,
    shown_lost: HashSet<String>,
    /// Nodes whose `waiting` was shown and that have not moved on since
    /// (a long wait says so once, not once per candidacy).
    shown_waiting: HashSet<String>,
    coordinator: Option<String>,
}

impl Display {
    pub fn new(names: &[String]) -> Display {
        let colors = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), Style::new().fg(PALETTE[i % PALETTE.len()]).bold()))
            .collect();
        Display {
            width: names.iter().map(String::len).max().unwrap_or(4).max(4),
            colors,
            shown_seq: 0,
            shown_lost: HashSet::new(),
            shown_waiting: HashSet::new(),
            coordinator: None,
        }
    }

    /// `name | text` with the name colored and padded.
    pub fn prefixed(&self, name: &str, text: &str) -> String {
        let padded = format!("{name:>w$}", w = self.width);
        let styled = match self.colors.get(name) {
            Some(s) => s.apply_to(padded).to_string(),
            None => Style::new().dim().apply_to(padded).to_string(),
        };
        format!("{styled} | {text}")
    }

    /// The line to print for an event, if any.
    pub fn line(&mut self, ev: &CtlEvent) -> Option<String> {
        match ev {
            CtlEvent::Node { node, event } => self.node_line(node, event),
            CtlEvent::Process { node, what } => Some(self.prefixed(node, what)),
            CtlEvent::Coordinator {
                node,
                epoch,
                election_ms,
                since_kill_ms,
            } => {
                self.coordinator = Some(node.clone());
                // If this node is lost later, that is news again.
                self.shown_lost.remove(node);
                let mut text = format!("★ coordinator (epoch {epoch})");
                if let Some(ms) = election_ms {
                    text.push_str(&format!(", elected in {ms} ms"));
                }
                if let Some(ms) = since_kill_ms {
                    text.push_str(&format!(", {ms:.1} ms after the kill"));
                }
                Some(self.prefixed(node, &text))
            }
            CtlEvent::AllReady { nodes } => Some(format!("cluster is up: {nodes} nodes ready")),
            CtlEvent::StartFailed { reason } => Some(format!("start-up failed: {reason}")),
        }
    }

    fn node_line(&mut self, node: &str, e: &Value) -> Option<String> {
        let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
        let kind = e["event"].as_str()?;
        if matches!(kind, "ready" | "role" | "resumed") {
            self.shown_waiting.remove(node);
        }
        match kind {
            "waiting" => self
                .shown_waiting
                .insert(node.to_string())
                .then(|| self.prefixed(node, &format!("waiting: {}", s("reason")))),
            "resumed" => {
                // A false alarm: the coordinator was not lost after all, so
                // losing it later is news again.
                if let Some(c) = &self.coordinator {
                    self.shown_lost.remove(c);
                }
                Some(self.prefixed(node, &s("reason")))
            }
            "ready" => Some(self.prefixed(
                node,
                &format!("ready (coordinator {}, epoch {})", s("coordinator"), e["epoch"]),
            )),
            "message" => {
                let seq = e["seq"].as_u64().unwrap_or(0);
                if seq <= self.shown_seq {
                    return None;
                }
                self.shown_seq = seq;
                let from = s("from");
                let tag = if e["bot"].is_string() { " [bot]" } else { "" };
                let meta = Style::new()
                    .dim()
                    .apply_to(format!("(epoch {}, seq {seq})", e["epoch"]));
                Some(self.prefixed(&from, &format!("{}{tag} {meta}", s("text"))))
            }
            "joined" if self.coordinator.as_deref() == Some(node) => {
                Some(self.prefixed(node, &format!("* {} joined", s("name"))))
            }
            "left" if self.coordinator.as_deref() == Some(node) => {
                Some(self.prefixed(node, &format!("* {} {}", s("name"), s("reason"))))
            }
            "electing" => {
                let lost = s("lost");
                self.shown_lost.insert(lost.clone()).then(|| {
                    self.prefixed(
                        node,
                        &format!("lost coordinator {lost} ({}); electing", s("reason")),
                    )
                })
            }
            "error" => Some(self.prefixed(node, &format!("error: {}", s("message")))),
            "verdict" if self.coordinator.as_deref() == Some(node) => Some(self.prefixed(
                &s("plugin"),
                &format!("{} {}'s message (rule {})", s("action"), s("member"), s("rule")),
            )),
            "plugin" if s("state") != "loaded" || self.coordinator.as_deref() == Some(node) => {
                Some(self.prefixed(
                    node,
                    &format!("plugin {} {}{}", s("name"), s("state"), {
                        let d = s("detail");
                        // Details often repeat "plugin NAME: " themselves.
                        let own = format!("plugin {}: ", s("name"));
                        let d = d.strip_prefix(&own).unwrap_or(&d);
                        if d.is_empty() {
                            String::new()
                        } else {
                            format!(": {d}")
                        }
                    }),
                ))
            }
            "dropped" => Some(self.prefixed(
                node,
                &format!("{} events not printed (stdout too slow)", e["count"]),
            )),
            _ => None,
        }
    }
}

/// A node's log line in human form (`logs`): JSON events become sentences,
/// other lines (its stderr) are shown as they are.
pub fn log_line(line: &str) -> Option<String> {
    let Ok(e) = serde_json::from_str::<Value>(line) else {
        return Some(line.to_string());
    };
    let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
    Some(match e["event"].as_str()? {
        "listening" => format!("listening on {}", s("addr")),
        "ready" => format!(
            "ready: coordinator {}, epoch {}, {}",
            s("coordinator"),
            e["epoch"],
            count(&e["members"], "member", "members")
        ),
        "message" => format!("{}: {}", s("from"), s("text")),
        "joined" => format!("* {} joined", s("name")),
        "left" => format!("* {} {}", s("name"), s("reason")),
        "electing" => format!("* lost coordinator {} ({}); electing", s("lost"), s("reason")),
        "following" => format!("* following the coordinator at {} ({})", s("addr"), s("reason")),
        "role" => format!(
            "* coordinator is now {} (epoch {}{})",
            s("coordinator"),
            e["epoch"],
            e["election_ms"]
                .as_u64()
                .map(|m| format!(", elected in {m} ms"))
                .unwrap_or_default()
        ),
        "rejected" => format!("* not delivered: {}", s("reason")),
        "error" => format!("* error: {}", s("message")),
        "verdict" => format!(
            "* {}: {} of {}'s message (rule {})",
            s("plugin"),
            s("action"),
            s("member"),
            s("rule")
        ),
        "plugin" => format!("* plugin {} {} {}", s("name"), s("state"), s("detail")),
        "config" => match (e["voters"].as_array(), e["plugins"].as_array()) {
            (Some(ids), _) => format!("* voters are now members {}", list(ids, |v| v.to_string())),
            (None, Some(names)) if names.is_empty() => "* no plugins now".to_string(),
            (None, Some(names)) => format!(
                "* plugins are now {}",
                list(names, |v| v.as_str().unwrap_or("?").to_string())
            ),
            (None, None) => format!("* configuration changed at seq {}", e["seq"]),
        },
        "waiting" => format!("* waiting: {}", s("reason")),
        "resumed" => format!("* {}", s("reason")),
        "unreachable" => format!("* {} stopped answering ({})", s("name"), s("reason")),
        "who" => format!(
            "* members: {}",
            list(e["members"].as_array().map_or(&[][..], Vec::as_slice), |m| {
                m["name"].as_str().unwrap_or("?").to_string()
            })
        ),
        "info" => format!("* {}", s("message")),
        "dropped" => format!(
            "* {} events not printed (stdout was not read fast enough)",
            e["count"]
        ),
        "key" => match (e["id"].as_str(), e["created"] == true) {
            (None, _) => "* no chat key (--insecure): traffic is not encrypted".to_string(),
            (Some(id), true) => format!("* created the chat key {} (id {id})", s("path")),
            (Some(id), false) => format!("* chat key {id} ({}): traffic is encrypted", s("path")),
        },
        other => format!("{other}: {e}"),
    })
}

/// `n` and its noun, `one` if `n` is 1, else `many` ("1 message",
/// "2 messages").
pub fn count(n: &serde_json::Value, one: &str, many: &str) -> String {
    format!("{n} {}", if n.as_u64() == Some(1) { one } else { many })
}

/// `items` joined with ", " (each shown by `show`).
fn list(items: &[Value], show: impl Fn(&Value) -> String) -> String {
    items.iter().map(show).collect::<Vec<_>>().join(", ")
}

/// The `ps` table.
pub fn ps_table(rows: &[Value]) -> String {
    let mut out = format!(
        "{:<12} {:>7}  {:<21} {:<10} {:<11} {:>5} {:>5} {:>8} {:>8}\n",
        "NAME", "PID", "ADDRESS", "STATE", "ROLE", "VOTER", "EPOCH", "RESTARTS", "UPTIME"
    );
    for r in rows {
        let uptime = r["uptime_ms"]
            .as_u64()
            .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<12} {:>7}  {:<21} {:<10} {:<11} {:>5} {:>5} {:>8} {:>8}\n",
            r["name"].as_str().unwrap_or(""),
            r["pid"]
                .as_u64()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            r["addr"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or(""),
            if r["waiting"].is_string() {
                "waiting"
            } else {
                r["role"].as_str().unwrap_or("-")
            },
            if r["voter"] == true { "yes" } else { "-" },
            r["epoch"].to_string(),
            r["restarts"].to_string(),
            uptime
        ));
    }
    for r in rows {
        if let Some(why) = r["waiting"].as_str() {
            out.push_str(&format!("{} waits: {why}\n", r["name"].as_str().unwrap_or("")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event PROTOCOL.md lists (section 13) reads as a sentence in
    /// `p2pctl logs`, not as the JSON the node printed.
    #[test]
    fn every_documented_event_has_a_sentence() {
        let doc = include_str!("../../../docs/PROTOCOL.md");
        let section = doc
            .split("## 13. Events")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("PROTOCOL.md has section 13");
        let names: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
            .filter(|name| *name != "event")
            .collect();
        assert!(names.len() >= 19, "{names:?}");
        let sample = serde_json::json!({
            "name": "bob", "addr": "127.0.0.1:7102", "coordinator": "alice", "epoch": 2,
            "members": [{"id": 1, "name": "alice"}, {"id": 2, "name": "bob"}], "from": "bob",
            "text": "hi", "reason": "left", "lost": "alice", "seq": 7, "voters": [1, 2],
            "message": "hello", "count": 3, "plugin": "moderation", "rule": "r", "action": "drop",
            "member": "bob", "state": "loaded", "detail": "", "id": "547b9ef9", "path": "chat.key",
            "created": true, "role": "member", "client_seq": 1,
        });
        for name in names {
            let mut e = sample.clone();
            e["event"] = name.into();
            if name == "ready" {
                e["members"] = 5.into(); // a count here, a list in `who`
            }
            let line = log_line(&e.to_string()).expect("a line");
            assert!(!line.contains('{'), "{name} is shown as JSON: {line}");
        }
    }

    #[test]
    fn config_key_and_ready_read_as_sentences() {
        let show = |v: serde_json::Value| log_line(&v.to_string()).unwrap();
        use serde_json::json;
        assert_eq!(
            show(json!({"event": "config", "seq": 4, "voters": [1, 2, 3]})),
            "* voters are now members 1, 2, 3"
        );
        assert_eq!(
            show(json!({"event": "config", "seq": 5, "plugins": ["echo", "logger"]})),
            "* plugins are now echo, logger"
        );
        assert_eq!(
            show(json!({"event": "key", "id": "547b9ef9", "path": "c.key", "created": false})),
            "* chat key 547b9ef9 (c.key): traffic is encrypted"
        );
        assert!(show(json!({"event": "key", "id": null})).contains("--insecure"));
        assert_eq!(
            show(json!({"event": "ready", "coordinator": "alice", "epoch": 1, "members": 1})),
            "ready: coordinator alice, epoch 1, 1 member"
        );
        assert_eq!(count(&1.into(), "log entry", "log entries"), "1 log entry");
        assert_eq!(count(&0.into(), "message", "messages"), "0 messages");
    }

    /// The stream says a wait once, however many candidacies it lasts, and
    /// how a false alarm ended; a later loss of the same coordinator is
    /// shown again.
    #[test]
    fn waits_and_false_alarms_read_once_each() {
        use serde_json::json;
        console::set_colors_enabled(false);
        let names = ["alice".to_string(), "carol".to_string()];
        let mut d = Display::new(&names);
        d.line(&CtlEvent::Coordinator {
            node: "alice".into(),
            epoch: 1,
            election_ms: None,
            since_kill_ms: None,
        });
        let mut line = |node: &str, event: serde_json::Value| {
            d.line(&CtlEvent::Node {
                node: node.into(),
                event,
            })
        };
        let lost = json!({"event": "electing", "lost": "alice", "reason": "missed heartbeats"});
        let wait = json!({"event": "waiting", "reason": "waiting for a majority of voters"});
        assert!(line("carol", lost.clone()).is_some_and(|l| l.ends_with("electing")));
        assert_eq!(
            line("carol", wait.clone()).as_deref(),
            Some("carol | waiting: waiting for a majority of voters")
        );
        assert_eq!(line("carol", wait.clone()), None, "said once per wait");
        let resumed = json!({"event": "resumed", "reason": "alice still coordinates (epoch 1); carrying on"});
        assert_eq!(
            line("carol", resumed).as_deref(),
            Some("carol | alice still coordinates (epoch 1); carrying on")
        );
        assert!(line("carol", lost).is_some(), "a later loss is news again");
        assert!(line("carol", wait).is_some(), "and so is a later wait");
    }
}
