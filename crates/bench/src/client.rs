//! A benchmark member: a raw protocol client over one TCP connection. It
//! counts chat frames without parsing them (their body starts with
//! `{"type":"chat"`), answers pings, and can publish.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use p2p_proto::{decode_body, encode, Frame, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const CHAT: &[u8] = br#"{"type":"chat""#;
const PING: &[u8] = br#"{"type":"ping""#;
const JOINED: &[u8] = br#"{"type":"joined""#;

/// Counters a reader updates as frames arrive.
#[derive(Default)]
pub struct Counts {
    pub chats: AtomicU64,
    pub joined: AtomicU64,
}

/// A joined member.
pub struct Member {
    pub read: OwnedReadHalf,
    pub write: OwnedWriteHalf,
    pub members_at_join: usize,
}

/// Connects and joins as `name`.
///
/// # Errors
/// When the node refuses or the connection fails.
pub async fn join(addr: &str, name: &str) -> anyhow::Result<Member> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut read, mut write) = stream.into_split();
    // A client without a server: it gets committed entries only.
    let hello = Frame::Hello {
        version: PROTOCOL_VERSION,
        name: name.into(),
        session: p2p_proto::random_u64(),
        addr: None,
        resume: None,
    };
    write.write_all(&encode(&hello)).await?;
    match read_one(&mut read).await? {
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
        match read_one(&mut read).await? {
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
        read,
        write,
        members_at_join: members,
    })
}

async fn read_one(read: &mut OwnedReadHalf) -> anyhow::Result<Frame> {
    let mut prefix = [0u8; 4];
    read.read_exact(&mut prefix).await?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > p2p_proto::limits::MAX_FRAME_LEN {
        bail!("the node sent a frame of {len} bytes, over the limit");
    }
    let mut body = vec![0u8; len];
    read.read_exact(&mut body).await?;
    Ok(decode_body(&body)?)
}

/// Reads until `stop` chats arrived (or the connection ends), counting
/// frames, answering pings through `pong`, and calling `on_chat` with the
/// index of each chat frame (0-based).
pub async fn read_loop(
    mut read: OwnedReadHalf,
    counts: Arc<Counts>,
    pong: mpsc::UnboundedSender<Vec<u8>>,
    stop: u64,
    mut on_chat: impl FnMut(u64),
) -> anyhow::Result<()> {
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut chats = 0u64;
    loop {
        // Walk every whole frame in the buffer.
        loop {
            if buf.len() < 4 {
                break;
            }
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < 4 + len {
                break;
            }
            let body = &buf[4..4 + len];
            if body.starts_with(CHAT) {
                on_chat(chats);
                chats += 1;
                counts.chats.store(chats, Ordering::Relaxed);
            } else if body.starts_with(PING) {
                if let Ok(Frame::Ping { nonce }) = decode_body(body) {
                    let _ = pong.send(encode(&Frame::Pong { nonce }).to_vec());
                }
            } else if body.starts_with(JOINED) {
                counts.joined.fetch_add(1, Ordering::Relaxed);
            } else if let Ok(Frame::Error { code, message }) = decode_body(body) {
                bail!("the node sent an error: {code}: {message}");
            }
            buf.advance(4 + len);
        }
        if chats >= stop {
            return Ok(());
        }
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve(256 * 1024);
        }
        let n = read.read_buf(&mut buf).await?;
        if n == 0 {
            bail!("the node closed the connection");
        }
    }
}

/// Writes frames handed to it (pongs and publishes) in order.
pub async fn write_loop(mut write: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut batch = Vec::with_capacity(64 * 1024);
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if write.write_all(&batch).await.is_err() {
            return;
        }
    }
}

/// Microseconds since `base`.
pub fn micros(base: Instant) -> u64 {
    base.elapsed().as_micros() as u64
}
