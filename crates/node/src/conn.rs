//! One TCP connection: a reader task that turns bytes into frames for the
//! actor, and an output path bounded in bytes. When nothing is queued the
//! actor writes straight to the socket (no task wakeup, no copy); what the
//! socket does not take at once is queued for a writer task, which
//! coalesces everything queued into as few writes as possible.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use p2p_proto::{decode_body, encode, limits::MAX_FRAME_LEN, ErrorCode, Frame};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::task::TaskTracker;

use crate::core::{ConnId, Input};

/// What the connection tasks tell the actor.
pub enum Msg {
    /// A connection is ready for output (sent before any of its frames).
    Registered(ConnId, Writer),
    Input(Input),
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
    reader: AbortHandle,
    writer: AbortHandle,
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
        let queued = self.queued.load(Ordering::Acquire);
        let rest = if queued == 0 {
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

    /// Drops the connection at once, discarding what is queued.
    pub fn kill(&self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// Starts the tasks for a connected stream: registers its writer with the
/// actor first, then starts reading, so no frame can arrive before the
/// actor can answer it.
pub async fn start(
    stream: TcpStream,
    conn: ConnId,
    first: Option<Bytes>,
    actor: mpsc::Sender<Msg>,
    limits: ConnLimits,
    tracker: &TaskTracker,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let half = Arc::new(write);
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let drained = Arc::new(AtomicU64::new(0));
    let writer_task = tracker.spawn(write_loop(half.clone(), rx, queued.clone(), drained.clone()));
    // The reader starts only after registration; a oneshot holds it back.
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<Writer>();
    let actor2 = actor.clone();
    let reader_task = tokio::spawn(async move {
        let Ok(writer) = go_rx.await else { return };
        read_loop(conn, read, actor2, writer, limits.handshake).await;
        drop(permit);
    });
    let writer = Writer {
        tx,
        queued,
        drained,
        half,
        limit: limits.queue_bytes,
        reader: reader_task.abort_handle(),
        writer: writer_task.abort_handle(),
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

async fn write_loop(
    half: Arc<OwnedWriteHalf>,
    mut rx: mpsc::UnboundedReceiver<WriteMsg>,
    queued: Arc<AtomicUsize>,
    drained: Arc<AtomicU64>,
) {
    // Grows only if a member falls behind (direct writes need no buffer).
    let mut batch: Vec<u8> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.clear();
        let mut close = false;
        let mut msg = first;
        // Coalesce: take everything already queued into one write.
        loop {
            match msg {
                WriteMsg::Frame(bytes) => batch.extend_from_slice(&bytes),
                WriteMsg::Close => {
                    close = true;
                    break;
                }
            }
            if batch.len() >= 256 * 1024 {
                break;
            }
            match rx.try_recv() {
                Ok(next) => msg = next,
                Err(_) => break,
            }
        }
        let mut off = 0;
        while off < batch.len() {
            if half.writable().await.is_err() {
                return;
            }
            match half.try_write(&batch[off..]) {
                Ok(n) => {
                    off += n;
                    drained.fetch_add(1, Ordering::AcqRel);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        // Only now is it in the kernel: direct writes may resume after it.
        queued.fetch_sub(batch.len(), Ordering::AcqRel);
        // A burst (a welcome with a large state) must not leave every
        // member holding a buffer of its size for the rest of its life.
        if batch.capacity() > 64 * 1024 {
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
    handshake: Duration,
) {
    let codec = LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec();
    // Start small: most connections carry little (memory per member counts
    // when a coordinator holds thousands); the buffer grows with the load.
    let mut frames = FramedRead::with_capacity(half, codec, 512);
    let mut first = true;
    let reason = loop {
        let next = if first {
            match tokio::time::timeout(handshake, frames.next()).await {
                Ok(next) => next,
                Err(_) => {
                    let ms = handshake.as_millis();
                    refuse(
                        &writer,
                        ErrorCode::HandshakeTimeout,
                        format!("no frame within {ms} ms of connecting"),
                    );
                    break Some("disconnected (handshake timeout)".to_string());
                }
            }
        } else {
            frames.next().await
        };
        match next {
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
            Some(Ok(body)) => match decode_body(&body) {
                Ok(frame) => {
                    first = false;
                    if actor.send(Msg::Input(Input::Frame(conn, frame))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(conn, error = %e, "bad frame");
                    refuse(&writer, e.code(), e.to_string());
                    break Some(format!("disconnected (protocol error: {e})"));
                }
            },
        }
    };
    let _ = actor.send(Msg::Input(Input::Closed(conn, reason))).await;
}

/// Best-effort error frame, then close.
fn refuse(writer: &Writer, code: ErrorCode, message: String) {
    let _ = writer
        .tx
        .send(WriteMsg::Frame(encode(&Frame::error(code, message))));
    let _ = writer.tx.send(WriteMsg::Close);
}
