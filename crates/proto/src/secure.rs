//! The trust boundary on the wire: the chat key, the mutual handshake that
//! proves both ends hold it, and sealed records. No sockets here: callers
//! feed bytes in and send what comes out (docs/PROTOCOL.md, sections 2.2 and 2.3, are
//! the byte-by-byte description, with test vectors).
//!
//! Primitives, all from well-kept crates: HMAC-SHA256 for the proofs and
//! HKDF-SHA256 for key derivation (RustCrypto `hmac`, `hkdf`, `sha2`),
//! AES-256-GCM for records (`ring`; why not ChaCha20-Poly1305 is in
//! ARCHITECTURE.md).
//!
//! - Handshake: client nonce `nc` → server nonce `ns` and proof
//!   `HMAC(Ka, "p2pchat server" ‖ nc ‖ ns)` → client proof
//!   `HMAC(Ka, "p2pchat client" ‖ nc ‖ ns)`. Fresh nonces on both sides,
//!   so a recorded handshake replayed in either direction fails.
//! - Link records (one frame, or a batch of frames): per-direction keys
//!   from `HKDF(salt = nc ‖ ns, ikm = key)`, nonce = a counter per
//!   direction.
//! - Group records (a broadcast batch, sealed once for every member): key
//!   `HKDF(ikm = key, info = "group" ‖ epoch ‖ term)` with a random `term`
//!   per coordinator term, explicit counter nonce, so a key and nonce are
//!   never reused even by two processes that believed they led one epoch.
//! - Every key changes each 2^20 records ([`GENERATION_BITS`]).

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Tag of a link record holding several length-prefixed frames (a
/// sender's batch: one seal for many small frames).
pub const LINK_BATCH: u8 = 2;
/// Bytes of the chat key.
pub const KEY_LEN: usize = 32;
/// Bytes of a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// A link record: kind byte, then the sealed frame body.
pub const LINK: u8 = 0;
/// A group record: kind byte, epoch, term, counter, then the sealed frames.
pub const GROUP: u8 = 1;
/// Bytes of a coordinator term's random id in group records.
pub const TERM_LEN: usize = 16;
/// A group record's header: kind, epoch, term, counter.
pub const GROUP_HEADER: usize = 1 + 8 + TERM_LEN + 8;
/// What sealing adds to a record (a group record's header and tag) at most.
pub const RECORD_OVERHEAD: usize = GROUP_HEADER + 16;

/// AES-256-GCM under one key.
struct Cipher(ring::aead::LessSafeKey);

impl Cipher {
    fn new(key: &[u8]) -> Cipher {
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
            .expect("an AES-256-GCM key is 32 bytes");
        Cipher(ring::aead::LessSafeKey::new(key))
    }

    /// Appends `msg` sealed (ciphertext and tag) to `out`.
    fn seal_into(&self, nonce: [u8; 12], aad: &[u8], msg: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(msg);
        self.seal_in_place(nonce, aad, out, start);
    }

    /// Seals `out[start..]` where it lies and appends the tag.
    fn seal_in_place(&self, nonce: [u8; 12], aad: &[u8], out: &mut Vec<u8>, start: usize) {
        let tag = self
            .0
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(aad),
                &mut out[start..],
            )
            .expect("AES-256-GCM seals any length we use");
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens `ct` (ciphertext and tag) where it lies; returns the length
    /// of the plaintext now at its start.
    fn open_in_place(&self, nonce: [u8; 12], aad: &[u8], ct: &mut [u8]) -> Result<usize, SecureError> {
        self.0
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(aad),
                ct,
            )
            .map(|plain| plain.len())
            .map_err(|_| SecureError::BadRecord)
    }
}

/// Why a key or a record was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecureError {
    /// The key text is not 64 hex digits.
    #[error("a chat key is 64 hexadecimal digits (32 bytes); {0}")]
    BadKey(String),
    /// A proof did not verify: the other end holds another key.
    #[error("the other end does not hold this chat's key")]
    WrongKey,
    /// A record did not open (altered, replayed, out of order, wrong key).
    #[error("a record failed to authenticate")]
    BadRecord,
    /// A handshake field is malformed.
    #[error("malformed handshake: {0}")]
    BadHandshake(String),
}

/// The chat's secret. Every connection proves it holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct ChatKey([u8; KEY_LEN]);

impl std::fmt::Debug for ChatKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatKey(id {})", self.id())
    }
}

