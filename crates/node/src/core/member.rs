//! The member side: joining through any peer, following the coordinator
//! (holding its entries, acknowledging them, delivering committed ones),
//! detecting its loss, and voting for the next one: the earliest-joined
//! voter not proven dead.

use std::collections::BTreeSet;

use p2p_proto::{limits, Entry, ErrorCode, Frame, MemberInfo, Role, Seal};

use super::log::AppendError;
use super::state::StateLoader;
use super::{Candidate, ConnId, Core, Event, Hello, Millis, Output, State};

/// Most redirects followed while joining before giving up (a loop guard).
const MAX_REDIRECTS: u32 = 8;
/// How long a joiner keeps retrying peers that answer "electing".
const JOIN_PATIENCE_HEARTBEATS: u64 = 50;

/// How long a join candidate may take to answer our hello before we try
/// the next: a peer that accepted the connection and then hung (paused
/// right after the handshake) never answers.
const JOIN_ANSWER_HEARTBEATS: u64 = 10;

pub(super) struct Joining {
    candidates: Vec<String>,
    next: usize,
    pub(super) conn: Option<ConnId>,
    redirects: u32,
    /// Some peer answered but could not admit us yet (an election).
    busy_seen: bool,
    retry_at: Option<Millis>,
    give_up_at: Millis,
    /// When the hello on `conn` was sent.
    asked_at: Millis,
    /// The coordinator a peer sent us to, while `conn` dials it.
    redirected: Option<String>,
    /// The last coordinator we were sent to and could not reach, and why
    /// (for the final error).
    unreached: Option<String>,
    /// The last "not now" a peer answered (for the final error).
    last_busy: Option<String>,
}

pub(super) struct Uplink {
    pub(super) conn: ConnId,
    last_heard: Millis,
    /// Collecting the `state` frames that follow a welcome.
    loading: Option<StateLoader>,
    /// Entries up to here that arrive now were committed before we were
    /// welcomed: delivered as they come.
    history_until: u64,
    /// History for a newcomer is shown as replay.
    newcomer: bool,
    /// History up to here is held but not shown.
    quiet_until: u64,
    /// The last seq we acknowledged.
    acked: u64,
    /// Our messages sent on this connection (highest client_seq) and the
    /// bytes of them not yet delivered: at most [`SEND_WINDOW`] in flight.
    sent_upto: u64,
    pub(super) in_flight: usize,
}

/// Most bytes of our own messages sent and not yet delivered; the rest
/// wait in `pending` (the coordinator stays the place where they queue).
const SEND_WINDOW: usize = 1 << 20;

impl Uplink {
    /// The welcome is fully received: messages may be sent.
    pub(super) fn settled(&self) -> bool {
        self.loading.is_none()
    }
}

pub(super) struct Electing {
    since: Millis,
    /// The coordinator we lost (none after a redirect or announcement).
    lost: Option<MemberInfo>,
    /// A peer to try first with a plain resume: (member id or 0, address).
    /// The lost coordinator when we only lost our connection (it may have
    /// cut just us off), or a coordinator named by a redirect.
    direct: Option<(u64, String)>,
    /// The peer being dialled.
    target: Option<Target>,
    /// Voters that did not answer this round (tried again later).
    skip: BTreeSet<u64>,
    retry_at: Option<Millis>,
    /// `coordinator_alive` answers so far (the first few are retried at once).
    alive_replies: u32,
}

struct Target {
    /// Member id, or 0 for a direct address.
    id: u64,
    conn: ConnId,
    last_heard: Millis,
    /// Our binding before we voted for this target: restored if it
    /// withdraws (it promises never to use the vote).
    bound_before: Option<u64>,
}

impl Electing {
    /// Electing since `since`, having lost `lost`, nothing tried yet.
    pub(super) fn after(since: Millis, lost: Option<MemberInfo>) -> Electing {
        Electing {
            since,
            lost,
            direct: None,
            target: None,
            skip: BTreeSet::new(),
            retry_at: None,
            alive_replies: 0,
        }
    }

    pub(super) fn conn(&self) -> Option<ConnId> {
        self.target.as_ref().map(|t| t.conn)
    }
}

impl Core {
    /// Starts a new chat with ourselves as coordinator of epoch 1.
    pub(super) fn create(&mut self) {
        self.me.id = 1;
        self.epoch = 1;
        self.max_epoch = 1;
        self.bound_epoch = 1;
        self.coordinator = 1;
        self.log.set_log_epoch(1);
        let state = super::state::ChatState::new_chat(
            self.cfg.chat_id.clone(),
            self.me.clone(),
            self.cfg.plugins.clone(),
        );
        self.install_state(state, 0);
        self.role = State::Coordinator(Box::new(super::Coord::new(2, self.now)));
        self.emit(Event::Ready {
            id: 1,
            epoch: 1,
            coordinator: self.me.name.clone(),
            members: 1,
            created: true,
        });
    }

    pub(super) fn start_joining(&mut self) {
        let give_up_at = self.now + self.cfg.heartbeat_ms * JOIN_PATIENCE_HEARTBEATS;
        self.role = State::Joining(Joining {
            candidates: self.cfg.join.clone(),
            next: 0,
            conn: None,
            redirects: 0,
            busy_seen: false,
            retry_at: None,
            give_up_at,
            asked_at: self.now,
            redirected: None,
            unreached: None,
            last_busy: None,
        });
        self.join_next();
    }

