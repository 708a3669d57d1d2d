//! Sockets (feature `net`): the chat-key handshake over any tokio stream,
//! and a small client connection that seals what it sends and opens what
//! it reads. Nodes use the handshake; `p2pctl`, `p2pbench` and tools use
//! [`Client`]; and [`read_text_line`], for the lines a person or a
//! process types or prints.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::limits::MAX_FRAME_LEN;
use crate::secure::{self, ChatKey, ClientHandshake, Holds, Link, Opener, Sealer, ServerHandshake};
use crate::{batch_bodies, decode_body, encode, ErrorCode, Frame, PROTOCOL_VERSION};

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The other end holds another chat key, none, or speaks something
    /// else: retrying will not help.
    #[error("{0}")]
    WrongKey(String),
    /// The connection failed or was closed during the handshake.
    #[error("{0}")]
    Other(String),
}

/// What a client says of a sealed batch whose frame lengths do not add up.
const MALFORMED_BATCH: &str = "the node sent a sealed batch whose frame lengths do not add up";

fn invalid(e: impl ToString) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// Least room a client reads into.
const READ_ROOM: usize = 16 * 1024;

/// Longest handshake frame accepted (they are a few hundred bytes).
const MAX_HANDSHAKE_FRAME: usize = 4096;

/// Longest record a sealed connection accepts: one largest frame with its
/// prefix, plus a group record's header and tag.
pub const MAX_RECORD_LEN: usize = MAX_FRAME_LEN + 4 + secure::RECORD_OVERHEAD;

