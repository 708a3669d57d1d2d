//! A whole cluster of cores on a simulated network, driven by a seeded
//! random schedule: deterministic (ordered maps, one RNG, time only moves
//! when the simulation says so), so a failing seed replays exactly.
//!
//! The network keeps each connection in order (TCP) and delays every
//! frame independently of other connections. A killed node's connections
//! close (sometimes with a reset that loses what was in flight) and its
//! address refuses new ones; a paused node accepts connections but reads
//! nothing until it resumes; a restarted node is a new process on the same
//! address. The outputs are performed the way `server.rs` performs them.
//!
//! A partition cuts pairs of addresses: what one sends the other (frames,
//! a close, a reset) waits in the network until the cut heals and then
//! arrives in order, as TCP's retransmissions would bring it; a dial across
//! a cut gets no answer and times out as `server.rs`'s does (never a
//! refusal: a refusal is taken as proof of death); a notification across
//! it is lost.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use bytes::Bytes;
use p2p_proto::{decode_body, Role};

use super::check::Checker;
use super::{ConnId, Core, CoreConfig, Event, Group, Input, Millis, Output};

/// `P2P_SIM_TRACE=1` prints every event and fault.
pub fn trace() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("P2P_SIM_TRACE").is_some())
}

/// `P2P_SIM_FRAMES=1` prints every frame as it arrives, too.
fn trace_frames() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("P2P_SIM_FRAMES").is_some())
}

/// A small, fast, seedable generator (splitmix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }
}

/// How the network behaves.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Usual one-way delay, uniform in `0..=delay_ms`.
    pub delay_ms: u64,
    /// Percent of frames delayed much longer (a starved process).
    pub slow_percent: u64,
    pub slow_ms: u64,
    /// Percent of crashes whose connections reset (in-flight data lost).
    pub reset_percent: u64,
}

impl Default for NetConfig {
    fn default() -> NetConfig {
        NetConfig {
            delay_ms: 2,
            slow_percent: 0,
            slow_ms: 0,
            reset_percent: 50,
        }
    }
}

pub struct SimNode {
    pub name: String,
    pub addr: String,
    /// Process generation at this address (a restart is a new one).
    pub inc: u32,
    pub core: Option<Core>,
    pub paused: bool,
    /// Inputs that arrived while paused, read on resume.
    held: VecDeque<Input>,
    next_inbound: ConnId,
    peers: BTreeSet<ConnId>,
    clients: BTreeSet<ConnId>,
    pub exit: Option<i32>,
    /// Delivered seq seen so far (for the checker).
    pub seen_applied: u64,
    pub started: bool,
    pub typed: u64,
}

impl SimNode {
    pub fn alive(&self) -> bool {
        self.core.is_some()
    }
    pub fn core(&self) -> &Core {
        self.core.as_ref().expect("node is alive")
    }
}

/// One direction of a connection.
struct Pipe {
    peer: (usize, u32, ConnId),
    /// Arrival time of the last frame scheduled on it (keeps it in order).
    last_at: Millis,
    /// Frames arriving after this time are lost (the connection reset).
    reset_at: Option<Millis>,
}

enum Ev {
    Frame(usize, u32, ConnId, Bytes),
    Closed(usize, u32, ConnId, Option<String>),
    Refused(usize, u32, ConnId),
    Tick(usize, u32),
    Dial(usize, u32, ConnId, String, Bytes),
    Notify(usize, String, Bytes),
}

pub struct Sim {
    pub rng: Rng,
    pub now: Millis,
    pub hb: u64,
    pub net: NetConfig,
    pub nodes: Vec<SimNode>,
    pipes: BTreeMap<(usize, ConnId), Pipe>,
    queue: BinaryHeap<Reverse<(Millis, u64)>>,
    evs: BTreeMap<u64, Ev>,
    next_ev: u64,
    pub check: Checker,
    /// Base of the sessions handed out (a different one per seed).
    session_base: u64,
    /// Members a chat admits (`CoreConfig::max_members`) for nodes booted
    /// from now on.
    pub max_members: usize,
    /// `CoreConfig::create_if_alone` for nodes booted from now on.
    pub create_if_alone: bool,
    /// History a coordinator sends a catching-up peer at once
    /// (`CoreConfig::catch_up_bytes`): small values split a catch-up into
    /// many acknowledged chunks.
    pub catch_up_bytes: usize,
    pub steps: u64,
    /// Pairs of node indices (lower first) that cannot reach each other.
    cuts: BTreeSet<(usize, usize)>,
    /// (from, to): `from` cannot open a connection to `to`, while `to` can
    /// still reach `from` and connections already open carry on
    /// (asymmetric reachability: a firewall or a NAT in one direction).
    no_dial: BTreeSet<(usize, usize)>,
    /// What reached a cut, per receiving end (node, connection), in the
    /// order it was sent, with the receiver's process generation.
    stalled: BTreeMap<(usize, ConnId), VecDeque<(u32, Stalled)>>,
    /// Partitions begun so far (for the runs' statistics).
    pub partitions: u64,
    /// Processes that ended their chat (exit status 3) so far.
    pub chats_ended: u64,
}

