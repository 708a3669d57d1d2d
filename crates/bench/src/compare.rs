//! `p2pbench compare`: the same one-publisher fan-out against nats-server
//! and redis-server (started here when installed), p2pnode keyed and
//! `--insecure`, interleaved in one run and printed as ratios.
//!
//! Every target gets N subscribing connections in this process's one
//! thread (like the p2pnode members of `fanout`) and one publisher that
//! keeps a window of messages ahead of the slowest subscriber. A broker's
//! publisher is a connection of its own (Redis does not let a subscribed
//! connection publish); p2pnode's publisher is one of its N members, as a
//! chat member is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::nodes;

/// A message broker to compare with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Nats,
    Redis,
}

impl Broker {
    pub fn name(self) -> &'static str {
        match self {
            Broker::Nats => "nats-server",
            Broker::Redis => "redis-server",
        }
    }

    /// What a subscriber receives once per message (the payload is all
    /// `x`, so this never appears inside one).
    fn marker(self) -> &'static [u8] {
        match self {
            Broker::Nats => b"MSG b ",
            Broker::Redis => b"$7\r\nmessage\r\n",
        }
    }
}

/// A broker process on a free loopback port; killed on drop.
pub struct Running {
    pub broker: Broker,
    pub addr: String,
    _child: Child,
}

/// Starts `broker` if its binary is on the PATH (None if not).
///
/// # Errors
/// If it is installed but does not come up.
pub async fn start(broker: Broker) -> anyhow::Result<Option<Running>> {
    let port = nodes::free_port()?;
    let mut cmd = Command::new(broker.name());
    match broker {
        Broker::Nats => cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]),
        Broker::Redis => cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]),
    };
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot start {}", broker.name())),
    };
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("{} did not listen on {addr} within 10 s", broker.name());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Some(Running {
        broker,
        addr,
        _child: child,
    }))
}

/// Subscribes one connection and counts what it receives.
async fn subscriber(
    broker: Broker,
    addr: &str,
    count: Arc<AtomicU64>,
    progress: Arc<tokio::sync::Notify>,
) -> anyhow::Result<tokio::task::AbortHandle> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    match broker {
        Broker::Nats => {
            s.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nSUB b 1\r\nPING\r\n")
                .await?
        }
        Broker::Redis => s.write_all(b"SUBSCRIBE b\r\n").await?,
    }
    // Subscribed once the server confirms (PONG after SUB; the subscribe
    // reply), so no message published later is missed.
    let confirm: &[u8] = match broker {
        Broker::Nats => b"PONG\r\n",
        Broker::Redis => b"subscribe\r\n",
    };
    let mut buf = vec![0u8; 256 * 1024];
    let mut seen = Vec::new();
    while memmem::find(&seen, confirm).is_none() {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("{} closed a subscriber", broker.name());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let marker = broker.marker();
    let finder = memmem::Finder::new(marker);
    let task = tokio::spawn(async move {
        // Markers split across reads: keep the tail of the last one.
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let n = match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            carry.extend_from_slice(&buf[..n]);
            let found = finder.find_iter(&carry).count() as u64;
            count.fetch_add(found, Ordering::Relaxed);
            progress.notify_one();
            let keep = marker.len() - 1;
            let cut = match memmem::rfind(&carry, marker) {
                Some(at) => (at + marker.len()).max(carry.len().saturating_sub(keep)),
                None => carry.len().saturating_sub(keep),
            };
            carry.drain(..cut);
        }
    });
    Ok(task.abort_handle())
}

/// Closes the run's connections when it ends, however it ends (a broker
/// keeps delivering to subscribers left open, which would slow every
/// later run).
struct Hangup(Vec<tokio::task::AbortHandle>);

