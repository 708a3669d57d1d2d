//! What the chat *is* at some point of its log: the members in join order,
//! the voters, the plugin set, and each sender's highest `client_seq`. It
//! changes only by applying log entries, so every node that applied the
//! same entries holds the same state. Also the quorum rule.

use std::collections::{BTreeMap, BTreeSet};

use p2p_proto::{limits, Entry, Frame, MemberInfo, PluginRef, Seen};

/// Most voters a chat has; further peers stay non-voting members (a
/// larger quorum costs every message an acknowledgement from more peers).
pub const MAX_VOTERS: usize = 7;
/// Sender records kept for members that left (so one that comes back with
/// the same session keeps its id and its de-duplication state).
const GONE_KEPT: usize = 1024;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatState {
    /// Random identity of the chat, fixed when it started.
    pub chat_id: String,
    /// Members in join order (ascending id).
    pub members: Vec<MemberInfo>,
    /// Voting members (ascending id).
    pub voters: Vec<u64>,
    /// The voters before the last change: until a change is known to be in
    /// force everywhere, elections need a quorum of both.
    pub prev_voters: Vec<u64>,
    /// Seq of the entry that set `voters` (0: since the chat started).
    pub voters_seq: u64,
    pub plugins: Vec<PluginRef>,
    /// The next member id to hand out: ids are never given twice.
    pub next_id: u64,
    /// Per member id (current or gone): session and highest client_seq.
    pub seen: BTreeMap<u64, SeenRec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenRec {
    pub session: u64,
    pub client_seq: u64,
    /// Seq of the last change, to forget the oldest records of gone members.
    pub touched: u64,
}

impl ChatState {
    /// The state of a chat just started by `me`.
    pub fn new_chat(chat_id: String, me: MemberInfo, plugins: Vec<PluginRef>) -> ChatState {
        let mut seen = BTreeMap::new();
        seen.insert(
            me.id,
            SeenRec {
                session: me.session,
                client_seq: 0,
                touched: 0,
            },
        );
        ChatState {
            chat_id,
            voters: vec![me.id],
            prev_voters: vec![me.id],
            voters_seq: 0,
            next_id: me.id + 1,
            members: vec![me],
            plugins,
            seen,
        }
    }

    pub fn member(&self, id: u64) -> Option<&MemberInfo> {
        self.members.iter().find(|m| m.id == id)
    }

    pub fn is_voter(&self, id: u64) -> bool {
        self.voters.binary_search(&id).is_ok()
    }

    /// Highest client_seq sequenced for member `id`.
    pub fn client_seq(&self, id: u64) -> u64 {
        self.seen.get(&id).map(|s| s.client_seq).unwrap_or(0)
    }

    /// The id a process session had, if the chat remembers it.
    pub fn id_of_session(&self, session: u64) -> Option<u64> {
        self.seen
            .iter()
            .find(|(_, s)| s.session == session)
            .map(|(id, _)| *id)
    }

    /// Highest member id ever seen (ids are never handed out twice).
    pub fn max_id(&self) -> u64 {
        let m = self.members.iter().map(|m| m.id).max().unwrap_or(0);
        m.max(self.seen.keys().next_back().copied().unwrap_or(0))
    }

    /// Every voter of the current and the previous voter sets, in join order.
    pub fn all_voters(&self) -> Vec<u64> {
        let set: BTreeSet<u64> = self.voters.iter().chain(&self.prev_voters).copied().collect();
        set.into_iter().collect()
    }

    /// The voter sets an election must win a quorum of: the current one,
    /// and the previous one unless the last change (at `voters_seq`) is
    /// known to be in force (`stable`).
    pub fn election_configs(&self, stable: u64) -> Vec<&[u64]> {
        if self.prev_voters == self.voters || self.voters_seq <= stable {
            vec![&self.voters]
        } else {
            vec![&self.voters, &self.prev_voters]
        }
    }

    /// Applies one entry.
    pub fn apply(&mut self, entry: &Entry) {
        match entry {
            Entry::Chat(c) => {
                if c.from_id != 0 && c.client_seq > 0 {
                    if let Some(rec) = self.seen.get_mut(&c.from_id) {
                        rec.client_seq = rec.client_seq.max(c.client_seq);
                        rec.touched = c.seq;
                    }
                }
            }
            Entry::Joined { seq, member, .. } => {
                self.next_id = self.next_id.max(member.id + 1);
                if self.member(member.id).is_none() {
                    let at = self.members.partition_point(|m| m.id < member.id);
                    self.members.insert(at, member.clone());
                }
                let rec = self.seen.entry(member.id).or_insert(SeenRec {
                    session: member.session,
                    client_seq: 0,
                    touched: *seq,
                });
                if rec.session != member.session {
                    *rec = SeenRec {
                        session: member.session,
                        client_seq: 0,
                        touched: *seq,
                    };
                }
                rec.touched = *seq;
            }
            Entry::Left { seq, id, .. } => {
                self.members.retain(|m| m.id != *id);
                if let Some(rec) = self.seen.get_mut(id) {
                    rec.touched = *seq;
                }
                self.forget_old_gone();
            }
            Entry::Voters { seq, set, .. } => {
                self.prev_voters = std::mem::replace(&mut self.voters, set.clone());
                self.voters_seq = *seq;
            }
            Entry::Plugins { set, .. } => self.plugins = set.clone(),
        }
    }

    fn forget_old_gone(&mut self) {
        let members: BTreeSet<u64> = self.members.iter().map(|m| m.id).collect();
        let mut gone: Vec<(u64, u64)> = self
            .seen
            .iter()
            .filter(|(id, _)| !members.contains(id))
            .map(|(id, s)| (s.touched, *id))
            .collect();
        if gone.len() <= GONE_KEPT {
            return;
        }
        gone.sort_unstable();
        for (_, id) in &gone[..gone.len() - GONE_KEPT] {
            self.seen.remove(id);
        }
    }

    /// The state as `state` frames: members and (with `seen`, for peers,
    /// which may coordinate one day) sender records, in chunks that each
    /// fit the frame limit; the last one has `last: true`.
    pub fn to_frames(&self, at: u64, seen: bool) -> Vec<Frame> {
        let seen: Vec<Seen> = if !seen {
            Vec::new()
        } else {
            self.seen
                .iter()
                .map(|(id, s)| Seen {
                    id: *id,
                    session: s.session,
                    client_seq: s.client_seq,
                })
                .collect()
        };
        let member_chunks: Vec<&[MemberInfo]> =
            self.members.chunks(limits::STATE_MEMBERS_PER_FRAME).collect();
        let seen_chunks: Vec<&[Seen]> = seen.chunks(limits::STATE_SEEN_PER_FRAME).collect();
        let n = member_chunks.len().max(seen_chunks.len()).max(1);
        (0..n)
            .map(|i| Frame::State {
                at,
                last: i + 1 == n,
                members: member_chunks.get(i).map(|c| c.to_vec()).unwrap_or_default(),
                seen: seen_chunks.get(i).map(|c| c.to_vec()).unwrap_or_default(),
                voters: (i == 0).then(|| self.voters.clone()),
                prev_voters: (i == 0).then(|| self.prev_voters.clone()),
                voters_seq: (i == 0).then_some(self.voters_seq),
                next_id: (i == 0).then_some(self.next_id),
                plugins: (i == 0).then(|| self.plugins.clone()),
            })
            .collect()
    }
}

/// Collects `state` frames until the last one.
#[derive(Debug, Default)]
pub struct StateLoader {
    state: ChatState,
    chunks: usize,
}

/// Most `state` frames a loader accepts (a bound on what a peer can make
/// us hold).
const MAX_STATE_FRAMES: usize = 64;

impl StateLoader {
    /// Takes one `state` frame's fields; returns the whole state after the
    /// last one.
    ///
    /// # Errors
    /// A sentence if the frames are inconsistent or too many.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        chat_id: &str,
        last: bool,
        members: Vec<MemberInfo>,
        seen: Vec<Seen>,
        voters: Option<Vec<u64>>,
        prev_voters: Option<Vec<u64>>,
        voters_seq: Option<u64>,
        next_id: Option<u64>,
        plugins: Option<Vec<PluginRef>>,
    ) -> Result<Option<ChatState>, String> {
        self.chunks += 1;
        if self.chunks > MAX_STATE_FRAMES {
            return Err("too many state frames".into());
        }
        let first = self.chunks == 1;
        if first != voters.is_some() || first != plugins.is_some() {
            return Err("voters and plugins belong in the first state frame only".into());
        }
        if let Some(v) = voters {
            self.state.voters = sorted(v);
        }
        if let Some(v) = prev_voters {
            self.state.prev_voters = sorted(v);
        }
        if let Some(s) = voters_seq {
            self.state.voters_seq = s;
        }
        if let Some(n) = next_id {
            self.state.next_id = n;
        }
        if let Some(p) = plugins {
            self.state.plugins = p;
        }
        for m in members {
            if limits::check_name(&m.name).is_err()
                || m.addr.as_deref().is_some_and(|a| limits::check_addr(a).is_err())
            {
                return Err(format!("member {} in the state is invalid", m.id));
            }
            self.state.members.push(m);
        }
        for s in seen {
            self.state.seen.insert(
                s.id,
                SeenRec {
                    session: s.session,
                    client_seq: s.client_seq,
                    touched: 0,
                },
            );
        }
        if !last {
            return Ok(None);
        }
        let mut state = std::mem::take(&mut self.state);
        state.chat_id = chat_id.to_string();
        state.members.sort_by_key(|m| m.id);
        state.members.dedup_by_key(|m| m.id);
        state.next_id = state.next_id.max(state.max_id() + 1);
        if state.members.len() > limits::MAX_MEMBERS || state.voters.is_empty() {
            return Err("the state has no voters or too many members".into());
        }
        if state.prev_voters.is_empty() {
            state.prev_voters = state.voters.clone();
        }
        Ok(Some(state))
    }
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v.dedup();
    v
}

