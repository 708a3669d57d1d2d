//! Whole clusters of cores on a simulated network: deterministic, no
//! sockets, no sleeps. Time only moves when a test says so.

use std::collections::{HashMap, HashSet, VecDeque};

use p2p_proto::{decode_body, ErrorCode, Frame, Role};

use super::*;

const HB: u64 = 100;

struct Node {
    core: Core,
    addr: String,
    group: HashSet<ConnId>,
    events: Vec<Event>,
    exit: Option<i32>,
    dead: bool,
    /// Hung (SIGSTOP): inputs wait here until `cont`.
    stopped: Option<Vec<Input>>,
}

#[derive(Default)]
struct Sim {
    nodes: Vec<Node>,
    /// (node, conn) → (peer node, peer conn)
    links: HashMap<(usize, ConnId), (usize, ConnId)>,
    queue: VecDeque<(usize, Input)>,
    now: Millis,
    next_inbound: u64,
}

fn chat_texts(events: &[Event]) -> Vec<(u64, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message { chat, .. } => Some((chat.seq, format!("{}:{}", chat.from, chat.text))),
            _ => None,
        })
        .collect()
}

impl Sim {
    fn addr_of(&self, addr: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr == addr)
    }

    fn spawn(&mut self, name: &str, join: &[usize]) -> usize {
        let idx = self.nodes.len();
        let mut cfg = CoreConfig::new(name, format!("n{idx}"));
        cfg.heartbeat_ms = HB;
        cfg.join = join.iter().map(|j| self.nodes[*j].addr.clone()).collect();
        let core = Core::new(cfg, self.now);
        self.nodes.push(Node {
            core,
            addr: format!("n{idx}"),
            group: HashSet::new(),
            events: Vec::new(),
            exit: None,
            dead: false,
            stopped: None,
        });
        self.collect(idx);
        self.run();
        idx
    }

    fn input(&mut self, node: usize, input: Input) {
        self.queue.push_back((node, input));
    }

    fn say(&mut self, node: usize, text: &str) {
        self.input(node, Input::User(text.into()));
        self.run();
    }

    /// Delivers queued inputs until nothing moves.
    fn run(&mut self) {
        let mut steps = 0;
        while let Some((node, input)) = self.queue.pop_front() {
            steps += 1;
            assert!(steps < 100_000, "simulation does not settle");
            let n = &mut self.nodes[node];
            if n.dead {
                continue;
            }
            if let Some(buf) = &mut n.stopped {
                buf.push(input);
                continue;
            }
            n.core.handle(self.now, input);
            self.collect(node);
        }
    }

    /// Advances time by `ms`, ticking every node every tick.
    fn advance(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.now += HB / 4;
            for i in 0..self.nodes.len() {
                self.input(i, Input::Tick);
            }
            self.run();
        }
    }

    fn close_link(&mut self, node: usize, conn: ConnId) {
        self.nodes[node].group.remove(&conn);
        if let Some((peer, pconn)) = self.links.remove(&(node, conn)) {
            self.links.remove(&(peer, pconn));
            self.nodes[peer].group.remove(&pconn);
            self.queue.push_back((peer, Input::Closed(pconn, None)));
        }
    }

    fn deliver(&mut self, node: usize, conn: ConnId, bytes: &[u8]) {
        if let Some(&(peer, pconn)) = self.links.get(&(node, conn)) {
            let frame = decode_body(&bytes[4..]).expect("cores only send valid frames");
            self.queue.push_back((peer, Input::Frame(pconn, frame)));
        }
    }

    fn collect(&mut self, node: usize) {
        let outs: Vec<Output> = self.nodes[node].core.drain().collect();
        for out in outs {
            match out {
                Output::Send(conn, b) => self.deliver(node, conn, &b),
                Output::Broadcast(b) => {
                    let mut group: Vec<_> = self.nodes[node].group.iter().copied().collect();
                    group.sort_unstable();
                    for conn in group {
                        self.deliver(node, conn, &b);
                    }
                }
                Output::Attach(conn) => {
                    self.nodes[node].group.insert(conn);
                }
                Output::Close(conn) => self.close_link(node, conn),
                Output::Dial { conn, addr, hello } => match self.addr_of(&addr) {
                    Some(peer) if !self.nodes[peer].dead => {
                        self.next_inbound += 1;
                        let pconn = self.next_inbound;
                        self.links.insert((node, conn), (peer, pconn));
                        self.links.insert((peer, pconn), (node, conn));
                        self.deliver(node, conn, &hello);
                    }
                    _ => self
                        .queue
                        .push_back((node, Input::Closed(conn, Some("refused".into())))),
                },
                Output::Notify { addr, frame } => {
                    if let Some(peer) = self.addr_of(&addr).filter(|p| !self.nodes[*p].dead) {
                        self.next_inbound += 1;
                        let f = decode_body(&frame[4..]).unwrap();
                        self.queue.push_back((peer, Input::Frame(self.next_inbound, f)));
                    }
                }
                Output::Event(e) => self.nodes[node].events.push(e),
                Output::Exit(code) => self.nodes[node].exit = Some(code),
            }
        }
    }

    /// SIGKILL: every connection of the node closes at once.
    fn kill(&mut self, node: usize) {
        self.nodes[node].dead = true;
        let conns: Vec<ConnId> = self
            .links
            .keys()
            .filter(|(n, _)| *n == node)
            .map(|(_, c)| *c)
            .collect();
        for conn in conns {
            self.close_link(node, conn);
        }
        self.run();
    }

    fn stop(&mut self, node: usize) {
        self.nodes[node].stopped = Some(Vec::new());
    }

    fn cont(&mut self, node: usize) {
        if let Some(buf) = self.nodes[node].stopped.take() {
            for input in buf {
                self.queue.push_front((node, input));
            }
        }
        self.run();
    }

    fn texts(&self, node: usize) -> Vec<(u64, String)> {
        chat_texts(&self.nodes[node].events)
    }

    fn coordinators(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| !self.nodes[*i].dead && self.nodes[*i].core.role() == Role::Coordinator)
            .collect()
    }

    fn assert_agree(&self, nodes: &[usize]) -> Vec<(u64, String)> {
        let first = self.texts(nodes[0]);
        for (i, (seq, _)) in first.iter().enumerate() {
            assert_eq!(
                *seq,
                i as u64 + 1,
                "node {} has a gap or duplicate: {first:?}",
                nodes[0]
            );
        }
        for n in &nodes[1..] {
            assert_eq!(self.texts(*n), first, "node {n} disagrees with node {}", nodes[0]);
        }
        first
    }
}

