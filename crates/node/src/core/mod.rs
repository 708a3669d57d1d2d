//! The membership, election and sequencing logic as a state machine without
//! I/O. Inputs are frames, connection events, user lines and the time; the
//! outputs are frames to send, connections to open or close, and events for
//! the user. The driver (`server.rs`) does the I/O; `sim` runs whole
//! clusters in memory under seeded random faults.
//!
//! The rules that make it safe whatever the timing are in docs/PROTOCOL.md
//! (section 10): entries are delivered only once a quorum of voters holds
//! them, a coordinator reigns only with the votes of a quorum, and a new
//! coordinator starts from the most up-to-date log among its voters.

mod candidate;
#[cfg(test)]
mod check;
mod coordinator;
pub mod hooks;
mod log;
mod member;
mod proof;
#[cfg(test)]
mod proof_tests;
#[cfg(test)]
mod sim;
mod state;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use p2p_proto::secure::SignKey;
use p2p_proto::{
    encode, limits, Chat, Entry, ErrorCode, Frame, MemberInfo, PluginRef, Resume, Role, Seal,
    PROTOCOL_VERSION,
};

use self::candidate::Candidate;
use self::coordinator::Coord;
use self::hooks::{Hooks, NoHooks, PluginEvent, VerdictAction};
pub use self::log::hash;
use self::log::Log;
use self::member::{Electing, Joining, Uplink};
use self::state::ChatState;

/// Identifies one connection for the life of the process.
pub type ConnId = u64;
/// Milliseconds on a monotonic clock chosen by the driver.
pub type Millis = u64;

/// What bots posted in answer to one delivery (plugin name, text), and
/// how deep in a chain of bots answering bots that delivery was.
type BotPosts = (Vec<(String, String)>, u32);

/// First id the core uses for connections it dials; the driver numbers the
/// connections it accepts from 1, so the two ranges never meet.
pub const FIRST_DIAL_ID: ConnId = 1 << 48;

/// Most bytes of messages waiting for room in the coordinator's window;
/// past it new messages are refused with a reason.
const MAX_BACKLOG_BYTES: usize = 16 << 20;

/// What the core needs to know about this node.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub name: String,
    /// Our own listening address, as peers should dial it.
    pub addr: String,
    /// Random per process and secret: proves this process to the chat
    /// across re-admissions (the driver draws it; simulations choose it).
    /// The chat knows only its public id (`secure::session_id`).
    pub session: u64,
    /// The chat id to use if this node starts a chat.
    pub chat_id: String,
    /// Peers to join through, in order; empty starts a new chat.
    pub join: Vec<String>,
    /// Start a new chat if no peer in `join` answers.
    pub create_if_alone: bool,
    pub heartbeat_ms: u64,
    /// Entries replayed to a newcomer.
    pub replay: usize,
    /// Entries held for catching up returning members (at least `replay`).
    pub keep: usize,
    pub max_members: usize,
    /// Most bytes of sequenced entries a quorum has not confirmed yet: the
    /// coordinator runs at most this far ahead of its voters (so a voter
    /// that reads as fast as it can never outgrows its queue). Messages
    /// past it wait in a backlog.
    pub window_bytes: usize,
    /// Most bytes of history sent at once to a returning peer; the rest
    /// follows as it acknowledges (and a client further behind gets a hole).
    pub catch_up_bytes: usize,
    /// Emit an event per delivered message (off when nobody prints them,
    /// e.g. `--events none`: saves a copy per message).
    pub message_events: bool,
    /// The plugin set a chat started by this node begins with (a joiner
    /// takes the chat's set instead).
    pub plugins: Vec<PluginRef>,
    /// Seed of this process's signing key (random; simulations choose it).
    pub sign_seed: [u8; 32],
}

impl CoreConfig {
    /// A config with the defaults used by `p2pnode`.
    pub fn new(name: impl Into<String>, addr: impl Into<String>) -> CoreConfig {
        CoreConfig {
            name: name.into(),
            addr: addr.into(),
            session: 1,
            chat_id: "0".repeat(32),
            join: Vec::new(),
            create_if_alone: false,
            heartbeat_ms: 100,
            replay: 100,
            keep: 10_000,
            max_members: limits::MAX_MEMBERS,
            window_bytes: 4 << 20,
            catch_up_bytes: 1 << 20,
            message_events: true,
            plugins: Vec::new(),
            sign_seed: p2p_proto::secure::random_bytes(),
        }
    }
}

/// Something that happened outside the core.
// Frames dominate the inputs; boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Input {
    /// A frame arrived on a connection.
    Frame(ConnId, Frame),
    /// A connection closed or failed (with the reason, e.g. a slow consumer).
    Closed(ConnId, Option<String>),
    /// A dial was refused: nothing listens at that address. This is proof
    /// that the process we knew there is gone.
    Refused(ConnId),
    /// A dial reached a node that holds another chat key (or none): not a
    /// node of this chat, so the one we knew there is gone too. The text
    /// says what the other end said.
    WrongKey(ConnId, String),
    /// Time passed (the `now` given to [`Core::handle`] is what counts).
    Tick,
    /// Output queued on these connections drained since the last tick: the
    /// peer is reading, even if a burst keeps its answers queued behind.
    Progress(Vec<ConnId>),
    /// A line typed by this node's user (or posted by an observer).
    User(String),
    /// Leave the chat and stop.
    Quit,
}

/// Which members a broadcast goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Peers get every entry as soon as it is sequenced (to confirm it),
    /// then `commit` frames.
    Peers,
    /// Clients (members without a server) get only committed entries.
    Clients,
    All,
}

