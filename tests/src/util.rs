//! Helpers for driving the real binaries: building them once, node
//! processes that are killed when dropped, JSON event capture, and waiting
//! for a condition with a deadline (never a fixed sleep).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::VecDeque;

use p2p_proto::secure::{self, ChatKey, ClientHandshake, Link, Opened};
use p2p_proto::{encode, Frame};
use serde_json::Value;

/// Tests that load the machine on purpose (floods, storms, torture) take
/// this lock, so they do not overlap each other and starve the rest.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long any single wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// The directory holding the built binaries (building them once if the
/// tests run under cargo).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/integration-… → target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        if let Ok(cargo) = std::env::var("CARGO") {
            let mut cmd = Command::new(cargo);
            // The whole workspace, as `cargo build --workspace` does: the
            // same packages give the same features, so neither build
            // makes the other rebuild the binaries.
            cmd.args(["build", "--quiet", "--workspace"]);
            // Not the variables cargo sets for this test run: a build
            // script that watches one (ring's watches CARGO_MANIFEST_DIR)
            // would rerun, and everything above it be rebuilt, here and
            // again at the next plain `cargo build`.
            for (var, _) in std::env::vars_os() {
                let name = var.to_string_lossy();
                if name.starts_with("CARGO_PKG_")
                    || [
                        "CARGO_MANIFEST_DIR",
                        "CARGO_MANIFEST_PATH",
                        "CARGO_CRATE_NAME",
                        "CARGO_BIN_NAME",
                        "CARGO_TARGET_TMPDIR",
                        "CARGO_PRIMARY_PACKAGE",
                    ]
                    .contains(&name.as_ref())
                {
                    cmd.env_remove(&var);
                }
            }
            if dir.ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("running cargo build for the binaries");
            assert!(status.success(), "building the binaries failed");
        }
        dir
    })
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing; run cargo build --workspace",
        path.display()
    );
    path
}

/// Waits until `check` returns Some, or panics after `DEADLINE` with `what`.
pub fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[derive(Default)]
struct Captured {
    events: Vec<Value>,
    /// Non-JSON stdout lines (there should be none with --events json).
    other: Vec<String>,
    closed: bool,
}

/// A running `p2pnode` with `--events json`; killed (SIGKILL) on drop.
pub struct Node {
    pub name: String,
    pub addr: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<(Mutex<Captured>, Condvar)>,
    err: Arc<Mutex<String>>,
    /// The thread reading stderr; joined by `stderr_after_exit`.
    err_thread: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    /// Starts a node on a free port; `extra` are further flags (e.g.
    /// `--join`). Waits until it listens.
    pub fn start(name: &str, extra: &[&str]) -> Node {
        let mut node = Node::spawn(name, extra);
        let ev = node.wait_event("listening", |e| e["event"] == "listening");
        node.addr = ev["addr"].as_str().expect("listening addr").to_string();
        node
    }

    /// Starts a node and waits until it is in the chat.
    pub fn join(name: &str, extra: &[&str]) -> Node {
        let node = Node::start(name, extra);
        node.wait_event("ready", |e| e["event"] == "ready");
        node
    }