    /// Dials the next join candidate, or settles what to do when none is left.
    fn join_next(&mut self) {
        let hello = self.hello(None);
        let State::Joining(j) = &mut self.role else {
            return;
        };
        j.redirected = None;
        if let Some(addr) = j.candidates.get(j.next).cloned() {
            j.next += 1;
            let conn = self.dial(&addr, &hello);
            let now = self.now;
            if let State::Joining(j) = &mut self.role {
                j.conn = Some(conn);
                j.asked_at = now;
            }
            return;
        }
        j.conn = None;
        if j.busy_seen && self.now < j.give_up_at {
            j.busy_seen = false;
            j.last_busy = None;
            // The redirect limit is per round: it stops a loop, not a
            // joiner that is sent on once a round while a chat elects
            // (counted over the whole patience, the ninth redirect, to a
            // coordinator just elected, made the joiner give up and start
            // a second chat: restart storms, seed 402814).
            j.redirects = 0;
            j.next = 0;
            j.retry_at = Some(self.now + self.cfg.heartbeat_ms);
            if let Some(coordinator) = j.unreached.take() {
                self.emit(Event::Info {
                    message: format!("could not reach the chat's coordinator at {coordinator}; trying again"),
                });
            }
            return;
        }
        let tried = j.candidates.join(", ");
        let unreached = j.unreached.take();
        let last_busy = j.last_busy.take();
        if self.cfg.create_if_alone && unreached.is_none() {
            tracing::info!(%tried, "no peer answered; starting a new chat");
            self.create();
        } else {
            let message = match unreached {
                // A chat exists: starting another one would split it.
                Some(coordinator) => format!(
                    "could not join: {tried} sent us to the chat's coordinator at {coordinator}; check that this node can connect to it"
                ),
                // Peers answered, but only "not now", for the whole patience.
                None => match last_busy {
                    Some(answer) => format!(
                        "could not join: {tried} kept answering \"{answer}\" for {:.1} s; start this node again later",
                        (self.cfg.heartbeat_ms * JOIN_PATIENCE_HEARTBEATS) as f64 / 1000.0
                    ),
                    None => format!(
                        "could not join: no peer answered at {tried}; check the addresses, or pass --create-if-alone to start a new chat"
                    ),
                },
            };
            self.emit(Event::Error { code: None, message });
            self.role = State::Stopped;
            self.out.push(Output::Exit(2));
        }
    }

    pub(super) fn is_uplink(&self, conn: ConnId) -> bool {
        match &self.role {
            State::Joining(j) => j.conn == Some(conn),
            State::Member(u) => u.conn == conn,
            State::Electing(e) => e.conn() == Some(conn),
            _ => false,
        }
    }

    /// A frame from the coordinator, or from the peer we are dialling.
    pub(super) fn on_uplink_frame(&mut self, conn: ConnId, frame: Frame) {
        let now = self.now;
        match &mut self.role {
            State::Member(u) => u.last_heard = now,
            State::Electing(e) => {
                if let Some(t) = &mut e.target {
                    t.last_heard = now;
                }
            }
            _ => {}
        }
        let frame = match frame.into_entry() {
            Ok(entry) => return self.on_entry(conn, entry),
            Err(frame) => *frame,
        };
        match frame {
            Frame::Welcome {
                member_id,
                epoch,
                coordinator,
                base,
                commit,
                stable,
                heartbeat_ms,
                chat_id,
                chain,
                start,
                quiet,
            } => {
                self.stable = self.stable.max(stable);
                self.on_welcome(
                    conn,
                    Welcomed {
                        member_id,
                        epoch,
                        coordinator,
                        base,
                        commit,
                        heartbeat_ms,
                        chat_id,
                        chain: chain.as_deref().and_then(p2p_proto::secure::hash_from_hex),
                        start,
                        quiet,
                    },
                )
            }
            frame @ Frame::State { .. } => {
                let chat_id = self.state.chat_id.clone();
                let State::Member(u) = &mut self.role else { return };
                let Some(loader) = &mut u.loading else {
                    return self.resync(conn, "a state frame outside a welcome");
                };
                match loader.add(&chat_id, frame) {
                    Ok(None) => {}
                    Ok(Some(state)) => {
                        let at = u.history_until;
                        u.loading = None;
                        self.install_state(state, at);
                        self.after_load(conn);
                    }
                    Err(e) => self.resync(conn, &e),
                }
            }
            Frame::Commit { seq, stable } => {
                if matches!(self.role, State::Member(_)) {
                    self.stable = self.stable.max(stable);
                    self.log.set_commit(seq);
                    self.apply_committed(false);
                    self.pump();
                }
            }
            Frame::Ping { nonce } => self.send(conn, &Frame::Pong { nonce }),
            Frame::Seal(seal) => self.on_seal(conn, seal),
            Frame::SyncRequest { from, to } => self.answer_sync(conn, from, to),
            Frame::Revote { epoch } => self.on_revote(conn, epoch),
            Frame::Rejected { client_seq, reason } => {
                let len: usize = self
                    .pending
                    .iter()
                    .filter(|(cs, _)| *cs == client_seq)
                    .map(|(_, t)| t.len())
                    .sum();
                self.pending.retain(|(cs, _)| *cs != client_seq);
                self.own_done(len);
                self.emit(Event::Rejected { client_seq, reason });
                self.pump();
            }
            Frame::Redirect { addr, epoch } => self.on_redirect(conn, addr, epoch),
            Frame::Error { code, message } => self.on_uplink_error(conn, code, message),
            other => {
                tracing::debug!(
                    kind = other.kind(),
                    "ignoring an unexpected frame from the coordinator"
                );
            }
        }
    }

    /// A log entry from the coordinator.
    fn on_entry(&mut self, conn: ConnId, entry: Entry) {
        let State::Member(u) = &self.role else { return };
        if u.loading.is_some() {
            return self.resync(conn, "an entry before the welcome's state");
        }
        let (history_until, newcomer, quiet_until) = (u.history_until, u.newcomer, u.quiet_until);
        let seq = entry.seq();
        if seq <= self.log.applied() {
            return; // delivered already (a returning member's overlap)
        }
        match self.append_entry(entry.clone()) {
            Ok(()) => {}
            Err(AppendError::Duplicate) => return,
            Err(AppendError::Gap { expected }) => {
                return self.resync(conn, &format!("entry {seq} arrived where {expected} was due"));
            }
        }
        if self.archive.as_mut().is_some_and(|a| a.sent_again(&entry)) {
            // Everything set aside is back: our log backs our proof again.
            self.archive = None;
        }
        if seq <= history_until {
            self.log.mark_applied(seq);
            if seq > quiet_until {
                self.deliver_event(&entry, newcomer);
            }
        }
    }