/// Keeps the large buffers of a busy connection's path (records of up to
/// 256 KiB, shared frame buffers) in the process's heap. With glibc's
/// defaults every buffer of 128 KiB or more is mapped and unmapped on its
/// own, and the heap is handed back to the system whenever 128 KiB at its
/// top come free, so a program that allocates such buffers again at once
/// takes page faults for each (at one member, a sixth of the coordinator's
/// CPU time went to them). Freed memory of up to 8 MiB per allocator
/// arena (glibc keeps one per allocating thread, up to a bound) then stays
/// with the process. Call once, at the start of `main`; no effect
/// elsewhere than glibc.
pub fn keep_buffers_in_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters (under the
    // allocator's own lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

async fn read_plain<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Frame, HandshakeError> {
    let lost =
        |e: std::io::Error| HandshakeError::Other(format!("connection lost during the handshake: {e}"));
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await.map_err(lost)?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_HANDSHAKE_FRAME {
        return Err(HandshakeError::WrongKey(
            "the other end did not start with the chat-key handshake (is it a p2pchat node of this version?)"
                .into(),
        ));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.map_err(lost)?;
    decode_body(&body)
        .map_err(|e| HandshakeError::WrongKey(format!("the other end did not follow the handshake: {e}")))
}

/// The dialling side: sends `auth`, checks the server's proof, proves the
/// key in turn.
///
/// # Errors
/// [`HandshakeError::WrongKey`] when the server holds another key (its
/// refusal's message is passed on), [`HandshakeError::Other`] on I/O.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &ChatKey,
) -> Result<Link, HandshakeError> {
    let io = |e: std::io::Error| HandshakeError::Other(format!("connection lost during the handshake: {e}"));
    let (hs, nc) = ClientHandshake::start(key);
    let auth = Frame::Auth {
        version: PROTOCOL_VERSION,
        nonce: secure::to_hex(&nc),
    };
    stream.write_all(&encode(&auth)).await.map_err(io)?;
    let (ns, proof) = match read_plain(stream).await? {
        Frame::AuthReply { nonce, proof } => (nonce, proof),
        Frame::Error { code, message } => {
            return Err(match code {
                ErrorCode::Unauthenticated | ErrorCode::VersionMismatch => HandshakeError::WrongKey(message),
                _ => HandshakeError::Other(message),
            })
        }
        other => {
            return Err(HandshakeError::WrongKey(format!(
                "the other end answered the handshake with {}",
                other.kind()
            )))
        }
    };
    let ns = secure::nonce_from_hex(&ns).map_err(|e| HandshakeError::WrongKey(e.to_string()))?;
    let proof = secure::from_hex(&proof).unwrap_or_default();
    let (mine, link) = hs.finish(ns, &proof).map_err(|_| {
        HandshakeError::WrongKey(format!(
            "the node there uses another chat key (ours is {}); check --key-file",
            key.id()
        ))
    })?;
    let proof = Frame::AuthProof {
        proof: secure::to_hex(&mine),
    };
    stream.write_all(&encode(&proof)).await.map_err(io)?;
    Ok(link)
}

/// The accepting side: answers `auth` with our nonce and proof, then
/// checks the client's proof. Whatever fails is answered with a plain
/// `unauthenticated` (or `version_mismatch`) error before the caller
/// closes.
///
/// # Errors
/// [`HandshakeError::WrongKey`] naming what the client did wrong.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &ChatKey,
) -> Result<Link, HandshakeError> {
    let io = |e: std::io::Error| HandshakeError::Other(format!("connection lost during the handshake: {e}"));
    let nc = match read_plain(stream).await {
        Ok(Frame::Auth { version, nonce }) if version == PROTOCOL_VERSION => nonce,
        Ok(Frame::Auth { version, .. }) => {
            let m = format!(
                "protocol version {version} is not supported; this node speaks version {PROTOCOL_VERSION}"
            );
            return Err(refuse_plain(stream, ErrorCode::VersionMismatch, m).await);
        }
        Ok(other) => {
            let m = format!(
                "this chat is keyed: a connection must first prove it holds the chat key (an auth frame), not send {}",
                other.kind()
            );
            return Err(refuse_plain(stream, ErrorCode::Unauthenticated, m).await);
        }
        Err(HandshakeError::Other(m)) => return Err(HandshakeError::Other(m)),
        Err(e) => return Err(refuse_plain(stream, ErrorCode::Unauthenticated, e.to_string()).await),
    };
    let Ok(nc) = secure::nonce_from_hex(&nc) else {
        let m = "the auth nonce is not 64 hex digits".to_string();
        return Err(refuse_plain(stream, ErrorCode::Unauthenticated, m).await);
    };
    let (hs, hello) = ServerHandshake::answer(key, nc);
    let reply = Frame::AuthReply {
        nonce: secure::to_hex(&hello.nonce),
        proof: secure::to_hex(&hello.proof),
    };
    stream.write_all(&encode(&reply)).await.map_err(io)?;
    let proof = match read_plain(stream).await {
        Ok(Frame::AuthProof { proof }) => secure::from_hex(&proof).unwrap_or_default(),
        Ok(other) => {
            let m = format!("expected the auth proof, got {}", other.kind());
            return Err(refuse_plain(stream, ErrorCode::Unauthenticated, m).await);
        }
        Err(HandshakeError::Other(m)) => return Err(HandshakeError::Other(m)),
        Err(e) => return Err(refuse_plain(stream, ErrorCode::Unauthenticated, e.to_string()).await),
    };
    match hs.finish(&proof) {
        Ok(link) => Ok(link),
        Err(_) => {
            let m = format!(
                "this chat uses another key (this node's is {}); check --key-file",
                key.id()
            );
            Err(refuse_plain(stream, ErrorCode::Unauthenticated, m).await)
        }
    }
}

/// Answers a failed handshake with a plain error frame (the other end
/// holds no link key to open a sealed one).
async fn refuse_plain<S: AsyncWrite + Unpin>(
    stream: &mut S,
    code: ErrorCode,
    message: String,
) -> HandshakeError {
    let _ = stream
        .write_all(&encode(&Frame::error(code, message.clone())))
        .await;
    HandshakeError::WrongKey(message)
}

/// Why a [`Client`] could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}: {error}")]
    Io { addr: String, error: std::io::Error },
    #[error("{addr}: {error}")]
    Handshake { addr: String, error: HandshakeError },
    #[error("{addr} did not answer within {ms} ms")]
    Timeout { addr: String, ms: u128 },
}

/// A connection to a node, as a member, observer or tool: sealed in a
/// keyed chat, plain with `--insecure`.
pub struct Client {
    pub read: ClientRead,
    pub write: ClientWrite,
}

/// The reading half of a [`Client`].
pub struct ClientRead {
    half: OwnedReadHalf,
    opener: Option<Opener>,
    buf: BytesMut,
    /// Frame bodies opened from a batch and not yet returned.
    pending: VecDeque<Bytes>,
}

/// The writing half of a [`Client`].
pub struct ClientWrite {
    half: OwnedWriteHalf,
    sealer: Option<Sealer>,
}

