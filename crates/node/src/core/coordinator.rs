//! The coordinator side: admitting members, sequencing and broadcasting
//! every message, heartbeats, and the short window after a takeover in
//! which resuming members are collected and the furthest-ahead history is
//! pulled in before any new message is sequenced.

use std::collections::{BTreeSet, HashMap};

use p2p_proto::{encode, limits, Chat, ErrorCode, Frame, MemberInfo, Resume, Role};

use super::hooks::{Decision, HookMessage};
use super::{ConnId, Core, Event, Millis, Output, State};

/// Bot posts may trigger bot posts this many levels deep, no more.
const MAX_BOT_DEPTH: u32 = 3;

pub(super) struct Coord {
    links: HashMap<ConnId, Link>,
    by_member: HashMap<u64, ConnId>,
    /// Next member id to hand out; never reused.
    next_id: u64,
    next_ping: Millis,
    nonce: u64,
    /// Set after a takeover until the survivors have resumed.
    window: Option<Window>,
}

/// One admitted member's connection.
struct Link {
    id: u64,
    name: String,
    last_heard: Millis,
}

/// The resume window that follows a takeover.
struct Window {
    deadline: Millis,
    /// Survivors we still wait for.
    expected: BTreeSet<u64>,
    resumed: Vec<Resumed>,
    /// The member we are pulling missing history from, and up to which seq.
    sync: Option<(ConnId, u64)>,
    /// Fresh joins that arrived during the window.
    held: Vec<(ConnId, String, String)>,
}

struct Resumed {
    conn: ConnId,
    name: String,
    addr: String,
    resume: Resume,
}

impl Coord {
    pub(super) fn new(next_id: u64, now: Millis) -> Coord {
        Coord {
            links: HashMap::new(),
            by_member: HashMap::new(),
            next_id,
            next_ping: now,
            nonce: 0,
            window: None,
        }
    }

    pub(super) fn is_member_conn(&self, conn: ConnId) -> bool {
        self.links.contains_key(&conn)
    }

    pub(super) fn is_pending_conn(&self, conn: ConnId) -> bool {
        self.window
            .as_ref()
            .is_some_and(|w| w.resumed.iter().any(|r| r.conn == conn))
    }

    pub(super) fn in_window(&self) -> bool {
        self.window.is_some()
    }

    /// Every connection we serve (members and resumers).
    pub(super) fn conns(&self) -> Vec<ConnId> {
        let mut all: Vec<ConnId> = self.links.keys().copied().collect();
        if let Some(w) = &self.window {
            all.extend(w.resumed.iter().map(|r| r.conn));
            all.extend(w.held.iter().map(|h| h.0));
        }
        all
    }

    /// Members served, ourselves included.
    pub(super) fn member_count(&self) -> usize {
        self.links.len() + 1
    }
}

impl Core {
    fn coord(&mut self) -> Option<&mut Coord> {
        match &mut self.state {
            State::Coordinator(c) => Some(c),
            _ => None,
        }
    }

    /// Takes over as coordinator of `epoch`, dropping the `dead` members.
    pub(super) fn become_coordinator(&mut self, epoch: u64, dead: BTreeSet<u64>, since: Option<Millis>) {
        let me = self.me.id;
        let lost: Vec<MemberInfo> = self
            .members
            .iter()
            .filter(|m| m.id != me && dead.contains(&m.id))
            .cloned()
            .collect();
        self.members.retain(|m| m.id == me || !dead.contains(&m.id));
        for m in &lost {
            self.emit(Event::Left {
                id: m.id,
                name: m.name.clone(),
                reason: "disconnected".into(),
            });
        }
        self.epoch = epoch;
        self.coordinator = me;
        let max_id = self
            .members
            .iter()
            .map(|m| m.id)
            .chain(dead.iter().copied())
            .max()
            .unwrap_or(0);
        let next_id = max_id.max(self.log.max_sender()).max(me) + 1;
        let mut coord = Coord::new(next_id, self.now);
        let expected: BTreeSet<u64> = self.members.iter().map(|m| m.id).filter(|id| *id != me).collect();
        if !expected.is_empty() {
            coord.window = Some(Window {
                deadline: self.now + self.heartbeat_dead_after(),
                expected,
                resumed: Vec::new(),
                sync: None,
                held: Vec::new(),
            });
        }
        let open = coord.window.is_none();
        self.state = State::Coordinator(coord);
        self.emit(Event::Role {
            role: Role::Coordinator,
            epoch,
            coordinator: self.me.name.clone(),
            election_ms: since.map(|s| self.now.saturating_sub(s)),
        });
        // Fence: tell the lost coordinator (it may only be hung) who rules now.
        let frame = encode(&self.announcement());
        for m in lost {
            self.out.push(Output::Notify {
                addr: m.addr,
                frame: frame.clone(),
            });
        }
        if open {
            self.replay_to_plugins();
            self.flush_pending();
        }
    }

