//! The trust boundary under attack (issue: the key): every case an outsider
//! or a rogue member tried against version 2's first cut, each asserting
//! that nothing was delivered, loaded, written or changed, and that the
//! node keeps serving.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use p2p_proto::secure::{self, ChatKey, SignKey};
use p2p_proto::{Chat, Entry, ErrorCode, Frame, MemberInfo, Resume, Seal, PROTOCOL_VERSION};

use crate::util::{
    assert_same_sequence, hello, resume_as, wait_until, wait_voters, Handshake, Node, Raw, DEADLINE,
};

fn expect_error(raw: &mut Raw, code: ErrorCode) -> String {
    let frame = raw.read_until("an error", |f| matches!(f, Frame::Error { .. }));
    let Frame::Error { code: got, message } = frame else {
        unreachable!()
    };
    assert_eq!(got, code, "{message}");
    wait_until("the node to close the connection", || raw.closed().then_some(()));
    message
}

fn rss_kib(node: &Node) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", node.pid()))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").parse().unwrap())
        })
        .unwrap()
}

fn announce(addr: &str) -> Frame {
    Frame::Announce {
        epoch: 1000,
        coordinator: MemberInfo {
            id: 999,
            name: "evil".into(),
            addr: Some(addr.into()),
            session: 5,
            sign_key: None,
        },
    }
}

fn member_id(node: &Node, name: &str) -> u64 {
    let Frame::Status { members, .. } = node.status() else {
        unreachable!()
    };
    members
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.id)
        .expect("a member of that name")
}

