//! The log as this node holds it: recent entries with their encoded frames
//! (replay re-sends the same bytes), where it starts, how far it is known
//! committed and how far this node has delivered it.
//!
//! Entries past `commit` are tentative: a new coordinator may replace them.
//! Entries up to `applied` were delivered here and are never replaced.

use std::collections::VecDeque;

use bytes::Bytes;
use p2p_proto::{encode_entry, Entry};

/// One held entry, its frame (encoded once), and the chain hash through
/// it (None when the chain before it is unknown).
struct Held {
    entry: Entry,
    frame: Bytes,
    chain: Option<[u8; 32]>,
}

/// Most bytes of history a node holds (16 MiB).
pub const DEFAULT_CAP_BYTES: usize = 16 << 20;

pub struct Log {
    entries: VecDeque<Held>,
    /// The seq just before the first held entry.
    base: u64,
    /// The chain hash through `base` (None: unknown, e.g. after a hole
    /// until a welcome says it).
    base_chain: Option<[u8; 32]>,
    last: u64,
    /// Epoch of the coordinator whose log this is (the epoch this node last
    /// accepted a `welcome` for, or coordinates). With `last` it says how
    /// up to date the log is when a new coordinator picks the best one.
    log_epoch: u64,
    /// Highest seq known committed (may be past `last` on a lagging member).
    commit: u64,
    /// Highest seq delivered here.
    applied: u64,
    /// How many delivered entries to hold; older ones are forgotten (never
    /// a tentative one).
    cap: usize,
    bytes: usize,
    cap_bytes: usize,
    /// Bytes of encoded entries past `commit` (the coordinator's window).
    tentative_bytes: usize,
    /// Holes seen inside the delivered sequence (should stay 0).
    gaps: u64,
}

/// Why an entry was not appended.
#[derive(Debug, PartialEq, Eq)]
pub enum AppendError {
    /// Already held (seq at or below the last one).
    Duplicate,
    /// Entries between the last held one and this one are missing.
    Gap { expected: u64 },
}

