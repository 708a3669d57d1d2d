//! One TCP connection: the handshake proving the chat key (in a keyed
//! chat), a reader task that opens records and turns them into frames for
//! the actor, and an output path bounded in bytes. When nothing is queued
//! the actor writes straight to the socket (no task wakeup, no copy); what
//! the socket does not take at once is queued for a writer task, which
//! coalesces everything queued into as few writes as possible.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use p2p_proto::net::{self, HandshakeError};
use p2p_proto::secure::{self, ChatKey, Holds, Opener, Sealer};
use p2p_proto::{batch_bodies, decode_body, encode, limits::MAX_FRAME_LEN, ErrorCode, Frame};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::task::TaskTracker;

use crate::core::{ConnId, Input};
use crate::cuts::Gate;

/// The chat key, when the chat has one (`None`: `--insecure`, no
/// handshake, plain frames).
pub type Security = Option<Arc<ChatKey>>;

/// Which end of the handshake we are.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    /// We accepted the connection.
    Server,
    /// We dialled.
    Client,
}

/// The largest broadcast record the actor writes to a socket itself.
/// Anything larger (a turn's record under load) goes to the connection's
/// writer task: the actor then sequences the next turn while a worker
/// thread does the system call, instead of the two taking turns. One
/// message at a time stays a direct write (no hand-off on the latency
/// path), and so do frames to one connection (a welcome: handing those on
/// cost 1.5 KiB of memory per member at 1,000 members).
const DIRECT_WRITE_MAX: usize = 16 * 1024;

/// What the connection tasks tell the actor.
pub enum Msg {
    /// A connection is ready for output (sent before any of its frames).
    Registered(ConnId, Writer),
    Input(Input),
    /// The frames of one sealed batch record, in order: one hand-off to
    /// the actor for the batch, not one per frame.
    Frames(ConnId, Vec<Frame>),
}

impl Msg {
    /// The frames this message carries (a batch record's count, else 1).
    pub fn frames(&self) -> usize {
        match self {
            Msg::Frames(_, frames) => frames.len(),
            _ => 1,
        }
    }
}

enum WriteMsg {
    Frame(Bytes),
    Close,
}

/// Limits a connection runs under.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Time allowed for the first frame.
    pub handshake: Duration,
    /// Bytes that may wait in the write queue before the peer counts as a
    /// slow consumer.
    pub queue_bytes: usize,
}

/// The actor's handle on a connection's output.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<WriteMsg>,
    /// Bytes handed to the writer task and not yet in the kernel. Zero means
    /// the socket holds everything sent so far, so a direct write keeps order.
    queued: Arc<AtomicUsize>,
    /// Batches the writer task got into the kernel: when it moves while
    /// bytes are queued, the peer is reading (alive, if slow).
    drained: Arc<AtomicU64>,
    half: Arc<OwnedWriteHalf>,
    limit: usize,
    /// Held while bytes are handed on, so pushes from two tasks (the
    /// actor, and a reader refusing a bad frame) never interleave; holds
    /// the link sealer in keyed chats, so records go out in sealing order.
    sealer: Arc<Mutex<Option<Sealer>>>,
    reader: AbortHandle,
    writer: AbortHandle,
    /// Holds the traffic both ways while the peer is cut off (`--cut-file`).
    gate: Arc<Gate>,
}

/// The queue is over its byte limit.
pub struct Overflow(pub usize);

impl Writer {
    /// Queues a frame.
    ///
    /// # Errors
    /// [`Overflow`] with the queued byte count if the limit would be passed;
    /// nothing is queued then.
    pub fn push(&self, frame: Bytes) -> Result<(), Overflow> {
        let mut sealer = self
            .sealer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let frame = match sealer.as_mut() {
            Some(s) => prefixed(&s.seal(&frame[4..])),
            None => frame,
        };
        self.hand_on(frame, usize::MAX)
    }

    /// Queues bytes that are already records (a group record sealed once
    /// for every member, or plain frames without a key).
    ///
    /// # Errors
    /// As [`Writer::push`].
    pub fn push_record(&self, frame: Bytes) -> Result<(), Overflow> {
        let _order = self
            .sealer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.hand_on(frame, DIRECT_WRITE_MAX)
    }