impl ChatKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> ChatKey {
        ChatKey(bytes)
    }

    /// A new random key (from the operating system's generator).
    pub fn generate() -> ChatKey {
        ChatKey(random_bytes())
    }

    /// Parses the key file's text: 64 hex digits (surrounding whitespace
    /// allowed).
    ///
    /// # Errors
    /// [`SecureError::BadKey`] naming what is wrong.
    pub fn from_hex(text: &str) -> Result<ChatKey, SecureError> {
        let t = text.trim();
        if t.len() != 2 * KEY_LEN {
            return Err(SecureError::BadKey(format!("found {} characters", t.len())));
        }
        let bytes = from_hex(t)
            .ok_or_else(|| SecureError::BadKey("found a character that is not a hex digit".into()))?;
        let mut k = [0u8; KEY_LEN];
        k.copy_from_slice(&bytes);
        Ok(ChatKey(k))
    }

    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// A short public identifier of the key (for messages: "this chat
    /// uses key 1a2b3c4d"); reveals nothing of the key.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"p2pchat key id");
        h.update(self.0);
        to_hex(&h.finalize()[..4])
    }

    fn derive(&self, salt: &[u8], info: &[u8]) -> [u8; 32] {
        let hk = Hkdf::<Sha256>::new(Some(salt), &self.0);
        let mut out = [0u8; 32];
        hk.expand(info, &mut out)
            .expect("32 bytes is a valid HKDF output length");
        out
    }

    fn auth_key(&self) -> [u8; 32] {
        self.derive(b"p2pchat v2", b"auth")
    }

    fn proof(&self, label: &[u8], nc: &[u8; NONCE_LEN], ns: &[u8; NONCE_LEN]) -> [u8; 32] {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.auth_key()).expect("HMAC takes any key length");
        m.update(label);
        m.update(nc);
        m.update(ns);
        m.finalize().into_bytes().into()
    }

    fn verify(&self, label: &[u8], nc: &[u8; NONCE_LEN], ns: &[u8; NONCE_LEN], proof: &[u8]) -> bool {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.auth_key()).expect("HMAC takes any key length");
        m.update(label);
        m.update(nc);
        m.update(ns);
        m.verify_slice(proof).is_ok() // constant time
    }

    /// The key sealing the broadcast batches of one coordinator's term:
    /// `epoch` and a random `term` chosen when it took office (so two
    /// processes that ever believed themselves coordinator of the same
    /// epoch, or two chats sharing a key, never share a key and nonce).
    pub fn group_key(&self, epoch: u64, term: [u8; TERM_LEN]) -> GroupKey {
        GroupKey {
            epoch,
            term,
            keys: Rolling::new(Source::Group {
                key: self.clone(),
                epoch,
                term,
            }),
        }
    }
}

/// The server's answer to a client's nonce.
pub struct ServerHello {
    pub nonce: [u8; NONCE_LEN],
    pub proof: [u8; 32],
}

/// The server's side of a handshake, between its answer and the client's
/// proof.
pub struct ServerHandshake {
    key: ChatKey,
    nc: [u8; NONCE_LEN],
    ns: [u8; NONCE_LEN],
}

impl ServerHandshake {
    /// Answers a client's nonce with our nonce and our proof.
    pub fn answer(key: &ChatKey, client_nonce: [u8; NONCE_LEN]) -> (ServerHandshake, ServerHello) {
        Self::answer_with(key, client_nonce, random_bytes())
    }

    /// [`ServerHandshake::answer`] with a chosen nonce (test vectors).
    pub fn answer_with(
        key: &ChatKey,
        nc: [u8; NONCE_LEN],
        ns: [u8; NONCE_LEN],
    ) -> (ServerHandshake, ServerHello) {
        let proof = key.proof(b"p2pchat server", &nc, &ns);
        (
            ServerHandshake {
                key: key.clone(),
                nc,
                ns,
            },
            ServerHello { nonce: ns, proof },
        )
    }

    /// Checks the client's proof; on success the link is ready.
    ///
    /// # Errors
    /// [`SecureError::WrongKey`] if the client does not hold the key.
    pub fn finish(self, client_proof: &[u8]) -> Result<Link, SecureError> {
        if !self
            .key
            .verify(b"p2pchat client", &self.nc, &self.ns, client_proof)
        {
            return Err(SecureError::WrongKey);
        }
        Ok(Link::new(&self.key, &self.nc, &self.ns, false))
    }
}

/// The client's side of a handshake.
pub struct ClientHandshake {
    key: ChatKey,
    nc: [u8; NONCE_LEN],
}

impl ClientHandshake {
    /// Starts a handshake; send the returned nonce.
    pub fn start(key: &ChatKey) -> (ClientHandshake, [u8; NONCE_LEN]) {
        Self::start_with(key, random_bytes())
    }

    /// [`ClientHandshake::start`] with a chosen nonce (test vectors).
    pub fn start_with(key: &ChatKey, nc: [u8; NONCE_LEN]) -> (ClientHandshake, [u8; NONCE_LEN]) {
        (ClientHandshake { key: key.clone(), nc }, nc)
    }

    /// Checks the server's proof; returns our proof to send and the link.
    ///
    /// # Errors
    /// [`SecureError::WrongKey`] if the server does not hold the key.
    pub fn finish(
        self,
        server_nonce: [u8; NONCE_LEN],
        server_proof: &[u8],
    ) -> Result<([u8; 32], Link), SecureError> {
        if !self
            .key
            .verify(b"p2pchat server", &self.nc, &server_nonce, server_proof)
        {
            return Err(SecureError::WrongKey);
        }
        let proof = self.key.proof(b"p2pchat client", &self.nc, &server_nonce);
        Ok((proof, Link::new(&self.key, &self.nc, &server_nonce, true)))
    }
}

/// An authenticated connection's ciphers: one per direction, nonces
/// counting up from 0, plus the chat key for group records.
pub struct Link {
    pub send: Sealer,
    pub recv: Opener,
}

impl Link {
    fn new(key: &ChatKey, nc: &[u8; NONCE_LEN], ns: &[u8; NONCE_LEN], client: bool) -> Link {
        let mut salt = nc.to_vec();
        salt.extend_from_slice(ns);
        let (prk, _) = Hkdf::<Sha256>::extract(Some(&salt), &key.0);
        let prk: [u8; 32] = prk.into();
        // Half 0 of each generation's key material seals client → server.
        let (send, recv) = if client { (0, 1) } else { (1, 0) };
        Link {
            send: Sealer {
                keys: Rolling::new(Source::Link { prk, half: send }),
                counter: 0,
            },
            recv: Opener {
                keys: Rolling::new(Source::Link { prk, half: recv }),
                counter: 0,
                key: key.clone(),
                group: None,
                last_group: None,
            },
        }
    }
}

