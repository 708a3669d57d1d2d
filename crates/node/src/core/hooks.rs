//! The coordinator's broadcast path calls out through [`Hooks`]: the real
//! implementation runs the bot plugins (`crate::plugins`), the core only
//! sees verdicts and bot posts, so it stays free of I/O and testable.

use p2p_proto::{PluginRef, PluginStatus};

/// A message as hooks see it.
#[derive(Debug, Clone, Copy)]
pub struct HookMessage<'a> {
    pub epoch: u64,
    pub seq: u64,
    pub from_id: u64,
    pub from: &'a str,
    pub text: &'a str,
    /// Posted by this plugin (it is not called for its own posts).
    pub bot: Option<&'a str>,
}

/// What a plugin did to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerdictAction {
    Drop,
    Rewrite,
}

impl VerdictAction {
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictAction::Drop => "drop",
            VerdictAction::Rewrite => "rewrite",
        }
    }
}

/// A drop or rewrite decided by a plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct VerdictRecord {
    pub plugin: String,
    pub rule: String,
    pub action: VerdictAction,
}

/// What the chain decided about a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Deliver: with the new text if a plugin rewrote it, else as it was.
    Deliver(Option<String>),
    /// Do not deliver; tell the sender `reason`.
    Drop { reason: String },
}

/// The result of running the chain on one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub decision: Decision,
    pub verdicts: Vec<VerdictRecord>,
    /// Bot messages posted meanwhile: (plugin, text).
    pub posts: Vec<(String, String)>,
}

/// What happened to a plugin on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginEvent {
    Loaded,
    Refused,
    Quarantined,
    Detached,
    /// The plugin did something the node ignored (e.g. a rewrite to an
    /// invalid text); it keeps running.
    Ignored,
}

impl PluginEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginEvent::Loaded => "loaded",
            PluginEvent::Refused => "refused",
            PluginEvent::Quarantined => "quarantined",
            PluginEvent::Detached => "detached",
            PluginEvent::Ignored => "ignored",
        }
    }
}

/// Something worth telling the user about a plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct HookReport {
    pub plugin: String,
    pub state: PluginEvent,
    pub detail: String,
}

/// The plugin chain, as the core uses it.
pub trait Hooks: Send {
    /// Makes the loaded set match `set` (load new ones, drop removed ones)
    /// for the chat `chat_id` (plugins see it; a new chat reloads them all).
    fn set_plugins(&mut self, chat_id: &str, set: &[PluginRef]) -> Vec<HookReport>;
    /// Runs the chain before sequencing.
    fn on_message(&mut self, msg: &HookMessage) -> Outcome;
    /// Tells every plugin about a delivered message (`replay`: history
    /// replayed after a takeover; `last`: the last message of a batch
    /// delivered at once, before any of it is sent to members). Returns
    /// bot posts.
    fn on_delivered(&mut self, msg: &HookMessage, replay: bool, last: bool) -> Vec<(String, String)>;
    fn on_join(&mut self, id: u64, name: &str) -> Vec<(String, String)>;
    fn on_leave(&mut self, id: u64, name: &str, reason: &str) -> Vec<(String, String)>;
    /// Reports gathered since the last call (quarantines).
    fn reports(&mut self) -> Vec<HookReport>;
    fn status(&self) -> Vec<PluginStatus>;
    /// True when there is at least one active plugin (lets the hot path
    /// skip the calls entirely).
    fn active(&self) -> bool;
}

/// No plugins.
pub struct NoHooks;

impl Hooks for NoHooks {
    fn set_plugins(&mut self, _chat_id: &str, set: &[PluginRef]) -> Vec<HookReport> {
        set.iter()
            .map(|p| HookReport {
                plugin: p.name.clone(),
                state: PluginEvent::Refused,
                detail: "this node runs without plugin support".into(),
            })
            .collect()
    }
    fn on_message(&mut self, _msg: &HookMessage) -> Outcome {
        Outcome {
            decision: Decision::Deliver(None),
            verdicts: Vec::new(),
            posts: Vec::new(),
        }
    }
    fn on_delivered(&mut self, _msg: &HookMessage, _replay: bool, _last: bool) -> Vec<(String, String)> {
        Vec::new()
    }
    fn on_join(&mut self, _id: u64, _name: &str) -> Vec<(String, String)> {
        Vec::new()
    }
    fn on_leave(&mut self, _id: u64, _name: &str, _reason: &str) -> Vec<(String, String)> {
        Vec::new()
    }
    fn reports(&mut self) -> Vec<HookReport> {
        Vec::new()
    }
    fn status(&self) -> Vec<PluginStatus> {
        Vec::new()
    }
    fn active(&self) -> bool {
        false
    }
}