impl Client {
    /// Connects to `addr` and, with a key, proves it, all within `limit`.
    ///
    /// # Errors
    /// [`ConnectError`] naming the address and what went wrong.
    pub async fn connect(addr: &str, key: Option<&ChatKey>, limit: Duration) -> Result<Client, ConnectError> {
        let attempt = async {
            let mut stream = TcpStream::connect(addr).await.map_err(|error| ConnectError::Io {
                addr: addr.to_string(),
                error,
            })?;
            let _ = stream.set_nodelay(true);
            let link =
                match key {
                    Some(k) => Some(client_handshake(&mut stream, k).await.map_err(|error| {
                        ConnectError::Handshake {
                            addr: addr.to_string(),
                            error,
                        }
                    })?),
                    None => None,
                };
            Ok(Client::new(stream, link))
        };
        tokio::time::timeout(limit, attempt).await.unwrap_or_else(|_| {
            Err(ConnectError::Timeout {
                addr: addr.to_string(),
                ms: limit.as_millis(),
            })
        })
    }

    /// Wraps a stream that completed the handshake (`link`) or needs none.
    pub fn new(stream: TcpStream, link: Option<Link>) -> Client {
        let (read, write) = stream.into_split();
        let (sealer, opener) = match link {
            Some(l) => (Some(l.send), Some(l.recv)),
            None => (None, None),
        };
        Client {
            read: ClientRead {
                half: read,
                opener,
                buf: BytesMut::with_capacity(16 * 1024),
                pending: VecDeque::new(),
            },
            write: ClientWrite { half: write, sealer },
        }
    }

    pub async fn send(&mut self, frame: &Frame) -> std::io::Result<()> {
        self.write.send(frame).await
    }

    pub async fn recv(&mut self) -> std::io::Result<Frame> {
        self.read.recv().await
    }
}

impl ClientWrite {
    /// Sends one frame.
    ///
    /// # Errors
    /// I/O errors.
    pub async fn send(&mut self, frame: &Frame) -> std::io::Result<()> {
        let bytes = encode(frame);
        self.send_encoded(&bytes).await
    }

    /// Sends an encoded frame (its 4-byte prefix, then its body).
    ///
    /// # Errors
    /// I/O errors.
    pub async fn send_encoded(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let mut out = Vec::new();
        self.seal_into(frame, &mut out);
        self.half.write_all(&out).await
    }

    /// Appends what goes on the wire for an encoded frame to `out` (sealed
    /// in a keyed chat), so callers can batch several into one write.
    pub fn seal_into(&mut self, frame: &[u8], out: &mut Vec<u8>) {
        match &mut self.sealer {
            Some(s) => {
                let rec = s.seal(&frame[4..]);
                out.extend_from_slice(&(rec.len() as u32).to_be_bytes());
                out.extend_from_slice(&rec);
            }
            None => out.extend_from_slice(frame),
        }
    }

    /// Appends what goes on the wire for several encoded frames (each with
    /// its prefix, back to back) to `out`: in a keyed chat, records that
    /// each seal up to one largest frame's worth of them at once.
    pub fn seal_batch_into(&mut self, mut frames: &[u8], out: &mut Vec<u8>) {
        let Some(s) = &mut self.sealer else {
            out.extend_from_slice(frames);
            return;
        };
        while !frames.is_empty() {
            // Whole frames, as many as fit one record.
            let mut take = 0;
            while take + 4 <= frames.len() {
                let len = 4 + u32::from_be_bytes([
                    frames[take],
                    frames[take + 1],
                    frames[take + 2],
                    frames[take + 3],
                ]) as usize;
                if take > 0 && take + len > MAX_FRAME_LEN + 4 {
                    break;
                }
                take = (take + len).min(frames.len());
            }
            let take = take.max(frames.len().min(4));
            s.seal_batch_prefixed_into(&frames[..take], out);
            frames = &frames[take..];
        }
    }

    /// Writes bytes prepared by [`ClientWrite::seal_into`].
    ///
    /// # Errors
    /// I/O errors.
    pub async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.half.write_all(bytes).await
    }

    /// Closes the sending direction.
    ///
    /// # Errors
    /// I/O errors.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.half.shutdown().await
    }
}

impl ClientRead {
    /// The next frame.
    ///
    /// # Errors
    /// I/O errors; a record that fails to authenticate or a malformed
    /// frame as `InvalidData`.
    pub async fn recv(&mut self) -> std::io::Result<Frame> {
        let body = self.recv_body().await?;
        decode_body(&body).map_err(invalid)
    }

