//! fanout: one coordinator (a real p2pnode), N in-process members, P of
//! which publish M messages of S bytes as fast as a bounded window allows.
//! Counts every member's copy. A separate low-rate run measures
//! publish-to-last-delivery latency.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use p2p_proto::{encode, Frame};
use tokio::sync::mpsc;

use crate::client::{self, micros, Counts};
use crate::nodes::{self, Key};
use crate::report::{percentiles, Pct};

/// Messages a publisher may have in flight (sent, own copy not back yet):
/// about 2 MiB, well under a member's queue limit at the node.
fn window(size: usize) -> u64 {
    ((2 << 20) / (size as u64 + 100)).clamp(64, 4096)
}

pub struct Throughput {
    pub deliveries_per_s: f64,
    pub publishes_per_s: f64,
    pub seconds: f64,
    /// Coordinator CPU time per published message, in microseconds (0 when
    /// the coordinator is not ours to measure).
    pub cpu_us_per_msg: f64,
}

struct Joined {
    counts: Arc<Counts>,
    /// Cleared when the member's connection ends.
    alive: Arc<std::sync::atomic::AtomicBool>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    done: tokio::task::JoinHandle<anyhow::Result<Instant>>,
}

async fn members(
    addr: &str,
    key: &Key,
    n: usize,
    stop: u64,
    times: Option<Arc<Mutex<Vec<Vec<u64>>>>>,
    base: Instant,
    each: bool,
) -> anyhow::Result<Vec<Joined>> {
    let mut out = Vec::with_capacity(n);
    let progress = Arc::new(tokio::sync::Notify::new());
    for i in 0..n {
        let m = client::join(addr, &format!("m{i}"), key).await?;
        let counts = Arc::new(Counts {
            progress: progress.clone(),
            each,
            ..Counts::default()
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(client::write_loop(m.write, rx));
        let (c, t, ptx) = (counts.clone(), times.clone(), tx.clone());
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let a = alive.clone();
        let done = tokio::spawn(async move {
            let mut mine = Vec::new();
            let r = client::read_loop(m.read, c, ptx, stop, |_| {
                if t.is_some() {
                    mine.push(micros(base));
                }
            })
            .await;
            a.store(false, Ordering::Relaxed);
            if let Err(e) = &r {
                eprintln!("p2pbench: a member's connection ended: {e:#}");
            }
            r?;
            if let Some(t) = t {
                if let Ok(mut all) = t.lock() {
                    all.push(mine);
                }
            }
            Ok(Instant::now())
        });
        out.push(Joined {
            counts,
            alive,
            tx,
            done,
        });
    }
    Ok(out)
}

fn say(text: &str, client_seq: u64) -> Vec<u8> {
    encode(&Frame::Say {
        text: text.to_string(),
        client_seq,
    })
    .to_vec()
}

/// Runs the throughput part against a coordinator at `addr`.
pub async fn throughput(
    addr: &str,
    key: &Key,
    n: usize,
    size: usize,
    m: u64,
    p: usize,
) -> anyhow::Result<Throughput> {
    if p == 0 || p > n {
        bail!("publishers must be between 1 and the member count");
    }
    // Encode before joining: members cannot answer pings while this runs
    // (one thread), and would be dropped after three missed heartbeats.
    let text = "x".repeat(size);
    let per = m / p as u64;
    let frames: Vec<Vec<Vec<u8>>> = (0..p)
        .map(|_| (1..=per).map(|cs| say(&text, cs)).collect())
        .collect();
    let base = Instant::now();
    let joined = members(addr, key, n, m, None, base, false).await?;
    let start = Instant::now();
    let mut pubs = Vec::new();
    let win = window(size);
    // Every member's count: the window follows the slowest reader, so no
    // member falls a whole queue limit behind (the node would drop it).
    let all: Vec<_> = joined.iter().map(|j| j.counts.clone()).collect();
    for (k, frames) in frames.into_iter().enumerate() {
        let tx = joined[k].tx.clone();
        let all = all.clone();
        let alive = joined[k].alive.clone();
        pubs.push(tokio::spawn(async move {
            let mut sent = 0u64;
            let slowest = || {
                all.iter()
                    .map(|c| c.chats.load(Ordering::Relaxed))
                    .min()
                    .unwrap_or(0)
            };
            for chunk in frames.chunks(256.min(win as usize)) {
                // Bounded window: wait for the slowest member's copies.
                while sent * p as u64 > slowest() + win {
                    if !alive.load(Ordering::Relaxed) {
                        anyhow::bail!("the publisher's connection ended (see the node's messages above)");
                    }
                    // Woken as members count (a timeout keeps the liveness
                    // check above running).
                    let _ =
                        tokio::time::timeout(Duration::from_millis(100), all[0].progress.notified()).await;
                }
                let mut batch = Vec::with_capacity(chunk.len() * 100);
                for f in chunk {
                    batch.extend_from_slice(f);
                }
                sent += chunk.len() as u64;
                if tx.send(batch).is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        }));
    }
    for p in pubs {
        p.await??;
    }
    let mut first_done: Option<Instant> = None;
    let mut last_done = start;
    for j in joined {
        let t = j.done.await??;
        first_done = Some(first_done.map_or(t, |f: Instant| f.min(t)));
        last_done = last_done.max(t);
    }
    let total = (per * p as u64) as f64;
    let secs = last_done.duration_since(start).as_secs_f64();
    let first = first_done
        .unwrap_or(last_done)
        .duration_since(start)
        .as_secs_f64();
    Ok(Throughput {
        deliveries_per_s: total * n as f64 / secs,
        publishes_per_s: total / first,
        seconds: secs,
        cpu_us_per_msg: 0.0,
    })
}

/// A fixed load below what the members can read: one publisher sends
/// `count` messages at `rate` per second (in 1 ms slices). Returns when
/// every member has every message. The caller reads the coordinator's
/// CPU time around it: at the same load, keyed and plaintext runs batch
/// alike, so the difference is what the key costs the node.
pub async fn paced(
    addr: &str,
    key: &Key,
    n: usize,
    size: usize,
    count: u64,
    rate: u64,
) -> anyhow::Result<()> {
    let joined = members(addr, key, n, count, None, Instant::now(), false).await?;
    let text = "x".repeat(size);
    let per_tick = (rate / 1000).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut cs = 0;
    while cs < count {
        tick.tick().await;
        let mut batch = Vec::new();
        for _ in 0..per_tick.min(count - cs) {
            cs += 1;
            batch.extend_from_slice(&say(&text, cs));
        }
        let _ = joined[0].tx.send(batch);
    }
    for j in joined {
        j.done.await??;
    }
    Ok(())
}

/// Low-rate latency: one publisher sends `count` messages at `rate` per
/// second; for each, the time until the last member has it. Microseconds.
pub async fn latency(
    addr: &str,
    key: &Key,
    n: usize,
    size: usize,
    count: u64,
    rate: u64,
) -> anyhow::Result<Pct> {
    let base = Instant::now();
    let times = Arc::new(Mutex::new(Vec::new()));
    let joined = members(addr, key, n, count, Some(times.clone()), base, false).await?;
    let text = "x".repeat(size);
    let mut sent_at = Vec::with_capacity(count as usize);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for cs in 1..=count {
        tick.tick().await;
        sent_at.push(micros(base));
        let _ = joined[0].tx.send(say(&text, cs));
    }
    for j in joined {
        j.done.await??;
    }
    let all = times.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut samples: Vec<f64> = (0..count as usize)
        .map(|i| {
            let last = all
                .iter()
                .map(|v| v.get(i).copied().unwrap_or(0))
                .max()
                .unwrap_or(0);
            last.saturating_sub(sent_at[i]) as f64
        })
        .collect();
    Ok(percentiles(&mut samples))
}

/// Latency one message at a time, as `compare` measures the brokers: a
/// member publishes, waits until every member (itself included) has the
/// message, and publishes the next. Returns the samples: microseconds,
/// publish to last copy.
///
/// # Errors
/// On connection failures, or when a member's connection ends.
pub async fn one_at_a_time(
    addr: &str,
    key: &Key,
    n: usize,
    size: usize,
    count: u64,
) -> anyhow::Result<Vec<f64>> {
    let joined = members(addr, key, n, count, None, Instant::now(), true).await?;
    let text = "x".repeat(size);
    let mut samples = Vec::with_capacity(count as usize);
    for cs in 1..=count {
        let t0 = Instant::now();
        let _ = joined[0].tx.send(say(&text, cs));
        loop {
            let slowest = joined
                .iter()
                .map(|j| j.counts.chats.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0);
            if slowest >= cs {
                break;
            }
            let lost = joined
                .iter()
                .any(|j| !j.alive.load(Ordering::Relaxed) && j.counts.chats.load(Ordering::Relaxed) < cs);
            if lost {
                bail!("a member's connection ended (see the node's messages above)");
            }
            let _ =
                tokio::time::timeout(Duration::from_millis(100), joined[0].counts.progress.notified()).await;
        }
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    for j in joined {
        j.done.await??;
    }
    Ok(samples)
}

/// A coordinator for one fanout run.
pub async fn coordinator(extra: &[String]) -> anyhow::Result<nodes::NodeProc> {
    nodes::start("coord", extra, false).await
}
