//! The coordinator side: admitting members, sequencing every entry (sent at
//! once to peers), committing what a quorum of voters acknowledged (then
//! delivering it here and to clients), changing the voter set one change at
//! a time, heartbeats, and stepping down.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use p2p_proto::{encode, limits, Chat, Entry, ErrorCode, Frame, MemberInfo, PluginRef};

use super::candidate::Resumer;
use super::hooks::{Decision, HookMessage};
use super::state::{is_quorum, MAX_VOTERS};
use super::{ConnId, Core, Event, Group, Hello, Millis, Output, PluginChange, State, MAX_BACKLOG_BYTES};

/// Bytes of broadcast between two pings in a burst (see `broadcast`): a
/// member must read at least this much per three heartbeats to be alive.
const PING_EVERY_BYTES: usize = 256 * 1024;

/// Bot posts may trigger bot posts this many levels deep, no more.
const MAX_BOT_DEPTH: u32 = 3;

pub(super) struct Coord {
    links: BTreeMap<ConnId, Link>,
    /// How many of `links` are peers (nodes with an address): with none, a
    /// `chat` entry has nobody to go to before it is committed.
    peer_links: usize,
    by_member: BTreeMap<u64, ConnId>,
    /// Highest seq each voter acknowledged in this epoch.
    acked: BTreeMap<u64, u64>,
    /// Next member id to hand out; never reused.
    next_id: u64,
    next_ping: Millis,
    nonce: u64,
    /// Seq of the last voter-set change known to be in force everywhere it
    /// matters (every live voter of the old and new sets holds it).
    effective_through: u64,
    /// Voters we have no connection to, since when.
    unreachable: BTreeMap<u64, Millis>,
    /// Probes in flight: connection → voter id.
    probes: BTreeMap<ConnId, u64>,
    next_probe: Millis,
    /// Since when a quorum of voters has been out of contact.
    quorum_lost_since: Option<Millis>,
    /// Why members proven gone left (a clean leave says so).
    gone_reason: BTreeMap<u64, String>,
    /// Last commit point and stable change sent to peers.
    commit_sent: (u64, u64),
    /// Welcomes to send at the end of the batch: every newcomer of a batch
    /// (a join storm) shares one encoded state snapshot.
    welcomes: Vec<PendingWelcome>,
    /// The encoded `state` frames for peers (with sender records) and for
    /// clients (without), and the seq they describe.
    state_cache: Option<(u64, Vec<bytes::Bytes>, Vec<bytes::Bytes>)>,
    /// Bytes broadcast to peers and to clients since their last ping.
    since_ping: [usize; 2],
    /// How deep in a chain of bots answering bots each bot message of this
    /// reign not yet delivered is (by seq): a post answering its delivery
    /// is one level deeper. A reign that inherits undelivered bot messages
    /// counts them as level 0, so a failover can let a chain run
    /// [`MAX_BOT_DEPTH`] levels more, once.
    pub(super) bot_depth: BTreeMap<u64, u32>,
    /// What the last review of the voters looked at (see `maintain_voters`).
    last_review: Option<(usize, usize, usize, u64, usize)>,
    /// Messages waiting for room in the window, in arrival order.
    backlog: VecDeque<Submission>,
    backlog_bytes: usize,
    waiting: Option<String>,
    /// The latest seal made (re-sent to peers catching up to that point).
    sealed: Option<p2p_proto::Seal>,
    /// The last seq of the log we took over with. An acknowledgement
    /// below it only paces a catch-up: a peer holding part of our starting
    /// log still proves its earlier reign's log, not ours, so it does not
    /// count toward a commit (docs/PROTOCOL.md, section 11).
    start: u64,
    /// Shared buffers the `chat` frames of this reign are encoded into
    /// (no allocation per message).
    arena: p2p_proto::FrameArena,
}

/// One admitted member's connection.
struct Link {
    id: u64,
    /// Shared with every `chat` entry it sends (no copy per message).
    name: std::sync::Arc<str>,
    /// Runs a server (gets entries before commit, acknowledges, may vote).
    peer: bool,
    last_heard: Millis,
    /// A returning peer being caught up: the next seq to send it once it
    /// acknowledges what it got (it joins the broadcast group after).
    catch_up: Option<u64>,
}

impl Coord {
    /// Adds (or replaces) the link on `conn`, keeping the peer count.
    fn add_link(&mut self, conn: ConnId, link: Link) {
        self.remove_link(conn);
        self.peer_links += usize::from(link.peer);
        self.links.insert(conn, link);
    }

    /// Forgets the link on `conn`, keeping the peer count.
    fn remove_link(&mut self, conn: ConnId) -> Option<Link> {
        let link = self.links.remove(&conn)?;
        self.peer_links -= usize::from(link.peer);
        Some(link)
    }

    /// Whether some link is a peer (checked against the links in tests).
    fn has_peers(&self) -> bool {
        debug_assert_eq!(self.peer_links, self.links.values().filter(|l| l.peer).count());
        self.peer_links > 0
    }

    /// Member `id` left cleanly (its `left` entry will say so).
    pub(super) fn note_left(&mut self, id: u64) {
        self.gone_reason.insert(id, "left".into());
    }

    pub(super) fn new(next_id: u64, now: Millis) -> Coord {
        Coord {
            links: BTreeMap::new(),
            peer_links: 0,
            by_member: BTreeMap::new(),
            acked: BTreeMap::new(),
            next_id,
            next_ping: now,
            nonce: 0,
            effective_through: 0,
            unreachable: BTreeMap::new(),
            probes: BTreeMap::new(),
            next_probe: now,
            quorum_lost_since: None,
            gone_reason: BTreeMap::new(),
            commit_sent: (0, 0),
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            last_review: None,
            since_ping: [0; 2],
            bot_depth: BTreeMap::new(),
            welcomes: Vec::new(),
            state_cache: None,
            waiting: None,
            sealed: None,
            start: 0,
            arena: p2p_proto::FrameArena::default(),
        }
    }

