//! Running for coordinator: collecting votes for one epoch until a quorum of
//! every voter set in force agrees, probing voters that have not voted
//! (a refused connection proves one dead), then adopting the most
//! up-to-date log among the voters before coordinating.

use std::collections::{BTreeMap, BTreeSet};

use p2p_proto::{Entry, ErrorCode, Frame, MemberInfo, Resume, Role};

use super::state::{is_quorum, StateLoader};
use super::{ConnId, Core, Event, Hello, Millis, State};

pub(super) struct Candidate {
    /// The epoch we run for.
    pub(super) epoch: u64,
    since: Millis,
    lost: Option<MemberInfo>,
    /// Counted votes (for `epoch`), by voter id.
    votes: BTreeMap<u64, Resumer>,
    /// Other connections held until we coordinate (non-voters, votes for
    /// another epoch waiting for a revote).
    held: BTreeMap<ConnId, Resumer>,
    /// Probes in flight: connection → voter id.
    probes: BTreeMap<ConnId, u64>,
    /// Voters that answered a probe while following a coordinator: the
    /// epoch and address they follow.
    following: BTreeMap<u64, (u64, Option<String>)>,
    next_probe: Millis,
    next_ping: Millis,
    /// Pulling the best log from a voter.
    recovery: Option<Recovery>,
    /// Why we cannot win yet (for status and a `waiting` event).
    waiting: Option<String>,
    waiting_said: bool,
    /// Our binding before we ran: restored if we withdraw.
    bound_before: u64,
    /// When we started running (a candidacy that cannot win stands down).
    ran_at: Millis,
}

/// A connection that sent us a resume.
pub(super) struct Resumer {
    pub(super) conn: ConnId,
    pub(super) name: String,
    pub(super) addr: Option<String>,
    pub(super) session: u64,
    pub(super) resume: Resume,
    pub(super) sign_key: Option<String>,
}

/// Pulling the best log from a voter. Nothing is adopted until its seal
/// checks out: what arrives is held aside.
struct Recovery {
    voter: u64,
    conn: ConnId,
    loader: Option<StateLoader>,
    /// A snapshot (the voter no longer holds `from`) and where it stands.
    snapshot: Option<(super::state::ChatState, u64)>,
    /// The chain hash where the snapshot stands.
    chain: Option<[u8; 32]>,
    entries: Vec<Entry>,
    bytes: usize,
}

/// Heartbeats a candidacy may last without winning before the candidate
/// stands down (plus up to as many again, staggered by member id), and
/// how long it then lets other voters run.
const CANDIDACY_HEARTBEATS: u64 = 10;

/// Most bytes of entries a recovery takes from one voter (a node holds at
/// most this much history).
const MAX_RECOVERY_BYTES: usize = super::log::DEFAULT_CAP_BYTES + p2p_proto::limits::MAX_SYNC_BYTES;

impl Candidate {
    pub(super) fn new(
        epoch: u64,
        since: Millis,
        lost: Option<MemberInfo>,
        now: Millis,
        bound_before: u64,
    ) -> Candidate {
        Candidate {
            epoch,
            since,
            lost,
            votes: BTreeMap::new(),
            held: BTreeMap::new(),
            probes: BTreeMap::new(),
            following: BTreeMap::new(),
            next_probe: now,
            next_ping: now,
            recovery: None,
            waiting: None,
            waiting_said: false,
            bound_before,
            ran_at: now,
        }
    }

    pub(super) fn owns(&self, conn: ConnId) -> bool {
        self.votes.values().any(|r| r.conn == conn)
            || self.held.contains_key(&conn)
            || self.probes.contains_key(&conn)
    }

    pub(super) fn conns(&self) -> Vec<ConnId> {
        let mut all: Vec<ConnId> = self.votes.values().map(|r| r.conn).collect();
        all.extend(self.held.keys().copied());
        all.extend(self.probes.keys().copied());
        all
    }

    pub(super) fn waiting_reason(&self) -> Option<String> {
        self.waiting.clone()
    }

    fn voter_of(&self, conn: ConnId) -> Option<u64> {
        self.votes.iter().find(|(_, r)| r.conn == conn).map(|(id, _)| *id)
    }
}

impl Core {
    fn cand(&mut self) -> Option<&mut Candidate> {
        match &mut self.role {
            State::Candidate(c) => Some(c),
            _ => None,
        }
    }

