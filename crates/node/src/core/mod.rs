//! The membership, election and sequencing logic as a state machine without
//! I/O. Inputs are frames, connection events, user lines and the time; the
//! outputs are frames to send, connections to open or close, and events for
//! the user. The driver (`server.rs`) does the I/O; the tests in `tests.rs`
//! run whole clusters in memory.

mod coordinator;
pub mod hooks;
mod log;
mod member;
#[cfg(test)]
mod tests;

use bytes::Bytes;
use p2p_proto::{
    encode, limits, Chat, ErrorCode, Frame, MemberInfo, PluginRef, Resume, Role, PROTOCOL_VERSION,
};

use self::coordinator::Coord;
use self::hooks::{HookReport, Hooks, NoHooks};
pub use self::log::hash;
use self::log::Log;

/// Identifies one connection for the life of the process.
pub type ConnId = u64;
/// Milliseconds on a monotonic clock chosen by the driver.
pub type Millis = u64;

/// First id the core uses for connections it dials; the driver numbers the
/// connections it accepts from 1, so the two ranges never meet.
pub const FIRST_DIAL_ID: ConnId = 1 << 48;

/// What the core needs to know about this node.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub name: String,
    /// Our own listening address, as peers should dial it.
    pub addr: String,
    /// Peers to join through, in order; empty starts a new chat.
    pub join: Vec<String>,
    /// Start a new chat if no peer in `join` answers.
    pub create_if_alone: bool,
    pub heartbeat_ms: u64,
    /// Messages replayed to a newcomer.
    pub replay: usize,
    /// Messages held for catching up resuming members (at least `replay`).
    pub keep: usize,
    pub max_members: usize,
    /// Emit an event per delivered message (off when nobody prints them,
    /// e.g. `--events none`: saves a copy per message).
    pub message_events: bool,
    /// The plugin set a chat started by this node begins with (a joiner
    /// takes the chat's set instead).
    pub plugins: Vec<PluginRef>,
}

impl CoreConfig {
    /// A config with the defaults used by `p2pnode`.
    pub fn new(name: impl Into<String>, addr: impl Into<String>) -> CoreConfig {
        CoreConfig {
            name: name.into(),
            addr: addr.into(),
            join: Vec::new(),
            create_if_alone: false,
            heartbeat_ms: 100,
            replay: 100,
            keep: 10_000,
            max_members: limits::MAX_MEMBERS,
            message_events: true,
            plugins: Vec::new(),
        }
    }
}

/// Something that happened outside the core.
#[derive(Debug)]
pub enum Input {
    /// A frame arrived on a connection.
    Frame(ConnId, Frame),
    /// A connection closed, failed to open, or was dropped by the driver
    /// (with the reason, e.g. a slow consumer).
    Closed(ConnId, Option<String>),
    /// Time passed (the `now` given to [`Core::handle`] is what counts).
    Tick,
    /// A line typed by this node's user (or posted by an observer).
    User(String),
    /// Leave the chat and stop.
    Quit,
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Queue an encoded frame on one connection.
    Send(ConnId, Bytes),
    /// Queue an encoded frame on every connection in the broadcast group.
    Broadcast(Bytes),
    /// Add a connection to the broadcast group.
    Attach(ConnId),
    /// Close a connection once what is queued on it is written (this also
    /// takes it out of the broadcast group).
    Close(ConnId),
    /// Open a connection to `addr` and send `hello` first; report frames and
    /// the close as inputs for `conn`.
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
    },
    Left {
        id: u64,
        name: String,
        reason: String,
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
    /// A plugin dropped or rewrote someone's message.
    Verdict {
        plugin: String,
        rule: String,
        action: &'static str,
        member: String,
    },
    /// A plugin was loaded, refused, quarantined or detached here.
    Plugin {
        name: String,
        state: &'static str,
        detail: String,
    },
}

/// Where this node stands.
enum State {
    Joining(member::Joining),
    Member(member::Uplink),
    Electing(member::Electing),
    Coordinator(Coord),
    Stopped,
}