/// The quorum rule. `yes` are the voters that agree (acknowledged, or
/// voted), `dead` the ones proven dead. A quorum of `config` is more than
/// half of it, or exactly half when every other voter is proven dead: any
/// two quorums share a live voter, and every quorum shares one with every
/// majority (a message is committed by a majority).
pub fn is_quorum(config: &[u64], yes: &BTreeSet<u64>, dead: &BTreeSet<u64>) -> bool {
    let n = config.len();
    if n == 0 {
        return false;
    }
    let agree = config.iter().filter(|v| yes.contains(v)).count();
    if 2 * agree > n {
        return true;
    }
    agree > 0 && 2 * agree == n && config.iter().all(|v| yes.contains(v) || dead.contains(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    #[test]
    fn quorum_is_a_majority_or_half_with_the_rest_proven_dead() {
        let c = [1, 2, 3, 4, 5];
        assert!(is_quorum(&c, &set(&[1, 2, 3]), &set(&[])));
        assert!(
            !is_quorum(&c, &set(&[1, 2]), &set(&[3, 4, 5])),
            "two of five is never enough"
        );
        let even = [1, 2];
        assert!(
            !is_quorum(&even, &set(&[2]), &set(&[])),
            "the other may only be paused"
        );
        assert!(
            is_quorum(&even, &set(&[2]), &set(&[1])),
            "the lone survivor of two"
        );
        let four = [1, 2, 3, 4];
        assert!(is_quorum(&four, &set(&[3, 4]), &set(&[1, 2])));
        assert!(!is_quorum(&four, &set(&[3, 4]), &set(&[1])));
        assert!(!is_quorum(&[], &set(&[1]), &set(&[])));
        assert!(is_quorum(&[7], &set(&[7]), &set(&[])));
    }

    fn member(id: u64) -> MemberInfo {
        MemberInfo {
            id,
            name: format!("m{id}"),
            addr: Some(format!("127.0.0.1:{}", 7000 + id)),
            session: 100 + id,
            sign_key: None,
        }
    }

    #[test]
    fn state_round_trips_through_chunked_frames() {
        let mut s = ChatState::new_chat("c".into(), member(1), vec![]);
        for id in 2..=(limits::STATE_MEMBERS_PER_FRAME as u64 + 5) {
            s.apply(&Entry::Joined {
                epoch: 1,
                seq: id,
                member: member(id),
            });
        }
        s.apply(&Entry::Voters {
            epoch: 1,
            seq: 999,
            set: vec![1, 2],
        });
        assert_eq!(
            s.to_frames(999, false).len(),
            2,
            "members alone need two frames too"
        );
        let frames = s.to_frames(999, true);
        assert_eq!(frames.len(), 2);
        let mut loader = StateLoader::default();
        let mut got = None;
        for f in frames {
            let encoded = p2p_proto::encode(&f);
            assert!(encoded.len() < limits::MAX_FRAME_LEN);
            let Frame::State {
                last,
                members,
                seen,
                voters,
                prev_voters,
                voters_seq,
                next_id,
                plugins,
                ..
            } = f
            else {
                unreachable!()
            };
            got = loader
                .add(
                    "c",
                    last,
                    members,
                    seen,
                    voters,
                    prev_voters,
                    voters_seq,
                    next_id,
                    plugins,
                )
                .unwrap();
        }
        let mut got = got.expect("complete");
        for r in got.seen.values_mut() {
            r.touched = 0;
        }
        let mut want = s.clone();
        for r in want.seen.values_mut() {
            r.touched = 0;
        }
        assert_eq!(got, want);
    }

    #[test]
    fn a_session_keeps_its_id_and_dedup_record_after_leaving() {
        let mut s = ChatState::new_chat("c".into(), member(1), vec![]);
        s.apply(&Entry::Joined {
            epoch: 1,
            seq: 1,
            member: member(2),
        });
        s.apply(&Entry::Chat(p2p_proto::Chat {
            epoch: 1,
            seq: 2,
            from: "m2".into(),
            from_id: 2,
            client_seq: 7,
            text: "x".into(),
            bot: None,
        }));
        s.apply(&Entry::Left {
            epoch: 1,
            seq: 3,
            id: 2,
            name: "m2".into(),
            reason: "left".into(),
        });
        assert_eq!(s.id_of_session(102), Some(2));
        assert_eq!(s.client_seq(2), 7);
        assert!(s.member(2).is_none());
    }
}
