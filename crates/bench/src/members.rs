//! members: how many members one coordinator holds. Joins `count` members
//! one after another, times until every member's view is complete, reads
//! the coordinator's RSS per member, then measures broadcast throughput
//! with all of them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use p2p_proto::net::Client;
use p2p_proto::{encode, Frame};
use tokio::sync::mpsc;

use crate::client::{self, Counts};
use crate::nodes;

/// Members joining at the same time in the join storm.
const JOIN_WAVE: usize = 50;

pub struct MembersResult {
    pub joins_per_s: f64,
    pub view_complete_s: f64,
    pub rss_per_member_kib: f64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub deliveries_per_s: f64,
}

pub async fn run(count: usize, messages: u64) -> anyhow::Result<MembersResult> {
    nodes::raise_fd_limit();
    let coord = nodes::start("coord", &["--heartbeat-ms".into(), "1000".into()], false).await?;
    // Let the node settle before the baseline.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = coord.rss_kib();
    let start = Instant::now();
    let mut members = Vec::with_capacity(count);
    // A join storm: waves of JOIN_WAVE concurrent joins. Each member
    // starts reading (and answering pings) as soon as it is in.
    for wave in (0..count).collect::<Vec<_>>().chunks(JOIN_WAVE) {
        let joins: Vec<_> = wave
            .iter()
            .map(|i| {
                let addr = coord.addr.clone();
                let key = coord.key.clone();
                let name = format!("m{i}");
                tokio::spawn(async move {
                    let m = client::join(&addr, &name, &key).await?;
                    let counts = Arc::new(Counts::default());
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(client::write_loop(m.write, rx));
                    let (c, ptx) = (counts.clone(), tx.clone());
                    tokio::spawn(async move { client::read_loop(m.read, c, ptx, u64::MAX, |_| {}).await });
                    anyhow::Ok((counts, tx, m.members_at_join))
                })
            })
            .collect();
        for j in joins {
            members.push(j.await??);
        }
    }
    let joined = start.elapsed();
    let want = count as u64 + 1; // the coordinator is a member too
    let deadline = Instant::now() + Duration::from_secs(60);
    while !members
        .iter()
        .all(|(c, _, at)| *at as u64 + c.joined.load(Ordering::Relaxed) >= want)
    {
        if Instant::now() > deadline {
            bail!("member views did not complete within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let view_complete = start.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_after = coord.rss_kib();

    // Broadcast with every member connected.
    let text = "x".repeat(64);
    let t0 = Instant::now();
    let publisher = members[0].1.clone();
    for cs in 1..=messages {
        let _ = publisher.send(
            encode(&Frame::Say {
                text: text.clone(),
                client_seq: cs,
            })
            .to_vec(),
        );
        // Stay within a window so the coordinator's queues stay bounded.
        while cs > members[0].0.chats.load(Ordering::Relaxed) + 256 {
            tokio::task::yield_now().await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !members
        .iter()
        .all(|(c, _, _)| c.chats.load(Ordering::Relaxed) >= messages)
    {
        if Instant::now() > deadline {
            bail!("broadcast to {count} members did not finish within 120 s");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(MembersResult {
        joins_per_s: count as f64 / joined.as_secs_f64(),
        view_complete_s: view_complete.as_secs_f64(),
        rss_per_member_kib: rss_after.saturating_sub(rss_before) as f64 / count as f64,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        deliveries_per_s: (messages * count as u64) as f64 / secs,
    })
}

pub struct HandshakeCost {
    pub connections: usize,
    /// Mean microseconds for connect + handshake + one status round trip.
    pub keyed_us: f64,
    /// The same without a key.
    pub insecure_us: f64,
}

/// What the chat-key handshake adds to a connection: `n` sequential
/// connections with one status round trip each, against a keyed node and
/// an `--insecure` one, interleaved.
pub async fn handshake_cost(n: usize) -> anyhow::Result<HandshakeCost> {
    let keyed = nodes::start("keyed", &[], false).await?;
    let plain = nodes::start("plain", &["--insecure".into()], false).await?;
    let (mut tk, mut tp) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..n {
        for (node, total) in [(&keyed, &mut tk), (&plain, &mut tp)] {
            let t = Instant::now();
            let mut c = Client::connect(&node.addr, node.key.as_deref(), Duration::from_secs(5)).await?;
            c.send(&Frame::StatusRequest { log: false }).await?;
            match c.recv().await? {
                Frame::Status { .. } => {}
                other => bail!("expected a status answer, got {}", other.kind()),
            }
            *total += t.elapsed();
        }
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    Ok(HandshakeCost {
        connections: n,
        keyed_us: per(tk),
        insecure_us: per(tp),
    })
}