    pub(super) fn owns(&self, conn: ConnId) -> bool {
        self.links.contains_key(&conn) || self.probes.contains_key(&conn)
    }

    /// The last voter change known in force before we took over.
    pub(super) fn set_stable(&mut self, stable: u64) {
        self.effective_through = stable;
    }

    /// The last seq of the log we took over with.
    pub(super) fn set_start(&mut self, start: u64) {
        self.start = start;
    }

    /// Every connection we serve.
    pub(super) fn conns(&self) -> Vec<ConnId> {
        self.links.keys().chain(self.probes.keys()).copied().collect()
    }

    /// Ready to sequence (always, once coordinating).
    pub(super) fn ready(&self) -> bool {
        true
    }

    pub(super) fn heard_from(&mut self, conns: &[ConnId], now: Millis) {
        for c in conns {
            if let Some(l) = self.links.get_mut(c) {
                l.last_heard = now;
            }
        }
    }

    pub(super) fn waiting_reason(&self) -> Option<String> {
        self.waiting.clone()
    }
}

/// A member admitted in this batch, welcomed at its end.
struct PendingWelcome {
    conn: ConnId,
    id: u64,
    peer: bool,
    /// What a returning member delivered (None for a newcomer).
    returning_base: Option<u64>,
}

/// A message on its way to the log.
struct Submission {
    from_id: u64,
    from: std::sync::Arc<str>,
    client_seq: u64,
    text: String,
    bot: Option<String>,
    /// The sender's connection (None for our own user and for bots).
    conn: Option<ConnId>,
    depth: u32,
}

impl Core {
    fn coord(&mut self) -> Option<&mut Coord> {
        match &mut self.role {
            State::Coordinator(c) => Some(c),
            _ => None,
        }
    }

    /// Just took over: show the held history to the plugins (so stateful
    /// ones, like the logger, continue where the last coordinator stopped)
    /// and sequence our own unconfirmed messages.
    pub(super) fn coord_takeover(&mut self) {
        if self.hooks.active() {
            let chats: Vec<Chat> = self
                .log
                .range(0, self.log.applied())
                .filter_map(|e| match e {
                    Entry::Chat(c) => Some(c.clone()),
                    _ => None,
                })
                .collect();
            for (i, c) in chats.iter().enumerate() {
                let msg = hook_message(c);
                let _ = self.hooks.on_delivered(&msg, true, i + 1 == chats.len());
            }
            self.plugin_reports();
        }
        self.coord_apply();
        self.flush_pending();
    }

    /// A `hello` reached us as coordinator.
    pub(super) fn coord_hello(&mut self, h: Hello) {
        if let Some(r) = &h.resume {
            self.note_epoch(r.epoch);
            self.note_epoch(r.min_epoch);
            if r.epoch > self.epoch {
                // It followed a coordinator newer than us: we are stale.
                self.refuse(
                    h.conn,
                    ErrorCode::Electing,
                    "this coordinator is out of date; retry in a moment",
                );
                return self.step_down(None, "a member followed a newer coordinator");
            }
            if r.min_epoch > self.epoch {
                // It voted in a later epoch and cannot come back to ours:
                // run again, for an epoch after it.
                self.refuse(
                    h.conn,
                    ErrorCode::Electing,
                    "the coordinator is moving to a later epoch; retry in a moment",
                );
                return self.step_down(None, "a member is bound to a later epoch");
            }
            for d in &r.dead {
                self.proven_dead(*d);
            }
        }
        let r = Resumer {
            conn: h.conn,
            name: h.name,
            addr: h.addr,
            session: h.session,
            resume: h.resume.unwrap_or_default(),
            sign_key: h.sign_key,
        };
        self.coord_admit_resumer(r);
    }