    pub(super) fn cand_start(&mut self) {
        tracing::info!(epoch = self.voted.0, "running for coordinator");
        self.cand_probe();
        self.cand_check();
    }

    /// A resume (possibly carrying a vote) reached us as candidate.
    pub(super) fn cand_hello(&mut self, h: Hello) {
        let Some(mut r) = h.resume else {
            return self.refuse(
                h.conn,
                ErrorCode::Electing,
                "an election is under way; retry in a moment",
            );
        };
        self.note_epoch(r.epoch);
        for d in &r.dead {
            self.proven_dead(*d);
        }
        let mut known = self
            .tip
            .member(r.member_id)
            .is_some_and(|m| m.session == h.session);
        if !known && r.member_id != 0 {
            // The same process under another id in our log (branches of
            // the log admitted it twice): its session proves it, and its
            // vote counts for the id our voter sets name it by.
            let other = self.tip.member_by_session(h.session).map(|m| m.id);
            if let Some(id) = other.filter(|id| !self.dead.contains(id)) {
                r.member_id = id;
                known = true;
            }
        }
        let is_voter = known && self.tip.all_voters().contains(&r.member_id);
        let resumer = Resumer {
            conn: h.conn,
            name: h.name,
            addr: h.addr,
            session: h.session,
            resume: r.clone(),
            sign_key: h.sign_key,
        };
        let my_vote = self.voted;
        let Some(c) = self.cand() else { return };
        c.held.remove(&resumer.conn);
        let Some(vote) = r.vote.filter(|_| is_voter) else {
            let conn = resumer.conn;
            let epoch = c.epoch;
            c.held.insert(conn, resumer);
            if is_voter {
                // A voter that came to us without voting: ask for its vote.
                self.send(conn, &Frame::Revote { epoch });
            }
            return;
        };
        let id = r.member_id;
        if vote < c.epoch {
            let conn = resumer.conn;
            let epoch = c.epoch;
            c.held.insert(conn, resumer);
            return self.send(conn, &Frame::Revote { epoch });
        }
        if vote > c.epoch {
            if my_vote.0 >= vote && my_vote.1 != self.me.id {
                return self.refuse(
                    resumer.conn,
                    ErrorCode::StaleEpoch,
                    format!("this node voted for another candidate in epoch {vote}; vote for a later epoch"),
                );
            }
            // Run for the later epoch; the votes so far must be given again.
            let c = self.cand().expect("candidate");
            c.epoch = vote;
            let old: Vec<Resumer> = std::mem::take(&mut c.votes).into_values().collect();
            c.recovery = None;
            for o in old {
                let conn = o.conn;
                c.held.insert(conn, o);
            }
            let conns: Vec<ConnId> = c
                .held
                .values()
                .filter(|o| o.resume.vote.is_some())
                .map(|o| o.conn)
                .collect();
            self.cast_vote_self(vote);
            for conn in conns {
                self.send(conn, &Frame::Revote { epoch: vote });
            }
        }
        let c = self.cand().expect("candidate");
        if let Some(old) = c.votes.insert(id, resumer) {
            if old.conn != h.conn {
                self.close(old.conn);
            }
        }
        self.cand_check();
    }

    fn cast_vote_self(&mut self, epoch: u64) {
        self.voted = (epoch, self.me.id);
        self.bound_epoch = self.bound_epoch.max(epoch);
        self.note_epoch(epoch);
    }

