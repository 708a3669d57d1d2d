//! The supervisor: one actor task owns every node slot. Node processes,
//! timers and control requests reach it as messages; it keeps each node's
//! state, role and epoch from the nodes' own JSON events (so it knows the
//! coordinator within milliseconds of an election), restarts nodes per
//! policy, and broadcasts what happens to subscribers.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::config::{AfterExit, Cluster};
use crate::control::{Request, Response};
use crate::proc::{self, ExitInfo, ProcMsg};

/// What the supervisor tells subscribers (the `up` display, `demo`, tests).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CtlEvent {
    /// A JSON event printed by a node.
    Node { node: String, event: Value },
    /// A process started, exited, is waiting to restart, or failed.
    Process { node: String, what: String },
    /// A (new) coordinator reign, learned from the coordinator's own event.
    Coordinator {
        node: String,
        epoch: u64,
        /// As measured by the node: coordinator loss to new reign.
        election_ms: Option<u64>,
        /// From `p2pctl kill` of the previous coordinator to this event.
        since_kill_ms: Option<f64>,
    },
    /// Every node of the initial start is ready.
    AllReady { nodes: usize },
    /// Startup failed; the supervisor is stopping.
    StartFailed { reason: String },
}

impl From<ProcMsg> for SupMsg {
    fn from(m: ProcMsg) -> SupMsg {
        SupMsg::Proc(m)
    }
}

/// Messages to the actor.
pub enum SupMsg {
    /// From a node's process watchers.
    Proc(ProcMsg),
    RestartDue {
        idx: usize,
        gen: u64,
    },
    GraceOver {
        idx: usize,
        gen: u64,
    },
    /// Every node reports the same voter set, in force (or time ran out).
    Settled,
    Request(Request, oneshot::Sender<Response>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Exited,
    Restarting,
    Failed,
}

/// Why a node is (going) down by the user's hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UserDown {
    /// `p2pctl kill`: restart only under `always`.
    Killed,
    /// `p2pctl stop` (or `restart`, which starts it again itself).
    Stopped,
}

struct Slot {
    name: String,
    /// The port it listens on: the configured one, or, for port 0, the one
    /// its first process was given (a restarted node keeps its address).
    port: u16,
    state: NodeState,
    pid: Option<u32>,
    /// Bumped at each spawn; messages from an older process are ignored.
    gen: u64,
    restarts: u32,
    role: Option<String>,
    epoch: u64,
    addr: Option<String>,
    started: Option<Instant>,
    user_down: Option<UserDown>,
    /// Start again as soon as it exits (`p2pctl restart`).
    restart_after_exit: bool,
    last_exit: Option<String>,
    /// The node's member id in the chat (from its `ready` event).
    id: Option<u64>,
    /// Why the node cannot make progress, from its `waiting` event, until
    /// it reports progress (`resumed`, `role`, `following`, a delivery).
    waiting: Option<String>,
}

/// A cheap handle to the running supervisor.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<SupMsg>,
    events: broadcast::Sender<CtlEvent>,
}