    /// Our copy of the log went wrong (a hole, a frame out of place):
    /// reconnect, so the coordinator sends what we miss again.
    fn resync(&mut self, conn: ConnId, why: &str) {
        tracing::warn!(why, "resynchronising with the coordinator");
        self.close(conn);
        let (id, addr) = (self.coordinator, self.coordinator_addr());
        match addr {
            Some(addr) => self.follow(id, addr, "resynchronising"),
            None => self.start_election("resynchronising".into(), None),
        }
    }

    /// The coordinator sealed its log through `seal.seq`: if we hold the
    /// same entries (the chain hashes agree) we may acknowledge them, and
    /// can prove them to a later coordinator.
    fn on_seal(&mut self, conn: ConnId, seal: Seal) {
        if !matches!(self.role, State::Member(_))
            || seal.signer != self.coordinator
            || seal.epoch != self.epoch
        {
            return;
        }
        if seal.seq > self.log.last() {
            self.seal_ahead = Some(seal);
            return;
        }
        self.check_seal(conn, seal);
    }

    fn check_seal(&mut self, conn: ConnId, seal: Seal) {
        if self
            .ack_seal
            .as_ref()
            .is_some_and(|s| (s.epoch, s.seq) >= (seal.epoch, seal.seq))
        {
            return;
        }
        let theirs = p2p_proto::secure::hash_from_hex(&seal.hash);
        match self.log.chain_at(seal.seq) {
            // Our chain is unknown (a hole): we cannot vouch for anything.
            None => {}
            Some(mine) if Some(mine) == theirs => {
                // A seal inside the log the coordinator took over with only
                // paces the catch-up; one past it is our proof from now on
                // (it covers everything the one it replaces had to prove).
                let newer = self
                    .sealed
                    .as_ref()
                    .is_none_or(|s| (s.epoch, s.seq) < (seal.epoch, seal.seq));
                if seal.seq >= self.reign_start && newer {
                    self.sealed = Some(seal.clone());
                    self.archive = None;
                }
                self.ack_seal = Some(seal);
            }
            Some(_) => self.resync(conn, "our log differs from the coordinator's seal"),
        }
    }

    /// What we can prove we hold: (epoch, seq) of our proof (the
    /// coordinator's own log when we coordinate).
    pub(super) fn provable(&self) -> (u64, u64) {
        if matches!(self.role, State::Coordinator(_)) {
            return (self.log.log_epoch(), self.log.last());
        }
        match &self.sealed {
            Some(s) if self.proof_backed(s) => (s.epoch, s.seq),
            _ => (0, 0),
        }
    }

    /// Whether we hold what `proof` covers: set aside, or in our log with
    /// the same chain hash (or delivered and forgotten since).
    fn proof_backed(&self, proof: &Seal) -> bool {
        if self.archive.is_some() || (proof.seq < self.log.base() && proof.seq <= self.log.applied()) {
            return true;
        }
        let theirs = p2p_proto::secure::hash_from_hex(&proof.hash);
        theirs.is_some() && self.log.chain_at(proof.seq) == theirs
    }

    /// A welcome is about to drop our undelivered entries past `base`:
    /// set aside those our proof covers, so it stays one we can back until
    /// the new coordinator's own proof replaces it.
    fn set_aside_proven(&mut self, base: u64) {
        let keep = base.max(self.log.applied());
        let Some(proof) = self.sealed.clone() else { return };
        if let Some(a) = &mut self.archive {
            if keep < a.from() {
                // Our log agrees with the proof up to where the archive
                // starts: those entries go to its front.
                let before: Vec<(Entry, usize)> = self
                    .log
                    .sized_range(keep + 1, a.from() - 1)
                    .map(|(e, n)| (e.clone(), n))
                    .collect();
                a.extend_front(before);
            } else {
                a.set_diverged();
            }
            return;
        }
        if proof.seq <= keep || !self.proof_backed(&proof) {
            return;
        }
        let entries: Vec<(Entry, usize)> = self
            .log
            .sized_range(keep + 1, proof.seq)
            .map(|(e, n)| (e.clone(), n))
            .collect();
        self.archive = Some(super::proof::Archive::new(keep + 1, entries));
    }

    /// Our own proof won an election we run: our log becomes the one it
    /// covers (entries set aside come back; the coordinator we followed
    /// since can have committed nothing that differs, or a voter would
    /// prove a later reign).
    pub(super) fn restore_archive(&mut self) {
        let Some(a) = self.archive.take() else { return };
        if self.log.applied() >= a.from() {
            tracing::error!(
                from = a.from(),
                applied = self.log.applied(),
                "entries set aside overlap delivered ones; keeping the log as it is"
            );
            return;
        }
        self.log.truncate_after(a.from() - 1);
        self.rebuild_tip();
        for e in a.into_entries() {
            if let Err(e) = self.append_entry(e) {
                tracing::error!(?e, "an entry set aside did not follow the log");
                return;
            }
        }
    }

    /// Remembers who coordinated an epoch (it welcomed us, or it is us).
    pub(super) fn know_coordinator(&mut self, epoch: u64, id: u64) {
        self.coordinators.insert(epoch, id);
        while self.coordinators.len() > 64 {
            self.coordinators.pop_first();
        }
    }

