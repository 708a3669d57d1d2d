//! The driver: one actor task owns the [`Core`] and performs its outputs;
//! the listener and each connection run in their own tasks and talk to the
//! actor over a bounded channel. No lock is held across an `.await`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::task::TaskTracker;

use p2p_proto::limits::MAX_FRAME_LEN;
use p2p_proto::secure::{self, GroupKey};

use crate::conn::{self, ConnLimits, Msg, Security, Side, Writer};
use crate::core::{ConnId, Core, CoreConfig, Group, Input, Output};
use crate::cuts::{CutFile, Gate};
use crate::output::Sink;

/// Everything a node needs besides its listener.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub core: CoreConfig,
    /// Time a new connection has to send its first frame.
    pub handshake_timeout: Duration,
    /// Per-member write queue limit in bytes.
    pub queue_bytes: usize,
    /// Read chat lines from stdin.
    pub read_stdin: bool,
    /// Where plugins are looked up by name (`lib<name>.so`).
    pub plugin_dir: std::path::PathBuf,
    /// The chat key every connection must prove (None: `--insecure`).
    pub security: Security,
    /// The only directory plugins may write in.
    pub data_dir: std::path::PathBuf,
    /// Fault testing: a file listing the addresses this node is cut off
    /// from, read every tick (see `cuts.rs`).
    pub cut_file: Option<std::path::PathBuf>,
}

impl NodeConfig {
    pub fn new(core: CoreConfig) -> NodeConfig {
        NodeConfig {
            core,
            handshake_timeout: Duration::from_secs(3),
            queue_bytes: 8 * 1024 * 1024,
            read_stdin: false,
            plugin_dir: default_plugin_dir(),
            security: None,
            data_dir: "p2pchat-data".into(),
            cut_file: None,
        }
    }
}

/// The directory of the running executable (where cargo puts the plugin
/// libraries next to `p2pnode`), or the current directory.
pub fn default_plugin_dir() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(std::path::Path::to_path_buf))
        .unwrap_or_else(|| ".".into())
}

