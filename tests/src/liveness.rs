//! Liveness under load, against real processes: a join storm must not
//! starve the coordinator's heartbeats (no peer dropped, no election), and
//! a member that reads slowly but steadily through a burst is alive.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use p2p_proto::{decode_body, encode, Frame};

use crate::util::{wait_voters, Node, Raw, DEADLINE};

/// Failover issue, mechanism 8: 500 clients joining at once stretched the
/// coordinator's ping spacing past the detection timeout; it then dropped
/// members it had not pinged, and members elected a new coordinator.
#[test]
fn a_join_storm_of_500_clients_drops_no_peer_and_elects_nobody() {
    let a = Node::join("alice", &["--history", "0"]);
    let b = Node::join("bob", &["--join", &a.addr]);
    let c = Node::join("carol", &["--join", &a.addr]);
    wait_voters(&[&a, &b, &c]);
    // Four threads open 125 connections each and say hello as fast as they
    // can, then keep every connection open (and silent) until the end.
    let addr = a.addr.clone();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for i in 0..125 {
                    let mut s = TcpStream::connect(&addr).expect("connecting");
                    let hello = Frame::Hello {
                        version: p2p_proto::PROTOCOL_VERSION,
                        name: format!("storm{t}-{i}"),
                        session: p2p_proto::random_u64(),
                        addr: None,
                        resume: None,
                    };
                    s.write_all(&encode(&hello)).expect("hello");
                    held.push(s);
                }
                held
            })
        })
        .collect();
    let held: Vec<TcpStream> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
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
    // The burst takes far longer than three heartbeats (300 ms) to drain at
    // the reader's pace.
    let mut a = Node::join("alice", &["--history", "0"]);
    let mut slow = Raw::hello(&a.addr, "slowpoke");
    a.wait_event("slowpoke joined", |e| {
        e["event"] == "joined" && e["name"] == "slowpoke"
    });
    let text = "y".repeat(2000);
    const N: usize = 1500; // about 3 MB: within the 8 MiB queue limit
    for i in 0..N {
        a.say(&format!("{i} {text}"));
    }
    // Read about 1.5 MB/s (32 KiB every 20 ms; a member must read 256 KiB
    // per three heartbeats), answering pings as they come up in the
    // stream, until every message is in.
    slow.stream.set_nonblocking(true).unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 32 * 1024];
    let mut got = 0;
    let start = Instant::now();
    while got < N {
        assert!(
            start.elapsed() < 2 * DEADLINE,
            "slowpoke read {got} of {N} messages"
        );
        match slow.stream.read(&mut chunk) {
            Ok(0) => panic!("the coordinator cut slowpoke off after {got} of {N} messages"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("slowpoke's connection failed after {got} messages: {e}"),
        }
        while buf.len() >= 4 {
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < 4 + len {
                break;
            }
            match decode_body(&buf[4..4 + len]).expect("valid frame") {
                Frame::Chat(_) => got += 1,
                Frame::Ping { nonce } => slow.send(&Frame::Pong { nonce }),
                _ => {}
            }
            buf.drain(..4 + len);
        }
        std::thread::sleep(Duration::from_millis(20)); // the slow reader's pace
    }
    assert!(
        start.elapsed() > Duration::from_millis(200),
        "the burst did not outlast three heartbeats"
    );
    assert!(
        !a.has_event(|e| e["event"] == "left" && e["name"] == "slowpoke"),
        "slowpoke was dropped while it read"
    );
}