/// Something the driver must do.
///
/// The contract every driver keeps — the real one (`server.rs`) and the
/// simulator (`sim.rs`), whose runs are only evidence if it keeps the same
/// one:
/// - outputs are performed in the order drained; on any one connection,
///   bytes arrive in the order they were queued, and before its close;
/// - a `Broadcast` reaches exactly the connections in its group when it is
///   performed: not one added by a later `JoinGroup`, not one closed by an
///   earlier `Close` (a driver may gather consecutive broadcasts into one
///   record, as `server.rs` does, but never across another output that
///   touches a connection);
/// - a connection the driver gives up on (too many bytes unread) is
///   reported back as [`Input::Closed`] with the reason, never dropped
///   silently;
/// - after performing what an input produced (and the inputs fed back),
///   the driver calls [`Core::end_batch`] and performs its outputs too.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Queue an encoded frame on one connection.
    Send(ConnId, Bytes),
    /// Queue an encoded frame on every connection of a broadcast group.
    Broadcast(Group, Bytes),
    /// Add a connection to a broadcast group.
    JoinGroup(ConnId, Group),
    /// Close a connection once what is queued on it is written (this also
    /// takes it out of its broadcast group).
    Close(ConnId),
    /// Open a connection to `addr` and send `hello` first; report frames and
    /// the close (or refusal) as inputs for `conn`.
    Dial {
        conn: ConnId,
        addr: String,
        hello: Bytes,
    },
    /// Open a connection, send one frame and close (best effort, no report).
    Notify { addr: String, frame: Bytes },
    /// Tell the user.
    Event(Event),
    /// Stop the node with this exit code.
    Exit(i32),
}

/// What the user (or a supervisor reading `--events json`) is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Admitted to a chat (or started one).
    Ready {
        id: u64,
        epoch: u64,
        coordinator: String,
        members: usize,
        created: bool,
    },
    /// A delivered chat message; `replay` marks history received on joining.
    Message {
        chat: Chat,
        replay: bool,
    },
    Joined {
        id: u64,
        name: String,
        seq: u64,
    },
    Left {
        id: u64,
        name: String,
        reason: String,
        seq: u64,
    },
    /// A delivered change of the voters (member ids) or of the plugin set
    /// (plugin names), as the entry says.
    Config {
        seq: u64,
        voters: Option<Vec<u64>>,
        plugins: Option<Vec<String>>,
    },
    /// A new coordinator reign, as seen from this node.
    Role {
        role: Role,
        epoch: u64,
        coordinator: String,
        /// From losing the old coordinator to being welcomed by the new one.
        election_ms: Option<u64>,
    },
    /// The coordinator was lost; an election is under way.
    Electing {
        lost: String,
        reason: String,
    },
    /// Told of (or redirected to) another coordinator, this node goes to
    /// it: no coordinator was lost and nobody is elected.
    Following {
        addr: String,
        reason: String,
    },
    /// This node cannot make progress and says why (a candidate short of a
    /// quorum, a coordinator that lost its voters).
    Waiting {
        reason: String,
    },
    /// Progress again with no change of coordinator: a coordinator that
    /// said it was waiting hears a majority of its voters once more, or a
    /// member that started electing finds its coordinator still there.
    Resumed {
        reason: String,
    },
    /// A voter stopped answering the coordinator; it stays a voter until it
    /// comes back or is proven dead.
    Unreachable {
        id: u64,
        name: String,
        reason: String,
    },
    /// Answer to `/who`: members in join order.
    Who {
        members: Vec<MemberInfo>,
        coordinator: u64,
    },
    /// A message of ours was not delivered.
    Rejected {
        client_seq: u64,
        reason: String,
    },
    Error {
        code: Option<ErrorCode>,
        message: String,
    },
    /// An answer for this node's user (e.g. to /help).
    Info {
        message: String,
    },
    /// A plugin dropped or rewrote someone's message.
    Verdict {
        plugin: String,
        rule: String,
        action: VerdictAction,
        member: String,
    },
    /// A plugin was loaded, refused, quarantined or detached here.
    Plugin {
        name: String,
        state: PluginEvent,
        detail: String,
    },
}

/// Where this node stands.
enum State {
    Joining(Joining),
    Member(Uplink),
    Electing(Electing),
    Candidate(Box<Candidate>),
    Coordinator(Box<Coord>),
    Stopped,
}

/// The node's whole logical state.
pub struct Core {
    cfg: CoreConfig,
    /// Our member id (0 until first admitted), name, address, session.
    me: MemberInfo,
    /// The epoch of the coordinator we follow or are (0: none yet).
    epoch: u64,
    /// Member id of that coordinator.
    coordinator: u64,
    /// The highest epoch we gave a vote that may count: from then on no
    /// frame of an older coordinator is accepted.
    bound_epoch: u64,
    /// Our latest vote: (epoch, candidate). One vote per epoch.
    voted: (u64, u64),
    /// Signs our log when we coordinate.
    signer: SignKey,
    /// Our proof (see `proof.rs`): the latest seal we vouch for in a
    /// resume and a `sync`. It never goes backwards.
    sealed: Option<Seal>,
    /// Entries our proof covers that the coordinator we follow has not sent
    /// again yet: kept so that the proof stays one we can back.
    archive: Option<proof::Archive>,
    /// The latest seal of the coordinator we follow that matches what we
    /// hold: we acknowledge nothing past it.
    ack_seal: Option<Seal>,
    /// The last seq of the log the coordinator we follow took over with
    /// (from its welcome): a seal before it paces a catch-up, and does not
    /// replace our proof.
    reign_start: u64,
    /// A seal for entries not here yet (checked when they arrive).
    seal_ahead: Option<Seal>,
    /// Who coordinated recent epochs, as we know first-hand (we followed
    /// it, voted for it, or were it): epoch → member id.
    coordinators: BTreeMap<u64, u64>,
    /// Highest epoch heard of anywhere.
    max_epoch: u64,
    /// Seq of the last voter-set change known to be in force (from the
    /// coordinator): elections then need only the new set.
    stable: u64,
    log: Log,
    /// The chat as of `state_at` (delivered entries).
    state: ChatState,
    state_at: u64,
    /// The chat as of the last entry held, delivered or not (names taken,
    /// de-duplication, voters for elections).
    tip: ChatState,
    /// Members proven dead (their address refused us, another process
    /// answers there, or they left). Never wrong, never forgotten.
    dead: BTreeSet<u64>,
    /// Coordinators that told us they were leaving (a clean quit): if we
    /// take over, their `left` entry says "left", not "disconnected".
    left_cleanly: BTreeSet<u64>,
    /// Our messages not yet delivered: re-sent after a failover.
    pending: Vec<(u64, String)>,
    next_client_seq: u64,
    next_dial: ConnId,
    now: Millis,
    last_tick: Millis,
    /// After waking from a stall (SIGSTOP, starvation) timeouts wait until
    /// here, so buffered frames are read before silence is judged.
    stall_until: Millis,
    /// After a candidacy that could not win (section 8 of PROTOCOL.md,
    /// "Standing down"), this node neither runs nor takes votes until here,
    /// so the next voter gets its turn.
    stand_down_until: Millis,
    /// Votes this node dropped as a candidate because the voter's log
    /// was sealed only by the voter itself, for an epoch we did not see
    /// (nobody vouches for its own history; PROTOCOL.md section 14).
    self_vouched: u64,
    role: State,
    out: Vec<Output>,
    hooks: Box<dyn Hooks>,
    /// The plugin set the hooks hold now.
    hooks_set: Vec<PluginRef>,
    /// Announcements being checked: the probe connection, and what was
    /// announced. Nobody steps down on hearsay.
    announced: BTreeMap<ConnId, (u64, MemberInfo)>,
    /// Probes checking who answers at a member's address: the probe
    /// connection → (member id, the session we know it by).
    identity_checks: BTreeMap<ConnId, (u64, u64)>,
}

