//! Liveness under load and under faults, against real processes: a join
//! storm must not starve the coordinator's heartbeats (no peer dropped, no
//! election); a member that reads slowly but steadily through a burst is
//! alive; a client cut off and re-admitted keeps its id (nothing twice);
//! a coordinator cut off by the network (`--cut-file`) is replaced, and
//! once the cut heals nothing typed on either side is lost or doubled;
//! and a short seeded torture run ends with no violation.

use std::time::{Duration, Instant};

use p2p_proto::Frame;

use crate::util::{wait_voters, Node, Raw, DEADLINE};

/// Failover issue, mechanism 8: 500 clients joining at once stretched the
/// coordinator's ping spacing past the detection timeout; it then dropped
/// members it had not pinged, and members elected a new coordinator.
#[test]
fn a_join_storm_of_500_clients_drops_no_peer_and_elects_nobody() {
    let _heavy = crate::util::heavy();
    // 200 ms: members give up after 600 ms of silence; the storm used to
    // stretch the coordinator's ping spacing to 0.3-2.1 s.
    let a = Node::join("alice", &["--history", "0", "--heartbeat-ms", "200"]);
    let b = Node::join("bob", &["--join", &a.addr]);
    let c = Node::join("carol", &["--join", &a.addr]);
    wait_voters(&[&a, &b, &c]);
    // Four threads open 125 connections each, prove the key and say hello
    // as fast as they can, then keep every connection open (and silent)
    // until the end.
    let addr = a.addr.clone();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for i in 0..125 {
                    let mut s = Raw::connect(&addr);
                    let hello = Frame::Hello {
                        version: p2p_proto::PROTOCOL_VERSION,
                        name: format!("storm{t}-{i}"),
                        session: p2p_proto::random_u64(),
                        addr: None,
                        resume: None,
                        sign_key: None,
                    };
                    s.send(&hello);
                    held.push(s);
                }
                held
            })
        })
        .collect();
    let held: Vec<Raw> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    a.wait_events("500 joined", 500, |e| {
        e["event"] == "joined" && e["name"].as_str().is_some_and(|n| n.starts_with("storm"))
    });
    // The silent clients are dropped after three heartbeats: let that pass
    // too, then look at what the peers saw during all of it.
    a.wait_events("the silent clients dropped", 500, |e| {
        e["event"] == "left" && e["name"].as_str().is_some_and(|n| n.starts_with("storm"))
    });
    drop(held);
    for n in [&b, &c] {
        assert!(
            !n.has_event(|e| e["event"] == "electing"),
            "{} lost the coordinator during the storm",
            n.name
        );
    }
    assert!(
        !a.has_event(|e| e["event"] == "unreachable"),
        "the coordinator stopped hearing a peer during the storm"
    );
    // And the chat still works.
    let mut b = b;
    b.say("after the storm");
    c.wait_message("after the storm");
}