    /// Admitted (or re-admitted) by a coordinator.
    fn on_welcome(&mut self, conn: ConnId, w: Welcomed) {
        let Welcomed {
            member_id,
            epoch,
            coordinator,
            base,
            commit,
            heartbeat_ms,
            chat_id,
            chain,
            start,
            quiet,
        } = w;
        let from_vote_target = matches!(&self.role, State::Electing(e) if e.conn() == Some(conn));
        if from_vote_target && epoch < self.bound_epoch {
            // The one we voted for coordinates an older epoch: it will not
            // use our vote.
            self.release_vote();
        }
        if epoch < self.bound_epoch || epoch < self.epoch {
            tracing::warn!(
                epoch,
                bound = self.bound_epoch,
                "welcome from an older epoch; ignoring it"
            );
            self.close(conn);
            return self.uplink_closed(conn, Some("welcome from an older epoch".into()), false);
        }
        if !self.state.chat_id.is_empty() && self.state.chat_id != chat_id {
            self.emit(Event::Error {
                code: None,
                message: format!("the node at this address runs another chat ({chat_id}); not joining it"),
            });
            self.close(conn);
            return self.uplink_closed(conn, Some("another chat".into()), false);
        }
        if member_id == 0 || commit < base.min(commit) {
            self.close(conn);
            return self.uplink_closed(conn, Some("invalid welcome".into()), false);
        }
        self.note_epoch(epoch);
        // The chat runs on its coordinator's heartbeat.
        self.cfg.heartbeat_ms = heartbeat_ms.clamp(10, 60_000);
        let newcomer = self.me.id == 0;
        let prev = std::mem::replace(
            &mut self.role,
            State::Member(Uplink {
                conn,
                last_heard: self.now,
                loading: Some(StateLoader::default()),
                history_until: commit,
                newcomer,
                quiet_until: if newcomer { quiet } else { 0 },
                acked: 0,
                sent_upto: 0,
                in_flight: 0,
            }),
        );
        self.me.id = member_id;
        self.epoch = epoch;
        self.coordinator = coordinator;
        self.bound_epoch = self.bound_epoch.max(epoch);
        self.state.chat_id = chat_id;
        self.reign_start = start;
        self.ack_seal = None;
        // Our log now follows this coordinator's: drop undelivered entries
        // past `base` (they come again; what our proof covers is set aside
        // first), or skip a hole we cannot fill.
        if base > self.log.last() {
            let hole = !newcomer && base > self.log.applied();
            self.log.reset(base, hole);
        } else {
            self.set_aside_proven(base);
            self.log.truncate_after(base);
        }
        match (chain, self.log.chain_at(base)) {
            (Some(c), None) if self.log.base() == base => self.log.set_base_chain(c),
            (Some(c), Some(mine)) if c != mine => {
                tracing::warn!(
                    base,
                    "our log up to the welcome's base differs from the coordinator's"
                );
            }
            _ => {}
        }
        self.seal_ahead = None;
        self.log.set_log_epoch(epoch);
        self.know_coordinator(epoch, coordinator);
        self.log.set_commit(commit);
        let (since, lost) = match &prev {
            State::Electing(e) => (Some(e.since), e.lost.as_ref().map(|l| (l.id, self.epoch))),
            _ => (None, None),
        };
        if let Some(c) = prev_conn(&prev) {
            if c != conn {
                self.close(c);
            }
        }
        match prev {
            State::Joining(_) => {}
            State::Electing(_) => {
                let same_reign = lost.is_some_and(|(id, _)| id == coordinator);
                if same_reign {
                    // A false alarm (a slow coordinator, a cut that healed):
                    // the user saw "electing" and hears how it ended.
                    let reason = format!(
                        "{} still coordinates (epoch {epoch}); carrying on",
                        self.name_of(coordinator)
                    );
                    self.emit(Event::Resumed { reason });
                } else {
                    self.emit(Event::Role {
                        role: Role::Member,
                        epoch,
                        coordinator: self.name_of(coordinator),
                        election_ms: since.map(|s| self.now.saturating_sub(s)),
                    });
                }
            }
            _ => {}
        }
    }

    /// The welcome's state is in: tell the user, re-send what is unconfirmed.
    fn after_load(&mut self, conn: ConnId) {
        if matches!(&self.role, State::Member(u) if u.newcomer) {
            let me_listed = self.state.member(self.me.id).is_some();
            self.emit(Event::Ready {
                id: self.me.id,
                epoch: self.epoch,
                coordinator: self.coordinator_name(),
                members: self.state.members.len() + usize::from(!me_listed),
                created: false,
            });
        }
        // Everything unconfirmed, in order, before anything typed later.
        let _ = conn;
        self.pump();
    }

    /// Sends our waiting messages in order while the send window has room.
    pub(super) fn pump(&mut self) {
        let State::Member(u) = &mut self.role else { return };
        if u.loading.is_some() {
            return;
        }
        let conn = u.conn;
        let at = self.pending.partition_point(|(cs, _)| *cs <= u.sent_upto);
        let mut frames = Vec::new();
        for (client_seq, text) in &self.pending[at..] {
            if u.in_flight >= SEND_WINDOW {
                break;
            }
            u.in_flight += text.len();
            u.sent_upto = *client_seq;
            frames.push(Frame::Say {
                text: text.clone(),
                client_seq: *client_seq,
            });
        }
        for f in frames {
            self.send(conn, &f);
        }
    }

    /// One of our messages was delivered or refused: room in the window.
    pub(super) fn own_done(&mut self, len: usize) {
        if let State::Member(u) = &mut self.role {
            u.in_flight = u.in_flight.saturating_sub(len);
        }
    }

    /// End of a batch: acknowledge what we hold and a seal covers (peers
    /// only).
    pub(super) fn member_end_batch(&mut self) {
        let last = self.log.last();
        let State::Member(u) = &self.role else { return };
        let conn = u.conn;
        if let Some(s) = self.seal_ahead.take() {
            if s.seq <= last {
                self.check_seal(conn, s);
            } else {
                self.seal_ahead = Some(s);
            }
        }
        let sealed = match &self.ack_seal {
            Some(s) if s.epoch == self.epoch => s.seq.min(last),
            _ => return,
        };
        let State::Member(u) = &mut self.role else { return };
        if u.loading.is_none() && sealed > u.acked && self.me.addr.is_some() {
            u.acked = sealed;
            self.send(conn, &Frame::Ack { seq: sealed });
        }
    }