    /// Admits a member: one coming back keeps its id and gets what it
    /// misses; a new one gets an id, a `joined` entry and recent history.
    pub(super) fn coord_admit_resumer(&mut self, r: Resumer) {
        let conn = r.conn;
        let returning = r.resume.member_id != 0;
        // Whatever it delivered is committed (we hold it: our log has every
        // committed entry).
        if returning && r.resume.commit <= self.log.last() && r.resume.commit > self.log.commit() {
            self.log.set_commit(r.resume.commit);
            self.coord_apply();
        }
        let id = match self.tip.member(r.resume.member_id) {
            Some(m) if m.session == r.session => Some(m.id),
            // The same process, known to the chat under another id: the
            // entry that gave it the id it comes back with was never
            // committed, and a later coordinator admitted it again. The
            // session proves it (only its process knows the secret behind
            // it); its welcome tells it the id. Without this it was told
            // "cut off a moment ago; retry" for ever (the simulator's
            // edge-of-quorum schedules).
            //
            // The same goes for a process that asks to join afresh: a
            // coordinator admitted it and died before its welcome got
            // out, and the next one took the `joined` entry over. Told
            // "cut off a moment ago" (its own probe answered for the
            // member it had become), it was refused until its patience
            // ran out, and then started a chat of its own beside this one
            // (the simulator's restart storms, seed 204414).
            _ => self
                .tip
                .member_by_session(r.session)
                .map(|m| m.id)
                .filter(|id| !self.dead.contains(id)),
        };
        if let Some(id) = id {
            // Still a member: re-attach.
            let Some(c) = self.coord() else { return };
            if let Some(old) = c.by_member.remove(&id) {
                c.remove_link(old);
                self.close(old);
            }
            let c = self.coord().expect("coordinator");
            c.unreachable.remove(&id);
            // A process that never had its welcome is welcomed as a
            // newcomer (the state, then recent history).
            let base = returning.then_some(r.resume.commit);
            return self.welcome(conn, id, r.name, r.addr.is_some(), base);
        }
        // Gone, or new. Not while a majority of the voters is out of
        // contact: its `joined` entry could not be confirmed, and a
        // newcomer admitted then was ready in a chat that might never go
        // on (after a majority was killed at once, the restarted nodes
        // joined the survivors' dead chat and stayed in it).
        if self.coord().is_some_and(|c| c.waiting.is_some()) {
            return self.refuse(
                conn,
                ErrorCode::Electing,
                "this chat cannot confirm messages right now (a majority of its voters is out of contact); retry in a moment",
            );
        }
        // Check the name, then a `joined` entry.
        if let Some(m) = self.tip.members.iter().find(|m| m.name == r.name).cloned() {
            if m.addr.is_some() && m.addr == r.addr && m.session != r.session {
                // A new process listens where that member did: it is gone.
                self.proven_dead(m.id);
            }
            if !self.dead.contains(&m.id) {
                let now = self.now;
                let c = self.coord().expect("coordinator");
                if !c.by_member.contains_key(&m.id) && m.addr.is_some() {
                    // Its connection is gone: find out now whether its
                    // process is; the newcomer (a restart, most likely)
                    // retries in a moment.
                    c.unreachable.entry(m.id).or_insert(now);
                    c.next_probe = now;
                    self.probe_unreachable();
                    return self.refuse(
                        conn,
                        ErrorCode::Electing,
                        format!(
                            "a member named {} was cut off a moment ago; retry in a moment",
                            m.name
                        ),
                    );
                }
                return self.refuse(
                    conn,
                    ErrorCode::NameTaken,
                    format!(
                        "the name {} is already taken in this chat; choose another name",
                        m.name
                    ),
                );
            }
        }
        if self.tip.members.len() >= self.cfg.max_members {
            return self.refuse(
                conn,
                ErrorCode::TooManyMembers,
                format!("the chat is full ({} members)", self.cfg.max_members),
            );
        }
        let id = match self.tip.id_of_session(r.session) {
            Some(id) if self.tip.member(id).is_none() => id,
            _ => {
                let c = self.coord().expect("coordinator");
                let id = c.next_id;
                c.next_id += 1;
                id
            }
        };
        let member = MemberInfo {
            id,
            name: r.name.clone(),
            addr: r.addr.clone(),
            session: r.session,
            sign_key: r.sign_key.clone(),
        };
        let base = returning.then_some(r.resume.commit);
        self.welcome(conn, id, r.name, r.addr.is_some(), base);
        self.propose(|epoch, seq| Entry::Joined { epoch, seq, member });
    }

    /// Admits a member's connection now and welcomes it at the end of the
    /// batch (`flush_welcomes`).
    fn welcome(&mut self, conn: ConnId, id: u64, name: String, peer: bool, returning_base: Option<u64>) {
        let now = self.now;
        let Some(c) = self.coord() else { return };
        c.add_link(
            conn,
            Link {
                id,
                name: name.into(),
                peer,
                last_heard: now,
                catch_up: None,
            },
        );
        c.by_member.insert(id, conn);
        c.welcomes.push(PendingWelcome {
            conn,
            id,
            peer,
            returning_base,
        });
    }

    /// Sends each admitted member `welcome`, the state, and the entries it
    /// needs, then adds it to its broadcast group. A peer far behind gets
    /// its history in chunks as it acknowledges them; a client gets at most
    /// `catch_up_bytes` of it (an older hole is reported to it as such).
    fn flush_welcomes(&mut self) {
        let at = self.state_at;
        let Some(c) = self.coord() else { return };
        if c.welcomes.is_empty() {
            return;
        }
        let welcomes = std::mem::take(&mut c.welcomes);
        let cached = matches!(&c.state_cache, Some((a, _, _)) if *a == at);
        if !cached {
            let encode = |frames: Vec<Frame>| frames.iter().map(p2p_proto::encode).collect();
            let peers = encode(self.state.to_frames(at, true));
            let clients = encode(self.state.to_frames(at, false));
            if let Some(c) = self.coord() {
                c.state_cache = Some((at, peers, clients));
            }
        }
        let (peers, clients): (Vec<bytes::Bytes>, Vec<bytes::Bytes>) = match &self.role {
            State::Coordinator(c) => match &c.state_cache {
                Some((_, p, cl)) => (p.clone(), cl.clone()),
                None => return,
            },
            _ => return,
        };
        for w in welcomes {
            let linked = matches!(&self.role, State::Coordinator(c) if c.links.contains_key(&w.conn));
            if linked {
                self.send_welcome(&w, if w.peer { &peers } else { &clients });
            }
        }
    }

    fn send_welcome(&mut self, w: &PendingWelcome, state: &[bytes::Bytes]) {
        let (conn, peer) = (w.conn, w.peer);
        let commit = self.log.commit();
        let mut base = match w.returning_base {
            Some(b) if self.log.holds_after(b.min(commit)) => b.min(commit),
            Some(_) => self.log.base(),
            None => self.history_base(commit),
        };
        // A new peer holds all the history we hold, like every peer: it may
        // coordinate one day, and a member returning from a long pause
        // then finds its entries there. It shows only the newest.
        let quiet = base;
        if peer && w.returning_base.is_none() && self.log.chain_at(self.log.base()).is_some() {
            base = self.log.base().min(base);
        }
        if !peer {
            // Keep the newest entries that fit.
            let mut size = 0;
            let sizes: Vec<(u64, usize)> = self
                .log
                .sized_range(base + 1, commit)
                .map(|(e, n)| (e.seq(), n))
                .collect();
            for (seq, n) in sizes.iter().rev() {
                if size + n > self.cfg.catch_up_bytes {
                    base = *seq;
                    break;
                }
                size += n;
            }
        }
        let welcome = Frame::Welcome {
            member_id: w.id,
            epoch: self.epoch,
            coordinator: self.me.id,
            base,
            commit,
            stable: self.stable,
            heartbeat_ms: self.cfg.heartbeat_ms,
            chat_id: self.state.chat_id.clone(),
            chain: self.log.chain_at(base).map(|c| p2p_proto::secure::to_hex(&c)),
            start: match &self.role {
                State::Coordinator(c) => c.start,
                _ => 0,
            },
            quiet,
        };
        self.send(conn, &welcome);
        self.out
            .extend(state.iter().map(|f| Output::Send(conn, f.clone())));
        if peer {
            self.send_chunk(conn, base + 1);
        } else {
            let frames = self.log.frames(base + 1, commit);
            self.out.extend(frames.into_iter().map(|f| Output::Send(conn, f)));
            self.out.push(Output::JoinGroup(conn, Group::Clients));
        }
    }

