//! Turning frames into length-prefixed bytes and back.
//!
//! A frame is a 4-byte big-endian body length followed by the body, one JSON
//! object. [`encode`] produces the whole thing once, so a broadcast can hand
//! the same `Bytes` to every member.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::ProtoError;
use crate::frame::{Chat, Entry, Frame};
use crate::limits::MAX_FRAME_LEN;

/// Encodes a frame with its length prefix.
pub fn encode(frame: &Frame) -> Bytes {
    framed(frame, 128)
}

/// The length prefix and the JSON body of `body`, in one buffer.
fn framed(body: &impl serde::Serialize, capacity: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(capacity);
    buf.put_u32(0);
    // Serializing our own types into memory cannot fail: every field is a
    // plain string, number, list or option.
    serde_json::to_writer((&mut buf).writer(), body).expect("frame serialization is infallible");
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

/// Encodes a `chat` frame from a borrowed message: the same bytes as
/// `encode(&Frame::Chat(chat.clone()))`, without the clone and written
/// straight into the buffer.
pub fn encode_chat(chat: &Chat) -> Bytes {
    let mut one = FrameArena {
        buf: BytesMut::with_capacity(chat_estimate(chat)),
    };
    encode_chat_in(&mut one, chat)
}

/// Bytes a `chat` frame takes when nothing in it needs escaping.
fn chat_estimate(chat: &Chat) -> usize {
    112 + chat.from.len() + chat.text.len() + chat.bot.as_deref().map_or(0, str::len)
}

/// Frames encoded back to back in shared buffers: each frame is its own
/// [`Bytes`], but a buffer of [`FrameArena::CHUNK`] bytes serves many of
/// them, so a frame costs no allocation of its own and its clones only
/// count references (the broadcast hot path: once per message). A buffer
/// is freed when the last frame in it is.
#[derive(Default)]
pub struct FrameArena {
    buf: BytesMut,
}

impl FrameArena {
    /// Bytes per shared buffer. A frame larger than that gets a buffer of
    /// its own size.
    pub const CHUNK: usize = 64 * 1024;

    /// Room for `need` more bytes: a fresh buffer when the current one is
    /// short (never growing one that frames still point into).
    fn reserve(&mut self, need: usize) {
        if self.buf.capacity() - self.buf.len() < need {
            self.buf = BytesMut::with_capacity(need.max(Self::CHUNK));
        }
    }
}

/// [`encode_chat`] into `arena`'s shared buffer.
pub fn encode_chat_in(arena: &mut FrameArena, chat: &Chat) -> Bytes {
    // Escaped strings may grow past the estimate: `put_str` then writes
    // through `BufMut`, which grows the buffer (a copy of this frame only).
    arena.reserve(chat_estimate(chat));
    let buf = &mut arena.buf;
    // The buffer is empty here: every frame is split off when written.
    buf.put_u32(0);
    buf.put_slice(b"{\"type\":\"chat\",\"epoch\":");
    put_u64(buf, chat.epoch);
    buf.put_slice(b",\"seq\":");
    put_u64(buf, chat.seq);
    buf.put_slice(b",\"from\":");
    put_str(buf, &chat.from);
    buf.put_slice(b",\"from_id\":");
    put_u64(buf, chat.from_id);
    buf.put_slice(b",\"client_seq\":");
    put_u64(buf, chat.client_seq);
    buf.put_slice(b",\"text\":");
    put_str(buf, &chat.text);
    if let Some(bot) = chat.bot.as_deref() {
        buf.put_slice(b",\"bot\":");
        put_str(buf, bot);
    }
    buf.put_u8(b'}');
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf.split().freeze()
}

fn put_u64(buf: &mut BytesMut, n: u64) {
    buf.put_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A JSON string as `serde_json` writes it: copied as is unless it holds
/// a byte JSON escapes (controls, `"` and `\\`), which `serde_json` then
/// writes.
fn put_str(buf: &mut BytesMut, s: &str) {
    if is_plain_json(s.as_bytes()) {
        buf.put_u8(b'"');
        buf.put_slice(s.as_bytes());
        buf.put_u8(b'"');
    } else {
        serde_json::to_writer(buf.writer(), s).expect("string serialization is infallible");
    }
}

/// True if `bytes` hold nothing JSON escapes in a string (controls, `"`
/// and `\\`): written or read as they are. A fold without early exit, which
/// the compiler vectorises.
fn is_plain_json(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .fold(true, |ok, &b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'))
}

/// Encodes a log entry as its frame (chat entries take the fast path).
pub fn encode_entry(entry: &Entry) -> Bytes {
    match entry {
        Entry::Chat(c) => encode_chat(c),
        other => framed(other, 128),
    }
}

/// The bodies of the length-prefixed frames in `batch` (a sealed batch
/// record's plaintext), in order, where they lie. None unless the lengths
/// add up exactly and every frame is within the body limit: a batch
/// counts whole or not at all.
pub fn batch_bodies(batch: &[u8]) -> Option<BatchBodies<'_>> {
    let (mut rest, mut count) = (batch, 0);
    while !rest.is_empty() {
        let (_, after) = next_body(rest)?;
        rest = after;
        count += 1;
    }
    Some(BatchBodies {
        rest: batch,
        left: count,
    })
}

/// One frame off the front of a batch: its body and what follows.
fn next_body(batch: &[u8]) -> Option<(&[u8], &[u8])> {
    let prefix: [u8; 4] = batch.get(..4)?.try_into().ok()?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return None;
    }
    Some((batch.get(4..4 + len)?, batch.get(4 + len..)?))
}

/// The frame bodies of a batch checked by [`batch_bodies`].
pub struct BatchBodies<'a> {
    rest: &'a [u8],
    left: usize,
}

