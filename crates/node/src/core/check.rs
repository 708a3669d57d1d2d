//! Judges a simulated run from what each node delivered, as Jepsen's
//! checkers judge a history: never from a node's opinion of itself.
//!
//! - agreement: every node that delivered seq `s` delivered the same entry;
//! - no gaps: a node's deliveries are consecutive from where it started;
//! - exactly once: a sender's message (id, client_seq) sits at one seq;
//! - one coordinator per epoch.
//!
//! Each of these holds per chat: a restart storm ends a chat and starts
//! another (nodes keep nothing across a restart), whose seqs and epochs
//! start again at 1. A process belongs to one chat for its life.

use std::collections::BTreeMap;

use p2p_proto::{Entry, Role};

use super::{Event, Millis};

type Who = (usize, u32);

/// A chat's id (empty before a process joined one).
type ChatId = String;

#[derive(Default)]
pub struct Checker {
    /// (chat, seq) → (entry, who delivered it first).
    global: BTreeMap<(ChatId, u64), (Entry, Who)>,
    /// The chat each process delivered in.
    chat_of: BTreeMap<Who, ChatId>,
    /// Per node incarnation: delivered seqs in order, and texts.
    delivered: BTreeMap<Who, Vec<u64>>,
    /// (chat, sender id, client_seq) → seq.
    by_msg: BTreeMap<(ChatId, u64, u64), u64>,
    /// (chat, epoch) → coordinator.
    epochs: BTreeMap<(ChatId, u64), Who>,
    /// Messages acknowledged to their sender (delivered there): text →
    /// (chat, seq).
    pub acked: BTreeMap<String, (ChatId, u64)>,
    /// Texts typed by each incarnation.
    typed: BTreeMap<Who, Vec<String>>,
    events: BTreeMap<Who, Vec<Event>>,
    dead: BTreeMap<Who, bool>,
    pub violations: Vec<String>,
    /// (time, epoch) of every takeover, for failover timing.
    pub takeovers: Vec<(Millis, u64, Option<u64>)>,
}

impl Checker {
    fn violation(&mut self, v: String) {
        if self.violations.len() < 20 {
            self.violations.push(v);
        }
    }

    pub fn typed(&mut self, node: usize, inc: u32, text: &str) {
        self.typed.entry((node, inc)).or_default().push(text.to_string());
    }

    pub fn died(&mut self, node: usize, inc: u32) {
        self.dead.insert((node, inc), true);
    }

    /// An event of a process, in chat `chat` (its chat when it emitted it).
    pub fn event(&mut self, node: usize, inc: u32, chat: &str, now: Millis, e: &Event) {
        match e {
            Event::Role {
                role: Role::Coordinator,
                epoch,
                election_ms,
                ..
            } => {
                self.takeovers.push((now, *epoch, *election_ms));
                self.coordinator(chat, *epoch, (node, inc));
            }
            Event::Ready {
                created: true, epoch, ..
            } => self.coordinator(chat, *epoch, (node, inc)),
            _ => {}
        }
        self.events.entry((node, inc)).or_default().push(e.clone());
    }

    fn coordinator(&mut self, chat: &str, epoch: u64, who: Who) {
        let key = (chat.to_string(), epoch);
        match self.epochs.get(&key) {
            Some(prev) if *prev != who => {
                let v = format!(
                    "two coordinators in epoch {epoch} of chat {chat}: node {:?} and node {:?}",
                    prev, who
                );
                self.violation(v);
            }
            _ => {
                self.epochs.insert(key, who);
            }
        }
    }