    /// Where a newcomer's history starts: just before the last `replay`
    /// messages (other entries in between come along).
    fn history_base(&self, commit: u64) -> u64 {
        let want = self.cfg.replay;
        if want == 0 {
            return commit;
        }
        let mut found = 0;
        let mut seq = commit;
        while seq > self.log.base() {
            if matches!(self.log.entry_at(seq), Some(Entry::Chat(_))) {
                found += 1;
                if found == want {
                    return seq - 1;
                }
            }
            seq -= 1;
        }
        self.log.base()
    }

    /// Sends a catching-up peer the entries from `from`, at most
    /// `catch_up_bytes` of them; once it has everything it joins the peers.
    fn send_chunk(&mut self, conn: ConnId, from: u64) {
        let budget = self.cfg.catch_up_bytes;
        let last = self.log.last();
        let mut size = 0;
        let mut upto = from - 1;
        for (e, n) in self.log.sized_range(from, last) {
            if size + n > budget && upto >= from {
                break;
            }
            size += n;
            upto = e.seq();
        }
        let frames = self.log.frames(from, upto);
        self.out.extend(frames.into_iter().map(|f| Output::Send(conn, f)));
        // The peer acknowledges only what a seal covers.
        let seal = match self.coord().and_then(|c| c.sealed.clone()) {
            Some(s) if s.seq == upto => Some(s),
            _ => self.make_seal(upto),
        };
        if let Some(seal) = seal {
            self.send(conn, &Frame::Seal(seal));
        }
        let commit = Frame::Commit {
            seq: self.log.commit(),
            stable: self.stable,
        };
        self.send(conn, &commit);
        let done = upto >= last;
        let Some(c) = self.coord() else { return };
        if let Some(l) = c.links.get_mut(&conn) {
            l.catch_up = (!done).then_some(upto + 1);
        }
        if done {
            self.out.push(Output::JoinGroup(conn, Group::Peers));
        }
    }

    /// A frame from an admitted member.
    pub(super) fn coord_frame(&mut self, conn: ConnId, frame: Frame) {
        let now = self.now;
        let Some(c) = self.coord() else { return };
        if let Some(id) = c.probes.remove(&conn) {
            self.close(conn);
            if let Frame::ProbeReply {
                session,
                epoch,
                role,
                coordinator,
                chat,
                ..
            } = frame
            {
                if self.not_member_answering(id, session, &chat) {
                    self.proven_dead(id);
                } else if epoch > self.epoch {
                    self.note_epoch(epoch);
                    // Go to that coordinator, as an announcement would send
                    // us. Electing instead made this node (often the
                    // earliest-joined voter, back from a pause) run against
                    // a healthy reign and win it back: one more failover
                    // for nothing (seen with p2pctl kill -s STOP, then CONT).
                    let to = coordinator
                        .filter(|a| {
                            matches!(role, p2p_proto::Role::Member | p2p_proto::Role::Coordinator)
                                && limits::check_addr(a).is_ok()
                        })
                        .map(|a| (0, a));
                    self.step_down(to, "a voter follows a newer coordinator");
                }
            }
            return;
        }
        let Some(link) = c.links.get_mut(&conn) else {
            return;
        };
        link.last_heard = now;
        let (id, name, peer) = (link.id, link.name.clone(), link.peer);
        match frame {
            Frame::Say { text, client_seq } => {
                if let Err(reason) = limits::check_text(&text) {
                    self.send(conn, &Frame::Rejected { client_seq, reason });
                } else if client_seq > self.tip.client_seq(id) {
                    self.submit(Submission {
                        from_id: id,
                        from: name,
                        client_seq,
                        text,
                        bot: None,
                        conn: Some(conn),
                        depth: 0,
                    });
                }
                // else: sent again after a failover, already in the log;
                // its delivery is the sender's acknowledgement.
            }
            Frame::Ack { seq } => {
                if peer && seq <= self.log.last() {
                    let Some(c) = self.coord() else { return };
                    if seq >= c.start {
                        let a = c.acked.entry(id).or_insert(0);
                        *a = (*a).max(seq);
                    }
                    let next = c.links.get(&conn).and_then(|l| l.catch_up);
                    if let Some(next) = next.filter(|n| seq + 1 >= *n) {
                        self.send_chunk(conn, next);
                    }
                }
            }
            Frame::Pong { .. } | Frame::Sync { .. } | Frame::Hello { .. } => {}
            Frame::Leave {} => {
                self.proven_dead(id); // it will never act again
                if let Some(c) = self.coord() {
                    c.gone_reason.insert(id, "left".into());
                }
                self.drop_link(conn, "left".into());
            }
            other => {
                let kind = other.kind();
                self.send(
                    conn,
                    &Frame::error(
                        ErrorCode::UnexpectedFrame,
                        format!("{kind} is not allowed from a member"),
                    ),
                );
                self.drop_link(conn, format!("disconnected (sent an unexpected {kind} frame)"));
            }
        }
    }

