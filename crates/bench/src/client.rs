//! A benchmark member: a protocol client over one TCP connection (sealed
//! like any member's in a keyed chat). It counts chat frames without
//! parsing them (their body starts with `{"type":"chat"`), answers pings,
//! and can publish.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use p2p_proto::net::{Client, ClientRead, ClientWrite};
use p2p_proto::{decode_body, encode, Frame, PROTOCOL_VERSION};
use tokio::sync::mpsc;

use crate::nodes::Key;

const CHAT: &[u8] = br#"{"type":"chat""#;
const PING: &[u8] = br#"{"type":"ping""#;
const JOINED: &[u8] = br#"{"type":"joined""#;

/// Counters a reader updates as frames arrive.
#[derive(Default)]
pub struct Counts {
    pub chats: AtomicU64,
    pub joined: AtomicU64,
    /// Woken as chats arrive (shared by the members of one run), so a
    /// publisher waiting for its window waits instead of spinning on the
    /// one thread the members share.
    pub progress: Arc<tokio::sync::Notify>,
    /// Wake `progress` on every chat, not every 64th (for latency runs
    /// that wait on each message).
    pub each: bool,
}

/// A joined member.
pub struct Member {
    pub read: ClientRead,
    pub write: ClientWrite,
    pub members_at_join: usize,
}

/// Connects (proving `key`, if the node has one) and joins as `name`.
///
/// # Errors
/// When the node refuses or the connection fails.
pub async fn join(addr: &str, name: &str, key: &Key) -> anyhow::Result<Member> {
    let mut c = Client::connect(addr, key.as_deref(), Duration::from_secs(10)).await?;
    // A client without a server: it gets committed entries only.
    let hello = Frame::Hello {
        version: PROTOCOL_VERSION,
        name: name.into(),
        session: p2p_proto::random_u64(),
        addr: None,
        resume: None,
        sign_key: None,
    };
    c.send(&hello).await?;
    match c.recv().await? {
        Frame::Welcome { base, commit, .. } => {
            if base != commit {
                bail!("run the node with --history 0 for benchmarks");
            }
        }
        other => bail!("{name} was not admitted: {other:?}"),
    }
    // The chat's state follows the welcome, in one or more frames.
    let mut members = 0;
    loop {
        match c.recv().await? {
            Frame::State { members: m, last, .. } => {
                members += m.len();
                if last {
                    break;
                }
            }
            other => bail!(
                "{name}: expected the chat state after the welcome, got {}",
                other.kind()
            ),
        }
    }
    Ok(Member {
        read: c.read,
        write: c.write,
        members_at_join: members,
    })
}

/// Reads until `stop` chats arrived (or the connection ends), counting
/// frames, answering pings through `pong`, and calling `on_chat` with the
/// index of each chat frame (0-based).
pub async fn read_loop(
    mut read: ClientRead,
    counts: Arc<Counts>,
    pong: mpsc::UnboundedSender<Vec<u8>>,
    stop: u64,
    mut on_chat: impl FnMut(u64),
) -> anyhow::Result<()> {
    let mut chats = 0u64;
    while chats < stop {
        let mut failed = None;
        let read = read
            .recv_bodies(|body| {
                if failed.is_some() {
                    return;
                }
                if body.starts_with(CHAT) {
                    on_chat(chats);
                    chats += 1;
                    if counts.each {
                        counts.chats.store(chats, Ordering::Relaxed);
                        counts.progress.notify_one();
                    }
                } else if body.starts_with(PING) {
                    if let Ok(Frame::Ping { nonce }) = decode_body(body) {
                        let _ = pong.send(encode(&Frame::Pong { nonce }).to_vec());
                    }
                } else if body.starts_with(JOINED) {
                    counts.joined.fetch_add(1, Ordering::Relaxed);
                } else if let Ok(Frame::Error { code, message }) = decode_body(body) {
                    failed = Some(format!("the node sent an error: {code}: {message}"));
                }
            })
            .await;
        // Counted once per record (a record holds a whole batch).
        counts.chats.store(chats, Ordering::Relaxed);
        counts.progress.notify_one();
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                bail!("the node closed the connection")
            }
            Err(e) => return Err(e.into()),
        }
        if let Some(f) = failed {
            bail!(f);
        }
    }
    Ok(())
}

/// Writes frames handed to it (pongs and publishes; each message may hold
/// several encoded frames back to back) in order, sealed in a keyed chat.
pub async fn write_loop(mut write: ClientWrite, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut plain = Vec::with_capacity(64 * 1024);
    let mut batch = Vec::with_capacity(64 * 1024);
    while let Some(first) = rx.recv().await {
        plain.clear();
        plain.extend_from_slice(&first);
        while plain.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(more) => plain.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        batch.clear();
        seal_frames(&mut write, &plain, &mut batch);
        if write.write_all(&batch).await.is_err() {
            return;
        }
    }
}

/// Seals the encoded frames of `frames` into `out` (batched records in a
/// keyed chat: one seal for many small frames, as a user's client would).
fn seal_frames(write: &mut ClientWrite, frames: &[u8], out: &mut Vec<u8>) {
    write.seal_batch_into(frames, out);
}

/// Microseconds since `base`.
pub fn micros(base: Instant) -> u64 {
    base.elapsed().as_micros() as u64
}