impl Handle {
    pub async fn request(&self, req: Request) -> Response {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(SupMsg::Request(req, tx)).await.is_err() {
            return Response::err("the supervisor is shutting down");
        }
        rx.await
            .unwrap_or_else(|_| Response::err("the supervisor is shutting down"))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<CtlEvent> {
        self.events.subscribe()
    }
}

pub struct Supervisor {
    cluster: Cluster,
    node_bin: PathBuf,
    slots: Vec<Slot>,
    tx: mpsc::Sender<SupMsg>,
    rx: mpsc::Receiver<SupMsg>,
    events: broadcast::Sender<CtlEvent>,
    /// Current coordinator as (epoch, node name).
    coordinator: Option<(u64, String)>,
    /// The chat's voters (member ids) as of the newest change seen, and
    /// that change's seq.
    voters: (u64, Vec<u64>),
    /// When `p2pctl kill` hit the coordinator of which epoch.
    coordinator_killed: Option<(u64, Instant)>,
    /// Initial start: index of the next node to spawn (None when done).
    starting: Option<usize>,
    start_deadline: Instant,
    /// `down` requests waiting for every node to stop.
    stopping: Vec<oneshot::Sender<Response>>,
    /// During `down`: the coordinator, stopped once every other node is
    /// gone (so the chat ends without electing a successor on the way out).
    down_last: Option<usize>,
    /// The last node started with `--create-if-alone` (slot, generation).
    creator: Option<(usize, u64)>,
    /// The chat key and its file (handed to every node).
    key: crate::check::Key,
    key_file: PathBuf,
}

impl Supervisor {
    pub fn new(cluster: Cluster, node_bin: PathBuf, key: crate::check::Key, key_file: PathBuf) -> Supervisor {
        let (tx, rx) = mpsc::channel(4096);
        let (events, _) = broadcast::channel(4096);
        let slots = cluster
            .nodes
            .iter()
            .map(|n| Slot {
                name: n.name.clone(),
                port: n.port,
                state: NodeState::Stopped,
                pid: None,
                gen: 0,
                restarts: 0,
                role: None,
                epoch: 0,
                addr: None,
                started: None,
                user_down: None,
                restart_after_exit: false,
                last_exit: None,
                id: None,
                waiting: None,
            })
            .collect();
        Supervisor {
            key,
            key_file,
            cluster,
            node_bin,
            slots,
            tx,
            rx,
            events,
            coordinator: None,
            voters: (0, Vec::new()),
            coordinator_killed: None,
            starting: None,
            start_deadline: Instant::now(),
            stopping: Vec::new(),
            down_last: None,
            creator: None,
        }
    }

    pub fn handle(&self) -> Handle {
        Handle {
            tx: self.tx.clone(),
            events: self.events.clone(),
        }
    }

    fn logs_dir(&self) -> PathBuf {
        self.cluster.state_dir.join("logs")
    }

    fn emit(&self, ev: CtlEvent) {
        let _ = self.events.send(ev);
    }

