//! One peer driven frame by frame through the case the simulator found
//! (seeds 3848, 4721, 5568 and 6126 of the slow-network runner): a new
//! coordinator welcomes a peer below what the peer can prove, and may die
//! before sending those entries again. The peer's proof must not go
//! backwards, and it must still be able to hand the entries over.

use p2p_proto::secure::{chain_next, to_hex, CHAIN_START};
use p2p_proto::{Chat, Entry, Frame, MemberInfo, Seal};

use super::state::ChatState;
use super::*;

const CHAT: &str = "00000000000000000000000000000000";

fn member(id: u64, name: &str) -> MemberInfo {
    MemberInfo {
        id,
        name: name.into(),
        addr: Some(format!("10.0.0.{id}:7000")),
        session: id,
        sign_key: Some("ab".repeat(32)),
    }
}

fn chat(epoch: u64, seq: u64, text: &str) -> Entry {
    Entry::Chat(Chat {
        epoch,
        seq,
        from: "c".into(),
        from_id: 1,
        client_seq: seq,
        text: text.into(),
        bot: None,
    })
}

/// A peer driven by hand, and the chain of the log it was sent.
struct Peer {
    core: Core,
    conn: ConnId,
    now: Millis,
}

impl Peer {
    /// A peer that joined through the coordinator (member 1) of epoch 1.
    fn joined() -> Peer {
        let mut cfg = CoreConfig::new("v", "10.0.0.2:7000");
        cfg.join = vec!["10.0.0.1:7000".into()];
        cfg.chat_id = CHAT.into();
        let mut core = Core::new(cfg, 0);
        let conn = dialled(&mut core);
        let mut p = Peer { core, conn, now: 0 };
        p.welcome(1, 1, 0, 0, 0, CHAIN_START);
        p
    }

    fn feed(&mut self, frame: Frame) {
        self.now += 1;
        self.core.handle(self.now, Input::Frame(self.conn, frame));
    }

    fn end_batch(&mut self) -> Vec<Frame> {
        self.core.end_batch(self.now);
        self.sent()
    }

    /// Frames the peer sent on its uplink since the last look.
    fn sent(&mut self) -> Vec<Frame> {
        let conn = self.conn;
        self.core
            .drain()
            .filter_map(|o| match o {
                Output::Send(c, b) if c == conn => Some(decode(&b)),
                _ => None,
            })
            .collect()
    }

    fn welcome(&mut self, epoch: u64, coordinator: u64, base: u64, commit: u64, start: u64, chain: [u8; 32]) {
        self.feed(Frame::Welcome {
            member_id: 2,
            epoch,
            coordinator,
            base,
            commit,
            stable: 0,
            heartbeat_ms: 100,
            chat_id: CHAT.into(),
            chain: Some(to_hex(&chain)),
            start,
            quiet: 0,
        });
        let mut state = ChatState::new_chat(CHAT.into(), member(1, "c"), Vec::new());
        for (id, name) in [(2, "v"), (3, "w")] {
            state.apply(&Entry::Joined {
                epoch: 1,
                seq: 0,
                member: member(id, name),
            });
        }
        for f in state.to_frames(commit, true) {
            self.feed(f);
        }
    }

    fn seal(&mut self, epoch: u64, signer: u64, seq: u64, chain: [u8; 32]) {
        self.feed(Frame::Seal(Seal {
            epoch,
            seq,
            hash: to_hex(&chain),
            sig: "00".repeat(64),
            signer,
        }));
    }

    /// What the peer would report in a resume.
    fn proof(&self) -> (u64, u64) {
        let r = self.core.resume(None);
        (r.log_epoch, r.last_seq)
    }

    /// Loses the coordinator and is welcomed back through a new connection
    /// (to the coordinator we lost, who answers as the new reign).
    fn reconnect(&mut self) {
        self.now += 1;
        self.core.handle(self.now, Input::Closed(self.conn, None));
        self.conn = dialled(&mut self.core);
    }
}

fn dialled(core: &mut Core) -> ConnId {
    core.drain()
        .filter_map(|o| match o {
            Output::Dial { conn, .. } => Some(conn),
            _ => None,
        })
        .last()
        .expect("the peer dialled")
}

fn decode(b: &bytes::Bytes) -> Frame {
    let body = p2p_proto::split_frame(
        &mut bytes::BytesMut::from(&b[..]),
        p2p_proto::limits::MAX_FRAME_LEN,
    )
    .expect("a whole frame")
    .expect("a frame");
    p2p_proto::decode_body(&body).expect("a valid frame")
}