fn cluster(n: usize) -> Sim {
    let mut sim = Sim::default();
    sim.spawn("n0", &[]);
    for i in 1..n {
        // Join through the previous node: exercises redirects.
        sim.spawn(&format!("n{i}"), &[i - 1]);
    }
    sim
}

#[test]
fn joins_through_any_peer_and_everyone_sees_one_order() {
    let mut sim = cluster(3);
    assert_eq!(sim.coordinators(), vec![0]);
    for i in 0..3 {
        assert_eq!(sim.nodes[i].core.members().len(), 3, "node {i} member list");
    }
    sim.say(1, "a");
    sim.say(2, "b");
    sim.say(0, "c");
    let seq = sim.assert_agree(&[0, 1, 2]);
    assert_eq!(seq.len(), 3);
    assert_eq!(seq[0].1, "n1:a");
}

#[test]
fn sender_identity_comes_from_the_connection() {
    let mut sim = cluster(2);
    sim.say(1, "hello");
    let Event::Message { chat, .. } = sim.nodes[0]
        .events
        .iter()
        .rev()
        .find(|e| matches!(e, Event::Message { .. }))
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!(chat.from, "n1");
    assert_eq!(chat.from_id, sim.nodes[1].core.me.id);
}

#[test]
fn coordinator_kill_elects_earliest_survivor_and_loses_nothing() {
    let mut sim = cluster(4);
    sim.say(2, "before");
    sim.kill(0);
    assert_eq!(sim.coordinators(), vec![1]);
    assert_eq!(sim.nodes[1].core.epoch(), 2);
    sim.say(3, "after");
    let seq = sim.assert_agree(&[1, 2, 3]);
    assert_eq!(
        seq.iter().map(|s| s.1.as_str()).collect::<Vec<_>>(),
        vec!["n2:before", "n3:after"]
    );
}

#[test]
fn messages_typed_during_failover_are_resent_exactly_once() {
    let mut sim = cluster(3);
    // n2's message reaches the coordinator, which sequences it, but the
    // copies are still queued when it dies: nobody gets them.
    sim.input(2, Input::User("in flight".into()));
    let (node, input) = sim.queue.pop_front().unwrap();
    sim.nodes[node].core.handle(sim.now, input);
    sim.collect(node);
    sim.queue.clear(); // the say never left n2's socket buffer
    sim.kill(0);
    sim.say(2, "typed while electing");
    sim.advance(HB * 5);
    let seq = sim.assert_agree(&[1, 2]);
    assert_eq!(
        seq.iter().map(|s| s.1.as_str()).collect::<Vec<_>>(),
        vec!["n2:in flight", "n2:typed while electing"]
    );
    assert!(sim.nodes[2].core.pending.is_empty());
}

