//! Every frame type of the protocol, as one tagged enum, and the log
//! entries that the coordinator orders.
//!
//! Unknown fields are ignored (a newer peer may add some); in particular a
//! `say` that carries a `from` is accepted but its `from` is never read: the
//! coordinator sets the sender from the connection.

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;

/// A member as everyone knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Assigned by the coordinator; increases with join order and is never
    /// given to another process, so sorting by id is sorting by join time.
    pub id: u64,
    pub name: String,
    /// Where this member's own server listens. Only members with a server
    /// (peers) can vote and coordinate; a client without one leaves it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// The member's process session (random per process): a member that is
    /// cut off and comes back with the same session keeps its id, so its
    /// acknowledgements and de-duplication survive re-admission. This is
    /// the public id of the session: the secret behind it never leaves
    /// the member's process.
    #[serde(default)]
    pub session: u64,
    /// The member's public signing key (64 hex digits): a peer that
    /// coordinates signs its log with it. Absent for clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_key: Option<String>,
}

/// A coordinator's signature over the chain hash of its log through
/// `seq` (docs/PROTOCOL.md, section 2.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// The signer's epoch.
    pub epoch: u64,
    pub seq: u64,
    /// The chain hash through `seq`, 64 hex digits.
    pub hash: String,
    /// Ed25519 signature, 128 hex digits.
    pub sig: String,
    /// The signer's member id.
    pub signer: u64,
}

/// One sequenced chat message, as delivered to every member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chat {
    /// Coordinator reign that sequenced it.
    pub epoch: u64,
    /// Position in the chat's log (shared with membership entries).
    pub seq: u64,
    /// Sender's name, set by the coordinator (shared: the coordinator
    /// hands every message of a member the same name without a copy).
    pub from: std::sync::Arc<str>,
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

/// One entry of the chat's replicated log. Every change to what the chat
/// is (messages, membership, voters, plugins) is an entry, so every member
/// applies the same changes in the same order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    Chat(Chat),
    /// A member was admitted.
    Joined {
        epoch: u64,
        seq: u64,
        member: MemberInfo,
    },
    /// A member left or was removed.
    Left {
        epoch: u64,
        seq: u64,
        id: u64,
        name: String,
        reason: String,
    },
    /// The set of voting members changed (member ids, ascending).
    Voters {
        epoch: u64,
        seq: u64,
        set: Vec<u64>,
    },
    /// The chat's plugin set changed.
    Plugins {
        epoch: u64,
        seq: u64,
        set: Vec<PluginRef>,
    },
}

/// Appends a length-prefixed string (the canonical encoding's unit).
fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
        None => out.push(0),
    }
}