impl<'a> Iterator for BatchBodies<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        let (body, rest) = next_body(self.rest)?;
        self.rest = rest;
        self.left -= 1;
        Some(body)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for BatchBodies<'_> {}

/// Takes one whole frame body off the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed. The length is checked
/// against `max` before anything is reserved, so a prefix of 4 GiB costs
/// nothing.
///
/// # Errors
/// [`ProtoError::FrameTooLarge`] if the prefix announces more than `max`.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, ProtoError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(ProtoError::FrameTooLarge { len, max });
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(4 + len);
    let _prefix = frame.split_to(4);
    Ok(Some(frame.freeze()))
}

/// Parses one frame body.
///
/// # Errors
/// Tells apart invalid UTF-8, invalid JSON, an unknown `type` and a known
/// type with bad fields, so the peer gets a precise error code.
pub fn decode_body(body: &[u8]) -> Result<Frame, ProtoError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    if let Some(say) = exact_say(body).or_else(|| fast_say(body)) {
        return Ok(say);
    }
    match serde_json::from_slice::<Frame>(body) {
        Ok(frame) => Ok(frame),
        Err(err) => Err(classify(body, err)),
    }
}

/// The hot frame, `say`, parsed as a plain struct: serde reads an
/// internally tagged enum by first buffering the whole object, which cost
/// about 5% of a coordinator's CPU per message. Anything this does not
/// take (another type, a duplicate or missing field, bad JSON) goes the
/// general way, which also names the error; what it takes, the general way
/// would have decoded to the same frame.
fn fast_say(body: &[u8]) -> Option<Frame> {
    #[derive(serde::Deserialize)]
    struct Say<'a> {
        #[serde(rename = "type", borrow)]
        kind: &'a str,
        text: String,
        client_seq: u64,
    }
    if !body.starts_with(br#"{"type":"say","#) {
        return None;
    }
    let say: Say = serde_json::from_slice(body).ok()?;
    (say.kind == "say").then_some(Frame::Say {
        text: say.text,
        client_seq: say.client_seq,
    })
}

/// `say` in the shape our own encoder writes it,
/// `{"type":"say","text":"…","client_seq":N}`, with a text that needs no
/// unescaping, read without a JSON parser (the general way cost about 15%
/// of a coordinator's CPU per message at one member). Anything else (other
/// field orders, whitespace, escapes, a number JSON would refuse or that
/// passes `u64`) is left to [`fast_say`] and the general way; what this
/// takes, they would have decoded to the same frame.
fn exact_say(body: &[u8]) -> Option<Frame> {
    const HEAD: &[u8] = br#"{"type":"say","text":""#;
    const MID: &[u8] = br#"","client_seq":"#;
    let rest = body.strip_prefix(HEAD)?;
    let end = rest.iter().position(|&b| b == b'"')?;
    let (text, rest) = rest.split_at(end);
    // A JSON string holds no raw control byte, and a backslash starts an
    // escape: both go the general way.
    if !is_plain_json(text) {
        return None;
    }
    let digits = rest.strip_prefix(MID)?.strip_suffix(b"}")?;
    // JSON numbers have no leading zero; u64 has at most 20 digits.
    if digits.is_empty() || digits.len() > 20 || (digits[0] == b'0' && digits.len() > 1) {
        return None;
    }
    let mut client_seq: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        client_seq = client_seq.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    let text = std::str::from_utf8(text).ok()?.to_owned();
    Some(Frame::Say { text, client_seq })
}