    /// Runs until `down` (or `shutdown` completes): starts the nodes one by
    /// one (each joins through those already up), then supervises.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let _ = std::fs::create_dir_all(self.logs_dir());
        self.starting = Some(0);
        self.start_deadline = Instant::now() + Duration::from_secs(20);
        self.spawn(0, false);
        tokio::pin!(shutdown);
        let mut ticker = tokio::time::interval(Duration::from_millis(250));
        let mut shut = false;
        loop {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(m) => self.on_msg(m),
                    None => break,
                },
                _ = &mut shutdown, if !shut => {
                    shut = true;
                    self.begin_down(None);
                }
                _ = ticker.tick() => self.check_start_deadline(),
            }
            if let Some(last) = self.down_last {
                if self
                    .slots
                    .iter()
                    .enumerate()
                    .all(|(i, s)| i == last || s.pid.is_none())
                {
                    self.down_last = None;
                    if self.slots[last].pid.is_some() {
                        self.stop(last, false);
                    }
                }
            }
            if (!self.stopping.is_empty() || shut) && self.slots.iter().all(|s| s.pid.is_none()) {
                for tx in self.stopping.drain(..) {
                    let _ = tx.send(Response::ok(json!({"stopped": true})));
                }
                break;
            }
        }
    }

    fn check_start_deadline(&mut self) {
        if let Some(i) = self.starting {
            if Instant::now() > self.start_deadline {
                let name = self.slots[i].name.clone();
                let reason = format!(
                    "node {name} did not become ready within 20 s; see its log in {}",
                    self.logs_dir().join(format!("{name}.log")).display()
                );
                self.starting = None;
                self.emit(CtlEvent::StartFailed { reason });
                self.begin_down(None);
            }
        }
    }

    /// Whether a node started now may start a new chat if no peer answers:
    /// the first of `up`, or the only one running; and a restarted node
    /// (its peers may all be gone), unless another node that may start one
    /// is still starting. Nodes keep no chat across a restart, so when
    /// every node restarts at once (`p2pctl restart` of each), more than
    /// one could find nobody in a chat and start one each: the cluster
    /// would then run several chats side by side.
    fn may_create(&self, idx: usize, restart: bool) -> bool {
        let others_running = self
            .slots
            .iter()
            .enumerate()
            .any(|(i, s)| i != idx && s.pid.is_some());
        if !others_running {
            return true;
        }
        let creator_starting = self.creator.is_some_and(|(i, gen)| {
            let s = &self.slots[i];
            i != idx && s.gen == gen && s.pid.is_some() && s.role.is_none()
        });
        restart && !creator_starting
    }

    fn node_args(&self, idx: usize, create: bool) -> Vec<String> {
        let slot = &self.slots[idx];
        let listen = std::net::SocketAddr::new(self.cluster.host, slot.port);
        let mut args = vec![
            "--name".into(),
            slot.name.clone(),
            "--listen".into(),
            listen.to_string(),
            "--headless".into(),
            "--events".into(),
            "json".into(),
            "--heartbeat-ms".into(),
            self.cluster.heartbeat_ms.to_string(),
        ];
        // One data directory for the cluster: the logger's transcript is
        // the same file whichever node coordinates.
        args.push("--data-dir".into());
        args.push(self.cluster.state_dir.join("data").display().to_string());
        if let Some(dir) = &self.cluster.plugin_dir {
            args.push("--plugin-dir".into());
            args.push(dir.display().to_string());
        }
        if self.key.is_some() {
            args.push("--key-file".into());
            args.push(self.key_file.display().to_string());
        } else {
            args.push("--insecure".into());
        }
        for p in &self.cluster.plugins {
            args.push("--plugin".into());
            args.push(format!("{}:{}", p.name, p.config_json()));
        }
        // Every other running node, listening yet or not: a node started
        // with no --join starts a chat of its own, so one started while
        // the others were restarting too (`p2pctl restart` of each at
        // once) started a second chat beside theirs. A port of 0 is known
        // once its first process said where it listens.
        let peers: Vec<String> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, s)| *i != idx && s.pid.is_some())
            .filter_map(|(_, s)| {
                s.addr.clone().or_else(|| {
                    (s.port != 0).then(|| std::net::SocketAddr::new(self.cluster.host, s.port).to_string())
                })
            })
            .collect();
        if !peers.is_empty() {
            args.push("--join".into());
            args.push(peers.join(","));
        }
        if create {
            args.push("--create-if-alone".into());
        }
        args
    }

    fn spawn(&mut self, idx: usize, restart: bool) {
        let create = self.may_create(idx, restart);
        let args = self.node_args(idx, create);
        let log = self.logs_dir().join(format!("{}.log", self.slots[idx].name));
        let slot = &mut self.slots[idx];
        slot.gen += 1;
        slot.role = None;
        slot.waiting = None;
        slot.epoch = 0;
        slot.addr = None;
        slot.user_down = None;
        slot.restart_after_exit = false;
        let gen = slot.gen;
        let name = slot.name.clone();
        if create {
            self.creator = Some((idx, gen));
        }
        match proc::spawn(
            &self.node_bin,
            &args,
            &self.cluster.state_dir,
            log,
            idx,
            gen,
            self.tx.clone(),
        ) {
            Ok(pid) => {
                let slot = &mut self.slots[idx];
                slot.pid = Some(pid);
                slot.state = NodeState::Starting;
                slot.started = Some(Instant::now());
                self.emit(CtlEvent::Process {
                    node: name,
                    what: format!("started (pid {pid})"),
                });
            }
            Err(e) => {
                let slot = &mut self.slots[idx];
                slot.state = NodeState::Failed;
                let what = format!("cannot start {}: {e}", self.node_bin.display());
                slot.last_exit = Some(what.clone());
                self.emit(CtlEvent::Process { node: name, what });
                if self.starting.is_some() {
                    self.starting = None;
                    self.emit(CtlEvent::StartFailed {
                        reason: format!("cannot start {}: {e}", self.node_bin.display()),
                    });
                    self.begin_down(None);
                }
            }
        }
    }

    fn on_msg(&mut self, msg: SupMsg) {
        match msg {
            SupMsg::Proc(ProcMsg::Line { idx, gen, line }) => {
                if self.slots[idx].gen == gen {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        self.on_node_event(idx, v);
                    }
                }
            }
            SupMsg::Proc(ProcMsg::Exited { idx, gen, info }) => {
                if self.slots[idx].gen == gen {
                    self.on_exit(idx, info);
                }
            }
            SupMsg::RestartDue { idx, gen } => {
                let s = &self.slots[idx];
                if s.gen == gen && s.state == NodeState::Restarting && self.stopping.is_empty() {
                    self.spawn(idx, true);
                }
            }
            SupMsg::GraceOver { idx, gen } => {
                let s = &self.slots[idx];
                if s.gen == gen {
                    if let Some(pid) = s.pid {
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    }
                }
            }
            SupMsg::Settled => self.emit(CtlEvent::AllReady {
                nodes: self.slots.len(),
            }),
            SupMsg::Request(req, reply) => self.on_request(req, reply),
        }
    }

    fn on_node_event(&mut self, idx: usize, v: Value) {
        let name = self.slots[idx].name.clone();
        let kind = v["event"].as_str().unwrap_or("").to_string();
        // Subscribers see the node's own event before what it leads to.
        self.emit(CtlEvent::Node {
            node: name.clone(),
            event: v.clone(),
        });
        match kind.as_str() {
            "waiting" => self.slots[idx].waiting = v["reason"].as_str().map(str::to_string),
            "resumed" => {
                let slot = &mut self.slots[idx];
                slot.waiting = None;
                if slot.role.as_deref() == Some("electing") {
                    slot.role = Some("member".into());
                }
            }
            "following" | "message" | "joined" | "left" => self.slots[idx].waiting = None,
            // Until its `role` (or `resumed`) event says how it ended.
            "electing" => self.slots[idx].role = Some("electing".into()),
            "listening" => {
                let addr = v["addr"].as_str().map(str::to_string);
                let slot = &mut self.slots[idx];
                if slot.port == 0 {
                    if let Some(port) = addr
                        .as_deref()
                        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                        .map(|a| a.port())
                    {
                        slot.port = port;
                    }
                }
                slot.addr = addr;
            }
            "config" => {
                self.slots[idx].waiting = None;
                // The newest voter set any node delivered.
                if let (Some(seq), Some(ids)) = (v["seq"].as_u64(), v["voters"].as_array()) {
                    if seq > self.voters.0 {
                        self.voters = (seq, ids.iter().filter_map(Value::as_u64).collect());
                    }
                }
            }
            "ready" => {
                let epoch = v["epoch"].as_u64().unwrap_or(0);
                self.slots[idx].id = v["id"].as_u64();
                if v["created"] == true {
                    if let Some(id) = v["id"].as_u64() {
                        self.voters = (0, vec![id]);
                    }
                }
                let coord = v["coordinator"].as_str().unwrap_or("").to_string();
                let slot = &mut self.slots[idx];
                slot.state = NodeState::Running;
                slot.epoch = epoch;
                slot.waiting = None;
                slot.role = Some(if coord == name { "coordinator" } else { "member" }.into());
                self.note_coordinator(epoch, &coord, None);
                if self.starting == Some(idx) {
                    let next = idx + 1;
                    if next < self.slots.len() {
                        self.starting = Some(next);
                        self.spawn(next, false);
                    } else {
                        self.starting = None;
                        // Ready once the newcomers are voters: a node that
                        // joined a moment ago cannot take over yet.
                        let addrs: Vec<String> = self.slots.iter().filter_map(|s| s.addr.clone()).collect();
                        let tx = self.tx.clone();
                        let key = self.key.clone();
                        tokio::spawn(async move {
                            crate::check::wait_settled(&addrs, std::time::Duration::from_secs(10), &key)
                                .await;
                            let _ = tx.send(SupMsg::Settled).await;
                        });
                    }
                }
            }
            "role" => {
                let epoch = v["epoch"].as_u64().unwrap_or(0);
                let coord = v["coordinator"].as_str().unwrap_or("").to_string();
                let slot = &mut self.slots[idx];
                slot.epoch = epoch;
                slot.waiting = None;
                slot.role = v["role"].as_str().map(str::to_string);
                self.note_coordinator(epoch, &coord, v["election_ms"].as_u64());
            }
            _ => {}
        }
    }

    /// Records a coordinator reign reported by any node; announces it once.
    fn note_coordinator(&mut self, epoch: u64, name: &str, election_ms: Option<u64>) {
        if name.is_empty() {
            return;
        }
        let newer = match &self.coordinator {
            None => true,
            Some((e, n)) => epoch > *e || (epoch == *e && n != name),
        };
        if !newer {
            return;
        }
        self.coordinator = Some((epoch, name.to_string()));
        let since_kill_ms = self
            .coordinator_killed
            .filter(|(e, _)| *e < epoch)
            .map(|(_, t)| t.elapsed().as_secs_f64() * 1000.0);
        if since_kill_ms.is_some() {
            self.coordinator_killed = None;
        }
        self.emit(CtlEvent::Coordinator {
            node: name.to_string(),
            epoch,
            election_ms,
            since_kill_ms,
        });
    }

    fn on_exit(&mut self, idx: usize, info: ExitInfo) {
        let restart = self.cluster.restart.clone();
        let down = !self.stopping.is_empty();
        let slot = &mut self.slots[idx];
        let ran_ms = slot.started.map_or(0, |t| t.elapsed().as_millis() as u64);
        slot.pid = None;
        slot.role = None;
        slot.waiting = None;
        slot.started = None;
        slot.last_exit = Some(info.describe());
        let name = slot.name.clone();
        let mut what = info.describe();
        let restart_now = slot.restart_after_exit;
        if down || (slot.user_down == Some(UserDown::Stopped) && !restart_now) {
            slot.state = NodeState::Stopped;
        } else if restart_now {
            slot.state = NodeState::Restarting;
        } else {
            let killed = slot.user_down == Some(UserDown::Killed);
            match restart.after_exit(info.success(), killed, slot.restarts, ran_ms) {
                AfterExit::Stay => slot.state = NodeState::Exited,
                AfterExit::Fail => {
                    slot.state = NodeState::Failed;
                    what = format!(
                        "{what}; failed after {} restarts in a row, not restarting (p2pctl start {name} tries again)",
                        restart.max_restarts
                    );
                }
                AfterExit::Restart { delay_ms, nth } => {
                    slot.restarts = nth;
                    slot.state = NodeState::Restarting;
                    what = format!(
                        "{what}; restarting in {delay_ms} ms (restart {nth} of {})",
                        restart.max_restarts
                    );
                    let (tx, gen) = (self.tx.clone(), slot.gen);
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                        let _ = tx.send(SupMsg::RestartDue { idx, gen }).await;
                    });
                }
            }
        }
        self.emit(CtlEvent::Process { node: name, what });
        if restart_now && !down {
            self.spawn(idx, true);
        }
        if self.starting == Some(idx) && !restart_now {
            self.starting = None;
            self.emit(CtlEvent::StartFailed {
                reason: format!(
                    "node {} exited during start-up; see {}",
                    self.slots[idx].name,
                    self.logs_dir()
                        .join(format!("{}.log", self.slots[idx].name))
                        .display()
                ),
            });
            self.begin_down(None);
        }
    }

    fn find(&self, node: &str) -> Result<usize, Response> {
        self.slots.iter().position(|s| s.name == node).ok_or_else(|| {
            let names: Vec<&str> = self.slots.iter().map(|s| s.name.as_str()).collect();
            Response::err(format!("no node named {node:?}; nodes are {}", names.join(", ")))
        })
    }

    /// Answers a control request: at once, or from a task for those that
    /// talk to nodes (`say`, `check`, plugin requests) or wait (`down`).
    fn on_request(&mut self, req: Request, reply: oneshot::Sender<Response>) {
        let resp = match req {
            Request::Ps => Response::ok(self.ps()),
            Request::Kill {
                node,
                coordinator,
                signal,
            } => self.kill(node, coordinator, &signal),
            Request::Start { node } => self.find(&node).map_or_else(|r| r, |i| self.start_node(i, node)),
            Request::Stop { node } => self.find(&node).map_or_else(|r| r, |i| self.stop_node(i, node)),
            Request::Restart { node } => self
                .find(&node)
                .map_or_else(|r| r, |i| self.restart_node(i, node)),
            Request::Say { node, text } => return self.say(node, text, reply),
            Request::Check => return self.check(reply),
            Request::Attach { name, config } => {
                return self.to_coordinator(p2p_proto::Frame::Attach { name, config }, reply)
            }
            Request::Detach { name } => return self.to_coordinator(p2p_proto::Frame::Detach { name }, reply),
            Request::Plugins => {
                return self.to_coordinator(p2p_proto::Frame::StatusRequest { log: false }, reply)
            }
            Request::Down => return self.begin_down(Some(reply)),
            Request::Events => Response::err("events is a stream; use the control socket directly"),
        };
        let _ = reply.send(resp);
    }

    fn start_node(&mut self, i: usize, node: String) -> Response {
        let slot = &mut self.slots[i];
        match slot.pid {
            // Killed or stopping by our hand but not reaped yet: start it
            // again as soon as it has exited.
            Some(_) if slot.user_down.is_some() => {
                slot.restart_after_exit = true;
                slot.restarts = 0;
                Response::ok(json!({"node": node, "starting_after_exit": true}))
            }
            Some(pid) => Response::err(format!("node {node} is already running (pid {pid})")),
            None => {
                slot.restarts = 0;
                self.spawn(i, true);
                Response::ok(json!({"node": node, "pid": self.slots[i].pid}))
            }
        }
    }

    fn stop_node(&mut self, i: usize, node: String) -> Response {
        if self.slots[i].pid.is_none() {
            self.slots[i].state = NodeState::Stopped;
            return Response::ok(json!({"node": node, "was": "not running"}));
        }
        self.stop(i, false);
        Response::ok(json!({"node": node, "stopping": true}))
    }

    fn restart_node(&mut self, i: usize, node: String) -> Response {
        if self.slots[i].pid.is_none() {
            self.slots[i].restarts = 0;
            self.spawn(i, true);
            return Response::ok(json!({"node": node, "pid": self.slots[i].pid}));
        }
        self.stop(i, true);
        Response::ok(json!({"node": node, "restarting": true}))
    }

    /// Posts `text` as `node` from a task; answers when the node took it.
    fn say(&self, node: String, text: String, reply: oneshot::Sender<Response>) {
        let i = match self.find(&node) {
            Ok(i) => i,
            Err(r) => {
                let _ = reply.send(r);
                return;
            }
        };
        let Some(addr) = self.slots[i].addr.clone().filter(|_| self.slots[i].pid.is_some()) else {
            let _ = reply.send(Response::err(format!(
                "node {node} is not running; start it with p2pctl start {node}"
            )));
            return;
        };
        let key = self.key.clone();
        tokio::spawn(async move {
            let r = crate::check::post(&addr, &text, &key).await;
            let _ = reply.send(match r {
                Ok(client_seq) => Response::ok(json!({"node": node, "client_seq": client_seq})),
                Err(e) => Response::err(format!("cannot reach node {node} at {addr}: {e}")),
            });
        });
    }

    /// Checks every running node from a task.
    fn check(&self, reply: oneshot::Sender<Response>) {
        let nodes: Vec<(String, String)> = self
            .slots
            .iter()
            .filter(|s| s.pid.is_some() && s.state == NodeState::Running)
            .filter_map(|s| s.addr.clone().map(|a| (s.name.clone(), a)))
            .collect();
        let key = self.key.clone();
        tokio::spawn(async move {
            let _ = reply.send(crate::check::check(nodes, &key).await);
        });
    }

    /// Sends an observer frame to the current coordinator; answers with the
    /// plugin list from its status.
    fn to_coordinator(&self, frame: p2p_proto::Frame, reply: oneshot::Sender<Response>) {
        let addr = self
            .coordinator
            .as_ref()
            .and_then(|(_, name)| self.slots.iter().find(|s| &s.name == name && s.pid.is_some()))
            .and_then(|s| s.addr.clone())
            .or_else(|| {
                self.slots
                    .iter()
                    .find(|s| s.pid.is_some())
                    .and_then(|s| s.addr.clone())
            });
        let Some(addr) = addr else {
            let _ = reply.send(Response::err("no node is running"));
            return;
        };
        let key = self.key.clone();
        tokio::spawn(async move {
            let resp = match crate::check::coordinator_request(&addr, &frame, &key).await {
                Ok(p2p_proto::Frame::Status { name, plugins, .. }) => {
                    Response::ok(json!({"coordinator": name, "plugins": plugins}))
                }
                Ok(other) => Response::err(format!("unexpected answer from the coordinator: {other:?}")),
                Err(e) => Response::err(e),
            };
            let _ = reply.send(resp);
        });
    }

    fn ps(&self) -> Value {
        let rows: Vec<Value> = self
            .slots
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "pid": s.pid,
                    "addr": s.addr.clone().unwrap_or_else(|| format!("{}:{}", self.cluster.host, s.port)),
                    "state": s.state,
                    "role": s.role.clone().filter(|_| s.pid.is_some()),
                    "epoch": s.epoch,
                    "restarts": s.restarts,
                    "voter": s.pid.is_some() && s.id.is_some_and(|id| self.voters.1.contains(&id)),
                    "uptime_ms": s.started.map(|t| t.elapsed().as_millis() as u64),
                    "last_exit": s.last_exit,
                    "waiting": s.waiting.clone().filter(|_| s.pid.is_some()),
                })
            })
            .collect();
        Value::Array(rows)
    }

    fn kill(&mut self, node: Option<String>, coordinator: bool, signal: &str) -> Response {
        let sig = match signal.to_ascii_uppercase().trim_start_matches("SIG") {
            "KILL" => Signal::SIGKILL,
            "TERM" => Signal::SIGTERM,
            "INT" => Signal::SIGINT,
            "STOP" => Signal::SIGSTOP,
            "CONT" => Signal::SIGCONT,
            other => {
                return Response::err(format!(
                    "unknown signal {other:?}; use KILL, TERM, INT, STOP or CONT"
                ))
            }
        };
        let idx = if coordinator {
            let Some((_, name)) = self.coordinator.clone() else {
                return Response::err("no coordinator is known yet");
            };
            match self.slots.iter().position(|s| s.name == name && s.pid.is_some()) {
                Some(i) => i,
                None => return Response::err(format!("the coordinator {name} is not running")),
            }
        } else {
            let Some(node) = node else {
                return Response::err("name a node or pass --coordinator");
            };
            match self.find(&node) {
                Ok(i) => i,
                Err(r) => return r,
            }
        };
        let slot = &self.slots[idx];
        let Some(pid) = slot.pid else {
            return Response::err(format!("node {} is not running", slot.name));
        };
        let was_coordinator = self.coordinator.as_ref().is_some_and(|(_, n)| *n == slot.name);
        if let Err(e) = kill(Pid::from_raw(pid as i32), sig) {
            return Response::err(format!("cannot signal node {} (pid {pid}): {e}", slot.name));
        }
        let epoch = self.coordinator.as_ref().map(|(e, _)| *e).unwrap_or(0);
        let slot = &mut self.slots[idx];
        match sig {
            Signal::SIGSTOP => slot.state = NodeState::Paused,
            Signal::SIGCONT => {
                if slot.state == NodeState::Paused {
                    slot.state = NodeState::Running;
                }
            }
            _ => slot.user_down = Some(UserDown::Killed),
        }
        if was_coordinator && sig != Signal::SIGCONT {
            self.coordinator_killed = Some((epoch, Instant::now()));
        }
        let name = self.slots[idx].name.clone();
        self.emit(CtlEvent::Process {
            node: name.clone(),
            what: format!("sent {} by p2pctl kill", sig.as_str()),
        });
        Response::ok(
            json!({"node": name, "pid": pid, "signal": sig.as_str(), "was_coordinator": was_coordinator}),
        )
    }

    /// SIGTERM now, SIGKILL after the grace period.
    fn stop(&mut self, idx: usize, then_restart: bool) {
        let grace = self.cluster.stop_grace_ms;
        let slot = &mut self.slots[idx];
        slot.user_down = Some(UserDown::Stopped);
        slot.restart_after_exit = then_restart;
        let Some(pid) = slot.pid else { return };
        slot.state = NodeState::Stopping;
        let pid = Pid::from_raw(pid as i32);
        let _ = kill(pid, Signal::SIGCONT);
        let _ = kill(pid, Signal::SIGTERM);
        let (tx, gen) = (self.tx.clone(), slot.gen);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(grace)).await;
            let _ = tx.send(SupMsg::GraceOver { idx, gen }).await;
        });
    }

    fn begin_down(&mut self, reply: Option<oneshot::Sender<Response>>) {
        self.starting = None;
        // Members first, the coordinator last: each member leaves a live
        // chat, and nobody is elected on the way out.
        let coordinator = self
            .coordinator
            .as_ref()
            .and_then(|(_, name)| self.slots.iter().position(|s| &s.name == name && s.pid.is_some()));
        self.down_last = coordinator;
        for i in 0..self.slots.len() {
            if Some(i) == coordinator {
                continue;
            }
            if self.slots[i].pid.is_some() {
                self.stop(i, false);
            } else if self.slots[i].state == NodeState::Restarting {
                self.slots[i].state = NodeState::Stopped;
            }
        }
        match reply {
            Some(r) => self.stopping.push(r),
            None => {
                // Internal shutdown: keep a sender so the loop waits for exits.
                let (tx, _rx) = oneshot::channel();
                self.stopping.push(tx);
            }
        }
    }
}