    /// Orders one entry: assigns the next seq in this epoch, encodes it once,
    /// sends it to the peers. It is delivered once a quorum holds it.
    fn propose(&mut self, make: impl FnOnce(u64, u64) -> Entry) {
        let entry = make(self.epoch, self.log.last() + 1);
        let frame = p2p_proto::encode_entry(&entry);
        self.broadcast(Group::Peers, frame.clone());
        self.tip.apply(&entry);
        if let Err(e) = self.log.append_encoded(entry, frame) {
            tracing::error!(?e, "a proposed entry did not follow the log");
        }
    }

    /// Our own user's line: sequenced now if the window has room, else it
    /// waits in `pending` (in order) for `flush_pending`.
    pub(super) fn coord_own(&mut self, client_seq: u64, text: String) {
        let waiting = matches!(&self.role, State::Coordinator(c) if !c.backlog.is_empty());
        if waiting || self.log.tentative_bytes() >= self.cfg.window_bytes {
            return;
        }
        let (from_id, from) = (self.me.id, self.me.name.clone());
        self.submit(Submission {
            from_id,
            from: from.into(),
            client_seq,
            text,
            bot: None,
            conn: None,
            depth: 0,
        });
    }

    /// Runs the plugin chain on a message, then sequences it (or tells the
    /// sender it was dropped).
    fn submit(&mut self, s: Submission) {
        let full = self.log.tentative_bytes() >= self.cfg.window_bytes;
        let Some(c) = self.coord() else { return };
        if full || !c.backlog.is_empty() {
            if c.backlog_bytes + s.text.len() > MAX_BACKLOG_BYTES {
                let reason = "not sent: the chat is busy (its voters have not confirmed earlier messages yet); try again".to_string();
                return self.reject(&s, reason);
            }
            c.backlog_bytes += s.text.len();
            c.backlog.push_back(s);
            return;
        }
        self.sequence_now(s);
    }

    /// Sends `frame` to a broadcast group, with a ping after every
    /// [`PING_EVERY_BYTES`] of it: pings are also spaced in bytes, not only
    /// in time, so a member reading a burst (queued behind data, perhaps in
    /// its own socket buffer, where only it can see) meets one and answers
    /// it while it reads.
    fn broadcast(&mut self, group: Group, frame: bytes::Bytes) {
        let len = frame.len();
        self.out.push(Output::Broadcast(group, frame));
        let Some(c) = self.coord() else { return };
        let i = usize::from(group == Group::Clients);
        c.since_ping[i] += len;
        if c.since_ping[i] >= PING_EVERY_BYTES {
            c.since_ping[i] = 0;
            c.nonce += 1;
            let ping = encode(&Frame::Ping { nonce: c.nonce });
            self.out.push(Output::Broadcast(group, ping));
        }
    }

    /// Sequences what waits in the backlog while the window has room.
    fn drain_backlog(&mut self) {
        while self.log.tentative_bytes() < self.cfg.window_bytes {
            let Some(c) = self.coord() else { return };
            let Some(s) = c.backlog.pop_front() else { return };
            c.backlog_bytes -= s.text.len();
            // Sent again while it waited (after a reconnection)?
            if s.client_seq > 0 && s.from_id != 0 && s.client_seq <= self.tip.client_seq(s.from_id) {
                continue;
            }
            self.sequence_now(s);
        }
    }

    /// Runs the chain and appends the message now.
    fn sequence_now(&mut self, s: Submission) {
        let text = if self.hooks.active() {
            let msg = HookMessage {
                epoch: self.epoch,
                seq: self.log.last() + 1,
                from_id: s.from_id,
                from: &s.from,
                text: &s.text,
                bot: s.bot.as_deref(),
            };
            let outcome = self.hooks.on_message(&msg);
            for v in outcome.verdicts {
                self.emit(Event::Verdict {
                    plugin: v.plugin,
                    rule: v.rule,
                    action: v.action,
                    member: s.from.to_string(),
                });
            }
            let decision = outcome.decision;
            self.bot_posts(outcome.posts, s.depth);
            self.plugin_reports();
            match decision {
                Decision::Drop { reason } => return self.reject(&s, reason),
                Decision::Deliver(Some(rewritten)) => rewritten,
                Decision::Deliver(None) => s.text,
            }
        } else {
            s.text
        };
        let chat = Chat {
            epoch: self.epoch,
            seq: self.log.last() + 1,
            from: s.from,
            from_id: s.from_id,
            client_seq: s.client_seq,
            text,
            bot: s.bot,
        };
        if s.depth > 0 {
            if let Some(c) = self.coord() {
                c.bot_depth.insert(chat.seq, s.depth);
            }
        }
        let (frame, peers) = match self.coord() {
            Some(c) => (p2p_proto::encode_chat_in(&mut c.arena, &chat), c.has_peers()),
            None => (p2p_proto::encode_chat(&chat), true),
        };
        // Peers get entries before they are committed; clients get them at
        // the commit. A coordinator without peers skips the first push.
        if peers {
            self.broadcast(Group::Peers, frame.clone());
        }
        let entry = Entry::Chat(chat);
        self.tip.apply(&entry);
        if let Err(e) = self.log.append_encoded(entry, frame) {
            tracing::error!(?e, "a sequenced message did not follow the log");
        }
    }

    fn reject(&mut self, s: &Submission, reason: String) {
        if s.from_id == self.me.id && s.client_seq > 0 {
            self.pending.retain(|(cs, _)| *cs != s.client_seq);
            self.emit(Event::Rejected {
                client_seq: s.client_seq,
                reason,
            });
        } else if let Some(conn) = s.conn {
            self.send(
                conn,
                &Frame::Rejected {
                    client_seq: s.client_seq,
                    reason,
                },
            );
        }
    }

    /// Sequences messages posted by bots (through the chain, minus the poster).
    fn bot_posts(&mut self, posts: Vec<(String, String)>, depth: u32) {
        for (plugin, text) in posts {
            if depth >= MAX_BOT_DEPTH {
                tracing::warn!(%plugin, "bot post dropped: bots answering bots too deep");
                continue;
            }
            if let Err(e) = limits::check_text(&text) {
                tracing::warn!(%plugin, error = %e, "bot post dropped");
                continue;
            }
            self.submit(Submission {
                from_id: 0,
                from: plugin.as_str().into(),
                client_seq: 0,
                text,
                bot: Some(plugin),
                conn: None,
                depth: depth + 1,
            });
        }
    }

