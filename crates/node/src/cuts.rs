//! Network cuts between real processes, for fault testing (`p2pnode
//! --cut-file`, used by `cargo xtask torture --partitions`).
//!
//! Every test and benchmark here runs on 127.0.0.1, where a firewall cannot
//! tell one node's connections from another's, so a partition is made
//! inside the nodes. The cut file lists, one per line, the addresses this
//! node is cut off from (as it dials them: the peers' advertised
//! addresses); the node reads it every tick. A harness writes both sides
//! of a cut. A line `nodial ADDR` is a one-way cut: this node cannot open
//! a connection to ADDR (as behind a firewall or a NAT in one direction),
//! while every open connection, and ADDR's own dials to this node, carry
//! on.
//!
//! A cut behaves like a network that silently stops carrying packets, not
//! like a closed connection:
//! - on a connection this node dialled to a cut address, nothing read is
//!   handed on (a frame, an end of stream) and nothing is written, in
//!   either direction, until the cut heals; bytes wait in the queue (and a
//!   member over its queue limit is dropped as a slow consumer), what the
//!   kernel already holds waits there, and order is kept;
//! - a new dial to a cut address waits for the cut to heal, and after the
//!   dial time limit fails as "timed out connecting" (never "refused": a
//!   refusal proves the peer dead);
//! - a one-frame notification to a cut address is lost.
//!
//! Not modelled: links that lose or delay some packets only, and the key
//! handshake of a connection that was already connecting when the cut
//! began (it completes; what follows is held).
//!
//! Only the dialling side needs to know the other's address: every
//! connection has a dialler, and it holds both directions. So does a
//! connection the harness opens itself (status requests): never cut.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// Largest cut file read (bigger files are ignored with a warning).
const MAX_CUT_FILE: u64 = 64 * 1024;

/// Holds one connection's traffic while it is cut.
#[derive(Default)]
pub struct Gate {
    cut: AtomicBool,
    open: Notify,
}

impl Gate {
    pub fn set(&self, cut: bool) {
        self.cut.store(cut, Ordering::Release);
        if !cut {
            self.open.notify_waiters();
        }
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// Returns at once if open, else when the cut heals.
    pub async fn pass(&self) {
        while self.is_cut() {
            let opened = self.open.notified();
            tokio::pin!(opened);
            // Registered before the check: a heal in between is not missed.
            opened.as_mut().enable();
            if !self.is_cut() {
                return;
            }
            opened.await;
        }
    }
}

/// What the cut file says.
#[derive(Debug, Default, PartialEq, Eq)]
struct Cuts {
    /// Cut off both ways.
    both: HashSet<String>,
    /// This node cannot dial them (one-way).
    no_dial: HashSet<String>,
}

impl Cuts {
    fn parse(text: &str) -> Cuts {
        let mut cuts = Cuts::default();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.strip_prefix("nodial ") {
                Some(addr) => cuts.no_dial.insert(addr.trim().to_string()),
                None => cuts.both.insert(line.to_string()),
            };
        }
        cuts
    }
}

/// The addresses this node is cut off from now, shared with dial tasks.
#[derive(Default)]
pub struct CutSet {
    cuts: Mutex<Cuts>,
    changed: Notify,
}

impl CutSet {
    fn cuts(&self) -> std::sync::MutexGuard<'_, Cuts> {
        self.cuts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether traffic to and from `addr` is held (a two-way cut).
    pub fn is_cut(&self, addr: &str) -> bool {
        self.cuts().both.contains(addr)
    }

    /// Whether a connection to `addr` can be opened now.
    pub fn may_dial(&self, addr: &str) -> bool {
        let cuts = self.cuts();
        !cuts.both.contains(addr) && !cuts.no_dial.contains(addr)
    }