/// Longest control request read (the largest real one, an `attach` with
/// its configuration, is a few KiB).
const MAX_REQUEST: usize = 1 << 20;

/// Serves the control socket until the supervisor stops.
pub async fn serve_control(listener: tokio::net::UnixListener, handle: Handle) {
    use tokio::io::{AsyncWriteExt, BufReader};
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            // One request line, read no further than the limit (a longer
            // one is cut, and refused as a bad request).
            let (mut read, mut buf) = (BufReader::new(read), Vec::new());
            let Ok(Some(line)) = p2p_proto::net::read_text_line(&mut read, &mut buf, MAX_REQUEST).await
            else {
                return;
            };
            let req: Request = match serde_json::from_str(&line) {
                Ok(r) => r,
                Err(e) => {
                    let resp = Response::err(format!("bad request: {e}"));
                    let _ = write
                        .write_all(
                            format!("{}\n", serde_json::to_string(&resp).unwrap_or_default()).as_bytes(),
                        )
                        .await;
                    return;
                }
            };
            if let Request::Events = req {
                let mut rx = handle.subscribe();
                loop {
                    match rx.recv().await {
                        Ok(ev) => {
                            let line = format!("{}\n", serde_json::to_string(&ev).unwrap_or_default());
                            if write.write_all(line.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    }
                }
            }
            let resp = handle.request(req).await;
            let line = format!("{}\n", serde_json::to_string(&resp).unwrap_or_default());
            let _ = write.write_all(line.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supervisor(nodes: usize) -> Supervisor {
        let mut text = String::from("name: t\nnodes:\n");
        for i in 0..nodes {
            text.push_str(&format!("  - name: n{i}\n    port: {}\n", 7001 + i));
        }
        let cluster = Cluster::parse(&text, std::path::Path::new("t.yaml")).expect("a valid cluster file");
        Supervisor::new(cluster, PathBuf::from("p2pnode"), None, PathBuf::from("t.key"))
    }

    /// What `spawn` records for a node started now: a new generation, a
    /// process, no role yet; `--create-if-alone` makes it the creator.
    fn started(s: &mut Supervisor, idx: usize) {
        let create = s.may_create(idx, true);
        let slot = &mut s.slots[idx];
        slot.gen += 1;
        slot.pid = Some(1000 + idx as u32);
        slot.role = None;
        if create {
            s.creator = Some((idx, slot.gen));
        }
    }

    #[test]
    fn only_one_node_restarting_at_a_time_may_start_a_chat() {
        let mut s = supervisor(3);
        assert!(s.may_create(0, false), "the first node of up starts the chat");
        started(&mut s, 0);
        assert!(!s.may_create(1, false), "the others of up join it");
        // Every node restarting at once: the first may start a chat, the
        // others only join while it has not said it is ready.
        started(&mut s, 1);
        started(&mut s, 2);
        assert_eq!(s.creator.map(|(i, _)| i), Some(0));
        assert!(!s.may_create(1, true) && !s.may_create(2, true));
        // Once it is in a chat (or gone), a restarted node may again: its
        // peers may all be gone, and with a chat running it joins that.
        s.slots[0].role = Some("coordinator".into());
        assert!(s.may_create(1, true));
        s.slots[0].role = None;
        s.slots[0].pid = None;
        assert!(s.may_create(2, true));
    }

    #[test]
    fn a_node_started_while_the_others_restart_is_given_them_all_to_join() {
        let mut s = supervisor(3);
        started(&mut s, 1);
        started(&mut s, 2);
        s.slots[2].addr = Some("127.0.0.1:7999".into());
        let args = s.node_args(0, false);
        let join = args
            .iter()
            .position(|a| a == "--join")
            .map(|i| args[i + 1].clone())
            .expect("a --join list");
        // Node 1 has not said where it listens yet: its configured port.
        assert_eq!(join, "127.0.0.1:7002,127.0.0.1:7999");
        assert!(!args.iter().any(|a| a == "--create-if-alone"));
    }
}
