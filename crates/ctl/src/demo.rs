//! `p2pctl demo`: the story in one command. Brings the cluster up, chats,
//! kills the coordinator and measures the failover (kill → chat flowing
//! again), restarts the killed node, checks agreement, tears down.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// A line of the story on stdout; a reader that left or a full disk loses
/// it, never the story's clean-up ([`crate::run::say`]).
macro_rules! out {
    ($($arg:tt)*) => {
        crate::run::say(&format!($($arg)*))
    };
}

use anyhow::{bail, Context};
use console::Style;
use serde_json::Value;
use tokio::sync::broadcast;

use crate::config::Cluster;
use crate::control::{Request, Response};
use crate::display::Display;
use crate::run::{self, Running};
use crate::supervisor::CtlEvent;

/// What the demo has seen so far.
#[derive(Default)]
struct Seen {
    /// Texts each node delivered.
    delivered: HashMap<String, HashSet<String>>,
    coordinator: Option<(String, u64)>,
    ready: HashSet<String>,
    /// Verdicts reported by the coordinator.
    verdicts: usize,
}

struct Story {
    running: Running,
    display: Display,
    seen: Seen,
    /// Plugins the cluster file attaches.
    plugins: Vec<String>,
    state_dir: std::path::PathBuf,
    /// The cluster has a chat key (not `insecure: true`).
    keyed: bool,
    /// Pause before each step, so a person can follow (never inside a
    /// measurement).
    pace: Duration,
}

fn step(text: &str) {
    out!(
        "\n{} {}",
        Style::new().bold().cyan().apply_to("==>"),
        Style::new().bold().apply_to(text)
    );
}

impl Story {
    /// Lets events arrive (and be shown) during the pacing pause.
    async fn pause(&mut self) {
        let end = Instant::now() + self.pace;
        while let Ok(Ok(ev)) = tokio::time::timeout_at(end.into(), self.running.events.recv()).await {
            self.absorb(&ev);
        }
    }

    fn absorb(&mut self, ev: &CtlEvent) {
        match ev {
            CtlEvent::Node { node, event } => match event["event"].as_str() {
                Some("message") => {
                    let text = event["text"].as_str().unwrap_or("").to_string();
                    self.seen.delivered.entry(node.clone()).or_default().insert(text);
                }
                Some("ready") => {
                    self.seen.ready.insert(node.clone());
                }
                Some("verdict") if self.seen.coordinator.as_ref().is_some_and(|(c, _)| c == node) => {
                    self.seen.verdicts += 1;
                }
                _ => {}
            },
            CtlEvent::Coordinator { node, epoch, .. } => self.seen.coordinator = Some((node.clone(), *epoch)),
            CtlEvent::Process { node, .. } => {
                self.seen.ready.remove(node);
            }
            _ => {}
        }
        if let Some(l) = self.display.line(ev) {
            out!("{l}");
        }
    }

    /// Prints events until `done` holds; fails after `limit`.
    async fn until(
        &mut self,
        what: &str,
        limit: Duration,
        done: impl Fn(&Seen) -> bool,
    ) -> anyhow::Result<()> {
        let end = Instant::now() + limit;
        while !done(&self.seen) {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.running.events.recv()).await {
                Ok(Ok(ev)) => self.absorb(&ev),
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(_)) => bail!("the supervisor stopped while waiting for {what}"),
                Err(_) => bail!("timed out after {limit:?} waiting for {what}"),
            }
        }
        Ok(())
    }

    async fn request(&self, req: Request) -> anyhow::Result<Value> {
        let resp: Response = self.running.handle.request(req).await;
        if !resp.ok {
            bail!(resp.error.unwrap_or_else(|| "request failed".into()));
        }
        Ok(resp.data.unwrap_or(Value::Null))
    }

    async fn say(&self, node: &str, text: &str) -> anyhow::Result<()> {
        self.request(Request::Say {
            node: node.into(),
            text: text.into(),
        })
        .await
        .map(|_| ())
    }
}