    /// The next frame's body, undecoded (for callers that only look at
    /// its first bytes).
    ///
    /// # Errors
    /// As [`ClientRead::recv`].
    pub async fn recv_body(&mut self) -> std::io::Result<Bytes> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Ok(b);
            }
            let record = self.next_record().await?;
            let Some(opener) = &mut self.opener else {
                return Ok(record.freeze());
            };
            let mut record = record;
            let (holds, plain) = opener.open_in_place(&mut record).map_err(invalid)?;
            let all = record.freeze().slice(plain);
            if holds == Holds::Frame {
                return Ok(all);
            }
            let bodies = batch_bodies(&all).ok_or_else(|| invalid(MALFORMED_BATCH))?;
            self.pending.extend(bodies.map(|b| all.slice_ref(b)));
        }
    }

    /// The frames of the next record (or one already read but not yet
    /// handed out), each body passed to `each` where it lies: no copy or
    /// reference count per frame (for callers that read many small
    /// frames). Returns how many it passed.
    ///
    /// # Errors
    /// As [`ClientRead::recv`].
    pub async fn recv_bodies(&mut self, mut each: impl FnMut(&[u8])) -> std::io::Result<usize> {
        if !self.pending.is_empty() {
            let n = self.pending.len();
            for b in self.pending.drain(..) {
                each(&b);
            }
            return Ok(n);
        }
        let mut record = self.next_record().await?;
        let Some(opener) = &mut self.opener else {
            each(&record);
            return Ok(1);
        };
        let (holds, plain) = opener.open_in_place(&mut record).map_err(invalid)?;
        let all = &record[plain];
        if holds == Holds::Frame {
            each(all);
            return Ok(1);
        }
        let bodies = batch_bodies(all).ok_or_else(|| invalid(MALFORMED_BATCH))?;
        let n = bodies.len();
        bodies.for_each(each);
        Ok(n)
    }

    async fn next_record(&mut self) -> std::io::Result<bytes::BytesMut> {
        let max = if self.opener.is_some() {
            MAX_RECORD_LEN
        } else {
            MAX_FRAME_LEN
        };
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
                if len > max {
                    return Err(invalid(format!(
                        "the node sent a record of {len} bytes, over the limit of {max}"
                    )));
                }
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    return Ok(self.buf.split_to(len));
                }
                self.buf.reserve(4 + len - self.buf.len());
            }
            // Room for more than the next record: `reserve` on a buffer
            // records were cut from grants just what is asked, and a read
            // takes no more than the room (small frames without a key
            // would each cost two reads).
            self.buf.reserve(READ_ROOM);
            if self.half.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// The next line of text from `r` (a terminal, a pipe from a child
/// process), without its line ending: at most `max` bytes (a longer line
/// comes in pieces of `max`), with bytes that are not UTF-8 replaced by
/// U+FFFD. Reading with `lines()` instead ends at the first such byte: a
/// node took a stray Latin-1 byte on its stdin for the end of its input
/// and left the chat, and p2pctl stopped reading a node's output (and
/// closed the pipe) when a plugin printed one. `Ok(None)` at the end.
///
/// # Errors
/// When reading fails.
pub async fn read_text_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<String>> {
    buf.clear();
    if (&mut *r).take(max as u64).read_until(b'\n', buf).await? == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    Ok(Some(String::from_utf8_lossy(buf).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn text_lines_are_read_whatever_bytes_they_hold() {
        let mut input = b"ok\r\n\xff\xfe bad\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 1000 + 10));
        input.extend_from_slice(b"\n\nno newline at the end");
        let (mut r, mut buf) = (tokio::io::BufReader::new(&input[..]), Vec::new());
        let mut got = Vec::new();
        while let Some(line) = read_text_line(&mut r, &mut buf, 1000).await.unwrap() {
            got.push(line);
        }
        let lens: Vec<usize> = got.iter().map(String::len).collect();
        assert_eq!(lens.len(), 6, "{lens:?}");
        assert_eq!(got[0], "ok");
        assert_eq!(got[1], "\u{fffd}\u{fffd} bad");
        assert_eq!((lens[2], lens[3]), (1000, 10), "a long line comes in pieces");
        assert_eq!(got[4], "", "an empty line is a line");
        assert_eq!(got[5], "no newline at the end");
    }
}