impl Core {
    /// Creates the core and starts it: either a new chat (no peers to join)
    /// or a join through the configured peers.
    pub fn new(cfg: CoreConfig, now: Millis) -> Core {
        Core::with_hooks(cfg, now, Box::new(NoHooks))
    }

    /// Like [`Core::new`], with a plugin chain.
    pub fn with_hooks(cfg: CoreConfig, now: Millis, hooks: Box<dyn Hooks>) -> Core {
        let keep = cfg.keep.max(cfg.replay);
        let mut core = Core {
            me: MemberInfo {
                id: 0,
                name: cfg.name.clone(),
                addr: Some(cfg.addr.clone()),
                session: p2p_proto::secure::session_id(cfg.session),
                sign_key: Some(SignKey::from_seed(cfg.sign_seed).public_hex()),
            },
            signer: SignKey::from_seed(cfg.sign_seed),
            sealed: None,
            archive: None,
            ack_seal: None,
            reign_start: 0,
            seal_ahead: None,
            coordinators: BTreeMap::new(),
            epoch: 0,
            coordinator: 0,
            bound_epoch: 0,
            voted: (0, 0),
            max_epoch: 0,
            stable: 0,
            log: Log::new(keep),
            state: ChatState::default(),
            state_at: 0,
            tip: ChatState::default(),
            dead: BTreeSet::new(),
            left_cleanly: BTreeSet::new(),
            pending: Vec::new(),
            next_client_seq: 1,
            next_dial: FIRST_DIAL_ID,
            now,
            last_tick: now,
            stall_until: 0,
            stand_down_until: 0,
            self_vouched: 0,
            role: State::Stopped,
            out: Vec::new(),
            hooks,
            hooks_set: Vec::new(),
            announced: BTreeMap::new(),
            identity_checks: BTreeMap::new(),
            cfg,
        };
        if core.cfg.join.is_empty() {
            core.create();
        } else {
            core.start_joining();
        }
        core
    }

    /// Feeds one input; the resulting outputs are collected by [`Core::drain`].
    pub fn handle(&mut self, now: Millis, input: Input) {
        self.now = self.now.max(now);
        match input {
            Input::Frame(conn, frame) => self.on_frame(conn, frame),
            Input::Closed(conn, reason) => self.on_closed(conn, reason, false),
            Input::Refused(conn) => self.on_closed(conn, None, true),
            Input::WrongKey(conn, why) => self.on_wrong_key(conn, why),
            Input::Tick => self.on_tick(),
            Input::Progress(conns) => self.on_progress(&conns),
            Input::User(line) => self.on_user(line),
            Input::Quit => self.quit(),
        }
    }

    /// Ends a batch of inputs: a peer acknowledges what it now holds, a
    /// coordinator commits what a quorum holds and delivers it. Drivers
    /// call this once per batch, so one acknowledgement covers many entries.
    pub fn end_batch(&mut self, now: Millis) {
        self.now = self.now.max(now);
        match &self.role {
            State::Coordinator(_) => self.coord_end_batch(),
            State::Member(_) => self.member_end_batch(),
            _ => {}
        }
    }