    /// Starts without waiting for anything.
    pub fn spawn(name: &str, extra: &[&str]) -> Node {
        let keyed = !extra.iter().any(|a| *a == "--key-file" || *a == "--insecure");
        let mut key_args: Vec<&str> = if keyed {
            vec!["--key-file", key_file().to_str().expect("a UTF-8 temporary path")]
        } else {
            Vec::new()
        };
        // Plugins write under the build directory, never in the source tree.
        static DATA: OnceLock<String> = OnceLock::new();
        let data = DATA.get_or_init(|| {
            let d = bin_dir().join("p2p-tests-data");
            d.to_str().expect("a UTF-8 build path").to_string()
        });
        if !extra.contains(&"--data-dir") {
            key_args.push("--data-dir");
            key_args.push(data);
        }
        let mut child = Command::new(bin("p2pnode"))
            .args(["--name", name, "--listen", "127.0.0.1:0", "--events", "json"])
            .args(extra)
            .args(key_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(match std::env::var("P2P_TEST_STDERR") {
                Ok(d) => Stdio::from(std::fs::File::create(format!("{d}/{name}.log")).unwrap()),
                Err(_) => Stdio::piped(),
            })
            .spawn()
            .expect("spawning p2pnode");
        let out = Arc::new((Mutex::new(Captured::default()), Condvar::new()));
        let stdout = child.stdout.take().expect("stdout");
        let out2 = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let (lock, cv) = &*out2;
                let mut c = lock.lock().unwrap();
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => c.events.push(v),
                    Err(_) => c.other.push(line),
                }
                cv.notify_all();
            }
            let (lock, cv) = &*out2;
            lock.lock().unwrap().closed = true;
            cv.notify_all();
        });
        let err = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take();
        let err2 = err.clone();
        let err_thread = std::thread::spawn(move || {
            let mut buf = String::new();
            if let Some(mut stderr) = stderr {
                let _ = stderr.read_to_string(&mut buf);
            }
            err2.lock().unwrap().push_str(&buf);
        });
        Node {
            name: name.to_string(),
            addr: String::new(),
            stdin: child.stdin.take(),
            child,
            out,
            err,
            err_thread: Some(err_thread),
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Writes raw bytes to the node's stdin (a terminal or a pipe may
    /// carry anything).
    pub fn type_bytes(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("node started without stdin");
        stdin.write_all(bytes).expect("writing to the node's stdin");
        stdin.flush().expect("flushing the node's stdin");
    }

    /// Types a line on the node's stdin.
    pub fn say(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("node started without stdin");
        writeln!(stdin, "{text}").expect("writing to the node's stdin");
        stdin.flush().expect("flushing the node's stdin");
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signalling the node");
    }

    /// A snapshot of every JSON event so far.
    pub fn events(&self) -> Vec<Value> {
        self.out.0.lock().unwrap().events.clone()
    }

    /// True if some event so far matches (without copying them all).
    pub fn has_event(&self, pred: impl Fn(&Value) -> bool) -> bool {
        self.out.0.lock().unwrap().events.iter().any(pred)
    }

    /// Stdout lines that were not JSON.
    pub fn stray_lines(&self) -> Vec<String> {
        self.out.0.lock().unwrap().other.clone()
    }

    pub fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// All of stderr, once the process has exited and the pipe is drained.
    pub fn stderr_after_exit(&mut self) -> String {
        self.wait_exit();
        if let Some(t) = self.err_thread.take() {
            let _ = t.join();
        }
        self.stderr()
    }

    /// Waits for the first event matching `pred` and returns it.
    pub fn wait_event(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_events(what, 1, pred).remove(0)
    }

    /// Waits until `n` events match `pred`; returns them.
    pub fn wait_events(&self, what: &str, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let end = Instant::now() + DEADLINE;
        let (lock, cv) = &*self.out;
        let mut c = lock.lock().unwrap();
        loop {
            let found: Vec<Value> = c.events.iter().filter(|e| pred(e)).cloned().collect();
            if found.len() >= n {
                return found;
            }
            let now = Instant::now();
            if now >= end || c.closed {
                let recent: Vec<String> = c
                    .events
                    .iter()
                    .rev()
                    .take(10)
                    .rev()
                    .map(|e| {
                        let s = e.to_string();
                        s.chars().take(200).collect()
                    })
                    .collect();
                let why = if c.closed { "stdout closed" } else { "timed out" };
                let stderr: String = self.err.lock().unwrap().chars().take(2000).collect();
                drop(c);
                panic!(
                    "{}: {why} waiting for {what} ({} of {n}); last events:\n{}\nstderr: {stderr}",
                    self.name,
                    found.len(),
                    recent.join("\n"),
                );
            }
            c = cv.wait_timeout(c, end - now).unwrap().0;
        }
    }

    /// Delivered chat messages as (seq, from, text), in delivery order.
    pub fn messages(&self) -> Vec<(u64, String, String)> {
        self.events()
            .iter()
            .filter(|e| e["event"] == "message")
            .map(|e| {
                (
                    e["seq"].as_u64().unwrap_or(0),
                    e["from"].as_str().unwrap_or("").to_string(),
                    e["text"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Waits until this node delivered a message with `text`.
    pub fn wait_message(&self, text: &str) -> Value {
        let shown: String = text.chars().take(40).collect();
        self.wait_event(&format!("message {shown:?}"), |e| {
            e["event"] == "message" && e["text"] == text
        })
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        wait_until(&format!("{} to exit", self.name), || {
            self.child.try_wait().ok().flatten()
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that every node delivered the same messages in the same order,
/// that each node's log entries (messages, joins, leaves, configuration)
/// came one seq after the other with no gap and no repeat, and returns the
/// messages.
pub fn assert_same_sequence(nodes: &[&Node]) -> Vec<(u64, String, String)> {
    // Each node's stdout is read by its own thread: let the slowest reader
    // catch up with the furthest node before comparing.
    let furthest = nodes.iter().map(|n| n.messages().len()).max().unwrap_or(0);
    wait_until("every node's output to catch up", || {
        nodes.iter().all(|n| n.messages().len() >= furthest).then_some(())
    });
    for n in nodes {
        let seqs = n.entry_seqs();
        for w in seqs.windows(2) {
            assert_eq!(
                w[1],
                w[0] + 1,
                "{}: seq {} followed by seq {} in {seqs:?}",
                n.name,
                w[0],
                w[1]
            );
        }
    }
    let first = nodes[0].messages();
    for n in &nodes[1..] {
        assert_eq!(n.messages(), first, "{} and {} disagree", n.name, nodes[0].name);
    }
    first
}

impl Node {
    /// Seqs of every log entry this node delivered (messages, joins,
    /// leaves, configuration changes), in delivery order.
    pub fn entry_seqs(&self) -> Vec<u64> {
        self.events()
            .iter()
            .filter(|e| {
                matches!(
                    e["event"].as_str(),
                    Some("message" | "joined" | "left" | "config")
                )
            })
            .filter_map(|e| e["seq"].as_u64())
            .collect()
    }

    /// The node's `status` answer, as an observer gets it.
    pub fn status(&self) -> Frame {
        let mut raw = Raw::connect(&self.addr);
        raw.send(&Frame::StatusRequest { log: false });
        raw.read_until("status", |f| matches!(f, Frame::Status { .. }))
    }
}

/// Waits until every node is a voter of one settled voter set: each node
/// reports the same voters, all of them, and knows the set is in force
/// (until then a node that joined a moment ago cannot yet take over).
pub fn wait_voters(nodes: &[&Node]) {
    wait_until("every node to be a voter of a settled voter set", || {
        let mut seen: Option<Vec<u64>> = None;
        let mut ids = Vec::new();
        for n in nodes {
            let Frame::Status {
                id, voters, stable, ..
            } = n.status()
            else {
                return None;
            };
            if !stable || seen.as_ref().is_some_and(|s| *s != voters) {
                return None;
            }
            ids.push(id);
            seen = Some(voters);
        }
        let voters = seen?;
        ids.iter().all(|id| voters.contains(id)).then_some(())
    });
}

/// The chat key every test node uses unless told otherwise: a key file
/// (0600) next to the built binaries, created on first use.
pub fn key_file() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = bin_dir().join("p2p-tests-chat.key");
        if p2p_proto::secure::read_key_file(&path).is_err() {
            let _ = std::fs::remove_file(&path);
            p2p_proto::secure::create_key_file(&path).expect("creating the test chat key");
        }
        path
    })
}

/// The key in [`key_file`].
pub fn chat_key() -> ChatKey {
    p2p_proto::secure::read_key_file(key_file()).expect("reading the test chat key")
}

/// A hand-driven protocol client: by default it proves the test chat key
/// and seals its frames, written from docs/PROTOCOL.md alone (a second
/// implementation of the handshake and records, beside the node's).
pub struct Raw {
    pub stream: TcpStream,
    link: Option<Box<Link>>,
    /// Bytes read but not yet a whole record.
    buf: Vec<u8>,
    /// Frames opened from a batch and not yet returned.
    pending: VecDeque<Frame>,
}

/// How a handshake attempt ended.
pub enum Handshake {
    Done(Raw),
    /// The node refused: its plain error frame.
    Refused(Frame),
    /// The node's proof does not verify under our key: it holds another.
    WrongNode,
}

impl Raw {
    /// Connects and proves the test chat key.
    pub fn connect(addr: &str) -> Raw {
        match Raw::connect_with(addr, &chat_key()) {
            Handshake::Done(raw) => raw,
            Handshake::Refused(f) => panic!("the node at {addr} refused the test key: {f:?}"),
            Handshake::WrongNode => panic!("the node at {addr} does not hold the test key"),
        }
    }

    /// Connects without proving anything: what an outsider can do.
    pub fn plain(addr: &str) -> Raw {
        let stream = TcpStream::connect(addr).expect("connecting to the node");
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        Raw {
            stream,
            link: None,
            buf: Vec::new(),
            pending: VecDeque::new(),
        }
    }

    /// Connects and runs the handshake with `key`.
    pub fn connect_with(addr: &str, key: &ChatKey) -> Handshake {
        let mut raw = Raw::plain(addr);
        let (hs, nc) = ClientHandshake::start(key);
        raw.send(&Frame::Auth {
            version: p2p_proto::PROTOCOL_VERSION,
            nonce: secure::to_hex(&nc),
        });
        let (ns, proof) = match raw.read().expect("the node's answer to auth") {
            Frame::AuthReply { nonce, proof } => (nonce, proof),
            other => return Handshake::Refused(other),
        };
        let ns = secure::nonce_from_hex(&ns).expect("a 32-byte server nonce");
        let proof = secure::from_hex(&proof).expect("a hex proof");
        let Ok((mine, link)) = hs.finish(ns, &proof) else {
            return Handshake::WrongNode;
        };
        raw.send(&Frame::AuthProof {
            proof: secure::to_hex(&mine),
        });
        raw.link = Some(Box::new(link));
        Handshake::Done(raw)
    }

    /// Runs the client side of the handshake with nonce `nonce` and then
    /// sends `proof` whatever the node answered (a forged or replayed
    /// proof); returns the node's answer to it.
    pub fn send_proof(addr: &str, nonce: [u8; 32], proof: &str) -> Frame {
        let mut raw = Raw::plain(addr);
        raw.send(&Frame::Auth {
            version: p2p_proto::PROTOCOL_VERSION,
            nonce: secure::to_hex(&nonce),
        });
        let reply = raw.read().expect("the node's answer to auth");
        assert!(matches!(reply, Frame::AuthReply { .. }), "{reply:?}");
        raw.send(&Frame::AuthProof { proof: proof.into() });
        let answer = raw.read().expect("the node's answer to our proof");
        wait_until("the node to close the connection", || raw.closed().then_some(()));
        answer
    }

    /// A genuine handshake, recorded: the client nonce and the proof sent
    /// (what an eavesdropper sees).
    pub fn recorded_handshake(addr: &str) -> ([u8; 32], String) {
        let key = chat_key();
        let mut raw = Raw::plain(addr);
        let (hs, nc) = ClientHandshake::start(&key);
        raw.send(&Frame::Auth {
            version: p2p_proto::PROTOCOL_VERSION,
            nonce: secure::to_hex(&nc),
        });
        let Ok(Frame::AuthReply { nonce, proof }) = raw.read() else {
            panic!("no auth reply")
        };
        let ns = secure::nonce_from_hex(&nonce).unwrap();
        let (mine, _) = hs
            .finish(ns, &secure::from_hex(&proof).unwrap())
            .expect("the test key");
        let mine = secure::to_hex(&mine);
        raw.send(&Frame::AuthProof { proof: mine.clone() });
        (nc, mine)
    }

    /// Bytes straight onto the wire (no sealing).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Sends a frame (sealed once the handshake is done).
    pub fn send(&mut self, frame: &Frame) {
        self.send_body(&encode(frame)[4..]);
    }

    /// Sends a frame whose body is `body` exactly (sealed once the
    /// handshake is done).
    pub fn send_body(&mut self, body: &[u8]) {
        let record = match &mut self.link {
            Some(l) => l.send.seal(body),
            None => body.to_vec(),
        };
        let mut bytes = (record.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&record);
        self.send_raw(&bytes);
    }

    /// Sends several frame bodies as one sealed batch record (as clients
    /// that batch their writes do); needs the handshake done.
    pub fn send_batch(&mut self, bodies: &[&[u8]]) {
        let mut frames = Vec::new();
        for body in bodies {
            frames.extend_from_slice(&(body.len() as u32).to_be_bytes());
            frames.extend_from_slice(body);
        }
        let link = self.link.as_mut().expect("a batch record needs the key");
        let record = link.send.seal_batch(&frames);
        let mut bytes = (record.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&record);
        self.send_raw(&bytes);
    }

    /// Takes one whole record out of `buf`, if there is one.
    fn take_record(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > p2p_proto::net::MAX_RECORD_LEN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "record over the limit",
            ));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let record = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(record))
    }

    /// Opens a record into frames (queued in `pending`).
    fn open(&mut self, record: &[u8]) -> std::io::Result<()> {
        let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let bodies = match &mut self.link {
            None => vec![record.to_vec()],
            Some(l) => match l.recv.open(record).map_err(|e| bad(e.to_string()))? {
                Opened::Frame(body) => vec![body],
                Opened::Frames(mut all) => {
                    let mut out = Vec::new();
                    while !all.is_empty() {
                        let len = u32::from_be_bytes([all[0], all[1], all[2], all[3]]) as usize;
                        out.push(all[4..4 + len].to_vec());
                        all.drain(..4 + len);
                    }
                    out
                }
            },
        };
        for b in bodies {
            self.pending
                .push_back(p2p_proto::decode_body(&b).map_err(|e| bad(e.to_string()))?);
        }
        Ok(())
    }

    pub fn read(&mut self) -> std::io::Result<Frame> {
        loop {
            if let Some(f) = self.pending.pop_front() {
                return Ok(f);
            }
            if let Some(record) = self.take_record()? {
                self.open(&record)?;
                continue;
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk)? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads whatever the socket holds now without waiting; returns the
    /// whole frames it completes (for clients that read at their own pace).
    pub fn read_ready(&mut self) -> std::io::Result<Vec<Frame>> {
        self.stream.set_nonblocking(true)?;
        let mut chunk = [0u8; 32 * 1024];
        let r = match self.stream.read(&mut chunk) {
            Ok(0) => Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        };
        self.stream.set_nonblocking(false)?;
        r?;
        while let Some(record) = self.take_record()? {
            self.open(&record)?;
        }
        Ok(self.pending.drain(..).collect())
    }

    /// Reads frames until one matches, skipping pings and the like.
    pub fn read_until(&mut self, what: &str, pred: impl Fn(&Frame) -> bool) -> Frame {
        loop {
            match self.read() {
                Ok(f) if pred(&f) => return f,
                Ok(_) => {}
                Err(e) => panic!("connection ended while waiting for {what}: {e}"),
            }
        }
    }

    /// True once the node has closed the connection (EOF or reset).
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }

    /// Joins as a client (no server of its own), proving the test key,
    /// and reads up to the end of the welcome's state.
    pub fn hello(addr: &str, name: &str) -> Raw {
        Raw::connect(addr).joined(name)
    }

    /// Joins as a client on this connection (keyed or not, as it was
    /// opened) and reads up to the end of the welcome's state.
    pub fn joined(mut self, name: &str) -> Raw {
        self.send(&hello(name, None));
        self.read_until("welcome", |f| matches!(f, Frame::Welcome { .. }));
        self.read_until("the welcome's state", |f| {
            matches!(f, Frame::State { last: true, .. })
        });
        self
    }
}

/// `say` frames `"{prefix} 1"` … `"{prefix} {n}"` (client_seq 1 to n),
/// each encoded with its length prefix, back to back.
pub fn says(prefix: &str, n: u64) -> Vec<u8> {
    let mut wire = Vec::new();
    for cs in 1..=n {
        wire.extend_from_slice(&p2p_proto::encode(&Frame::Say {
            text: format!("{prefix} {cs}"),
            client_seq: cs,
        }));
    }
    wire
}

/// A client's `hello` (no server of its own, a fresh session).
pub fn hello(name: &str, resume: Option<p2p_proto::Resume>) -> Frame {
    Frame::Hello {
        version: p2p_proto::PROTOCOL_VERSION,
        name: name.into(),
        session: p2p_proto::random_u64(),
        addr: None,
        resume,
        sign_key: None,
    }
}

/// Waits (with the usual deadline) for a child to exit and collects its
/// output; a child still running at the deadline is killed and the test
/// fails, instead of hanging.
pub fn wait_output(what: &str, mut child: std::process::Child) -> std::process::Output {
    use std::io::Read;
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = read(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = read(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let end = Instant::now() + DEADLINE;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// A `resume` for `member_id` in epoch 1 holding nothing (a client coming
/// back before any history).
pub fn resume_as(member_id: u64) -> p2p_proto::Resume {
    p2p_proto::Resume {
        member_id,
        epoch: 1,
        ..Default::default()
    }
}