impl Log {
    pub fn new(cap: usize) -> Log {
        Log {
            entries: VecDeque::with_capacity(cap.min(1024)),
            base: 0,
            base_chain: Some(p2p_proto::secure::CHAIN_START),
            last: 0,
            log_epoch: 0,
            commit: 0,
            applied: 0,
            cap: cap.max(1),
            bytes: 0,
            cap_bytes: DEFAULT_CAP_BYTES,
            tentative_bytes: 0,
            gaps: 0,
        }
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn commit(&self) -> u64 {
        self.commit
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn log_epoch(&self) -> u64 {
        self.log_epoch
    }

    pub fn set_log_epoch(&mut self, epoch: u64) {
        self.log_epoch = epoch;
    }

    pub fn gaps(&self) -> u64 {
        self.gaps
    }

    /// Bytes of the held entries past the commit point.
    pub fn tentative_bytes(&self) -> usize {
        self.tentative_bytes
    }

    /// Appends the next entry, encoding its frame.
    ///
    /// # Errors
    /// If `entry` does not come right after the last held one.
    pub fn append(&mut self, entry: Entry) -> Result<(), AppendError> {
        self.check_next(entry.seq())?;
        let frame = encode_entry(&entry);
        self.push(entry, frame);
        Ok(())
    }

    /// Appends the next entry whose frame is already encoded.
    ///
    /// # Errors
    /// If `entry` does not come right after the last held one.
    pub fn append_encoded(&mut self, entry: Entry, frame: Bytes) -> Result<(), AppendError> {
        self.check_next(entry.seq())?;
        self.push(entry, frame);
        Ok(())
    }

    fn check_next(&self, seq: u64) -> Result<(), AppendError> {
        if seq <= self.last {
            Err(AppendError::Duplicate)
        } else if seq != self.last + 1 {
            Err(AppendError::Gap {
                expected: self.last + 1,
            })
        } else {
            Ok(())
        }
    }

    fn push(&mut self, entry: Entry, frame: Bytes) {
        self.last = entry.seq();
        self.bytes += frame.len();
        if entry.seq() > self.commit {
            self.tentative_bytes += frame.len();
        }
        let prev = match self.entries.back() {
            Some(h) => h.chain,
            None => self.base_chain,
        };
        let chain = prev.map(|p| p2p_proto::secure::chain_next(&p, &entry));
        self.entries.push_back(Held { entry, frame, chain });
        self.evict();
    }

    /// The chain hash through `seq`, if known and `seq` is `base` or held.
    pub fn chain_at(&self, seq: u64) -> Option<[u8; 32]> {
        if seq == self.base {
            return self.base_chain;
        }
        self.get(seq).and_then(|h| h.chain)
    }

    /// Sets the chain hash through `base` (from a welcome), recomputing the
    /// held entries' chain.
    pub fn set_base_chain(&mut self, chain: [u8; 32]) {
        self.base_chain = Some(chain);
        let mut prev = chain;
        for h in &mut self.entries {
            prev = p2p_proto::secure::chain_next(&prev, &h.entry);
            h.chain = Some(prev);
        }
    }

    /// Forgets delivered entries beyond the caps.
    fn evict(&mut self) {
        while self.entries.len() > self.cap || (self.bytes > self.cap_bytes && self.entries.len() > 1) {
            let Some(front) = self.entries.front() else { break };
            if front.entry.seq() > self.applied {
                break; // never forget what is not delivered yet
            }
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= old.frame.len();
                self.base = old.entry.seq();
                self.base_chain = old.chain;
            }
        }
    }

    /// Drops the tentative entries after `seq` (never delivered ones).
    pub fn truncate_after(&mut self, seq: u64) {
        let keep = seq.max(self.applied);
        while self.last > keep {
            match self.entries.pop_back() {
                Some(old) => {
                    self.bytes -= old.frame.len();
                    if old.entry.seq() > self.commit {
                        self.tentative_bytes = self.tentative_bytes.saturating_sub(old.frame.len());
                    }
                    self.last = old.entry.seq() - 1;
                }
                None => {
                    self.last = keep.max(self.base);
                    break;
                }
            }
        }
        self.commit = self.commit.min(self.last.max(self.applied));
        self.recount_tentative();
    }

    fn recount_tentative(&mut self) {
        let commit = self.commit;
        self.tentative_bytes = self.sized_range(commit + 1, u64::MAX).map(|(_, n)| n).sum();
    }

    /// Starts over after a hole: the log holds nothing, and the next entry
    /// is `base + 1`. `hole` says whether entries this node should have
    /// delivered were skipped (a real gap, counted in status).
    pub fn reset(&mut self, base: u64, hole: bool) {
        // Known only if `base` is where we stand (a welcome may say it).
        self.base_chain = self.chain_at(base);
        self.entries.clear();
        self.bytes = 0;
        self.tentative_bytes = 0;
        self.base = base;
        self.last = base;
        if hole {
            self.gaps += 1;
        }
        self.applied = self.applied.max(base);
        self.commit = self.commit.max(base);
    }

    /// Raises the known commit point (it never goes down).
    pub fn set_commit(&mut self, seq: u64) {
        if seq <= self.commit {
            return;
        }
        let newly: usize = self.sized_range(self.commit + 1, seq).map(|(_, n)| n).sum();
        self.tentative_bytes = self.tentative_bytes.saturating_sub(newly);
        self.commit = seq;
    }

    /// The next entry to deliver, if it is held and committed.
    pub fn next_to_apply(&self) -> Option<(&Entry, &Bytes)> {
        let seq = self.applied + 1;
        if seq > self.commit || seq > self.last {
            return None;
        }
        self.get(seq).map(|h| (&h.entry, &h.frame))
    }

    /// Records that `seq` was delivered.
    pub fn mark_applied(&mut self, seq: u64) {
        self.applied = self.applied.max(seq);
        self.evict();
    }

    fn get(&self, seq: u64) -> Option<&Held> {
        let idx = seq.checked_sub(self.base + 1)?;
        self.entries.get(idx as usize)
    }

    #[cfg(test)]
    pub fn entry(&self, seq: u64) -> Option<&Entry> {
        self.entry_at(seq)
    }

    /// The held entry at `seq`.
    pub fn entry_at(&self, seq: u64) -> Option<&Entry> {
        self.get(seq).map(|h| &h.entry)
    }

    /// True if this log holds every entry from `seq + 1` on.
    pub fn holds_after(&self, seq: u64) -> bool {
        seq >= self.base
    }

    /// Frames of the held entries in `from..=to`.
    pub fn frames(&self, from: u64, to: u64) -> Vec<Bytes> {
        self.iter_range(from, to).map(|h| h.frame.clone()).collect()
    }

    /// Held entries in `from..=to`, in order.
    pub fn range(&self, from: u64, to: u64) -> impl DoubleEndedIterator<Item = &Entry> {
        self.iter_range(from, to).map(|h| &h.entry)
    }

    /// Held entries in `from..=to` with their encoded sizes.
    pub fn sized_range(&self, from: u64, to: u64) -> impl Iterator<Item = (&Entry, usize)> {
        self.iter_range(from, to).map(|h| (&h.entry, h.frame.len()))
    }

    fn iter_range(&self, from: u64, to: u64) -> impl DoubleEndedIterator<Item = &Held> {
        let start = from.max(self.base + 1);
        let skip = (start - (self.base + 1)) as usize;
        let take = if to < start { 0 } else { (to - start + 1) as usize };
        self.entries.iter().skip(skip).take(take)
    }

    /// `[seq, epoch, hash, type]` of the newest `max` delivered entries held.
    pub fn digest(&self, max: usize) -> Vec<p2p_proto::DigestRow> {
        let delivered: Vec<&Held> = self
            .entries
            .iter()
            .filter(|h| h.entry.seq() <= self.applied)
            .collect();
        let skip = delivered.len().saturating_sub(max);
        delivered
            .into_iter()
            .skip(skip)
            .map(|h| {
                let kind = h.entry.clone().into_frame().kind().to_string();
                (
                    h.entry.seq(),
                    h.entry.epoch(),
                    format!("{:016x}", hash(&h.entry)),
                    kind,
                )
            })
            .collect()
    }

    /// The first delivered seq held (for status), or 0.
    pub fn first_held(&self) -> u64 {
        self.entries.front().map(|h| h.entry.seq()).unwrap_or(0)
    }
}

/// FNV-1a over a canonical text of the entry: for a chat `from_id`
/// (decimal), a zero byte and the text; for the others their type name, a
/// zero byte and their fields (see docs/PROTOCOL.md). Stable across
/// versions and easy to reimplement in any language.
pub fn hash(entry: &Entry) -> u64 {
    let text = match entry {
        Entry::Chat(c) => return fnv(c.from_id.to_string().bytes().chain([0u8]).chain(c.text.bytes())),
        Entry::Joined { member, .. } => format!("joined\0{}\0{}", member.id, member.name),
        Entry::Left { id, .. } => format!("left\0{id}"),
        Entry::Voters { set, .. } => {
            let ids: Vec<String> = set.iter().map(u64::to_string).collect();
            format!("voters\0{}", ids.join(","))
        }
        Entry::Plugins { set, .. } => {
            let parts: Vec<String> = set.iter().map(|p| format!("{}={}", p.name, p.config)).collect();
            format!("plugins\0{}", parts.join("\0"))
        }
    };
    fnv(text.bytes())
}

fn fnv(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_proto::Chat;

    fn chat(epoch: u64, seq: u64) -> Entry {
        Entry::Chat(Chat {
            epoch,
            seq,
            from: "m".into(),
            from_id: 1,
            client_seq: seq,
            text: format!("t{seq}"),
            bot: None,
        })
    }

    #[test]
    fn appends_in_order_only() {
        let mut log = Log::new(10);
        assert_eq!(log.append(chat(1, 1)), Ok(()));
        assert_eq!(log.append(chat(1, 1)), Err(AppendError::Duplicate));
        assert_eq!(log.append(chat(1, 3)), Err(AppendError::Gap { expected: 2 }));
        assert_eq!(log.last(), 1);
    }

    #[test]
    fn delivers_only_committed_and_truncates_only_tentative() {
        let mut log = Log::new(10);
        for s in 1..=4 {
            log.append(chat(1, s)).unwrap();
        }
        assert!(log.next_to_apply().is_none(), "nothing committed yet");
        log.set_commit(2);
        while let Some((e, _)) = log.next_to_apply() {
            let s = e.seq();
            log.mark_applied(s);
        }
        assert_eq!(log.applied(), 2);
        assert_eq!(
            log.tentative_bytes(),
            log.sized_range(3, 4).map(|(_, n)| n).sum::<usize>()
        );
        log.truncate_after(1); // cannot drop delivered entries
        assert_eq!(log.tentative_bytes(), 0);
        assert_eq!(log.last(), 2);
        log.append(chat(2, 3)).unwrap();
        assert_eq!(log.entry(3).map(Entry::epoch), Some(2));
    }

    #[test]
    fn keeps_only_cap_delivered_entries_and_never_tentative_ones() {
        let mut log = Log::new(3);
        for s in 1..=6 {
            log.append(chat(1, s)).unwrap();
        }
        assert_eq!(log.base(), 0, "nothing delivered: everything is held");
        log.set_commit(6);
        for s in 1..=6 {
            log.mark_applied(s);
        }
        assert_eq!(log.base(), 3);
        assert_eq!(log.frames(0, 100).len(), 3);
        assert_eq!(log.range(5, 9).map(Entry::seq).collect::<Vec<_>>(), vec![5, 6]);
        assert!(log.holds_after(3) && !log.holds_after(2));
    }

    #[test]
    fn reset_starts_after_a_base_and_counts_real_holes() {
        let mut log = Log::new(10);
        log.reset(40, false);
        assert_eq!(
            (log.base(), log.last(), log.applied(), log.gaps()),
            (40, 40, 40, 0)
        );
        log.append(chat(1, 41)).unwrap();
        log.reset(90, true);
        assert_eq!(log.gaps(), 1);
    }
}
