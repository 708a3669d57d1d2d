//! What a peer can prove it holds, and why that never goes backwards.
//!
//! A peer's **proof** is the latest seal it may vouch for: `(epoch, seq)`
//! of a coordinator's signature over the chain hash of its log through
//! `seq`. It is what the peer reports in a resume, and a new coordinator
//! adopts the log with the highest proof among its voters. The argument of
//! docs/PROTOCOL.md (section 11) needs two things of it:
//!
//! - a proof of epoch `G` covers at least the log `G` took over with (its
//!   `start`): a seal before that point only paces a catch-up;
//! - a proof never goes backwards, so a voter that acknowledged an entry
//!   keeps proving a log that holds it until a later reign's proof
//!   replaces it.
//!
//! A welcome makes a peer drop its undelivered entries, to be sent again by
//! the new coordinator. Those the proof covers are set aside here (an
//! [`Archive`]) instead of being forgotten: if the new coordinator dies
//! before sending them again, the peer can still hand them to the next one.

use std::collections::VecDeque;

use p2p_proto::Entry;

/// Entries our proof covers that the coordinator we follow has not sent
/// us again (yet), with their encoded sizes (a `sync` is packed by size).
#[derive(Debug)]
pub(super) struct Archive {
    /// The seq of the first entry set aside: our log agrees with the proof
    /// before it.
    from: u64,
    entries: VecDeque<(Entry, usize)>,
    /// The coordinator sent a different entry at `from`: its log and our
    /// proof part there, and only a proof of its own replaces ours.
    diverged: bool,
}

impl Archive {
    /// Sets aside `entries`, which follow on from seq `from - 1`.
    pub(super) fn new(from: u64, entries: Vec<(Entry, usize)>) -> Archive {
        Archive {
            from,
            entries: entries.into(),
            diverged: false,
        }
    }

    pub(super) fn from(&self) -> u64 {
        self.from
    }

    /// The entries set aside, from `from` on.
    pub(super) fn entries(&self) -> impl Iterator<Item = &(Entry, usize)> {
        self.entries.iter()
    }

    pub(super) fn into_entries(self) -> impl Iterator<Item = Entry> {
        self.entries.into_iter().map(|(e, _)| e)
    }

    /// Puts entries our log held just before `from` in front (a new welcome
    /// truncated further back), and compares afresh with what the new
    /// coordinator sends.
    pub(super) fn extend_front(&mut self, before: Vec<(Entry, usize)>) {
        for e in before.into_iter().rev() {
            self.from -= 1;
            self.entries.push_front(e);
        }
        self.diverged = false;
    }

    /// Our log now holds entries we can no longer compare with these.
    pub(super) fn set_diverged(&mut self) {
        self.diverged = true;
    }

    /// The coordinator sent `entry` (the next one after our log): if it is
    /// the first one set aside, our log holds it again. Returns true once
    /// every entry set aside is back in our log (the proof covers our log
    /// again and the archive can go).
    pub(super) fn sent_again(&mut self, entry: &Entry) -> bool {
        if self.diverged || entry.seq() != self.from {
            return false;
        }
        match self.entries.front() {
            Some((held, _)) if held == entry => {
                self.entries.pop_front();
                self.from += 1;
                self.entries.is_empty()
            }
            _ => {
                self.diverged = true;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_proto::Chat;

    fn chat(epoch: u64, seq: u64, text: &str) -> Entry {
        Entry::Chat(Chat {
            epoch,
            seq,
            from: "m".into(),
            from_id: 1,
            client_seq: seq,
            text: text.into(),
            bot: None,
        })
    }

    #[test]
    fn entries_sent_again_empty_the_archive() {
        let mut a = Archive::new(5, vec![(chat(1, 5, "a"), 1), (chat(1, 6, "b"), 1)]);
        assert!(!a.sent_again(&chat(1, 5, "a")));
        assert_eq!(a.from(), 6);
        assert!(a.sent_again(&chat(1, 6, "b")));
    }

    #[test]
    fn a_different_entry_keeps_the_archive_for_good() {
        let mut a = Archive::new(5, vec![(chat(1, 5, "a"), 1), (chat(1, 6, "b"), 1)]);
        assert!(!a.sent_again(&chat(2, 5, "other")));
        assert!(
            !a.sent_again(&chat(1, 6, "b")),
            "diverged: nothing matches any more"
        );
        assert_eq!((a.from(), a.entries().count()), (5, 2));
    }

    #[test]
    fn extending_the_front_compares_afresh() {
        let mut a = Archive::new(6, vec![(chat(1, 6, "b"), 1)]);
        a.set_diverged();
        a.extend_front(vec![(chat(1, 4, "x"), 1), (chat(1, 5, "a"), 1)]);
        assert_eq!(a.from(), 4);
        assert!(!a.sent_again(&chat(1, 4, "x")));
        assert!(!a.sent_again(&chat(1, 5, "a")));
        assert!(a.sent_again(&chat(1, 6, "b")));
    }
}