/// Records sealed under one derived key: after 2^20, the next generation's
/// key takes over (`generation = counter >> 20`, on both sides). With
/// records of at most 256 KiB this keeps each AES-GCM key within the
/// amount TLS 1.3 allows one key (RFC 8446, section 5.5: 2^24.5 records of
/// 16 KiB).
pub const GENERATION_BITS: u32 = 20;

/// Where a run of record keys comes from.
#[derive(Clone)]
enum Source {
    /// One direction of a link: half `half` (0: client → server) of
    /// `HKDF-Expand(prk, "p2pchat v2 link" ‖ generation:u64be, 64)`, where
    /// `prk = HKDF-Extract(salt = nc ‖ ns, chat key)`.
    Link { prk: [u8; 32], half: usize },
    /// A coordinator term's broadcasts: `HKDF(salt = "p2pchat v2", chat
    /// key, "group" ‖ epoch:u64be ‖ term ‖ generation:u64be)`.
    Group {
        key: ChatKey,
        epoch: u64,
        term: [u8; TERM_LEN],
    },
}

impl Source {
    fn derive(&self, generation: u64) -> Cipher {
        match self {
            Source::Link { prk, half } => {
                let hk = Hkdf::<Sha256>::from_prk(prk).expect("a 32-byte PRK");
                let mut info = b"p2pchat v2 link".to_vec();
                info.extend_from_slice(&generation.to_be_bytes());
                let mut okm = [0u8; 64];
                hk.expand(&info, &mut okm)
                    .expect("64 bytes is a valid HKDF output length");
                Cipher::new(&okm[32 * half..32 * half + 32])
            }
            Source::Group { key, epoch, term } => {
                let mut info = b"group".to_vec();
                info.extend_from_slice(&epoch.to_be_bytes());
                info.extend_from_slice(term);
                info.extend_from_slice(&generation.to_be_bytes());
                Cipher::new(&key.derive(b"p2pchat v2", &info))
            }
        }
    }
}

/// The key for each record counter: one per generation, derived when the
/// counter enters it.
struct Rolling {
    source: Source,
    generation: u64,
    /// Boxed: a key schedule is ~544 bytes, and a connection's opener and
    /// sealer are moved through several task states (each move would
    /// otherwise keep its own copy in the task's memory).
    cipher: Box<Cipher>,
}

impl Rolling {
    fn new(source: Source) -> Rolling {
        Rolling {
            cipher: Box::new(source.derive(0)),
            source,
            generation: 0,
        }
    }

    fn at(&mut self, counter: u64) -> &Cipher {
        let generation = counter >> GENERATION_BITS;
        if generation != self.generation {
            *self.cipher = self.source.derive(generation);
            self.generation = generation;
        }
        &self.cipher
    }
}

fn counter_nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

/// Seals this side's link records.
pub struct Sealer {
    keys: Rolling,
    counter: u64,
}

impl Sealer {
    /// One link record for one frame body (without the length prefix).
    pub fn seal(&mut self, body: &[u8]) -> Vec<u8> {
        self.seal_tagged(LINK, body)
    }

    /// One link record for several length-prefixed frames (at most
    /// [`crate::limits::MAX_FRAME_LEN`] + 4 bytes of them), sealed once.
    pub fn seal_batch(&mut self, frames: &[u8]) -> Vec<u8> {
        self.seal_tagged(LINK_BATCH, frames)
    }

    /// [`Sealer::seal_batch`] appended to `out` with the record's 4-byte
    /// length prefix in front (what goes on the wire, in one copy).
    pub fn seal_batch_prefixed_into(&mut self, frames: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&((1 + frames.len() + 16) as u32).to_be_bytes());
        self.seal_tagged_into(LINK_BATCH, frames, out);
    }

    fn seal_tagged(&mut self, tag: u8, body: &[u8]) -> Vec<u8> {
        let mut rec = Vec::with_capacity(1 + body.len() + 16);
        self.seal_tagged_into(tag, body, &mut rec);
        rec
    }

    fn seal_tagged_into(&mut self, tag: u8, body: &[u8], out: &mut Vec<u8>) {
        let counter = self.counter;
        self.counter += 1;
        out.push(tag);
        self.keys
            .at(counter)
            .seal_into(counter_nonce(counter), &[tag], body, out);
    }
}

/// Opens the other side's records.
pub struct Opener {
    keys: Rolling,
    counter: u64,
    key: ChatKey,
    /// The group key of the last term seen.
    /// Boxed: a node's many accepted connections never receive group
    /// records, and an unboxed key would cost each of them its size.
    group: Option<Box<GroupKey>>,
    /// The last group record opened: (epoch, term, counter).
    last_group: Option<(u64, [u8; TERM_LEN], u64)>,
}

/// What a record held.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// One frame body.
    Frame(Vec<u8>),
    /// Length-prefixed frames (a broadcast batch).
    Frames(Vec<u8>),
}

impl Opener {
    /// Opens one record (its bytes after the length prefix).
    ///
    /// # Errors
    /// [`SecureError::BadRecord`] if it does not authenticate.
    pub fn open(&mut self, record: &[u8]) -> Result<Opened, SecureError> {
        let mut buf = record.to_vec();
        let (kind, plain) = self.open_in_place(&mut buf)?;
        buf.truncate(plain.end);
        buf.drain(..plain.start);
        Ok(match kind {
            Holds::Frame => Opened::Frame(buf),
            Holds::Frames => Opened::Frames(buf),
        })
    }