/// Something held at a cut.
enum Stalled {
    Frame(Bytes),
    Closed(Option<String>),
}

impl Sim {
    pub fn new(seed: u64, hb: u64, net: NetConfig) -> Sim {
        let mut rng = Rng::new(seed);
        let session_base = rng.next() | 1;
        Sim {
            rng,
            now: 0,
            hb,
            net,
            nodes: Vec::new(),
            pipes: BTreeMap::new(),
            queue: BinaryHeap::new(),
            evs: BTreeMap::new(),
            next_ev: 0,
            check: Checker::default(),
            session_base,
            max_members: p2p_proto::limits::MAX_MEMBERS,
            create_if_alone: false,
            catch_up_bytes: 1 << 20,
            steps: 0,
            cuts: BTreeSet::new(),
            no_dial: BTreeSet::new(),
            stalled: BTreeMap::new(),
            partitions: 0,
            chats_ended: 0,
        }
    }

    fn schedule(&mut self, at: Millis, ev: Ev) {
        let id = self.next_ev;
        self.next_ev += 1;
        self.evs.insert(id, ev);
        self.queue.push(Reverse((at, id)));
    }

    fn delay(&mut self) -> Millis {
        let d = self.rng.range(0, self.net.delay_ms);
        if self.net.slow_percent > 0 && self.rng.chance(self.net.slow_percent) {
            d + self.rng.range(self.net.slow_ms / 2, self.net.slow_ms)
        } else {
            d
        }
    }