#[test]
fn furthest_ahead_survivor_fills_the_gap_without_duplicates() {
    let mut sim = cluster(4);
    sim.say(1, "m1");
    // The coordinator sequences m2 from n3 and its broadcast reaches only n3.
    sim.input(3, Input::User("m2".into()));
    let (node, input) = sim.queue.pop_front().unwrap();
    sim.nodes[node].core.handle(sim.now, input);
    sim.collect(node);
    let (n, input) = sim.queue.pop_front().unwrap();
    assert_eq!(n, 0);
    sim.nodes[0].core.handle(sim.now, input);
    sim.collect(0);
    sim.queue.retain(|(n, _)| *n == 3);
    sim.kill(0);
    sim.advance(HB * 5);
    let seq = sim.assert_agree(&[1, 2, 3]);
    assert_eq!(
        seq.iter().map(|s| s.1.as_str()).collect::<Vec<_>>(),
        vec!["n1:m1", "n3:m2"]
    );
    // n3 re-sent m2 (never acknowledged to it? it was) — either way one copy.
    sim.say(2, "m3");
    assert_eq!(sim.assert_agree(&[1, 2, 3]).len(), 3);
}

#[test]
fn killing_coordinator_and_successor_hands_over_to_the_next() {
    let mut sim = cluster(4);
    sim.say(3, "x");
    sim.nodes[1].dead = true; // dies silently first…
    sim.kill(0); // …then the coordinator goes
    let conns: Vec<ConnId> = sim
        .links
        .keys()
        .filter(|(n, _)| *n == 1)
        .map(|(_, c)| *c)
        .collect();
    for c in conns {
        sim.close_link(1, c);
    }
    sim.run();
    sim.advance(HB * 10);
    assert_eq!(sim.coordinators(), vec![2]);
    sim.say(3, "y");
    let seq = sim.assert_agree(&[2, 3]);
    assert_eq!(seq.len(), 2);
    assert_eq!(sim.nodes[2].core.members().len(), 2);
}

#[test]
fn hung_coordinator_is_replaced_and_steps_down_when_it_wakes() {
    let mut sim = cluster(3);
    sim.say(1, "before");
    sim.stop(0);
    sim.advance(HB * 2);
    assert_eq!(
        sim.coordinators(),
        vec![0],
        "two heartbeats are not enough to declare death"
    );
    sim.advance(HB * 3);
    assert!(sim.coordinators().contains(&1));
    assert_eq!(sim.nodes[1].core.epoch(), 2);
    sim.say(2, "after");
    sim.cont(0);
    sim.advance(HB * 4);
    assert_eq!(sim.coordinators(), vec![1], "the old coordinator stepped down");
    assert_eq!(sim.nodes[0].core.role(), Role::Member);
    assert_eq!(sim.nodes[0].core.epoch(), 2);
    sim.say(0, "back");
    let seq = sim.assert_agree(&[0, 1, 2]);
    assert_eq!(
        seq.iter().map(|s| s.1.as_str()).collect::<Vec<_>>(),
        vec!["n1:before", "n2:after", "n0:back"]
    );
    // Nobody stayed with epoch 1.
    for i in 0..3 {
        assert_eq!(sim.nodes[i].core.epoch(), 2);
    }
}

#[test]
fn hung_member_is_removed_after_three_missed_heartbeats() {
    let mut sim = cluster(3);
    sim.stop(2);
    sim.advance(HB * 2);
    assert_eq!(sim.nodes[0].core.members().len(), 3);
    sim.advance(HB * 2);
    assert_eq!(sim.nodes[0].core.members().len(), 2);
    assert!(sim.nodes[1].events.iter().any(|e| matches!(e,
        Event::Left { name, reason, .. } if name == "n2" && reason.contains("missed 3 heartbeats"))));
}

#[test]
fn last_survivor_becomes_coordinator_and_admits_newcomers() {
    let mut sim = cluster(2);
    sim.kill(0);
    assert_eq!(sim.coordinators(), vec![1]);
    let n = sim.spawn("late", &[1]);
    assert_eq!(sim.nodes[n].core.role(), Role::Member);
    sim.say(n, "hi");
    sim.assert_agree(&[1, n]);
}

#[test]
fn joining_through_a_fresh_coordinator_works() {
    let mut sim = cluster(3);
    sim.kill(0);
    let n = sim.spawn("late", &[2]); // n2 redirects to the new coordinator n1
    assert_eq!(sim.nodes[n].core.members().len(), 3);
    assert_eq!(sim.nodes[n].core.epoch(), 2);
}

#[test]
fn taken_name_is_refused_clearly() {
    let mut sim = cluster(2);
    let n = sim.spawn("n1", &[0]);
    assert_eq!(sim.nodes[n].exit, Some(2));
    assert!(sim.nodes[n].events.iter().any(|e| matches!(e,
        Event::Error { code: Some(ErrorCode::NameTaken), message } if message.contains("n1"))));
    assert_eq!(sim.nodes[0].core.members().len(), 2);
}