    /// A `hello` reached us as coordinator.
    pub(super) fn coord_admit(&mut self, conn: ConnId, name: String, addr: String, resume: Option<Resume>) {
        let last_seq = self.log.last_seq();
        let Some(c) = self.coord() else { return };
        if let Some(w) = &mut c.window {
            match resume {
                Some(r) => {
                    w.expected.remove(&r.member_id);
                    for d in &r.dead {
                        w.expected.remove(d);
                    }
                    c.next_id = c.next_id.max(r.member_id + 1);
                    // Keeps the resumer's handshake alive while we wait.
                    let ping = Frame::Ping { nonce: c.nonce };
                    let ahead = r.last_seq > last_seq && w.sync.is_none_or(|(_, to)| r.last_seq > to);
                    if ahead {
                        w.sync = Some((conn, r.last_seq));
                    }
                    let to = r.last_seq;
                    w.resumed.push(Resumed {
                        conn,
                        name,
                        addr,
                        resume: r,
                    });
                    self.send(conn, &ping);
                    if ahead {
                        self.send(
                            conn,
                            &Frame::SyncRequest {
                                from: last_seq + 1,
                                to,
                            },
                        );
                    }
                    self.maybe_close_window();
                }
                None => w.held.push((conn, name, addr)),
            }
            return;
        }
        // An existing member coming back (same id and name): keep its place.
        if let Some(r) = &resume {
            let known = self.members.iter().any(|m| m.id == r.member_id && m.name == name);
            if known {
                let id = r.member_id;
                let c = self.coord().expect("checked above");
                if let Some(old) = c.by_member.remove(&id) {
                    c.links.remove(&old);
                    self.out.push(Output::Close(old));
                }
                let after = self
                    .log
                    .consistent_with(r.last_epoch, r.last_seq)
                    .then_some(r.last_seq);
                self.welcome(conn, id, after);
                return self.attach(conn, id, name);
            }
        }
        if self.members.iter().any(|m| m.name == name) {
            return self.refuse(
                conn,
                ErrorCode::NameTaken,
                format!("the name {name} is already taken in this chat; choose another name"),
            );
        }
        if self.members.len() >= self.cfg.max_members {
            return self.refuse(
                conn,
                ErrorCode::TooManyMembers,
                format!("the chat is full ({} members)", self.cfg.max_members),
            );
        }
        let c = self.coord().expect("checked above");
        let id = c.next_id;
        c.next_id += 1;
        let info = MemberInfo {
            id,
            name: name.clone(),
            addr,
        };
        self.out
            .push(Output::Broadcast(encode(&Frame::Joined { member: info.clone() })));
        self.members.push(info);
        self.emit(Event::Joined {
            id,
            name: name.clone(),
        });
        let after = resume
            .as_ref()
            .filter(|r| self.log.consistent_with(r.last_epoch, r.last_seq))
            .map(|r| r.last_seq);
        self.welcome(conn, id, after);
        self.attach(conn, id, name.clone());
        if self.hooks.active() {
            let posts = self.hooks.on_join(id, &name);
            self.bot_posts(posts, 0);
        }
    }

    /// Sends `welcome` and the replay: everything after `after`, or the
    /// recent history for a newcomer.
    fn welcome(&mut self, conn: ConnId, id: u64, after: Option<u64>) {
        let frames = match after {
            Some(seq) => self.log.frames_after(seq, self.cfg.keep),
            None => self.log.frames_after(0, self.cfg.replay),
        };
        let welcome = Frame::Welcome {
            member_id: id,
            epoch: self.epoch,
            coordinator: self.me.id,
            members: self.members.clone(),
            replay: frames.len() as u32,
            heartbeat_ms: self.cfg.heartbeat_ms,
            plugins: self.plugins.clone(),
        };
        self.send(conn, &welcome);
        self.out.extend(frames.into_iter().map(|f| Output::Send(conn, f)));
    }

