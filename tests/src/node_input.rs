//! Hostile and broken input: every case gets an error frame where the
//! protocol allows and a closed connection, and the chat carries on.

use p2p_proto::{ErrorCode, Frame};

use crate::util::{wait_until, Node, Raw};

fn expect_error(raw: &mut Raw, code: ErrorCode) {
    let frame = raw.read_until("error frame", |f| matches!(f, Frame::Error { .. }));
    let Frame::Error { code: got, message } = frame else {
        unreachable!()
    };
    assert_eq!(got, code, "{message}");
    assert!(!message.is_empty());
    wait_until("the node to close the connection", || raw.closed().then_some(()));
}

#[test]
fn bad_input_gets_an_error_and_disturbs_nobody() {
    let a = Node::join("alice", &["--handshake-timeout-ms", "300"]);
    let mut b = Node::join("bob", &["--join", &a.addr]);
    b.wait_event("ready", |e| e["event"] == "ready");

    // Before the key is proven, anything but the handshake gets
    // `unauthenticated` and a close: random bytes, a 4 GiB prefix, a
    // frame of the right shape.
    let outsider: [&[u8]; 3] = [
        &[0x9e, 0x13, 0x77, 0x01, 0xff, 0x00, 0x42],
        &[0xff, 0xff, 0xff, 0xff],
        &p2p_proto::encode(&Frame::StatusRequest { log: false }),
    ];
    for bytes in outsider {
        let mut raw = Raw::plain(&a.addr);
        raw.send_raw(bytes);
        expect_error(&mut raw, ErrorCode::Unauthenticated);
    }

    // Inside an authenticated connection, framing is still checked.
    // Random bytes: read as a length prefix far over the limit.
    let mut raw = Raw::connect(&a.addr);
    raw.send_raw(&[0x9e, 0x13, 0x77, 0x01, 0xff, 0x00, 0x42]);
    expect_error(&mut raw, ErrorCode::FrameTooLarge);

    // A 4 GiB length prefix: refused before any allocation.
    let mut raw = Raw::connect(&a.addr);
    raw.send_raw(&[0xff, 0xff, 0xff, 0xff]);
    expect_error(&mut raw, ErrorCode::FrameTooLarge);

    // A record just over the limit, and a sealed frame just over it.
    let mut raw = Raw::connect(&a.addr);
    let len = (p2p_proto::net::MAX_RECORD_LEN + 1) as u32;
    raw.send_raw(&len.to_be_bytes());
    expect_error(&mut raw, ErrorCode::FrameTooLarge);
    let mut raw = Raw::connect(&a.addr);
    raw.send_body(&vec![b' '; p2p_proto::limits::MAX_FRAME_LEN + 1]);
    expect_error(&mut raw, ErrorCode::FrameTooLarge);

    // A record that does not authenticate (altered, or sealed under
    // another key): the connection is closed, nothing is read from it.
    let mut raw = Raw::connect(&a.addr);
    raw.send_raw(&[
        0, 0, 0, 20, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
    ]);
    wait_until("the node to close the connection", || raw.closed().then_some(()));

    let cases: [(&[u8], ErrorCode); 4] = [
        (b"{not json", ErrorCode::BadJson),
        (br#"{"type":"teleport","to":"mars"}"#, ErrorCode::UnknownType),
        (b"{\"type\":\"hello\",\"name\":\"\xff\xfe\"}", ErrorCode::BadUtf8),
        (br#"{"type":"hello","version":"one"}"#, ErrorCode::BadField),
    ];
    for (body, code) in cases {
        let mut raw = Raw::connect(&a.addr);
        raw.send_body(body);
        expect_error(&mut raw, code);
    }

    // A chat frame before hello.
    let mut raw = Raw::connect(&a.addr);
    raw.send(&Frame::Say {
        text: "sneaky".into(),
        client_seq: 1,
    });
    expect_error(&mut raw, ErrorCode::UnexpectedFrame);

    // Connects and never says anything: dropped after the handshake
    // timeout, whether it proved the key or not.
    let mut silent = Raw::plain(&a.addr);
    expect_error(&mut silent, ErrorCode::HandshakeTimeout);
    let mut silent = Raw::connect(&a.addr);
    expect_error(&mut silent, ErrorCode::HandshakeTimeout);

    // Garbage from an admitted member: it is dropped, the others are not.
    let mut member = Raw::hello(&a.addr, "mallory");
    member.send_body(b"\x00\x01garbage");
    expect_error(&mut member, ErrorCode::BadJson);
    b.wait_event("mallory dropped", |e| {
        e["event"] == "left" && e["name"] == "mallory"
    });

    // A batch record whose third frame is garbage: the two before it
    // count (in order), the garbage ends the connection.
    let mut member = Raw::hello(&a.addr, "trent");
    member.send_batch(&[
        br#"{"type":"say","text":"batched one","client_seq":1}"#,
        br#"{"type":"say","text":"batched two","client_seq":2}"#,
        b"\x00\x01garbage",
    ]);
    expect_error(&mut member, ErrorCode::BadJson);
    b.wait_message("batched two");
    let texts: Vec<String> = b.messages().into_iter().map(|(_, _, t)| t).collect();
    let at = |t: &str| texts.iter().position(|x| x == t);
    assert!(
        at("batched one") < at("batched two") && at("batched one").is_some(),
        "{texts:?}"
    );

    // The chat carries on.
    b.say("still fine");
    a.wait_message("still fine");
    assert_eq!(a.events().iter().filter(|e| e["event"] == "error").count(), 0);
}

/// What is typed on a node's stdin is text whatever its bytes: a line
/// holding a byte that is not UTF-8 (a Latin-1 file piped in) is sent with
/// U+FFFD in its place, and the node reads on. It used to take that byte
/// for the end of its input and leave the chat.
#[test]
fn a_typed_line_that_is_not_utf8_is_sent_and_the_node_reads_on() {
    let mut a = Node::join("alice", &[]);
    a.wait_event("ready", |e| e["event"] == "ready");
    a.type_bytes(b"caf\xe9 au lait\n");
    a.say("the next line");
    a.wait_message("the next line");
    let texts: Vec<String> = a.messages().into_iter().map(|(_, _, t)| t).collect();
    assert_eq!(texts, ["caf\u{fffd} au lait", "the next line"]);
    // A line far over the text limit is refused, and reading goes on.
    let mut long = vec![b'x'; 100_000];
    long.push(b'\n');
    a.type_bytes(&long);
    a.say("after the long one");
    a.wait_message("after the long one");
    assert!(
        a.has_event(
            |e| e["event"] == "error" && e["message"].as_str().is_some_and(|m| m.starts_with("not sent"))
        ),
        "the long line was not refused"
    );
    assert_eq!(a.messages().len(), 3);
}

/// A node run by hand whose stderr is a closed pipe (`p2pnode 2>&1 |
/// head`, a terminal gone) carries on: what it has to say there is lost,
/// not the node. `eprintln!` panicked on the first error it printed.
#[test]
fn a_node_whose_stderr_is_gone_carries_on() {
    use std::io::{BufRead, Write};
    use std::process::{Command, Stdio};
    let data = crate::util::bin_dir().join("p2p-tests-data");
    let mut child = Command::new(crate::util::bin("p2pnode"))
        .args([
            "--name",
            "solo",
            "--listen",
            "127.0.0.1:0",
            "--insecure",
            "--data-dir",
        ])
        .arg(&data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning p2pnode");
    drop(child.stderr.take());
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut stdin = child.stdin.take().expect("stdin");
    // A line over the text limit: refused, and the refusal goes to stderr.
    writeln!(stdin, "{}", "x".repeat(5000)).unwrap();
    writeln!(stdin, "still here").unwrap();
    stdin.flush().unwrap();
    let mut seen = Vec::new();
    wait_until("solo to print its message", || {
        seen.extend(rx.try_iter());
        seen.iter().any(|l| l.ends_with("still here")).then_some(())
    });
    assert!(child.try_wait().unwrap().is_none(), "solo exited: {seen:?}");
    drop(stdin);
    let status = crate::util::wait_until("solo to leave at the end of its input", || {
        child.try_wait().unwrap()
    });
    assert!(status.success(), "{status}: {seen:?}");
}

fn rss_kib(pid: nix::unistd::Pid) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().unwrap())
        })
        .unwrap()
}

