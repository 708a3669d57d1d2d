//! torture: a seeded schedule of faults against real `p2pnode` processes
//! on 127.0.0.1 — SIGKILL of coordinators and members (some right after a
//! takeover), SIGSTOP/SIGCONT of either for 0.2–2 s, restarts on the same
//! address, network partitions of 0.2–3 s and one-way cuts of 0.2–5 s
//! (each node's `--cut-file`), optional CPU hogs — while lines are typed into every node. Its own
//! history checker (`history.rs`) judges what each process printed.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::history::{History, Proc, Verdict};
use crate::nodes::{free_port, node_bin};

/// What a run does (`p2pbench torture`'s options).
#[derive(Debug, Clone, clap::Args)]
pub struct Plan {
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 5)]
    pub nodes: usize,
    #[arg(long, default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// SIGKILLs (coordinators most of the time, some right after a
    /// takeover).
    #[arg(long, default_value_t = 100)]
    pub kills: usize,
    /// SIGSTOP/SIGCONT cycles of 0.2-2 s.
    #[arg(long, default_value_t = 50)]
    pub stops: usize,
    /// Network partitions of 0.2-3 s (one node cut off, often the
    /// coordinator, or a random split), one at a time, made with each
    /// node's --cut-file.
    #[arg(long, default_value_t = 0)]
    pub partitions: usize,
    /// One-way cuts of 0.2-5 s: the nodes on one side of a random split
    /// cannot dial those on the other (as behind a firewall or a NAT),
    /// while open connections and dials the other way carry on; one
    /// cut of either kind at a time.
    #[arg(long, default_value_t = 0)]
    pub one_way: usize,
    /// Busy-loop processes to run beside the nodes.
    #[arg(long, default_value_t = 0)]
    pub hogs: usize,
    /// How long the hogs run, in seconds.
    #[arg(long, default_value_t = 60)]
    pub hog_secs: u64,
    /// Type a line into a random node this often.
    #[arg(long, default_value_t = 5)]
    pub type_every_ms: u64,
    /// Keep each process's diagnostics (RUST_LOG=info) in DIR
    /// (NAME.GENERATION.log).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<std::path::PathBuf>,
}

/// A small seedable generator (splitmix64): the same seed, the same plan.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One fixed address and the process running there now, if any.
struct Slot {
    name: String,
    addr: String,
    inc: u32,
    child: Option<Child>,
    stdin: Option<mpsc::UnboundedSender<String>>,
    stopped_until: Option<Instant>,
    restart_at: Option<Instant>,
    typed: u64,
    /// Started at least once (the next process is a new generation).
    spawned: bool,
}

impl Slot {
    fn pid(&self) -> Option<Pid> {
        self.child
            .as_ref()
            .and_then(Child::id)
            .map(|p| Pid::from_raw(p as i32))
    }
    fn running(&self) -> bool {
        self.child.is_some() && self.stopped_until.is_none()
    }
}

/// What the run measured.
pub struct Outcome {
    pub verdict: Verdict,
    pub crash_ms: Vec<f64>,
    pub hang_ms: Vec<f64>,
    pub kills: usize,
    pub stops: usize,
    pub partitions: usize,
    pub one_way: usize,
    pub restarts: usize,
    pub messages: usize,
    pub secs: f64,
}

impl Outcome {
    pub fn to_json(&self, plan: &Plan) -> Value {
        let mut v = self.verdict.to_json();
        v["scenario"] = json!("torture");
        v["seed"] = json!(plan.seed);
        v["kills"] = json!(self.kills);
        v["stops"] = json!(self.stops);
        v["partitions"] = json!(self.partitions);
        v["one_way"] = json!(self.one_way);
        v["restarts"] = json!(self.restarts);
        v["messages"] = json!(self.messages);
        v["secs"] = json!(self.secs);
        let pct = |s: &[f64]| {
            let mut s = s.to_vec();
            let p = crate::report::percentiles(&mut s);
            json!({"n": s.len(), "p50": p.p50, "p99": p.p99, "max": p.max})
        };
        v["crash_failover_ms"] = pct(&self.crash_ms);
        v["hang_failover_ms"] = pct(&self.hang_ms);
        v
    }
}

