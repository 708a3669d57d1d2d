//! `p2pctl demo`: the story in one command. Brings the cluster up, chats,
//! kills the coordinator and measures the failover (kill → chat flowing
//! again), restarts the killed node, checks agreement, tears down.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

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
    println!(
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
            println!("{l}");
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
    // A fresh transcript for this run (the logger opens it when it loads).
    let _ = std::fs::remove_file(state_dir.join("data").join("transcript.jsonl"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        tokio::select! {
            _ = run::signals() => {}
            _ = stop_rx => {}
        }
    };
    cluster.check_plugins(&run::node_bin()?)?;
    let mut running = run::start(cluster, run::node_bin()?, shutdown).await?;
    let mut display = Display::new(&names);
    if !run::wait_ready(&mut running, &mut display, n, true).await {
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
            println!(
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
    println!(
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
        Err(e) => println!(
            "a client with another key (id {}) is turned away: {e}",
            stranger.id()
        ),
    }
    Ok(())
}

async fn story_steps(story: &mut Story, names: &[String], started: Instant) -> anyhow::Result<()> {
    let plugins = story.plugins.clone();
    let has = |p: &str| plugins.iter().any(|x| x == p);
    let echo = has("echo");
    let ps = story.request(Request::Ps).await?;
    let coord = ps
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["role"] == "coordinator"))
        .and_then(|r| r["name"].as_str())
        .context("no coordinator after start-up")?
        .to_string();
    println!(
        "{} nodes up in {} ms; coordinator {coord} (epoch 1)",
        names.len(),
        started.elapsed().as_millis()
    );
    print!(
        "{}",
        crate::display::ps_table(ps.as_array().map(Vec::as_slice).unwrap_or(&[]))
    );

    if story.keyed {
        show_the_key(story, &ps).await?;
    }

    story.pause().await;
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
    let mut texts: Vec<String> = lines.iter().map(|(_, t)| t.to_string()).collect();
    if echo {
        story
            .say(names[1].as_str(), "!echo the echo bot answers this")
            .await?;
        texts.push("the echo bot answers this".into());
    }
    let all: Vec<String> = names.to_vec();
    story
        .until("the first messages", Duration::from_secs(10), |s| {
            all.iter().all(|n| {
                texts
                    .iter()
                    .all(|t| s.delivered.get(n).is_some_and(|d| d.contains(t)))
            })
        })
        .await?;

    story.pause().await;
    step(&format!(
        "Killing the coordinator ({coord}) with SIGKILL while a message is in flight"
    ));
    let survivors: Vec<String> = names.iter().filter(|n| **n != coord).cloned().collect();
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
    let old = coord.clone();
    story
        .until("a new coordinator", Duration::from_secs(10), |s| {
            s.coordinator.as_ref().is_some_and(|(c, e)| *c != old && *e >= 2)
        })
        .await?;
    let (new_coord, epoch) = story.seen.coordinator.clone().context("no coordinator")?;
    let elected_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let surv = survivors.clone();
    story
        .until(
            "the message to reach every survivor",
            Duration::from_secs(10),
            |s| {
                surv.iter()
                    .all(|n| s.delivered.get(n).is_some_and(|d| d.contains(probe)))
            },
        )
        .await?;
    let flowing = t0.elapsed();
    println!(
        "{} {new_coord} took over (epoch {epoch}); p2pctl saw it {elected_ms:.1} ms after the kill; \
         chat flowing again (message delivered to all {} survivors) {:.1} ms after the kill",
        Style::new().green().bold().apply_to("failover:"),
        survivors.len(),
        flowing.as_secs_f64() * 1000.0
    );

    story.pause().await;
    step(&format!(
        "Restarting {coord}: it rejoins through any live peer, as a member"
    ));
    story.request(Request::Start { node: coord.clone() }).await?;
    let c = coord.clone();
    story
        .until(&format!("{coord} to rejoin"), Duration::from_secs(10), |s| {
            s.ready.contains(&c)
        })
        .await?;
    story.say(&coord, "back again, as a member this time").await?;
    let everyone = names.to_vec();
    story
        .until("the rejoined node's message", Duration::from_secs(10), |s| {
            everyone.iter().all(|n| {
                s.delivered
                    .get(n)
                    .is_some_and(|d| d.contains("back again, as a member this time"))
            })
        })
        .await?;

    if echo {
        story.pause().await;
        step(&format!(
            "The bots survived the failover: {new_coord} now runs them"
        ));
        story
            .say(&speaker, "!echo still echoing after the failover")
            .await?;
        let all = names.to_vec();
        story
            .until("the echo after failover", Duration::from_secs(10), |s| {
                all.iter().all(|n| {
                    s.delivered
                        .get(n)
                        .is_some_and(|d| d.contains("still echoing after the failover"))
                })
            })
            .await?;
    }

    story.pause().await;
    step("Attaching the moderation bot at runtime (p2pctl attach moderation --config …)");
    let config = r#"{"banned":["spam","scam"],"action":"mask","rate":{"messages":3,"per_ms":10000}}"#;
    match story
        .request(Request::Attach {
            name: "moderation".into(),
            config: config.into(),
        })
        .await
    {
        Ok(_) => {
            println!("attached moderation: banned words masked, at most 3 messages per 10 s per member");
            story.say(&speaker, "great deal, totally not SPAM").await?;
            for i in 1..=4 {
                story.say(&coord, &format!("flood {i}")).await?;
            }
            let all = names.to_vec();
            story
                .until("the moderated messages", Duration::from_secs(10), |s| {
                    all.iter().all(|n| {
                        s.delivered.get(n).is_some_and(|d| {
                            d.contains("great deal, totally not ***") && d.contains("flood 3")
                        })
                    })
                })
                .await?;
            story
                .until("the rate-limit verdict", Duration::from_secs(10), |s| {
                    s.verdicts >= 2
                })
                .await?;
            println!("(flood 4 was dropped by the rate limit: no node delivered it; {coord} was told why)");
        }
        Err(e) => println!(
            "moderation not attached: {e:#} (build the plugins: cargo build -p p2p-plugin-moderation)"
        ),
    }

    story.pause().await;
    step("Checking that every node delivered the same sequence");
    let check = story.request(Request::Check).await?;
    if check["agree"] != true {
        bail!("the nodes disagree: {}", check["difference"]);
    }
    println!(
        "{} all {} nodes agree on {} messages (same order, no gaps, no duplicates)",
        Style::new().green().bold().apply_to("check:"),
        check["nodes"].as_array().map(Vec::len).unwrap_or(0),
        check["messages"]
    );
    if has("logger") {
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
        println!(
            "{} the logger's transcript {} holds every agreed message ({}) across the failover: no gap, no duplicate",
            Style::new().green().bold().apply_to("transcript:"),
            transcript.display(),
            expected.len()
        );
    }
    Ok(())
}