/// Failover issue, mechanism 9: pings queue behind chat data, so a member
/// reading a burst as fast as it can was taken for dead.
#[test]
fn a_slow_reader_draining_a_burst_is_not_taken_for_dead() {
    let _heavy = crate::util::heavy();
    // A 300 ms heartbeat (900 ms of silence to be dropped); the burst takes
    // far longer than that to drain at the reader's pace, and is written
    // in far less, so without pings spaced in bytes the reader would meet
    // at most one or two.
    let mut a = Node::join(
        "alice",
        &[
            "--history",
            "0",
            "--heartbeat-ms",
            "300",
            "--queue-limit-bytes",
            "33554432",
        ],
    );
    let slow = Raw::hello(&a.addr, "slowpoke");
    a.wait_event("slowpoke joined", |e| {
        e["event"] == "joined" && e["name"] == "slowpoke"
    });
    const N: usize = 1500; // about 3 MB: within the 8 MiB queue limit
                           // The reader runs from the start: about 1.5 MB/s (32 KiB every 20 ms; a
                           // member must read 256 KiB per three heartbeats), answering pings as
                           // they come up in the stream, until every message is in.
    let reader = std::thread::spawn(move || {
        let mut slow = slow;
        let mut got = 0;
        let mut first: Option<Instant> = None;
        let start = Instant::now();
        while got < N {
            assert!(
                start.elapsed() < 2 * DEADLINE,
                "slowpoke read {got} of {N} messages"
            );
            // At most 32 KiB per call.
            let frames = match slow.read_ready() {
                Ok(f) => f,
                Err(e) => panic!("the coordinator cut slowpoke off after {got} of {N} messages: {e}"),
            };
            for f in frames {
                match f {
                    Frame::Chat(_) => {
                        got += 1;
                        first.get_or_insert_with(Instant::now);
                    }
                    Frame::Ping { nonce } => slow.send(&Frame::Pong { nonce }),
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(20)); // the slow reader's pace
        }
        // Handed back still connected: closing it here would make the
        // coordinator record slowpoke as left before the check below.
        (slow, first.map(|t| t.elapsed()).unwrap_or_default())
    });
    let text = "y".repeat(2000);
    for i in 0..N {
        a.say(&format!("{i} {text}"));
    }
    let (_still_connected, took) = reader.join().expect("the reader");
    assert!(
        took > Duration::from_millis(1200),
        "the burst did not outlast three heartbeats (900 ms): {took:?}"
    );
    assert!(
        !a.has_event(|e| e["event"] == "left" && e["name"] == "slowpoke"),
        "slowpoke was dropped while it read"
    );
}

/// Failover issue, mechanisms 6 and 7: a client re-admitted after being
/// cut off kept its messages' acknowledgements under a new id (a re-sent
/// message was delivered twice), and a client without a server was
/// counted as a voter (and reported dead when it was not).
#[test]
fn a_client_cut_off_and_readmitted_keeps_its_id_and_is_never_a_voter() {
    let a = Node::join("alice", &["--history", "0"]);
    let b = Node::join("bob", &["--join", &a.addr]);
    wait_voters(&[&a, &b]);
    let session = p2p_proto::random_u64();
    let hello = |resume: Option<p2p_proto::Resume>| Frame::Hello {
        version: p2p_proto::PROTOCOL_VERSION,
        name: "carol".into(),
        session,
        addr: None,
        resume,
        sign_key: None,
    };
    let mut c = Raw::connect(&a.addr);
    c.send(&hello(None));
    let Frame::Welcome { member_id, .. } = c.read_until("welcome", |f| matches!(f, Frame::Welcome { .. }))
    else {
        unreachable!()
    };
    c.send(&Frame::Say {
        text: "only once".into(),
        client_seq: 1,
    });
    b.wait_message("only once");
    // A client is never a voter.
    let Frame::Status { voters, .. } = a.status() else {
        unreachable!()
    };
    assert!(
        !voters.contains(&member_id),
        "client {member_id} counted as a voter: {voters:?}"
    );
    // Cut off before it saw its acknowledgement; it comes back with its
    // session and sends the message again, as the protocol says.
    drop(c);
    a.wait_event("carol gone", |e| e["event"] == "left" && e["name"] == "carol");
    let mut c = Raw::connect(&a.addr);
    c.send(&hello(Some(crate::util::resume_as(member_id))));
    let Frame::Welcome { member_id: again, .. } =
        c.read_until("welcome", |f| matches!(f, Frame::Welcome { .. }))
    else {
        unreachable!()
    };
    assert_eq!(again, member_id, "the same process keeps its id");
    c.send(&Frame::Say {
        text: "only once".into(),
        client_seq: 1,
    });
    c.send(&Frame::Say {
        text: "and then this".into(),
        client_seq: 2,
    });
    b.wait_message("and then this");
    let copies = b.messages().iter().filter(|m| m.2 == "only once").count();
    assert_eq!(
        copies, 1,
        "a message sent again after re-admission was delivered twice"
    );
}

/// Failover issue, partitions between real processes: the coordinator is
/// cut off from both other voters (both sides of the cut written, as
/// `p2pbench torture --partitions` does). The majority elects a new
/// coordinator and goes on; the old one cannot deliver what is typed into
/// it while cut off. Once healed, all three deliver one sequence holding
/// every line exactly once.
#[test]
fn a_coordinator_cut_off_by_the_network_is_replaced_and_nothing_is_lost_once_healed() {
    let _heavy = crate::util::heavy();
    let dir = crate::util::bin_dir().join(format!("p2p-cuts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the cut files");
    let file = |n: &str| dir.join(format!("{n}.cut"));
    let cut =
        |n: &str, addrs: &[&str]| std::fs::write(file(n), addrs.join("\n")).expect("writing a cut file");
    let node = |name: &str, join: Option<&str>| {
        let path = file(name);
        let mut args = vec![
            "--heartbeat-ms",
            "50",
            "--cut-file",
            path.to_str().expect("a UTF-8 path"),
        ];
        if let Some(j) = join {
            args.extend(["--join", j]);
        }
        Node::join(name, &args)
    };
    let mut a = node("alice", None);
    let b = node("bob", Some(&a.addr));
    let mut c = node("carol", Some(&a.addr));
    wait_voters(&[&a, &b, &c]);
    a.say("before the cut");
    c.wait_message("before the cut");

    cut("alice", &[&b.addr, &c.addr]);
    cut("bob", &[&a.addr]);
    cut("carol", &[&a.addr]);
    let took_over = |n: &Node| n.has_event(|e| e["event"] == "role" && e["role"] == "coordinator");
    crate::util::wait_until("bob or carol to take over", || {
        (took_over(&b) || took_over(&c)).then_some(())
    });
    // The cut is in force on both sides now (the majority gave up on alice).
    a.say("typed on the cut-off side");
    c.say("typed on the majority side");
    b.wait_message("typed on the majority side");
    assert!(
        !a.messages().iter().any(|m| m.2.starts_with("typed on")),
        "alice delivered across the cut: {:?}",
        a.messages()
    );

    for n in ["alice", "bob", "carol"] {
        cut(n, &[]);
    }
    for n in [&a, &b, &c] {
        n.wait_message("typed on the cut-off side");
        n.wait_message("typed on the majority side");
    }
    let seq = crate::util::assert_same_sequence(&[&a, &b, &c]);
    for text in [
        "before the cut",
        "typed on the cut-off side",
        "typed on the majority side",
    ] {
        let copies = seq.iter().filter(|m| m.2 == text).count();
        assert_eq!(copies, 1, "{text:?} delivered {copies} times: {seq:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// One-way cuts between real processes (`nodial` in a cut file, as
/// `p2pbench torture --one-way` writes): a newcomer that cannot open a
/// connection to the coordinator it is redirected to keeps trying (and
/// says so) instead of giving up at the first miss; once it can, it joins
/// and gets the history. The chat meanwhile goes on.
#[test]
fn a_newcomer_cut_off_one_way_from_the_coordinator_joins_once_it_can() {
    let _heavy = crate::util::heavy();
    let dir = crate::util::bin_dir().join(format!("p2p-one-way-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the cut file");
    let file = dir.join("dave.cut");
    let mut a = Node::join("alice", &["--heartbeat-ms", "100"]);
    let b = Node::join("bob", &["--heartbeat-ms", "100", "--join", &a.addr]);
    std::fs::write(&file, format!("nodial {}\n", a.addr)).expect("writing the cut file");
    let d = Node::start(
        "dave",
        &[
            "--heartbeat-ms",
            "100",
            "--join",
            &b.addr,
            "--cut-file",
            file.to_str().expect("a UTF-8 path"),
        ],
    );
    d.wait_event("the retry notice", |e| {
        e["event"] == "info"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("could not reach the chat's coordinator"))
    });
    assert!(
        !d.has_event(|e| e["event"] == "ready"),
        "dave joined across the cut: {:?}",
        d.events()
    );
    a.say("while dave waited");
    b.wait_message("while dave waited");

    std::fs::write(&file, "").expect("healing the cut");
    d.wait_event("ready", |e| e["event"] == "ready");
    d.wait_message("while dave waited");
    a.say("after dave joined");
    d.wait_message("after dave joined");
    crate::util::assert_same_sequence(&[&a, &b, &d]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A short run of the torture harness (seeded kills, hangs, restarts and
/// network partitions of real nodes, judged by its history checker); the long runs are in
/// docs/BENCHMARKS.md.
#[test]
fn a_short_torture_run_finds_no_violation() {
    let _heavy = crate::util::heavy();
    let out = std::process::Command::new(crate::util::bin("p2pbench"))
        .args([
            "torture",
            "--seed",
            "3",
            "--kills",
            "6",
            "--stops",
            "4",
            "--partitions",
            "4",
            "--one-way",
            "3",
            "--json",
        ])
        .env("P2PNODE_BIN", crate::util::bin("p2pnode"))
        .output()
        .expect("running p2pbench torture");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "torture printed no result ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "violations: {v}");
    assert_eq!(v["kills"], 6, "{v}");
    assert_eq!(v["stops"], 4, "{v}");
    assert_eq!(v["partitions"], 4, "{v}");
    assert_eq!(v["one_way"], 3, "{v}");
    assert!(
        v["messages"].as_u64() > Some(100),
        "the run typed too little: {v}"
    );
    for (k, n) in v["violations"].as_object().unwrap() {
        assert_eq!(n, 0, "{k}: {v}");
    }
}