#[test]
fn newcomer_gets_recent_history() {
    let mut sim = cluster(1);
    for i in 0..5 {
        sim.say(0, &format!("m{i}"));
    }
    let n = sim.spawn("late", &[0]);
    let replayed = sim.nodes[n]
        .events
        .iter()
        .filter(|e| matches!(e, Event::Message { replay: true, .. }))
        .count();
    assert_eq!(replayed, 5);
    sim.assert_agree(&[0, n]);
}

#[test]
fn repeated_failovers_keep_agreement() {
    let mut sim = cluster(5);
    let mut alive: Vec<usize> = (0..5).collect();
    for round in 0..3 {
        for &n in &alive {
            sim.input(n, Input::User(format!("r{round} from {n}")));
        }
        sim.run();
        let coord = sim.coordinators()[0];
        sim.kill(coord);
        alive.retain(|n| *n != coord);
        sim.advance(HB * 5);
    }
    let seq = sim.assert_agree(&alive);
    assert_eq!(seq.len(), 5 + 4 + 3);
}

#[test]
fn clean_coordinator_quit_hands_over_at_once() {
    let mut sim = cluster(3);
    sim.input(0, Input::User("/quit".into()));
    sim.run();
    assert_eq!(sim.nodes[0].exit, Some(0));
    assert_eq!(sim.coordinators(), vec![1]);
    assert!(sim.nodes[2]
        .events
        .iter()
        .any(|e| matches!(e, Event::Left { name, reason, .. } if name == "n0" && reason == "left")));
}

#[test]
fn duplicate_resend_is_dropped_by_client_seq() {
    let mut sim = cluster(2);
    sim.say(1, "once");
    // A re-send with an old client_seq (as after a failover) is ignored.
    let uplink = match &sim.nodes[1].core.state {
        State::Member(u) => u.conn,
        _ => panic!("n1 should be a member"),
    };
    let (peer, pconn) = sim.links[&(1, uplink)];
    sim.input(
        peer,
        Input::Frame(
            pconn,
            Frame::Say {
                text: "once".into(),
                client_seq: 1,
            },
        ),
    );
    sim.run();
    assert_eq!(sim.assert_agree(&[0, 1]).len(), 1);
}

#[test]
fn a_member_cut_off_by_the_coordinator_rejoins_instead_of_taking_over() {
    // n1 is first in line; being dropped (slow consumer) must not make it
    // think the coordinator died and seize the chat.
    let mut sim = cluster(3);
    sim.say(2, "m1");
    let (&(_, conn), _) = sim
        .links
        .iter()
        .find(|((n, _), (peer, _))| *n == 0 && *peer == 1)
        .unwrap();
    sim.input(
        0,
        Input::Closed(conn, Some("disconnected (slow consumer)".into())),
    );
    sim.close_link(0, conn);
    sim.run();
    sim.advance(HB * 5);
    assert_eq!(sim.coordinators(), vec![0]);
    assert!((0..3).all(|i| sim.nodes[i].core.epoch() == 1));
    assert_eq!(sim.nodes[1].core.role(), Role::Member);
    assert_eq!(sim.nodes[0].core.members().len(), 3, "n1 is back");
    sim.say(1, "m2");
    sim.assert_agree(&[0, 1, 2]);
}

#[test]
fn a_resume_that_beats_the_successors_own_detection_still_converges() {
    // n2 learns of the coordinator's death first and asks n1 to take over
    // while n1 still hears the coordinator: n1 answers coordinator_alive.
    let mut sim = cluster(3);
    sim.say(2, "before");
    sim.nodes[0].dead = true;
    let link_to = |sim: &Sim, peer: usize| {
        *sim.links
            .iter()
            .find(|((n, _), (p, _))| *n == 0 && *p == peer)
            .map(|((_, c), _)| c)
            .unwrap()
    };
    let c2 = link_to(&sim, 2);
    sim.close_link(0, c2);
    sim.run();
    assert!(
        sim.nodes[2]
            .events
            .iter()
            .any(|e| matches!(e, Event::Electing { .. })),
        "n2 noticed first"
    );
    assert_eq!(
        sim.nodes[1].core.role(),
        Role::Member,
        "n1 refused: it still hears the coordinator"
    );
    // Now n1 notices too.
    let c1 = link_to(&sim, 1);
    sim.close_link(0, c1);
    sim.run();
    sim.advance(HB * 2);
    assert_eq!(sim.coordinators(), vec![1]);
    assert_eq!(sim.nodes[2].core.role(), Role::Member);
    assert_eq!(sim.nodes[2].core.epoch(), 2);
    sim.say(2, "after");
    let seq = sim.assert_agree(&[1, 2]);
    assert_eq!(seq.len(), 2);
}