/// The node's whole logical state.
pub struct Core {
    cfg: CoreConfig,
    /// Our member id and address; id 0 until first admitted.
    me: MemberInfo,
    /// Every id we have had (a re-admitted node gets a new one), so our own
    /// messages are recognised in replays.
    my_ids: Vec<u64>,
    epoch: u64,
    /// Members in join order, ourselves included. Everyone derives the
    /// next coordinator from this list.
    members: Vec<MemberInfo>,
    /// Member id of the coordinator.
    coordinator: u64,
    log: Log,
    /// Our messages not yet seen delivered: re-sent after a failover.
    pending: Vec<(u64, String)>,
    next_client_seq: u64,
    next_dial: ConnId,
    now: Millis,
    state: State,
    out: Vec<Output>,
    /// The chat's plugin set (replicated; only the coordinator calls it).
    plugins: Vec<PluginRef>,
    hooks: Box<dyn Hooks>,
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
                addr: cfg.addr.clone(),
            },
            my_ids: Vec::new(),
            epoch: 0,
            members: Vec::new(),
            coordinator: 0,
            log: Log::new(keep),
            pending: Vec::new(),
            next_client_seq: 1,
            next_dial: FIRST_DIAL_ID,
            now,
            state: State::Stopped,
            out: Vec::new(),
            plugins: Vec::new(),
            hooks,
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
            Input::Closed(conn, reason) => self.on_closed(conn, reason),
            Input::Tick => self.on_tick(),
            Input::User(line) => self.on_user(line),
            Input::Quit => self.quit(),
        }
    }

    /// Takes the outputs produced so far.
    pub fn drain(&mut self) -> std::vec::Drain<'_, Output> {
        self.out.drain(..)
    }

    pub fn role(&self) -> Role {
        match self.state {
            State::Joining(_) | State::Stopped => Role::Joining,
            State::Member(_) => Role::Member,
            State::Electing(_) => Role::Electing,
            State::Coordinator(_) => Role::Coordinator,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn last_seq(&self) -> u64 {
        self.log.last_seq()
    }

    pub fn members(&self) -> &[MemberInfo] {
        &self.members
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

    fn dial(&mut self, addr: &str, hello: &Frame) -> ConnId {
        let conn = self.next_dial;
        self.next_dial += 1;
        self.out.push(Output::Dial {
            conn,
            addr: addr.to_string(),
            hello: encode(hello),
        });
        conn
    }

    fn hello(&self, resume: Option<Resume>) -> Frame {
        Frame::Hello {
            version: PROTOCOL_VERSION,
            name: self.me.name.clone(),
            addr: self.me.addr.clone(),
            resume,
        }
    }

    fn member(&self, id: u64) -> Option<&MemberInfo> {
        self.members.iter().find(|m| m.id == id)
    }

    /// The coordinator's address, as the member list has it.
    fn coordinator_addr(&self) -> String {
        self.member(self.coordinator)
            .map(|m| m.addr.clone())
            .unwrap_or_default()
    }

    /// Sends a client to the coordinator and closes its connection.
    fn redirect_to_coordinator(&mut self, conn: ConnId) {
        let frame = Frame::Redirect {
            addr: self.coordinator_addr(),
            epoch: self.epoch,
        };
        self.send(conn, &frame);
        self.out.push(Output::Close(conn));
    }

    fn coordinator_name(&self) -> String {
        self.member(self.coordinator)
            .map(|m| m.name.clone())
            .unwrap_or_else(|| format!("#{}", self.coordinator))
    }

    fn heartbeat_dead_after(&self) -> Millis {
        self.cfg.heartbeat_ms * 3
    }

    /// Records a delivered message and tells the user; acknowledges our own.
    fn deliver(&mut self, chat: Chat, replay: bool) {
        if self.my_ids.contains(&chat.from_id) && chat.client_seq > 0 {
            self.pending.retain(|(cs, _)| *cs != chat.client_seq);
        }
        let event = self.cfg.message_events.then(|| chat.clone());
        let seq = chat.seq;
        match self.log.append(chat) {
            log::Append::Duplicate => return,
            log::Append::AddedAfterGap { missing } => {
                tracing::warn!(seq, missing, "gap in the delivered sequence");
            }
            log::Append::Added => {}
        }
        if let Some(chat) = event {
            self.emit(Event::Message { chat, replay });
        }
    }

    // ---- inputs common to every role ----

    fn on_frame(&mut self, conn: ConnId, frame: Frame) {
        if let State::Coordinator(c) = &self.state {
            if c.is_member_conn(conn) || c.is_pending_conn(conn) {
                return self.coord_from_member(conn, frame);
            }
        }
        if self.is_uplink(conn) {
            return self.on_uplink_frame(conn, frame);
        }
        match frame {
            Frame::Hello {
                version,
                name,
                addr,
                resume,
            } => {
                if version != PROTOCOL_VERSION {
                    return self.refuse(
                        conn,
                        ErrorCode::VersionMismatch,
                        format!("protocol version {version} is not supported; this node speaks version {PROTOCOL_VERSION}"),
                    );
                }
                if let Err(e) = limits::check_name(&name) {
                    return self.refuse(conn, ErrorCode::BadName, e);
                }
                self.on_hello(conn, name, addr, resume);
            }
            Frame::StatusRequest { log } => {
                let status = self.status(log);
                self.send(conn, &status);
            }
            Frame::Post { text } => {
                // Answer once queued, so a poster's messages keep their order.
                self.on_user_text(text);
                let status = self.status(false);
                self.send(conn, &status);
            }
            Frame::Attach { name, config } => {
                self.on_plugin_change(conn, PluginChange::Attach(PluginRef { name, config }))
            }
            Frame::Detach { name } => self.on_plugin_change(conn, PluginChange::Detach(name)),
            Frame::Announce {
                epoch,
                coordinator,
                members,
            } => {
                self.out.push(Output::Close(conn));
                self.on_announce(epoch, coordinator, members);
            }
            other => self.refuse(
                conn,
                ErrorCode::UnexpectedFrame,
                format!(
                    "a connection must open with hello or status_request, not {}",
                    frame_type(&other)
                ),
            ),
        }
    }

    fn on_hello(&mut self, conn: ConnId, name: String, addr: String, resume: Option<Resume>) {
        match &self.state {
            State::Coordinator(_) => self.coord_admit(conn, name, addr, resume),
            State::Member(_) => match resume {
                Some(r) if r.epoch >= self.epoch => self.takeover_request(conn, name, addr, r),
                _ => self.redirect_to_coordinator(conn),
            },
            State::Electing(_) => match resume {
                Some(r) if r.epoch >= self.epoch => self.takeover_request(conn, name, addr, r),
                _ => self.refuse(
                    conn,
                    ErrorCode::Electing,
                    "an election is under way; retry in a moment",
                ),
            },
            State::Joining(_) | State::Stopped => self.refuse(
                conn,
                ErrorCode::Electing,
                "this node has not joined a chat yet; retry in a moment",
            ),
        }
    }

    fn on_closed(&mut self, conn: ConnId, reason: Option<String>) {
        if let State::Coordinator(_) = self.state {
            return self.coord_closed(conn, reason);
        }
        if self.is_uplink(conn) {
            self.uplink_closed(conn, reason);
        }
    }

    fn on_tick(&mut self) {
        match self.state {
            State::Coordinator(_) => self.coord_tick(),
            State::Member(_) | State::Electing(_) | State::Joining(_) => self.member_tick(),
            State::Stopped => {}
        }
    }

    fn on_user(&mut self, line: String) {
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        match line.trim() {
            "" => {}
            "/who" => self.emit(Event::Who {
                members: self.members.clone(),
                coordinator: self.coordinator,
            }),
            "/quit" => self.quit(),
            cmd if cmd.starts_with('/') => self.emit(Event::Error {
                code: None,
                message: format!("unknown command {cmd}; commands are /who and /quit"),
            }),
            _ => self.on_user_text(line),
        }
    }

    /// Queues our own chat message and sends it where it can go now.
    fn on_user_text(&mut self, text: String) {
        if let Err(e) = limits::check_text(&text) {
            return self.emit(Event::Error {
                code: None,
                message: format!("not sent: {e}"),
            });
        }
        let client_seq = self.next_client_seq;
        self.next_client_seq += 1;
        self.pending.push((client_seq, text.clone()));
        match &self.state {
            State::Coordinator(c) if !c.in_window() => self.coord_sequence_own(client_seq, text),
            State::Member(u) => {
                let conn = u.conn;
                self.send(conn, &Frame::Say { text, client_seq });
            }
            // Joining, electing, or collecting resumes: sent once settled.
            _ => {}
        }
    }

    fn quit(&mut self) {
        match std::mem::replace(&mut self.state, State::Stopped) {
            State::Member(u) => {
                self.send(u.conn, &Frame::Leave {});
                self.out.push(Output::Close(u.conn));
            }
            State::Coordinator(c) => {
                let frame = encode(&Frame::Left {
                    id: self.me.id,
                    name: self.me.name.clone(),
                    reason: "left".into(),
                });
                self.out.push(Output::Broadcast(frame));
                for conn in c.conns() {
                    self.out.push(Output::Close(conn));
                }
            }
            State::Electing(e) => {
                if let Some(conn) = e.conn() {
                    self.out.push(Output::Close(conn));
                }
            }
            State::Joining(j) => {
                if let Some(conn) = j.conn {
                    self.out.push(Output::Close(conn));
                }
            }
            State::Stopped => {}
        }
        self.out.push(Output::Exit(0));
    }

    fn status(&self, with_log: bool) -> Frame {
        Frame::Status {
            name: self.me.name.clone(),
            id: self.me.id,
            role: self.role(),
            epoch: self.epoch,
            coordinator: (self.coordinator != 0).then(|| self.coordinator_name()),
            members: self.members.clone(),
            last_seq: self.log.last_seq(),
            gaps: self.log.gaps(),
            log: with_log.then(|| self.log.digest()),
            plugins: self.hooks.status(),
        }
    }

    /// A coordinator told us about its reign (fencing).
    fn on_announce(&mut self, epoch: u64, coordinator: MemberInfo, members: u32) {
        if coordinator.id == self.me.id && coordinator.addr == self.me.addr {
            return;
        }
        match &self.state {
            State::Coordinator(c) => {
                let mine = c.member_count() as u32;
                let they_win = epoch > self.epoch
                    || (epoch == self.epoch
                        && (members, std::cmp::Reverse(coordinator.id))
                            > (mine, std::cmp::Reverse(self.me.id)));
                if they_win {
                    self.step_down(epoch, coordinator);
                } else if epoch == self.epoch {
                    let frame = encode(&self.announcement());
                    self.out.push(Output::Notify {
                        addr: coordinator.addr,
                        frame,
                    });
                }
            }
            State::Member(_) | State::Electing(_) if epoch > self.epoch => {
                self.follow(epoch, coordinator.addr, "a newer coordinator announced itself");
            }
            _ => {}
        }
    }

    fn announcement(&self) -> Frame {
        let members = match &self.state {
            State::Coordinator(c) => c.member_count() as u32,
            _ => 0,
        };
        Frame::Announce {
            epoch: self.epoch,
            coordinator: self.me.clone(),
            members,
        }
    }
}

/// A change to the chat's plugin set asked by an observer.
enum PluginChange {
    Attach(PluginRef),
    Detach(String),
}

impl Core {
    /// Loads/unloads plugins to match `set` and reports what happened.
    fn apply_plugins(&mut self, set: Vec<PluginRef>) -> Vec<HookReport> {
        self.plugins = set;
        let reports = self.hooks.set_plugins(&self.plugins);
        for r in &reports {
            self.emit(Event::Plugin {
                name: r.plugin.clone(),
                state: r.state,
                detail: r.detail.clone(),
            });
        }
        reports
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

    fn on_plugin_change(&mut self, conn: ConnId, change: PluginChange) {
        if !matches!(self.state, State::Coordinator(_)) {
            return self.redirect_to_coordinator(conn);
        }
        let mut set = self.plugins.clone();
        match &change {
            PluginChange::Attach(p) => {
                if let Err(e) = check_plugin_name(&p.name) {
                    return self.refuse(conn, ErrorCode::PluginRefused, e);
                }
                match set.iter_mut().find(|x| x.name == p.name) {
                    Some(x) => x.config = p.config.clone(),
                    None => set.push(p.clone()),
                }
            }
            PluginChange::Detach(name) => {
                if !set.iter().any(|x| &x.name == name) {
                    return self.refuse(
                        conn,
                        ErrorCode::PluginRefused,
                        format!("no plugin named {name:?} is attached"),
                    );
                }
                set.retain(|x| &x.name != name);
            }
        }
        let previous = self.plugins.clone();
        let reports = self.apply_plugins(set);
        if let PluginChange::Attach(p) = &change {
            if let Some(r) = reports
                .iter()
                .find(|r| r.plugin == p.name && r.state == "refused")
            {
                let detail = r.detail.clone();
                self.apply_plugins(previous);
                return self.refuse(conn, ErrorCode::PluginRefused, detail);
            }
        }
        let frame = encode(&Frame::Plugins {
            set: self.plugins.clone(),
        });
        self.out.push(Output::Broadcast(frame));
        let status = self.status(false);
        self.send(conn, &status);
    }
}

/// Plugin names travel the network and become file names: `[a-z0-9_-]`.
pub fn check_plugin_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    {
        return Err(format!(
            "plugin name {name:?} must be 1-64 characters of a-z 0-9 _ -"
        ));
    }
    Ok(())
}

/// The wire name of a frame, for error messages.
fn frame_type(frame: &Frame) -> String {
    let bytes = encode(frame);
    serde_json::from_slice::<serde_json::Value>(&bytes[4..])
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_else(|| "frame".into())
}