    /// Takes the outputs produced so far.
    pub fn drain(&mut self) -> std::vec::Drain<'_, Output> {
        self.out.drain(..)
    }

    /// Takes the outputs produced so far by swapping buffers with `spare`
    /// (which must be empty): no copy of each output, and both buffers keep
    /// their room for the next turn.
    pub fn take_outputs(&mut self, spare: &mut Vec<Output>) {
        debug_assert!(spare.is_empty());
        std::mem::swap(&mut self.out, spare);
    }

    pub fn role(&self) -> Role {
        match self.role {
            State::Joining(_) | State::Stopped => Role::Joining,
            State::Member(_) => Role::Member,
            State::Electing(_) => Role::Electing,
            State::Candidate(_) => Role::Candidate,
            State::Coordinator(_) => Role::Coordinator,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Last delivered seq.
    pub fn last_seq(&self) -> u64 {
        self.log.applied()
    }

    /// Members in join order, as of the delivered entries.
    pub fn members(&self) -> &[MemberInfo] {
        &self.state.members
    }

    pub fn id(&self) -> u64 {
        self.me.id
    }

    /// How often the driver should feed [`Input::Tick`].
    pub fn tick_ms(&self) -> u64 {
        (self.cfg.heartbeat_ms / 4).max(1)
    }

    // ---- helpers shared by the role files ----

    fn emit(&mut self, event: Event) {
        self.out.push(Output::Event(event));
    }

    fn send(&mut self, conn: ConnId, frame: &Frame) {
        self.out.push(Output::Send(conn, encode(frame)));
    }

    /// Sends an error frame and closes the connection.
    fn refuse(&mut self, conn: ConnId, code: ErrorCode, message: impl Into<String>) {
        self.send(conn, &Frame::error(code, message));
        self.out.push(Output::Close(conn));
    }

    fn close(&mut self, conn: ConnId) {
        self.out.push(Output::Close(conn));
    }

    fn new_conn(&mut self) -> ConnId {
        let conn = self.next_dial;
        self.next_dial += 1;
        conn
    }

    fn dial(&mut self, addr: &str, first: &Frame) -> ConnId {
        let conn = self.new_conn();
        self.out.push(Output::Dial {
            conn,
            addr: addr.to_string(),
            hello: encode(first),
        });
        conn
    }

    fn hello(&self, resume: Option<Resume>) -> Frame {
        Frame::Hello {
            version: PROTOCOL_VERSION,
            name: self.me.name.clone(),
            session: self.cfg.session,
            addr: self.me.addr.clone(),
            resume,
            sign_key: self.me.sign_key.clone(),
        }
    }

    /// What we report when reconnecting (with a vote for `vote`, if any).
    fn resume(&self, vote: Option<u64>) -> Resume {
        // What we can prove: a new coordinator takes no more from us.
        let (log_epoch, last_seq) = self.provable();
        Resume {
            member_id: self.me.id,
            epoch: self.epoch,
            commit: self.log.applied(),
            log_epoch,
            last_seq,
            vote,
            min_epoch: self.bound_epoch,
            dead: self.dead.iter().copied().collect(),
            chat: self.state.chat_id.clone(),
            voters: self
                .tip
                .election_configs(self.stable)
                .into_iter()
                .map(<[u64]>::to_vec)
                .collect(),
        }
    }

    /// A member as the chat knows it (latest entries first).
    fn member(&self, id: u64) -> Option<&MemberInfo> {
        self.tip.member(id).or_else(|| self.state.member(id))
    }

    fn name_of(&self, id: u64) -> String {
        self.member(id)
            .map(|m| m.name.clone())
            .unwrap_or_else(|| format!("#{id}"))
    }

    fn coordinator_name(&self) -> String {
        self.name_of(self.coordinator)
    }

    /// The coordinator's address, as the member list has it.
    fn coordinator_addr(&self) -> Option<String> {
        self.member(self.coordinator).and_then(|m| m.addr.clone())
    }

    /// Sends a client to the coordinator and closes its connection.
    fn redirect_to_coordinator(&mut self, conn: ConnId) {
        match self.coordinator_addr() {
            Some(addr) => {
                let frame = Frame::Redirect {
                    addr,
                    epoch: self.epoch,
                };
                self.send(conn, &frame);
                self.close(conn);
            }
            None => self.refuse(
                conn,
                ErrorCode::Electing,
                "no coordinator is known yet; retry in a moment",
            ),
        }
    }

    fn heartbeat_dead_after(&self) -> Millis {
        self.cfg.heartbeat_ms * 3
    }

    /// True while timeouts must wait (just woke from a stall).
    fn stalled(&self) -> bool {
        self.now < self.stall_until
    }

    /// True while this node lets other voters run (after a candidacy that
    /// could not win).
    fn standing_down(&self) -> bool {
        self.now < self.stand_down_until
    }

    fn note_epoch(&mut self, epoch: u64) {
        self.max_epoch = self.max_epoch.max(epoch);
    }

    /// Voters (of the current or the previous set) with a `left` entry are
    /// proven dead: a coordinator appends one for a voter only once it
    /// proved it dead (or it left).
    fn departed_voters_dead(&mut self) {
        for v in self.tip.all_voters() {
            if self.member(v).is_none() {
                self.proven_dead(v);
            }
        }
    }

    /// Marks a member proven dead.
    fn proven_dead(&mut self, id: u64) {
        if id != 0 && id != self.me.id && self.dead.insert(id) {
            tracing::debug!(id, "proven dead");
        }
    }

    /// Appends an entry received from the coordinator (or a sync) after the
    /// last one we hold.
    fn append_entry(&mut self, entry: Entry) -> Result<(), log::AppendError> {
        let seq = entry.seq();
        if seq > self.state_at {
            self.tip.apply(&entry);
        }
        self.log.append(entry)
    }

    /// Recomputes the tip state after the log's tail changed.
    fn rebuild_tip(&mut self) {
        let mut tip = self.state.clone();
        let from = self.state_at + 1;
        for e in self.log.range(from, u64::MAX) {
            tip.apply(e);
        }
        self.tip = tip;
    }

    /// Installs a whole state (from a welcome or a sync) as of seq `at`.
    fn install_state(&mut self, state: ChatState, at: u64) {
        self.state = state;
        self.state_at = at;
        // Entries we delivered past that point are in the state too.
        let applied = self.log.applied();
        if at < applied {
            let held: Vec<Entry> = self.log.range(at + 1, applied).cloned().collect();
            for e in &held {
                self.state.apply(e);
            }
            self.state_at = applied;
        }
        self.sync_plugins();
        self.rebuild_tip();
    }

    /// Delivers every committed entry held: events, state, plugins, and
    /// acknowledgement of our own messages. Returns the frames delivered.
    ///
    /// With `hooks` (a coordinator with plugins), plugins hear each entry
    /// as it is delivered, in seq order, while it is still borrowed from
    /// the log (no copy per message); the posts they answer with come back
    /// with the bot depth of the message they answer, to be sequenced
    /// after the batch.
    fn apply_committed(&mut self, hooks: bool) -> (Vec<Bytes>, Vec<BotPosts>) {
        let mut done = Vec::new();
        let mut posts = Vec::new();
        // Plugins hear which delivery ends the batch: the driver sends the
        // batch to members only after this input is handled.
        let last_chat = if hooks {
            let (from, to) = (self.log.applied() + 1, self.log.commit());
            self.log
                .range(from, to)
                .rev()
                .find(|e| matches!(e, Entry::Chat(_)))
                .map(Entry::seq)
        } else {
            None
        };
        while let Some((entry, frame)) = self.log.next_to_apply() {
            let seq = entry.seq();
            done.push(frame.clone());
            if let Entry::Chat(chat) = entry {
                // The hot path: no clone unless someone needs one. Only
                // disjoint fields are touched while `entry` borrows the log.
                if seq > self.state_at {
                    self.state.apply(entry);
                    self.state_at = seq;
                }
                if chat.from_id == self.me.id && chat.from_id != 0 && chat.client_seq > 0 {
                    let at = self.pending.partition_point(|(cs, _)| *cs < chat.client_seq);
                    if self.pending.get(at).is_some_and(|(cs, _)| *cs == chat.client_seq) {
                        let (_, text) = self.pending.remove(at);
                        if let State::Member(u) = &mut self.role {
                            u.in_flight = u.in_flight.saturating_sub(text.len());
                        }
                    }
                }
                if self.cfg.message_events {
                    self.out.push(Output::Event(Event::Message {
                        chat: chat.clone(),
                        replay: false,
                    }));
                }
                if hooks {
                    let depth = match &mut self.role {
                        State::Coordinator(c) => c.bot_depth.remove(&seq).unwrap_or(0),
                        _ => 0,
                    };
                    let answer = self.hooks.on_delivered(
                        &coordinator::hook_message(chat),
                        false,
                        Some(seq) == last_chat,
                    );
                    if !answer.is_empty() {
                        posts.push((answer, depth));
                    }
                    self.plugin_reports();
                }
                self.log.mark_applied(seq);
                continue;
            }
            let entry = entry.clone();
            self.log.mark_applied(seq);
            if seq > self.state_at {
                self.state.apply(&entry);
                self.state_at = seq;
                if matches!(entry, Entry::Plugins { .. }) {
                    self.sync_plugins();
                }
            }
            self.deliver_event(&entry, false);
            if hooks {
                let answer = match &entry {
                    Entry::Joined { member, .. } => self.hooks.on_join(member.id, &member.name),
                    Entry::Left { id, name, reason, .. } => self.hooks.on_leave(*id, name, reason),
                    _ => Vec::new(),
                };
                if !answer.is_empty() {
                    posts.push((answer, 0));
                }
                self.plugin_reports();
            }
        }
        (done, posts)
    }

    /// Tells the user about a delivered entry, and acknowledges our own.
    fn deliver_event(&mut self, entry: &Entry, replay: bool) {
        match entry {
            Entry::Chat(chat) => {
                if chat.from_id == self.me.id && chat.from_id != 0 && chat.client_seq > 0 {
                    let at = self.pending.partition_point(|(cs, _)| *cs < chat.client_seq);
                    if self.pending.get(at).is_some_and(|(cs, _)| *cs == chat.client_seq) {
                        let (_, text) = self.pending.remove(at);
                        self.own_done(text.len());
                    }
                }
                if self.cfg.message_events {
                    self.emit(Event::Message {
                        chat: chat.clone(),
                        replay,
                    });
                }
            }
            Entry::Joined { seq, member, .. } => self.emit(Event::Joined {
                id: member.id,
                name: member.name.clone(),
                seq: *seq,
            }),
            Entry::Left {
                seq,
                id,
                name,
                reason,
                ..
            } => self.emit(Event::Left {
                id: *id,
                name: name.clone(),
                reason: reason.clone(),
                seq: *seq,
            }),
            Entry::Voters { seq, set, .. } => self.emit(Event::Config {
                seq: *seq,
                voters: Some(set.clone()),
                plugins: None,
            }),
            Entry::Plugins { seq, set, .. } => self.emit(Event::Config {
                seq: *seq,
                voters: None,
                plugins: Some(set.iter().map(|p| p.name.clone()).collect()),
            }),
        }
    }

    /// Makes the loaded plugins match the delivered state.
    fn sync_plugins(&mut self) {
        if self.state.plugins == self.hooks_set {
            return;
        }
        self.hooks_set = self.state.plugins.clone();
        let reports = self.hooks.set_plugins(&self.state.chat_id, &self.hooks_set);
        for r in reports {
            self.emit(Event::Plugin {
                name: r.plugin,
                state: r.state,
                detail: r.detail,
            });
        }
    }

    /// Surfaces quarantines and the like noticed during calls.
    fn plugin_reports(&mut self) {
        for r in self.hooks.reports() {
            self.emit(Event::Plugin {
                name: r.plugin,
                state: r.state,
                detail: r.detail,
            });
        }
    }

    // ---- inputs common to every role ----

    fn on_frame(&mut self, conn: ConnId, frame: Frame) {
        if let Some((epoch, coordinator)) = self.announced.remove(&conn) {
            self.close(conn);
            return self.announce_checked(epoch, coordinator, frame);
        }
        if let Some((id, session)) = self.identity_checks.remove(&conn) {
            self.close(conn);
            if matches!(&frame, Frame::ProbeReply { session: s, chat, .. } if self.another_process(session, *s, chat))
            {
                // Another process answers at its address: it is gone.
                self.proven_dead(id);
            }
            return;
        }
        match &self.role {
            State::Coordinator(c) if c.owns(conn) => return self.coord_frame(conn, frame),
            State::Candidate(c) if c.owns(conn) => return self.cand_frame(conn, frame),
            _ => {}
        }
        if self.is_uplink(conn) {
            return self.on_uplink_frame(conn, frame);
        }
        match frame {
            Frame::Hello {
                version,
                name,
                session,
                addr,
                resume,
                sign_key,
            } => {
                if let Some(hello) = self.checked_hello(conn, version, name, session, addr, resume, sign_key) {
                    self.on_hello(hello);
                }
            }
            Frame::StatusRequest { log } => {
                let status = self.status(log);
                self.send(conn, &status);
            }
            Frame::Probe {} => {
                let reply = Frame::ProbeReply {
                    session: self.me.session,
                    id: self.me.id,
                    role: self.role(),
                    epoch: match &self.role {
                        State::Candidate(c) => c.epoch,
                        _ => self.epoch,
                    },
                    coordinator: match self.role {
                        State::Member(_) | State::Coordinator(_) => self.coordinator_addr(),
                        _ => None,
                    },
                    chat: self.state.chat_id.clone(),
                };
                self.send(conn, &reply);
                self.close(conn);
            }
            Frame::Post { text } => {
                if let Err(e) = limits::check_text(&text) {
                    return self.refuse(conn, ErrorCode::BadField, format!("not posted: {e}"));
                }
                // Answer once queued, so a poster's messages keep their
                // order, with the number its delivery will carry.
                if let Some(client_seq) = self.on_user_text(text) {
                    self.send(conn, &Frame::Posted { client_seq });
                }
            }
            Frame::Attach { name, config } => self.on_plugin_change(conn, PluginChange::Attach(PluginRef { name, config })),
            Frame::Detach { name } => self.on_plugin_change(conn, PluginChange::Detach(name)),
            Frame::Announce { epoch, coordinator } => {
                self.close(conn);
                self.on_announce(epoch, coordinator);
            }
            // A keyed node's handshake reaching a node without a key.
            Frame::Auth { .. } => self.refuse(
                conn,
                ErrorCode::Unauthenticated,
                "this node runs without a chat key (--insecure); start every node of a chat the same way",
            ),
            other => self.refuse(
                conn,
                ErrorCode::UnexpectedFrame,
                format!(
                    "a connection must open with hello, status_request, post, attach, detach, announce or probe, not {}",
                    other.kind()
                ),
            ),
        }
    }

    /// Validates a `hello` (refusing it with the reason if it is bad).
    #[allow(clippy::too_many_arguments)]
    fn checked_hello(
        &mut self,
        conn: ConnId,
        version: u32,
        name: String,
        session: u64,
        addr: Option<String>,
        resume: Option<Resume>,
        sign_key: Option<String>,
    ) -> Option<Hello> {
        if version != PROTOCOL_VERSION {
            self.refuse(
                conn,
                ErrorCode::VersionMismatch,
                format!("protocol version {version} is not supported; this node speaks version {PROTOCOL_VERSION}"),
            );
            return None;
        }
        if let Err(e) = limits::check_name(&name) {
            self.refuse(conn, ErrorCode::BadName, e);
            return None;
        }
        if let Some(Err(e)) = resume
            .as_ref()
            .filter(|r| !r.chat.is_empty())
            .map(|r| limits::check_chat_id(&r.chat))
        {
            self.refuse(conn, ErrorCode::BadField, e);
            return None;
        }
        if resume
            .as_ref()
            .is_some_and(|r| r.voters.len() > 2 || r.voters.iter().any(|v| v.len() > state::MAX_VOTERS))
        {
            let e = format!(
                "resume.voters: at most 2 voter sets of at most {} ids",
                state::MAX_VOTERS
            );
            self.refuse(conn, ErrorCode::BadField, e);
            return None;
        }
        if let Some(r) = resume
            .as_ref()
            .filter(|r| !r.chat.is_empty() && !self.state.chat_id.is_empty() && r.chat != self.state.chat_id)
        {
            // Admitting it as a newcomer would only add a member that
            // leaves at once (it never joins another chat) to our log.
            let message = format!(
                "this node runs another chat ({}), not chat {}: the node you knew at this address is gone",
                self.state.chat_id, r.chat
            );
            self.refuse(conn, ErrorCode::AnotherChat, message);
            return None;
        }
        if let Some(Err(e)) = addr.as_deref().map(limits::check_addr) {
            self.refuse(conn, ErrorCode::BadField, e);
            return None;
        }
        // A peer may coordinate one day: it must have a signing key.
        let sign_key = match (&addr, sign_key) {
            (None, _) => None,
            (Some(_), Some(k)) if p2p_proto::secure::valid_public_key(&k) => Some(k),
            (Some(_), _) => {
                self.refuse(
                    conn,
                    ErrorCode::BadField,
                    "a hello with addr needs sign_key: an Ed25519 public key, 64 hex digits",
                );
                return None;
            }
        };
        // The chat only ever keeps and shows the session's public id:
        // coming back as a member proves the secret behind it.
        Some(Hello {
            conn,
            name,
            session: p2p_proto::secure::session_id(session),
            addr,
            resume,
            sign_key,
        })
    }

    fn on_hello(&mut self, h: Hello) {
        match &self.role {
            State::Coordinator(_) => self.coord_hello(h),
            State::Candidate(_) => self.cand_hello(h),
            State::Member(_) | State::Electing(_) => self.member_hello(h),
            // A node joins only as a new process (it keeps nothing across
            // a restart): whoever comes back to this address knew another
            // process, gone for good. Saying "retry" kept it electing until
            // this node, answered "an election is under way" in turn, ran
            // out of patience (5 s at the default heartbeat).
            State::Joining(_) if h.resume.is_some() => self.refuse(
                h.conn,
                ErrorCode::AnotherChat,
                "this node is a new process that has not joined a chat yet: the node you knew at this address is gone",
            ),
            State::Joining(_) | State::Stopped => self.refuse(
                h.conn,
                ErrorCode::Electing,
                "this node has not joined a chat yet; retry in a moment",
            ),
        }
    }

    fn on_closed(&mut self, conn: ConnId, reason: Option<String>, refused: bool) {
        if self.announced.remove(&conn).is_some() {
            tracing::info!("an announced coordinator could not be reached; ignoring the announcement");
            return;
        }
        if let Some((id, _)) = self.identity_checks.remove(&conn) {
            if refused {
                self.proven_dead(id);
            }
            return;
        }
        match &self.role {
            State::Coordinator(c) if c.owns(conn) => return self.coord_closed(conn, reason, refused),
            State::Candidate(c) if c.owns(conn) => return self.cand_closed(conn, refused),
            _ => {}
        }
        if self.is_uplink(conn) {
            self.uplink_closed(conn, reason, refused);
        }
    }

    /// A dial found a node of another chat. Joining, that ends the attempt
    /// with a clear error; later, it proves the member we knew there gone.
    fn on_wrong_key(&mut self, conn: ConnId, why: String) {
        if let State::Joining(j) = &self.role {
            if j.conn == Some(conn) {
                self.emit(Event::Error {
                    code: Some(ErrorCode::Unauthenticated),
                    message: format!("could not join: {why}"),
                });
                self.role = State::Stopped;
                self.out.push(Output::Exit(2));
                return;
            }
        }
        self.on_closed(conn, Some(why), true);
    }

    fn on_tick(&mut self) {
        let gap = self.now.saturating_sub(self.last_tick);
        self.last_tick = self.now;
        if gap > 2 * self.cfg.heartbeat_ms {
            // We did not run for a while: read what is buffered before
            // judging anyone's silence.
            tracing::info!(
                gap_ms = gap,
                "woke from a stall; holding timeouts for a heartbeat"
            );
            self.stall_until = self.now + self.cfg.heartbeat_ms;
        }
        match self.role {
            State::Coordinator(_) => self.coord_tick(),
            State::Candidate(_) => self.cand_tick(),
            State::Member(_) | State::Electing(_) | State::Joining(_) => self.member_tick(),
            State::Stopped => {}
        }
    }

    fn on_progress(&mut self, conns: &[ConnId]) {
        let now = self.now;
        if let State::Coordinator(c) = &mut self.role {
            c.heard_from(conns, now);
        }
    }

    fn on_user(&mut self, line: String) {
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        match line.trim() {
            "" => {}
            "/who" => self.emit(Event::Who {
                members: self.state.members.clone(),
                coordinator: self.coordinator,
            }),
            "/quit" => self.quit(),
            "/help" => self.emit(Event::Info {
                message: "type a line to send it to everyone (start it with // to send one that begins with /); /who lists the members, /quit (or Ctrl-D) leaves the chat"
                    .into(),
            }),
            // `//text` sends `/text`, as in IRC clients.
            escaped if escaped.starts_with("//") => {
                self.on_user_text(line.replacen('/', "", 1));
            }
            cmd if cmd.starts_with('/') => self.emit(Event::Error {
                code: None,
                message: format!(
                    "unknown command {cmd}; commands are /who, /help and /quit (start a line with // to send one that begins with /)"
                ),
            }),
            _ => {
                self.on_user_text(line);
            }
        }
    }

    /// Queues our own chat message and sends it where it can go now;
    /// returns its `client_seq` (none for an invalid text).
    fn on_user_text(&mut self, text: String) -> Option<u64> {
        if let Err(e) = limits::check_text(&text) {
            self.emit(Event::Error {
                code: None,
                message: format!("not sent: {e}"),
            });
            return None;
        }
        let client_seq = self.next_client_seq;
        self.next_client_seq += 1;
        self.pending.push((client_seq, text.clone()));
        match &self.role {
            State::Coordinator(c) if c.ready() => self.coord_own(client_seq, text),
            State::Member(u) if u.settled() => self.pump(),
            // Joining, electing, or still loading: sent, in order, once settled.
            _ => {}
        }
        Some(client_seq)
    }

    fn quit(&mut self) {
        if let State::Coordinator(_) = self.role {
            // Deliver what a quorum already holds before going.
            self.coord_end_batch();
        }
        match std::mem::replace(&mut self.role, State::Stopped) {
            State::Member(u) => {
                self.send(u.conn, &Frame::Leave {});
                self.close(u.conn);
            }
            State::Coordinator(c) => {
                // Members take a closed coordinator connection after this
                // frame as a clean leave: the coordinator is proven gone.
                let frame = encode(&Frame::error(
                    ErrorCode::ShuttingDown,
                    "the coordinator left the chat",
                ));
                self.out.push(Output::Broadcast(Group::All, frame));
                for conn in c.conns() {
                    self.close(conn);
                }
            }
            State::Candidate(c) => {
                for conn in c.conns() {
                    self.refuse(conn, ErrorCode::ShuttingDown, "the candidate left the chat");
                }
            }
            State::Electing(e) => {
                if let Some(conn) = e.conn() {
                    self.close(conn);
                }
            }
            State::Joining(j) => {
                if let Some(conn) = j.conn {
                    self.close(conn);
                }
            }
            State::Stopped => {}
        }
        self.out.push(Output::Exit(0));
    }

    fn status(&self, with_log: bool) -> Frame {
        let waiting = match &self.role {
            State::Candidate(c) => c.waiting_reason(),
            State::Coordinator(c) => c.waiting_reason(),
            _ => None,
        };
        let mut frame = Frame::Status {
            name: self.me.name.clone(),
            id: self.me.id,
            role: self.role(),
            epoch: self.epoch,
            coordinator: (self.coordinator != 0).then(|| self.coordinator_name()),
            members: Vec::new(),
            voters: self.state.voters.clone(),
            stable: self.state.voters_seq <= self.stable,
            last_seq: self.log.applied(),
            first_seq: self.log.first_held(),
            gaps: self.log.gaps(),
            chat_id: self.state.chat_id.clone(),
            log: with_log.then(Vec::new),
            plugins: self.hooks.status(),
            waiting,
            queued: u32::try_from(self.pending.len()).unwrap_or(u32::MAX),
        };
        // Whatever the members' names and addresses, the answer fits the
        // frame limit: members take at most 2/5 of the room left by the
        // fixed fields, the newest log rows the rest.
        let room = STATUS_BUDGET.saturating_sub(state::encoded_len(&frame));
        let mut used = 0;
        let listed: Vec<MemberInfo> = self
            .state
            .members
            .iter()
            .take(limits::STATUS_MEMBERS)
            .take_while(|m| {
                used += state::encoded_len(m);
                used <= room * 2 / 5
            })
            .cloned()
            .collect();
        let used: usize = listed.iter().map(state::encoded_len).sum();
        if let Frame::Status { members, log, .. } = &mut frame {
            *members = listed;
            if with_log {
                let mut rows = self.log.digest(limits::STATUS_LOG_ROWS);
                let mut left = room.saturating_sub(used);
                let keep = rows
                    .iter()
                    .rev()
                    .take_while(|r| {
                        let cost = state::encoded_len(r);
                        let fits = cost <= left;
                        left = left.saturating_sub(cost);
                        fits
                    })
                    .count();
                rows.drain(..rows.len() - keep);
                *log = Some(rows);
            }
        }
        frame
    }

    /// A node told us it coordinates a later epoch. Nothing changes until
    /// we have reached it ourselves and it confirmed (a probe), so a false
    /// announcement costs one connection, not a step-down.
    fn on_announce(&mut self, epoch: u64, coordinator: MemberInfo) {
        if coordinator.session == self.me.session
            || epoch <= self.epoch.max(self.bound_epoch.saturating_sub(1))
            || self.announced.len() >= MAX_ANNOUNCE_CHECKS
        {
            return;
        }
        let Some(addr) = coordinator.addr.clone() else {
            return;
        };
        if limits::check_addr(&addr).is_err() {
            return;
        }
        let conn = self.dial(&addr, &Frame::Probe {});
        self.announced.insert(conn, (epoch, coordinator));
    }

    /// Whether a probe answer (its `session` and `chat`) came from another
    /// process than the member we know by `expected` (its session): a new
    /// session, or a process of another chat (which may once have been
    /// admitted to ours too, then started its own).
    fn another_process(&self, expected: u64, session: u64, chat: &str) -> bool {
        session != expected
            || (!chat.is_empty() && !self.state.chat_id.is_empty() && chat != self.state.chat_id)
    }

    /// Whether a probe answer at member `id`'s address came from another
    /// process than that member (or the member is unknown).
    pub(super) fn not_member_answering(&self, id: u64, session: u64, chat: &str) -> bool {
        self.member(id)
            .is_none_or(|m| self.another_process(m.session, session, chat))
    }

    /// Probes the address of member `id` to learn whether the process we
    /// know still answers there (a busy answer does not say who gave it).
    pub(super) fn check_identity(&mut self, id: u64) {
        const MAX_CHECKS: usize = 16;
        if self.dead.contains(&id)
            || self.identity_checks.len() >= MAX_CHECKS
            || self.identity_checks.values().any(|(i, _)| *i == id)
        {
            return;
        }
        let Some((addr, session)) = self
            .member(id)
            .and_then(|m| m.addr.clone().map(|a| (a, m.session)))
        else {
            return;
        };
        let conn = self.dial(&addr, &Frame::Probe {});
        self.identity_checks.insert(conn, (id, session));
    }

    /// The announced coordinator answered our probe: follow it if it is
    /// what was announced (the same process, coordinating that epoch).
    fn announce_checked(&mut self, epoch: u64, coordinator: MemberInfo, reply: Frame) {
        let confirmed = matches!(
            reply,
            Frame::ProbeReply { session, role: Role::Coordinator, epoch: e, .. }
                if session == coordinator.session && e == epoch
        );
        if !confirmed {
            tracing::info!(epoch, name = %coordinator.name, "an announcement was not confirmed; ignoring it");
            return;
        }
        if epoch <= self.epoch.max(self.bound_epoch.saturating_sub(1)) {
            return;
        }
        let Some(addr) = coordinator.addr.clone() else {
            return;
        };
        self.note_epoch(epoch);
        let why = format!(
            "{} announced itself coordinator of epoch {epoch}",
            coordinator.name
        );
        match &self.role {
            State::Coordinator(_) => self.step_down(Some((coordinator.id, addr)), &why),
            State::Candidate(_) => self.withdraw(Some((coordinator.id, addr)), &why),
            State::Member(_) | State::Electing(_) => self.follow(coordinator.id, addr, &why),
            _ => {}
        }
    }
}

/// Bytes a `status` answer may take (the frame limit less room for the
/// encoding around its parts).
const STATUS_BUDGET: usize = limits::MAX_FRAME_LEN - 1024;

/// Announcements checked at once (a flood of them costs nothing more).
const MAX_ANNOUNCE_CHECKS: usize = 4;

/// A `hello` that passed the basic checks.
struct Hello {
    conn: ConnId,
    name: String,
    /// The session's public id.
    session: u64,
    addr: Option<String>,
    resume: Option<Resume>,
    sign_key: Option<String>,
}

/// A change to the chat's plugin set asked by an observer.
enum PluginChange {
    Attach(PluginRef),
    Detach(String),
}

/// A plugin reference the node refuses before looking for a library.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginRefError {
    #[error("plugin name {0:?} must be 1-64 characters of a-z 0-9 _ -")]
    Name(String),
    #[error(
        "plugin {name} configuration is {len} bytes; the limit is {}",
        limits::MAX_PLUGIN_CONFIG
    )]
    ConfigTooLarge { name: String, len: usize },
    #[error("plugin {name} configuration must be a JSON object ({{...}}), not {found}")]
    ConfigNotObject { name: String, found: &'static str },
    #[error("plugin {name} configuration is not valid JSON: {why}")]
    ConfigNotJson { name: String, why: String },
}