    /// Opens one record where it lies (no copy): returns what it holds
    /// and where in `record` the plaintext now is.
    ///
    /// # Errors
    /// [`SecureError::BadRecord`] if it does not authenticate; `record`
    /// is then garbage.
    pub fn open_in_place(
        &mut self,
        record: &mut [u8],
    ) -> Result<(Holds, std::ops::Range<usize>), SecureError> {
        let total = record.len();
        match record.first().copied() {
            Some(tag @ (LINK | LINK_BATCH)) => {
                let nonce = counter_nonce(self.counter);
                let len = self
                    .keys
                    .at(self.counter)
                    .open_in_place(nonce, &[tag], &mut record[1..])?;
                self.counter += 1;
                let kind = if tag == LINK { Holds::Frame } else { Holds::Frames };
                Ok((kind, 1..1 + len))
            }
            Some(GROUP) if total >= RECORD_OVERHEAD => {
                let header: [u8; GROUP_HEADER] = record[..GROUP_HEADER].try_into().expect("checked length");
                let epoch = u64::from_be_bytes(header[1..9].try_into().expect("8 bytes"));
                let term: [u8; TERM_LEN] = header[9..9 + TERM_LEN].try_into().expect("16 bytes");
                let counter = u64::from_be_bytes(header[9 + TERM_LEN..].try_into().expect("8 bytes"));
                // One connection hears one coordinator: its epoch never goes
                // back, one epoch has one term, and counters only go up (a
                // replayed or reordered batch is refused).
                if let Some((e, t, c)) = self.last_group {
                    let fresh = epoch > e || (epoch == e && term == t && counter > c);
                    if !fresh {
                        return Err(SecureError::BadRecord);
                    }
                }
                if self
                    .group
                    .as_ref()
                    .is_none_or(|g| g.epoch != epoch || g.term != term)
                {
                    self.group = Some(Box::new(self.key.group_key(epoch, term)));
                }
                let g = self.group.as_mut().expect("set above");
                let len = g.keys.at(counter).open_in_place(
                    counter_nonce(counter),
                    &header,
                    &mut record[GROUP_HEADER..],
                )?;
                self.last_group = Some((epoch, term, counter));
                Ok((Holds::Frames, GROUP_HEADER..GROUP_HEADER + len))
            }
            _ => Err(SecureError::BadRecord),
        }
    }
}

/// What an opened record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holds {
    /// One frame body.
    Frame,
    /// Length-prefixed frames.
    Frames,
}

/// The key of one coordinator term's broadcasts.
pub struct GroupKey {
    epoch: u64,
    term: [u8; TERM_LEN],
    keys: Rolling,
}

impl GroupKey {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// One group record: `frames` (length-prefixed frames) sealed as
    /// number `counter` of this term, which must never repeat.
    pub fn seal(&mut self, counter: u64, frames: &[u8]) -> Vec<u8> {
        let mut out = self.seal_prefixed(counter, &[frames]);
        out.drain(..4);
        out
    }

    /// [`GroupKey::seal`] of the concatenation of `parts`, with the
    /// record's own 4-byte length prefix in front: what goes on the wire,
    /// built in one buffer (the frames are copied once, then encrypted
    /// where they lie).
    pub fn seal_prefixed(&mut self, counter: u64, parts: &[&[u8]]) -> Vec<u8> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut out = Vec::with_capacity(4 + RECORD_OVERHEAD + len);
        out.extend_from_slice(&((RECORD_OVERHEAD + len) as u32).to_be_bytes());
        out.push(GROUP);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.term);
        out.extend_from_slice(&counter.to_be_bytes());
        let header: [u8; GROUP_HEADER] = out[4..].try_into().expect("the header just written");
        let start = out.len();
        for p in parts {
            out.extend_from_slice(p);
        }
        self.keys
            .at(counter)
            .seal_in_place(counter_nonce(counter), &header, &mut out, start);
        out
    }
}

/// A one-way hash of a process's secret session: the chat keeps and shows
/// only this, so nobody can come back as another member.
pub fn session_id(secret: u64) -> u64 {
    let mut h = Sha256::new();
    h.update(b"p2pchat session");
    h.update(secret.to_be_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) | 1
}

