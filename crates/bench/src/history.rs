//! Judges a torture run from what each process printed (its JSON events),
//! the way Jepsen judges a history: from what every client observed, never
//! from the system's own opinion of itself.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

/// One process: a slot (fixed address) and its generation there.
pub type Proc = (usize, u32);

/// One delivered log entry, as a comparable key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Delivered {
    Message {
        from_id: u64,
        client_seq: u64,
        text: String,
    },
    Joined {
        id: u64,
        name: String,
    },
    Left {
        id: u64,
    },
    Config {
        voters: Option<Vec<u64>>,
        plugins: Option<Vec<String>>,
    },
}

/// Everything observed in a run.
#[derive(Default)]
pub struct History {
    /// Per process: (seq, entry) in the order it printed them.
    delivered: BTreeMap<Proc, Vec<(u64, Delivered)>>,
    /// Per process: its member id (from `ready`).
    pub ids: BTreeMap<Proc, u64>,
    /// epoch → processes that said they coordinate it.
    coordinators: BTreeMap<u64, BTreeSet<Proc>>,
    /// Lines typed into each process.
    typed: BTreeMap<Proc, Vec<String>>,
    /// Processes alive at the end.
    pub survivors: BTreeSet<Proc>,
}

impl History {
    pub fn typed(&mut self, p: Proc, text: String) {
        self.typed.entry(p).or_default().push(text);
    }

    /// Records one JSON event of process `p`.
    pub fn event(&mut self, p: Proc, v: &Value) {
        let seq = v["seq"].as_u64();
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        let names = |k: &str| -> Option<Vec<String>> {
            v[k].as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        };
        let ids = |k: &str| -> Option<Vec<u64>> {
            v[k].as_array()
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
        };
        let entry = match v["event"].as_str() {
            Some("message") => Some(Delivered::Message {
                from_id: v["from_id"].as_u64().unwrap_or(0),
                client_seq: v["client_seq"].as_u64().unwrap_or(0),
                text: s("text"),
            }),
            Some("joined") => Some(Delivered::Joined {
                id: v["id"].as_u64().unwrap_or(0),
                name: s("name"),
            }),
            Some("left") => Some(Delivered::Left {
                id: v["id"].as_u64().unwrap_or(0),
            }),
            Some("config") => Some(Delivered::Config {
                voters: ids("voters"),
                plugins: names("plugins"),
            }),
            Some("ready") => {
                if let Some(id) = v["id"].as_u64() {
                    self.ids.insert(p, id);
                }
                if v["created"] == true {
                    self.coordinator(v["epoch"].as_u64().unwrap_or(0), p);
                }
                None
            }
            Some("role") if v["role"] == "coordinator" => {
                self.coordinator(v["epoch"].as_u64().unwrap_or(0), p);
                None
            }
            _ => None,
        };
        if let (Some(seq), Some(e)) = (seq, entry) {
            self.delivered.entry(p).or_default().push((seq, e));
        }
    }

    fn coordinator(&mut self, epoch: u64, p: Proc) {
        self.coordinators.entry(epoch).or_default().insert(p);
    }

    pub fn messages(&self) -> usize {
        let mut texts = BTreeSet::new();
        for list in self.delivered.values() {
            for (_, e) in list {
                if let Delivered::Message { text, .. } = e {
                    texts.insert(text.clone());
                }
            }
        }
        texts.len()
    }