    /// A frame on a connection we hold as candidate.
    pub(super) fn cand_frame(&mut self, conn: ConnId, frame: Frame) {
        let Some(c) = self.cand() else { return };
        if let Some(id) = c.probes.remove(&conn) {
            self.close(conn);
            if let Frame::ProbeReply {
                session,
                role,
                epoch,
                coordinator,
                chat,
                ..
            } = frame
            {
                if self.not_member_answering(id, session, &chat) {
                    // Another process (or another chat's) answers at that
                    // address: ours is gone.
                    self.proven_dead(id);
                    return self.cand_check();
                }
                return self.cand_probe_reply(id, role, epoch, coordinator);
            }
            return;
        }
        if c.recovery.as_ref().is_some_and(|r| r.conn == conn) {
            return self.recovery_frame(conn, frame);
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
                if let Some(h) = self.checked_hello(conn, version, name, session, addr, resume, sign_key) {
                    self.cand_hello(h);
                }
            }
            Frame::Leave {} => {
                let c = self.cand().expect("candidate");
                c.held.remove(&conn);
                if let Some(id) = c.voter_of(conn) {
                    c.votes.remove(&id);
                    self.proven_dead(id);
                }
                self.close(conn);
                self.cand_check();
            }
            _ => {} // pongs keep the connection alive; nothing else matters yet
        }
    }

    pub(super) fn cand_closed(&mut self, conn: ConnId, refused: bool) {
        let Some(c) = self.cand() else { return };
        if let Some(id) = c.probes.remove(&conn) {
            if refused {
                self.proven_dead(id);
            }
            return self.cand_check();
        }
        c.held.remove(&conn);
        if let Some(id) = c.voter_of(conn) {
            // Its vote may still bind it, but we only count connected voters.
            c.votes.remove(&id);
            if c.recovery.as_ref().is_some_and(|r| r.voter == id) {
                c.recovery = None;
            }
        }
        self.cand_check();
    }

    pub(super) fn cand_tick(&mut self) {
        let now = self.now;
        let hb = self.cfg.heartbeat_ms;
        let Some(c) = self.cand() else { return };
        if now >= c.next_ping {
            c.next_ping = now + hb;
            let conns: Vec<ConnId> = c
                .votes
                .values()
                .map(|r| r.conn)
                .chain(c.held.keys().copied())
                .collect();
            let ping = p2p_proto::encode(&Frame::Ping { nonce: 0 });
            for conn in conns {
                self.out.push(super::Output::Send(conn, ping.clone()));
            }
        }
        let Some(c) = self.cand() else { return };
        if now >= c.next_probe {
            c.next_probe = now + 2 * hb;
            self.cand_probe();
            // Also looks again at who came to us meanwhile (a peer that is
            // not a voter, say): it may show the chat cannot go on.
            self.cand_check();
        }
        let me = self.me.id;
        let Some(c) = self.cand() else { return };
        // Heartbeats a candidacy may last without winning (staggered by id,
        // so two stuck candidates do not stand down together).
        let limit = (CANDIDACY_HEARTBEATS + me % CANDIDACY_HEARTBEATS) * hb;
        if c.recovery.is_none() && now.saturating_sub(c.ran_at) >= limit {
            return self.stand_down();
        }
        let Some(c) = self.cand() else { return };
        if !c.waiting_said && c.recovery.is_none() && now.saturating_sub(c.since) >= 2 * hb {
            if let Some(reason) = c.waiting.clone() {
                c.waiting_said = true;
                self.emit(Event::Waiting { reason });
            }
        }
    }

    /// Gives up a candidacy that could not win in time and lets the next
    /// voter run: our view of the voters may be stale (a voter change we
    /// missed while cut off counts voters we cannot reach), or another
    /// candidate keeps taking the same votes. Withdrawing never affects
    /// safety; it only hands the turn on.
    fn stand_down(&mut self) {
        let hb = self.cfg.heartbeat_ms;
        self.stand_down_until = self.now + CANDIDACY_HEARTBEATS * hb;
        let epoch = self.cand().map_or(0, |c| c.epoch);
        tracing::info!(
            epoch,
            "could not win the election in time; standing down for the next voter"
        );
        self.withdraw(None, "could not win in time; standing down");
    }

    /// Probes every voter that has not voted and is not known dead.
    fn cand_probe(&mut self) {
        self.departed_voters_dead();
        let voters = self.tip.all_voters();
        let me = self.me.id;
        let State::Candidate(c) = &self.role else { return };
        let probing: BTreeSet<u64> = c.probes.values().copied().collect();
        let targets: Vec<(u64, String)> = voters
            .iter()
            .copied()
            .filter(|v| {
                *v != me && !c.votes.contains_key(v) && !probing.contains(v) && !self.dead.contains(v)
            })
            .filter_map(|v| self.member(v).and_then(|m| m.addr.clone()).map(|a| (v, a)))
            .collect();
        for (id, addr) in targets {
            let conn = self.dial(&addr, &Frame::Probe {});
            if let Some(c) = self.cand() {
                c.probes.insert(conn, id);
            }
        }
    }

    fn cand_probe_reply(&mut self, id: u64, role: Role, epoch: u64, coordinator: Option<String>) {
        self.note_epoch(epoch);
        if role == Role::Candidate && id < self.me.id {
            // An earlier-joined voter runs too: it goes first; vote for it.
            return self.withdraw(None, "an earlier-joined voter is running");
        }
        let Some(c) = self.cand() else { return };
        if epoch >= c.epoch && matches!(role, Role::Member | Role::Coordinator) {
            // A newer reign already exists: follow it.
            if let Some(addr) = coordinator {
                return self.withdraw(Some((0, addr)), "a newer coordinator already reigns");
            }
        }
        if matches!(role, Role::Member | Role::Coordinator) {
            c.following.insert(id, (epoch, coordinator));
        } else {
            c.following.remove(&id);
        }
        self.cand_check();
    }

    /// Wins once every voter set in force has a quorum of votes (ours
    /// included); gives up if voters that still follow a live coordinator
    /// make that impossible.
    fn cand_check(&mut self) {
        let me = self.me.id;
        let configs: Vec<Vec<u64>> = self
            .tip
            .election_configs(self.stable)
            .into_iter()
            .map(<[u64]>::to_vec)
            .collect();
        let dead = self.dead.clone();
        let Some(c) = self.cand() else { return };
        if c.recovery.is_some() {
            return;
        }
        let yes: BTreeSet<u64> = c.votes.keys().copied().chain([me]).collect();
        if configs.iter().all(|cfg| is_quorum(cfg, &yes, &dead)) {
            return self.start_recovery();
        }
        // Could we still win if every voter not known to follow someone
        // else voted for us?
        let possible: BTreeSet<u64> = configs
            .iter()
            .flatten()
            .copied()
            .filter(|v| !c.following.contains_key(v) && !dead.contains(v))
            .collect();
        if !configs.iter().all(|cfg| is_quorum(cfg, &possible, &dead)) {
            let target = c
                .following
                .values()
                .filter_map(|(e, a)| a.clone().map(|a| (*e, a)))
                .max();
            if let Some((_, addr)) = target {
                return self.withdraw(
                    Some((0, addr)),
                    "the other voters still follow a live coordinator",
                );
            }
        }
        let all: BTreeSet<u64> = configs.iter().flatten().copied().collect();
        let names =
            |set: &mut dyn Iterator<Item = &u64>| -> Vec<String> { set.map(|id| format!("#{id}")).collect() };
        let missing: Vec<u64> = all
            .iter()
            .copied()
            .filter(|v| !yes.contains(v) && !dead.contains(v))
            .collect();
        let alive: BTreeSet<u64> = all.iter().copied().filter(|v| !dead.contains(v)).collect();
        let gone = names(&mut all.iter().filter(|v| dead.contains(v))).join(", ");
        let lost_for_good = !configs.iter().all(|cfg| is_quorum(cfg, &alive, &dead));
        let live_peers: BTreeSet<u64> = self
            .tip
            .members
            .iter()
            .filter(|m| m.id != me && m.addr.is_some() && !dead.contains(&m.id))
            .map(|m| m.id)
            .collect();
        if lost_for_good {
            // A peer that has not come to us (one that is not a voter is
            // never probed for the election) may be gone: find out.
            for id in self.not_come_to_us(&live_peers) {
                self.check_identity(id);
            }
        }
        if lost_for_good && (live_peers.is_empty() || self.stuck_with_us(&live_peers)) {
            // Not a voter change we missed either: every peer we know of
            // is gone (refused, left, or another chat at its address), or
            // every live one came to us and none knows of a voter set that
            // could still make a quorum (see `stuck_with_us`), so there is
            // nobody left to bring this chat back through.
            let everyone = if live_peers.is_empty() {
                "every other peer is gone".to_string()
            } else {
                let stuck = names(&mut live_peers.iter()).join(", ");
                format!("every other live peer ([{stuck}]) is stuck in it too")
            };
            let known: BTreeSet<u64> = all.union(&live_peers).copied().collect();
            let message = self.with_names(
                format!(
                    "this chat is over: a majority of its voters ([{gone}]) are gone for good and {everyone}; start a new chat (p2pctl restarts this node into the cluster's chat)"
                ),
                &known,
            );
            self.emit(Event::Error { code: None, message });
            self.role = State::Stopped;
            self.out.push(super::Output::Exit(3));
            return;
        }
        let reason = if !lost_for_good {
            format!(
                "waiting for a majority of voters: {} of {} agree; proven dead: [{}]; not answering or following another: [{}]",
                yes.iter().filter(|v| all.contains(v)).count(),
                all.len(),
                gone,
                names(&mut missing.iter()).join(", "),
            )
        } else {
            // A dead process never comes back (a restart is a new member),
            // so no quorum can form again; wait anyway, in case a voter
            // change this node missed left voters it does not know of.
            format!(
                "this chat cannot go on, as far as this node knows: of its {} voters, [{gone}] are gone for good and no majority is left to confirm messages; restart this node (or start a new chat) to chat again",
                all.len(),
            )
        };
        let reason = self.with_names(reason, &all);
        if let Some(c) = self.cand() {
            c.waiting = Some(reason);
        }
    }

    /// Whether every peer in `live` came to us (a voter with its vote, a
    /// non-voter waiting for the election) and every peer that came to us
    /// (one we do not know included: admitted in a branch of the log we
    /// do not hold) either proves no more of the log than we can or knows
    /// only voter sets that cannot make a quorum either: then none of us
    /// knows of a voter set that could, and none can form again.
    fn stuck_with_us(&self, live: &BTreeSet<u64>) -> bool {
        let mine = self.provable();
        let State::Candidate(c) = &self.role else {
            return false;
        };
        let peers: Vec<&Resumer> = c
            .votes
            .values()
            .chain(c.held.values())
            .filter(|r| r.addr.is_some())
            .collect();
        // A peer that holds entries we lack may know a voter set we do
        // not: it must say which sets it knows, and none of them may be
        // able to make a quorum of live voters either.
        let dead = &self.dead;
        let hopeless = |cfg: &Vec<u64>| {
            let alive: BTreeSet<u64> = cfg.iter().copied().filter(|v| !dead.contains(v)).collect();
            !is_quorum(cfg, &alive, dead)
        };
        let no_way_back = |r: &Resumer| {
            (r.resume.log_epoch, r.resume.last_seq) <= mine
                || (!r.resume.voters.is_empty() && r.resume.voters.iter().any(hopeless))
        };
        peers.iter().all(|r| no_way_back(r))
            && live
                .iter()
                .all(|id| peers.iter().any(|r| r.resume.member_id == *id))
    }

    /// The peers in `live` that neither voted for us nor wait on us.
    fn not_come_to_us(&self, live: &BTreeSet<u64>) -> Vec<u64> {
        let State::Candidate(c) = &self.role else {
            return Vec::new();
        };
        live.iter()
            .copied()
            .filter(|id| !c.votes.contains_key(id) && !c.held.values().any(|r| r.resume.member_id == *id))
            .collect()
    }

    /// Replaces `#id` in a sentence by member names.
    fn with_names(&self, mut s: String, ids: &BTreeSet<u64>) -> String {
        for id in ids.iter().rev() {
            s = s.replace(&format!("#{id}"), &self.name_of(*id));
        }
        s
    }

    /// A quorum voted: adopt the most up-to-date log among the voters
    /// (each reports what it can prove: its proof). Ours counts the same
    /// way: what we merely hold proves nothing.
    fn start_recovery(&mut self) {
        let mine = self.provable();
        let from = self.log.applied() + 1;
        let Some(c) = self.cand() else { return };
        c.waiting = None;
        let best = c
            .votes
            .iter()
            .map(|(id, r)| ((r.resume.log_epoch, r.resume.last_seq), *id, r.conn))
            .max();
        match best {
            Some((pos, id, conn)) if pos > mine => {
                c.recovery = Some(Recovery {
                    voter: id,
                    conn,
                    loader: None,
                    snapshot: None,
                    chain: None,
                    entries: Vec::new(),
                    bytes: 0,
                });
                tracing::info!(voter = id, from, to = pos.1, "pulling the most up-to-date log");
                self.send(conn, &Frame::SyncRequest { from, to: pos.1 });
            }
            _ => {
                self.restore_archive();
                self.take_over();
            }
        }
    }

    fn recovery_frame(&mut self, conn: ConnId, frame: Frame) {
        match frame {
            frame @ Frame::State { at, .. } => {
                let chat_id = self.state.chat_id.clone();
                let Some(c) = self.cand() else { return };
                let Some(r) = &mut c.recovery else { return };
                let loader = r.loader.get_or_insert_with(StateLoader::default);
                match loader.add(&chat_id, frame) {
                    Ok(None) => {}
                    Ok(Some(state)) => {
                        r.loader = None;
                        r.snapshot = Some((state, at));
                    }
                    Err(e) => self.recovery_failed(conn, &e),
                }
            }
            Frame::Sync { entries, seal, chain } => {
                let Some(c) = self.cand() else { return };
                let Some(r) = &mut c.recovery else { return };
                if let Some(h) = chain.as_deref().and_then(p2p_proto::secure::hash_from_hex) {
                    r.chain = Some(h);
                }
                if entries.is_empty() {
                    return self.finish_recovery(conn, seal);
                }
                for e in entries {
                    if p2p_proto::limits::check_name(entry_name(&e)).is_err() {
                        return self.recovery_failed(conn, "invalid entry");
                    }
                    r.bytes += e.canonical().len();
                    r.entries.push(e);
                }
                if r.bytes > MAX_RECOVERY_BYTES {
                    self.recovery_failed(conn, "the voter sent more entries than a log holds");
                }
            }
            _ => {}
        }
    }

    /// Everything is in: adopt the entries the voter's seal proves (those
    /// past it were never acknowledged, so never committed), or drop the
    /// voter's vote if the seal does not check out.
    fn finish_recovery(&mut self, conn: ConnId, seal: Option<p2p_proto::Seal>) {
        let Some(c) = self.cand() else { return };
        let Some(r) = c.recovery.take() else { return };
        let applied = self.log.applied();
        let (start, mut chain) = match &r.snapshot {
            Some((_, at)) => (*at, r.chain),
            None => (applied, self.log.chain_at(applied)),
        };
        let Some(seal) = seal.filter(|s| s.seq > applied) else {
            if r.snapshot.is_some() {
                return self.recovery_failed(conn, "a snapshot without a seal");
            }
            // Nothing provable beyond what we delivered.
            return self.take_over();
        };
        if let Err(why) = self.seal_trusted(&seal, r.voter) {
            if seal.signer == r.voter && !self.coordinators.contains_key(&seal.epoch) {
                self.self_vouched += 1;
            }
            return self.recovery_failed(conn, &why);
        }
        // The entries must follow on from where we (or the snapshot) stand,
        // and hash up to the seal.
        let mut upto = start;
        for e in &r.entries {
            if upto >= seal.seq {
                break;
            }
            if e.seq() != upto + 1 {
                return self.recovery_failed(conn, &format!("entry {} where {} was due", e.seq(), upto + 1));
            }
            chain = chain.map(|h| p2p_proto::secure::chain_next(&h, e));
            upto = e.seq();
        }
        let theirs = p2p_proto::secure::hash_from_hex(&seal.hash);
        if upto != seal.seq || chain.is_none() || chain != theirs {
            return self.recovery_failed(conn, "the entries do not match the voter's seal");
        }
        // Proven: adopt.
        tracing::info!(voter = r.voter, upto, "adopting the voter's log through its seal");
        self.archive = None;
        match r.snapshot {
            Some((state, at)) => {
                tracing::warn!(
                    at,
                    "the best log starts after ours: taking its state (a hole here)"
                );
                self.log.reset(at, at > applied);
                if let Some(h) = r.chain {
                    self.log.set_base_chain(h);
                }
                self.install_state(state, at);
            }
            None => self.log.truncate_after(applied),
        }
        self.rebuild_tip();
        for e in r.entries.into_iter().take_while(|e| e.seq() <= seal.seq) {
            if let Err(e) = self.append_entry(e) {
                tracing::error!(?e, "a proven entry did not follow the log");
            }
        }
        self.take_over();
    }

    /// Whether a voter's seal is signed by a coordinator we may believe:
    /// the one we know coordinated that epoch, or, for an epoch we did not
    /// see, any member we already knew with a signing key other than the
    /// voter itself (nobody vouches for its own history).
    fn seal_trusted(&self, seal: &p2p_proto::Seal, voter: u64) -> Result<(), String> {
        let known = self.coordinators.get(&seal.epoch).copied();
        let allowed = match known {
            Some(id) => id == seal.signer,
            None => seal.signer != voter,
        };
        if !allowed {
            return Err(format!(
                "seal of epoch {} signed by member {}, who did not coordinate it as far as we know",
                seal.epoch, seal.signer
            ));
        }
        let Some(key) = self.state.member(seal.signer).and_then(|m| m.sign_key.clone()) else {
            return Err(format!(
                "seal signed by member {}, whose key we do not know",
                seal.signer
            ));
        };
        let hash = p2p_proto::secure::hash_from_hex(&seal.hash).ok_or("a seal hash is not 64 hex digits")?;
        if !p2p_proto::secure::verify_seal(&key, &self.state.chat_id, seal.epoch, seal.seq, &hash, &seal.sig)
        {
            return Err("a seal's signature does not verify".into());
        }
        Ok(())
    }

    fn recovery_failed(&mut self, conn: ConnId, why: &str) {
        tracing::warn!(why, "log recovery failed; dropping that vote");
        self.close(conn);
        if let Some(c) = self.cand() {
            c.recovery = None;
            if let Some(id) = c.voter_of(conn) {
                c.votes.remove(&id);
            }
        }
        self.cand_check();
    }

    /// Gives up the candidacy: our vote for ourselves will never be used.
    /// Voters are sent to `to` (or back to electing).
    pub(super) fn withdraw(&mut self, to: Option<(u64, String)>, why: &str) {
        let State::Candidate(c) = std::mem::replace(&mut self.role, State::Stopped) else {
            return;
        };
        tracing::info!(why, "withdrawing from the election");
        // We will never use our candidacy: nothing binds us to its epoch.
        self.bound_epoch = c.bound_before;
        for conn in c.conns() {
            match &to {
                Some((_, addr)) => {
                    self.send(
                        conn,
                        &Frame::Redirect {
                            addr: addr.clone(),
                            epoch: self.max_epoch,
                        },
                    );
                    self.close(conn);
                }
                None => self.refuse(conn, ErrorCode::Electing, "the candidate withdrew; retry"),
            }
        }
        self.role = State::Electing(super::member::Electing::after(c.since, c.lost));
        match to {
            Some((id, addr)) => self.follow(id, addr, why),
            None => self.try_successor(),
        }
    }

    /// Recovery done: coordinate `epoch` with the chosen log.
    fn take_over(&mut self) {
        let State::Candidate(c) = std::mem::replace(&mut self.role, State::Stopped) else {
            return;
        };
        let c = *c;
        let epoch = c.epoch;
        self.epoch = epoch;
        self.coordinator = self.me.id;
        self.log.set_log_epoch(epoch);
        // Our proof from now on is our own log, which starts here.
        self.archive = None;
        self.reign_start = self.log.last();
        self.note_epoch(epoch);
        self.know_coordinator(epoch, self.me.id);
        // Whatever a voter delivered and can prove is committed, and in
        // the log we chose (it is at least as far as every voter's proof).
        let known = c
            .votes
            .values()
            .map(|r| r.resume.commit.min(r.resume.last_seq))
            .max()
            .unwrap_or(0)
            .min(self.log.last());
        self.log.set_commit(known);
        let next_id = self.tip.next_id.max(self.tip.max_id() + 1);
        let mut coord = super::Coord::new(next_id, self.now);
        coord.set_stable(self.stable);
        coord.set_start(self.reign_start);
        for id in std::mem::take(&mut self.left_cleanly) {
            coord.note_left(id);
        }
        self.role = State::Coordinator(Box::new(coord));
        self.emit(Event::Role {
            role: Role::Coordinator,
            epoch,
            coordinator: self.me.name.clone(),
            election_ms: Some(self.now.saturating_sub(c.since)),
        });
        tracing::info!(epoch, votes = c.votes.len(), "took over");
        // Tell voters that did not vote (and the lost coordinator, which
        // may only be hung) who reigns now.
        let announce = p2p_proto::encode(&Frame::Announce {
            epoch,
            coordinator: self.me.clone(),
        });
        let notify: Vec<String> = self
            .tip
            .all_voters()
            .into_iter()
            .filter(|v| *v != self.me.id && !c.votes.contains_key(v) && !self.dead.contains(v))
            .filter_map(|v| self.member(v).and_then(|m| m.addr.clone()))
            .collect();
        for addr in notify {
            self.out.push(super::Output::Notify {
                addr,
                frame: announce.clone(),
            });
        }
        self.coord_takeover();
        for r in c.votes.into_values().chain(c.held.into_values()) {
            self.coord_admit_resumer(r);
        }
        for conn in c.probes.into_keys() {
            self.close(conn);
        }
        self.coord_end_batch();
    }
}

fn entry_name(e: &Entry) -> &str {
    match e {
        Entry::Chat(c) => &c.from,
        Entry::Joined { member, .. } => &member.name,
        Entry::Left { name, .. } => name,
        Entry::Voters { .. } | Entry::Plugins { .. } => "entry",
    }
}
