//! p2pnode behaviour against real processes: joining, ordering, failover,
//! hangs, membership changes, names and clean exits.

use std::thread;

use nix::sys::signal::Signal;
use p2p_proto::{Frame, PROTOCOL_VERSION};

use crate::util::{assert_same_sequence, wait_voters, Node, Raw};

fn join_args(addrs: &[&Node]) -> Vec<String> {
    vec![
        "--join".into(),
        addrs.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(","),
    ]
}

fn node(name: &str, via: &[&Node]) -> Node {
    let args = join_args(via);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Node::join(name, &args)
}

#[test]
fn joins_direct_and_redirected_share_one_order_and_who() {
    let mut a = Node::join("alice", &[]);
    let mut b = node("bob", &[&a]);
    let mut c = node("carol", &[&b]); // bob is not coordinator: redirected
    let ready = c.wait_event("ready", |e| e["event"] == "ready");
    assert_eq!(ready["coordinator"], "alice");
    assert_eq!(ready["members"], 3);
    a.wait_event("carol joined", |e| e["event"] == "joined" && e["name"] == "carol");

    for (n, text) in [(&mut a, "one"), (&mut b, "two"), (&mut c, "three")] {
        n.say(text);
    }
    for n in [&a, &b, &c] {
        n.wait_message("three");
        n.wait_message("one");
        n.wait_message("two");
    }
    let seq = assert_same_sequence(&[&a, &b, &c]);
    assert_eq!(seq.len(), 3);
    // Every sender got its own message back (its acknowledgement).
    for n in [&a, &b, &c] {
        assert!(seq.iter().any(|m| m.1 == n.name));
    }

    c.say("/who");
    let who = c.wait_event("who", |e| e["event"] == "who");
    let names: Vec<&str> = who["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["alice", "bob", "carol"]);
    assert_eq!(who["coordinator"], who["members"][0]["id"]);
}

#[test]
fn sender_cannot_spoof_from() {
    let a = Node::join("alice", &[]);
    let mut raw = Raw::hello(&a.addr, "mallory");
    raw.send_body(br#"{"type":"say","text":"i am alice","client_seq":1,"from":"alice","from_id":1}"#);
    let ev = a.wait_message("i am alice");
    assert_eq!(ev["from"], "mallory");
    let echoed = raw.read_until("own message", |f| matches!(f, Frame::Chat(_)));
    let Frame::Chat(chat) = echoed else { unreachable!() };
    assert_eq!(&*chat.from, "mallory");
    assert_eq!(chat.client_seq, 1);
}

#[test]
fn human_output_is_plain_lines() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    // In a directory of its own: the node starting a chat creates its key
    // file there and says so.
    let dir = std::env::temp_dir().join(format!("p2p-human-{}", p2p_proto::random_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(crate::util::bin("p2pnode"))
        .args(["--name", "alice", "--listen", "127.0.0.1:0"])
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "hello there").unwrap();
    writeln!(stdin, "/help").unwrap();
    writeln!(stdin, "/who").unwrap();
    writeln!(stdin, "//shrug is not a command").unwrap();
    writeln!(stdin, "/quit").unwrap();
    // Read in a thread: a node that never exits fails the deadline below
    // instead of hanging the suite.
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let status = crate::util::wait_until("alice to exit", || child.try_wait().ok().flatten());
    assert!(status.success());
    let lines = reader.join().unwrap();
    assert!(
        lines[0].starts_with("* created the chat key p2pchat.key (id "),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("* alice listening on 127.0.0.1:") && lines[1].contains("--join 127.0.0.1:"),
        "the port it picked is shown: {lines:?}"
    );
    assert!(lines[2].starts_with("* started a new chat as alice"), "{lines:?}");
    let key = p2p_proto::secure::read_key_file(&dir.join("p2pchat.key")).expect("a private key file");
    assert!(lines[0].contains(&key.id()), "{lines:?}");
    assert!(lines.contains(&"alice: hello there".to_string()), "{lines:?}");
    assert!(
        lines.contains(&"alice: /shrug is not a command".to_string()),
        "// sends a line that begins with /: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("* type a line to send it") && l.contains("/quit")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("* members: alice (coordinator)")),
        "{lines:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn coordinator_sigkill_loses_and_duplicates_nothing() {
    // The default heartbeat: a SIGKILL is detected by the refused
    // connection, not by missed heartbeats, and a slow CI machine must not
    // depose anyone by accident.
    let a = Node::join("alice", &[]);
    let mut b = node("bob", &[&a]);
    let mut c = node("carol", &[&a]);
    let mut d = node("dave", &[&a]);
    wait_voters(&[&a, &b, &c, &d]);
    // Traffic from every survivor while the coordinator dies.
    let writer = thread::spawn(move || {
        for i in 0..60 {
            c.say(&format!("c{i}"));
            if i == 20 {
                a.signal(Signal::SIGKILL);
            }
            thread::sleep(std::time::Duration::from_millis(2));
        }
        (a, c)
    });
    for i in 0..40 {
        d.say(&format!("d{i}"));
        b.say(&format!("b{i}"));
    }
    let (_a, c) = writer.join().unwrap();
    for n in [&b, &c, &d] {
        n.wait_message("c59");
        n.wait_message("d39");
        n.wait_message("b39");
        n.wait_event("new coordinator bob", |e| {
            e["event"] == "role" && e["coordinator"] == "bob" && e["epoch"].as_u64() >= Some(2)
        });
    }
    // Wait for the complete set on everyone, then compare.
    for n in [&b, &c, &d] {
        crate::util::wait_until("all 140 messages", || (n.messages().len() >= 140).then_some(()));
    }
    let seq = assert_same_sequence(&[&b, &c, &d]);
    let mut texts: Vec<&str> = seq.iter().map(|m| m.2.as_str()).collect();
    assert_eq!(texts.len(), 140, "every message exactly once");
    texts.sort_unstable();
    texts.dedup();
    assert_eq!(texts.len(), 140, "no duplicates");
    // Per-sender order is kept.
    let cs: Vec<&str> = seq
        .iter()
        .filter(|m| m.1 == "carol")
        .map(|m| m.2.as_str())
        .collect();
    let expected: Vec<String> = (0..60).map(|i| format!("c{i}")).collect();
    assert_eq!(cs, expected.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn coordinator_and_successor_killed_together() {
    let a = Node::join("alice", &[]);
    let b = node("bob", &[&a]);
    let mut c = node("carol", &[&a]);
    let d = node("dave", &[&a]);
    let e = node("erin", &[&a]);
    wait_voters(&[&a, &b, &c, &d, &e]);
    // Two of five die at once: the three others are still a majority.
    a.signal(Signal::SIGKILL);
    b.signal(Signal::SIGKILL);
    for n in [&c, &d, &e] {
        n.wait_event("carol takes over", |e| {
            e["event"] == "role" && e["coordinator"] == "carol"
        });
    }
    c.say("still here");
    d.wait_message("still here");
    e.wait_message("still here");
    assert_same_sequence(&[&c, &d, &e]);
}

#[test]
fn hung_coordinator_is_replaced_and_rejoins_after_sigcont() {
    let mut a = Node::join("alice", &[]);
    let b = node("bob", &[&a]);
    let mut c = node("carol", &[&a]);
    wait_voters(&[&a, &b, &c]);
    c.say("before");
    b.wait_message("before");
    a.signal(Signal::SIGSTOP);
    for n in [&b, &c] {
        n.wait_event("bob elected", |e| {
            e["event"] == "role" && e["coordinator"] == "bob" && e["epoch"].as_u64() >= Some(2)
        });
    }
    c.say("during");
    b.wait_message("during");
    a.signal(Signal::SIGCONT);
    // She learns of the new reign and follows it; she never left the chat
    // (a paused voter stays one), so nobody sees her leave or join.
    a.wait_event("alice steps down", |e| {
        e["event"] == "role"
            && e["role"] == "member"
            && e["coordinator"] == "bob"
            && e["epoch"].as_u64() >= Some(2)
    });
    a.say("back");
    for n in [&b, &c] {
        n.wait_message("back");
    }
    a.wait_message("back");
    // alice delivers the message sent while she hung, exactly once.
    a.wait_message("during");
    assert_same_sequence(&[&a, &b, &c]);
}

#[test]
fn killed_members_leave_and_hung_ones_stay_voters_until_they_return() {
    let a = Node::join("alice", &[]);
    let b = node("bob", &[&a]);
    let c = node("carol", &[&a]);
    let mut d = node("dave", &[&a]);
    wait_voters(&[&a, &b, &c, &d]);
    c.signal(Signal::SIGKILL);
    for n in [&a, &b] {
        // Its address refuses connections: proven gone, it leaves.
        n.wait_event("carol disconnected", |e| {
            e["event"] == "left"
                && e["name"] == "carol"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("disconnected"))
        });
    }
    wait_voters(&[&a, &b, &d]);
    d.signal(Signal::SIGSTOP);
    // A hung process may be back any moment with what it holds: it is
    // reported, not removed, and the others carry on (two of three).
    a.wait_event("dave unreachable", |e| {
        e["event"] == "unreachable"
            && e["name"] == "dave"
            && e["reason"].as_str().unwrap().contains("missed 3 heartbeats")
    });
    let mut b = b;
    b.say("while dave hangs");
    a.wait_message("while dave hangs");
    d.signal(Signal::SIGCONT);
    d.wait_message("while dave hangs");
    d.say("dave is back");
    a.wait_message("dave is back");
    assert!(!a.has_event(|e| e["event"] == "left" && e["name"] == "dave"));
    // A hung client (no server, no vote) is removed after three heartbeats.
    let raw = Raw::hello(&a.addr, "idle");
    raw.stream.set_read_timeout(None).unwrap();
    a.wait_event("idle joined", |e| e["event"] == "joined" && e["name"] == "idle");
    a.wait_event("idle removed", |e| {
        e["event"] == "left"
            && e["name"] == "idle"
            && e["reason"].as_str().unwrap().contains("missed 3 heartbeats")
    });
}

#[test]
fn last_survivor_leads_and_admits_newcomers() {
    let a = Node::join("alice", &[]);
    let b = node("bob", &[&a]);
    wait_voters(&[&a, &b]);
    // Two voters, one left: alice's address refuses, so she is proven
    // gone and bob alone is enough.
    a.signal(Signal::SIGKILL);
    b.wait_event("bob alone", |e| {
        e["event"] == "role" && e["role"] == "coordinator"
    });
    let mut c = node("carol", &[&b]);
    let ready = c.wait_event("ready", |e| e["event"] == "ready");
    assert_eq!(ready["coordinator"], "bob");
    c.say("hi bob");
    b.wait_message("hi bob");
}

#[test]
fn joining_through_a_just_elected_coordinator() {
    let a = Node::join("alice", &[]);
    let b = node("bob", &[&a]);
    let c = node("carol", &[&a]);
    wait_voters(&[&a, &b, &c]);
    a.signal(Signal::SIGKILL);
    b.wait_event("bob leads", |e| e["event"] == "role" && e["coordinator"] == "bob");
    // Through the new coordinator, and through a member that redirects to it.
    let d = node("dave", &[&b]);
    let e = node("erin", &[&c]);
    for n in [&d, &e] {
        assert_eq!(
            n.wait_event("ready", |e| e["event"] == "ready")["coordinator"],
            "bob"
        );
    }
}

#[test]
fn taken_name_is_refused() {
    let a = Node::join("alice", &[]);
    let _b = node("bob", &[&a]);
    let mut dup = Node::start("bob", &["--join", &a.addr]);
    let err = dup.wait_event("refusal", |e| e["event"] == "error");
    assert_eq!(err["code"], "name_taken");
    assert!(err["message"].as_str().unwrap().contains("bob"));
    assert_eq!(dup.wait_exit().code(), Some(2));
}

#[test]
fn newcomer_receives_recent_history() {
    let mut a = Node::join("alice", &["--history", "3"]);
    for i in 0..5 {
        a.say(&format!("h{i}"));
    }
    a.wait_message("h4");
    let b = node("bob", &[&a]);
    let replayed = b.wait_events("3 replayed", 3, |e| {
        e["event"] == "message" && e["replay"] == true
    });
    let texts: Vec<&str> = replayed.iter().map(|e| e["text"].as_str().unwrap()).collect();
    assert_eq!(texts, vec!["h2", "h3", "h4"]);
}

#[test]
fn join_tries_each_peer_and_fails_clearly_when_none_answers() {
    // A port that was free a moment ago: nobody listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let a = Node::join("alice", &[]);
    let b = Node::join("bob", &["--join", &format!("{dead},{}", a.addr)]);
    assert_eq!(
        b.wait_event("ready", |e| e["event"] == "ready")["coordinator"],
        "alice"
    );

    let mut lonely = Node::start("carol", &["--join", &dead]);
    let err = lonely.wait_event("error", |e| e["event"] == "error");
    assert!(err["message"].as_str().unwrap().contains(&dead));
    assert_eq!(lonely.wait_exit().code(), Some(2));

    let alone = Node::join("dave", &["--join", &dead, "--create-if-alone"]);
    assert_eq!(
        alone.wait_event("ready", |e| e["event"] == "ready")["created"],
        true
    );
}

/// Addresses are checked before anything starts: an empty `--join` entry
/// (an unset variable) used to start a chat of its own instead of
/// joining, and every failure to listen was blamed on another node.
#[test]
fn bad_addresses_are_refused_before_anything_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let cases: [(&[&str], &str); 5] = [
        (&["--join", ""], "--join holds an empty address"),
        (&["--join", "127.0.0.1:7101,"], "--join holds an empty address"),
        (&["--join", "not an address"], "is not host:port"),
        (&["--listen", &taken], "the port is in use"),
        (&["--listen", "127.0.0.1:99999"], "give --listen HOST:PORT"),
    ];
    for (args, want) in cases {
        let out = std::process::Command::new(crate::util::bin("p2pnode"))
            .args(["--name", "z", "--insecure", "--headless"])
            .args(args)
            .output()
            .expect("running p2pnode");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(1) && err.contains(want) && out.stdout.is_empty(),
            "{args:?}: {out:?}"
        );
    }
}

#[test]
fn quit_and_ctrl_c_leave_cleanly() {
    let a = Node::join("alice", &[]);
    let mut b = node("bob", &[&a]);
    let mut c = node("carol", &[&a]);
    c.wait_event("ready", |e| e["event"] == "ready");
    b.say("/quit");
    assert!(b.wait_exit().success());
    a.wait_event("bob left", |e| {
        e["event"] == "left" && e["name"] == "bob" && e["reason"] == "left"
    });
    c.signal(Signal::SIGINT);
    assert!(c.wait_exit().success(), "ctrl-c exits 0");
    assert_eq!(c.stderr_after_exit(), "", "no error text on ctrl-c");
    a.wait_event("carol left", |e| {
        e["event"] == "left" && e["name"] == "carol" && e["reason"] == "left"
    });
    assert!(
        a.stray_lines().is_empty(),
        "json mode prints only json: {:?}",
        a.stray_lines()
    );
}

#[test]
fn observers_get_status_without_joining() {
    let a = Node::join("alice", &[]);
    let b = node("bob", &[&a]);
    b.wait_event("ready", |e| e["event"] == "ready");
    let mut raw = Raw::connect(&b.addr);
    raw.send(&Frame::StatusRequest { log: true });
    let status = raw.read_until("status", |f| matches!(f, Frame::Status { .. }));
    let Frame::Status {
        name,
        role,
        epoch,
        coordinator,
        members,
        log,
        last_seq,
        ..
    } = status
    else {
        unreachable!()
    };
    // The digest lists what bob delivered, newest last.
    let log = log.expect("asked for the log");
    assert!(!log.is_empty(), "bob delivered at least his own join");
    assert_eq!(log.last().map(|row| row.0), Some(last_seq));
    assert!(log.iter().any(|row| row.3 == "joined"), "{log:?}");
    assert_eq!(name, "bob");
    assert_eq!(role, p2p_proto::Role::Member);
    assert_eq!(epoch, 1);
    assert_eq!(coordinator.as_deref(), Some("alice"));
    assert_eq!(members.len(), 2);
    // A version mismatch is refused with both versions named.
    let mut raw = Raw::connect(&a.addr);
    raw.send(&Frame::Hello {
        version: PROTOCOL_VERSION + 1,
        name: "zed".into(),
        session: 1,
        addr: None,
        resume: None,
        sign_key: None,
    });
    let err = raw.read_until("error", |f| matches!(f, Frame::Error { .. }));
    let Frame::Error {
        code: p2p_proto::ErrorCode::VersionMismatch,
        message,
    } = &err
    else {
        panic!("not a version refusal: {err:?}")
    };
    assert!(
        message.contains(&(PROTOCOL_VERSION + 1).to_string())
            && message.contains(&PROTOCOL_VERSION.to_string()),
        "both versions named: {message}"
    );
}

/// A person running p2pnode reads errors on stderr (as for bad arguments)
/// and the chat on stdout; a join that cannot succeed ends with exit 2.
#[test]
fn a_failed_join_is_reported_on_stderr() {
    use std::process::{Command, Stdio};
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = free.local_addr().unwrap().to_string();
    drop(free);
    let child = Command::new(crate::util::bin("p2pnode"))
        .args(["--name", "zed", "--insecure", "--headless", "--join", &nobody])
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = crate::util::wait_output("zed to give up", child);
    assert_eq!(out.status.code(), Some(2));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stderr.contains("could not join") && stderr.contains(&nobody),
        "{stderr}"
    );
    assert!(!stdout.contains("error"), "{stdout}");
    assert!(stdout.contains("zed listening on 127.0.0.1:"), "{stdout}");
}

/// A client that seals many `say`s into one batch record gets them
/// sequenced in order, and `ClientRead::recv_bodies` hands out the `chat`
/// frames of a group record where they lie (several per record).
#[test]
fn a_batch_of_says_comes_back_in_order_read_in_place() {
    use p2p_proto::net::Client;
    use std::time::Duration;
    let a = Node::join("alice", &[]);
    let key = crate::util::chat_key();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let mut c = Client::connect(&a.addr, Some(&key), Duration::from_secs(10))
            .await
            .expect("connecting to alice");
        c.send(&crate::util::hello("batcher", None))
            .await
            .expect("sending hello");
        loop {
            match c.recv().await.expect("reading the welcome and state") {
                Frame::State { last: true, .. } => break,
                Frame::Welcome { .. } | Frame::State { .. } => {}
                other => panic!("expected the welcome and state, got {}", other.kind()),
            }
        }
        const N: u64 = 400;
        let frames = crate::util::says("batched", N);
        let mut wire = Vec::new();
        c.write.seal_batch_into(&frames, &mut wire);
        c.write.write_all(&wire).await.expect("sending the batch");
        let (mut got, mut most) = (Vec::new(), 0);
        while (got.len() as u64) < N {
            let read = tokio::time::timeout(
                Duration::from_secs(10),
                c.read.recv_bodies(|body| {
                    if let Ok(Frame::Chat(chat)) = p2p_proto::decode_body(body) {
                        got.push((chat.client_seq, chat.text));
                    }
                }),
            )
            .await
            .expect("chats within 10 s")
            .expect("reading chats");
            most = most.max(read);
        }
        let want: Vec<(u64, String)> = (1..=N).map(|cs| (cs, format!("batched {cs}"))).collect();
        assert_eq!(got, want);
        assert!(most > 1, "every record held one frame: nothing was read in place");
    });
}
