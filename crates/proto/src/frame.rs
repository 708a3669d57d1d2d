//! Every frame type of the protocol, as one tagged enum.
//!
//! Unknown fields are ignored (a newer peer may add some); in particular a
//! `say` that carries a `from` is accepted but its `from` is never read: the
//! coordinator sets the sender from the connection.

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;

/// A member as everyone knows it. The list of these, in join order, is what
/// every peer uses to compute the next coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Assigned by the coordinator; increases with join order and is never
    /// reused, so sorting by id is sorting by join time.
    pub id: u64,
    pub name: String,
    /// Where this member's own server listens (for redirects and failover).
    pub addr: String,
}

/// One sequenced chat message, as delivered to every member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chat {
    /// Coordinator reign that sequenced it.
    pub epoch: u64,
    /// Position in the chat's single total order; starts at 1, no gaps.
    pub seq: u64,
    /// Sender's name, set by the coordinator.
    pub from: String,
    /// Sender's member id, set by the coordinator.
    pub from_id: u64,
    /// The sender's own counter, echoed so the sender can match its
    /// acknowledgement; 0 for bot messages.
    pub client_seq: u64,
    pub text: String,
    /// Set when a bot plugin posted this message (its plugin name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot: Option<String>,
}

/// What a member reports when it reconnects after losing its coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The id it had; kept if the new coordinator still lists it.
    pub member_id: u64,
    /// The epoch whose coordinator was lost.
    pub epoch: u64,
    /// Epoch and seq of the last message it delivered (0, 0 if none).
    pub last_epoch: u64,
    pub last_seq: u64,
    /// Members it found dead on the way (so the new coordinator stops
    /// waiting for them).
    #[serde(default)]
    pub dead: Vec<u64>,
}

/// One bot plugin of the chat: a name (never a path: each node resolves it
/// in its own plugin directory) and its JSON configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRef {
    pub name: String,
    /// JSON text; `{}` when the plugin takes none.
    #[serde(default = "empty_config")]
    pub config: String,
}

fn empty_config() -> String {
    "{}".into()
}

/// A loaded plugin as one node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginStatus {
    pub name: String,
    pub version: String,
    /// `active`, `quarantined` or `refused`.
    pub state: String,
    pub calls: u64,
    pub drops: u64,
    /// Time spent inside the plugin, in microseconds.
    pub time_us: u64,
    /// Why it is quarantined or refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A node's role, as reported in `status` and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Not yet admitted anywhere.
    Joining,
    Member,
    /// Lost its coordinator and is finding the next one.
    Electing,
    Coordinator,
}

/// Every frame on the wire. The JSON object's `type` field selects the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    // ---- handshake (client → any node) ----
    /// Opens a member connection.
    Hello {
        version: u32,
        name: String,
        /// The joiner's own listening address.
        addr: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<Resume>,
    },
    /// Opens an observer connection: asks for the node's status, no join.
    StatusRequest {
        /// Also return the digest of the delivered sequence (for `check`).
        #[serde(default)]
        log: bool,
    },
    /// Observer asks the node to post `text` as its own user.
    Post {
        text: String,
    },
    /// Observer asks the coordinator to add (or reconfigure) a plugin.
    Attach {
        name: String,
        config: String,
    },
    /// Observer asks the coordinator to remove a plugin.
    Detach {
        name: String,
    },
    /// A coordinator announces its reign to a peer that may not know it (the
    /// old coordinator after a hang, a peer that did not resume).
    Announce {
        epoch: u64,
        coordinator: MemberInfo,
        members: u32,
    },

    // ---- handshake answers (node → client) ----
    /// Admitted. `replay` chat frames follow (recent history, or the gap
    /// since `resume.last_seq`), then live traffic.
    Welcome {
        member_id: u64,
        epoch: u64,
        coordinator: u64,
        members: Vec<MemberInfo>,
        replay: u32,
        heartbeat_ms: u64,
        /// The chat's plugin set, in calling order.
        #[serde(default)]
        plugins: Vec<PluginRef>,
    },
    /// This node is not the coordinator; connect there instead.
    Redirect {
        addr: String,
        epoch: u64,
    },
    /// Something went wrong; `message` is a human sentence. Usually followed
    /// by the connection closing.
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Answer to `status_request`.
    Status {
        name: String,
        id: u64,
        role: Role,
        epoch: u64,
        coordinator: Option<String>,
        members: Vec<MemberInfo>,
        last_seq: u64,
        /// Times this node saw a seq jump (should be 0).
        #[serde(default)]
        gaps: u64,
        /// With `log: true`: the delivered messages still held, oldest
        /// first, as `[seq, epoch, hash]` where `hash` is the hex FNV-1a of
        /// `from_id`, a zero byte and `text` (see docs/PROTOCOL.md).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        log: Option<Vec<(u64, u64, String)>>,
        /// The plugins this node has loaded (only the coordinator calls them).
        #[serde(default)]
        plugins: Vec<PluginStatus>,
    },

    // ---- member → coordinator ----
    /// A chat message to sequence.
    Say {
        text: String,
        client_seq: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Clean leave.
    Leave {},
    /// Messages the coordinator asked for with `sync_request`.
    Sync {
        entries: Vec<Chat>,
    },

    // ---- coordinator → member ----
    Chat(Chat),
    Joined {
        member: MemberInfo,
    },
    Left {
        id: u64,
        name: String,
        reason: String,
    },
    Ping {
        nonce: u64,
    },
    /// Asks a resuming member for the messages in `from..=to` it holds.
    SyncRequest {
        from: u64,
        to: u64,
    },
    /// The chat's plugin set changed (after attach/detach).
    Plugins {
        set: Vec<PluginRef>,
    },
    /// The sender's message was not delivered (a bot dropped it, or it was
    /// invalid); `reason` is shown to the sender.
    Rejected {
        client_seq: u64,
        reason: String,
    },
}

impl Frame {
    /// The `type` names this version knows, for telling "unknown type" from
    /// "bad fields" in a frame that failed to parse.
    pub const TYPES: &'static [&'static str] = &[
        "hello",
        "status_request",
        "post",
        "attach",
        "detach",
        "plugins",
        "announce",
        "welcome",
        "redirect",
        "error",
        "status",
        "say",
        "pong",
        "leave",
        "sync",
        "chat",
        "joined",
        "left",
        "ping",
        "sync_request",
        "rejected",
    ];

    /// Builds an `error` frame.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Frame {
        Frame::Error {
            code,
            message: message.into(),
        }
    }
}
