//! p2pctl against the real binaries: a supervisor per test in its own
//! temporary directory, nodes on free ports, and nothing left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use p2p_proto::Frame;

use crate::util::{bin, wait_until, Handshake, Raw};

/// A temporary directory with a cluster file; tears the cluster down and
/// removes itself on drop.
pub struct TestCluster {
    pub dir: PathBuf,
    pub file: PathBuf,
    pub name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); look at its state too.
    kill(Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split(") ").nth(1).is_some_and(|rest| rest.starts_with('Z')))
            .unwrap_or(true)
}

impl TestCluster {
    /// A cluster of `nodes` on free ports; `extra` is appended to the YAML.
    pub fn new(nodes: &[&str], extra: &str) -> TestCluster {
        TestCluster::with_heartbeat(nodes, extra, 200)
    }

    /// The same, with the chat's heartbeat in milliseconds.
    pub fn with_heartbeat(nodes: &[&str], extra: &str, heartbeat_ms: u64) -> TestCluster {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{n}");
        let dir = std::env::temp_dir().join(format!("p2pctl-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut yaml = format!("name: {name}\nheartbeat_ms: {heartbeat_ms}\nstop_grace_ms: 1000\nnodes:\n");
        for node in nodes {
            yaml.push_str(&format!("  - name: {node}\n    port: 0\n"));
        }
        yaml.push_str(extra);
        let file = dir.join("cluster.yaml");
        std::fs::write(&file, yaml).unwrap();
        TestCluster { dir, file, name }
    }

    /// `p2pctl -f <this cluster's file> args…`, to run as the test likes.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("p2pctl"));
        cmd.arg("-f").arg(&self.file).args(args).env("NO_COLOR", "1");
        cmd
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running p2pctl")
    }

    /// Runs p2pctl with its stdout read by nobody (`p2pctl … | true`).
    pub fn ctl_unread(&self, args: &[&str]) -> Output {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running p2pctl");
        drop(child.stdout.take());
        child.wait_with_output().expect("p2pctl ends")
    }

    /// Runs p2pctl and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "p2pctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn up(&self) {
        self.ok(&["up", "-d"]);
    }

    pub fn ps(&self) -> Vec<Value> {
        let out = self.ok(&["ps", "--json"]);
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap()
    }

    /// Polls `ps --json` until `pred` holds for the rows.
    pub fn wait_ps(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        wait_until(what, || {
            let rows = self.ps();
            pred(&rows).then_some(rows)
        })
    }

    pub fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
        rows.iter().find(|r| r["name"] == name).expect("node row")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join(".p2pctl").join(&self.name)
    }

    pub fn supervisor_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.state_dir().join("supervisor.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn node_pids(&self) -> Vec<i32> {
        self.ps()
            .iter()
            .filter_map(|r| r["pid"].as_i64())
            .map(|p| p as i32)
            .collect()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = self.ctl(&["down"]);
        if let Some(pid) = self.supervisor_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn all_running(n: usize) -> impl Fn(&[Value]) -> bool {
    move |rows| rows.iter().filter(|r| r["state"] == "running").count() == n
}

fn coordinators(rows: &[Value]) -> Vec<&Value> {
    rows.iter().filter(|r| r["role"] == "coordinator").collect()
}

/// The cluster is one chat again: a line bob says is delivered, and `check`
/// finds all `n` nodes agreeing.
fn assert_one_chat(c: &TestCluster, n: usize) {
    let out = c.ok(&["say", "bob", "one chat again"]);
    assert!(out.starts_with("delivered at seq "), "{out}");
    let out = c.ok(&["check"]);
    assert!(out.contains(&format!("{n} nodes agree")), "{out}");
}

/// The `p2pnode` processes running in `dir` (nodes run in their
/// cluster's state directory).
fn nodes_in(dir: &Path) -> Vec<i32> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "p2pnode")
                && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir)
        })
        .collect()
}