    /// Writes what the socket takes now and queues the rest (the caller
    /// holds the order lock). Outputs over `direct_max` bytes are queued
    /// whole, for the writer task.
    fn hand_on(&self, frame: Bytes, direct_max: usize) -> Result<(), Overflow> {
        let queued = self.queued.load(Ordering::Acquire);
        let rest = if queued == 0 && !self.gate.is_cut() && frame.len() <= direct_max {
            match self.half.try_write(&frame) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(n) => frame.slice(n..),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => frame,
                // Broken connection: its reader reports the close.
                Err(_) => return Ok(()),
            }
        } else {
            frame
        };
        if queued + rest.len() > self.limit {
            return Err(Overflow(queued));
        }
        self.enqueue(rest);
        Ok(())
    }

    /// Bytes queued and not yet in the kernel.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// How many queued batches have reached the kernel so far.
    pub fn drained(&self) -> u64 {
        self.drained.load(Ordering::Acquire)
    }

    /// Hands bytes to the writer task (counted in `queued`).
    fn enqueue(&self, bytes: Bytes) {
        self.queued.fetch_add(bytes.len(), Ordering::AcqRel);
        let _ = self.tx.send(WriteMsg::Frame(bytes));
    }

    /// Closes after what is queued is written, and stops reading now. A
    /// peer that does not take the rest within a few seconds is cut off.
    pub fn close(&self) {
        let _ = self.tx.send(WriteMsg::Close);
        self.reader.abort();
        let writer = self.writer.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            writer.abort();
        });
    }

    /// Cuts the connection off (holding its traffic both ways) or heals it.
    pub fn set_cut(&self, cut: bool) {
        self.gate.set(cut);
    }

    /// Drops the connection at once, discarding what is queued.
    pub fn kill(&self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// Starts a connected stream: in a keyed chat, first the handshake (in
/// its own task, within the handshake time limit; a peer that does not
/// prove the key is answered `unauthenticated` and never reaches the
/// actor), then registers its writer with the actor, then starts reading,
/// so no frame can arrive before the actor can answer it. A dial whose
/// peer holds another key is reported as [`Input::WrongKey`].
#[allow(clippy::too_many_arguments)]
pub fn start(
    stream: TcpStream,
    conn: ConnId,
    first: Option<Bytes>,
    actor: mpsc::Sender<Msg>,
    limits: ConnLimits,
    tracker: &TaskTracker,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    security: Security,
    side: Side,
    gate: Arc<Gate>,
) {
    let tracker2 = tracker.clone();
    tracker.spawn(async move {
        let mut stream = stream;
        let _ = stream.set_nodelay(true);
        let link = match &security {
            None => None,
            Some(key) => {
                match tokio::time::timeout(limits.handshake, handshake(&mut stream, key, side)).await {
                    Ok(Ok(link)) => Some(link),
                    Ok(Err(e)) => {
                        tracing::debug!(conn, ?side, error = %e, "handshake failed");
                        if side == Side::Client {
                            let input = match e {
                                HandshakeError::WrongKey(m) => Input::WrongKey(conn, m),
                                HandshakeError::Other(m) => Input::Closed(conn, Some(m)),
                            };
                            let _ = actor.send(Msg::Input(input)).await;
                        }
                        return;
                    }
                    Err(_) => {
                        if side == Side::Server {
                            let ms = limits.handshake.as_millis();
                            let err = Frame::error(
                                ErrorCode::HandshakeTimeout,
                                format!("no handshake within {ms} ms of connecting"),
                            );
                            let _ = stream.write_all(&encode(&err)).await;
                        } else {
                            let m = "the node did not complete the handshake in time".to_string();
                            let _ = actor.send(Msg::Input(Input::Closed(conn, Some(m)))).await;
                        }
                        return;
                    }
                }
            }
        };
        register(stream, conn, first, actor, limits, &tracker2, permit, link, gate).await;
    });
}

#[allow(clippy::too_many_arguments)]
async fn register(
    stream: TcpStream,
    conn: ConnId,
    first: Option<Bytes>,
    actor: mpsc::Sender<Msg>,
    limits: ConnLimits,
    tracker: &TaskTracker,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    link: Option<secure::Link>,
    gate: Arc<Gate>,
) {
    let (read, write) = stream.into_split();
    let half = Arc::new(write);
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let drained = Arc::new(AtomicU64::new(0));
    let writer_task = tracker.spawn(write_loop(
        half.clone(),
        rx,
        queued.clone(),
        drained.clone(),
        gate.clone(),
    ));
    let (sealer, opener) = match link {
        Some(l) => (Some(l.send), Some(l.recv)),
        None => (None, None),
    };
    let sealer = Arc::new(Mutex::new(sealer));
    // The reader starts only after registration; a oneshot holds it back.
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<Writer>();
    let actor2 = actor.clone();
    // The first frame (hello, a request) is due within the handshake time
    // too, key or not.
    let first_within = Some(limits.handshake);
    let reader_task = tokio::spawn(async move {
        let Ok(writer) = go_rx.await else { return };
        read_loop(conn, read, actor2, writer, first_within, opener).await;
        drop(permit);
    });
    let writer = Writer {
        tx,
        queued,
        drained,
        half,
        limit: limits.queue_bytes,
        sealer,
        reader: reader_task.abort_handle(),
        writer: writer_task.abort_handle(),
        gate,
    };
    if let Some(frame) = first {
        let _ = writer.push(frame);
    }
    if actor.send(Msg::Registered(conn, writer.clone())).await.is_err() {
        writer.kill();
        return;
    }
    let _ = go_tx.send(writer);
}

/// Proves the chat key on a new connection.
async fn handshake(
    stream: &mut TcpStream,
    key: &ChatKey,
    side: Side,
) -> Result<secure::Link, HandshakeError> {
    match side {
        Side::Client => net::client_handshake(stream, key).await,
        Side::Server => net::server_handshake(stream, key).await,
    }
}

/// A connection that carries one frame and closes (an announcement):
/// handshake, the frame (sealed), shutdown.
pub async fn send_once(addr: &str, frame: Bytes, security: &Security) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let _ = s.set_nodelay(true);
    let bytes = match security {
        Some(key) => {
            let mut link = handshake(&mut s, key, Side::Client)
                .await
                .map_err(std::io::Error::other)?;
            prefixed(&link.send.seal(&frame[4..]))
        }
        None => frame,
    };
    s.write_all(&bytes).await?;
    s.shutdown().await
}