/// Works out why a body failed to parse. Only runs on the error path.
fn classify(body: &[u8], err: serde_json::Error) -> ProtoError {
    let Ok(text) = std::str::from_utf8(body) else {
        return ProtoError::BadUtf8;
    };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return ProtoError::BadJson(e.to_string()),
    };
    let Some(kind) = value.get("type").and_then(|t| t.as_str()) else {
        return ProtoError::BadJson("missing string field \"type\"".into());
    };
    if !Frame::TYPES.contains(&kind) {
        let shown: String = kind.chars().take(40).collect();
        return ProtoError::UnknownType(shown);
    }
    ProtoError::BadField {
        kind: kind.to_string(),
        detail: err.to_string(),
    }
}

/// Reads one frame from a blocking reader (for simple clients and tests).
///
/// # Errors
/// I/O errors, and protocol errors wrapped as `InvalidData`.
pub fn read_frame_sync(r: &mut impl std::io::Read) -> std::io::Result<Frame> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix)?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        let e = ProtoError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode_body(&body).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn the_fast_say_path_agrees_with_the_general_one() {
        let general = |b: &[u8]| serde_json::from_slice::<Frame>(b).ok();
        let cases: [&[u8]; 12] = [
            br#"{"type":"say","text":"hi","client_seq":3}"#,
            br#"{"type":"say","client_seq":3,"text":"h\u00e9 \"q\""}"#,
            br#"{"type":"say","text":"hi","client_seq":3,"extra":[1,{"a":2}]}"#,
            br#"{"type":"say","text":"hi"}"#,
            br#"{"type":"say","text":"hi","client_seq":-1}"#,
            br#"{"type":"say","text":"hi","client_seq":3,"text":"again"}"#,
            br#"{"type":"say","type":"chat","text":"hi","client_seq":3}"#,
            br#"{"type":"say","text":7,"client_seq":3}"#,
            br#"{"type":"say","text":"hi","client_seq":3"#,
            br#"{"type":"say","text":"hi","client_seq":3} trailing"#,
            br#"{"type":"say","text":"\ud800","client_seq":3}"#,
            b"{\"type\":\"say\",\"text\":\"\xff\",\"client_seq\":3}",
        ];
        for body in cases {
            let shown = String::from_utf8_lossy(body);
            let fast = fast_say(body);
            if fast.is_some() {
                assert_eq!(fast, general(body), "{shown}");
            }
            // Whatever the path, decode_body answers as the general way does.
            assert_eq!(decode_body(body).ok(), general(body), "{shown}");
        }
        assert!(fast_say(cases[0]).is_some() && fast_say(cases[2]).is_some());
    }

    /// The hand-written `say` reader against serde_json on bodies built
    /// from pieces near its edges: escapes, controls, bad UTF-8, numbers
    /// JSON refuses or that pass `u64`, other shapes.
    #[test]
    fn the_exact_say_reader_agrees_with_serde_json() {
        let general = |b: &[u8]| serde_json::from_slice::<Frame>(b).ok();
        let texts: [&[u8]; 12] = [
            b"",
            b"hi",
            b"h\xc3\xa9llo",
            b"tab\there",
            b"a\\\"b",
            b"q\\",
            b"\x01",
            b"\x7f del",
            b"\xff",
            b"\xe2\x82",
            b"\\u00e9",
            b"\\",
        ];
        let numbers: [&[u8]; 11] = [
            b"0",
            b"1",
            b"01",
            b"00",
            b"42",
            b"-1",
            b"1.5",
            b"1e3",
            b"18446744073709551615",
            b"18446744073709551616",
            b"",
        ];
        let shapes: [(&[u8], &[u8], &[u8]); 5] = [
            (br#"{"type":"say","text":""#, br#"","client_seq":"#, b"}"),
            (br#"{"type":"say","text":""#, br#"","client_seq":"#, b"} "),
            (br#"{"type":"say","text":""#, br#"","client_seq": "#, b"}"),
            (br#"{"type":"say","text":""#, br#"","client_seq":"#, b""),
            (br#"{"type":"say", "text":""#, br#"","client_seq":"#, b"}"),
        ];
        let mut taken = 0;
        for (head, mid, tail) in shapes {
            for text in texts {
                for number in numbers {
                    let body = [head, text, mid, number, tail].concat();
                    let shown = String::from_utf8_lossy(&body);
                    if let Some(frame) = exact_say(&body) {
                        taken += 1;
                        assert_eq!(Some(frame), general(&body), "{shown}");
                    }
                    assert_eq!(decode_body(&body).ok(), general(&body), "{shown}");
                }
            }
        }
        // Our own encoder's say takes the hand-written way.
        for (text, n) in [("hi", 1), ("h\u{e9}llo", u64::MAX), ("", 0)] {
            let frame = Frame::Say {
                text: text.into(),
                client_seq: n,
            };
            assert_eq!(exact_say(&encode(&frame)[4..]), Some(frame));
        }
        // Texts without escapes or controls (hi, é, DEL, empty) with the
        // numbers serde takes (0, 1, 42, u64::MAX), in the one exact shape.
        assert_eq!(taken, 4 * 4, "bodies the hand-written reader took");
    }

    fn roundtrip(frame: Frame) {
        let bytes = encode(&frame);
        let mut buf = BytesMut::from(&bytes[..]);
        let body = split_frame(&mut buf, MAX_FRAME_LEN).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(decode_body(&body).unwrap(), frame);
    }

    #[test]
    fn frames_roundtrip() {
        roundtrip(Frame::Say {
            text: "hi".into(),
            client_seq: 3,
        });
        roundtrip(Frame::Chat(Chat {
            epoch: 2,
            seq: 9,
            from: "bob".into(),
            from_id: 4,
            client_seq: 1,
            text: "héllo".into(),
            bot: None,
        }));
        roundtrip(Frame::Leave {});
        roundtrip(Frame::Hello {
            version: 2,
            name: "c".into(),
            session: 7,
            addr: None,
            resume: None,
            sign_key: None,
        });
        roundtrip(Frame::error(ErrorCode::NameTaken, "taken"));
    }

    #[test]
    fn chat_wire_shape_is_flat() {
        let bytes = encode(&Frame::Chat(Chat {
            epoch: 1,
            seq: 2,
            from: "a".into(),
            from_id: 1,
            client_seq: 5,
            text: "x".into(),
            bot: None,
        }));
        let body = std::str::from_utf8(&bytes[4..]).unwrap();
        assert_eq!(
            body,
            r#"{"type":"chat","epoch":1,"seq":2,"from":"a","from_id":1,"client_seq":5,"text":"x"}"#
        );
    }

    #[test]
    fn a_batch_counts_only_when_its_lengths_add_up() {
        let frame = |body: &[u8]| {
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(body);
            f
        };
        let two = [frame(b"{}"), frame(b"")].concat();
        let all = |b: &[u8]| batch_bodies(b).map(|i| i.map(<[u8]>::to_vec).collect::<Vec<_>>());
        assert_eq!(all(&two), Some(vec![b"{}".to_vec(), Vec::new()]));
        assert_eq!(all(b""), Some(vec![]));
        // Cut anywhere inside: a prefix or a body left short.
        for cut in 1..two.len() {
            let whole = cut == 6; // right after the first frame
            let got = batch_bodies(&two[..cut]).map(|b| b.len());
            assert_eq!(got, whole.then_some(1), "cut at {cut}");
        }
        // A length past the limit is refused even with the bytes there.
        let big = frame(&vec![b'x'; MAX_FRAME_LEN + 1]);
        assert!(batch_bodies(&big).is_none());
        let largest = frame(&vec![b'x'; MAX_FRAME_LEN]);
        assert_eq!(batch_bodies(&largest).map(|b| b.len()), Some(1));
        // A length that would run past the slice.
        assert!(batch_bodies(&[0xff, 0xff, 0xff, 0xff, b'x']).is_none());
    }

    #[test]
    fn encode_chat_matches_the_enum_encoding() {
        let texts = [
            "plain",
            "",
            "zoë \"q\"",
            "only a backslash \\ and a slash /",
            "tab\there ✓",
            "only a control \u{1f}, del \u{7f}, \u{2028} 🎉",
        ];
        for (i, text) in texts.into_iter().enumerate() {
            for bot in [None, Some("echo"), Some(texts[(i + 2) % texts.len()])] {
                let chat = Chat {
                    epoch: u64::MAX - i as u64,
                    seq: 77,
                    from: texts[(i + 1) % texts.len()].into(),
                    from_id: 0,
                    client_seq: 1 << 53,
                    text: text.into(),
                    bot: bot.map(String::from),
                };
                assert_eq!(encode_chat(&chat), encode(&Frame::Chat(chat.clone())));
            }
        }
    }

    /// Frames sharing an arena's buffers stay what they were encoded as
    /// while later frames fill the buffer, cross into a new one, escape
    /// (growing past the estimate) or outgrow a whole buffer.
    #[test]
    fn arena_frames_stay_intact_across_buffers() {
        let mut arena = FrameArena::default();
        let mut made = Vec::new();
        for i in 0..3000u64 {
            let text = match i % 7 {
                0 => "\u{1}".repeat(1 + (i as usize % 900)), // escapes to 6× its size
                1 if i % 500 == 1 => "y".repeat(FrameArena::CHUNK + 10),
                _ => "x".repeat(i as usize % 300),
            };
            let chat = Chat {
                epoch: 1,
                seq: i,
                from: "m".into(),
                from_id: 2,
                client_seq: i,
                text,
                bot: None,
            };
            made.push((encode_chat_in(&mut arena, &chat), chat));
        }
        for (bytes, chat) in &made {
            assert_eq!(*bytes, encode(&Frame::Chat(chat.clone())), "seq {}", chat.seq);
        }
    }

    #[test]
    fn entries_encode_like_their_frames() {
        let e = Entry::Joined {
            epoch: 1,
            seq: 3,
            member: crate::MemberInfo {
                id: 2,
                name: "b".into(),
                addr: Some("127.0.0.1:1".into()),
                session: 5,
                sign_key: None,
            },
        };
        assert_eq!(encode_entry(&e), encode(&e.clone().into_frame()));
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let bytes = encode(&Frame::Ping { nonce: 1 });
        let mut buf = BytesMut::from(&bytes[..3]);
        assert_eq!(split_frame(&mut buf, MAX_FRAME_LEN), Ok(None));
        buf.extend_from_slice(&bytes[3..bytes.len() - 1]);
        assert_eq!(split_frame(&mut buf, MAX_FRAME_LEN), Ok(None));
        buf.extend_from_slice(&bytes[bytes.len() - 1..]);
        assert!(split_frame(&mut buf, MAX_FRAME_LEN).unwrap().is_some());
    }

    #[test]
    fn huge_prefix_is_refused_before_allocation() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, b'{'][..]);
        let err = split_frame(&mut buf, MAX_FRAME_LEN).unwrap_err();
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn errors_are_classified() {
        assert_eq!(decode_body(b"\xff\xfe").unwrap_err(), ProtoError::BadUtf8);
        assert_eq!(decode_body(b"{nope").unwrap_err().code(), ErrorCode::BadJson);
        assert_eq!(decode_body(b"[1,2]").unwrap_err().code(), ErrorCode::BadJson);
        assert_eq!(
            decode_body(br#"{"type":"teleport"}"#).unwrap_err(),
            ProtoError::UnknownType("teleport".into())
        );
        assert_eq!(
            decode_body(br#"{"type":"say","text":5}"#).unwrap_err().code(),
            ErrorCode::BadField
        );
    }

    #[test]
    fn spoofed_from_is_ignored() {
        let f = decode_body(br#"{"type":"say","text":"x","client_seq":1,"from":"alice"}"#).unwrap();
        assert_eq!(
            f,
            Frame::Say {
                text: "x".into(),
                client_seq: 1
            }
        );
    }

    #[test]
    fn unknown_error_codes_survive() {
        let f = decode_body(br#"{"type":"error","code":"from_the_future","message":"m"}"#).unwrap();
        assert_eq!(f, Frame::error(ErrorCode::Unknown, "m"));
    }
}