/// Sends entries and returns the chain through the last one.
fn send(p: &mut Peer, mut chain: [u8; 32], entries: &[Entry]) -> [u8; 32] {
    for e in entries {
        chain = chain_next(&chain, e);
        p.feed(e.clone().into_frame());
    }
    chain
}

fn old_log() -> Vec<Entry> {
    (1..=10).map(|s| chat(1, s, &format!("m{s}"))).collect()
}

/// The peer holds 1..=10 of epoch 1, sealed and acknowledged, and has
/// delivered 1..=3; then coordinator 3 of epoch 2, which took over with a
/// log through 10, welcomes it at base 3.
fn welcomed_below_its_proof() -> (Peer, Vec<[u8; 32]>) {
    let mut p = Peer::joined();
    let log = old_log();
    let mut chains = vec![CHAIN_START];
    for e in &log {
        let prev = *chains.last().expect("a chain");
        chains.push(chain_next(&prev, e));
    }
    send(&mut p, CHAIN_START, &log);
    p.seal(1, 1, 10, chains[10]);
    assert!(p.end_batch().contains(&Frame::Ack { seq: 10 }));
    p.feed(Frame::Commit { seq: 3, stable: 0 });
    assert_eq!(p.proof(), (1, 10));
    p.reconnect();
    p.welcome(2, 3, 3, 3, 10, chains[3]);
    (p, chains)
}

#[test]
fn a_welcome_below_the_proof_does_not_take_it_away() {
    let (p, _) = welcomed_below_its_proof();
    assert_eq!(p.proof(), (1, 10), "the proof went backwards at the welcome");
}

#[test]
fn entries_set_aside_are_handed_to_the_next_candidate() {
    let (mut p, chains) = welcomed_below_its_proof();
    // The new coordinator dies before sending 4..=10 again; the next
    // candidate asks for them.
    p.sent();
    p.feed(Frame::SyncRequest { from: 4, to: 10 });
    let mut got = Vec::new();
    let mut seal = None;
    for f in p.sent() {
        if let Frame::Sync { entries, seal: s, .. } = f {
            got.extend(entries);
            seal = seal.or(s);
        }
    }
    assert_eq!(got, old_log()[3..].to_vec());
    let seal = seal.expect("the proof comes with the entries");
    assert_eq!((seal.epoch, seal.seq, seal.hash), (1, 10, to_hex(&chains[10])));
}

#[test]
fn a_seal_inside_the_new_starting_log_paces_but_does_not_replace_the_proof() {
    let (mut p, chains) = welcomed_below_its_proof();
    let log = old_log();
    send(&mut p, chains[3], &log[3..6]);
    p.seal(2, 3, 6, chains[6]);
    assert!(
        p.end_batch().contains(&Frame::Ack { seq: 6 }),
        "the catch-up goes on"
    );
    assert_eq!(p.proof(), (1, 10));
    // The rest comes again, then an entry of epoch 2 and its seal: now
    // the new reign's proof covers everything the old one did.
    let next = chat(2, 11, "new");
    let mut rest = log[6..].to_vec();
    rest.push(next);
    let through = send(&mut p, chains[6], &rest);
    p.seal(2, 3, 11, through);
    assert!(p.end_batch().contains(&Frame::Ack { seq: 11 }));
    assert_eq!(p.proof(), (2, 11));
}

#[test]
fn a_different_log_from_the_new_coordinator_keeps_the_old_proof_backed() {
    let (mut p, chains) = welcomed_below_its_proof();
    // Coordinator 3 took over a log that parts from ours at 5.
    let theirs = [chat(1, 4, "m4"), chat(1, 5, "other")];
    let through = send(&mut p, chains[3], &theirs);
    p.seal(2, 3, 5, through);
    p.end_batch();
    assert_eq!(
        p.proof(),
        (1, 10),
        "nothing of epoch 2 proves a log through its start yet"
    );
    p.sent();
    p.feed(Frame::SyncRequest { from: 4, to: 10 });
    let got: Vec<Entry> = p
        .sent()
        .into_iter()
        .flat_map(|f| match f {
            Frame::Sync { entries, .. } => entries,
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(
        got,
        old_log()[3..].to_vec(),
        "the entries the proof covers, not the new ones"
    );
}
