//! Bot plugins with the real `.so` files and real processes.

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::ctl::TestCluster;
use crate::util::{wait_until, Node};

fn transcript(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("p2p-plugins-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn echo_answers_only_its_command() {
    let mut a = Node::join("alice", &["--plugin", "echo"]);
    let b = Node::join("bob", &["--join", &a.addr]);
    a.wait_event("bob joined", |e| e["event"] == "joined");
    a.say("!echo hello there");
    a.say("echo without the bang");
    let bot = b.wait_event("echo's post", |e| e["event"] == "message" && e["bot"] == "echo");
    assert_eq!(bot["text"], "hello there");
    assert_eq!(bot["from"], "echo");
    b.wait_message("echo without the bang");
    assert_eq!(b.events().iter().filter(|e| e["bot"] == "echo").count(), 1);
    // Echo declared its prefix (`deliver_only`): other messages never
    // cross into it. Its calls: the `!echo` delivery and one call each
    // to the hooks it leaves at their default (after which the node
    // stops calling them), not one per message.
    for i in 0..30 {
        a.say(&format!("plain {i}"));
    }
    b.wait_message("plain 29");
    let p2p_proto::Frame::Status { plugins, .. } = a.status() else {
        unreachable!()
    };
    let echo = plugins.iter().find(|p| p.name == "echo").expect("echo's status");
    assert!(
        echo.calls <= 4,
        "echo was called {} times for 32 messages",
        echo.calls
    );
    assert_eq!(echo.hears, vec!["!echo ".to_string()]);
}

#[test]
fn moderation_masks_drops_and_limits_and_the_logger_never_sees_dropped_text() {
    let dir = temp("moderation");
    let log = dir.join("t.jsonl");
    let moderation = r#"moderation:{"banned":["spam"],"action":"mask","max_length":20,"rate":{"messages":2,"per_ms":60000}}"#;
    let logger = r#"logger:{"path":"t.jsonl"}"#;
    let data = dir.to_str().unwrap();
    let a = Node::join(
        "alice",
        &["--plugin", moderation, "--plugin", logger, "--data-dir", data],
    );
    let mut b = Node::join("bob", &["--join", &a.addr]);
    b.say("some SPAM here");
    b.say("this one is far too long to pass");
    b.say("fine");
    b.say("one too many");
    let masked = a.wait_message("some *** here");
    assert_eq!(masked["from"], "bob");
    b.wait_message("some *** here");
    b.wait_message("fine");
    let rejected = b.wait_events("two rejections", 2, |e| e["event"] == "rejected");
    assert!(
        rejected[0]["reason"]
            .as_str()
            .unwrap()
            .contains("limit here is 20"),
        "{rejected:?}"
    );
    assert!(
        rejected[1]["reason"].as_str().unwrap().contains("slow down"),
        "{rejected:?}"
    );
    let verdicts = a.wait_events("three verdicts", 3, |e| e["event"] == "verdict");
    let rules: Vec<&str> = verdicts.iter().map(|v| v["rule"].as_str().unwrap()).collect();
    assert_eq!(rules, vec!["banned-word", "max-length", "rate-limit"]);
    // Dropped messages reached no member...
    for n in [&a, &b] {
        assert!(!n
            .messages()
            .iter()
            .any(|m| m.2.contains("too long") || m.2 == "one too many"));
    }
    // ...and not the transcript, which has the verdicts without the text.
    let lines = wait_until("transcript", || {
        let t = transcript(&log);
        (t.len() >= 5).then_some(t)
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("too long") && !text.contains("one too many") && !text.contains("SPAM"),
        "{text}"
    );
    let v: Vec<&Value> = lines.iter().filter(|l| l["type"] == "verdict").collect();
    assert_eq!(v.len(), 3);
    assert_eq!(v[1]["action"], "drop");
    assert_eq!(v[1]["member"], "bob");
    assert!(v[1].get("text").is_none());
    let msgs: Vec<&str> = lines
        .iter()
        .filter(|l| l["type"] == "message")
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(msgs, vec!["some *** here", "fine"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_panicking_plugin_is_quarantined_and_chat_goes_on() {
    let mut a = Node::join("alice", &["--plugin", "test_panic", "--plugin", "echo"]);
    a.say("boom");
    let q = a.wait_event("quarantine", |e| {
        e["event"] == "plugin" && e["state"] == "quarantined"
    });
    assert_eq!(q["name"], "test_panic");
    assert!(q["detail"].as_str().unwrap().contains("panicked"), "{q}");
    a.wait_message("boom");
    a.say("!echo still alive");
    a.wait_event("echo still works", |e| {
        e["event"] == "message" && e["text"] == "still alive"
    });
    a.say("boom again");
    a.wait_message("boom again");
    assert_eq!(
        a.events().iter().filter(|e| e["state"] == "quarantined").count(),
        1,
        "not called again"
    );
}

/// A plugin that reports an error (not a panic) is quarantined with its
/// own words, and the chat goes on.
#[test]
fn a_plugin_reporting_failure_is_quarantined_with_its_reason() {
    let mut a = Node::join("alice", &["--plugin", "test_panic"]);
    a.say("please fail now");
    let q = a.wait_event("quarantine", |e| {
        e["event"] == "plugin" && e["state"] == "quarantined"
    });
    assert_eq!(q["name"], "test_panic");
    assert!(
        q["detail"].as_str().unwrap_or_default().contains("asked to fail"),
        "{q}"
    );
    a.wait_message("please fail now");
    a.say("after the failure");
    a.wait_message("after the failure");
}

/// A rewrite to an invalid text (empty) is reported, not silently
/// dropped, and the message is delivered as sent.
#[test]
fn an_invalid_rewrite_is_reported_and_the_message_kept() {
    let mut a = Node::join("alice", &["--plugin", "test_panic"]);
    a.say("please empty this");
    let e = a.wait_event("the ignored rewrite", |e| {
        e["event"] == "plugin" && e["state"] == "ignored"
    });
    let detail = e["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("alice's message") && detail.contains("invalid text"),
        "{e}"
    );
    a.wait_message("please empty this");
}

#[test]
fn wrong_abi_missing_file_and_bad_names_are_refused_without_stopping_the_node() {
    let mut a = Node::join(
        "alice",
        &[
            "--plugin",
            "test_oldabi",
            "--plugin",
            "nosuchbot",
            "--plugin",
            "echo",
        ],
    );
    let refused = a.wait_events("two refusals", 2, |e| {
        e["event"] == "plugin" && e["state"] == "refused"
    });
    let old = refused[0]["detail"].as_str().unwrap();
    assert!(
        old.contains("libtest_oldabi") && old.contains("version 99") && old.contains("versions 3 to 4"),
        "{old}"
    );
    assert!(
        refused[1]["detail"].as_str().unwrap().contains("no file at"),
        "{refused:?}"
    );
    a.say("!echo the rest still loads");
    a.wait_message("the rest still loads");
    // The current version with another descriptor layout: refused, both
    // sizes named (checked the way p2pctl checks a cluster's plugins).
    let out = std::process::Command::new(crate::util::bin("p2pnode"))
        .args(["--name", "check", "--check-plugins", "--plugin", "test_oldabi"])
        .env("P2P_TEST_SHORT_DESCRIPTOR", "1")
        .output()
        .expect("running p2pnode --check-plugins");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let line: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(line["state"], "refused", "{line}");
    let size = std::mem::size_of::<p2p_plugin_api::abi::Descriptor>();
    assert!(
        line["detail"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("descriptor of {} bytes, expected {size}", size - 8)),
        "{line}"
    );
    // Version 3 still loads (version 4 only appended to the host's table):
    // this one gets as far as its own `load`, which refuses; version 2 is
    // refused for its version.
    for (abi, expect) in [
        ("3", "load refused: no reason given"),
        ("2", "ABI version 2, this node speaks versions 3 to 4"),
    ] {
        let out = std::process::Command::new(crate::util::bin("p2pnode"))
            .args(["--name", "check", "--check-plugins", "--plugin", "test_oldabi"])
            .env("P2P_TEST_ABI", abi)
            .output()
            .expect("running p2pnode --check-plugins");
        let line: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
        let detail = line["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(expect), "version {abi}: {line}");
    }
    // A file that is not a library, and a library that is not a plugin.
    let dir = temp("refusals");
    std::fs::write(dir.join("libnotalib.so"), "just text").unwrap();
    // A real shared library (built with the tests) without the entry symbol.
    let fixture = |d: &std::path::Path, name: &str| {
        d.join(format!(
            "{}{name}{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        ))
    };
    std::fs::copy(
        fixture(crate::util::bin_dir(), "test_nosymbol"),
        fixture(&dir, "nosymbol"),
    )
    .unwrap();
    // A real plugin under another name: its descriptor gives it away.
    std::fs::copy(fixture(crate::util::bin_dir(), "echo"), fixture(&dir, "notecho")).unwrap();
    let mut b = Node::join(
        "bob",
        &[
            "--plugin-dir",
            dir.to_str().unwrap(),
            "--plugin",
            "notalib",
            "--plugin",
            "nosymbol",
            "--plugin",
            "notecho",
        ],
    );
    let r = b.wait_events("refusals", 3, |e| {
        e["event"] == "plugin" && e["state"] == "refused"
    });
    assert!(
        r[0]["detail"]
            .as_str()
            .unwrap()
            .contains("not a loadable shared library"),
        "{r:?}"
    );
    assert!(
        r[1]["detail"].as_str().unwrap().contains("not a p2pchat plugin"),
        "{r:?}"
    );
    assert!(
        r[2]["detail"].as_str().unwrap().contains("calls itself \"echo\""),
        "{r:?}"
    );
    b.say("still chatting");
    b.wait_message("still chatting");
    let _ = std::fs::remove_dir_all(&dir);
    // A path is never a plugin name.
    let mut evil = Node::spawn("mallory", &["--plugin", "../../tmp/evil"]);
    assert_eq!(evil.wait_exit().code(), Some(1));
    let err = evil.stderr_after_exit();
    assert!(err.contains("plugin name"), "{err}");
}

fn coordinator_epoch(rows: &[Value]) -> u64 {
    rows.iter()
        .filter(|r| r["role"] == "coordinator")
        .filter_map(|r| r["epoch"].as_u64())
        .max()
        .unwrap_or(0)
}

#[test]
fn attach_detach_at_runtime_and_bots_survive_failovers_with_one_transcript() {
    let extra = "plugins:\n  - name: echo\n  - name: logger\n    config: { path: transcript.jsonl }\n";
    let c = TestCluster::new(&["alice", "bob", "carol", "dave"], extra);
    c.up();
    let out = c.ok(&["plugins"]);
    assert!(
        out.contains("echo") && out.contains("logger") && out.contains("active"),
        "{out}"
    );
    assert!(out.contains(r#"(hears only "!echo ")"#), "{out}");

    // Attach moderation with one command; it acts at once.
    c.ok(&[
        "attach",
        "moderation",
        "--config",
        "{banned: [spam], action: drop}",
    ]);
    // `say` reports the drop (and fails): the line reached nobody.
    let out = c.ctl(&["say", "carol", "buy", "spam"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not delivered") && err.contains("banned"), "{err}");
    c.ok(&["say", "carol", "no problem here"]);
    // carol's messages are handled in order: once the second is delivered,
    // the first has been judged.
    wait_until("carol's second message delivered", || {
        c.ok(&["logs", "dave"])
            .contains("carol: no problem here")
            .then_some(())
    });
    let listed = c.ok(&["plugins", "--json"]);
    let plugins: Vec<Value> = serde_json::from_str(&listed).unwrap();
    let m = plugins.iter().find(|p| p["name"] == "moderation").unwrap();
    assert_eq!(m["state"], "active");
    assert_eq!(m["drops"], 1);
    // Refused attaches say why and change nothing.
    let out = c.ctl(&["attach", "../evil"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("plugin name"));
    let out = c.ctl(&["attach", "moderation", "--config", "{colour: red}"]);
    assert!(!out.status.success(), "a bad configuration is refused: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown field"),
        "{out:?}"
    );
    // ... and changes nothing: the same set, moderation still dropping.
    let again: Vec<Value> = serde_json::from_str(&c.ok(&["plugins", "--json"])).unwrap();
    let names = |v: &[Value]| {
        v.iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&again), names(&plugins));
    assert!(!c.ctl(&["say", "carol", "more", "spam"]).status.success());
    c.ok(&["say", "carol", "still fine"]);
    let logs = wait_until("carol's next message delivered", || {
        let l = c.ok(&["logs", "dave"]);
        l.contains("carol: still fine").then_some(l)
    });
    assert!(
        !logs.contains("carol: more spam"),
        "the refused attach changed the rules: {logs}"
    );

    // Several failovers under traffic; the bots keep working on each new coordinator.
    for round in 0..2 {
        let before = coordinator_epoch(&c.ps());
        c.ok(&["kill", "--coordinator"]);
        c.ok(&["say", "dave", &format!("!echo round {round}")]);
        // Dropped by moderation (or, mid-election, not yet sequenced and
        // dropped once it is): never reported delivered.
        let out = c.ctl(&["say", "dave", "spam after failover"]);
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("delivered at"),
            "{out:?}"
        );
        c.ok(&["say", "dave", &format!("round {round} over")]);
        // A later epoch (a loaded machine may see more than one election).
        c.wait_ps(&format!("a coordinator after epoch {before}"), |rows| {
            coordinator_epoch(rows) > before
        });
    }
    // dave's messages are handled in order: once "round 1 over" is
    // delivered, both spams have been judged.
    let logs = wait_until("echoes and both rounds after the failovers", || {
        let l = c.ok(&["logs", "dave"]);
        (l.contains("echo: round 0") && l.contains("echo: round 1") && l.contains("dave: round 1 over"))
            .then_some(l)
    });
    assert!(
        !logs.contains("dave: spam after failover"),
        "moderation still drops after failover: {logs}"
    );

    // Detach: no longer moderated.
    c.ok(&["detach", "moderation"]);
    c.ok(&["say", "dave", "spam is fine now"]);
    let check = c.ok(&["check", "--json"]);
    let check: Value = serde_json::from_str(&check).unwrap();
    assert_eq!(check["agree"], true, "{check}");
    let agreed: Vec<u64> = check["message_seqs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    // The transcript holds exactly the agreed messages: no gap, no duplicate.
    let t = transcript(&c.state_dir().join("data").join("transcript.jsonl"));
    let seqs: Vec<u64> = t
        .iter()
        .filter(|l| l["type"] == "message")
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, agreed, "transcript {t:?}");
    assert!(t.iter().any(|l| l["text"] == "spam is fine now"));
}

#[test]
fn hung_coordinator_with_plugins_hands_them_over() {
    let mut a = Node::join("alice", &["--plugin", "echo"]);
    let mut b = Node::join("bob", &["--join", &a.addr]);
    // Three voters: with a hung one the other two are still a majority.
    let c = Node::join("carol", &["--join", &a.addr]);
    crate::util::wait_voters(&[&a, &b, &c]);
    let loaded = b.wait_event("echo loaded on bob too", |e| {
        e["event"] == "plugin" && e["name"] == "echo"
    });
    assert_eq!(loaded["state"], "loaded");
    a.signal(Signal::SIGSTOP);
    b.wait_event("bob leads", |e| e["event"] == "role" && e["coordinator"] == "bob");
    b.say("!echo from bob's reign");
    b.wait_event("echo", |e| e["bot"] == "echo" && e["text"] == "from bob's reign");
    a.signal(Signal::SIGCONT);
    a.wait_message("from bob's reign");
    a.say("/quit");
}

/// `down` then `up` starts a new chat (nodes keep no state): the logger
/// gives it its own section of the same transcript instead of skipping
/// every seq the previous chat already used.
#[test]
fn a_new_chat_after_down_and_up_gets_its_own_section_of_the_transcript() {
    let extra = "plugins:\n  - name: logger\n    config: { path: transcript.jsonl }\n";
    let c = TestCluster::new(&["alice", "bob"], extra);
    let path = c.state_dir().join("data").join("transcript.jsonl");
    let messages = || -> Vec<(String, u64, String)> {
        transcript(&path)
            .iter()
            .filter(|l| l["type"] == "message")
            .map(|l| {
                (
                    l["chat"].as_str().unwrap_or_default().to_string(),
                    l["seq"].as_u64().unwrap_or(0),
                    l["text"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    c.up();
    for i in 0..3 {
        c.ok(&["say", "bob", &format!("first chat {i}")]);
    }
    wait_until("the first chat's 3 lines", || {
        (messages().len() == 3).then_some(())
    });
    c.ok(&["down"]);
    c.up();
    for i in 0..2 {
        c.ok(&["say", "bob", &format!("second chat {i}")]);
    }
    let lines = wait_until("the second chat's 2 lines", || {
        let m = messages();
        (m.len() >= 5).then_some(m)
    });
    assert_eq!(lines.len(), 5, "{lines:?}");
    let (first, second) = lines.split_at(3);
    assert!(first
        .iter()
        .all(|l| l.0 == first[0].0 && l.2.starts_with("first chat")));
    assert!(second
        .iter()
        .all(|l| l.0 == second[0].0 && l.2.starts_with("second chat")));
    assert_ne!(first[0].0, second[0].0, "two chats, two ids");
    assert_eq!(first[0].0.len(), 32, "a chat id: {lines:?}");
    let check: Value = serde_json::from_str(&c.ok(&["check", "--json"])).unwrap();
    let agreed: Vec<u64> = check["message_seqs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let logged: Vec<u64> = second.iter().map(|l| l.1).collect();
    assert_eq!(
        logged, agreed,
        "the second section is exactly the chat p2pctl check sees"
    );
}

/// A bot rebuilt in place is loaded anew on detach + attach (the loader
/// would hand back the old code for the same path): the build identity
/// changes, and the new library runs.
#[test]
fn a_rebuilt_bot_is_loaded_anew_with_its_build_shown() {
    use crate::util::Raw;
    use p2p_proto::Frame;
    let dir = temp("rebuilt");
    let lib = |d: &std::path::Path| {
        d.join(format!(
            "{}echo{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        ))
    };
    std::fs::copy(lib(crate::util::bin_dir()), lib(&dir)).unwrap();
    let plugin_dir = dir.display().to_string();
    let mut a = Node::join("alice", &["--plugin-dir", &plugin_dir]);
    let addr = a.addr.clone();
    let change = |frame: Frame| {
        let mut raw = Raw::connect(&addr);
        raw.send(&frame);
        let answer = raw.read().expect("an answer");
        assert!(matches!(answer, Frame::Status { .. }), "{answer:?}");
    };
    let attach = || Frame::Attach {
        name: "echo".into(),
        config: "{}".into(),
    };
    change(attach());
    let first = a.wait_event("echo loaded", |e| {
        e["event"] == "plugin" && e["state"] == "loaded"
    });
    change(Frame::Detach { name: "echo".into() });
    a.wait_event("echo detached", |e| {
        e["event"] == "plugin" && e["state"] == "detached"
    });
    // "Rebuild": same code, different bytes (trailing data is ignored by
    // the loader).
    let mut bytes = std::fs::read(lib(&dir)).unwrap();
    bytes.extend_from_slice(b"rebuilt");
    std::fs::write(lib(&dir), bytes).unwrap();
    change(attach());
    let loaded = a.wait_events("echo loaded twice", 2, |e| {
        e["event"] == "plugin" && e["state"] == "loaded"
    });
    let build = |e: &Value| {
        let d = e["detail"].as_str().unwrap_or_default().to_string();
        d.split("(build ")
            .nth(1)
            .map(|b| b.trim_end_matches(')').to_string())
            .unwrap_or_default()
    };
    assert_eq!(build(&loaded[0]), build(&first));
    assert_eq!(build(&first).len(), 12, "{first}");
    assert_ne!(
        build(&loaded[1]),
        build(&first),
        "the rebuilt file was not loaded: {loaded:?}"
    );
    a.say("!echo from the rebuilt bot");
    a.wait_event("the rebuilt echo answers", |e| {
        e["event"] == "message" && e["text"] == "from the rebuilt bot"
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bots_answering_bots_stop_at_the_depth_limit() {
    // echo posts what follows "!echo ", test_panic what follows "!relay ";
    // a bot never sees its own posts, so they answer each other.
    let mut a = Node::join("alice", &["--plugin", "echo", "--plugin", "test_panic"]);
    // Each answer to an answer is one level deeper; the fourth is dropped.
    a.say("!echo !relay !echo !relay !echo deep");
    a.wait_message("!relay !echo deep");
    // Posts are sequenced as the message they answer is delivered, so a
    // fourth level would be in the log before this line.
    a.say("after the answers");
    a.wait_message("after the answers");
    let texts: Vec<(String, String)> = a
        .messages()
        .into_iter()
        .map(|(_, from, text)| (from, text))
        .collect();
    let from = |who: &str, t: &str| (who.to_string(), t.to_string());
    assert_eq!(
        texts,
        vec![
            from("alice", "!echo !relay !echo !relay !echo deep"),
            from("echo", "!relay !echo !relay !echo deep"),
            from("test_panic", "!echo !relay !echo deep"),
            from("echo", "!relay !echo deep"),
            from("alice", "after the answers"),
        ]
    );
}