    fn config(&mut self, idx: usize, join: Vec<String>) -> CoreConfig {
        let node = &self.nodes[idx];
        let mut cfg = CoreConfig::new(node.name.clone(), node.addr.clone());
        cfg.heartbeat_ms = self.hb;
        cfg.session = self
            .session_base
            .wrapping_add(((idx as u64) << 20) + u64::from(node.inc));
        // A node that starts a chat gives it this id (each process its
        // own, as real nodes draw one at random).
        cfg.chat_id = format!("{:016x}{:016x}", self.session_base, cfg.session);
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&cfg.session.to_be_bytes());
        cfg.sign_seed = seed;
        cfg.join = join;
        cfg.replay = 20;
        cfg.keep = 1 << 20;
        cfg.max_members = self.max_members;
        cfg.create_if_alone = self.create_if_alone;
        cfg.catch_up_bytes = self.catch_up_bytes;
        cfg
    }

    /// Adds a node (a new address). Joins through `join` (addresses), or
    /// starts the chat when empty.
    pub fn spawn(&mut self, name: &str, join: Vec<String>) -> usize {
        let idx = self.nodes.len();
        self.nodes.push(SimNode {
            name: name.to_string(),
            addr: format!("10.0.0.{}:7000", idx + 1),
            inc: 0,
            core: None,
            paused: false,
            held: VecDeque::new(),
            next_inbound: 1,
            peers: BTreeSet::new(),
            clients: BTreeSet::new(),
            exit: None,
            seen_applied: 0,
            started: false,
            typed: 0,
        });
        self.boot(idx, join);
        idx
    }

    fn boot(&mut self, idx: usize, join: Vec<String>) {
        let cfg = self.config(idx, join);
        let core = Core::new(cfg, self.now);
        let n = &mut self.nodes[idx];
        n.core = Some(core);
        n.paused = false;
        n.held.clear();
        n.next_inbound = 1;
        n.peers.clear();
        n.clients.clear();
        n.exit = None;
        n.seen_applied = 0;
        n.started = false;
        let (inc, tick) = (n.inc, self.hb / 4);
        self.collect(idx);
        let at = self.now + 1 + self.rng.below(tick);
        self.schedule(at, Ev::Tick(idx, inc));
    }

    /// A new process at the same address, joining through every address.
    pub fn restart(&mut self, idx: usize) {
        assert!(!self.nodes[idx].alive());
        self.nodes[idx].inc += 1;
        let join: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != idx)
            .map(|(_, n)| n.addr.clone())
            .collect();
        self.boot(idx, join);
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// SIGKILL: connections close (some reset), the address refuses.
    pub fn kill(&mut self, idx: usize) {
        if self.nodes[idx].core.take().is_none() {
            return;
        }
        if trace() {
            eprintln!(
                "{:>6} {}#{} KILLED",
                self.now, self.nodes[idx].name, self.nodes[idx].inc
            );
        }
        self.check.died(idx, self.nodes[idx].inc);
        self.drop_conns(idx);
    }

    fn drop_conns(&mut self, idx: usize) {
        let mine: Vec<ConnId> = self
            .pipes
            .keys()
            .filter(|(n, _)| *n == idx)
            .map(|(_, c)| *c)
            .collect();
        let reset = self.rng.chance(self.net.reset_percent);
        for conn in mine {
            let Some(pipe) = self.pipes.remove(&(idx, conn)) else {
                continue;
            };
            let (peer, pinc, pconn) = pipe.peer;
            let at = pipe.last_at.max(self.now) + self.delay();
            if reset {
                // What was still in flight towards the peer is lost.
                if let Some(back) = self.pipes.get_mut(&(peer, pconn)) {
                    back.reset_at = Some(self.now);
                }
                let at = self.now + self.delay();
                self.schedule(at, Ev::Closed(peer, pinc, pconn, Some("connection reset".into())));
            } else {
                self.schedule(at, Ev::Closed(peer, pinc, pconn, None));
            }
            if let Some(back) = self.pipes.get_mut(&(peer, pconn)) {
                back.last_at = back.last_at.max(at);
            }
        }
        let n = &mut self.nodes[idx];
        n.peers.clear();
        n.clients.clear();
        n.held.clear();
        // Nobody will read what waits at a cut for the dead process.
        self.stalled.retain(|(n, _), _| *n != idx);
    }

    /// Cuts every node in `side` off from every node not in it (adding to
    /// the cuts already made).
    pub fn partition(&mut self, side: &[usize]) {
        if trace() {
            let names: Vec<&str> = side.iter().map(|i| self.nodes[*i].name.as_str()).collect();
            eprintln!("{:>6} PARTITION {names:?} from the rest", self.now);
        }
        self.partitions += 1;
        for a in side {
            for b in 0..self.nodes.len() {
                if !side.contains(&b) {
                    self.cuts.insert((*a.min(&b), *a.max(&b)));
                }
            }
        }
    }

    /// Cuts `a` off from `b` only (each still reaches everyone else).
    pub fn cut(&mut self, a: usize, b: usize) {
        if trace() {
            eprintln!(
                "{:>6} CUT {} / {}",
                self.now, self.nodes[a].name, self.nodes[b].name
            );
        }
        if a != b {
            self.partitions += 1;
            self.cuts.insert((a.min(b), a.max(b)));
        }
    }

    /// `from` can no longer open connections to `to` (until `heal`).
    pub fn block_dials(&mut self, from: usize, to: usize) {
        if trace() {
            eprintln!(
                "{:>6} NO DIAL {} -> {}",
                self.now, self.nodes[from].name, self.nodes[to].name
            );
        }
        if from != to {
            self.no_dial.insert((from, to));
        }
    }

    fn is_cut(&self, a: usize, b: usize) -> bool {
        self.cuts.contains(&(a.min(b), a.max(b)))
    }

    /// Removes every cut: what waited at one arrives now, in order per
    /// connection.
    pub fn heal(&mut self) {
        self.no_dial.clear();
        if self.cuts.is_empty() {
            return;
        }
        if trace() {
            eprintln!("{:>6} HEALED", self.now);
        }
        self.cuts.clear();
        let stalled = std::mem::take(&mut self.stalled);
        for ((idx, conn), held) in stalled {
            for (inc, what) in held {
                match what {
                    // The sender died and its connection reset meanwhile:
                    // what waited at the cut was still in flight, and is
                    // lost (as `fire` drops it without a cut).
                    Stalled::Frame(_)
                        if self.pipes.get(&(idx, conn)).is_some_and(|p| p.reset_at.is_some()) => {}
                    Stalled::Frame(b) => self.arrive(idx, inc, conn, b),
                    Stalled::Closed(reason) => self.closed(idx, inc, conn, reason),
                }
            }
        }
    }

    /// If `idx`'s end `conn` leads across a cut (or something before it on
    /// that connection waits at one), queues `what` there and says so.
    fn stall(&mut self, idx: usize, inc: u32, conn: ConnId, what: Stalled) -> Result<(), Stalled> {
        let across = match self.pipes.get(&(idx, conn)) {
            Some(p) => self.is_cut(idx, p.peer.0),
            None => false,
        };
        let key = (idx, conn);
        if across || self.stalled.contains_key(&key) {
            self.stalled.entry(key).or_default().push_back((inc, what));
            Ok(())
        } else {
            Err(what)
        }
    }

    pub fn pause(&mut self, idx: usize) {
        if trace() {
            eprintln!(
                "{:>6} {}#{} PAUSED",
                self.now, self.nodes[idx].name, self.nodes[idx].inc
            );
        }
        if self.nodes[idx].alive() {
            self.nodes[idx].paused = true;
        }
    }

    pub fn resume(&mut self, idx: usize) {
        let n = &mut self.nodes[idx];
        if !n.paused {
            return;
        }
        n.paused = false;
        if trace() {
            eprintln!("{:>6} {}#{} RESUMED", self.now, n.name, n.inc);
        }
        let held: Vec<Input> = n.held.drain(..).collect();
        let inc = n.inc;
        // After a pause the timer and the buffered sockets race.
        let tick_first = self.rng.chance(50);
        if tick_first {
            self.step(idx, Input::Tick);
        }
        for input in held {
            if !self.nodes[idx].alive() || self.nodes[idx].paused {
                break;
            }
            self.step(idx, input);
        }
        let at = self.now + self.hb / 4;
        self.schedule(at, Ev::Tick(idx, inc));
    }

    /// A line typed by the node's user; returns its text.
    pub fn say(&mut self, idx: usize) -> Option<String> {
        self.say_padded(idx, 0)
    }

    /// A line typed by the node's user, `pad` bytes longer than `say`'s.
    pub fn say_padded(&mut self, idx: usize, pad: usize) -> Option<String> {
        let n = &mut self.nodes[idx];
        if !n.alive() || n.paused {
            return None;
        }
        n.typed += 1;
        let text = format!("{}.{}.{}{}", n.name, n.inc, n.typed, ".".repeat(pad));
        self.check.typed(idx, n.inc, &text);
        self.step(idx, Input::User(text.clone()));
        Some(text)
    }

    pub fn quit(&mut self, idx: usize) {
        if self.nodes[idx].alive() && !self.nodes[idx].paused {
            self.step(idx, Input::Quit);
        }
    }

    /// The driver drops a member as a slow consumer (the coordinator side).
    pub fn drop_slow(&mut self, idx: usize) {
        if !self.nodes[idx].alive() || self.nodes[idx].paused {
            return;
        }
        let members: Vec<ConnId> = self.nodes[idx]
            .peers
            .iter()
            .chain(&self.nodes[idx].clients)
            .copied()
            .collect();
        if members.is_empty() {
            return;
        }
        let conn = members[self.rng.below(members.len() as u64) as usize];
        self.drop_conn_slow(idx, conn);
    }

    /// The driver of `idx` drops its connections to `member` as slow
    /// consumers: what it sends afterwards never reaches `member`.
    pub fn drop_slow_member(&mut self, idx: usize, member: usize) {
        if !self.nodes[idx].alive() || self.nodes[idx].paused {
            return;
        }
        let conns: Vec<ConnId> = self
            .pipes
            .iter()
            .filter(|((n, _), pipe)| *n == idx && pipe.peer.0 == member)
            .map(|((_, c), _)| *c)
            .collect();
        for conn in conns {
            self.drop_conn_slow(idx, conn);
        }
    }

    fn drop_conn_slow(&mut self, idx: usize, conn: ConnId) {
        self.close_pipe(idx, conn);
        self.step(
            idx,
            Input::Closed(conn, Some("disconnected (slow consumer: 1 bytes unread)".into())),
        );
    }

    /// Feeds one input and performs the outputs, then ends the batch.
    fn step(&mut self, idx: usize, input: Input) {
        let now = self.now;
        let Some(core) = self.nodes[idx].core.as_mut() else {
            return;
        };
        core.handle(now, input);
        self.steps += 1;
        self.collect(idx);
        if let Some(core) = self.nodes[idx].core.as_mut() {
            core.end_batch(now);
            self.collect(idx);
        }
    }

    fn collect(&mut self, idx: usize) {
        loop {
            let Some(core) = self.nodes[idx].core.as_mut() else {
                return;
            };
            let outs: Vec<Output> = core.drain().collect();
            if outs.is_empty() {
                break;
            }
            for out in outs {
                self.perform(idx, out);
            }
        }
        self.observe(idx);
    }

    fn perform(&mut self, idx: usize, out: Output) {
        let inc = self.nodes[idx].inc;
        match out {
            Output::Send(conn, b) => self.send(idx, conn, b),
            Output::Broadcast(group, b) => {
                let n = &self.nodes[idx];
                let mut to: Vec<ConnId> = Vec::new();
                if group != Group::Clients {
                    to.extend(&n.peers);
                }
                if group != Group::Peers {
                    to.extend(&n.clients);
                }
                to.sort_unstable();
                for conn in to {
                    self.send(idx, conn, b.clone());
                }
            }
            Output::JoinGroup(conn, group) => {
                if self.pipes.contains_key(&(idx, conn)) {
                    let n = &mut self.nodes[idx];
                    match group {
                        Group::Clients => n.clients.insert(conn),
                        _ => n.peers.insert(conn),
                    };
                }
            }
            Output::Close(conn) => self.close_pipe(idx, conn),
            Output::Dial { conn, addr, hello } => {
                let at = self.now + self.delay();
                self.schedule(at, Ev::Dial(idx, inc, conn, addr, hello));
            }
            Output::Notify { addr, frame } => {
                let at = self.now + self.delay();
                self.schedule(at, Ev::Notify(idx, addr, frame));
            }
            Output::Event(e) => {
                if trace() {
                    eprintln!("{:>6} {}#{} {:?}", self.now, self.nodes[idx].name, inc, e);
                }
                let chat = self.nodes[idx]
                    .core
                    .as_ref()
                    .map(|c| c.state.chat_id.clone())
                    .unwrap_or_default();
                self.check.event(idx, inc, &chat, self.now, &e)
            }
            Output::Exit(code) => {
                self.chats_ended += u64::from(code == 3);
                self.nodes[idx].exit = Some(code);
                self.nodes[idx].core = None;
                self.check.died(idx, inc);
                self.drop_conns_graceful(idx);
            }
        }
    }

    /// A process that exits closes its connections after what it sent.
    fn drop_conns_graceful(&mut self, idx: usize) {
        let mine: Vec<ConnId> = self
            .pipes
            .keys()
            .filter(|(n, _)| *n == idx)
            .map(|(_, c)| *c)
            .collect();
        for conn in mine {
            self.close_pipe(idx, conn);
        }
        let n = &mut self.nodes[idx];
        n.peers.clear();
        n.clients.clear();
        self.stalled.retain(|(n, _), _| *n != idx);
    }

    fn send(&mut self, idx: usize, conn: ConnId, b: Bytes) {
        let d = self.delay();
        let now = self.now;
        let Some(pipe) = self.pipes.get_mut(&(idx, conn)) else {
            return;
        };
        let at = (now + d).max(pipe.last_at);
        pipe.last_at = at;
        let (peer, pinc, pconn) = pipe.peer;
        self.schedule(at, Ev::Frame(peer, pinc, pconn, b));
    }

    /// Closes our side: the peer reads what was sent, then the close.
    fn close_pipe(&mut self, idx: usize, conn: ConnId) {
        let n = &mut self.nodes[idx];
        n.peers.remove(&conn);
        n.clients.remove(&conn);
        let Some(pipe) = self.pipes.remove(&(idx, conn)) else {
            return;
        };
        let (peer, pinc, pconn) = pipe.peer;
        let at = pipe.last_at.max(self.now) + self.delay();
        self.schedule(at, Ev::Closed(peer, pinc, pconn, None));
    }

    fn observe(&mut self, idx: usize) {
        let n = &mut self.nodes[idx];
        let Some(core) = &n.core else { return };
        let applied = core.log.applied();
        if applied > n.seen_applied || !n.started {
            let from = n.seen_applied + 1;
            let entries: Vec<(u64, Option<p2p_proto::Entry>)> = (from..=applied)
                .map(|s| (s, core.log.entry(s).cloned()))
                .collect();
            let (me, inc, chat) = (core.me.id, n.inc, core.state.chat_id.clone());
            if applied > 0 || n.started {
                n.started = true;
            }
            n.seen_applied = applied;
            self.check
                .delivered(idx, inc, &chat, me, &entries, core.log.gaps());
        }
    }

    /// Runs until `until` (simulated ms), performing scheduled events.
    pub fn run_until(&mut self, until: Millis) {
        while self.queue.peek().is_some_and(|Reverse((at, _))| *at <= until) {
            self.run_one();
        }
        self.now = self.now.max(until);
    }

    /// When the next scheduled event happens, if any.
    pub fn next_at(&self) -> Option<Millis> {
        self.queue.peek().map(|Reverse((at, _))| *at)
    }

    /// Performs the next scheduled event only (for scenarios that must act
    /// between two events); false if nothing is scheduled.
    pub fn run_one(&mut self) -> bool {
        let Some(Reverse((at, id))) = self.queue.pop() else {
            return false;
        };
        self.now = self.now.max(at);
        let ev = self.evs.remove(&id).expect("scheduled event");
        self.fire(ev);
        true
    }

    fn deliver(&mut self, idx: usize, inc: u32, input: Input) {
        let n = &mut self.nodes[idx];
        if n.inc != inc || !n.alive() {
            return;
        }
        if n.paused {
            n.held.push_back(input);
            return;
        }
        self.step(idx, input);
    }

    /// A frame reaches `idx`'s end `conn`.
    fn arrive(&mut self, idx: usize, inc: u32, conn: ConnId, b: Bytes) {
        if !self.pipes.contains_key(&(idx, conn)) {
            return; // closed here meanwhile
        }
        let frame = decode_body(&b[4..]).expect("cores only send valid frames");
        if trace_frames() {
            let from = self
                .pipes
                .get(&(idx, conn))
                .map_or("?", |p| self.nodes[p.peer.0].name.as_str());
            eprintln!(
                "{:>6} {from} -> {}#{inc}:{conn} {frame:?}",
                self.now, self.nodes[idx].name
            );
        }
        self.deliver(idx, inc, Input::Frame(conn, frame));
    }

    /// The other end of `idx`'s `conn` closed (or reset) it.
    fn closed(&mut self, idx: usize, inc: u32, conn: ConnId, reason: Option<String>) {
        // Our side of it is gone too.
        self.pipes.remove(&(idx, conn));
        let n = &mut self.nodes[idx];
        if n.inc == inc {
            n.peers.remove(&conn);
            n.clients.remove(&conn);
        }
        self.deliver(idx, inc, Input::Closed(conn, reason));
    }

    fn fire(&mut self, ev: Ev) {
        match ev {
            Ev::Frame(idx, inc, conn, b) => {
                match self.pipes.get(&(idx, conn)) {
                    // The connection is gone (closed here, or reset).
                    None => return,
                    Some(p) if p.reset_at.is_some_and(|r| r < self.now) => return,
                    Some(_) => {}
                }
                if let Err(Stalled::Frame(b)) = self.stall(idx, inc, conn, Stalled::Frame(b)) {
                    self.arrive(idx, inc, conn, b);
                }
            }
            Ev::Closed(idx, inc, conn, reason) => {
                if let Err(Stalled::Closed(reason)) = self.stall(idx, inc, conn, Stalled::Closed(reason)) {
                    self.closed(idx, inc, conn, reason);
                }
            }
            Ev::Refused(idx, inc, conn) => self.deliver(idx, inc, Input::Refused(conn)),
            Ev::Tick(idx, inc) => {
                let n = &self.nodes[idx];
                if n.inc != inc || !n.alive() || n.paused {
                    return; // a paused node's timer restarts on resume
                }
                self.step(idx, Input::Tick);
                let at = self.now + self.hb / 4;
                self.schedule(at, Ev::Tick(idx, inc));
            }
            Ev::Dial(idx, inc, conn, addr, hello) => {
                if self.nodes[idx].inc != inc || !self.nodes[idx].alive() {
                    return;
                }
                let cut = self
                    .nodes
                    .iter()
                    .position(|n| n.addr == addr)
                    .is_some_and(|peer| self.is_cut(idx, peer) || self.no_dial.contains(&(idx, peer)));
                if cut {
                    // No answer: the dial times out as the server's does.
                    let at = self.now + (10 * self.hb).max(500);
                    let reason = format!("timed out connecting to {addr}");
                    self.schedule(at, Ev::Closed(idx, inc, conn, Some(reason)));
                    return;
                }
                match self.nodes.iter().position(|n| n.addr == addr && n.alive()) {
                    Some(peer) => {
                        let pinc = self.nodes[peer].inc;
                        let pconn = self.nodes[peer].next_inbound;
                        self.nodes[peer].next_inbound += 1;
                        let now = self.now;
                        self.pipes.insert(
                            (idx, conn),
                            Pipe {
                                peer: (peer, pinc, pconn),
                                last_at: now,
                                reset_at: None,
                            },
                        );
                        self.pipes.insert(
                            (peer, pconn),
                            Pipe {
                                peer: (idx, inc, conn),
                                last_at: now,
                                reset_at: None,
                            },
                        );
                        self.send(idx, conn, hello);
                    }
                    None => {
                        let at = self.now + self.delay();
                        self.schedule(at, Ev::Refused(idx, inc, conn));
                    }
                }
            }
            Ev::Notify(from, addr, frame) => {
                let peer = self.nodes.iter().position(|n| n.addr == addr && n.alive());
                // Lost at a cut (or where it may not dial).
                if let Some(peer) =
                    peer.filter(|p| !self.is_cut(from, *p) && !self.no_dial.contains(&(from, *p)))
                {
                    let pinc = self.nodes[peer].inc;
                    let pconn = self.nodes[peer].next_inbound;
                    self.nodes[peer].next_inbound += 1;
                    let f = decode_body(&frame[4..]).expect("valid frame");
                    self.deliver(peer, pinc, Input::Frame(pconn, f));
                    self.deliver(peer, pinc, Input::Closed(pconn, None));
                }
            }
        }
    }

    // ---- views for tests ----

    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].alive()).collect()
    }

    pub fn healthy(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].alive() && !self.nodes[*i].paused)
            .collect()
    }

    pub fn coordinators(&self) -> Vec<usize> {
        self.live()
            .into_iter()
            .filter(|i| self.nodes[*i].core().role() == Role::Coordinator)
            .collect()
    }

    pub fn role(&self, idx: usize) -> Option<Role> {
        self.nodes[idx].core.as_ref().map(Core::role)
    }

    /// The current voters as the live coordinator (or any live node) sees them.
    pub fn voters(&self) -> Vec<u64> {
        let pick = self
            .coordinators()
            .into_iter()
            .next()
            .or_else(|| self.live().into_iter().next());
        pick.map(|i| self.nodes[i].core().tip.voters.clone())
            .unwrap_or_default()
    }

    /// Every live node knows the last voter change is in force.
    pub fn config_stable(&self) -> bool {
        self.live().iter().all(|i| {
            let c = self.nodes[*i].core();
            c.tip.voters_seq <= c.stable
        })
    }

    /// Node index of a live member id.
    pub fn node_of_id(&self, id: u64) -> Option<usize> {
        self.live()
            .into_iter()
            .find(|i| self.nodes[*i].core().me.id == id)
    }

    /// Delivered texts of a node, in order.
    pub fn texts(&self, idx: usize) -> Vec<String> {
        self.check.texts(idx, self.nodes[idx].inc)
    }

    pub fn pending(&self, idx: usize) -> usize {
        self.nodes[idx]
            .core
            .as_ref()
            .map(|c| c.pending.len())
            .unwrap_or(0)
    }

    pub fn events(&self, idx: usize) -> Vec<Event> {
        self.check.events(idx, self.nodes[idx].inc)
    }
}
