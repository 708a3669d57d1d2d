//! `p2pctl watch` as a user runs it: the real binary in a pseudo-terminal
//! (tmux), driven by keys, read from the screen.

use std::process::Command;

use crate::ctl::TestCluster;
use crate::util::{bin, wait_until};

/// A private tmux server running one command in a 160×45 pane; killed on
/// drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket = format!("p2p-test-{}-{n}", std::process::id());
        let t = Tmux { socket };
        // Keep the pane after the command ends, to read what it printed.
        let shell = format!("{command}; echo \"watch exited with $?\"; sleep 600");
        t.run(&["new-session", "-d", "-s", "w", "-x", "160", "-y", "45", &shell]);
        t
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("tmux is required for this test (apt-get install tmux; .ci/run installs it)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "w"])
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "w"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Waits until every one of `want` is on the screen; returns it.
    fn wait_for(&self, what: &str, want: &[&str]) -> String {
        let mut last = String::new();
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_until(what, || {
                last = self.screen();
                want.iter().all(|w| last.contains(w)).then(|| last.clone())
            })
        }));
        match found {
            Ok(screen) => screen,
            Err(_) => panic!("timed out waiting for {what}; the screen:\n{}", self.screen()),
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

#[test]
fn the_dashboard_follows_a_failover_driven_from_its_keys() {
    let c = TestCluster::new(&["alice", "bob", "carol"], "plugins:\n  - name: echo\n");
    c.up();
    let command = format!("{} -f {} watch", bin("p2pctl").display(), c.file.display());
    let t = Tmux::start(&command);
    t.wait_for(
        "the dashboard",
        &[
            "coordinator alice (epoch 1)",
            "▶ alice",
            "c kill coordinator",
            "echo",
        ],
    );

    // Kill the coordinator with one key; the timeline shows who took over
    // (the earliest-joined survivor, in whichever epoch its election ends).
    t.keys(&["c"]);
    t.wait_for(
        "the failover row",
        &["SIGKILL (p2pctl)", "bob (e", "coordinator bob (epoch "],
    );

    // Say something as carol (two rows down): chat flows in the new epoch.
    t.keys(&["j", "j", "m"]);
    t.wait_for("the prompt", &["say as carol>"]);
    t.keys(&["-l", "after the kill"]);
    t.keys(&["Enter"]);
    let screen = t.wait_for("carol's line in the chat", &["carol: after the kill", " ms"]);
    assert!(
        !screen.contains("…  "),
        "a failover column never filled:\n{screen}"
    );

    // The agreement check, from the dashboard.
    t.keys(&["v"]);
    t.wait_for("the check", &["check: all 2 nodes agree"]);

    // q leaves the dashboard, restores the terminal, keeps the cluster.
    t.keys(&["q"]);
    let screen = t.wait_for("the exit", &["watch exited with 0", "keeps running"]);
    assert!(
        !screen.contains("c kill coordinator"),
        "the dashboard is still on the screen after quitting:\n{screen}"
    );
    let rows = c.ps();
    let running = rows.iter().filter(|r| r["state"] == "running").count();
    assert_eq!(running, 2, "the cluster kept running: {rows:?}");
}

/// `p2pctl up` on a terminal opens the dashboard on the cluster it starts;
/// quitting it stops that cluster.
#[test]
fn up_on_a_terminal_opens_the_dashboard_and_quitting_stops_the_cluster() {
    let c = TestCluster::new(&["alice", "bob"], "");
    let command = format!("{} -f {} up", bin("p2pctl").display(), c.file.display());
    let t = Tmux::start(&command);
    t.wait_for(
        "the dashboard",
        &["coordinator alice (epoch 1)", "running", "q quit"],
    );
    let pids = c.node_pids();
    assert_eq!(pids.len(), 2);
    t.keys(&["q"]);
    t.wait_for("the exit", &["watch exited with 0"]);
    for pid in pids {
        wait_until(&format!("node pid {pid} to stop"), || {
            (!crate::ctl::alive(pid)).then_some(())
        });
    }
}