/// Runs a node on `listener` until it leaves (by `/quit`, stdin closing, or
/// `shutdown` completing) or cannot join. Returns the exit code.
///
/// # Errors
/// Only if the listener's own address cannot be read.
pub async fn run(
    listener: TcpListener,
    mut cfg: NodeConfig,
    sink: Sink,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<i32> {
    let local = listener
        .local_addr()
        .context("while reading the listening address")?;
    if cfg.core.addr.is_empty() {
        cfg.core.addr = local.to_string();
    }
    // Never send a member more at once than its queue may hold.
    cfg.core.window_bytes = cfg.core.window_bytes.min(cfg.queue_bytes / 4);
    cfg.core.catch_up_bytes = cfg.core.catch_up_bytes.min(cfg.queue_bytes / 4);
    sink.listening(&cfg.core.name, &cfg.core.addr);
    let (tx, mut rx) = mpsc::channel::<Msg>(4096);
    let tracker = TaskTracker::new();
    let limits = ConnLimits {
        handshake: cfg.handshake_timeout,
        queue_bytes: cfg.queue_bytes,
    };
    // Outbound dials get longer than a heartbeat-based guess: a new
    // coordinator answers a resume only once its resume window closes.
    let dial_limits = ConnLimits {
        handshake: Duration::from_millis((cfg.core.heartbeat_ms * 10).max(500)),
        ..limits
    };
    let accept = tokio::spawn(accept_loop(
        listener,
        tx.clone(),
        limits,
        tracker.clone(),
        cfg.core.max_members + 256,
        cfg.security.clone(),
    ));
    let stdin = cfg.read_stdin.then(|| tokio::spawn(stdin_loop(tx.clone())));

    let start = Instant::now();
    let now = || start.elapsed().as_millis() as u64;
    let name = cfg.core.name.clone();
    let mut driver = Driver {
        core: Core::with_hooks(
            cfg.core.clone(),
            now(),
            Box::new(crate::plugins::PluginHost::new(
                cfg.plugin_dir.clone(),
                cfg.data_dir.clone(),
            )),
        ),
        writers: HashMap::new(),
        peers: Vec::new(),
        clients: Vec::new(),
        drained_seen: HashMap::new(),
        tx: tx.clone(),
        dial_limits,
        tracker: tracker.clone(),
        security: cfg.security.clone(),
        group_key: None,
        sink,
        name,
        exit: None,
        cuts: cfg.cut_file.clone().map(CutFile::new),
        dialled: HashMap::new(),
        outputs: Vec::new(),
        run: Vec::new(),
    };
    driver.reload_cuts();
    driver.apply(now());
    let mut ticker = tokio::time::interval(Duration::from_millis(driver.core.tick_ms()));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut shutting_down = false;
    while driver.exit.is_none() {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(msg) => {
                    // One clock reading serves the batch.
                    let t = now();
                    let mut frames = msg.frames();
                    driver.on_msg(msg, t);
                    // Take whatever else is already queued, so one round of
                    // outputs (and one wakeup per member) serves a batch.
                    for _ in 0..MAX_BATCH {
                        if frames >= TURN_FRAMES {
                            break;
                        }
                        match rx.try_recv() {
                            Ok(msg) => {
                                frames += msg.frames();
                                driver.on_msg(msg, t)
                            }
                            Err(_) => break,
                        }
                    }
                }
                None => break,
            },
            _ = ticker.tick() => {
                driver.reload_cuts();
                let t = now();
                let progress = driver.progress();
                if !progress.is_empty() {
                    driver.core.handle(t, Input::Progress(progress));
                }
                driver.core.handle(t, Input::Tick);
            }
            _ = &mut shutdown, if !shutting_down => {
                shutting_down = true;
                driver.core.handle(now(), Input::Quit);
            }
        }
        let t = now();
        driver.core.end_batch(t);
        driver.apply(t);
    }
    accept.abort();
    if let Some(s) = stdin {
        s.abort();
    }
    // Let goodbyes (leave frames, the coordinator's own `left`) reach the wire.
    for writer in driver.writers.values() {
        writer.close();
    }
    // Connections that registered after the loop ended (a dial racing the
    // exit) hold writers nobody else will close.
    rx.close();
    while let Ok(msg) = rx.try_recv() {
        if let Msg::Registered(_, writer) = msg {
            writer.close();
        }
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    let code = driver.exit.unwrap_or(0);
    driver.sink.close();
    Ok(code)
}

struct Driver {
    core: Core,
    writers: HashMap<ConnId, Writer>,
    /// Broadcast groups: peers get entries before they are committed,
    /// clients only committed ones.
    peers: Vec<(ConnId, Writer)>,
    clients: Vec<(ConnId, Writer)>,
    /// Each group member's drain counter at the last tick.
    drained_seen: HashMap<ConnId, u64>,
    tx: mpsc::Sender<Msg>,
    dial_limits: ConnLimits,
    tracker: TaskTracker,
    security: Security,
    /// This term's broadcast key and the next record number (keyed chats;
    /// a new epoch starts a new term with a fresh random id).
    group_key: Option<(GroupKey, u64)>,
    sink: Sink,
    name: String,
    exit: Option<i32>,
    /// Fault testing: the addresses this node is cut off from.
    cuts: Option<CutFile>,
    /// Where each connection this node dialled goes (a cut holds those).
    dialled: HashMap<ConnId, String>,
    /// The core's outputs being performed, and the broadcasts gathered
    /// from them (buffers reused turn after turn).
    outputs: Vec<Output>,
    run: Vec<(Group, Bytes)>,
}

/// Inputs handled before the outputs are performed.
const MAX_BATCH: usize = 512;

/// A turn also ends once it has taken this many frames, so its outputs go
/// out while the readers go on reading. Without it one turn took a
/// publisher's whole window, and the reader, the actor, the writers and the
/// publisher each waited for the others instead of overlapping (a machine
/// a third idle while the actor was the bottleneck).
const TURN_FRAMES: usize = 512;