    /// The new coordinator (we voted for it) asks for entries we hold.
    /// Sends what we can prove of `from..=to`: entries up to our seal,
    /// then an empty `sync` carrying the seal.
    fn answer_sync(&mut self, conn: ConnId, from: u64, to: u64) {
        let to = to.min(self.provable().1);
        if !self.log.holds_after(from.saturating_sub(1)) {
            // We do not hold `from` any more: send our state, the chain
            // hash where it stands, and what follows.
            let at = self.state_at;
            if at < self.log.base() || self.log.chain_at(at).is_none() {
                return self.send(
                    conn,
                    &Frame::Sync {
                        entries: Vec::new(),
                        seal: None,
                        chain: None,
                    },
                );
            }
            for frame in self.state.to_frames(self.state_at, true) {
                self.send(conn, &frame);
            }
            let chain = self.log.chain_at(at).map(|c| p2p_proto::secure::to_hex(&c));
            return self.send_entries(conn, at + 1, to, chain);
        }
        self.send_entries(conn, from, to, None);
    }

    /// Sends the entries our proof covers in `from..=to` (from our log,
    /// then those set aside) as `sync` frames (the first with `chain`), then
    /// an empty one with our proof.
    fn send_entries(&mut self, conn: ConnId, from: u64, to: u64, chain: Option<String>) {
        let mut chunk = Vec::new();
        let mut size = 0;
        let mut frames = Vec::new();
        let (logged_to, set_aside) = match &self.archive {
            Some(a) => (to.min(a.from() - 1), Some(a)),
            None => (to, None),
        };
        let aside = set_aside
            .into_iter()
            .flat_map(|a| a.entries())
            .filter(|(e, _)| e.seq() >= from && e.seq() <= to)
            .map(|(e, n)| (e, *n));
        for (entry, len) in self.log.sized_range(from, logged_to).chain(aside) {
            if size + len > limits::MAX_SYNC_BYTES && !chunk.is_empty() {
                frames.push(std::mem::take(&mut chunk));
                size = 0;
            }
            size += len;
            chunk.push(entry.clone());
        }
        if !chunk.is_empty() {
            frames.push(chunk);
        }
        frames.push(Vec::new());
        let seal = self.sealed.clone();
        let n = frames.len();
        for (i, entries) in frames.into_iter().enumerate() {
            let frame = Frame::Sync {
                entries,
                seal: if i + 1 == n { seal.clone() } else { None },
                chain: if i == 0 { chain.clone() } else { None },
            };
            self.send(conn, &frame);
        }
    }

    /// The candidate we voted for gave up: it will never use our vote.
    fn release_vote(&mut self) {
        if let State::Electing(e) = &self.role {
            if let Some(before) = e.target.as_ref().and_then(|t| t.bound_before) {
                self.bound_epoch = before;
            }
        }
    }

    fn on_redirect(&mut self, conn: ConnId, addr: String, epoch: u64) {
        self.release_vote();
        self.close(conn);
        if limits::check_addr(&addr).is_err() {
            tracing::warn!(%addr, "ignoring a redirect to an invalid address");
            return self.uplink_closed(conn, Some("invalid redirect".into()), false);
        }
        self.note_epoch(epoch);
        match &mut self.role {
            State::Joining(j) => {
                j.redirects += 1;
                if j.redirects > MAX_REDIRECTS {
                    // A loop of redirects (coordinators changing under
                    // us): a chat runs there all the same, so this round
                    // counts as "not now" and the next starts a chat of
                    // its own no more than one that was redirected.
                    j.conn = None;
                    j.next = j.candidates.len();
                    j.busy_seen = true;
                    j.unreached = Some(format!(
                        "{addr} (redirected more than {MAX_REDIRECTS} times in a row)"
                    ));
                    tracing::warn!("too many redirects while joining");
                    return self.join_next();
                }
                tracing::debug!(%addr, "redirected to the coordinator");
                let hello = self.hello(None);
                let conn = self.dial(&addr, &hello);
                let now = self.now;
                if let State::Joining(j) = &mut self.role {
                    j.conn = Some(conn);
                    j.asked_at = now;
                    j.redirected = Some(addr);
                }
            }
            State::Member(_) | State::Electing(_) => self.follow(0, addr, "redirected to the coordinator"),
            _ => {}
        }
    }

    fn on_revote(&mut self, conn: ConnId, epoch: u64) {
        let State::Electing(e) = &self.role else { return };
        let Some(t) = &e.target else { return };
        let candidate = t.id;
        let may = epoch > self.voted.0 || self.voted == (epoch, candidate);
        // Vote even if our own log does not name us a voter: the candidate
        // asks because its log does (we were made a voter by an entry that
        // never reached us). Refusing left such a chat without a quorum for
        // good once the other new voters were gone (a torture run with
        // partitions). A vote only binds us to later epochs and hands over
        // our log; whether it counts is the candidate's reckoning.
        if !may {
            self.close(conn);
            return self.uplink_closed(conn, Some("cannot vote again at that epoch".into()), false);
        }
        let before = self.bound_epoch;
        self.cast_vote(epoch, candidate);
        if let State::Electing(e) = &mut self.role {
            if let Some(t) = &mut e.target {
                t.bound_before.get_or_insert(before);
            }
        }
        let hello = self.hello(Some(self.resume(Some(epoch))));
        self.send(conn, &hello);
    }

    fn cast_vote(&mut self, epoch: u64, candidate: u64) {
        // Not a record of who coordinated `epoch`: another candidate of the
        // same epoch may have won without our vote, and its seals must
        // still be trusted in a later recovery (a torture run livelocked
        // when they were not).
        self.voted = (epoch, candidate);
        self.bound_epoch = self.bound_epoch.max(epoch);
        self.note_epoch(epoch);
    }