    /// Sequences our own messages not in the log yet, in order, while the
    /// window has room.
    fn flush_pending(&mut self) {
        loop {
            let done = self.tip.client_seq(self.me.id);
            let at = self.pending.partition_point(|(cs, _)| *cs <= done);
            let Some((cs, text)) = self.pending.get(at).cloned() else {
                return;
            };
            let before = self.log.last();
            self.coord_own(cs, text);
            if self.log.last() == before && self.tip.client_seq(self.me.id) == done {
                return; // no room (or a plugin dropped it: it left `pending`)
            }
        }
    }

    /// End of a batch: commit what a quorum holds, deliver it, tell peers.
    pub(super) fn coord_end_batch(&mut self) {
        loop {
            loop {
                let target = self.commit_target();
                if target <= self.log.commit() {
                    break;
                }
                self.log.set_commit(target);
                self.coord_apply();
            }
            let before = self.log.last();
            self.drain_backlog();
            self.flush_pending();
            if self.log.last() == before {
                break;
            }
        }
        self.maintain_voters();
        // One signature per batch vouches for everything sequenced so far.
        let last = self.log.last();
        if let Some(seal) = self.seal_through(last) {
            self.out
                .push(Output::Broadcast(Group::Peers, encode(&Frame::Seal(seal))));
        }
        self.flush_welcomes();
        let commit = self.log.commit();
        let Some(c) = self.coord() else { return };
        let stable = c.effective_through;
        if (commit, stable) != c.commit_sent {
            c.commit_sent = (commit, stable);
            self.stable = self.stable.max(stable);
            let frame = encode(&Frame::Commit { seq: commit, stable });
            self.out.push(Output::Broadcast(Group::Peers, frame));
        }
    }

    /// A seal through `seq` if it is past the last one made (remembered).
    /// Made only when some peer is there to use it.
    fn seal_through(&mut self, seq: u64) -> Option<p2p_proto::Seal> {
        let newer = match self.coord() {
            Some(c) => c.sealed.as_ref().is_none_or(|s| s.seq < seq) && c.has_peers(),
            None => false,
        };
        if !newer {
            return None;
        }
        let seal = self.make_seal(seq)?;
        if let Some(c) = self.coord() {
            c.sealed = Some(seal.clone());
        }
        Some(seal)
    }

    /// Signs the chain hash of our log through `seq`.
    fn make_seal(&self, seq: u64) -> Option<p2p_proto::Seal> {
        let hash = self.log.chain_at(seq)?;
        Some(p2p_proto::Seal {
            epoch: self.epoch,
            seq,
            hash: p2p_proto::secure::to_hex(&hash),
            sig: self.signer.seal(&self.state.chat_id, self.epoch, seq, &hash),
            signer: self.me.id,
        })
    }

    /// Delivers committed entries here and to clients, and lets plugins see
    /// them.
    fn coord_apply(&mut self) {
        let hooks = self.hooks.active();
        let (frames, posts) = self.apply_committed(hooks);
        for frame in frames {
            self.broadcast(Group::Clients, frame);
        }
        // Bots' answers are sequenced after the batch, in delivery order.
        for (posts, depth) in posts {
            self.bot_posts(posts, depth);
        }
    }

    /// The highest seq a quorum of every voter set in force holds.
    fn commit_target(&self) -> u64 {
        let State::Coordinator(c) = &self.role else {
            return 0;
        };
        let (commit, last) = (self.log.commit(), self.log.last());
        if last <= commit {
            return commit;
        }
        let me = self.me.id;
        // The common small case: we are the only voter, and stay so.
        let alone = |v: &[u64]| v.len() == 1 && v[0] == me;
        if alone(&self.tip.voters) && alone(&self.state.voters) && alone(&self.state.prev_voters) {
            return last;
        }
        let mut configs: Vec<(u64, &[u64])> = vec![(0, &self.state.voters)];
        if self.state.voters_seq > c.effective_through {
            configs.push((0, &self.state.prev_voters));
        }
        let changes: Vec<(u64, &[u64])> = self
            .log
            .range(commit + 1, last)
            .filter_map(|e| match e {
                Entry::Voters { seq, set, .. } => Some((*seq, &set[..])),
                _ => None,
            })
            .collect();
        // A voter change is proposed only once the one before it is
        // committed (`maintain_voters`): past our commit, every change but
        // the last is committed already, by a coordinator that died before
        // saying so. The sets before it no longer count (seed 501535 of
        // the edge runner: three voters of the set before two such changes
        // died, and a coordinator that took the log over could never
        // commit again, though elections, which count only the last two
        // sets, went on).
        let mut floor = commit;
        if let [.., (before_last, set), last_change] = changes[..] {
            floor = before_last;
            configs = vec![(0, set), last_change];
        } else {
            configs.extend(changes);
        }
        let mut marks: Vec<u64> = c.acked.values().copied().filter(|a| *a > commit).collect();
        marks.push(last);
        marks.sort_unstable();
        marks.dedup();
        for &q in marks.iter().rev() {
            let yes: BTreeSet<u64> = c
                .acked
                .iter()
                .filter(|(_, a)| **a >= q)
                .map(|(id, _)| *id)
                .chain([me])
                .collect();
            let ok = configs
                .iter()
                .filter(|(at, _)| *at <= q)
                .all(|(_, cfg)| is_quorum(cfg, &yes, &self.dead));
            if ok {
                return q.max(floor);
            }
        }
        floor
    }