impl Driver {
    fn on_msg(&mut self, msg: Msg, now: u64) {
        match msg {
            Msg::Registered(conn, writer) => {
                if self.cut_off(conn) {
                    writer.set_cut(true);
                }
                self.writers.insert(conn, writer);
            }
            Msg::Input(Input::Closed(conn, reason)) => {
                self.core.handle(now, Input::Closed(conn, reason));
                // Whatever the core made of it, the connection is gone
                // (observer connections are not tracked by the core).
                if let Some(w) = self.writers.remove(&conn) {
                    w.close();
                }
                self.ungroup(conn);
            }
            Msg::Input(input) => self.core.handle(now, input),
            Msg::Frames(conn, frames) => {
                for frame in frames {
                    self.core.handle(now, Input::Frame(conn, frame));
                }
            }
        }
    }

    /// Whether `conn` is a dialled connection to an address cut off now.
    fn cut_off(&self, conn: ConnId) -> bool {
        match (&self.cuts, self.dialled.get(&conn)) {
            (Some(cuts), Some(addr)) => cuts.set.is_cut(addr),
            _ => false,
        }
    }

    /// Reads the cut file again; holds or releases connections to match.
    fn reload_cuts(&mut self) {
        if !self.cuts.as_mut().is_some_and(CutFile::reload) {
            return;
        }
        for (conn, w) in &self.writers {
            w.set_cut(self.cut_off(*conn));
        }
    }

    fn ungroup(&mut self, conn: ConnId) {
        self.dialled.remove(&conn);
        self.peers.retain(|(c, _)| *c != conn);
        self.clients.retain(|(c, _)| *c != conn);
        self.drained_seen.remove(&conn);
    }

    /// Group members with bytes queued whose queue drained since the last
    /// tick: they are reading, however far behind.
    fn progress(&mut self) -> Vec<ConnId> {
        let mut moved = Vec::new();
        for (conn, w) in self.peers.iter().chain(&self.clients) {
            let d = w.drained();
            let seen = self.drained_seen.insert(*conn, d);
            if w.queued() > 0 && seen.is_some_and(|s| s != d) {
                moved.push(*conn);
            }
        }
        moved
    }

    /// Queues broadcast frames gathered so far on every member of their
    /// group, as one buffer per group shared by all (one push and at most
    /// one wakeup per member).
    fn flush_broadcast(&mut self, run: &mut Vec<(Group, Bytes)>, overflowed: &mut Vec<(ConnId, usize)>) {
        if run.is_empty() {
            return;
        }
        for target in [Group::Peers, Group::Clients] {
            let empty = match target {
                Group::Peers => self.peers.is_empty(),
                _ => self.clients.is_empty(),
            };
            if empty {
                continue;
            }
            let group_key = match &self.security {
                None => None,
                Some(key) => {
                    let epoch = self.core.epoch();
                    if self.group_key.as_ref().is_none_or(|(g, _)| g.epoch() != epoch) {
                        self.group_key = Some((key.group_key(epoch, secure::random_bytes()), 0));
                    }
                    self.group_key.as_mut().map(|(g, counter)| (g, counter))
                }
            };
            let records = group_records(run, target, group_key);
            let members = match target {
                Group::Peers => &self.peers,
                _ => &self.clients,
            };
            for (conn, w) in members {
                for record in &records {
                    if let Err(conn::Overflow(n)) = w.push_record(record.clone()) {
                        overflowed.push((*conn, n));
                        break;
                    }
                }
            }
        }
        run.clear();
    }