/// Runs the demo on `cluster`. Returns the exit code.
///
/// # Errors
/// Any step that fails, with what it was waiting for.
pub async fn demo(cluster: Cluster, pace: Duration) -> anyhow::Result<i32> {
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let plugins: Vec<String> = cluster.plugins.iter().map(|p| p.name.clone()).collect();
    let state_dir = cluster.state_dir.clone();
    let keyed = !cluster.insecure;
    if names.len() < 3 {
        bail!(
            "the demo needs at least 3 nodes; {} lists {}",
            cluster.file.display(),
            names.len()
        );
    }
    let n = names.len();
    step(&format!(
        "Bringing up cluster {} ({} nodes) from {}",
        cluster.name,
        n,
        cluster.file.display()
    ));
    let started = Instant::now();
    cluster.check_plugins(&run::node_bin()?)?;
    // Ours alone from here: a cluster of this name already running keeps
    // its transcript (it was deleted before `start` found it running).
    let lock = run::lock_state_dir(&cluster)?;
    // A fresh transcript for this run (the logger opens it when it loads).
    let _ = std::fs::remove_file(state_dir.join("data").join("transcript.jsonl"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        tokio::select! {
            _ = run::signals() => {}
            _ = stop_rx => {}
        }
    };
    let mut running = run::start(cluster, lock, run::node_bin()?, shutdown).await?;
    let mut display = Display::new(&names);
    if run::wait_ready(&mut running, &mut display, n, true).await != run::Startup::Ready {
        running.finish().await;
        bail!("the cluster did not start; see the node logs under .p2pctl/");
    }
    let mut story = Story {
        running,
        display,
        seen: Seen::default(),
        plugins,
        state_dir,
        keyed,
        pace,
    };
    let result = story_steps(&mut story, &names, started).await;
    step("Tearing down");
    let _ = story.request(Request::Down).await;
    let _ = stop_tx.send(());
    story.running.finish().await;
    match result {
        Ok(()) => {
            out!(
                "all nodes stopped; nothing left running. The whole story took {} ms.",
                started.elapsed().as_millis()
            );
            Ok(0)
        }
        Err(e) => Err(e.context("the demo failed")),
    }
}

/// Says where the chat key is, and shows a client with another key being
/// turned away.
async fn show_the_key(story: &Story, ps: &Value) -> anyhow::Result<()> {
    let path = story.state_dir.join("chat.key");
    let key = p2p_proto::secure::read_key_file(&path)?;
    out!(
        "chat key {} (id {}): every connection proves it both ways, then everything is encrypted",
        path.display(),
        key.id()
    );
    let addr = ps
        .as_array()
        .and_then(|rows| rows.first())
        .and_then(|r| r["addr"].as_str())
        .context("no node address in ps")?;
    let stranger = p2p_proto::secure::ChatKey::generate();
    match p2p_proto::net::Client::connect(addr, Some(&stranger), Duration::from_secs(3)).await {
        Ok(_) => bail!("a client with another key got into {addr}"),
        Err(e) => out!(
            "a client with another key (id {}) is turned away: {e}",
            stranger.id()
        ),
    }
    Ok(())
}

/// Waits until every node in `nodes` delivered every text in `texts`.
async fn until_all_delivered(
    story: &mut Story,
    what: &str,
    nodes: &[String],
    texts: &[&str],
) -> anyhow::Result<()> {
    story
        .until(what, Duration::from_secs(10), |s| {
            nodes.iter().all(|n| {
                s.delivered
                    .get(n)
                    .is_some_and(|d| texts.iter().all(|t| d.contains(*t)))
            })
        })
        .await
}

/// The demo after start-up: chat, a coordinator kill, a rejoin, bots, and
/// the final check, each a step the viewer can follow.
async fn story_steps(story: &mut Story, names: &[String], started: Instant) -> anyhow::Result<()> {
    let coord = opening(story, names, started).await?;
    story.pause().await;
    chatting(story, names).await?;
    story.pause().await;
    let (new_coord, speaker) = failover(story, names, &coord).await?;
    story.pause().await;
    rejoin(story, names, &coord).await?;
    if story.plugins.iter().any(|p| p == "echo") {
        story.pause().await;
        step(&format!(
            "The bots survived the failover: {new_coord} now runs them"
        ));
        story
            .say(&speaker, "!echo still echoing after the failover")
            .await?;
        until_all_delivered(
            story,
            "the echo after failover",
            names,
            &["still echoing after the failover"],
        )
        .await?;
    }
    story.pause().await;
    moderation(story, names, &speaker, &coord).await?;
    story.pause().await;
    final_check(story).await
}

/// Shows the cluster as started (and the key at work); returns the
/// coordinator's name.
async fn opening(story: &mut Story, names: &[String], started: Instant) -> anyhow::Result<String> {
    let ps = story.request(Request::Ps).await?;
    let coord = ps
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["role"] == "coordinator"))
        .and_then(|r| r["name"].as_str())
        .context("no coordinator after start-up")?
        .to_string();
    out!(
        "{} nodes up in {} ms; coordinator {coord} (epoch 1)",
        names.len(),
        started.elapsed().as_millis()
    );
    out!(
        "{}",
        crate::display::ps_table(ps.as_array().map(Vec::as_slice).unwrap_or(&[])).trim_end()
    );
    if story.keyed {
        show_the_key(story, &ps).await?;
    }
    Ok(coord)
}

async fn chatting(story: &mut Story, names: &[String]) -> anyhow::Result<()> {
    step("Chatting: every node delivers every message in the same order");
    let lines = [
        (names[1].as_str(), "hi all, this chat has no server"),
        (names[2].as_str(), "every peer runs its own listener"),
        (
            names[names.len() - 1].as_str(),
            "and one of us orders the messages",
        ),
    ];
    for (node, text) in lines {
        story.say(node, text).await?;
    }
    let mut texts: Vec<&str> = lines.iter().map(|(_, t)| *t).collect();
    if story.plugins.iter().any(|p| p == "echo") {
        story
            .say(names[1].as_str(), "!echo the echo bot answers this")
            .await?;
        texts.push("the echo bot answers this");
    }
    until_all_delivered(story, "the first messages", names, &texts).await
}