    fn attach(&mut self, conn: ConnId, id: u64, name: String) {
        let now = self.now;
        let Some(c) = self.coord() else { return };
        c.links.insert(
            conn,
            Link {
                id,
                name,
                last_heard: now,
            },
        );
        c.by_member.insert(id, conn);
        self.out.push(Output::Attach(conn));
    }

    /// A frame from an admitted member (or a resumer during the window).
    pub(super) fn coord_from_member(&mut self, conn: ConnId, frame: Frame) {
        let now = self.now;
        let Some(c) = self.coord() else { return };
        let Some(link) = c.links.get_mut(&conn) else {
            // A resumer in the window: only sync replies and pongs matter.
            if let Frame::Sync { entries } = frame {
                self.on_sync(conn, entries);
            }
            return;
        };
        link.last_heard = now;
        let (id, name) = (link.id, link.name.clone());
        match frame {
            Frame::Say { text, client_seq } => {
                if let Err(reason) = limits::check_text(&text) {
                    self.send(conn, &Frame::Rejected { client_seq, reason });
                } else if client_seq > self.log.client_seq(id) {
                    self.submit(id, name, client_seq, text, None, Some(conn), 0);
                }
                // else: a re-send of a message already sequenced; its copy
                // reached (or will reach) the sender through the replay.
            }
            Frame::Pong { .. } | Frame::Sync { .. } => {}
            Frame::Leave {} => self.remove_member(conn, "left".into()),
            other => {
                let kind = super::frame_type(&other);
                self.send(
                    conn,
                    &Frame::error(
                        ErrorCode::UnexpectedFrame,
                        format!("{kind} is not allowed from a member"),
                    ),
                );
                self.remove_member(conn, format!("disconnected (sent an unexpected {kind} frame)"));
            }
        }
    }

    /// Orders one message: assigns (epoch, seq), encodes it once, hands the
    /// same bytes to every member, and delivers it here.
    pub(super) fn sequence(
        &mut self,
        from_id: u64,
        from: String,
        client_seq: u64,
        text: String,
        bot: Option<String>,
    ) {
        let chat = Chat {
            epoch: self.epoch,
            seq: self.log.last_seq() + 1,
            from,
            from_id,
            client_seq,
            text,
            bot,
        };
        let frame = p2p_proto::encode_chat(&chat);
        self.out.push(Output::Broadcast(frame.clone()));
        if self.my_ids.contains(&from_id) && client_seq > 0 {
            self.pending.retain(|(cs, _)| *cs != client_seq);
        }
        if self.cfg.message_events {
            self.emit(Event::Message {
                chat: chat.clone(),
                replay: false,
            });
        }
        self.log.append_encoded(chat, frame);
    }

    pub(super) fn coord_sequence_own(&mut self, client_seq: u64, text: String) {
        let (id, name) = (self.me.id, self.me.name.clone());
        self.submit(id, name, client_seq, text, None, None, 0);
    }