/// Random bytes from the operating system's generator.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use std::io::Read;
    let mut buf = [0u8; N];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok()
    {
        return buf;
    }
    // No /dev/urandom: mix several std-seeded hashes (not for long-term
    // keys; Linux always has /dev/urandom).
    for chunk in buf.chunks_mut(8) {
        let v = crate::random_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    buf
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Parses a hex nonce of [`NONCE_LEN`] bytes.
///
/// # Errors
/// [`SecureError::BadHandshake`] when it is not 64 hex digits.
pub fn nonce_from_hex(text: &str) -> Result<[u8; NONCE_LEN], SecureError> {
    let v = from_hex(text).filter(|v| v.len() == NONCE_LEN);
    let v = v.ok_or_else(|| SecureError::BadHandshake("a nonce is 64 hex digits".into()))?;
    let mut n = [0u8; NONCE_LEN];
    n.copy_from_slice(&v);
    Ok(n)
}

// ---- the signed log (docs/PROTOCOL.md, section 3.1) ----

/// A process's signing key (Ed25519): coordinators sign their log with it.
/// Random per process; its public half travels in `hello` and in the
/// member list.
pub struct SignKey(ed25519_dalek::SigningKey);

impl SignKey {
    /// The key of a 32-byte seed (random in a node; chosen in tests).
    pub fn from_seed(seed: [u8; 32]) -> SignKey {
        SignKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// The public key as 64 hex digits.
    pub fn public_hex(&self) -> String {
        to_hex(self.0.verifying_key().as_bytes())
    }

    /// Signs the seal of a log prefix.
    pub fn seal(&self, chat_id: &str, epoch: u64, seq: u64, hash: &[u8; 32]) -> String {
        use ed25519_dalek::Signer;
        to_hex(&self.0.sign(&seal_message(chat_id, epoch, seq, hash)).to_bytes())
    }
}

/// What a seal signs: a domain label, the chat, the signer's epoch, and
/// the chain hash of the log through `seq`.
pub fn seal_message(chat_id: &str, epoch: u64, seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    let mut m = b"p2pchat seal\0".to_vec();
    m.extend_from_slice(&(chat_id.len() as u32).to_be_bytes());
    m.extend_from_slice(chat_id.as_bytes());
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m
}

/// Checks a seal's signature under a public key (both hex).
pub fn verify_seal(
    public_hex: &str,
    chat_id: &str,
    epoch: u64,
    seq: u64,
    hash: &[u8; 32],
    sig_hex: &str,
) -> bool {
    let Some(pk) = from_hex(public_hex).and_then(|b| <[u8; 32]>::try_from(b).ok()) else {
        return false;
    };
    let Some(sig) = from_hex(sig_hex).and_then(|b| <[u8; 64]>::try_from(b).ok()) else {
        return false;
    };
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&pk) else {
        return false;
    };
    let sig = ed25519_dalek::Signature::from_bytes(&sig);
    key.verify_strict(&seal_message(chat_id, epoch, seq, hash), &sig)
        .is_ok()
}

/// Whether `text` is a well-formed public signing key (64 hex digits of a
/// valid Ed25519 point).
pub fn valid_public_key(text: &str) -> bool {
    from_hex(text)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .is_some_and(|pk| ed25519_dalek::VerifyingKey::from_bytes(&pk).is_ok())
}

/// The chain hash before the first entry of a chat.
pub const CHAIN_START: [u8; 32] = [0; 32];

/// The chain hash through an entry: SHA-256 of a label, the hash through
/// the entry before, and the entry's canonical bytes.
pub fn chain_next(prev: &[u8; 32], entry: &crate::Entry) -> [u8; 32] {
    const LABEL: &[u8] = b"p2pchat chain\0";
    thread_local! {
        // One buffer per thread, reused: the hash runs once per entry.
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        buf.clear();
        buf.extend_from_slice(LABEL);
        buf.extend_from_slice(prev);
        entry.canonical_into(buf);
        let hash = Sha256::digest(buf.as_slice()).into();
        // Do not keep a large entry's buffer for the thread's life.
        if buf.capacity() > 64 << 10 {
            *buf = Vec::new();
        }
        hash
    })
}

/// Parses a 64-hex-digit hash.
pub fn hash_from_hex(text: &str) -> Option<[u8; 32]> {
    from_hex(text).and_then(|b| <[u8; 32]>::try_from(b).ok())
}

/// The key file a node uses when none is named.
pub const DEFAULT_KEY_FILE: &str = "p2pchat.key";

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("no chat key at {0}: every node of a chat needs a copy of its key file (copy it from the node that started the chat, or pass --key-file)")]
    Missing(String),
    #[error("cannot read the chat key {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: {error}")]
    Bad { path: String, error: SecureError },
    #[error("the chat key {path} can be read by other users (mode {mode:o}); run: chmod 600 {path}")]
    Exposed { path: String, mode: u32 },
}

/// Reads a key file: 64 hex digits, readable by its owner only.
///
/// # Errors
/// [`KeyFileError`] naming the file and the fix.
pub fn read_key_file(path: &std::path::Path) -> Result<ChatKey, KeyFileError> {
    use std::io::Read;
    let shown = path.display().to_string();
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(KeyFileError::Missing(shown)),
        Err(error) => return Err(KeyFileError::Io { path: shown, error }),
    };
    let bad = |what: String| KeyFileError::Bad {
        path: shown.clone(),
        error: SecureError::BadKey(what),
    };
    if let Ok(meta) = file.metadata() {
        if !meta.is_file() {
            return Err(bad(
                "found no regular file there (give --key-file the path of the chat's key file)".into(),
            ));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyFileError::Exposed { path: shown, mode });
            }
        }
    }
    // A key file is 64 hex digits and a newline: read no more than a few
    // times that.
    const MAX_KEY_FILE: u64 = 4096;
    let mut bytes = Vec::new();
    if let Err(error) = file.take(MAX_KEY_FILE + 1).read_to_end(&mut bytes) {
        return Err(KeyFileError::Io { path: shown, error });
    }
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(bad(format!("found more than {MAX_KEY_FILE} bytes")));
    }
    let text = String::from_utf8(bytes).map_err(|_| bad("found bytes that are not text".into()))?;
    ChatKey::from_hex(&text).map_err(|error| KeyFileError::Bad { path: shown, error })
}