impl Entry {
    /// The bytes the log's chain hash covers: a kind byte, then every field
    /// in a fixed order, integers as 8 bytes big-endian, strings with a
    /// 4-byte length (docs/PROTOCOL.md, section 2.5). Independent of JSON.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        self.canonical_into(&mut out);
        out
    }

    /// [`Entry::canonical`], appended to `out` (the chain hash reuses one
    /// buffer instead of allocating per entry).
    pub fn canonical_into(&self, out: &mut Vec<u8>) {
        let (kind, epoch, seq) = match self {
            Entry::Chat(c) => (1u8, c.epoch, c.seq),
            Entry::Joined { epoch, seq, .. } => (2, *epoch, *seq),
            Entry::Left { epoch, seq, .. } => (3, *epoch, *seq),
            Entry::Voters { epoch, seq, .. } => (4, *epoch, *seq),
            Entry::Plugins { epoch, seq, .. } => (5, *epoch, *seq),
        };
        out.push(kind);
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        match self {
            Entry::Chat(c) => {
                put_str(out, &c.from);
                out.extend_from_slice(&c.from_id.to_be_bytes());
                out.extend_from_slice(&c.client_seq.to_be_bytes());
                put_str(out, &c.text);
                put_opt(out, c.bot.as_deref());
            }
            Entry::Joined { member, .. } => {
                out.extend_from_slice(&member.id.to_be_bytes());
                put_str(out, &member.name);
                put_opt(out, member.addr.as_deref());
                out.extend_from_slice(&member.session.to_be_bytes());
                put_opt(out, member.sign_key.as_deref());
            }
            Entry::Left { id, name, reason, .. } => {
                out.extend_from_slice(&id.to_be_bytes());
                put_str(out, name);
                put_str(out, reason);
            }
            Entry::Voters { set, .. } => {
                out.extend_from_slice(&(set.len() as u32).to_be_bytes());
                for id in set {
                    out.extend_from_slice(&id.to_be_bytes());
                }
            }
            Entry::Plugins { set, .. } => {
                out.extend_from_slice(&(set.len() as u32).to_be_bytes());
                for p in set {
                    put_str(out, &p.name);
                    put_str(out, &p.config);
                }
            }
        }
    }

    pub fn seq(&self) -> u64 {
        match self {
            Entry::Chat(c) => c.seq,
            Entry::Joined { seq, .. }
            | Entry::Left { seq, .. }
            | Entry::Voters { seq, .. }
            | Entry::Plugins { seq, .. } => *seq,
        }
    }

    pub fn epoch(&self) -> u64 {
        match self {
            Entry::Chat(c) => c.epoch,
            Entry::Joined { epoch, .. }
            | Entry::Left { epoch, .. }
            | Entry::Voters { epoch, .. }
            | Entry::Plugins { epoch, .. } => *epoch,
        }
    }

    /// The same entry as a frame.
    pub fn into_frame(self) -> Frame {
        match self {
            Entry::Chat(c) => Frame::Chat(c),
            Entry::Joined { epoch, seq, member } => Frame::Joined { epoch, seq, member },
            Entry::Left {
                epoch,
                seq,
                id,
                name,
                reason,
            } => Frame::Left {
                epoch,
                seq,
                id,
                name,
                reason,
            },
            Entry::Voters { epoch, seq, set } => Frame::Voters { epoch, seq, set },
            Entry::Plugins { epoch, seq, set } => Frame::Plugins { epoch, seq, set },
        }
    }
}

/// What a member reports when it reconnects: to the coordinator it lost
/// (re-admission), to a new coordinator, or to a candidate (a vote).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The id it had.
    pub member_id: u64,
    /// The epoch whose coordinator it followed last.
    pub epoch: u64,
    /// The last seq it delivered (everything up to it is committed).
    pub commit: u64,
    /// The epoch of the coordinator whose log it holds, and the last seq
    /// of that log (delivered or not).
    pub log_epoch: u64,
    pub last_seq: u64,
    /// A voter's vote: it asks the receiver to coordinate this epoch and
    /// promises to accept nothing from an older one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vote: Option<u64>,
    /// The oldest epoch it may still accept (a vote it gave may bind it):
    /// a coordinator of an older epoch must move to a later one first.
    #[serde(default)]
    pub min_epoch: u64,
    /// Voters it proved dead (their address refused it).
    #[serde(default)]
    pub dead: Vec<u64>,
    /// The id of the chat it comes back to (`welcome.chat_id`); a node of
    /// another chat refuses it (`another_chat`) instead of admitting it as
    /// a newcomer. Empty from nodes before this field.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chat: String,
    /// The voter sets in force as it knows them (one, or two during a
    /// change; at most 7 ids each): a candidate of a chat that cannot go on
    /// learns whether a peer holding entries it lacks knows of a set that
    /// could. Empty from nodes before this field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub voters: Vec<Vec<u64>>,
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

/// A plugin's state on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginState {
    Active,
    Quarantined,
    Refused,
}

/// A loaded plugin as one node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginStatus {
    pub name: String,
    pub version: String,
    /// Identity of the library file loaded (first 12 hex digits of its
    /// SHA-256): tells a rebuilt bot from the old one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub build: String,
    pub state: PluginState,
    pub calls: u64,
    pub drops: u64,
    /// Time spent inside the plugin, in microseconds.
    pub time_us: u64,
    /// Why it is quarantined or refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The text prefixes of the deliveries it hears (declared with
    /// `deliver_only`); empty: every delivery.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hears: Vec<String>,
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
    /// Collecting votes to coordinate the next epoch.
    Candidate,
    Coordinator,
}