    /// Entries a node delivered since the last look (None: not held, i.e.
    /// skipped; allowed before its first delivery: a newcomer starts
    /// wherever its history starts).
    pub fn delivered(
        &mut self,
        node: usize,
        inc: u32,
        chat: &str,
        me: u64,
        entries: &[(u64, Option<Entry>)],
        gaps: u64,
    ) {
        let who = (node, inc);
        match self.chat_of.get(&who) {
            Some(c) if c != chat => {
                let v = format!("node {who:?} delivered in chat {c}, then in chat {chat}");
                self.violation(v);
            }
            Some(_) => {}
            None if entries.iter().any(|(_, e)| e.is_some()) => {
                self.chat_of.insert(who, chat.to_string());
            }
            None => {}
        }
        if gaps > 0
            && !self
                .violations
                .iter()
                .any(|v| v.contains(&format!("{who:?} counted")))
        {
            self.violation(format!("node {who:?} counted {gaps} gap(s) in its log"));
        }
        for (seq, entry) in entries {
            let Some(entry) = entry else {
                // Passed over before its first delivery: where a newcomer
                // starts (a node welcomed, cut off before the state came
                // and welcomed again starts where the second welcome says).
                let started = self.delivered.get(&who).is_some_and(|d| !d.is_empty());
                if started {
                    self.violation(format!(
                        "node {who:?} skipped seq {seq} (a hole in what it delivered)"
                    ));
                }
                continue;
            };
            let list = self.delivered.entry(who).or_default();
            let last = list.last().copied();
            list.push(*seq);
            if let Some(last) = last {
                if *seq != last + 1 {
                    let v = format!("node {who:?} delivered seq {seq} after seq {last}");
                    self.violation(v);
                }
            }
            let at = (chat.to_string(), *seq);
            match self.global.get(&at) {
                Some((e, by)) if e != entry => {
                    let v = format!(
                        "seq {seq} of chat {chat}: node {who:?} delivered {} but node {by:?} delivered {}",
                        describe(entry),
                        describe(e)
                    );
                    self.violation(v);
                }
                Some(_) => {}
                None => {
                    self.global.insert(at, (entry.clone(), who));
                }
            }
            if let Entry::Chat(c) = entry {
                if c.from_id != 0 && c.client_seq > 0 {
                    let key = (chat.to_string(), c.from_id, c.client_seq);
                    match self.by_msg.get(&key) {
                        Some(s) if s != seq => {
                            let v = format!(
                                "message ({}, {}) ({}) of chat {chat} delivered at seq {s} and at seq {seq}",
                                c.from_id, c.client_seq, c.text
                            );
                            self.violation(v);
                        }
                        _ => {
                            self.by_msg.insert(key, *seq);
                        }
                    }
                    if c.from_id == me {
                        self.acked.insert(c.text.clone(), (chat.to_string(), *seq));
                    }
                }
            }
        }
    }

    /// Delivered chat texts of one incarnation, in order.
    pub fn texts(&self, node: usize, inc: u32) -> Vec<String> {
        let chat = self.chat_of.get(&(node, inc)).cloned().unwrap_or_default();
        self.delivered
            .get(&(node, inc))
            .into_iter()
            .flatten()
            .filter_map(|s| match &self.global.get(&(chat.clone(), *s))?.0 {
                Entry::Chat(c) => Some(format!("{}:{}", c.from, c.text)),
                _ => None,
            })
            .collect()
    }

    pub fn events(&self, node: usize, inc: u32) -> Vec<Event> {
        self.events.get(&(node, inc)).cloned().unwrap_or_default()
    }

    /// Texts typed by an incarnation and never delivered anywhere.
    pub fn undelivered(&self, node: usize, inc: u32) -> Vec<String> {
        self.typed
            .get(&(node, inc))
            .into_iter()
            .flatten()
            .filter(|t| {
                !self
                    .global
                    .values()
                    .any(|(e, _)| matches!(e, Entry::Chat(c) if &c.text == *t))
            })
            .cloned()
            .collect()
    }

    /// Every acknowledged message must sit at its seq in the final order.
    pub fn check_acked(&mut self) {
        let bad: Vec<String> = self
            .acked
            .iter()
            .filter(
                |(text, at)| !matches!(self.global.get(at), Some((Entry::Chat(c), _)) if &c.text == *text),
            )
            .map(|(text, (chat, seq))| {
                format!("acknowledged message {text} (seq {seq} of chat {chat}) is not in the final order")
            })
            .collect();
        for v in bad {
            self.violation(v);
        }
    }

    pub fn messages(&self) -> usize {
        self.global
            .values()
            .filter(|(e, _)| matches!(e, Entry::Chat(_)))
            .count()
    }

    /// The highest epoch any chat reached.
    pub fn max_epoch(&self) -> u64 {
        self.epochs.keys().map(|(_, e)| *e).max().unwrap_or(0)
    }

    /// How many chats had a coordinator.
    pub fn chats(&self) -> usize {
        self.epochs
            .keys()
            .map(|(c, _)| c)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    }
}

fn describe(e: &Entry) -> String {
    match e {
        Entry::Chat(c) => format!("chat {:?} from {} (epoch {})", c.text, c.from, c.epoch),
        Entry::Joined { member, epoch, .. } => format!("joined {} (epoch {epoch})", member.name),
        Entry::Left { name, epoch, .. } => format!("left {name} (epoch {epoch})"),
        Entry::Voters { set, epoch, .. } => format!("voters {set:?} (epoch {epoch})"),
        Entry::Plugins { epoch, .. } => format!("plugins (epoch {epoch})"),
    }
}