#[test]
fn ups_started_together_bring_up_one_cluster() {
    // Six `up`s of one cluster at once, half of them detached. Before the
    // state directory had a lock, two could both find no supervisor
    // answering and both start one (six nodes; `down` reached only the
    // second), and a detached one that lost printed the winner's log as
    // its own reason.
    let c = TestCluster::new(&["alice", "bob", "carol"], "");
    let mut ups: Vec<(bool, std::process::Child)> = (0..6)
        .map(|i| {
            let detach = i % 2 == 0;
            let args: &[&str] = if detach {
                &["up", "-d"]
            } else {
                &["up", "--stream"]
            };
            let child = c
                .command(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting p2pctl up");
            (detach, child)
        })
        .collect();
    let mut ended: Vec<Option<bool>> = vec![None; ups.len()];
    // Every detached `up` returns; a foreground one returns unless it won.
    wait_until("all racing `up`s but one winner to return", || {
        for (i, (_, child)) in ups.iter_mut().enumerate() {
            if ended[i].is_none() {
                ended[i] = child.try_wait().unwrap().map(|s| s.success());
            }
        }
        let detached_done = ups.iter().zip(&ended).all(|((d, _), e)| !d || e.is_some());
        let won = ended.iter().filter(|e| **e != Some(false)).count();
        (detached_done && won == 1).then_some(())
    });
    let winner = ended.iter().position(|e| *e != Some(false)).unwrap();
    let mut foreground = None;
    for (i, (detach, child)) in ups.into_iter().enumerate() {
        if i == winner && ended[i].is_none() {
            // Reaped as soon as it ends: `down` waits for its pid to go.
            foreground = Some(std::thread::spawn(move || child.wait_with_output()));
            continue;
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if i != winner {
            assert!(
                err.contains("already running") && !err.contains("supervisor.log"),
                "a losing `up` (detached: {detach}) says why: {err}"
            );
        }
    }
    let rows = c.wait_ps("the winner's three nodes running", |rows| {
        rows.len() == 3 && rows.iter().all(|r| r["state"] == "running")
    });
    let mut pids: Vec<i32> = rows
        .iter()
        .filter_map(|r| r["pid"].as_i64())
        .map(|p| p as i32)
        .collect();
    pids.sort_unstable();
    let mut running = nodes_in(&c.state_dir());
    running.sort_unstable();
    assert_eq!(
        running, pids,
        "the cluster's nodes are the supervisor's three, no others"
    );
    // Straight after start-up, maybe before the supervisor has said
    // "all ready": a foreground `up` stopped then waited for ever.
    c.ok(&["down"]);
    wait_until("no node of the cluster left", || {
        nodes_in(&c.state_dir()).is_empty().then_some(())
    });
    if let Some(waiter) = foreground {
        let out = waiter.join().unwrap().unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("stopped"),
            "the foreground winner after down: {out:?}"
        );
    }
    // The lock went with its supervisor: the cluster comes up again.
    c.up();
    assert_eq!(c.ps().len(), 3);
    // The demo of a running cluster's file stops before it touches the
    // running cluster's files (it deleted its transcript first).
    let transcript = c.state_dir().join("data").join("transcript.jsonl");
    std::fs::create_dir_all(transcript.parent().unwrap()).unwrap();
    std::fs::write(&transcript, "{}\n").unwrap();
    let out = c.ctl(&["demo", "--pace-ms", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already running"),
        "{out:?}"
    );
    assert!(transcript.exists(), "the running cluster's transcript is kept");
    assert_eq!(c.ps().len(), 3);
}

#[test]
fn up_ps_down_leaves_no_process() {
    let c = TestCluster::new(&["alice", "bob", "carol"], "");
    c.up();
    let rows = c.ps();
    assert_eq!(rows.len(), 3);
    for r in &rows {
        for key in ["name", "pid", "addr", "state", "role", "epoch", "restarts"] {
            assert!(r.get(key).is_some(), "ps --json row lacks {key}: {r}");
        }
        assert_eq!(r["state"], "running");
    }
    assert_eq!(TestCluster::row(&rows, "alice")["role"], "coordinator");
    assert_eq!(coordinators(&rows).len(), 1);
    let table = c.ok(&["ps"]);
    assert!(table.contains("NAME") && table.contains("coordinator"), "{table}");
    // Read by a pipe closed at once (`p2pctl ps | true`): no panic.
    for args in [&["ps"][..], &["check"]] {
        let out = c.ctl_unread(args);
        assert!(out.status.success(), "p2pctl {args:?} | true: {out:?}");
    }
    // A control request far over its limit, with no end of line: cut,
    // refused, and the supervisor reads no more of it.
    {
        use std::io::{BufRead, Write};
        let sock = std::os::unix::net::UnixStream::connect(c.state_dir().join("ctl.sock")).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut w = sock.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&vec![b'x'; 2 << 20]);
        });
        let mut answer = String::new();
        std::io::BufReader::new(&sock)
            .read_line(&mut answer)
            .expect("an answer to an endless request");
        assert!(answer.contains("bad request"), "{answer}");
        drop(sock);
        writer.join().unwrap();
        assert_eq!(c.ps().len(), 3, "the supervisor still answers");
    }
    let mut pids = c.node_pids();
    pids.push(c.supervisor_pid().unwrap());
    let out = c.ok(&["down"]);
    assert!(out.contains("stopped"), "{out}");
    for pid in pids {
        wait_until(&format!("pid {pid} to be gone"), || (!alive(pid)).then_some(()));
    }
    assert!(!c.state_dir().join("ctl.sock").exists());
    // A shutdown is not a failover: the coordinator goes last, nobody
    // elects a successor on the way out.
    for node in ["alice", "bob", "carol"] {
        let log = std::fs::read_to_string(c.state_dir().join("logs").join(format!("{node}.log"))).unwrap();
        assert!(
            !log.contains("\"electing\""),
            "{node} elected during down:\n{log}"
        );
    }
    let out = c.ctl(&["ps"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no cluster") && err.contains("p2pctl up"), "{err}");
    // Stopping what is not running is not an error.
    let out = c.ok(&["down"]);
    assert!(out.contains("nothing running"), "{out}");
}

/// `p2pctl up` whose output nobody reads any more (`p2pctl up | head`; a
/// full disk under `up -d`, whose output is its log): the cluster carries
/// on. The supervisor panicked on its first line, and its nodes died with
/// it.
#[test]
fn a_supervisor_whose_output_is_gone_keeps_its_cluster() {
    let c = TestCluster::new(&["alice", "bob"], "");
    let mut up = c
        .command(&["up"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("running p2pctl up");
    drop(up.stdout.take());
    wait_until("the supervisor to answer", || {
        c.ctl(&["ps", "--json"]).status.success().then_some(())
    });
    c.wait_ps("both nodes running", |rows| {
        rows.iter().filter(|r| r["state"] == "running").count() == 2
    });
    let out = c.ok(&["say", "bob", "still", "here"]);
    assert!(out.starts_with("delivered at seq "), "{out}");
    assert!(up.try_wait().unwrap().is_none(), "the supervisor ended");
    // Ctrl-C ends it as usual.
    kill(Pid::from_raw(up.id() as i32), Signal::SIGINT).unwrap();
    let status = wait_until("p2pctl up to end after Ctrl-C", || up.try_wait().unwrap());
    assert!(status.success(), "{status}");
    assert!(c.ctl(&["ps"]).status.code() != Some(0), "nothing runs after it");
}

/// A supervisor that no longer answers (stopped) gets a clear message
/// naming it and the fix, at once (before: "no answer within 10 s", and
/// 60 s for `down`), instead of a hang.
#[test]
fn a_stopped_supervisor_is_reported_not_waited_for() {
    let c = TestCluster::new(&["alice"], "");
    c.up();
    let pid = Pid::from_raw(c.supervisor_pid().unwrap());
    kill(pid, Signal::SIGSTOP).unwrap();
    let started = std::time::Instant::now();
    let out = c.ctl(&["ps"]);
    let took = started.elapsed();
    kill(pid, Signal::SIGCONT).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is stopped (SIGSTOP") && err.contains(&format!("kill -CONT {pid}")),
        "{err}"
    );
    assert!(took < std::time::Duration::from_secs(30), "took {took:?}");
    // And it answers again once continued.
    assert_eq!(c.ps().len(), 1);
}

#[test]
fn second_up_is_refused_clearly() {
    let c = TestCluster::new(&["alice", "bob"], "");
    c.up();
    let before = c.node_pids();
    let out = c.ctl(&["up", "-d"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running") && err.contains("down"), "{err}");
    assert_eq!(c.node_pids(), before, "nothing new was started");
}

#[test]
fn kill_coordinator_gives_exactly_one_new_coordinator() {
    let c = TestCluster::new(&["alice", "bob", "carol", "dave"], "");
    c.up();
    // `up` returns once every node is a voter of a settled voter set.
    assert!(c.ps().iter().all(|r| r["voter"] == true), "{:?}", c.ps());
    let out = c.ok(&["kill", "--coordinator"]);
    assert!(out.contains("alice") && out.contains("coordinator"), "{out}");
    let rows = c.wait_ps("one new coordinator at a later epoch", |rows| {
        let co = coordinators(rows);
        co.len() == 1 && co[0]["epoch"].as_u64() > Some(1) && co[0]["name"] != "alice"
    });
    let epoch = coordinators(&rows)[0]["epoch"].clone();
    // Killed by the user under on-failure: not restarted behind their back.
    let alice = TestCluster::row(&rows, "alice");
    assert_eq!(alice["state"], "exited", "{alice}");
    assert_eq!(alice["restarts"], 0);
    // Members follow the new epoch.
    c.wait_ps("members at the new epoch", |rows| {
        rows.iter()
            .filter(|r| r["state"] == "running")
            .all(|r| r["epoch"] == epoch)
    });
}

#[test]
fn restarted_node_rejoins_and_chat_agrees() {
    let c = TestCluster::new(&["alice", "bob", "carol"], "");
    c.up();
    let old = TestCluster::row(&c.ps(), "bob")["pid"].clone();
    c.ok(&["restart", "bob"]);
    c.wait_ps("bob back with a new pid", |rows| {
        let b = TestCluster::row(rows, "bob");
        b["state"] == "running" && b["pid"] != old && b["role"] == "member"
    });
    // `start` right after `kill` (before the supervisor has seen the exit)
    // starts it again once it is gone, instead of refusing.
    let old = TestCluster::row(&c.ps(), "carol")["pid"].clone();
    c.ok(&["kill", "carol"]);
    c.ok(&["start", "carol"]);
    c.wait_ps("carol back", |rows| {
        let r = TestCluster::row(rows, "carol");
        r["state"] == "running" && r["pid"] != old
    });
    let out = c.ok(&["say", "bob", "hello", "after", "restart"]);
    assert!(
        out.starts_with("delivered at seq "),
        "say reports the delivery: {out}"
    );
    // The tail first: lines may still be added, never removed.
    let tail = c.ok(&["logs", "--tail", "2", "bob"]);
    let all = c.ok(&["logs", "bob"]);
    assert_eq!(tail.lines().count(), 2, "{tail}");
    assert!(
        all.lines().count() > 2 && all.contains(&tail),
        "{all}\n--\n{tail}"
    );
    assert!(!all.contains('\x1b'), "no terminal codes in logs: {all}");
    c.ok(&["say", "alice", "welcome back"]);
    let out = c.ok(&["check"]);
    assert!(out.contains("3 nodes agree on 2 messages"), "{out}");
    let logs = c.ok(&["logs", "carol"]);
    assert!(logs.contains("bob: hello after restart"), "{logs}");
    let merged = c.ok(&["logs"]);
    assert!(merged.contains("alice") && merged.contains("carol"), "{merged}");
    assert!(
        !merged.contains("{\""),
        "every event reads as a sentence: {merged}"
    );
    // Read by a pipe that is closed at once (`p2pctl logs | head -1`):
    // the command ends quietly.
    let out = c.ctl_unread(&["logs"]);
    assert!(out.status.success(), "p2pctl logs | true: {out:?}");
    // Following, read by `head -1`: it ends once head has its line, even
    // though no new line comes to fail to print.
    let mut follow = c
        .command(&["logs", "-f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("running p2pctl logs -f");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(follow.stdout.take().expect("stdout")),
        &mut first,
    )
    .expect("a first line");
    assert!(!first.is_empty());
    let status = crate::util::wait_until("p2pctl logs -f to end after its reader left", || {
        follow.try_wait().expect("p2pctl logs -f")
    });
    assert!(status.success(), "{status}");
}

/// Restarting every node at once (a `p2pctl restart` of each in the same
/// moment) ends the chat, as nodes keep nothing on disk; the cluster must
/// come back as one chat, not several side by side. Before, a node started
/// while the others restarted was given nobody to join and started a chat
/// of its own, every restarted node could start one, and a node left in
/// the old chat stayed there, dialling its own address.
#[test]
fn restarting_every_node_at_once_brings_back_one_chat() {
    let _heavy = crate::util::heavy();
    let names = ["alice", "bob", "carol"];
    // A node that finds nobody in a chat waits 50 heartbeats before it
    // starts one: keep a storm well inside the test's deadline.
    let c = TestCluster::with_heartbeat(&names, "", 50);
    c.up();
    for storm in 0..2 {
        c.ok(&["kill", "--coordinator"]);
        let restarts: Vec<_> = names
            .iter()
            .map(|n| {
                c.command(&["restart", n])
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("running p2pctl restart")
            })
            .collect();
        for mut r in restarts {
            assert!(r.wait().expect("p2pctl restart ran").success());
        }
        c.wait_ps(&format!("storm {storm}: three nodes in one chat"), |rows| {
            all_running(3)(rows) && coordinators(rows).len() == 1 && c.ctl(&["check"]).status.success()
        });
    }
    assert_one_chat(&c, 3);
}

/// Three nodes of five killed at once (SIGKILL from outside, so p2pctl
/// restarts them): the restarted three start a new chat, and the two
/// survivors, whose chat can never confirm a message again, end it and are
/// restarted into the new one. Before, the survivors waited in the dead
/// chat for ever and `check` reported two chats.
#[test]
fn killing_a_majority_at_once_brings_back_one_chat() {
    let _heavy = crate::util::heavy();
    let names = ["alice", "bob", "carol", "dave", "erin"];
    let c = TestCluster::with_heartbeat(&names, "", 50);
    c.up();
    let rows = c.wait_ps("five voters", |rows| {
        all_running(5)(rows) && coordinators(rows).len() == 1 && rows.iter().all(|r| r["voter"] == true)
    });
    // The coordinator and two others, at once: all three are stopped
    // first, then killed, the coordinator last, so no survivor hears of one
    // death before the others and no coordinator is left to take the dead
    // out of the voter set one by one (which keeps a chat going: kills
    // spread in time are fine, and a loaded machine spread them).
    let coordinator = coordinators(&rows)[0]["name"]
        .as_str()
        .expect("a name")
        .to_string();
    let mut doomed: Vec<String> = names
        .iter()
        .map(|n| n.to_string())
        .filter(|n| *n != coordinator && n != "bob" && n != "erin")
        .take(2)
        .collect();
    doomed.push(coordinator);
    assert!(!doomed.iter().any(|n| n == "bob" || n == "erin"), "{doomed:?}");
    let pids: Vec<nix::unistd::Pid> = doomed
        .iter()
        .map(|n| {
            nix::unistd::Pid::from_raw(
                TestCluster::row(&rows, n)["pid"]
                    .as_i64()
                    .expect("a running node's pid") as i32,
            )
        })
        .collect();
    for signal in [
        nix::sys::signal::Signal::SIGSTOP,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        for pid in &pids {
            nix::sys::signal::kill(*pid, signal).expect("signalling a node");
        }
    }
    // The supervisor first sees the three gone (the cluster looked whole
    // for a moment after the kills, and a loaded machine once checked it
    // then: the survivors had not ended anything yet).
    c.wait_ps("the killed nodes seen gone", |rows| {
        rows.iter().all(|r| {
            pids.iter()
                .all(|p| r["pid"].as_i64() != Some(i64::from(p.as_raw())))
        })
    });
    let rows = c.wait_ps("five nodes in one chat again", |rows| {
        all_running(5)(rows) && coordinators(rows).len() == 1 && c.ctl(&["check"]).status.success()
    });
    for survivor in ["bob", "erin"] {
        let row = TestCluster::row(&rows, survivor);
        assert_eq!(row["restarts"], 1, "{survivor} did not end the old chat: {row}");
        let log = std::fs::read_to_string(c.state_dir().join("logs").join(format!("{survivor}.log")))
            .unwrap_or_default();
        assert!(
            log.contains("this chat is over"),
            "{survivor}'s log says nothing of ending its chat:\n{log}"
        );
    }
    assert_one_chat(&c, 5);
}

/// `say` reports what became of its own line, not of another line the
/// same node posted just before it: with the other voters paused, a post
/// waits at the coordinator, `say`'s line queues behind it, and once the
/// voters run again the other line is delivered first.
#[test]
fn say_reports_its_own_line_not_one_queued_before_it() {
    let c = TestCluster::new(&["alice", "bob", "carol"], "");
    c.up();
    let rows = c.wait_ps("three voters", |rows| {
        all_running(3)(rows) && coordinators(rows).len() == 1 && rows.iter().all(|r| r["voter"] == true)
    });
    let coord = coordinators(&rows)[0];
    let name = coord["name"].as_str().unwrap().to_string();
    let addr = coord["addr"].as_str().unwrap().to_string();
    let key = p2p_proto::secure::read_key_file(&c.state_dir().join("chat.key")).expect("the cluster's key");
    let connect = || match Raw::connect_with(&addr, &key) {
        Handshake::Done(raw) => raw,
        _ => panic!("the coordinator {name} at {addr} refused the cluster's key"),
    };
    let queued = || {
        let mut raw = connect();
        raw.send(&Frame::StatusRequest { log: false });
        match raw.read_until("status", |f| matches!(f, Frame::Status { .. })) {
            Frame::Status { queued, .. } => queued,
            _ => unreachable!(),
        }
    };
    let paused: Vec<Pid> = rows
        .iter()
        .filter(|r| r["role"] != "coordinator")
        .map(|r| Pid::from_raw(r["pid"].as_i64().unwrap() as i32))
        .collect();
    for p in &paused {
        kill(*p, Signal::SIGSTOP).unwrap();
    }
    let mut raw = connect();
    raw.send(&Frame::Post {
        text: "posted first".into(),
    });
    let first = raw.read_until("posted", |f| matches!(f, Frame::Posted { .. }));
    assert_eq!(
        first,
        Frame::Posted { client_seq: 1 },
        "the node's first own line"
    );
    assert_eq!(queued(), 1, "no majority: the line waits");
    let say = c
        .command(&["say", &name, "said second"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running p2pctl say");
    wait_until("say's line to queue behind the first", || {
        (queued() == 2).then_some(())
    });
    for p in &paused {
        kill(*p, Signal::SIGCONT).unwrap();
    }
    let out = say.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seq: u64 = stdout
        .trim()
        .strip_prefix("delivered at seq ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("say reports its own line, unchanged: {stdout}"));
    wait_until("both lines delivered", || (queued() == 0).then_some(()));
    let logs = c.ok(&["logs", &name]);
    let first_at = logs
        .find(&format!("{name}: posted first"))
        .expect("the first line delivered");
    let second_at = logs
        .find(&format!("{name}: said second"))
        .expect("say's line delivered");
    assert!(first_at < second_at, "delivered in the order queued: {logs}");
    assert!(seq >= 2, "say's line comes after the first: seq {seq}");
}

/// A node that cannot make progress is shown waiting, with its reason, by
/// `ps` (the README's promise for a minority), and no longer once the
/// majority is back.
#[test]
fn ps_shows_a_node_waiting_for_a_majority_until_it_is_back() {
    let c = TestCluster::new(&["alice", "bob", "carol"], "");
    c.up();
    c.wait_ps("three voters", |rows| {
        all_running(3)(rows) && coordinators(rows).len() == 1 && rows.iter().all(|r| r["voter"] == true)
    });
    c.ok(&["kill", "bob", "--signal", "STOP"]);
    c.ok(&["kill", "carol", "--signal", "STOP"]);
    let rows = c.wait_ps("alice waiting", |rows| rows[0]["waiting"].is_string());
    let why = rows[0]["waiting"].as_str().unwrap();
    assert!(why.contains("majority"), "{why}");
    let table = c.ok(&["ps"]);
    let alice = table.lines().find(|l| l.starts_with("alice")).unwrap();
    assert!(alice.contains("waiting"), "{table}");
    assert!(table.contains("alice waits: "), "{table}");
    c.ok(&["kill", "bob", "--signal", "CONT"]);
    c.ok(&["kill", "carol", "--signal", "CONT"]);
    c.wait_ps("nobody waiting, one coordinator", |rows| {
        all_running(3)(rows) && coordinators(rows).len() == 1 && rows.iter().all(|r| r["waiting"].is_null())
    });
    assert!(!c.ok(&["ps"]).contains("waits:"));
    assert_one_chat(&c, 3);
}

/// The wait behind `up`'s "is up" (newcomers become voters) no longer
/// waits for a node killed meanwhile: its address refuses connections, so
/// it is gone. It waited out its whole limit, and "is up" came 10 s late.
#[test]
fn the_start_up_wait_does_not_wait_for_a_node_that_is_gone() {
    use crate::util::{chat_key, wait_voters, Node};
    let a = Node::join("alice", &[]);
    let b = Node::join("bob", &["--join", &a.addr]);
    wait_voters(&[&a, &b]);
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let key = Some(std::sync::Arc::new(chat_key()));
    let addrs = [a.addr.clone(), b.addr.clone(), gone];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let settled = runtime.block_on(p2p_ctl::check::wait_settled(
        &addrs,
        std::time::Duration::from_secs(10),
        &key,
    ));
    assert!(settled, "alice and bob agree; the third address is nobody's");
}

/// `check` never leaves a node out quietly: a hung one makes it disagree
/// (exit 1, naming the node), and once it runs again the nodes agree.
#[test]
fn check_names_a_hung_node_and_exits_1_until_it_answers() {
    let c = TestCluster::new(&["alice", "bob", "carol"], "");
    c.up();
    c.wait_ps("three voters", |rows| {
        all_running(3)(rows) && coordinators(rows).len() == 1 && rows.iter().all(|r| r["voter"] == true)
    });
    c.ok(&["say", "alice", "before the pause"]);
    let rows = c.ps();
    let hung = rows
        .iter()
        .find(|r| r["role"] != "coordinator")
        .expect("a member")
        .clone();
    let name = hung["name"].as_str().unwrap().to_string();
    let pid = Pid::from_raw(hung["pid"].as_i64().unwrap() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let out = c.ctl(&["check"]);
    kill(pid, Signal::SIGCONT).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with(&format!("DISAGREE: cannot check {name} at "))
            && stdout.contains("the others agree"),
        "{stdout}"
    );
    c.ok(&["say", "bob", "after the pause"]);
    let out = c.ok(&["check"]);
    assert!(out.starts_with("ok: 3 nodes agree on 2 messages"), "{out}");
}

#[test]
fn crashing_node_restarts_with_backoff_then_fails() {
    let extra =
        "restart:\n  policy: on-failure\n  max_restarts: 2\n  backoff_ms: 20\n  max_backoff_ms: 100\n";
    let c = TestCluster::new(&["alice", "bob"], extra);
    c.up();
    for round in 1..=2u64 {
        let pid = TestCluster::row(&c.ps(), "bob")["pid"].as_i64().unwrap() as i32;
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap(); // a crash, not p2pctl kill
        c.wait_ps(&format!("restart {round}"), |rows| {
            let b = TestCluster::row(rows, "bob");
            b["restarts"] == round && b["state"] == "running" && b["pid"].as_i64() != Some(pid as i64)
        });
    }
    let pid = TestCluster::row(&c.ps(), "bob")["pid"].as_i64().unwrap() as i32;
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let rows = c.wait_ps("bob failed", |rows| {
        TestCluster::row(rows, "bob")["state"] == "failed"
    });
    assert_eq!(TestCluster::row(&rows, "bob")["restarts"], 2);
    assert!(TestCluster::row(&rows, "bob")["last_exit"]
        .as_str()
        .unwrap()
        .contains("SIGKILL"));
    // `start` tries again.
    c.ok(&["start", "bob"]);
    c.wait_ps("bob running again", all_running(2));
}

#[test]
fn always_policy_restarts_even_after_kill() {
    let c = TestCluster::new(
        &["alice", "bob"],
        "restart:\n  policy: always\n  backoff_ms: 10\n",
    );
    c.up();
    c.ok(&["kill", "bob", "--signal", "TERM"]);
    c.wait_ps("bob restarted", |rows| {
        let b = TestCluster::row(rows, "bob");
        b["restarts"] == 1 && b["state"] == "running"
    });
    // `stop` is the way to keep it down.
    c.ok(&["stop", "bob"]);
    c.wait_ps("bob stopped", |rows| {
        TestCluster::row(rows, "bob")["state"] == "stopped"
    });
    let out = c.ok(&["stop", "bob"]);
    assert!(out.contains("bob is not running"), "a second stop says so: {out}");
}

#[test]
fn sigkill_of_the_supervisor_takes_its_nodes_with_it() {
    let c = TestCluster::new(&["alice", "bob", "carol"], "");
    c.up();
    let pids = c.node_pids();
    assert_eq!(pids.len(), 3);
    kill(Pid::from_raw(c.supervisor_pid().unwrap()), Signal::SIGKILL).unwrap();
    for pid in pids {
        wait_until(&format!("node pid {pid} to die with its supervisor"), || {
            (!alive(pid)).then_some(())
        });
    }
}

#[test]
fn check_agrees_after_several_failovers_under_traffic() {
    let c = TestCluster::new(&["alice", "bob", "carol", "dave", "erin"], "");
    c.up();
    let mut said = 0;
    let nodes = ["alice", "bob", "carol", "dave", "erin"];
    for round in 0..3 {
        for node in &nodes[round..] {
            c.ok(&["say", node, &format!("round {round} from {node}")]);
            said += 1;
        }
        let before = coordinators(&c.ps())[0]["epoch"].as_u64().unwrap();
        let out = c.ok(&["kill", "--coordinator"]);
        assert!(
            out.contains(nodes[round]),
            "the earliest-joined survivor coordinates: {out}"
        );
        for node in &nodes[round + 1..] {
            c.ok(&["say", node, &format!("during failover {round} from {node}")]);
            said += 1;
        }
        // A later epoch, and the dead no longer a voter (a quorum of the
        // remaining voters is then alive for the next kill).
        c.wait_ps("a new coordinator and a settled voter set", |rows| {
            let co = coordinators(rows);
            co.len() == 1
                && co[0]["epoch"].as_u64() > Some(before)
                && rows
                    .iter()
                    .filter(|r| r["state"] == "running")
                    .all(|r| r["voter"] == true)
                && rows.iter().filter(|r| r["voter"] == true).count() == 4 - round
        });
    }
    let out = c.ok(&["check"]);
    assert!(
        out.starts_with(&format!("ok: 2 nodes agree on {said} messages")),
        "{out}"
    );
    // Bring the killed ones back; they catch up and agree too.
    for node in ["alice", "bob", "carol"] {
        c.ok(&["start", node]);
    }
    c.wait_ps("all running", all_running(5));
    let out = c.ok(&["check"]);
    assert!(
        out.starts_with(&format!("ok: 5 nodes agree on {said} messages")),
        "{out}"
    );
}

fn validate_err(yaml: &str) -> String {
    let dir = std::env::temp_dir().join(format!(
        "p2pctl-bad-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    std::fs::write(&file, yaml).unwrap();
    let run = |cmd: &str| {
        Command::new(bin("p2pctl"))
            .arg("-f")
            .arg(&file)
            .arg(cmd)
            .output()
            .expect("p2pctl")
    };
    let out = run("validate");
    assert!(!out.status.success(), "validate accepted:\n{yaml}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    // `up` refuses the same file and starts nothing.
    let up = run("up");
    assert!(!up.status.success());
    assert!(
        !Path::new(&dir).join(".p2pctl").exists(),
        "up created state for a bad file"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    err
}

#[test]
fn each_bad_cluster_file_gets_its_own_clear_error() {
    let err = validate_err("name: x\nnodes:\n  - name: a\n    port: 7000\n    colour: red\n");
    assert!(
        err.contains("bad.yaml:5") && err.contains("unknown field `colour`"),
        "{err}"
    );
    let err = validate_err("name: x\nnodes:\n  - name: a\n    port: 1\n  - name: a\n    port: 2\n");
    assert!(err.contains("bad.yaml:5") && err.contains("used twice"), "{err}");
    let err = validate_err("name: x\nnodes:\n  - name: a\n    port: 9\n  - name: b\n    port: 9\n");
    assert!(err.contains("bad.yaml:6") && err.contains("port 9"), "{err}");
    let err = validate_err("name: x\nhost: my-laptop\nnodes:\n  - name: a\n    port: 1\n");
    assert!(
        err.contains("bad.yaml:2") && err.contains("not an IP address"),
        "{err}"
    );
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let err = validate_err(&format!(
        "name: x\nnodes:\n  - name: a\n    port: 0\n  - name: b\n    port: {port}\n"
    ));
    assert!(
        err.contains("bad.yaml:6") && err.contains("already in use"),
        "{err}"
    );
    let err = validate_err("name: x\nnodes: [\n");
    assert!(err.contains("bad.yaml"), "{err}");
    // Several problems: all of them, each at its line.
    let err = validate_err("name: x\nhost: my-laptop\nheartbeat_ms: 5\nnodes:\n  - name: a\n    port: 1\n  - name: a\n    port: 2\n");
    assert!(
        err.contains("bad.yaml:2: host")
            && err.contains("bad.yaml:3: heartbeat_ms")
            && err.contains("bad.yaml:7")
            && err.contains("used twice"),
        "{err}"
    );
    let err = validate_err("\n");
    assert!(
        err.contains("bad.yaml is empty") && err.contains("cluster.example.yaml"),
        "{err}"
    );
    let err = validate_err("name: x\nnodes:\n  - name: a\n    port: 70000\n");
    assert!(
        err.contains("bad.yaml:4") && err.contains("a port number from 0 to 65535") && !err.contains("u16"),
        "{err}"
    );
    // Plugins are loaded before anything starts; each refusal points at
    // its entry in the file.
    let err = validate_err(
        "name: x\nnodes:\n  - name: a\n    port: 0\nplugins:\n  - name: echo\n  - name: nosuchbot\n  - name: moderation\n    config: { banned: spam }\n",
    );
    assert!(
        err.contains("bad.yaml:7: plugin nosuchbot cannot be loaded") && err.contains("no file at"),
        "{err}"
    );
    assert!(
        err.contains("bad.yaml:8: plugin moderation cannot be loaded") && err.contains("expected a sequence"),
        "{err}"
    );
    assert!(!err.contains("plugin echo"), "{err}");
}

#[test]
fn foreground_up_streams_events_and_ctrl_c_stops_everything() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let c = TestCluster::new(&["alice", "bob", "carol"], "");
    let mut up = c
        .command(&["up"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read stdout as it comes: a user acts once "is up" is shown, which
    // follows the last node's ready line by as long as the newcomers take
    // to become voters (under load, long enough for the steps below to
    // start first and Ctrl-C to end start-up before it is shown).
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        let stdout = up.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        })
    };
    wait_until("p2pctl up to say the cluster is up", || {
        let lines = lines.lock().unwrap();
        lines
            .iter()
            .any(|l| l.starts_with("cluster") && l.contains("is up"))
            .then_some(())
    });
    let rows = c.wait_ps("all running", all_running(3));
    let pids: Vec<i32> = rows
        .iter()
        .filter_map(|r| r["pid"].as_i64())
        .map(|p| p as i32)
        .collect();
    c.ok(&["say", "bob", "hello from the test"]);
    c.ok(&["kill", "--coordinator"]);
    c.wait_ps("bob leads", |rows| {
        coordinators(rows).first().is_some_and(|r| r["name"] == "bob")
    });
    kill(Pid::from_raw(up.id() as i32), Signal::SIGINT).unwrap();
    let status = wait_until("p2pctl up to exit", || up.try_wait().ok().flatten());
    assert!(status.success(), "Ctrl-C exits 0");
    for pid in pids {
        wait_until(&format!("node {pid} gone"), || (!alive(pid)).then_some(()));
    }
    reader.join().unwrap();
    let text = lines.lock().unwrap().join("\n");
    assert!(text.contains("hello from the test"), "chat is streamed: {text}");
    assert!(
        text.lines()
            .any(|l| l.contains("bob") && l.contains("★ coordinator (epoch")),
        "the election is streamed: {text}"
    );
    assert!(text.contains("stopped"), "{text}");
}

/// The story `cargo xtask demo` runs, with the cluster file named relative
/// to where p2pctl starts (as a newcomer runs it): every step, the key
/// shown and a stranger refused, agreement, the transcript, teardown.
#[test]
fn the_demo_story_runs_from_a_relative_cluster_file() {
    let extra =
        "plugins:\n  - name: echo\n  - name: logger\n    config: { path: transcript.jsonl, flush: every }\n";
    let c = TestCluster::new(&["alice", "bob", "carol", "dave"], extra);
    let out = Command::new(bin("p2pctl"))
        .current_dir(&c.dir)
        .args(["-f", "cluster.yaml", "demo", "--pace-ms", "0"])
        .env("NO_COLOR", "1")
        .output()
        .expect("running p2pctl demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "chat key ./.p2pctl/",
        "is turned away: ",
        "uses another chat key",
        // The earliest-joined survivor takes over; in which epoch is not
        // the point (under load an election may take a second round).
        "bob | ★ coordinator (epoch ",
        "still echoing after the failover [bot]",
        "was dropped by the rate limit",
        "check: all 4 nodes agree on",
        "holds every agreed message",
        "nothing left running",
    ] {
        assert!(stdout.contains(want), "the demo never said {want:?}:\n{stdout}");
    }
    let key = c.state_dir().join("chat.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the chat key is readable by others");
    assert!(c.supervisor_pid().is_none_or(|p| !alive(p)));
}

/// `attach --config @FILE` reads a file a person wrote: no further than
/// its limit (a path to /dev/zero was read without end), and says so.
#[test]
fn attach_reads_a_config_file_no_further_than_its_limit() {
    let c = TestCluster::new(&["alice"], "");
    let out = c.ctl(&["attach", "echo", "--config", "@/dev/zero"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && err.contains("/dev/zero") && err.contains("more than 64 KiB"),
        "{out:?}"
    );
}

/// Shell completions, the manual page and --version come from the same
/// command definition, and name the binary as users type it.
#[test]
fn completions_man_page_and_version_name_p2pctl() {
    let run = |args: &[&str]| {
        let out = Command::new(bin("p2pctl")).args(args).output().expect("p2pctl");
        assert!(out.status.success(), "p2pctl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bash = run(&["completions", "bash"]);
    assert!(
        bash.contains("_p2pctl") && bash.contains("watch") && bash.contains("--coordinator"),
        "{bash}"
    );
    let man = run(&["man"]);
    assert!(man.contains(".TH p2pctl") && man.contains("watch"), "{man}");
    let version = run(&["--version"]);
    assert!(version.starts_with("p2pctl "), "{version}");
    let node = Command::new(bin("p2pnode")).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&node.stdout).starts_with("p2pnode "));
    // A reader that leaves at once (`| head -1`) is not an error; a full
    // disk is, said in one line (generating into stdout panicked on both).
    for args in [&["completions", "zsh"][..], &["man"]] {
        let mut early = Command::new(bin("p2pctl"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(early.stdout.take());
        let out = early.wait_with_output().unwrap();
        assert!(out.status.success(), "p2pctl {args:?} | head: {out:?}");
        let full = Command::new(bin("p2pctl"))
            .args(args)
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&full.stderr);
        assert!(
            full.status.code() == Some(1)
                && err.starts_with("p2pctl: cannot write to stdout")
                && !err.contains("panicked"),
            "p2pctl {args:?} > /dev/full: {full:?}"
        );
    }
}

/// `plugin_dir` in the cluster file: bots built anywhere (say a debug
/// build of your own) load from there; a wrong directory is refused at its
/// line.
#[test]
fn plugins_load_from_the_plugin_dir_the_cluster_file_names() {
    let c = TestCluster::new(&["alice"], "plugin_dir: mybots\nplugins:\n  - name: echo\n");
    let lib = format!(
        "{}echo{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let err = String::from_utf8_lossy(&c.ctl(&["validate"]).stderr).into_owned();
    assert!(
        err.contains("cluster.yaml:7") && err.contains("plugin_dir \"mybots\" is not a directory"),
        "{err}"
    );
    std::fs::create_dir_all(c.dir.join("mybots")).unwrap();
    let err = String::from_utf8_lossy(&c.ctl(&["validate"]).stderr).into_owned();
    assert!(
        err.contains("plugin echo cannot be loaded") && err.contains("mybots"),
        "{err}"
    );
    std::fs::copy(crate::util::bin_dir().join(&lib), c.dir.join("mybots").join(&lib)).unwrap();
    let out = c.ok(&["validate"]);
    assert!(out.contains("1 plugin (each loads)"), "{out}");
    c.up();
    let plugins: Vec<Value> = serde_json::from_str(&c.ok(&["plugins", "--json"])).unwrap();
    assert_eq!(plugins[0]["name"], "echo");
    assert_eq!(plugins[0]["state"], "active");
}

/// `${VAR}` and `${VAR:-default}` in the cluster file come from the
/// environment p2pctl runs in.
#[test]
fn cluster_files_take_variables_from_the_environment() {
    let c = TestCluster::new(&[], "  - name: ${NODE_NAME:-solo}\n    port: ${NODE_PORT:-0}\n");
    let validate = |vars: &[(&str, &str)]| {
        c.command(&["validate"])
            .env_remove("NODE_NAME")
            .envs(vars.iter().copied())
            .output()
            .expect("p2pctl")
    };
    let out = validate(&[]);
    assert!(out.status.success(), "{out:?}");
    let out = validate(&[("NODE_NAME", "from-env")]);
    assert!(out.status.success(), "{out:?}");
    // The value is used: an invalid one is refused by name.
    let out = validate(&[("NODE_NAME", "no/slashes")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no/slashes"), "{err}");
    std::fs::write(&c.file, "name: ${UNSET_CLUSTER_NAME}\nnodes: []\n").unwrap();
    let out = validate(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("cluster.yaml:1: environment variable UNSET_CLUSTER_NAME is not set"),
        "{err}"
    ); // A value YAML reads as syntax names its variable and the fix.
    std::fs::write(&c.file, "name: ${CLUSTER_NAME}\nnodes: []\n").unwrap();
    let out = validate(&[("CLUSTER_NAME", "a: b")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("cluster.yaml:1")
            && err.contains("${CLUSTER_NAME} from the environment")
            && err.contains("\"${CLUSTER_NAME}\""),
        "{err}"
    );
    // Quoted as advised, it is read as a value (and refused as a name).
    std::fs::write(&c.file, "name: \"${CLUSTER_NAME}\"\nnodes: []\n").unwrap();
    let out = validate(&[("CLUSTER_NAME", "a: b")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("a: b") && !err.contains("from the environment"),
        "{err}"
    );
    // A line break is refused by name.
    let out = validate(&[("CLUSTER_NAME", "a\nnodes: [x]")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("CLUSTER_NAME holds a line break"),
        "{err}"
    );
}