/// One row of a node's log digest: `[seq, epoch, hash, type]` (the hash is
/// defined in docs/PROTOCOL.md; `type` is the entry's frame type).
pub type DigestRow = (u64, u64, String, String);

/// A sender's de-duplication record: the highest `client_seq` sequenced
/// for member `id`, whose process session is `session`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub id: u64,
    pub session: u64,
    pub client_seq: u64,
}

/// Every frame on the wire. The JSON object's `type` field selects the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    // ---- proving the chat key (before anything else) ----
    /// Client → node, first on every connection of a keyed chat.
    Auth {
        version: u32,
        nonce: String,
    },
    /// Node → client: its nonce and its proof of the key.
    AuthReply {
        nonce: String,
        proof: String,
    },
    /// Client → node: the client's proof of the key. Everything after is
    /// sealed (docs/PROTOCOL.md, section 2).
    AuthProof {
        proof: String,
    },

    // ---- handshake (client → any node) ----
    /// Opens a member connection.
    Hello {
        version: u32,
        name: String,
        /// Random per process; identifies the sender across re-admission.
        session: u64,
        /// The joiner's own listening address; absent for a client that
        /// runs no server (it can then never vote or coordinate).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        addr: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<Resume>,
        /// Public signing key; required with `addr`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sign_key: Option<String>,
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
    /// A coordinator announces its reign to a peer that may not know it.
    Announce {
        epoch: u64,
        coordinator: MemberInfo,
    },
    /// A candidate or coordinator asks whether a voter's process is still
    /// the one it knows (a different session proves the old one gone).
    Probe {},

    // ---- handshake answers (node → client) ----
    /// Admitted. `state` frames follow (the chat as of seq `commit`), then
    /// the log entries from seq `base + 1` on, then live traffic.
    Welcome {
        member_id: u64,
        epoch: u64,
        coordinator: u64,
        /// Entries after this seq follow; a returning member drops any
        /// undelivered ones it holds past it.
        base: u64,
        /// Entries up to here are committed: deliver them.
        commit: u64,
        /// As in `commit` frames.
        #[serde(default)]
        stable: u64,
        heartbeat_ms: u64,
        /// Random identity of the chat, fixed when it was started.
        chat_id: String,
        /// The chain hash through `base` (64 hex digits).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chain: Option<String>,
        /// The last seq of the log this coordinator took over with: only a
        /// seal at or past it may replace what a peer can prove of an
        /// earlier reign (docs/PROTOCOL.md, section 3.1).
        #[serde(default)]
        start: u64,
        /// A newcomer holds the entries up to here (it may coordinate one
        /// day) but does not show them; the history it shows follows.
        #[serde(default)]
        quiet: u64,
    },
    /// Part of the chat's state as of seq `at`: members and sender records
    /// (split over several frames when large; the final one has `last`).
    /// The first one also carries the voters and the plugin set.
    State {
        at: u64,
        last: bool,
        #[serde(default)]
        members: Vec<MemberInfo>,
        #[serde(default)]
        seen: Vec<Seen>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        voters: Option<Vec<u64>>,
        /// The voters before the last change (elections count both).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prev_voters: Option<Vec<u64>>,
        /// Seq of the entry that set `voters`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        voters_seq: Option<u64>,
        /// The next member id to hand out (ids are never reused).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_id: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plugins: Option<Vec<PluginRef>>,
    },
    /// This node is not the coordinator; connect there instead.
    Redirect {
        addr: String,
        epoch: u64,
    },
    /// A candidate asks a voter to vote again, for this epoch.
    Revote {
        epoch: u64,
    },
    /// Something went wrong; `message` is a human sentence. Usually followed
    /// by the connection closing.
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Answer to `probe`.
    ProbeReply {
        session: u64,
        id: u64,
        role: Role,
        epoch: u64,
        /// Address of the coordinator this node follows, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        coordinator: Option<String>,
        /// The id of its chat (empty while joining, and from nodes before
        /// this field): a prober of another chat knows the member it
        /// looked for is gone, even if this process once was admitted to
        /// its chat too.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        chat: String,
    },
    /// Answer to `status_request`.
    Status {
        name: String,
        id: u64,
        role: Role,
        epoch: u64,
        coordinator: Option<String>,
        members: Vec<MemberInfo>,
        #[serde(default)]
        voters: Vec<u64>,
        /// True when the last change of the voters is known to be in force
        /// (until then an election also needs the previous voters).
        #[serde(default)]
        stable: bool,
        /// Last delivered seq.
        last_seq: u64,
        /// First seq this node holds (its log starts after history it
        /// never received).
        #[serde(default)]
        first_seq: u64,
        /// Times this node saw a hole inside its sequence (should be 0).
        #[serde(default)]
        gaps: u64,
        #[serde(default)]
        chat_id: String,
        /// With `log: true`: the delivered entries still held (the newest
        /// 4,000), oldest first, as `[seq, epoch, hash, type]` (see
        /// docs/PROTOCOL.md).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        log: Option<Vec<DigestRow>>,
        /// The plugins this node has loaded (only the coordinator calls them).
        #[serde(default)]
        plugins: Vec<PluginStatus>,
        /// Why the node cannot make progress, when it cannot (e.g. waiting
        /// for a majority of voters).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        waiting: Option<String>,
        /// Lines posted at this node as its own (its user's, or `post`)
        /// that are neither delivered nor rejected yet.
        #[serde(default)]
        queued: u32,
    },
    /// Answer to `post`: the line is queued as the node's own under
    /// `client_seq`; the `message` or `rejected` event for it carries the
    /// same number.
    Posted {
        client_seq: u64,
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
    /// A peer holds the coordinator's log up to `seq`.
    Ack {
        seq: u64,
    },
    /// Entries the coordinator asked for with `sync_request`; the last
    /// (empty) one carries the sender's latest seal.
    Sync {
        entries: Vec<Entry>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seal: Option<Seal>,
        /// With a snapshot (`state` frames before): the chain hash where
        /// the snapshot stands.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chain: Option<String>,
    },

    // ---- coordinator → member: log entries ----
    Chat(Chat),
    Joined {
        epoch: u64,
        seq: u64,
        member: MemberInfo,
    },
    Left {
        epoch: u64,
        seq: u64,
        id: u64,
        name: String,
        reason: String,
    },
    Voters {
        epoch: u64,
        seq: u64,
        set: Vec<u64>,
    },
    Plugins {
        epoch: u64,
        seq: u64,
        set: Vec<PluginRef>,
    },
    // ---- coordinator → member: control ----
    /// Entries up to `seq` are committed: deliver them. `stable` is the
    /// seq of the last voter-set change known to be in force (every live
    /// voter of the old and new sets holds it): from then on elections
    /// need a quorum of the new set only.
    Commit {
        seq: u64,
        #[serde(default)]
        stable: u64,
    },
    Ping {
        nonce: u64,
    },
    /// The coordinator's signature over its log through `seq` (after each
    /// batch of entries, to peers). A peer acknowledges only what a seal
    /// covers, so it can prove every entry it helped commit.
    Seal(Seal),
    /// Asks a voter for the entries in `from..=to` it holds.
    SyncRequest {
        from: u64,
        to: u64,
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
        "auth",
        "auth_reply",
        "auth_proof",
        "hello",
        "status_request",
        "post",
        "attach",
        "detach",
        "announce",
        "probe",
        "welcome",
        "state",
        "redirect",
        "revote",
        "error",
        "probe_reply",
        "status",
        "posted",
        "say",
        "pong",
        "leave",
        "ack",
        "sync",
        "chat",
        "joined",
        "left",
        "voters",
        "plugins",
        "commit",
        "ping",
        "seal",
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

    /// The wire name of this frame (its `type`).
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Auth { .. } => "auth",
            Frame::AuthReply { .. } => "auth_reply",
            Frame::AuthProof { .. } => "auth_proof",
            Frame::Hello { .. } => "hello",
            Frame::StatusRequest { .. } => "status_request",
            Frame::Post { .. } => "post",
            Frame::Attach { .. } => "attach",
            Frame::Detach { .. } => "detach",
            Frame::Announce { .. } => "announce",
            Frame::Probe {} => "probe",
            Frame::Welcome { .. } => "welcome",
            Frame::State { .. } => "state",
            Frame::Redirect { .. } => "redirect",
            Frame::Revote { .. } => "revote",
            Frame::Error { .. } => "error",
            Frame::ProbeReply { .. } => "probe_reply",
            Frame::Status { .. } => "status",
            Frame::Posted { .. } => "posted",
            Frame::Say { .. } => "say",
            Frame::Pong { .. } => "pong",
            Frame::Leave {} => "leave",
            Frame::Ack { .. } => "ack",
            Frame::Sync { .. } => "sync",
            Frame::Chat(_) => "chat",
            Frame::Joined { .. } => "joined",
            Frame::Left { .. } => "left",
            Frame::Voters { .. } => "voters",
            Frame::Plugins { .. } => "plugins",
            Frame::Commit { .. } => "commit",
            Frame::Ping { .. } => "ping",
            Frame::Seal(_) => "seal",
            Frame::SyncRequest { .. } => "sync_request",
            Frame::Rejected { .. } => "rejected",
        }
    }

    /// The log entry this frame carries, or the frame back if it is none.
    ///
    /// # Errors
    /// The frame itself (boxed) when it is not a log entry.
    pub fn into_entry(self) -> Result<Entry, Box<Frame>> {
        Ok(match self {
            Frame::Chat(c) => Entry::Chat(c),
            Frame::Joined { epoch, seq, member } => Entry::Joined { epoch, seq, member },
            Frame::Left {
                epoch,
                seq,
                id,
                name,
                reason,
            } => Entry::Left {
                epoch,
                seq,
                id,
                name,
                reason,
            },
            Frame::Voters { epoch, seq, set } => Entry::Voters { epoch, seq, set },
            Frame::Plugins { epoch, seq, set } => Entry::Plugins { epoch, seq, set },
            other => return Err(Box::new(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_matches_the_wire_name() {
        let frames = [
            Frame::Probe {},
            Frame::Leave {},
            Frame::Commit { seq: 1, stable: 0 },
            Frame::Voters {
                epoch: 1,
                seq: 2,
                set: vec![1],
            },
            Frame::error(ErrorCode::Electing, "x"),
        ];
        for f in frames {
            let v: serde_json::Value = serde_json::to_value(&f).unwrap();
            assert_eq!(v["type"], f.kind());
            assert!(Frame::TYPES.contains(&f.kind()));
        }
    }

    #[test]
    fn entries_and_frames_share_their_encoding() {
        let e = Entry::Left {
            epoch: 2,
            seq: 9,
            id: 4,
            name: "bob".into(),
            reason: "left".into(),
        };
        let a = serde_json::to_string(&e).unwrap();
        let b = serde_json::to_string(&e.clone().into_frame()).unwrap();
        assert_eq!(a, b);
        assert_eq!(e.clone().into_frame().into_entry().unwrap(), e);
    }

    #[test]
    fn a_resume_names_its_chat_and_one_without_it_still_reads() {
        let r = Resume {
            member_id: 3,
            epoch: 2,
            chat: "ab".repeat(16),
            voters: vec![vec![1, 2, 3]],
            ..Resume::default()
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(
            text.contains(&format!("\"chat\":\"{}\"", "ab".repeat(16))),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Resume>(&text).unwrap(), r);
        // From a node before the field: no chat, and nothing written for it.
        let old: Resume =
            serde_json::from_str(r#"{"member_id":3,"epoch":2,"commit":0,"log_epoch":0,"last_seq":0}"#)
                .unwrap();
        assert!(old.chat.is_empty() && old.voters.is_empty());
        assert!(text.contains("\"voters\":[[1,2,3]]"), "{text}");
        let written = serde_json::to_string(&old).unwrap();
        assert!(
            !written.contains("chat") && !written.contains("voters"),
            "{written}"
        );
        let code: ErrorCode = serde_json::from_str("\"another_chat\"").unwrap();
        assert_eq!(code, ErrorCode::AnotherChat);
        assert_eq!(code.as_str(), "another_chat");
    }
}