/// Creates a key file holding a new random key, readable by its owner
/// only; fails if the file exists (never overwrites a chat's key).
///
/// The key is written and synced under a temporary name in the same
/// directory, then linked to `path` (a link never replaces a file), so a
/// reader never finds the file empty or half written, and of two nodes
/// creating it at once exactly one succeeds.
///
/// # Errors
/// [`KeyFileError::Io`] if the file cannot be created (`AlreadyExists` if
/// it is there already).
pub fn create_key_file(path: &std::path::Path) -> Result<ChatKey, KeyFileError> {
    use std::io::Write;
    let key = ChatKey::generate();
    let io = |error| KeyFileError::Io {
        path: path.display().to_string(),
        error,
    };
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{:x}.tmp",
        std::process::id(),
        crate::random_u64()
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = opts.open(&tmp).and_then(|mut f| {
        writeln!(f, "{}", key.to_hex())?;
        f.sync_all()
    });
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    linked.map_err(io)?;
    Ok(key)
}

/// Reads the key file at `path`, or creates it with a new key when there
/// is none; `true` with the key when this call created it. Of several
/// processes doing this at once, one creates the key and the others read
/// it.
///
/// # Errors
/// [`KeyFileError`] naming the file and the fix.
pub fn read_or_create_key_file(path: &std::path::Path) -> Result<(ChatKey, bool), KeyFileError> {
    match read_key_file(path) {
        Err(KeyFileError::Missing(_)) => match create_key_file(path) {
            Ok(key) => Ok((key, true)),
            Err(KeyFileError::Io { error, .. }) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                read_key_file(path).map(|k| (k, false))
            }
            Err(e) => Err(e),
        },
        other => other.map(|k| (k, false)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> ChatKey {
        ChatKey::from_bytes([b; KEY_LEN])
    }

    fn pair(k1: &ChatKey, k2: &ChatKey) -> Result<(Link, Link), SecureError> {
        let (c, nc) = ClientHandshake::start(k1);
        let (s, hello) = ServerHandshake::answer(k2, nc);
        let (proof, client) = c.finish(hello.nonce, &hello.proof)?;
        let server = s.finish(&proof)?;
        Ok((client, server))
    }

    #[test]
    fn both_ends_prove_the_key_and_talk() {
        let (mut c, mut s) = pair(&key(7), &key(7)).unwrap();
        for i in 0..3 {
            let rec = c.send.seal(format!("hello {i}").as_bytes());
            assert_eq!(
                s.recv.open(&rec).unwrap(),
                Opened::Frame(format!("hello {i}").into_bytes())
            );
        }
        // A batch of frames sealed once opens as frames, in the same
        // counter sequence as single records.
        let batch = c.send.seal_batch(b"\x00\x00\x00\x02{}\x00\x00\x00\x02[]");
        assert_eq!(batch[0], LINK_BATCH);
        assert_eq!(
            s.recv.open(&batch).unwrap(),
            Opened::Frames(b"\x00\x00\x00\x02{}\x00\x00\x00\x02[]".to_vec())
        );
        let mut retagged = c.send.seal(b"one");
        retagged[0] = LINK_BATCH;
        assert!(s.recv.open(&retagged).is_err(), "the tag is authenticated");
        let rec = s.send.seal(b"back");
        assert_eq!(c.recv.open(&rec).unwrap(), Opened::Frame(b"back".to_vec()));
    }

    #[test]
    fn another_key_fails_on_both_sides() {
        // The client finds out from the server's proof.
        assert!(matches!(pair(&key(1), &key(2)), Err(SecureError::WrongKey)));
        // The server finds out from the client's proof.
        let (_, nc) = ClientHandshake::start(&key(1));
        let (s, hello) = ServerHandshake::answer(&key(2), nc);
        let forged = key(1).proof(b"p2pchat client", &nc, &hello.nonce);
        assert_eq!(s.finish(&forged).err(), Some(SecureError::WrongKey));
    }

    #[test]
    fn a_replayed_handshake_or_record_is_refused() {
        let k = key(9);
        let (c, nc) = ClientHandshake::start(&k);
        let (s, hello) = ServerHandshake::answer(&k, nc);
        let (proof, mut client) = c.finish(hello.nonce, &hello.proof).unwrap();
        let mut server = s.finish(&proof).unwrap();
        // The same client nonce and proof against a new server nonce fail.
        let (s2, _) = ServerHandshake::answer(&k, nc);
        assert_eq!(s2.finish(&proof).err(), Some(SecureError::WrongKey));
        // A record replayed, reordered or altered does not open.
        let r1 = client.send.seal(b"one");
        let r2 = client.send.seal(b"two");
        assert!(server.recv.open(&r2).is_err(), "out of order");
        let mut srv = server;
        assert!(srv.recv.open(&r1).is_ok());
        assert!(srv.recv.open(&r1).is_err(), "replayed");
        let mut bad = client.send.seal(b"three");
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(srv.recv.open(&bad).is_err(), "altered");
    }

    #[test]
    fn a_group_record_opens_for_every_member_of_the_chat_only() {
        let k = key(3);
        let mut g = k.group_key(5, [7; TERM_LEN]);
        let rec = g.seal(1, b"\x00\x00\x00\x02{}");
        let (_, mut a) = pair(&k, &k).unwrap();
        let (_, mut b) = pair(&k, &k).unwrap();
        for s in [&mut a, &mut b] {
            assert_eq!(
                s.recv.open(&rec).unwrap(),
                Opened::Frames(b"\x00\x00\x00\x02{}".to_vec())
            );
        }
        let other = key(4);
        let (_, mut o) = pair(&other, &other).unwrap();
        assert!(o.recv.open(&rec).is_err());
        // The header is authenticated: a record moved to another epoch,
        // term or counter fails.
        for at in [8, 9, GROUP_HEADER - 1] {
            let mut moved = rec.clone();
            moved[at] ^= 1;
            let (_, mut fresh) = pair(&k, &k).unwrap();
            assert!(fresh.recv.open(&moved).is_err(), "byte {at} altered");
        }
        // Replayed or reordered batches are refused; later ones open.
        assert!(a.recv.open(&rec).is_err(), "replayed");
        assert!(a.recv.open(&g.seal(0, b"")).is_err(), "older counter");
        assert!(a.recv.open(&g.seal(2, b"")).is_ok());
        // Another term of the same epoch on one connection is a forgery;
        // a later epoch is a new coordinator.
        assert!(a.recv.open(&k.group_key(5, [8; TERM_LEN]).seal(3, b"")).is_err());
        assert!(a.recv.open(&k.group_key(4, [7; TERM_LEN]).seal(9, b"")).is_err());
        assert!(a.recv.open(&k.group_key(6, [1; TERM_LEN]).seal(0, b"")).is_ok());
    }

    #[test]
    fn per_connection_state_stays_small() {
        // A coordinator holds one sealer and one opener per member: the
        // 10 KiB-per-member budget (docs/BENCHMARKS.md) depends on it.
        let sizes = (std::mem::size_of::<Sealer>(), std::mem::size_of::<Opener>());
        assert!(sizes.0 + sizes.1 <= 512, "sealer + opener = {sizes:?} bytes");
    }

    #[test]
    fn keys_roll_over_every_generation_on_both_sides() {
        let k = key(5);
        let (mut c, mut s) = pair(&k, &k).unwrap();
        // Around the first boundary and the one after: each record opens,
        // in order, under the key its counter selects.
        for start in [(1 << GENERATION_BITS) - 2, (2 << GENERATION_BITS) - 1] {
            c.send.counter = start;
            s.recv.counter = start;
            for i in 0..4u8 {
                let rec = c.send.seal(&[i]);
                assert_eq!(
                    s.recv.open(&rec).unwrap(),
                    Opened::Frame(vec![i]),
                    "record {start}+{i}"
                );
            }
        }
        // A record numbered 2^20 but sealed under generation 0's key (a
        // sender that never rolled over) does not open.
        let boundary = 1 << GENERATION_BITS;
        let mut wrong = vec![LINK];
        c.send
            .keys
            .source
            .derive(0)
            .seal_into(counter_nonce(boundary), &[LINK], b"x", &mut wrong);
        s.recv.counter = boundary;
        assert_eq!(s.recv.open(&wrong), Err(SecureError::BadRecord));
        let mut g = k.group_key(9, [2; TERM_LEN]);
        let (_, mut m) = pair(&k, &k).unwrap();
        for counter in [
            1,
            (1 << GENERATION_BITS) - 1,
            1 << GENERATION_BITS,
            3 << GENERATION_BITS,
        ] {
            let r = g.seal(counter, b"\x00\x00\x00\x01x");
            assert!(m.recv.open(&r).is_ok(), "group record {counter}");
        }
    }

    #[test]
    fn records_open_in_place_and_say_where_the_plaintext_is() {
        let k = key(3);
        let (mut c, mut s) = pair(&k, &k).unwrap();
        let mut rec = c.send.seal(b"hello");
        let (holds, at) = s.recv.open_in_place(&mut rec).unwrap();
        assert_eq!((holds, &rec[at]), (Holds::Frame, &b"hello"[..]));
        let mut rec = k.group_key(2, [1; TERM_LEN]).seal(1, b"\x00\x00\x00\x02{}");
        let (holds, at) = s.recv.open_in_place(&mut rec).unwrap();
        assert_eq!((holds, &rec[at]), (Holds::Frames, &b"\x00\x00\x00\x02{}"[..]));
        let mut short = vec![GROUP; RECORD_OVERHEAD - 1];
        assert_eq!(s.recv.open_in_place(&mut short), Err(SecureError::BadRecord));
        assert_eq!(s.recv.open_in_place(&mut []), Err(SecureError::BadRecord));
    }

    #[test]
    fn key_files_are_created_private_and_read_back() {
        let dir = std::env::temp_dir().join(format!("p2pchat-key-{}", crate::random_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        assert!(matches!(read_key_file(&path), Err(KeyFileError::Missing(_))));
        let k = create_key_file(&path).unwrap();
        assert_eq!(read_key_file(&path).unwrap(), k);
        // Never overwritten.
        assert!(create_key_file(&path).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = read_key_file(&path).unwrap_err().to_string();
            assert!(e.contains("chmod 600"), "{e}");
        }
        std::fs::write(dir.join("bad"), "xyz").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join("bad"), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let e = read_key_file(&dir.join("bad")).unwrap_err().to_string();
        assert!(e.contains("64 hexadecimal digits") && e.contains("bad"), "{e}");
        // Not text, far too long, not a file: said, and read no further
        // than the limit (a path to /dev/zero was read without end).
        let private = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            p
        };
        let cases = [
            (private("latin1", b"caf\xe9"), "not text"),
            (private("long", &[b'a'; 5000]), "more than 4096 bytes"),
            (dir.clone(), "no regular file"),
            #[cfg(unix)]
            (std::path::PathBuf::from("/dev/zero"), "no regular file"),
        ];
        for (path, want) in cases {
            let e = read_key_file(&path).unwrap_err().to_string();
            assert!(e.contains(want), "{}: {e}", path.display());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nodes_starting_a_chat_together_share_one_key() {
        // Several processes starting a chat in one directory at once: one
        // creates the key, the others read that key, and nobody meanwhile
        // finds the file there but empty (before the key was linked in
        // whole, a reader between the creation and the write refused it).
        let dir = std::env::temp_dir().join(format!("p2pchat-key-race-{}", crate::random_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        for round in 0..20 {
            let path = dir.join(format!("k{round}"));
            let start = std::sync::Barrier::new(8);
            let results: Vec<_> = std::thread::scope(|s| {
                let workers: Vec<_> = (0..8)
                    .map(|i| {
                        let (path, start) = (&path, &start);
                        s.spawn(move || {
                            start.wait();
                            if i % 2 == 0 {
                                read_or_create_key_file(path).map_err(|e| e.to_string())
                            } else {
                                // A node joining: it reads until the file is
                                // there, and must never find it unreadable.
                                loop {
                                    match read_key_file(path) {
                                        Err(KeyFileError::Missing(_)) => std::thread::yield_now(),
                                        r => break r.map(|k| (k, false)).map_err(|e| e.to_string()),
                                    }
                                }
                            }
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().unwrap()).collect()
            });
            let results: Vec<_> = results.into_iter().collect::<Result<_, _>>().unwrap();
            assert_eq!(
                results.iter().filter(|(_, created)| *created).count(),
                1,
                "round {round}"
            );
            assert!(
                results.iter().all(|(k, _)| *k == results[0].0),
                "round {round}: one key"
            );
            let names: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names.len(), round + 1, "no temporary file left: {names:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_parse_from_hex_and_say_what_is_wrong() {
        let k = ChatKey::generate();
        assert_eq!(ChatKey::from_hex(&format!(" {}\n", k.to_hex())).unwrap(), k);
        assert!(ChatKey::from_hex("abc")
            .unwrap_err()
            .to_string()
            .contains("found 3 characters"));
        assert!(ChatKey::from_hex(&"g".repeat(64)).is_err());
        assert_eq!(k.id().len(), 8);
        assert_ne!(session_id(1), session_id(2));
    }

    /// The vectors printed in docs/PROTOCOL.md, section 2.
    #[test]
    fn test_vectors() {
        let k = ChatKey::from_bytes(core::array::from_fn(|i| i as u8));
        let nc = [0x11; NONCE_LEN];
        let ns = [0x22; NONCE_LEN];
        let (c, _) = ClientHandshake::start_with(&k, nc);
        let (s, hello) = ServerHandshake::answer_with(&k, nc, ns);
        let (proof, mut client) = c.finish(ns, &hello.proof).unwrap();
        let _server = s.finish(&proof).unwrap();
        // Computed independently (Python: hmac, hashlib, cryptography).
        assert_eq!(k.id(), "66de623c");
        assert_eq!(
            to_hex(&hello.proof),
            "1868400e7d92ab7f3a6dbee60e39b657819215c2eb1dc3f619877a4338c549a5"
        );
        assert_eq!(
            to_hex(&proof),
            "cd8b6515be2e780e5983fcca65bd4bbf967cc5df5b8d56ec3652362a8fc47831"
        );
        assert_eq!(
            to_hex(&client.send.seal(b"{}")),
            "008b26c3ca1000e20809150dd175560d748746"
        );
        assert_eq!(
            to_hex(&client.send.seal_batch(b"\x00\x00\x00\x02{}\x00\x00\x00\x02{}")),
            "0277b5be3876c85fd467997be989b6018aec91b282ce711ca333537e86"
        );
        // The next key generation starts at record 2^20.
        client.send.counter = 1 << GENERATION_BITS;
        assert_eq!(
            to_hex(&client.send.seal(b"{}")),
            "0010738767db9a1dce944a286065f56d2fbf57"
        );
        let mut g = k.group_key(1, [0x33; TERM_LEN]);
        assert_eq!(
            to_hex(&g.seal(2, b"{}")),
            "010000000000000001333333333333333333333333333333330000000000000002aa7d85ff95dfc310eaac92b96f20b8b8f553"
        );
        assert_eq!(
            to_hex(&g.seal(1 << GENERATION_BITS, b"{}")),
            "010000000000000001333333333333333333333333333333330000000000100000fbcf8fe3d94d0c85753afa4ea11f6fa27b6f"
        );
        // The wire form: the same record after its length, however the
        // frames come split.
        let whole = g.seal(2, b"\x00\x00\x00\x02{}\x00\x00\x00\x01x");
        let parts = g.seal_prefixed(2, &[b"\x00\x00\x00\x02{", b"}\x00\x00", b"\x00\x01x"]);
        assert_eq!(parts[..4], (whole.len() as u32).to_be_bytes());
        assert_eq!(parts[4..], whole[..]);
        assert_eq!(session_id(42), 13622300530942496755);
        // The chain hash (section 3.1) over a chat message, then a join.
        let chat = crate::Entry::Chat(crate::Chat {
            epoch: 1,
            seq: 1,
            from: "alice".into(),
            from_id: 1,
            client_seq: 7,
            text: "h\u{e9}llo".into(),
            bot: None,
        });
        let joined = crate::Entry::Joined {
            epoch: 1,
            seq: 2,
            member: crate::MemberInfo {
                id: 2,
                name: "bob".into(),
                addr: Some("127.0.0.1:7102".into()),
                session: 9,
                sign_key: None,
            },
        };
        let h1 = chain_next(&CHAIN_START, &chat);
        assert_eq!(
            to_hex(&h1),
            "1a0c473a17b1ab948654bd536a48c4f25b15c4e5db9ed10df20414f6efa63c48"
        );
        assert_eq!(
            to_hex(&chain_next(&h1, &joined)),
            "43beae5dba327d26af374cef4d5f2a020892c5d0f2255e9153471922b06253cc"
        );
    }
}