/// Kills the coordinator with a message in flight and measures until a new
/// one is seen and the message reached every survivor; returns the new
/// coordinator and the survivor that spoke.
async fn failover(story: &mut Story, names: &[String], coord: &str) -> anyhow::Result<(String, String)> {
    step(&format!(
        "Killing the coordinator ({coord}) with SIGKILL while a message is in flight"
    ));
    let survivors: Vec<String> = names.iter().filter(|n| *n != coord).cloned().collect();
    let speaker = survivors.last().cloned().context("no survivor")?;
    let probe = "typed right after the kill: is anyone still there?";
    let t0 = Instant::now();
    story
        .request(Request::Kill {
            node: None,
            coordinator: true,
            signal: "KILL".into(),
        })
        .await?;
    story.say(&speaker, probe).await?;
    story
        .until("a new coordinator", Duration::from_secs(10), |s| {
            s.coordinator.as_ref().is_some_and(|(c, e)| c != coord && *e >= 2)
        })
        .await?;
    let (new_coord, epoch) = story.seen.coordinator.clone().context("no coordinator")?;
    let elected_ms = t0.elapsed().as_secs_f64() * 1000.0;
    until_all_delivered(story, "the message to reach every survivor", &survivors, &[probe]).await?;
    let flowing = t0.elapsed();
    out!(
        "{} {new_coord} took over (epoch {epoch}); p2pctl saw it {elected_ms:.1} ms after the kill; \
         chat flowing again (message delivered to all {} survivors) {:.1} ms after the kill",
        Style::new().green().bold().apply_to("failover:"),
        survivors.len(),
        flowing.as_secs_f64() * 1000.0
    );
    Ok((new_coord, speaker))
}

async fn rejoin(story: &mut Story, names: &[String], coord: &str) -> anyhow::Result<()> {
    step(&format!(
        "Restarting {coord}: it rejoins through any live peer, as a member"
    ));
    story
        .request(Request::Start {
            node: coord.to_string(),
        })
        .await?;
    story
        .until(&format!("{coord} to rejoin"), Duration::from_secs(10), |s| {
            s.ready.contains(coord)
        })
        .await?;
    let text = "back again, as a member this time";
    story.say(coord, text).await?;
    until_all_delivered(story, "the rejoined node's message", names, &[text]).await
}

/// Attaches moderation at runtime and shows a masked word and a rate
/// limit; a missing library is reported, not fatal.
async fn moderation(story: &mut Story, names: &[String], speaker: &str, coord: &str) -> anyhow::Result<()> {
    step("Attaching the moderation bot at runtime (p2pctl attach moderation --config …)");
    let config = r#"{"banned":["spam","scam"],"action":"mask","rate":{"messages":3,"per_ms":10000}}"#;
    let attached = story
        .request(Request::Attach {
            name: "moderation".into(),
            config: config.into(),
        })
        .await;
    if let Err(e) = attached {
        out!("moderation not attached: {e:#} (build the plugins: cargo build -p p2p-plugin-moderation)");
        return Ok(());
    }
    out!("attached moderation: banned words masked, at most 3 messages per 10 s per member");
    story.say(speaker, "great deal, totally not SPAM").await?;
    for i in 1..=4 {
        story.say(coord, &format!("flood {i}")).await?;
    }
    until_all_delivered(
        story,
        "the moderated messages",
        names,
        &["great deal, totally not ***", "flood 3"],
    )
    .await?;
    story
        .until("the rate-limit verdict", Duration::from_secs(10), |s| {
            s.verdicts >= 2
        })
        .await?;
    out!("(flood 4 was dropped by the rate limit: no node delivered it; {coord} was told why)");
    Ok(())
}

/// `check` over every node, and the logger's transcript against it.
async fn final_check(story: &mut Story) -> anyhow::Result<()> {
    step("Checking that every node delivered the same sequence");
    let check = story.request(Request::Check).await?;
    if check["agree"] != true {
        bail!("the nodes disagree: {}", check["difference"]);
    }
    out!(
        "{} all {} agree on {} (same order, no gaps, no duplicates)",
        Style::new().green().bold().apply_to("check:"),
        crate::display::count(
            &check["nodes"].as_array().map_or(0, Vec::len).into(),
            "node",
            "nodes"
        ),
        crate::display::count(&check["messages"], "message", "messages")
    );
    if !story.plugins.iter().any(|p| p == "logger") {
        return Ok(());
    }
    let transcript = story.state_dir.join("data").join("transcript.jsonl");
    let text = std::fs::read_to_string(&transcript).unwrap_or_default();
    let seqs: Vec<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "message")
        .filter_map(|v| v["seq"].as_u64())
        .collect();
    let expected: Vec<u64> = check["message_seqs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    if seqs != expected {
        bail!(
            "the logger's transcript {} holds seqs {seqs:?}, expected the agreed messages {expected:?}",
            transcript.display(),
        );
    }
    out!(
        "{} the logger's transcript {} holds every agreed message ({}) across the failover: no gap, no duplicate",
        Style::new().green().bold().apply_to("transcript:"),
        transcript.display(),
        expected.len()
    );
    Ok(())
}