    /// One voter-set change at a time: once the last one is in force
    /// (every live voter of the old and new sets holds it), drop voters
    /// proven dead and promote connected peers, earliest-joined first.
    fn maintain_voters(&mut self) {
        let me = self.me.id;
        let State::Coordinator(c) = &mut self.role else {
            return;
        };
        // A committed change with a later one still pending behind it (a
        // log taken over mid-change) is in force by the same test: until
        // it is, commits also need the set before it, which may have lost
        // its quorum for good (the simulator's edge-of-quorum runner: a
        // coordinator that could never commit again).
        let committed_at = self.state.voters_seq;
        if committed_at > c.effective_through && committed_at <= self.log.commit() {
            let all_hold = self
                .state
                .voters
                .iter()
                .chain(&self.state.prev_voters)
                .filter(|v| **v != me && !self.dead.contains(v))
                .all(|v| c.acked.get(v).is_some_and(|a| *a >= committed_at));
            if all_hold {
                c.effective_through = committed_at;
            }
        }
        let pending_at = self.tip.voters_seq;
        if pending_at > c.effective_through {
            if self.log.commit() < pending_at {
                return;
            }
            let everyone: BTreeSet<u64> = self
                .tip
                .voters
                .iter()
                .chain(&self.tip.prev_voters)
                .copied()
                .collect();
            let all_hold = everyone
                .iter()
                .filter(|v| **v != me && !self.dead.contains(v))
                .all(|v| c.acked.get(v).is_some_and(|a| *a >= pending_at));
            if !all_hold {
                return;
            }
            c.effective_through = pending_at;
        }
        // The rest walks every member: only when something it looks at
        // changed (members, acknowledging peers, deaths, voters).
        let look = (
            c.links.len(),
            c.acked.len(),
            self.dead.len(),
            self.tip.voters_seq,
            self.tip.members.len(),
        );
        if c.last_review == Some(look) {
            return;
        }
        c.last_review = Some(look);
        let current = self.tip.voters.clone();
        let mut next: Vec<u64> = current
            .iter()
            .copied()
            .filter(|v| !self.dead.contains(v))
            .collect();
        let peers: Vec<u64> = c
            .links
            .values()
            .filter(|l| l.peer && !next.contains(&l.id) && !self.dead.contains(&l.id))
            .filter(|l| c.acked.contains_key(&l.id))
            .map(|l| l.id)
            .collect();
        for id in peers {
            if next.len() >= MAX_VOTERS {
                break;
            }
            next.push(id);
        }
        next.sort_unstable();
        if next.is_empty() || next == current {
            return self.remove_dead_members();
        }
        tracing::info!(?current, ?next, "changing the voter set");
        self.propose(|epoch, seq| Entry::Voters {
            epoch,
            seq,
            set: next,
        });
    }

    /// Members proven dead that are no longer voters leave the member list.
    fn remove_dead_members(&mut self) {
        let State::Coordinator(c) = &self.role else { return };
        let gone: Vec<(u64, String, String)> = self
            .tip
            .members
            .iter()
            .filter(|m| self.dead.contains(&m.id) && !self.tip.is_voter(m.id))
            .map(|m| {
                let reason = c
                    .gone_reason
                    .get(&m.id)
                    .cloned()
                    .unwrap_or_else(|| "disconnected (its process is gone)".into());
                (m.id, m.name.clone(), reason)
            })
            .collect();
        for (id, name, reason) in gone {
            self.propose(|epoch, seq| Entry::Left {
                epoch,
                seq,
                id,
                name,
                reason,
            });
        }
    }

    /// Closes a member's connection. A non-voter leaves the chat; a voter
    /// stays one until it comes back or is proven dead (a paused process is
    /// still a voter, and may hold entries others lack).
    fn drop_link(&mut self, conn: ConnId, reason: String) {
        let now = self.now;
        let Some(c) = self.coord() else { return };
        let Some(link) = c.remove_link(conn) else { return };
        c.by_member.remove(&link.id);
        c.acked.remove(&link.id);
        self.close(conn);
        let voter = self.tip.is_voter(link.id) || self.tip.prev_voters.contains(&link.id);
        if voter && !self.dead.contains(&link.id) {
            let c = self.coord().expect("coordinator");
            c.unreachable.insert(link.id, now);
            c.next_probe = now;
            self.emit(Event::Unreachable {
                id: link.id,
                name: link.name.to_string(),
                reason,
            });
            return;
        }
        if self.tip.member(link.id).is_some() && !voter {
            let (id, name) = (link.id, link.name);
            self.propose(|epoch, seq| Entry::Left {
                epoch,
                seq,
                id,
                name: name.to_string(),
                reason,
            });
        }
    }

    pub(super) fn coord_closed(&mut self, conn: ConnId, reason: Option<String>, refused: bool) {
        let Some(c) = self.coord() else { return };
        if let Some(id) = c.probes.remove(&conn) {
            if refused {
                self.proven_dead(id);
                self.maintain_voters();
            }
            return;
        }
        self.drop_link(conn, reason.unwrap_or_else(|| "disconnected".into()));
    }

    pub(super) fn coord_tick(&mut self) {
        let now = self.now;
        let hb = self.cfg.heartbeat_ms;
        let dead_after = self.heartbeat_dead_after();
        let stalled = self.stalled();
        let Some(c) = self.coord() else { return };
        if now >= c.next_ping {
            c.next_ping = now + hb;
            c.nonce += 1;
            let ping = encode(&Frame::Ping { nonce: c.nonce });
            self.out.push(Output::Broadcast(Group::All, ping));
        }
        if stalled {
            return;
        }
        let Some(c) = self.coord() else { return };
        let silent: Vec<ConnId> = c
            .links
            .iter()
            .filter(|(_, l)| now.saturating_sub(l.last_heard) > dead_after)
            .map(|(conn, _)| *conn)
            .collect();
        for conn in silent {
            self.drop_link(conn, "disconnected (missed 3 heartbeats)".into());
        }
        self.probe_unreachable();
        self.check_quorum_contact();
    }