impl Drop for Hangup {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// One run's connections: `n` counting subscribers and a publisher.
struct Setup {
    counts: Vec<Arc<AtomicU64>>,
    progress: Arc<tokio::sync::Notify>,
    publish: tokio::net::tcp::OwnedWriteHalf,
    /// One message as the publisher sends it.
    one: String,
    _hangup: Hangup,
}

async fn setup(broker: Broker, addr: &str, n: usize, size: usize) -> anyhow::Result<Setup> {
    let counts: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    // Subscribers wake the publisher when they count: it waits, not spins.
    let progress = Arc::new(tokio::sync::Notify::new());
    let mut hangup = Hangup(Vec::new());
    for c in &counts {
        hangup
            .0
            .push(subscriber(broker, addr, c.clone(), progress.clone()).await?);
    }
    let mut publisher = TcpStream::connect(addr).await?;
    publisher.set_nodelay(true)?;
    let payload = "x".repeat(size);
    let one = match broker {
        Broker::Nats => format!("PUB b {size}\r\n{payload}\r\n"),
        Broker::Redis => format!("PUBLISH b {payload}\r\n"),
    };
    if broker == Broker::Nats {
        publisher
            .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
            .await?;
    }
    let (mut pub_read, publish) = publisher.into_split();
    // Redis answers each PUBLISH with a count: read and drop them.
    let drain = tokio::spawn(async move {
        let mut sink = vec![0u8; 64 * 1024];
        while matches!(pub_read.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    hangup.0.push(drain.abort_handle());
    Ok(Setup {
        counts,
        progress,
        publish,
        one,
        _hangup: hangup,
    })
}

/// Deliveries per second from one publisher to `n` subscribers of `m`
/// messages of `size` bytes.
///
/// # Errors
/// On connection failures or when deliveries stall for 30 s.
pub async fn throughput(broker: Broker, addr: &str, n: usize, size: usize, m: u64) -> anyhow::Result<f64> {
    let mut run = setup(broker, addr, n, size).await?;
    let window = ((2u64 << 20) / (size as u64 + 100)).clamp(64, 4096);
    let chunk = 256.min(window);
    let batch = run.one.repeat(chunk as usize);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut last_progress = (Instant::now(), 0u64);
    while sent < m {
        reach(
            broker,
            &run.counts,
            &run.progress,
            sent.saturating_sub(window),
            &mut last_progress,
        )
        .await?;
        let k = chunk.min(m - sent);
        run.publish
            .write_all(&batch.as_bytes()[..run.one.len() * k as usize])
            .await?;
        sent += k;
    }
    reach(broker, &run.counts, &run.progress, m, &mut last_progress).await?;
    Ok((n as u64 * m) as f64 / start.elapsed().as_secs_f64())
}

/// Latency one message at a time: publish, wait until every subscriber
/// has it, repeat `count` times. Returns the samples: microseconds from
/// the publish to the last subscriber's copy.
///
/// # Errors
/// On connection failures or when deliveries stall for 30 s.
pub async fn one_at_a_time(
    broker: Broker,
    addr: &str,
    n: usize,
    size: usize,
    count: u64,
) -> anyhow::Result<Vec<f64>> {
    let mut run = setup(broker, addr, n, size).await?;
    let mut samples = Vec::with_capacity(count as usize);
    let mut last_progress = (Instant::now(), 0u64);
    for k in 1..=count {
        let t0 = Instant::now();
        run.publish.write_all(run.one.as_bytes()).await?;
        reach(broker, &run.counts, &run.progress, k, &mut last_progress).await?;
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok(samples)
}

/// Waits until the slowest subscriber has counted `target`, woken as they
/// count; fails when nothing moved for 30 s (`last`: when it last moved).
async fn reach(
    broker: Broker,
    counts: &[Arc<AtomicU64>],
    progress: &tokio::sync::Notify,
    target: u64,
    last: &mut (Instant, u64),
) -> anyhow::Result<()> {
    loop {
        let now = counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        if now >= target {
            return Ok(());
        }
        if now != last.1 {
            *last = (Instant::now(), now);
        } else if last.0.elapsed() > Duration::from_secs(30) {
            bail!("{}: deliveries stalled at {now} of {target}", broker.name());
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), progress.notified()).await;
    }
}