    /// Performs every output of the core, feeding back slow-consumer drops.
    fn apply(&mut self, now: u64) {
        // Buffers kept across turns (taken here, put back on return).
        let mut run = std::mem::take(&mut self.run);
        let mut outputs = std::mem::take(&mut self.outputs);
        loop {
            self.core.take_outputs(&mut outputs);
            if outputs.is_empty() {
                (self.run, self.outputs) = (run, outputs);
                return;
            }
            let mut overflowed: Vec<(ConnId, usize)> = Vec::new();
            for out in outputs.drain(..) {
                // Keep order: broadcasts gathered so far go out before any
                // other output that touches a connection.
                if !matches!(out, Output::Broadcast(..) | Output::Event(_)) {
                    self.flush_broadcast(&mut run, &mut overflowed);
                }
                match out {
                    Output::Send(conn, bytes) => {
                        if let Some(w) = self.writers.get(&conn) {
                            if let Err(conn::Overflow(n)) = w.push(bytes) {
                                overflowed.push((conn, n));
                            }
                        }
                    }
                    Output::Broadcast(group, bytes) => run.push((group, bytes)),
                    Output::JoinGroup(conn, group) => {
                        if let Some(w) = self.writers.get(&conn) {
                            let entry = (conn, w.clone());
                            match group {
                                Group::Clients => self.clients.push(entry),
                                _ => self.peers.push(entry),
                            }
                        }
                    }
                    Output::Close(conn) => {
                        if let Some(w) = self.writers.remove(&conn) {
                            w.close();
                        }
                        self.ungroup(conn);
                    }
                    Output::Dial { conn, addr, hello } => self.dial(conn, addr, hello),
                    Output::Notify { addr, frame } => {
                        if self.cuts.as_ref().is_some_and(|c| !c.set.may_dial(&addr)) {
                            tracing::debug!(%addr, "notification lost: the address cannot be dialled (cut off)");
                        } else {
                            tokio::spawn(notify(addr, frame, self.security.clone()));
                        }
                    }
                    Output::Event(e) => self.sink.emit(&e, &self.name),
                    Output::Exit(code) => {
                        self.exit.get_or_insert(code);
                    }
                }
            }
            self.flush_broadcast(&mut run, &mut overflowed);
            overflowed.sort_unstable();
            overflowed.dedup_by_key(|(c, _)| *c);
            for (conn, queued) in overflowed {
                if let Some(w) = self.writers.remove(&conn) {
                    w.kill();
                }
                self.ungroup(conn);
                tracing::warn!(conn, queued, "dropping a slow consumer");
                let reason = format!("disconnected (slow consumer: {queued} bytes unread)");
                self.core.handle(now, Input::Closed(conn, Some(reason)));
            }
            self.core.end_batch(now);
        }
    }

    fn dial(&mut self, conn: ConnId, addr: String, hello: Bytes) {
        let tx = self.tx.clone();
        let limits = self.dial_limits;
        let tracker = self.tracker.clone();
        let security = self.security.clone();
        let cuts = self.cuts.as_ref().map(|c| c.set.clone());
        if cuts.is_some() {
            self.dialled.insert(conn, addr.clone());
        }
        tokio::spawn(async move {
            // Across a cut (either way) the connection attempt goes unanswered.
            if let Some(cuts) = &cuts {
                if !cuts.wait_open(&addr, limits.handshake).await {
                    let reason = format!("timed out connecting to {addr}");
                    let _ = tx.send(Msg::Input(Input::Closed(conn, Some(reason)))).await;
                    return;
                }
            }
            match tokio::time::timeout(limits.handshake, TcpStream::connect(&addr)).await {
                Ok(Ok(stream)) => {
                    // Held from its first frame if a cut began while it
                    // connected (the actor checks again when it registers;
                    // the key handshake itself is not held).
                    let gate = Arc::new(Gate::default());
                    gate.set(cuts.is_some_and(|c| c.is_cut(&addr)));
                    conn::start(
                        stream,
                        conn,
                        Some(hello),
                        tx,
                        limits,
                        &tracker,
                        None,
                        security,
                        Side::Client,
                        gate,
                    );
                }
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "dial failed");
                    let input = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                        Input::Refused(conn)
                    } else {
                        Input::Closed(conn, Some(format!("cannot connect to {addr}: {e}")))
                    };
                    let _ = tx.send(Msg::Input(input)).await;
                }
                Err(_) => {
                    let _ = tx
                        .send(Msg::Input(Input::Closed(
                            conn,
                            Some(format!("timed out connecting to {addr}")),
                        )))
                        .await;
                }
            }
        });
    }
}