    /// Lines typed into a survivor that no process ever delivered.
    pub fn undelivered(&self) -> Vec<(Proc, String)> {
        let delivered: BTreeSet<&str> = self
            .delivered
            .values()
            .flatten()
            .filter_map(|(_, e)| match e {
                Delivered::Message { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        self.typed
            .iter()
            .filter(|(p, _)| self.survivors.contains(p))
            .flat_map(|(p, ts)| ts.iter().map(move |t| (*p, t)))
            .filter(|(_, t)| !delivered.contains(t.as_str()))
            .map(|(p, t)| (p, t.clone()))
            .collect()
    }

    /// Every check; returns violations by category with examples.
    pub fn verdict(&self, converged: bool) -> Verdict {
        let mut v = Verdict::default();
        // One entry per seq, everywhere.
        let mut at: BTreeMap<u64, (&Delivered, Proc)> = BTreeMap::new();
        for (p, list) in &self.delivered {
            for (seq, e) in list {
                match at.get(seq) {
                    Some((other, who)) if *other != e => {
                        v.add(
                            "disagree",
                            format!("seq {seq}: {p:?} delivered {e:?}, {who:?} delivered {other:?}"),
                        );
                    }
                    Some(_) => {}
                    None => {
                        at.insert(*seq, (e, *p));
                    }
                }
            }
        }
        // Consecutive from where each process started.
        for (p, list) in &self.delivered {
            for w in list.windows(2) {
                if w[1].0 != w[0].0 + 1 {
                    v.add(
                        "gap",
                        format!("{p:?} delivered seq {} after seq {}", w[1].0, w[0].0),
                    );
                }
            }
        }
        // Each message at one seq only.
        let mut place: BTreeMap<(u64, u64), u64> = BTreeMap::new();
        let mut text_at: BTreeMap<&str, u64> = BTreeMap::new();
        for (seq, (e, _)) in &at {
            if let Delivered::Message {
                from_id,
                client_seq,
                text,
            } = e
            {
                if let Some(s) = place.insert((*from_id, *client_seq), *seq) {
                    v.add("duplicate", format!("message {text:?} at seq {s} and seq {seq}"));
                } else if let Some(s) = text_at.insert(text.as_str(), *seq) {
                    v.add("duplicate", format!("text {text:?} at seq {s} and seq {seq}"));
                }
            }
        }
        // Acknowledged (delivered at its sender) means delivered at every
        // survivor whose history covers that seq.
        for (p, list) in &self.delivered {
            let me = self.ids.get(p).copied();
            for (seq, e) in list {
                let Delivered::Message { from_id, text, .. } = e else {
                    continue;
                };
                if Some(*from_id) != me {
                    continue;
                }
                for s in &self.survivors {
                    let Some(theirs) = self.delivered.get(s) else {
                        continue;
                    };
                    let (Some(first), Some(last)) = (theirs.first(), theirs.last()) else {
                        continue;
                    };
                    if first.0 <= *seq && *seq <= last.0 && !theirs.iter().any(|(q, x)| q == seq && x == e) {
                        v.add(
                            "lost_ack",
                            format!(
                                "{text:?} (seq {seq}) acknowledged to {p:?} but missing at survivor {s:?}"
                            ),
                        );
                    }
                }
            }
        }
        for (epoch, ps) in &self.coordinators {
            if ps.len() > 1 {
                v.add("two_coordinators", format!("epoch {epoch} coordinated by {ps:?}"));
            }
        }
        for (p, t) in self.undelivered() {
            v.add(
                "undelivered",
                format!("{t:?} typed into survivor {p:?}, never delivered"),
            );
        }
        if !converged {
            v.add(
                "never_converged",
                "the survivors did not settle on one coordinator and one sequence".into(),
            );
        }
        v
    }
}

/// Violations by category.
#[derive(Default, Debug)]
pub struct Verdict {
    pub counts: BTreeMap<&'static str, usize>,
    pub examples: Vec<String>,
}

/// Every category, so a clean run prints zeros for all of them.
pub const CATEGORIES: &[&str] = &[
    "disagree",
    "gap",
    "duplicate",
    "lost_ack",
    "two_coordinators",
    "undelivered",
    "never_converged",
];

impl Verdict {
    fn add(&mut self, what: &'static str, example: String) {
        *self.counts.entry(what).or_insert(0) += 1;
        if self.examples.len() < 10 {
            self.examples.push(format!("{what}: {example}"));
        }
    }

    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    pub fn to_json(&self) -> Value {
        let counts: BTreeMap<&str, usize> = CATEGORIES
            .iter()
            .map(|c| (*c, self.counts.get(c).copied().unwrap_or(0)))
            .collect();
        json!({"violations": counts, "examples": self.examples})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, from: u64, cs: u64, text: &str) -> Value {
        json!({"event": "message", "seq": seq, "from_id": from, "client_seq": cs, "text": text})
    }

    #[test]
    fn a_clean_history_has_no_violation() {
        let mut h = History::default();
        for p in [(0, 0), (1, 0)] {
            h.event(
                p,
                &json!({"event": "ready", "id": p.0 + 1, "epoch": 1, "created": p.0 == 0}),
            );
            h.event(p, &msg(1, 1, 1, "a"));
            h.event(p, &msg(2, 2, 1, "b"));
            h.survivors.insert(p);
        }
        h.typed((0, 0), "a".into());
        let v = h.verdict(true);
        assert_eq!(v.total(), 0, "{v:?}");
    }

    #[test]
    fn every_category_is_detected() {
        let mut h = History::default();
        let (a, b, c) = ((0, 0), (1, 0), (2, 0));
        h.event(
            a,
            &json!({"event": "ready", "id": 1, "epoch": 1, "created": true}),
        );
        h.event(b, &json!({"event": "role", "role": "coordinator", "epoch": 1}));
        h.event(a, &msg(1, 1, 1, "mine"));
        h.event(b, &msg(1, 2, 1, "other")); // disagree at seq 1
        h.event(b, &msg(3, 2, 2, "skip")); // gap 1 → 3
        h.event(c, &msg(1, 1, 1, "mine"));
        h.event(c, &msg(2, 1, 1, "mine")); // the same message twice
        h.event(c, &msg(3, 2, 2, "skip"));
        h.survivors.extend([a, b, c]);
        h.typed(c, "never".into());
        let v = h.verdict(false);
        for cat in CATEGORIES {
            if *cat != "lost_ack" {
                assert!(
                    v.counts.get(cat).is_some_and(|n| *n > 0),
                    "{cat} not detected: {v:?}"
                );
            }
        }
        // b's history covers seq 1 without a's acknowledged "mine".
        assert!(v.counts.get("lost_ack").is_some_and(|n| *n > 0), "{v:?}");
    }
}