    /// Runs the plugin chain on a message, then sequences it (or tells the
    /// sender it was dropped), then lets plugins see it delivered and
    /// sequences their posts. `conn` is the sender's connection (None for
    /// our own user and for bots).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn submit(
        &mut self,
        from_id: u64,
        from: String,
        client_seq: u64,
        text: String,
        bot: Option<String>,
        conn: Option<ConnId>,
        depth: u32,
    ) {
        if !self.hooks.active() {
            return self.sequence(from_id, from, client_seq, text, bot);
        }
        let msg = HookMessage {
            epoch: self.epoch,
            seq: self.log.last_seq() + 1,
            from_id,
            from: &from,
            text: &text,
            bot: bot.as_deref(),
        };
        let outcome = self.hooks.on_message(&msg);
        for v in outcome.verdicts {
            self.emit(Event::Verdict {
                plugin: v.plugin,
                rule: v.rule,
                action: v.action,
                member: from.clone(),
            });
        }
        match outcome.decision {
            Decision::Drop { reason } => {
                if self.my_ids.contains(&from_id) && client_seq > 0 {
                    self.pending.retain(|(cs, _)| *cs != client_seq);
                    self.emit(Event::Rejected { client_seq, reason });
                } else if let Some(conn) = conn {
                    self.send(conn, &p2p_proto::Frame::Rejected { client_seq, reason });
                }
            }
            Decision::Deliver(rewritten) => {
                let text = rewritten.unwrap_or(text);
                let seq = self.log.last_seq() + 1;
                self.sequence(from_id, from.clone(), client_seq, text.clone(), bot.clone());
                let msg = HookMessage {
                    epoch: self.epoch,
                    seq,
                    from_id,
                    from: &from,
                    text: &text,
                    bot: bot.as_deref(),
                };
                let posts = self.hooks.on_delivered(&msg, false);
                self.bot_posts(posts, depth);
            }
        }
        self.bot_posts(outcome.posts, depth);
        self.plugin_reports();
    }

    /// Sequences messages posted by bots (through the chain, minus the poster).
    pub(super) fn bot_posts(&mut self, posts: Vec<(String, String)>, depth: u32) {
        for (plugin, text) in posts {
            if depth >= MAX_BOT_DEPTH {
                tracing::warn!(%plugin, "bot post dropped: bots answering bots too deep");
                continue;
            }
            if let Err(e) = limits::check_text(&text) {
                tracing::warn!(%plugin, error = %e, "bot post dropped");
                continue;
            }
            self.submit(0, plugin.clone(), 0, text, Some(plugin), None, depth + 1);
        }
    }

    /// Shows the held history to the plugins after a takeover, so stateful
    /// ones (the logger) can continue where the old coordinator stopped.
    fn replay_to_plugins(&mut self) {
        if !self.hooks.active() {
            return;
        }
        let chats: Vec<Chat> = self.log.range(0, u64::MAX).cloned().collect();
        for c in &chats {
            let msg = HookMessage {
                epoch: c.epoch,
                seq: c.seq,
                from_id: c.from_id,
                from: &c.from,
                text: &c.text,
                bot: c.bot.as_deref(),
            };
            let _ = self.hooks.on_delivered(&msg, true);
        }
        self.plugin_reports();
    }

    /// Sequences our own messages that are still unacknowledged.
    fn flush_pending(&mut self) {
        let done = self.log.client_seq(self.me.id);
        let pending: Vec<_> = self
            .pending
            .iter()
            .filter(|(cs, _)| *cs > done)
            .cloned()
            .collect();
        self.pending.retain(|(cs, _)| *cs > done);
        for (cs, text) in pending {
            self.coord_sequence_own(cs, text);
        }
    }

    fn remove_member(&mut self, conn: ConnId, reason: String) {
        let Some(c) = self.coord() else { return };
        let Some(link) = c.links.remove(&conn) else { return };
        c.by_member.remove(&link.id);
        self.members.retain(|m| m.id != link.id);
        self.out.push(Output::Close(conn));
        self.out.push(Output::Broadcast(encode(&Frame::Left {
            id: link.id,
            name: link.name.clone(),
            reason: reason.clone(),
        })));
        if self.hooks.active() {
            let posts = self.hooks.on_leave(link.id, &link.name, &reason);
            self.bot_posts(posts, 0);
        }
        self.emit(Event::Left {
            id: link.id,
            name: link.name,
            reason,
        });
    }

    pub(super) fn coord_closed(&mut self, conn: ConnId, reason: Option<String>) {
        let Some(c) = self.coord() else { return };
        if c.links.contains_key(&conn) {
            return self.remove_member(conn, reason.unwrap_or_else(|| "disconnected".into()));
        }
        if let Some(w) = &mut c.window {
            w.resumed.retain(|r| r.conn != conn);
            w.held.retain(|h| h.0 != conn);
            if w.sync.is_some_and(|(sc, _)| sc == conn) {
                w.sync = None;
            }
            self.maybe_close_window();
        }
    }

    pub(super) fn coord_tick(&mut self) {
        let now = self.now;
        let hb = self.cfg.heartbeat_ms;
        let dead_after = self.heartbeat_dead_after();
        let Some(c) = self.coord() else { return };
        if now >= c.next_ping {
            c.next_ping = now + hb;
            c.nonce += 1;
            let ping = encode(&Frame::Ping { nonce: c.nonce });
            let resumers: Vec<ConnId> = c
                .window
                .iter()
                .flat_map(|w| w.resumed.iter().map(|r| r.conn))
                .collect();
            for conn in resumers {
                self.out.push(Output::Send(conn, ping.clone()));
            }
            self.out.push(Output::Broadcast(ping));
        }
        let Some(c) = self.coord() else { return };
        let silent: Vec<ConnId> = c
            .links
            .iter()
            .filter(|(_, l)| now.saturating_sub(l.last_heard) > dead_after)
            .map(|(conn, _)| *conn)
            .collect();
        let window_over = c.window.as_ref().is_some_and(|w| now >= w.deadline);
        for conn in silent {
            self.remove_member(conn, "disconnected (missed 3 heartbeats)".into());
        }
        if window_over {
            self.close_window();
        }
    }

    /// History a resumer sent back because it was further ahead than us.
    fn on_sync(&mut self, conn: ConnId, entries: Vec<p2p_proto::Chat>) {
        let done = entries.is_empty();
        for chat in entries {
            let valid = chat.seq == self.log.last_seq() + 1
                && chat.epoch < self.epoch
                && limits::check_text(&chat.text).is_ok()
                && limits::check_name(&chat.from).is_ok();
            if !valid {
                tracing::warn!(
                    seq = chat.seq,
                    "ignoring a sync entry that does not continue our history"
                );
                continue;
            }
            self.deliver(chat, false);
        }
        let last = self.log.last_seq();
        let Some(c) = self.coord() else { return };
        if let Some(w) = &mut c.window {
            if w.sync.is_some_and(|(sc, to)| sc == conn && (done || last >= to)) {
                w.sync = None;
            }
        }
        self.maybe_close_window();
    }

    fn maybe_close_window(&mut self) {
        let Some(c) = self.coord() else { return };
        if c.window
            .as_ref()
            .is_some_and(|w| w.expected.is_empty() && w.sync.is_none())
        {
            self.close_window();
        }
    }

    /// Ends the resume window: drops survivors that never came back, welcomes
    /// the ones that did with exactly what they miss, then admits held joins
    /// and sequences our own pending messages.
    fn close_window(&mut self) {
        let Some(c) = self.coord() else { return };
        let Some(w) = c.window.take() else { return };
        for id in &w.expected {
            if let Some(m) = self.member(*id).cloned() {
                self.members.retain(|x| x.id != *id);
                self.emit(Event::Left {
                    id: m.id,
                    name: m.name,
                    reason: "lost in failover".into(),
                });
            }
        }
        // Known members first so the snapshot everyone gets is complete.
        let (known, unknown): (Vec<_>, Vec<_>) = w.resumed.into_iter().partition(|r| {
            self.members
                .iter()
                .any(|m| m.id == r.resume.member_id && m.name == r.name)
        });
        for r in known.into_iter().chain(unknown) {
            self.coord_admit(r.conn, r.name, r.addr, Some(r.resume));
        }
        for (conn, name, addr) in w.held {
            self.coord_admit(conn, name, addr, None);
        }
        self.replay_to_plugins();
        self.flush_pending();
    }

    /// Another coordinator outranks us: hand our members to it and resume
    /// there as a member.
    pub(super) fn step_down(&mut self, epoch: u64, coordinator: MemberInfo) {
        let State::Coordinator(c) = std::mem::replace(&mut self.state, State::Stopped) else {
            return;
        };
        let redirect = encode(&Frame::Redirect {
            addr: coordinator.addr.clone(),
            epoch,
        });
        for conn in c.conns() {
            self.out.push(Output::Send(conn, redirect.clone()));
            self.out.push(Output::Close(conn));
        }
        tracing::info!(epoch, coordinator = %coordinator.name, "stepping down");
        self.follow(
            epoch,
            coordinator.addr,
            &format!(
                "{} is coordinator of epoch {epoch}; stepping down",
                coordinator.name
            ),
        );
    }
}