    /// Waits until `addr` may be dialled; false if that takes longer than
    /// `limit`.
    pub async fn wait_open(&self, addr: &str, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.may_dial(addr) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    fn replace(&self, cuts: Cuts) {
        *self.cuts() = cuts;
        self.changed.notify_waiters();
    }
}

/// The cut file and what was last read from it.
pub struct CutFile {
    path: PathBuf,
    last: Option<String>,
    pub set: Arc<CutSet>,
}

impl CutFile {
    pub fn new(path: PathBuf) -> CutFile {
        CutFile {
            path,
            last: None,
            set: Arc::default(),
        }
    }

    /// Reads the file again; true if the set changed. A missing file cuts
    /// nothing.
    pub fn reload(&mut self) -> bool {
        let text = match std::fs::metadata(&self.path) {
            Ok(m) if m.len() > MAX_CUT_FILE => {
                tracing::warn!(path = %self.path.display(), "cut file over {MAX_CUT_FILE} bytes, ignored");
                return false;
            }
            Ok(_) => match std::fs::read_to_string(&self.path) {
                Ok(text) => text,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot read the cut file (one address per line, UTF-8); keeping the cuts as they were");
                    return false;
                }
            },
            // Missing: nothing is cut.
            Err(_) => String::new(),
        };
        if self.last.as_deref() == Some(text.as_str()) {
            return false;
        }
        let cuts = Cuts::parse(&text);
        tracing::info!(cut = ?cuts.both, no_dial = ?cuts.no_dial, "cut file changed");
        self.set.replace(cuts);
        self.last = Some(text);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_gate_holds_until_the_cut_heals() {
        let gate = Arc::new(Gate::default());
        gate.pass().await; // open: passes at once
        gate.set(true);
        let g = gate.clone();
        let waiting = tokio::spawn(async move { g.pass().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        gate.set(false);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the gate opened")
            .expect("the task ran");
    }

    #[tokio::test]
    async fn the_cut_file_is_read_again_and_a_dial_waits_for_the_heal() {
        let dir = std::env::temp_dir().join(format!("p2p-cuts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("n0.cut");
        let _ = std::fs::remove_file(&path);
        let mut file = CutFile::new(path.clone());
        assert!(file.reload(), "the first read sets the (empty) set");
        assert!(!file.set.is_cut("127.0.0.1:1"));
        std::fs::write(&path, "# cut off\n127.0.0.1:1\n\n 127.0.0.1:2 \n").expect("write");
        assert!(file.reload());
        assert!(file.set.is_cut("127.0.0.1:1") && file.set.is_cut("127.0.0.1:2"));
        assert!(!file.reload(), "unchanged");
        assert!(!file.set.wait_open("127.0.0.1:1", Duration::from_millis(20)).await);
        let set = file.set.clone();
        let dial = tokio::spawn(async move { set.wait_open("127.0.0.1:1", Duration::from_secs(10)).await });
        std::fs::write(&path, "127.0.0.1:2\n").expect("write");
        assert!(file.reload());
        assert!(
            dial.await.expect("the task ran"),
            "the dial went ahead once healed"
        );
        assert!(file.set.is_cut("127.0.0.1:2"));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[tokio::test]
    async fn a_one_way_cut_stops_dials_but_holds_no_traffic() {
        let set = CutSet::default();
        set.replace(Cuts::parse(
            "nodial 127.0.0.1:3\n127.0.0.1:4\n  nodial   127.0.0.1:5 \n",
        ));
        assert!(!set.is_cut("127.0.0.1:3"), "open connections to it carry on");
        assert!(!set.may_dial("127.0.0.1:3") && !set.may_dial("127.0.0.1:5"));
        assert!(set.is_cut("127.0.0.1:4") && !set.may_dial("127.0.0.1:4"));
        assert!(set.may_dial("127.0.0.1:6"));
        assert!(!set.wait_open("127.0.0.1:3", Duration::from_millis(20)).await);
        set.replace(Cuts::parse("127.0.0.1:4\n"));
        assert!(set.wait_open("127.0.0.1:3", Duration::from_millis(20)).await);
    }
}