#[test]
fn a_member_that_never_reads_is_cut_off_and_others_carry_on() {
    let _heavy = crate::util::heavy();
    // A member that never reads also never answers pings; a long heartbeat
    // lets the queue limit, not the heartbeat, catch it here.
    const QUEUE: u64 = 1 << 20;
    let mut a = Node::join(
        "alice",
        &[
            "--queue-limit-bytes",
            &QUEUE.to_string(),
            "--history",
            "0",
            "--heartbeat-ms",
            "2000",
        ],
    );
    let b = Node::join("bob", &["--join", &a.addr]);
    crate::util::wait_voters(&[&a, &b]);
    let baseline = rss_kib(a.pid());
    let sloth = Raw::hello(&a.addr, "sloth"); // joins, then never reads
    b.wait_event("sloth joined", |e| e["event"] == "joined" && e["name"] == "sloth");
    let big = "x".repeat(4000);
    // Rounds of 100 messages of 4 KB, each waited for at bob: the others
    // carry on at their own pace while sloth's queue fills. Loopback socket
    // buffers hold a few MB, so sloth is cut off well within 32 MB.
    let mut peak = 0;
    let mut round = 0;
    while !a.has_event(|e| e["event"] == "left" && e["name"] == "sloth") {
        assert!(round < 80, "sloth was never cut off");
        for i in 0..100 {
            a.say(&format!("{round}-{i} {big}"));
        }
        b.wait_message(&format!("{round}-99 {big}"));
        peak = peak.max(rss_kib(a.pid()));
        round += 1;
    }
    let left = a.wait_event("sloth dropped", |e| e["event"] == "left" && e["name"] == "sloth");
    assert!(
        left["reason"].as_str().unwrap().contains("slow consumer"),
        "{left}"
    );
    // The others carry on.
    a.say("after sloth");
    b.wait_message("after sloth");
    // What the coordinator may hold: its history (at most 16 MiB of
    // entries), sloth's queue (the limit), the window of unconfirmed
    // entries (a quarter of it) and its own queues, plus allocator slack.
    let bound = baseline + 16 * 1024 + 2 * QUEUE / 1024 + 16 * 1024;
    assert!(
        peak < bound,
        "coordinator RSS peaked at {peak} KiB while sloth was connected (baseline {baseline} KiB, bound {bound} KiB)"
    );
    drop(sloth);
}

/// Without a key every frame travels alone; a burst of them written at
/// once is read and handed on together: all sequenced, in order, and a bad
/// frame inside the burst still ends the connection after the ones before
/// it count.
#[test]
fn an_insecure_burst_is_sequenced_in_order_up_to_a_bad_frame() {
    let a = Node::join("alice", &["--insecure"]);
    let mut raw = Raw::plain(&a.addr).joined("burst");
    const N: u64 = 3000;
    let mut burst = crate::util::says("burst", N);
    burst.extend_from_slice(&[0, 0, 0, 9]);
    burst.extend_from_slice(b"not json!");
    raw.send_raw(&burst);
    expect_error(&mut raw, ErrorCode::BadJson);
    a.wait_message(&format!("burst {N}"));
    let texts: Vec<String> = a
        .messages()
        .into_iter()
        .map(|(_, _, t)| t)
        .filter(|t| t.starts_with("burst "))
        .collect();
    let want: Vec<String> = (1..=N).map(|cs| format!("burst {cs}")).collect();
    assert_eq!(texts, want);
}