/// A record with its 4-byte length prefix.
pub fn prefixed(record: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(4 + record.len());
    out.extend_from_slice(&(record.len() as u32).to_be_bytes());
    out.extend_from_slice(record);
    Bytes::from(out)
}

async fn write_loop(
    half: Arc<OwnedWriteHalf>,
    mut rx: mpsc::UnboundedReceiver<WriteMsg>,
    queued: Arc<AtomicUsize>,
    drained: Arc<AtomicU64>,
    gate: Arc<Gate>,
) {
    // Holds frames coalesced into one write (direct writes and a lone
    // record need none).
    let mut batch: Vec<u8> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.clear();
        let mut close = false;
        // A frame written as it is, when nothing else is queued behind it
        // (a large broadcast record: no copy into `batch`).
        let mut lone: Option<Bytes> = None;
        let mut msg = first;
        // Coalesce: take everything already queued into one write.
        loop {
            match msg {
                WriteMsg::Frame(bytes) => match lone.take() {
                    None if batch.is_empty() => lone = Some(bytes),
                    held => {
                        if let Some(held) = held {
                            batch.extend_from_slice(&held);
                        }
                        batch.extend_from_slice(&bytes);
                    }
                },
                WriteMsg::Close => {
                    close = true;
                    break;
                }
            }
            if batch.len() >= 256 * 1024 || lone.as_ref().is_some_and(|b| b.len() >= 256 * 1024) {
                break;
            }
            match rx.try_recv() {
                Ok(next) => msg = next,
                Err(_) => break,
            }
        }
        gate.pass().await;
        let out: &[u8] = lone.as_deref().unwrap_or(&batch);
        let mut off = 0;
        while off < out.len() {
            if half.writable().await.is_err() {
                return;
            }
            match half.try_write(&out[off..]) {
                Ok(n) => {
                    off += n;
                    drained.fetch_add(1, Ordering::AcqRel);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        // Only now is it in the kernel: direct writes may resume after it.
        queued.fetch_sub(out.len(), Ordering::AcqRel);
        // A burst (a welcome with a large state, or two broadcast records
        // met in one wakeup) must not leave every member holding a buffer
        // of its size for the rest of its life. Beyond a few frames, a new
        // buffer per coalesced write is cheap next to the write.
        if batch.capacity() > 4 * 1024 {
            batch = Vec::new();
        }
        if close {
            // Dropping the last handle on the write half shuts it down.
            return;
        }
    }
}

async fn read_loop(
    conn: ConnId,
    half: OwnedReadHalf,
    actor: mpsc::Sender<Msg>,
    writer: Writer,
    first_within: Option<Duration>,
    mut opener: Option<Opener>,
) {
    // A record holds one frame, or a batch of whole frames of at most one
    // largest frame and its prefix.
    let max = if opener.is_some() {
        net::MAX_RECORD_LEN
    } else {
        MAX_FRAME_LEN
    };
    let codec = LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(max)
        .new_codec();
    // Start small: most connections carry little (memory per member counts
    // when a coordinator holds thousands); the buffer grows with the load.
    let mut records = FramedRead::with_capacity(half, codec, 512);
    let mut first = first_within;
    // What the stream gave after the frames already read in a turn (a
    // record, an error or its end), for the next turn.
    let mut carried = None;
    let reason = loop {
        let next = match carried.take() {
            Some(next) => next,
            None => match first.take() {
                Some(limit) => match tokio::time::timeout(limit, records.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let ms = limit.as_millis();
                        refuse(
                            &writer,
                            ErrorCode::HandshakeTimeout,
                            format!("no frame within {ms} ms of connecting"),
                        );
                        break Some("disconnected (handshake timeout)".to_string());
                    }
                },
                None => records.next().await,
            },
        };
        // Across a cut, nothing read counts (not even the end) until it heals.
        writer.gate.pass().await;
        let record = match next {
            None => break None,
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                refuse(
                    &writer,
                    ErrorCode::FrameTooLarge,
                    format!("frame length exceeds the limit of {MAX_FRAME_LEN} bytes"),
                );
                break Some(format!("disconnected (protocol error: {e})"));
            }
            Some(Err(e)) => break Some(format!("disconnected ({e})")),
            Some(Ok(record)) => record,
        };
        // The record's plaintext: one frame body, or whole length-prefixed
        // frames (checked to add up before any of them counts).
        let mut record = record;
        let (plain, holds) = match opener.as_mut() {
            None => (0..record.len(), Holds::Frame),
            Some(o) => match o.open_in_place(&mut record) {
                Ok((holds, plain)) => (plain, holds),
                Err(_) => {
                    tracing::debug!(conn, "a record failed to authenticate");
                    break Some("disconnected (a record failed to authenticate)".into());
                }
            },
        };
        let plain = &record[plain];
        // Frames before a bad one still count; the bad one ends the
        // connection. Decoded from the record where they lie.
        let mut frames = Vec::new();
        let mut stop = None;
        match holds {
            Holds::Frame => stop = decode_into(conn, plain, &mut frames),
            Holds::Frames => {
                let Some(bodies) = batch_bodies(plain) else {
                    break Some("disconnected (a sealed batch held a malformed frame)".into());
                };
                frames.reserve(bodies.len().min(1024));
                for body in bodies {
                    stop = decode_into(conn, body, &mut frames);
                    if stop.is_some() {
                        break;
                    }
                }
            }
        }
        // Decoded: let go of the record, so the read buffer it was cut
        // from is ours alone again and can be reused in place.
        drop(record);
        // Without a key every frame is a record of its own: take those
        // already read too, so a burst reaches the actor as one message
        // (a sealed batch does so by itself).
        while opener.is_none() && stop.is_none() && frames.len() < MAX_FRAMES_PER_HAND_OFF {
            // A busy connection: room to read many frames at once (the
            // codec itself asks the buffer for just the bytes of the next
            // prefix or body, and a read takes no more than that).
            records.read_buffer_mut().reserve(BUSY_READ_BUFFER);
            match records.next().now_or_never() {
                Some(Some(Ok(body))) => stop = decode_into(conn, &body, &mut frames),
                Some(other) => {
                    carried = Some(other);
                    break;
                }
                None => break,
            }
        }
        let msg = match frames.len() {
            0 => None,
            1 => frames.pop().map(|f| Msg::Input(Input::Frame(conn, f))),
            _ => Some(Msg::Frames(conn, frames)),
        };
        if let Some(msg) = msg {
            if actor.send(msg).await.is_err() {
                return;
            }
        }
        if let Some(e) = stop {
            refuse(&writer, e.code(), e.to_string());
            break Some(format!("disconnected (protocol error: {e})"));
        }
    };
    let _ = actor.send(Msg::Input(Input::Closed(conn, reason))).await;
}

