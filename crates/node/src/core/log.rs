//! The delivered sequence as this node holds it: recent messages with their
//! encoded frames (so replay to a newcomer re-sends the same bytes), the
//! position reached, and each sender's highest `client_seq` (so a message
//! re-sent after a failover is recognised as a duplicate).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use p2p_proto::{encode_chat, Chat};

/// One held message and its frame, encoded once.
struct Entry {
    chat: Chat,
    frame: Bytes,
}

/// Why a message was not appended.
#[derive(Debug, PartialEq, Eq)]
pub enum Append {
    /// Appended at the end.
    Added,
    /// Already held (seq at or below the last one).
    Duplicate,
    /// Appended, but one or more seqs before it never arrived.
    AddedAfterGap { missing: u64 },
}

/// Most bytes of history a node holds (16 MiB).
pub const DEFAULT_CAP_BYTES: usize = 16 << 20;

pub struct Log {
    entries: VecDeque<Entry>,
    /// How many messages to hold; older ones are forgotten.
    cap: usize,
    /// Bytes of encoded frames held, and the most we hold (bounds memory
    /// whatever the message sizes).
    bytes: usize,
    cap_bytes: usize,
    last_seq: u64,
    last_epoch: u64,
    /// Highest client_seq sequenced per member id, for de-duplication. Kept
    /// for every sender ever seen, independent of `cap`.
    client_seq: HashMap<u64, u64>,
    /// Gaps seen while appending (should stay 0; reported in status).
    gaps: u64,
}

impl Log {
    pub fn new(cap: usize) -> Log {
        Log {
            entries: VecDeque::with_capacity(cap.min(1024)),
            cap: cap.max(1),
            bytes: 0,
            cap_bytes: DEFAULT_CAP_BYTES,
            last_seq: 0,
            last_epoch: 0,
            client_seq: HashMap::new(),
            gaps: 0,
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn last_epoch(&self) -> u64 {
        self.last_epoch
    }

    pub fn gaps(&self) -> u64 {
        self.gaps
    }

    /// Highest client_seq already sequenced for `member`.
    pub fn client_seq(&self, member: u64) -> u64 {
        self.client_seq.get(&member).copied().unwrap_or(0)
    }

    /// Highest member id that ever sent a message (ids are never reused).
    pub fn max_sender(&self) -> u64 {
        self.client_seq.keys().copied().max().unwrap_or(0)
    }

    /// Appends a message whose frame is already encoded.
    pub fn append_encoded(&mut self, chat: Chat, frame: Bytes) -> Append {
        if chat.seq <= self.last_seq {
            return Append::Duplicate;
        }
        let missing = chat.seq - self.last_seq - 1;
        if chat.client_seq > 0 {
            let hi = self.client_seq.entry(chat.from_id).or_insert(0);
            *hi = (*hi).max(chat.client_seq);
        }
        self.last_seq = chat.seq;
        self.last_epoch = chat.epoch;
        self.bytes += frame.len();
        self.entries.push_back(Entry { chat, frame });
        while self.entries.len() > self.cap || (self.bytes > self.cap_bytes && self.entries.len() > 1) {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= old.frame.len();
            }
        }
        if missing > 0 {
            self.gaps += 1;
            Append::AddedAfterGap { missing }
        } else {
            Append::Added
        }
    }

    /// Appends a message, encoding its frame.
    pub fn append(&mut self, chat: Chat) -> Append {
        if chat.seq <= self.last_seq {
            return Append::Duplicate; // no need to encode it
        }
        let frame = encode_chat(&chat);
        self.append_encoded(chat, frame)
    }

    /// The epoch of the held message at `seq`, if held.
    pub fn epoch_at(&self, seq: u64) -> Option<u64> {
        let first = self.entries.front()?.chat.seq;
        let idx = seq.checked_sub(first)? as usize;
        self.entries.get(idx).map(|e| e.chat.epoch)
    }

    /// True if a peer whose last delivered message is `(epoch, seq)` agrees
    /// with this log up to there (or we cannot tell because it is too old).
    pub fn consistent_with(&self, epoch: u64, seq: u64) -> bool {
        if seq == 0 {
            return true;
        }
        if seq > self.last_seq {
            return false;
        }
        self.epoch_at(seq).is_none_or(|e| e == epoch)
    }

    /// Frames of the held messages after `seq`, at most the last `max` of them.
    pub fn frames_after(&self, seq: u64, max: usize) -> Vec<Bytes> {
        let newer = self.entries.iter().filter(|e| e.chat.seq > seq).count();
        let skip = self.entries.len() - newer.min(max);
        self.entries.iter().skip(skip).map(|e| e.frame.clone()).collect()
    }

    /// Held messages in `from..=to`, in order.
    pub fn range(&self, from: u64, to: u64) -> impl Iterator<Item = &Chat> {
        self.entries
            .iter()
            .map(|e| &e.chat)
            .filter(move |c| c.seq >= from && c.seq <= to)
    }

    /// `[seq, epoch, hash]` of every held message, for agreement checks.
    pub fn digest(&self) -> Vec<(u64, u64, String)> {
        self.entries
            .iter()
            .map(|e| (e.chat.seq, e.chat.epoch, format!("{:016x}", hash(&e.chat))))
            .collect()
    }
}

/// FNV-1a over `from_id` (decimal), a zero byte and the text. Stable across
/// versions and easy to reimplement in any language (see docs/PROTOCOL.md).
pub fn hash(chat: &Chat) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let id = chat.from_id.to_string();
    for b in id.bytes().chain([0u8]).chain(chat.text.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(epoch: u64, seq: u64, from_id: u64, client_seq: u64) -> Chat {
        Chat {
            epoch,
            seq,
            from: format!("m{from_id}"),
            from_id,
            client_seq,
            text: format!("t{seq}"),
            bot: None,
        }
    }

    #[test]
    fn appends_dedups_and_counts_gaps() {
        let mut log = Log::new(3);
        assert_eq!(log.append(chat(1, 1, 7, 1)), Append::Added);
        assert_eq!(log.append(chat(1, 1, 7, 1)), Append::Duplicate);
        assert_eq!(log.append(chat(1, 3, 7, 2)), Append::AddedAfterGap { missing: 1 });
        assert_eq!(log.gaps(), 1);
        assert_eq!(log.client_seq(7), 2);
        assert_eq!(log.last_seq(), 3);
    }

    #[test]
    fn keeps_only_cap_and_replays_the_tail() {
        let mut log = Log::new(3);
        for s in 1..=5 {
            log.append(chat(1, s, 1, s));
        }
        assert_eq!(log.frames_after(0, 100).len(), 3);
        assert_eq!(log.frames_after(4, 100).len(), 1);
        assert_eq!(log.frames_after(0, 2).len(), 2);
        assert_eq!(log.range(4, 9).map(|c| c.seq).collect::<Vec<_>>(), vec![4, 5]);
        // Dedup state outlives the held window.
        assert_eq!(log.client_seq(1), 5);
    }

    #[test]
    fn consistency_uses_epochs() {
        let mut log = Log::new(10);
        log.append(chat(1, 1, 1, 1));
        log.append(chat(2, 2, 1, 2));
        assert!(log.consistent_with(0, 0));
        assert!(log.consistent_with(1, 1));
        assert!(log.consistent_with(2, 2));
        assert!(!log.consistent_with(1, 2));
        assert!(!log.consistent_with(1, 3));
    }
}