/// A plugin configuration: a JSON object of at most
/// [`limits::MAX_PLUGIN_CONFIG`] bytes (`null`, arrays and the like are
/// refused; each plugin checks its own fields).
///
/// # Errors
/// Too large, not JSON, or JSON but not an object.
pub fn check_plugin_config(name: &str, config: &str) -> Result<(), PluginRefError> {
    if config.len() > limits::MAX_PLUGIN_CONFIG {
        return Err(PluginRefError::ConfigTooLarge {
            name: name.to_string(),
            len: config.len(),
        });
    }
    let found = match serde_json::from_str::<serde_json::Value>(config) {
        Ok(serde_json::Value::Object(_)) => return Ok(()),
        Ok(serde_json::Value::Null) => "null",
        Ok(serde_json::Value::Bool(_)) => "a boolean",
        Ok(serde_json::Value::Number(_)) => "a number",
        Ok(serde_json::Value::String(_)) => "a string",
        Ok(serde_json::Value::Array(_)) => "an array",
        Err(e) => {
            return Err(PluginRefError::ConfigNotJson {
                name: name.to_string(),
                why: e.to_string(),
            })
        }
    };
    Err(PluginRefError::ConfigNotObject {
        name: name.to_string(),
        found,
    })
}

/// Plugin names travel the network and become file names: `[a-z0-9_-]`.
///
/// # Errors
/// Empty, longer than 64 bytes, or another character.
pub fn check_plugin_name(name: &str) -> Result<(), PluginRefError> {
    if !limits::valid_plugin_name(name) {
        return Err(PluginRefError::Name(name.to_string()));
    }
    Ok(())
}