/// Case 1 and the interop cases: without the key, every frame — the
/// one-frame takeover, a resume as bob, a logger attach, a post, a status
/// request — gets `unauthenticated` and a close; a wrong key, a forged
/// proof and a replayed handshake are refused; memory stays flat.
#[test]
fn without_the_key_nothing_gets_in() {
    let a = Node::join("alice", &[]);
    let mut b = Node::join("bob", &["--join", &a.addr]);
    wait_voters(&[&a, &b]);
    let bob_id = member_id(&a, "bob");
    let target = std::env::temp_dir().join(format!("p2p-evil-{}", p2p_proto::random_u64()));
    let frames = [
        announce("127.0.0.1:9"),
        hello("bob", Some(resume_as(bob_id))),
        Frame::Attach {
            name: "logger".into(),
            config: format!(r#"{{"path":"{}"}}"#, target.display()),
        },
        Frame::Post {
            text: "outsider".into(),
        },
        Frame::StatusRequest { log: true },
        Frame::Say {
            text: "outsider".into(),
            client_seq: 1_000_000,
        },
    ];
    let before = rss_kib(&a);
    for round in 0..20 {
        for f in &frames {
            let mut raw = Raw::plain(&a.addr);
            raw.send(f);
            let m = expect_error(&mut raw, ErrorCode::Unauthenticated);
            if round == 0 {
                assert!(m.contains("chat key"), "{m}");
            }
        }
    }
    // Another key: the client finds out from the node's proof, and a
    // client that answers with a proof of its own making is refused.
    let other = ChatKey::generate();
    assert!(matches!(Raw::connect_with(&a.addr, &other), Handshake::WrongNode));
    let forged = Raw::send_proof(&a.addr, secure::random_bytes(), &secure::to_hex(&[7u8; 32]));
    assert!(
        matches!(&forged, Frame::Error { code: ErrorCode::Unauthenticated, message } if message.contains("another key")),
        "{forged:?}"
    );
    // A recorded handshake replayed: the node's fresh nonce makes the
    // old proof worthless.
    let (nonce, proof) = Raw::recorded_handshake(&a.addr);
    let replayed = Raw::send_proof(&a.addr, nonce, &proof);
    assert!(
        matches!(
            replayed,
            Frame::Error {
                code: ErrorCode::Unauthenticated,
                ..
            }
        ),
        "{replayed:?}"
    );
    // A keyed node refuses to join a chat it cannot prove itself to.
    let dir = std::env::temp_dir().join(format!("p2p-otherkey-{}", p2p_proto::random_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("k");
    secure::create_key_file(&key).unwrap();
    let mut carol = Node::spawn("carol", &["--join", &a.addr, "--key-file", key.to_str().unwrap()]);
    assert_eq!(carol.wait_exit().code(), Some(2));
    assert!(carol
        .has_event(|e| e["event"] == "error" && e["message"].as_str().unwrap().contains("another chat key")));
    let _ = std::fs::remove_dir_all(&dir);

    // Nothing changed: alice coordinates epoch 1, bob is still bob, no
    // file was written, nothing from outside was delivered.
    let Frame::Status { role, epoch, .. } = a.status() else {
        unreachable!()
    };
    assert_eq!((role, epoch), (p2p_proto::Role::Coordinator, 1));
    assert!(!target.exists(), "{} was written", target.display());
    b.say("bob is still bob");
    let m = a.wait_message("bob is still bob");
    assert_eq!(m["from_id"], bob_id);
    for n in [&a, &b] {
        assert!(!n.has_event(|e| e["text"] == "outsider"));
        assert!(!n.has_event(|e| e["event"] == "role" && e["epoch"] != 1));
    }
    // 120 refused connections cost nothing that stays.
    let after = rss_kib(&a);
    assert!(after < before + 4096, "RSS {before} KiB → {after} KiB");
}

/// Case 1 from a key holder: an announcement that the announced node does
/// not confirm (nothing listens there, or something that never answers)
/// changes nothing, not even for a moment.
#[test]
fn an_unconfirmed_announcement_changes_nothing() {
    let a = Node::join("alice", &[]);
    let mut b = Node::join("bob", &["--join", &a.addr]);
    let c = Node::join("carol", &["--join", &a.addr]);
    wait_voters(&[&a, &b, &c]);
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    for target in [&a, &b] {
        for addr in [&refused, &silent_addr] {
            let mut raw = Raw::connect(&target.addr);
            raw.send(&announce(addr));
            wait_until("the node to close the announcement", || {
                raw.closed().then_some(())
            });
        }
    }
    // Chat flows at once and for the next second, with no new epoch.
    let end = Instant::now() + Duration::from_millis(1000);
    let mut i = 0;
    while Instant::now() < end {
        b.say(&format!("still here {i}"));
        c.wait_message(&format!("still here {i}"));
        i += 1;
    }
    for n in [&a, &b, &c] {
        assert!(
            !n.has_event(|e| e["event"] == "electing" || (e["event"] == "role" && e["epoch"] != 1)),
            "{} changed its mind",
            n.name
        );
    }
    drop(silent);
}

/// Case 2: a key holder cannot be bob. Bob's name is taken while he is
/// here; bob's id in a resume without bob's session secret makes a new
/// member, never bob; and bob keeps talking as bob.
#[test]
fn nobody_can_come_back_as_someone_else() {
    let a = Node::join("alice", &[]);
    let mut b = Node::join("bob", &["--join", &a.addr]);
    wait_voters(&[&a, &b]);
    let bob_id = member_id(&a, "bob");
    // bob's public session id is in the member list; it proves nothing.
    let Frame::Status { members, .. } = a.status() else {
        unreachable!()
    };
    let bob_public = members.iter().find(|m| m.id == bob_id).unwrap().session;
    for session in [p2p_proto::random_u64(), bob_public] {
        let mut raw = Raw::connect(&a.addr);
        let Frame::Hello {
            version,
            name,
            addr,
            resume,
            sign_key,
            ..
        } = hello("bob", Some(resume_as(bob_id)))
        else {
            unreachable!()
        };
        raw.send(&Frame::Hello {
            version,
            name,
            session,
            addr,
            resume,
            sign_key,
        });
        expect_error(&mut raw, ErrorCode::NameTaken);
    }
    // Another name with bob's id: admitted as someone new.
    let mut raw = Raw::connect(&a.addr);
    raw.send(&hello("mallory", Some(resume_as(bob_id))));
    let Frame::Welcome { member_id, .. } = raw.read_until("welcome", |f| matches!(f, Frame::Welcome { .. }))
    else {
        unreachable!()
    };
    assert_ne!(member_id, bob_id);
    raw.send(&Frame::Say {
        text: "i am bob".into(),
        client_seq: 1_000_000,
    });
    let m = a.wait_message("i am bob");
    assert_eq!(
        (m["from"].as_str(), m["from_id"].as_u64()),
        (Some("mallory"), Some(member_id))
    );
    // bob was never cut off, and his next message (client_seq 1, far
    // below mallory's) is delivered.
    b.say("the real bob");
    let m = a.wait_message("the real bob");
    assert_eq!(m["from_id"], bob_id);
    assert!(!b.has_event(|e| e["event"] == "electing" || e["event"] == "error"));
}

/// Cases 3, 4 and 6: plugins and fields from a key holder are bounded.
/// The logger writes only inside the data directory; a config that is
/// null, not an object, or too long is refused; a huge address or an
/// invalid post gets an error; none of it changes what newcomers get.
#[test]
fn plugins_and_fields_are_bounded_and_confined() {
    let data = std::env::temp_dir().join(format!("p2p-hostile-data-{}", p2p_proto::random_u64()));
    std::fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::symlink("/tmp", data.join("out")).unwrap();
    let a = Node::join("alice", &["--data-dir", data.to_str().unwrap()]);
    let outside = std::env::temp_dir().join(format!("p2p-evil-{}", p2p_proto::random_u64()));
    let refused: Vec<(String, String, &str)> = vec![
        (
            "logger".into(),
            format!(r#"{{"path":"{}"}}"#, outside.display()),
            "not absolute",
        ),
        ("logger".into(), r#"{"path":"../../evil.jsonl"}"#.into(), "'..'"),
        (
            "logger".into(),
            r#"{"path":"out/evil.jsonl"}"#.into(),
            "symbolic link",
        ),
        ("moderation".into(), "null".into(), "JSON object"),
        ("moderation".into(), "[1,2]".into(), "JSON object"),
        (
            "moderation".into(),
            format!(r#"{{"banned":["{}"]}}"#, "x".repeat(20_000)),
            "the limit is",
        ),
    ];
    for (name, config, why) in &refused {
        let mut raw = Raw::connect(&a.addr);
        raw.send(&Frame::Attach {
            name: name.clone(),
            config: config.clone(),
        });
        let m = expect_error(&mut raw, ErrorCode::PluginRefused);
        assert!(m.contains(why), "{name} {config:.60}: {m}");
    }
    assert!(!outside.exists());
    assert!(!std::path::Path::new("/tmp/evil.jsonl").exists());
    // A huge address, an address that is not host:port, invalid text.
    for addr in ["x".repeat(100_000), "not an address".into()] {
        let mut raw = Raw::connect(&a.addr);
        raw.send(&Frame::Hello {
            version: PROTOCOL_VERSION,
            name: "wide".into(),
            session: 1,
            addr: Some(addr),
            resume: None,
            sign_key: Some(SignKey::from_seed([1; 32]).public_hex()),
        });
        expect_error(&mut raw, ErrorCode::BadField);
    }
    let mut raw = Raw::connect(&a.addr);
    raw.send(&Frame::Post {
        text: "two\nlines".into(),
    });
    let m = expect_error(&mut raw, ErrorCode::BadField);
    assert!(m.contains("not posted"), "{m}");
    // A resume with more voter sets than a chat has, or sets longer than
    // its voters can be.
    for voters in [vec![vec![1]; 3], vec![(1..=8).collect()]] {
        let mut raw = Raw::connect(&a.addr);
        raw.send(&Frame::Hello {
            version: PROTOCOL_VERSION,
            name: "voters".into(),
            session: 1,
            addr: None,
            resume: Some(p2p_proto::Resume {
                member_id: 1,
                epoch: 1,
                voters,
                ..Default::default()
            }),
            sign_key: None,
        });
        let m = expect_error(&mut raw, ErrorCode::BadField);
        assert!(m.contains("resume.voters"), "{m}");
    }
    // A peer without a signing key cannot join (it could coordinate).
    let mut raw = Raw::connect(&a.addr);
    raw.send(&Frame::Hello {
        version: PROTOCOL_VERSION,
        name: "keyless".into(),
        session: 1,
        addr: Some("127.0.0.1:9".into()),
        resume: None,
        sign_key: None,
    });
    expect_error(&mut raw, ErrorCode::BadField);
    // The chat is as it was: no plugin, and a newcomer joins.
    let Frame::Status { plugins, members, .. } = a.status() else {
        unreachable!()
    };
    assert!(plugins.is_empty(), "{plugins:?}");
    assert_eq!(members.len(), 1);
    let b = Node::join("bob", &["--join", &a.addr]);
    b.wait_event("ready", |e| e["event"] == "ready" && e["members"] == 2);
    let _ = std::fs::remove_dir_all(&data);
}

/// A member of the chat, driven by hand: it joins as a peer with a
/// signing key, follows the log (computing its chain hash), answers
/// pings and acknowledges what seals cover, so it becomes a voter.
struct Mallory {
    raw: Raw,
    id: u64,
    session: u64,
    sign: SignKey,
    chat_id: String,
    /// Chain hash through each seq seen.
    chain: BTreeMap<u64, [u8; 32]>,
}

impl Mallory {
    fn hello(&self, resume: Option<Resume>) -> Frame {
        Frame::Hello {
            version: PROTOCOL_VERSION,
            name: "mallory".into(),
            session: self.session,
            addr: Some("127.0.0.1:9".into()),
            resume,
            sign_key: Some(self.sign.public_hex()),
        }
    }

    fn join(addr: &str) -> Mallory {
        let sign = SignKey::from_seed(secure::random_bytes());
        let mut m = Mallory {
            raw: Raw::connect(addr),
            id: 0,
            session: p2p_proto::random_u64(),
            sign,
            chat_id: String::new(),
            chain: BTreeMap::new(),
        };
        let h = m.hello(None);
        m.raw.send(&h);
        m
    }

    /// Handles what the coordinator sends until `done` says stop.
    fn follow(&mut self, mut done: impl FnMut(&Mallory) -> bool) {
        let end = Instant::now() + DEADLINE;
        while !done(self) {
            assert!(Instant::now() < end, "mallory timed out following the chat");
            let frames = self.raw.read_ready().expect("mallory's connection");
            if frames.is_empty() {
                std::thread::sleep(Duration::from_millis(2));
            }
            for f in frames {
                match f {
                    Frame::Welcome {
                        member_id,
                        base,
                        chain,
                        chat_id,
                        ..
                    } => {
                        self.id = member_id;
                        self.chat_id = chat_id;
                        let h = secure::hash_from_hex(&chain.expect("a welcome chain")).unwrap();
                        self.chain.insert(base, h);
                    }
                    Frame::Ping { nonce } => self.raw.send(&Frame::Pong { nonce }),
                    Frame::Seal(s) => self.raw.send(&Frame::Ack { seq: s.seq }),
                    other => {
                        if let Ok(e) = other.into_entry() {
                            let prev = self.chain[&(e.seq() - 1)];
                            self.chain.insert(e.seq(), secure::chain_next(&prev, &e));
                        }
                    }
                }
            }
        }
    }
}

/// Case 5: a voter that claims to be ahead answers the new coordinator's
/// `sync_request` with invented messages "from carol" and "from alice",
/// hashed correctly and sealed as if alice (the coordinator of that
/// epoch) had signed them. The seal does not verify: the candidate drops
/// mallory's vote, wins with the others, and nobody delivers a word of it.
#[test]
fn a_member_cannot_forge_history_in_a_sync() {
    let _heavy = crate::util::heavy();
    let a = Node::join("alice", &[]);
    let b = Node::join("bob", &["--join", &a.addr]);
    let c = Node::join("carol", &["--join", &a.addr]);
    let d = Node::join("dave", &["--join", &a.addr]);
    wait_voters(&[&a, &b, &c, &d]);
    let mut m = Mallory::join(&a.addr);
    // Mallory acknowledges until it is one of the five voters.
    m.follow(|m| {
        m.id != 0 && {
            let Frame::Status { voters, stable, .. } = a.status() else {
                unreachable!()
            };
            stable && voters.contains(&m.id)
        }
    });
    let (alice_id, carol_id) = (member_id(&a, "alice"), member_id(&a, "carol"));
    let mut b = b;
    b.say("before the fall");
    a.wait_message("before the fall");
    m.follow(|m| {
        m.chain
            .keys()
            .last()
            .is_some_and(|s| *s >= a.entry_seqs().last().copied().unwrap_or(0))
    });
    // Dave hangs and alice dies: bob cannot win without mallory's vote.
    d.signal(Signal::SIGSTOP);
    a.signal(Signal::SIGKILL);
    // Mallory votes for bob, claiming to be far ahead, and answers the
    // sync with forgeries.
    let end = Instant::now() + DEADLINE;
    let mut forged_sent = false;
    'vote: while Instant::now() < end {
        let Ok(mut raw) = std::panic::catch_unwind(|| Raw::connect(&b.addr)) else {
            continue;
        };
        let resume = Resume {
            member_id: m.id,
            epoch: 1,
            commit: 0,
            log_epoch: 1,
            last_seq: 1_000_000,
            vote: Some(2),
            min_epoch: 2,
            dead: vec![alice_id],
            chat: String::new(),
            voters: Vec::new(),
        };
        raw.send(&m.hello(Some(resume.clone())));
        while let Ok(f) = raw.read() {
            match f {
                Frame::Revote { epoch } => raw.send(&m.hello(Some(Resume {
                    vote: Some(epoch),
                    min_epoch: epoch,
                    ..resume.clone()
                }))),
                Frame::SyncRequest { from, .. } => {
                    let mut chain = m.chain[&(from - 1)];
                    let mut entries = Vec::new();
                    for (i, (who, id)) in [("carol", carol_id), ("alice", alice_id)].into_iter().enumerate() {
                        let e = Entry::Chat(Chat {
                            epoch: 1,
                            seq: from + i as u64,
                            from: who.into(),
                            from_id: id,
                            client_seq: 900 + i as u64,
                            text: format!("forged {who}"),
                            bot: None,
                        });
                        chain = secure::chain_next(&chain, &e);
                        entries.push(e);
                    }
                    let seq = from + 1;
                    raw.send(&Frame::Sync {
                        entries,
                        seal: None,
                        chain: None,
                    });
                    raw.send(&Frame::Sync {
                        entries: Vec::new(),
                        seal: Some(Seal {
                            epoch: 1,
                            seq,
                            hash: secure::to_hex(&chain),
                            // Signed by mallory, claimed as alice's.
                            sig: m.sign.seal(&m.chat_id, 1, seq, &chain),
                            signer: alice_id,
                        }),
                        chain: None,
                    });
                    forged_sent = true;
                }
                Frame::Welcome { .. } => break 'vote,
                _ => {}
            }
        }
        if forged_sent {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(forged_sent, "bob never asked mallory for its log");
    // Bob dropped mallory's vote: it waits for another voter.
    wait_until("bob to wait for a majority again", || {
        let Frame::Status { waiting, .. } = b.status() else {
            unreachable!()
        };
        waiting.filter(|w| w.contains("2 of 5 agree")).map(|_| ())
    });
    assert!(!b.has_event(|e| e["event"] == "role" && e["role"] == "coordinator"));
    // Dave returns: bob wins with carol and dave; the chat goes on;
    // nobody delivered the forgeries.
    d.signal(Signal::SIGCONT);
    b.wait_event("bob coordinates", |e| {
        e["event"] == "role" && e["role"] == "coordinator"
    });
    b.say("after the fall");
    for n in [&b, &c, &d] {
        n.wait_message("after the fall");
        assert!(!n.has_event(|e| e["text"].as_str().is_some_and(|t| t.starts_with("forged"))));
    }
    assert_same_sequence(&[&b, &c, &d]);
}
