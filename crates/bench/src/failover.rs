//! failover: K repetitions of a 5-node cluster of real processes under
//! steady chat traffic; the coordinator is SIGKILLed (or SIGSTOPped) and we
//! time until a message sent after the kill is delivered to every
//! survivor. On the way, checks that nothing acknowledged was lost or
//! duplicated and that all survivors hold the same sequence.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use p2p_ctl::check::post;
use serde_json::Value;

use crate::nodes::{self, NodeProc};

/// What each node delivered: messages as (seq, text), the seq of every log
/// entry (messages, joins, leaves, configuration), and when each text
/// arrived.
#[derive(Default)]
struct Seen {
    seq: Vec<(u64, String)>,
    entries: Vec<u64>,
    at: HashMap<String, Instant>,
}

fn collect(node: &mut NodeProc, seen: Arc<Mutex<Seen>>) {
    let Some(mut rx) = node.events.take() else { return };
    tokio::spawn(async move {
        while let Some(v) = rx.recv().await {
            if matches!(
                v["event"].as_str(),
                Some("message" | "joined" | "left" | "config")
            ) {
                if let (Some(seq), Ok(mut s)) = (v["seq"].as_u64(), seen.lock()) {
                    s.entries.push(seq);
                }
            }
            if v["event"] == "message" {
                let text = v["text"].as_str().unwrap_or("").to_string();
                if let Ok(mut s) = seen.lock() {
                    s.at.insert(text.clone(), Instant::now());
                    s.seq.push((v["seq"].as_u64().unwrap_or(0), text));
                }
            }
        }
    });
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let end = Instant::now() + limit;
    while !cond() {
        if Instant::now() > end {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_micros(250)).await;
    }
    Ok(())
}

/// One repetition; returns the failover time in milliseconds.
async fn once(rep: usize, signal: Signal, hb: u64) -> anyhow::Result<f64> {
    let hb_args = vec!["--heartbeat-ms".to_string(), hb.to_string()];
    let mut nodes: Vec<NodeProc> = Vec::new();
    let mut seen: Vec<Arc<Mutex<Seen>>> = Vec::new();
    for i in 0..5 {
        let mut args = hb_args.clone();
        if let Some(first) = nodes.first() {
            args.extend(["--join".to_string(), first.addr.clone()]);
        }
        let mut n = nodes::start(&format!("n{i}"), &args, true).await?;
        // Wait until it is in the chat (its events say ready).
        let rx = n.events.as_mut().context("events")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v: Value = tokio::time::timeout_at(deadline.into(), rx.recv())
                .await
                .context("node start")?
                .context("node exited")?;
            if v["event"] == "ready" {
                break;
            }
        }
        let s = Arc::new(Mutex::new(Seen::default()));
        collect(&mut n, s.clone());
        seen.push(s);
        nodes.push(n);
    }
    // Every node a voter of a settled voter set (a node that joined a
    // moment ago cannot take over yet).
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    settled_voters(&addrs, &nodes[0].key).await?;
    let talker = nodes[4].addr.clone();
    let key = nodes[4].key.clone();
    // Steady traffic through the last node; remember what was acknowledged.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let running = Arc::new(AtomicBool::new(true));
    let traffic = {
        let (acked, running, talker, key) = (acked.clone(), running.clone(), talker.clone(), key.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while running.load(Ordering::Relaxed) {
                let text = format!("r{rep}-{i}");
                if post(&talker, &text, &key).await.is_ok() {
                    if let Ok(mut a) = acked.lock() {
                        a.push(text);
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let s4 = seen[4].clone();
    wait_for("traffic to flow", Duration::from_secs(5), || {
        s4.lock().map(|s| s.seq.len() >= 10).unwrap_or(false)
    })
    .await?;

    let victim = Pid::from_raw(nodes[0].pid());
    let probe = format!("probe-{rep}");
    let t0 = Instant::now();
    kill(victim, signal)?;
    post(&talker, &probe, &key).await.context("posting the probe")?;
    let survivors = &seen[1..];
    wait_for("the probe on every survivor", Duration::from_secs(10), || {
        survivors
            .iter()
            .all(|s| s.lock().map(|s| s.at.contains_key(&probe)).unwrap_or(false))
    })
    .await?;
    let ms = survivors
        .iter()
        .filter_map(|s| s.lock().ok().and_then(|s| s.at.get(&probe).copied()))
        .max()
        .map(|t| t.duration_since(t0).as_secs_f64() * 1000.0)
        .unwrap_or(0.0);

    // Settle, then check agreement, no loss, no duplicates.
    running.store(false, Ordering::Relaxed);
    traffic.await?;
    let acked: Vec<String> = acked.lock().map(|a| a.clone()).unwrap_or_default();
    wait_for(
        "every acknowledged message everywhere",
        Duration::from_secs(10),
        || {
            survivors.iter().all(|s| {
                s.lock()
                    .map(|s| acked.iter().all(|t| s.at.contains_key(t)))
                    .unwrap_or(false)
            })
        },
    )
    .await?;
    let reference = seen[1].lock().map(|s| s.seq.clone()).unwrap_or_default();
    for (i, s) in survivors.iter().enumerate() {
        let seq = s.lock().map(|s| s.seq.clone()).unwrap_or_default();
        let common = seq.len().min(reference.len());
        if seq[..common] != reference[..common] {
            bail!("survivor n{} disagrees with n1", i + 1);
        }
        let entries = s.lock().map(|s| s.entries.clone()).unwrap_or_default();
        for w in entries.windows(2) {
            if w[1] != w[0] + 1 {
                bail!("survivor n{} delivered seq {} after seq {}", i + 1, w[1], w[0]);
            }
        }
        let mut texts: Vec<&String> = seq.iter().map(|(_, t)| t).collect();
        let before = texts.len();
        texts.sort();
        texts.dedup();
        if texts.len() != before {
            bail!("survivor n{} delivered a message twice", i + 1);
        }
    }
    if signal == Signal::SIGSTOP {
        let _ = kill(victim, Signal::SIGKILL);
    }
    Ok(ms)
}

/// Waits until every node reports the same voters, all of them, in force.
async fn settled_voters(addrs: &[String], key: &crate::nodes::Key) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut sets = Vec::new();
        let mut ids = Vec::new();
        for a in addrs {
            if let Ok(p2p_proto::Frame::Status {
                id, voters, stable, ..
            }) =
                p2p_ctl::check::coordinator_request(a, &p2p_proto::Frame::StatusRequest { log: false }, key)
                    .await
            {
                if stable {
                    sets.push(voters);
                    ids.push(id);
                }
            }
        }
        let settled = sets.len() == addrs.len()
            && sets.windows(2).all(|w| w[0] == w[1])
            && ids.iter().all(|id| sets[0].contains(id));
        if settled {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("the voter set did not settle within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub struct FailoverResult {
    pub samples_ms: Vec<f64>,
}

pub async fn run(reps: usize, signal: Signal, hb: u64) -> anyhow::Result<FailoverResult> {
    let mut samples = Vec::new();
    for rep in 0..reps {
        samples.push(
            once(rep, signal, hb)
                .await
                .with_context(|| format!("repetition {rep}"))?,
        );
    }
    Ok(FailoverResult { samples_ms: samples })
}