/// Read room of a connection without a key while it sends a burst (its
/// frames come each on its own; a keyed connection's buffer grows to the
/// size of its records anyway).
const BUSY_READ_BUFFER: usize = 16 * 1024;

/// Most frames of a connection without a key handed to the actor at once.
const MAX_FRAMES_PER_HAND_OFF: usize = 512;

/// Decodes one frame body onto `frames`; the error if it is bad.
fn decode_into(conn: ConnId, body: &[u8], frames: &mut Vec<Frame>) -> Option<p2p_proto::ProtoError> {
    match decode_body(body) {
        Ok(frame) => {
            frames.push(frame);
            None
        }
        Err(e) => {
            tracing::debug!(conn, error = %e, "bad frame");
            Some(e)
        }
    }
}

/// Best-effort error frame (sealed in a keyed chat), then close.
fn refuse(writer: &Writer, code: ErrorCode, message: String) {
    let _ = writer.push(encode(&Frame::error(code, message)));
    let _ = writer.tx.send(WriteMsg::Close);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Outputs of every size, small ones written by the actor itself and
    /// large ones handed to the writer task, reach the peer whole and in
    /// the order they were pushed, also while the peer does not read and
    /// the socket fills (then everything waits in the queue behind).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_and_handed_on_writes_keep_their_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut peer = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let (actor, mut inbox) = mpsc::channel(16);
        let limits = ConnLimits {
            handshake: Duration::from_secs(5),
            queue_bytes: 64 << 20,
        };
        let tracker = TaskTracker::new();
        start(
            stream,
            1,
            None,
            actor,
            limits,
            &tracker,
            None,
            None,
            Side::Server,
            Arc::default(),
        );
        let writer = loop {
            match inbox.recv().await {
                Some(Msg::Registered(_, w)) => break w,
                Some(_) => continue,
                None => panic!("the connection never registered"),
            }
        };
        // Sizes on both sides of DIRECT_WRITE_MAX, in a fixed pseudo-random mix.
        let mut expected = Vec::new();
        let mut x = 0x2545_f491_u64;
        for i in 0..400u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = match x % 4 {
                0 => DIRECT_WRITE_MAX + (x as usize >> 8) % 50_000,
                1 => DIRECT_WRITE_MAX,
                _ => 1 + (x as usize >> 8) % 300,
            };
            let bytes: Vec<u8> = (0..len).map(|k| (i as usize * 31 + k) as u8).collect();
            expected.extend_from_slice(&bytes);
            assert!(
                writer.push_record(Bytes::from(bytes)).is_ok(),
                "queue overflowed at output {i}"
            );
        }
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(Duration::from_secs(20), peer.read_exact(&mut got))
            .await
            .expect("the peer got less than was pushed")
            .unwrap();
        assert!(got == expected, "bytes arrived out of order or changed");
        assert_eq!(writer.queued(), 0);
        writer.kill();
    }
}