/// The records one flush queues on every member of `target`: the frames
/// of the run meant for it (its own and those for all groups), in order,
/// concatenated; in a keyed chat split into runs that each fit a member's
/// read limit ([`p2p_proto::net::MAX_RECORD_LEN`]) and sealed once for the
/// whole group under the term's key, counting on from `counter`.
fn group_records(
    run: &[(Group, Bytes)],
    target: Group,
    group_key: Option<(&mut secure::GroupKey, &mut u64)>,
) -> Vec<Bytes> {
    let mine: Vec<&Bytes> = run
        .iter()
        .filter(|(g, _)| *g == target || *g == Group::All)
        .map(|(_, b)| b)
        .collect();
    match group_key {
        None => vec![concat(&mine)],
        Some((g, counter)) => chunks(&mine, MAX_FRAME_LEN + 4)
            .into_iter()
            .map(|frames| {
                *counter += 1;
                let parts: Vec<&[u8]> = frames.iter().map(|b| &b[..]).collect();
                Bytes::from(g.seal_prefixed(*counter, &parts))
            })
            .collect(),
    }
}

/// Concatenates frames (one copy; none for a single frame).
fn concat(frames: &[&Bytes]) -> Bytes {
    match frames {
        [one] => (*one).clone(),
        _ => {
            let mut joined = bytes::BytesMut::with_capacity(frames.iter().map(|b| b.len()).sum());
            for b in frames {
                joined.extend_from_slice(b);
            }
            joined.freeze()
        }
    }
}

/// Splits frames into runs of at most `limit` bytes (a frame longer than
/// that travels alone).
fn chunks<'a>(frames: &[&'a Bytes], limit: usize) -> Vec<Vec<&'a Bytes>> {
    let mut out: Vec<Vec<&Bytes>> = Vec::new();
    let mut size = 0;
    for f in frames {
        match out.last_mut() {
            Some(run) if size + f.len() <= limit => {
                run.push(f);
                size += f.len();
            }
            _ => {
                out.push(vec![f]);
                size = f.len();
            }
        }
    }
    out
}

/// Connects, proves the key, sends one frame, closes. Failures are
/// expected (the target is often dead) and only logged.
async fn notify(addr: String, frame: Bytes, security: Security) {
    let attempt = conn::send_once(&addr, frame, &security);
    if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(1), attempt).await {
        tracing::debug!(%addr, error = %e, "announcement not delivered");
    }
}

async fn accept_loop(
    listener: TcpListener,
    tx: mpsc::Sender<Msg>,
    limits: ConnLimits,
    tracker: TaskTracker,
    max_conns: usize,
    security: Security,
) {
    let next_id = Arc::new(AtomicU64::new(1));
    let permits = Arc::new(Semaphore::new(max_conns));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections; refusing");
            continue;
        };
        let conn = next_id.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(conn, %peer, "accepted");
        conn::start(
            stream,
            conn,
            None,
            tx.clone(),
            limits,
            &tracker,
            Some(permit),
            security.clone(),
            Side::Server,
            Arc::default(),
        );
    }
}

/// Longest line read from stdin in one piece (16 times the longest text a
/// message may carry, which the core checks: a longer line is refused
/// with a message, piece by piece, and memory stays bounded).
const STDIN_LINE_MAX: usize = 16 * p2p_proto::limits::MAX_TEXT_LEN;