/// How long the faults may find no target before the run counts as stuck.
const STUCK: Duration = Duration::from_secs(60);

/// A pending failover measurement: fault time, epoch of the victim.
struct Timing {
    at: Instant,
    epoch: u64,
    hang: bool,
}

pub async fn run(plan: Plan) -> anyhow::Result<Outcome> {
    let mut rng = Rng(plan.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let (tx, mut rx) = mpsc::unbounded_channel::<(Proc, Instant, Value)>();
    let mut slots: Vec<Slot> = Vec::new();
    for i in 0..plan.nodes {
        slots.push(Slot {
            name: format!("n{i}"),
            addr: format!("127.0.0.1:{}", free_port()?),
            inc: 0,
            child: None,
            stdin: None,
            stopped_until: None,
            restart_at: None,
            typed: 0,
            spawned: false,
        });
    }
    let mut hist = History::default();
    let addrs: Vec<String> = slots.iter().map(|s| s.addr.clone()).collect();
    let cuts = Cuts::new(plan.seed, slots.len())?;
    for i in 0..slots.len() {
        spawn(&mut slots, i, &addrs, &plan, i == 0, &tx, &cuts)?;
        // Join one at a time, so the voters grow in a known order.
        let (p, want) = ((i, 0u32), "ready");
        wait_event(&mut rx, &mut hist, Duration::from_secs(10), |q, v| {
            q == p && v["event"] == want
        })
        .await?;
    }
    let hogs: Vec<Child> = (0..plan.hogs)
        .map(|_| {
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .kill_on_drop(true)
                .spawn()
                .context("starting a CPU hog")
        })
        .collect::<anyhow::Result<_>>()?;
    let hog_end = Instant::now() + Duration::from_secs(plan.hog_secs);
    let start = Instant::now();
    let (mut kills, mut stops, mut restarts, mut partitions, mut one_way) = (0, 0, 0, 0, 0);
    // The partition in force: when it heals.
    let mut heal_at: Option<Instant> = None;
    // Faults wait while they would leave a voter set without a majority;
    // a chat that never gets there again is stuck: stop and let the
    // checker say so.
    let mut last_fault = Instant::now();
    let mut gave_up = false;
    let mut crash_ms = Vec::new();
    let mut hang_ms = Vec::new();
    let mut timing: Option<Timing> = None;
    let mut roles: BTreeMap<Proc, (String, u64)> = BTreeMap::new();
    let mut next_type = Instant::now();
    let mut next_fault = Instant::now() + Duration::from_millis(500);
    let mut chase: Option<Instant> = None;
    let mut hogs = Some(hogs);
    while (!gave_up
        && (kills < plan.kills
            || stops < plan.stops
            || partitions < plan.partitions
            || one_way < plan.one_way))
        || heal_at.is_some()
        || slots
            .iter()
            .any(|s| s.stopped_until.is_some() || s.restart_at.is_some())
    {
        let now = Instant::now();
        if !gave_up && now.duration_since(last_fault) > STUCK {
            eprintln!(
                "torture: no fault allowed for {} s (no voter set with a majority running to spare); ending the faults",
                STUCK.as_secs()
            );
            gave_up = true;
        }
        if now > hog_end {
            hogs.take();
        }
        // Events in.
        while let Ok((p, at, v)) = rx.try_recv() {
            if v["event"] == "role" {
                let epoch = v["epoch"].as_u64().unwrap_or(0);
                roles.insert(p, (v["role"].as_str().unwrap_or("").to_string(), epoch));
                if v["role"] == "coordinator" {
                    if let Some(t) = timing.as_ref().filter(|t| epoch > t.epoch) {
                        let ms = at.duration_since(t.at).as_secs_f64() * 1000.0;
                        if t.hang {
                            hang_ms.push(ms)
                        } else {
                            crash_ms.push(ms)
                        }
                        timing = None;
                        // Sometimes kill the new coordinator right away.
                        if kills < plan.kills && rng.chance(30) {
                            chase = Some(now + Duration::from_millis(rng.range(0, 50)));
                        }
                    }
                }
            }
            if v["event"] == "ready" {
                let epoch = v["epoch"].as_u64().unwrap_or(0);
                let role = if v["created"] == true {
                    "coordinator"
                } else {
                    "member"
                };
                roles.insert(p, (role.to_string(), epoch));
            }
            hist.event(p, &v);
        }
        // Time-driven transitions.
        for i in 0..slots.len() {
            if slots[i].stopped_until.is_some_and(|t| now >= t) {
                slots[i].stopped_until = None;
                if let Some(pid) = slots[i].pid() {
                    let _ = kill(pid, Signal::SIGCONT);
                }
            }
            if slots[i].restart_at.is_some_and(|t| now >= t) {
                slots[i].restart_at = None;
                restarts += 1;
                spawn(&mut slots, i, &addrs, &plan, false, &tx, &cuts)?;
            }
            // A process that exited on its own is restarted too.
            if let Some(c) = slots[i].child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    slots[i].child = None;
                    slots[i].restart_at = Some(now + Duration::from_millis(200));
                }
            }
        }
        if heal_at.is_some_and(|t| now >= t) {
            heal_at = None;
            cuts.heal()?;
        }
        // Typing.
        if now >= next_type {
            next_type = now + Duration::from_millis(plan.type_every_ms);
            let running: Vec<usize> = (0..slots.len()).filter(|i| slots[*i].running()).collect();
            if !running.is_empty() {
                let i = running[rng.below(running.len() as u64) as usize];
                let s = &mut slots[i];
                s.typed += 1;
                let text = format!("{}.{}.{}", s.name, s.inc, s.typed);
                if let Some(tx) = &s.stdin {
                    let _ = tx.send(text.clone());
                    hist.typed((i, s.inc), text);
                }
            }
        }
        // Faults.
        let coordinator = coordinator_slot(&slots, &roles);
        if chase.is_some_and(|t| now >= t) && !gave_up {
            chase = None;
            if let Some(c) = coordinator {
                if allowed(&slots, &hist, c).await {
                    kills += 1;
                    last_fault = now;
                    timing = Some(fault(&mut slots, c, Signal::SIGKILL, &roles, &mut rng));
                }
            }
        }
        // A partition or a one-way cut now and then, one at a time (no
        // draw at all without them, and none between the two kinds without
        // one-way cuts, so older seeds keep their schedules).
        let two_way_left = plan.partitions - partitions;
        let one_way_left = plan.one_way - one_way;
        let left = two_way_left + one_way_left;
        if now >= next_fault
            && !gave_up
            && left > 0
            && heal_at.is_none()
            && rng.below(((plan.kills + plan.stops).saturating_sub(kills + stops) + left) as u64)
                < left as u64
        {
            next_fault = now + Duration::from_millis(rng.range(150, 600));
            last_fault = now;
            let is_one_way = plan.one_way > 0 && rng.below(left as u64) < one_way_left as u64;
            let sides = split(slots.len(), coordinator, &mut rng);
            if is_one_way {
                one_way += 1;
                // Which side cannot dial the other.
                let dialler = rng.chance(50);
                cuts.one_way(&sides, dialler, &addrs)?;
                heal_at = Some(now + Duration::from_millis(rng.range(200, 5000)));
            } else {
                partitions += 1;
                cuts.cut(&sides, &addrs)?;
                heal_at = Some(now + Duration::from_millis(rng.range(200, 3000)));
            }
        }
        if now >= next_fault && !gave_up && (kills < plan.kills || stops < plan.stops) {
            next_fault = now + Duration::from_millis(rng.range(150, 600));
            let want_kill = stops >= plan.stops || (kills < plan.kills && rng.chance(60));
            let on_coordinator = rng.chance(70);
            let target = match coordinator {
                Some(c) if on_coordinator => Some(c),
                _ => {
                    let live: Vec<usize> = (0..slots.len()).filter(|i| slots[*i].running()).collect();
                    (!live.is_empty()).then(|| live[rng.below(live.len() as u64) as usize])
                }
            };
            if let Some(t) = target.filter(|t| slots[*t].running()) {
                if allowed(&slots, &hist, t).await {
                    let is_coord = Some(t) == coordinator;
                    if want_kill {
                        kills += 1;
                        last_fault = now;
                        let f = fault(&mut slots, t, Signal::SIGKILL, &roles, &mut rng);
                        if is_coord {
                            timing = Some(f);
                        }
                    } else {
                        stops += 1;
                        last_fault = now;
                        let f = fault(&mut slots, t, Signal::SIGSTOP, &roles, &mut rng);
                        if is_coord {
                            timing = Some(f);
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(hogs);
    cuts.heal()?;
    // Heal: everyone runs; wait until they settle on one sequence.
    let converged = settle(&mut slots, &mut rx, &mut hist, &mut roles).await;
    let secs = start.elapsed().as_secs_f64();
    hist.survivors = (0..slots.len())
        .filter(|i| slots[*i].child.is_some())
        .map(|i| (i, slots[i].inc))
        .collect();
    let verdict = hist.verdict(converged);
    let messages = hist.messages();
    for s in &mut slots {
        if let Some(c) = s.child.as_mut() {
            let _ = c.start_kill();
        }
    }
    Ok(Outcome {
        verdict,
        crash_ms,
        hang_ms,
        kills,
        stops,
        partitions,
        one_way,
        restarts,
        messages,
        secs,
    })
}

/// Each node's cut file, in a directory of this run's own.
struct Cuts {
    dir: std::path::PathBuf,
    nodes: usize,
}

impl Cuts {
    fn new(seed: u64, nodes: usize) -> anyhow::Result<Cuts> {
        let dir = std::env::temp_dir().join(format!("p2p-torture-{}-{seed}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let cuts = Cuts { dir, nodes };
        cuts.heal()?;
        Ok(cuts)
    }

    fn path(&self, i: usize) -> std::path::PathBuf {
        self.dir.join(format!("n{i}.cut"))
    }

    /// Cuts every node off from the nodes on the other side.
    fn cut(&self, sides: &[bool], addrs: &[String]) -> anyhow::Result<()> {
        for i in 0..self.nodes {
            let others: String = (0..self.nodes)
                .filter(|j| sides[*j] != sides[i])
                .map(|j| format!("{}\n", addrs[j]))
                .collect();
            self.write(i, &others)?;
        }
        Ok(())
    }

    /// The nodes on side `from` cannot dial the nodes on the other side;
    /// every open connection, and every dial the other way, carries on.
    fn one_way(&self, sides: &[bool], from: bool, addrs: &[String]) -> anyhow::Result<()> {
        for i in 0..self.nodes {
            let blocked: String = (0..self.nodes)
                .filter(|j| sides[i] == from && sides[*j] != from)
                .map(|j| format!("nodial {}\n", addrs[j]))
                .collect();
            self.write(i, &blocked)?;
        }
        Ok(())
    }

    fn heal(&self) -> anyhow::Result<()> {
        (0..self.nodes).try_for_each(|i| self.write(i, ""))
    }

    /// Replaces a file whole (a node never reads half of it).
    fn write(&self, i: usize, text: &str) -> anyhow::Result<()> {
        let (path, tmp) = (self.path(i), self.dir.join(format!("n{i}.cut.tmp")));
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
    }
}

impl Drop for Cuts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The two sides of a partition (true: the side cut off): the coordinator
/// or another node alone, or a random split.
fn split(n: usize, coordinator: Option<usize>, rng: &mut Rng) -> Vec<bool> {
    let mut sides = vec![false; n];
    if rng.chance(50) {
        let alone = match coordinator {
            Some(c) if rng.chance(60) => c,
            _ => rng.below(n as u64) as usize,
        };
        sides[alone] = true;
    } else {
        for s in sides.iter_mut() {
            *s = rng.chance(50);
        }
        // Both sides non-empty.
        let k = rng.below(n as u64) as usize;
        let other = (k + 1 + rng.below(n as u64 - 1) as usize) % n;
        sides[k] = true;
        sides[other] = false;
    }
    sides
}

/// Starts the process of slot `i` (a new generation there).
fn spawn(
    slots: &mut [Slot],
    i: usize,
    addrs: &[String],
    plan: &Plan,
    create: bool,
    tx: &mpsc::UnboundedSender<(Proc, Instant, Value)>,
    cuts: &Cuts,
) -> anyhow::Result<()> {
    if slots[i].spawned {
        slots[i].inc += 1;
    }
    slots[i].spawned = true;
    let inc = slots[i].inc;
    let mut cmd = Command::new(node_bin()?);
    cmd.args([
        "--name",
        &slots[i].name,
        "--listen",
        &slots[i].addr,
        "--events",
        "json",
    ])
    .args(["--heartbeat-ms", &plan.heartbeat_ms.to_string()])
    .arg("--cut-file")
    .arg(cuts.path(i))
    .args(crate::nodes::key_args(false)?.0)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    if let Some(dir) = &plan.logs {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{}.{}.log", slots[i].name, inc));
        let file =
            std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        cmd.stderr(file).env("RUST_LOG", "p2p_node=info");
    }
    if !create && addrs.len() > 1 {
        let others: Vec<&str> = addrs
            .iter()
            .filter(|a| **a != slots[i].addr)
            .map(String::as_str)
            .collect();
        cmd.args(["--join", &others.join(",")]);
    }
    let mut child = cmd.spawn().context("starting p2pnode")?;
    let out = child.stdout.take().context("stdout")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let (line_tx, mut line_rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(l) = line_rx.recv().await {
            if stdin.write_all(format!("{l}\n").as_bytes()).await.is_err() {
                return;
            }
        }
    });
    let tx = tx.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<Value>(&l) {
                if tx.send(((i, inc), Instant::now(), v)).is_err() {
                    return;
                }
            }
        }
    });
    slots[i].child = Some(child);
    slots[i].stdin = Some(line_tx);
    slots[i].typed = 0;
    Ok(())
}

fn coordinator_slot(slots: &[Slot], roles: &BTreeMap<Proc, (String, u64)>) -> Option<usize> {
    (0..slots.len())
        .filter(|i| slots[*i].running())
        .filter_map(|i| {
            roles
                .get(&(i, slots[i].inc))
                .filter(|(r, _)| r == "coordinator")
                .map(|(_, e)| (*e, i))
        })
        .max()
        .map(|(_, i)| i)
}

/// Sends a fault; returns what to time the failover against.
fn fault(
    slots: &mut [Slot],
    t: usize,
    sig: Signal,
    roles: &BTreeMap<Proc, (String, u64)>,
    rng: &mut Rng,
) -> Timing {
    let epoch = roles.get(&(t, slots[t].inc)).map(|r| r.1).unwrap_or(0);
    let at = Instant::now();
    if let Some(pid) = slots[t].pid() {
        let _ = kill(pid, sig);
    }
    if sig == Signal::SIGKILL {
        if let Some(mut c) = slots[t].child.take() {
            let _ = c.start_kill();
        }
        slots[t].stdin = None;
        slots[t].restart_at = Some(at + Duration::from_millis(rng.range(100, 1000)));
    } else {
        slots[t].stopped_until = Some(at + Duration::from_millis(rng.range(200, 2000)));
    }
    Timing {
        at,
        epoch,
        hang: sig == Signal::SIGSTOP,
    }
}

/// A fault may not leave fewer than a majority of any voter set in force
/// running: a killed voter never comes back (its restart is a new member),
/// and without a majority of a set the chat waits for ever, by design.
/// Every node's view of the voters counts, and while a change of the
/// voters is not known to be in force (`stable` false) the previous set,
/// which no status shows, still counts for elections: no fault then.
async fn allowed(slots: &[Slot], hist: &History, target: usize) -> bool {
    let mut sets: Vec<Vec<u64>> = Vec::new();
    for s in slots.iter().filter(|s| s.running()) {
        if let Ok(p2p_proto::Frame::Status { voters, stable, .. }) =
            tokio::time::timeout(Duration::from_millis(300), status(&s.addr))
                .await
                .unwrap_or(Err(anyhow::anyhow!("timeout")))
        {
            if !stable {
                return false;
            }
            if !voters.is_empty() && !sets.contains(&voters) {
                sets.push(voters);
            }
        }
    }
    let healthy = |voters: &Vec<u64>| {
        voters
            .iter()
            .filter(|id| {
                (0..slots.len()).any(|i| {
                    i != target && slots[i].running() && hist.ids.get(&(i, slots[i].inc)) == Some(id)
                })
            })
            .count()
    };
    !sets.is_empty() && sets.iter().all(|v| 2 * healthy(v) > v.len())
}

async fn status(addr: &str) -> anyhow::Result<p2p_proto::Frame> {
    let key = crate::nodes::bench_key()?.1;
    p2p_ctl::check::coordinator_request(addr, &p2p_proto::Frame::StatusRequest { log: false }, &key)
        .await
        .map_err(anyhow::Error::msg)
}

async fn wait_event(
    rx: &mut mpsc::UnboundedReceiver<(Proc, Instant, Value)>,
    hist: &mut History,
    limit: Duration,
    pred: impl Fn(Proc, &Value) -> bool,
) -> anyhow::Result<()> {
    let end = tokio::time::Instant::now() + limit;
    loop {
        let (p, _, v) = tokio::time::timeout_at(end, rx.recv())
            .await
            .context("timed out waiting for a node")?
            .context("event channel closed")?;
        hist.event(p, &v);
        if pred(p, &v) {
            return Ok(());
        }
    }
}

/// After the faults: everyone running, then up to 60 s for one coordinator
/// and one delivered sequence everywhere, with nothing typed left behind.
async fn settle(
    slots: &mut [Slot],
    rx: &mut mpsc::UnboundedReceiver<(Proc, Instant, Value)>,
    hist: &mut History,
    roles: &mut BTreeMap<Proc, (String, u64)>,
) -> bool {
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        while let Ok((p, _, v)) = rx.try_recv() {
            if v["event"] == "role" {
                roles.insert(
                    p,
                    (
                        v["role"].as_str().unwrap_or("").to_string(),
                        v["epoch"].as_u64().unwrap_or(0),
                    ),
                );
            }
            hist.event(p, &v);
        }
        let mut seqs = Vec::new();
        let mut coords = 0;
        let mut all = true;
        for s in slots.iter().filter(|s| s.child.is_some()) {
            match tokio::time::timeout(Duration::from_millis(500), status(&s.addr)).await {
                Ok(Ok(p2p_proto::Frame::Status { last_seq, role, .. })) => {
                    seqs.push(last_seq);
                    coords += usize::from(role == p2p_proto::Role::Coordinator);
                }
                _ => all = false,
            }
        }
        hist.survivors = (0..slots.len())
            .filter(|i| slots[*i].child.is_some())
            .map(|i| (i, slots[i].inc))
            .collect();
        if all && coords == 1 && seqs.windows(2).all(|w| w[0] == w[1]) && hist.undelivered().is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