    fn on_uplink_error(&mut self, conn: ConnId, code: ErrorCode, message: String) {
        let fatal = matches!(
            code,
            ErrorCode::NameTaken
                | ErrorCode::BadName
                | ErrorCode::VersionMismatch
                | ErrorCode::TooManyMembers
                | ErrorCode::Unauthenticated
        );
        self.close(conn);
        if fatal && matches!(self.role, State::Joining(_)) {
            self.emit(Event::Error {
                code: Some(code),
                message: format!("refused by the chat: {message}"),
            });
            self.role = State::Stopped;
            self.out.push(Output::Exit(2));
            return;
        }
        let busy = matches!(code, ErrorCode::Electing | ErrorCode::CoordinatorAlive);
        if busy {
            // A refusal (or a withdrawal) voids our vote.
            self.release_vote();
        }
        let retry_at = self.now + self.tick_ms();
        match &mut self.role {
            State::Joining(j) => {
                j.busy_seen |= busy || code == ErrorCode::ShuttingDown;
                if busy {
                    j.last_busy = Some(message);
                }
                j.conn = None;
                self.join_next();
            }
            State::Member(_) if code == ErrorCode::AnotherChat => {
                // Another process of another chat listens where our
                // coordinator did: ours is gone.
                let id = self.coordinator;
                self.proven_dead(id);
                self.start_election("the coordinator's address now runs another chat".into(), None);
            }
            State::Member(_) if code == ErrorCode::ShuttingDown => {
                // The coordinator left cleanly: it is gone for good.
                let id = self.coordinator;
                self.proven_dead(id);
                if self.left_cleanly.len() >= 64 {
                    self.left_cleanly.pop_first();
                }
                self.left_cleanly.insert(id);
                self.start_election("the coordinator left".into(), None);
            }
            State::Member(_) => {
                self.emit(Event::Error {
                    code: Some(code),
                    message: format!("the coordinator dropped us: {message}; rejoining"),
                });
                let id = self.coordinator;
                match self.coordinator_addr() {
                    Some(addr) => self.follow(id, addr, "dropped by the coordinator"),
                    None => self.start_election("dropped by the coordinator".into(), None),
                }
            }
            State::Electing(e) => {
                let target = e.target.take();
                match code {
                    ErrorCode::CoordinatorAlive => {
                        // The candidate still hears the coordinator: our vote
                        // was refused, so go back to the coordinator.
                        if let Some(lost) = &e.lost {
                            if let Some(addr) = &lost.addr {
                                e.direct = Some((lost.id, addr.clone()));
                            }
                        }
                        e.alive_replies += 1;
                        if e.alive_replies <= 3 {
                            self.try_successor();
                        } else {
                            e.retry_at = Some(retry_at);
                        }
                    }
                    // Gone for good: it left, or another process (of another
                    // chat) listens at its address.
                    ErrorCode::ShuttingDown | ErrorCode::AnotherChat => {
                        if let Some(t) = target {
                            self.proven_dead(t.id);
                        }
                        self.try_successor();
                    }
                    _ => {
                        // Not yet (still joining, or voted elsewhere): try the
                        // next one, come back to this one later.
                        let busy_id = target.as_ref().map_or(0, |t| t.id);
                        if busy_id != 0 {
                            e.skip.insert(busy_id);
                        }
                        e.retry_at = Some(retry_at);
                        // Meanwhile find out whether the member we know
                        // still answers there: after a restart storm a new
                        // member of this chat (electing too) may listen at a
                        // dead voter's address, and its "retry" kept us
                        // electing for ever.
                        if busy_id != 0 {
                            self.check_identity(busy_id);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Our connection to the coordinator (or to a join/election target) ended.
    pub(super) fn uplink_closed(&mut self, conn: ConnId, reason: Option<String>, refused: bool) {
        match &mut self.role {
            State::Joining(j) => {
                j.conn = None;
                if let Some(addr) = j.redirected.take() {
                    // A peer vouched that a chat runs there: its coordinator
                    // may have just died (an election follows) or be out of
                    // reach for a moment. Try again, within the patience,
                    // rather than give up at the first miss.
                    let why = reason.unwrap_or_else(|| "connection closed".into());
                    j.busy_seen = true;
                    j.unreached = Some(format!("{addr} ({why})"));
                } else if !refused {
                    // No answer, and no refusal either (the dial timed
                    // out, or the connection closed before any answer):
                    // someone may be there, out of reach for a moment. Try
                    // again within the patience rather than count it as
                    // nobody: a restarted node cut off from the only live
                    // peer it could reach, the others refusing, started a
                    // chat of its own at once and stayed in it after the
                    // cut healed (restart storms with cuts, seed 406433).
                    j.busy_seen = true;
                }
                self.join_next();
            }
            State::Member(_) => {
                self.close(conn);
                let why = match reason {
                    Some(r) => match r.strip_prefix("disconnected (").and_then(|r| r.strip_suffix(')')) {
                        Some(detail) => format!("connection lost: {detail}"),
                        None => r,
                    },
                    None => "connection closed".into(),
                };
                // Check the coordinator itself first: it may have cut only
                // us off (a killed process refuses at once).
                let probe = self.coordinator_addr().map(|a| (self.coordinator, a));
                self.start_election(why, probe);
            }
            State::Electing(e) => {
                if let Some(t) = e.target.take() {
                    if refused {
                        let id = t.id;
                        self.proven_dead(id);
                    } else if t.id != 0 {
                        e.skip.insert(t.id);
                    }
                }
                self.try_successor();
            }
            _ => {}
        }
    }

    pub(super) fn member_tick(&mut self) {
        let now = self.now;
        let hb = self.cfg.heartbeat_ms;
        let dead_after = self.heartbeat_dead_after();
        let stalled = self.stalled();
        match &mut self.role {
            State::Member(u) if !stalled && now.saturating_sub(u.last_heard) >= dead_after => {
                let conn = u.conn;
                self.close(conn);
                self.start_election("missed 3 heartbeats".into(), None);
            }
            State::Electing(e) => {
                if let Some(t) = &e.target {
                    if !stalled && now.saturating_sub(t.last_heard) >= dead_after {
                        // Silent (hung?): try the next one; its vote stays
                        // binding, so the next vote is for a later epoch.
                        let t = e.target.take().expect("checked");
                        if t.id != 0 {
                            e.skip.insert(t.id);
                        }
                        self.close(t.conn);
                        return self.try_successor();
                    }
                }
                if e.retry_at.is_some_and(|t| now >= t) {
                    e.retry_at = None;
                    self.try_successor();
                }
            }
            State::Joining(j) if j.retry_at.is_some_and(|t| now >= t) => {
                j.retry_at = None;
                self.join_next();
            }
            State::Joining(j)
                if !stalled && j.conn.is_some() && now >= j.asked_at + JOIN_ANSWER_HEARTBEATS * hb =>
            {
                // Silent, perhaps only paused: try the others, then this
                // one again, until the patience runs out.
                let conn = j.conn.take();
                j.busy_seen = true;
                if let Some(addr) = j.redirected.take() {
                    j.unreached = Some(format!("{addr} (accepted the connection, then did not answer)"));
                }
                if let Some(c) = conn {
                    self.close(c);
                }
                self.join_next();
            }
            _ => {}
        }
    }

    /// The coordinator is gone. With `probe`, first reconnect to it: a
    /// closed connection may mean it dropped only us.
    pub(super) fn start_election(&mut self, reason: String, probe: Option<(u64, String)>) {
        if matches!(&self.role, State::Member(u) if u.newcomer && u.loading.is_some())
            && !self.cfg.join.is_empty()
        {
            return self.join_again(reason);
        }
        let lost_info = self.member(self.coordinator).cloned();
        let lost = self.coordinator_name();
        if let Some(c) = self.uplink_conn() {
            self.close(c);
        }
        // A coordinator lost to silence is hung (or gone): do not wait on
        // it again this round.
        let mut skip = BTreeSet::new();
        if probe.is_none() {
            skip.insert(self.coordinator);
        }
        self.role = State::Electing(Electing {
            since: self.now,
            lost: lost_info,
            direct: probe,
            target: None,
            skip,
            retry_at: None,
            alive_replies: 0,
        });
        self.emit(Event::Electing { lost, reason });
        self.try_successor();
    }

    /// Welcomed, then cut off from the coordinator before the chat's state
    /// arrived: this node has delivered and sent nothing, and knows no peer
    /// of the chat but its join list. It asks to join again through that
    /// list as the same process; the coordinator of the day finds its
    /// session in the member list and welcomes it under the id the chat
    /// gave it. It never starts a chat now (one exists: a second would
    /// split it), and stays out of any other chat. Before, it ended with
    /// "lost the coordinator before the chat's state arrived".
    fn join_again(&mut self, reason: String) {
        if let Some(c) = self.uplink_conn() {
            self.close(c);
        }
        self.emit(Event::Info {
            message: format!(
                "lost the coordinator before the chat's state arrived ({reason}); joining again through {}",
                self.cfg.join.join(", ")
            ),
        });
        self.me.id = 0;
        self.cfg.create_if_alone = false;
        self.start_joining();
    }

    fn uplink_conn(&self) -> Option<ConnId> {
        match &self.role {
            State::Member(u) => Some(u.conn),
            State::Electing(e) => e.conn(),
            State::Joining(j) => j.conn,
            _ => None,
        }
    }

    /// Switches to a coordinator we were told about (redirect, announcement):
    /// we resume there, and follow it once it welcomes us.
    pub(super) fn follow(&mut self, id: u64, addr: String, why: &str) {
        tracing::info!(%addr, why, "following another coordinator");
        if let Some(conn) = self.uplink_conn() {
            self.close(conn);
        }
        self.emit(Event::Following {
            addr: addr.clone(),
            reason: why.to_string(),
        });
        let lost_info = self.member(self.coordinator).cloned();
        let since = match &self.role {
            State::Electing(e) => e.since,
            _ => self.now,
        };
        self.role = State::Electing(Electing {
            since,
            lost: lost_info,
            direct: Some((id, addr)),
            target: None,
            skip: BTreeSet::new(),
            retry_at: None,
            alive_replies: 0,
        });
        self.try_successor();
    }

    /// The next voter to ask, in join order: not proven dead, not skipped,
    /// and not us while we stand down (unless no other voter is left).
    fn successor(&self, skip: &BTreeSet<u64>) -> Option<u64> {
        let voters = self.tip.all_voters();
        let me = self.me.id;
        let others_live = voters.iter().any(|id| *id != me && !self.dead.contains(id));
        let pass_me = self.standing_down() && others_live;
        voters
            .into_iter()
            .find(|id| !(self.dead.contains(id) || skip.contains(id) || (pass_me && *id == me)))
    }

    /// Dials the direct target, or votes for the next voter, or becomes a
    /// candidate if that is us.
    pub(super) fn try_successor(&mut self) {
        let State::Electing(e) = &mut self.role else {
            return;
        };
        if let Some((id, addr)) = e.direct.take() {
            let hello = self.hello(Some(self.resume(None)));
            let conn = self.dial(&addr, &hello);
            if let State::Electing(e) = &mut self.role {
                e.target = Some(Target {
                    id,
                    conn,
                    last_heard: self.now,
                    bound_before: None,
                });
            }
            return;
        }
        let skip = e.skip.clone();
        // Skipping departed voters round after round kept a member whose
        // every voter was gone electing for ever instead of ending its chat.
        self.departed_voters_dead();
        let next = match self.successor(&skip) {
            Some(id) => Some(id),
            None if !skip.is_empty() => {
                // Everyone left was silent: start the round again shortly.
                if let State::Electing(e) = &mut self.role {
                    e.skip.clear();
                    e.retry_at = Some(self.now + self.cfg.heartbeat_ms);
                }
                return;
            }
            None => None,
        };
        let is_voter = self.tip.all_voters().contains(&self.me.id);
        match next {
            Some(id) if id == self.me.id && is_voter => self.become_candidate(),
            Some(id) => {
                let Some(addr) = self.member(id).and_then(|m| m.addr.clone()) else {
                    if let State::Electing(e) = &mut self.role {
                        e.skip.insert(id);
                    }
                    return self.try_successor();
                };
                if self.me.addr.as_deref() == Some(addr.as_str()) {
                    // Our own address: that member was this node's previous
                    // process (a restart on the same address), gone for good.
                    // Dialling it reached ourselves, which cannot answer for
                    // it, so it was skipped round after round.
                    self.proven_dead(id);
                    return self.try_successor();
                }
                let vote = is_voter.then(|| {
                    if self.voted.1 == id && self.voted.0 > self.epoch {
                        self.voted.0
                    } else {
                        self.max_epoch.max(self.voted.0).max(self.bound_epoch) + 1
                    }
                });
                let bound_before = vote.map(|_| self.bound_epoch);
                if let Some(v) = vote {
                    self.cast_vote(v, id);
                }
                let hello = self.hello(Some(self.resume(vote)));
                let conn = self.dial(&addr, &hello);
                if let State::Electing(e) = &mut self.role {
                    e.target = Some(Target {
                        id,
                        conn,
                        last_heard: self.now,
                        bound_before,
                    });
                }
            }
            None => {
                // Every voter is proven gone, for good: nobody can confirm
                // anything, and nobody can know what they confirmed last.
                let names: Vec<String> = self.tip.all_voters().iter().map(|v| self.name_of(*v)).collect();
                let message = if names.is_empty() {
                    // Welcomed, then cut off before the chat's state came:
                    // we know no voter to turn to.
                    "lost the coordinator before the chat's state arrived, so this node knows no peer to turn to; start it again to rejoin".to_string()
                } else {
                    format!(
                        "this chat is over: every node that could confirm messages is gone ({}); start a new chat",
                        names.join(", ")
                    )
                };
                self.emit(Event::Error { code: None, message });
                self.role = State::Stopped;
                self.out.push(Output::Exit(3));
            }
        }
    }

    fn become_candidate(&mut self) {
        let State::Electing(e) = std::mem::replace(&mut self.role, State::Stopped) else {
            return;
        };
        let epoch = self.max_epoch.max(self.voted.0).max(self.bound_epoch) + 1;
        let bound_before = self.bound_epoch;
        self.cast_vote(epoch, self.me.id);
        self.role = State::Candidate(Box::new(Candidate::new(
            epoch,
            e.since,
            e.lost,
            self.now,
            bound_before,
        )));
        self.cand_start();
    }

    /// A `hello` reached us while we follow a coordinator or are electing.
    /// A fresh join is redirected; a vote for us (we are the next voter)
    /// makes us a candidate if we too lost the coordinator.
    pub(super) fn member_hello(&mut self, h: Hello) {
        let Some(r) = h.resume.clone().filter(|r| r.vote.is_some()) else {
            return match &self.role {
                State::Member(_) => self.redirect_to_coordinator(h.conn),
                _ => self.refuse(
                    h.conn,
                    ErrorCode::Electing,
                    "an election is under way; retry in a moment",
                ),
            };
        };
        self.note_epoch(r.epoch);
        for d in &r.dead {
            self.proven_dead(*d);
        }
        if r.epoch < self.epoch {
            // It lost an older coordinator than ours: send it to ours.
            return match &self.role {
                State::Member(_) => self.redirect_to_coordinator(h.conn),
                _ => self.refuse(
                    h.conn,
                    ErrorCode::Electing,
                    "an election is under way; retry in a moment",
                ),
            };
        }
        let hb = self.cfg.heartbeat_ms;
        let now = self.now;
        if let State::Member(u) = &self.role {
            let hears = now.saturating_sub(u.last_heard) <= hb;
            if r.epoch == self.epoch && hears {
                let who = self.coordinator_name();
                return self.refuse(
                    h.conn,
                    ErrorCode::CoordinatorAlive,
                    format!("the coordinator {who} still answers this node; reconnect to it"),
                );
            }
        }
        if !self.tip.all_voters().contains(&self.me.id) {
            return self.refuse(
                h.conn,
                ErrorCode::Electing,
                "this node cannot coordinate; retry with the next voter",
            );
        }
        if self.standing_down() && matches!(self.role, State::Electing(_)) {
            return self.refuse(
                h.conn,
                ErrorCode::Electing,
                "this node stood down from the election; retry with the next voter",
            );
        }
        // We agree the coordinator is gone: run for the next epoch. The
        // voter's vote is counted by the candidate.
        if !matches!(self.role, State::Electing(_)) {
            let lost = self.coordinator_name();
            if let Some(c) = self.uplink_conn() {
                self.close(c);
            }
            self.role = State::Electing(Electing {
                since: self.now,
                lost: self.member(self.coordinator).cloned(),
                direct: None,
                target: None,
                skip: BTreeSet::new(),
                retry_at: None,
                alive_replies: 0,
            });
            self.emit(Event::Electing {
                lost,
                reason: format!("{} lost it too", h.name),
            });
        } else if let Some(c) = self.uplink_conn() {
            self.close(c);
            if let State::Electing(e) = &mut self.role {
                e.target = None;
            }
        }
        self.become_candidate();
        self.cand_hello(h);
    }
}

fn prev_conn(state: &State) -> Option<ConnId> {
    match state {
        State::Member(u) => Some(u.conn),
        State::Electing(e) => e.conn(),
        State::Joining(j) => j.conn,
        _ => None,
    }
}

/// What a `welcome` said.
struct Welcomed {
    member_id: u64,
    epoch: u64,
    coordinator: u64,
    base: u64,
    commit: u64,
    heartbeat_ms: u64,
    chat_id: String,
    /// The chain hash through `base`.
    chain: Option<[u8; 32]>,
    /// The last seq of the log the coordinator took over with.
    start: u64,
    /// A newcomer shows no history up to here.
    quiet: u64,
}
