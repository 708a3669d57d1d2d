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

    /// The member a process session belongs to (whatever id the process
    /// itself believes it has).
    pub fn member_by_session(&self, session: u64) -> Option<&MemberInfo> {
        self.members.iter().find(|m| m.session == session)
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
    /// which may coordinate one day) sender records, packed by encoded size
    /// so every frame stays under [`limits::MAX_FRAME_LEN`] whatever the
    /// names, addresses and plugin configs (the first frame also carries
    /// the voters and the plugin set); the last one has `last: true`.
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
        // Frame 0 carries the voters and plugins; members, then sender
        // records, fill each frame up to the budget.
        let header = |i: usize, last: bool, members, seen| Frame::State {
            at,
            last,
            members,
            seen,
            voters: (i == 0).then(|| self.voters.clone()),
            prev_voters: (i == 0).then(|| self.prev_voters.clone()),
            voters_seq: (i == 0).then_some(self.voters_seq),
            next_id: (i == 0).then_some(self.next_id),
            plugins: (i == 0).then(|| self.plugins.clone()),
        };
        let mut frames = Vec::new();
        let (mut members, mut records) = (Vec::new(), Vec::new());
        let mut used = encoded_len(&header(0, false, Vec::new(), Vec::new()));
        let mut items = self.members.iter().map(Ok).chain(seen.iter().map(Err));
        for item in items.by_ref() {
            let cost = match item {
                Ok(m) => encoded_len(m),
                Err(s) => encoded_len(s),
            };
            if used + cost > STATE_FRAME_BUDGET && !(members.is_empty() && records.is_empty()) {
                let i = frames.len();
                frames.push(header(
                    i,
                    false,
                    std::mem::take(&mut members),
                    std::mem::take(&mut records),
                ));
                used = encoded_len(&header(i + 1, false, Vec::new(), Vec::new()));
            }
            used += cost;
            match item {
                Ok(m) => members.push(m.clone()),
                Err(s) => records.push(*s),
            }
        }
        frames.push(header(frames.len(), true, members, records));
        frames
    }
}

/// Bytes a `state` frame may take: the frame limit less room for the
/// encoding's own overhead around it (the type tag, `at`, `last`).
const STATE_FRAME_BUDGET: usize = limits::MAX_FRAME_LEN - 1024;

/// Bytes one value adds to a JSON frame (its encoding and a comma).
pub(super) fn encoded_len<T: serde::Serialize>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX / 4, |b| b.len() + 1)
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
    /// Takes one `state` frame; returns the whole state after the last one.
    ///
    /// # Errors
    /// A sentence if the frames are inconsistent or too many, or `frame` is
    /// not a `state` frame.
    pub fn add(&mut self, chat_id: &str, frame: Frame) -> Result<Option<ChatState>, String> {
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
        } = frame
        else {
            return Err(format!("a {} frame among the state frames", frame.kind()));
        };
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
        state.next_id = state.next_id.max(state.max_id().saturating_add(1));
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

    /// A member with every field at its longest.
    fn big_member(id: u64) -> MemberInfo {
        let name = format!("{id:0>32}");
        let port = ":65535";
        let host = format!("h{id}-{}", "x".repeat(limits::MAX_ADDR_LEN));
        MemberInfo {
            // Twenty digits, as long as an id gets.
            id: 10_000_000_000_000_000_000 + id,
            name,
            addr: Some(format!("{}{port}", &host[..limits::MAX_ADDR_LEN - port.len()])),
            session: u64::MAX - id,
            sign_key: Some("f".repeat(64)),
        }
    }

    #[test]
    fn state_round_trips_through_frames_packed_under_the_limit() {
        let small = ChatState::new_chat("c".into(), member(1), vec![]);
        assert_eq!(small.to_frames(1, true).len(), 1, "a small chat needs one frame");

        // The largest state the limits allow: every member, sender record,
        // voter and plugin at its longest.
        let plugins: Vec<PluginRef> = (0..limits::MAX_PLUGINS)
            .map(|i| PluginRef {
                name: format!("{i:_>32}"),
                // Quotes double when the JSON text is escaped into a string.
                config: format!(
                    "{{\"k\":\"{}\"}}",
                    "\\\"".repeat(limits::MAX_PLUGIN_CONFIG / 2 - 8)
                ),
            })
            .collect();
        let mut s = ChatState::new_chat("c".into(), big_member(0), plugins);
        for i in 1..limits::MAX_MEMBERS as u64 {
            let member = big_member(i);
            s.seen.insert(
                member.id,
                SeenRec {
                    session: u64::MAX,
                    client_seq: u64::MAX,
                    touched: 0,
                },
            );
            s.members.push(member);
        }
        s.members.sort_by_key(|m| m.id);
        s.voters = s.members.iter().map(|m| m.id).collect();
        s.prev_voters = s.voters.clone();
        s.next_id = s.max_id() + 1;
        let frames = s.to_frames(u64::MAX, true);
        assert!(frames.len() > 1 && frames.len() <= MAX_STATE_FRAMES);
        let mut loader = StateLoader::default();
        let mut got = None;
        for f in frames {
            let encoded = p2p_proto::encode(&f);
            assert!(
                encoded.len() <= limits::MAX_FRAME_LEN,
                "a state frame of {} bytes",
                encoded.len()
            );
            got = loader.add("c", f).unwrap();
        }
        let mut got = got.expect("complete");
        for r in got.seen.values_mut() {
            r.touched = 0;
        }
        let mut want = s.clone();
        for r in want.seen.values_mut() {
            r.touched = 0;
        }
        assert!(
            got == want,
            "the state changed on the way: {} members, next id {}, {} plugins",
            got.members.len(),
            got.next_id,
            got.plugins.len()
        );
    }

    #[test]
    fn a_loader_refuses_a_frame_that_is_not_state() {
        let s = ChatState::new_chat("c".into(), member(1), vec![]);
        let mut frames = s.to_frames(0, true).into_iter();
        let mut loader = StateLoader::default();
        let err = loader.add("c", Frame::Ping { nonce: 1 }).unwrap_err();
        assert!(err.contains("ping"), "{err}");
        // The refused frame does not count: the state still loads.
        let got = loader.add("c", frames.next().expect("one frame")).unwrap();
        assert_eq!(got.map(|g| g.voters), Some(vec![1]));
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