async fn stdin_loop(tx: mpsc::Sender<Msg>) {
    let (mut stdin, mut buf) = (BufReader::new(tokio::io::stdin()), Vec::new());
    loop {
        match p2p_proto::net::read_text_line(&mut stdin, &mut buf, STDIN_LINE_MAX).await {
            Ok(Some(line)) => {
                if tx.send(Msg::Input(Input::User(line))).await.is_err() {
                    return;
                }
            }
            Ok(None) | Err(_) => {
                crate::output::to_stderr(
                    "p2pnode: end of input: leaving the chat (give --headless to keep running without a terminal)",
                );
                let _ = tx.send(Msg::Input(Input::Quit)).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_proto::net::MAX_RECORD_LEN;
    use p2p_proto::secure::{ChatKey, ClientHandshake, Opened, Opener, ServerHandshake};

    /// A frame as the core encodes it: a length prefix and `len` bytes.
    fn frame(tag: u8, len: usize) -> Bytes {
        let mut b = (len as u32).to_be_bytes().to_vec();
        b.extend(std::iter::repeat_n(tag, len));
        Bytes::from(b)
    }

    /// A member's opener for `key` (the receiving half of a link).
    fn member_opener(key: &ChatKey) -> Opener {
        let (client, nc) = ClientHandshake::start(key);
        let (_server, hello) = ServerHandshake::answer(key, nc);
        let (_, link) = client.finish(hello.nonce, &hello.proof).expect("same key");
        link.recv
    }

    /// Splits length-prefixed frames back apart.
    fn split(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
            out.push(bytes[..4 + len].to_vec());
            bytes = &bytes[4 + len..];
        }
        out
    }

    #[test]
    fn chunks_keep_order_stay_under_the_limit_and_send_a_large_frame_alone() {
        let frames: Vec<Bytes> = [10, 20, 30, 100, 5, 5].iter().map(|n| frame(1, *n)).collect();
        let refs: Vec<&Bytes> = frames.iter().collect();
        let runs = chunks(&refs, 40);
        let sizes: Vec<Vec<usize>> = runs
            .iter()
            .map(|r| r.iter().map(|b| b.len() - 4).collect())
            .collect();
        assert_eq!(sizes, vec![vec![10, 20], vec![30], vec![100], vec![5, 5]]);
        let flat: Vec<&Bytes> = runs.into_iter().flatten().collect();
        assert_eq!(flat, refs);
    }

    #[test]
    fn each_group_gets_its_frames_and_the_shared_ones_in_order() {
        let run = vec![
            (Group::Peers, frame(1, 3)),
            (Group::All, frame(2, 3)),
            (Group::Clients, frame(3, 3)),
            (Group::Peers, frame(4, 3)),
        ];
        let peers = group_records(&run, Group::Peers, None);
        let clients = group_records(&run, Group::Clients, None);
        let tags = |records: Vec<Bytes>| -> Vec<u8> {
            records.iter().flat_map(|r| split(r)).map(|f| f[4]).collect()
        };
        assert_eq!(tags(peers), vec![1, 2, 4]);
        assert_eq!(tags(clients), vec![2, 3]);
    }

    #[test]
    fn sealed_batches_fit_the_record_limit_open_in_order_and_count_on() {
        let key = ChatKey::generate();
        let mut group = key.group_key(3, secure::random_bytes());
        // Three near-maximal frames and small ones: more than one record.
        let big = MAX_FRAME_LEN - 16;
        let run: Vec<(Group, Bytes)> = [big, 7, big, 9, big]
            .iter()
            .enumerate()
            .map(|(i, n)| (Group::All, frame(i as u8, *n)))
            .collect();
        let mut counter = 41;
        let records = group_records(&run, Group::Clients, Some((&mut group, &mut counter)));
        assert!(records.len() >= 3, "{} records", records.len());
        assert_eq!(counter, 41 + records.len() as u64);
        let mut opener = member_opener(&key);
        let mut got = Vec::new();
        for r in &records {
            let body = &r[4..];
            assert_eq!(
                u32::from_be_bytes(r[..4].try_into().unwrap()) as usize,
                body.len()
            );
            assert!(body.len() <= MAX_RECORD_LEN, "a record of {} bytes", body.len());
            match opener.open(body).expect("a member opens it") {
                Opened::Frames(frames) => got.extend(split(&frames)),
                Opened::Frame(_) => panic!("a group record holds frames"),
            }
        }
        let sent: Vec<Vec<u8>> = run.iter().map(|(_, b)| b.to_vec()).collect();
        assert_eq!(got, sent);
        // Replaying a record is refused.
        assert!(opener.open(&records[0][4..]).is_err());
    }
}