    /// Probes voters we have no connection to: a refusal proves them dead.
    fn probe_unreachable(&mut self) {
        let now = self.now;
        let hb = self.cfg.heartbeat_ms;
        let Some(c) = self.coord() else { return };
        if now < c.next_probe || c.unreachable.is_empty() {
            return;
        }
        c.next_probe = now + 2 * hb;
        let probing: BTreeSet<u64> = c.probes.values().copied().collect();
        let ids: Vec<u64> = c
            .unreachable
            .keys()
            .copied()
            .filter(|id| !probing.contains(id))
            .collect();
        let mut targets = Vec::new();
        for id in ids {
            if self.dead.contains(&id) {
                if let Some(c) = self.coord() {
                    c.unreachable.remove(&id);
                }
                continue;
            }
            if let Some(addr) = self.member(id).and_then(|m| m.addr.clone()) {
                targets.push((id, addr));
            }
        }
        for (id, addr) in targets {
            let conn = self.dial(&addr, &Frame::Probe {});
            if let Some(c) = self.coord() {
                c.probes.insert(conn, id);
            }
        }
    }

    /// A coordinator that has not heard from a quorum of voters for three
    /// heartbeats steps down: it cannot commit anything, and its members
    /// are better off electing.
    fn check_quorum_contact(&mut self) {
        let now = self.now;
        let me = self.me.id;
        let dead_after = self.heartbeat_dead_after();
        let dead = self.dead.clone();
        let State::Coordinator(c) = &self.role else { return };
        let configs: Vec<Vec<u64>> = self
            .tip
            .election_configs(c.effective_through)
            .into_iter()
            .map(<[u64]>::to_vec)
            .collect();
        let Some(c) = self.coord() else { return };
        let contact: BTreeSet<u64> = c
            .links
            .values()
            .filter(|l| now.saturating_sub(l.last_heard) <= dead_after)
            .map(|l| l.id)
            .chain([me])
            .collect();
        if configs.iter().all(|cfg| is_quorum(cfg, &contact, &dead)) {
            c.quorum_lost_since = None;
            if c.waiting.take().is_some() {
                let reason = "a majority of voters answers again; confirming messages".to_string();
                self.emit(Event::Resumed { reason });
            }
            return;
        }
        let since = *c.quorum_lost_since.get_or_insert(now);
        if c.waiting.is_none() {
            let reason = "cannot confirm messages: a majority of voters is out of contact".to_string();
            c.waiting = Some(reason.clone());
            self.emit(Event::Waiting { reason });
        }
        if now.saturating_sub(since) > dead_after {
            self.step_down(None, "lost contact with a majority of voters");
        }
    }

    /// Another coordinator outranks us (or we lost our voters): hand our
    /// members over and look for the coordinator as a member.
    pub(super) fn step_down(&mut self, to: Option<(u64, String)>, why: &str) {
        let State::Coordinator(c) = std::mem::replace(&mut self.role, State::Stopped) else {
            return;
        };
        tracing::info!(why, "stepping down");
        // Our own log is ours to vouch for: as a voter we can prove it.
        self.sealed = self.make_seal(self.log.last());
        self.seal_ahead = None;
        for conn in c.conns() {
            if let Some((_, addr)) = &to {
                self.send(
                    conn,
                    &Frame::Redirect {
                        addr: addr.clone(),
                        epoch: self.max_epoch,
                    },
                );
            }
            self.close(conn);
        }
        self.role = State::Stopped;
        match to {
            Some((id, addr)) => self.follow(id, addr, why),
            None => self.start_election(why.to_string(), None),
        }
    }

    /// A change to the plugin set asked by an observer.
    pub(super) fn on_plugin_change(&mut self, conn: ConnId, change: PluginChange) {
        if !matches!(self.role, State::Coordinator(_)) {
            return self.redirect_to_coordinator(conn);
        }
        let mut set = self.tip.plugins.clone();
        match &change {
            PluginChange::Attach(p) => {
                let checked = super::check_plugin_name(&p.name)
                    .and_then(|()| super::check_plugin_config(&p.name, &p.config));
                if let Err(e) = checked {
                    return self.refuse(conn, ErrorCode::PluginRefused, e.to_string());
                }
                let full = set.len() >= limits::MAX_PLUGINS;
                match set.iter_mut().find(|x| x.name == p.name) {
                    Some(x) => x.config = p.config.clone(),
                    None if full => {
                        return self.refuse(
                            conn,
                            ErrorCode::PluginRefused,
                            format!("a chat has at most {} plugins", limits::MAX_PLUGINS),
                        );
                    }
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
        // Load it here first: a plugin the coordinator cannot run is refused
        // before it enters the log.
        let previous = self.hooks_set.clone();
        let reports = self.hooks.set_plugins(&self.state.chat_id, &set);
        self.hooks_set = set.clone();
        for r in &reports {
            self.emit(Event::Plugin {
                name: r.plugin.clone(),
                state: r.state,
                detail: r.detail.clone(),
            });
        }
        if let PluginChange::Attach(p) = &change {
            if let Some(r) = reports
                .iter()
                .find(|r| r.plugin == p.name && r.state == super::hooks::PluginEvent::Refused)
            {
                let detail = r.detail.clone();
                let _ = self.hooks.set_plugins(&self.state.chat_id, &previous);
                self.hooks_set = previous;
                return self.refuse(conn, ErrorCode::PluginRefused, detail);
            }
        }
        let set: Vec<PluginRef> = set;
        self.propose(|epoch, seq| Entry::Plugins { epoch, seq, set });
        let status = self.status(false);
        self.send(conn, &status);
    }
}

pub(super) fn hook_message(c: &Chat) -> HookMessage<'_> {
    HookMessage {
        epoch: c.epoch,
        seq: c.seq,
        from_id: c.from_id,
        from: &c.from,
        text: &c.text,
        bot: c.bot.as_deref(),
    }
}
