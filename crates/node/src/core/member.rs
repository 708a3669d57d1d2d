//! The member side: joining through any peer, following the coordinator,
//! detecting its loss, and finding the next one (the earliest-joined
//! survivor, computed by every member from the same ordered list).

use std::collections::BTreeSet;

use p2p_proto::{limits, ErrorCode, Frame, MemberInfo, Resume, Role};

use super::{ConnId, Core, Event, Millis, Output, State};

/// Most redirects followed while joining before giving up (a loop guard).
const MAX_REDIRECTS: u32 = 8;
/// How long a joiner keeps retrying peers that answer "electing".
const JOIN_PATIENCE_HEARTBEATS: u64 = 50;

pub(super) struct Joining {
    candidates: Vec<String>,
    next: usize,
    pub(super) conn: Option<ConnId>,
    redirects: u32,
    /// Some peer answered but could not admit us yet (an election).
    busy_seen: bool,
    retry_at: Option<Millis>,
    give_up_at: Millis,
}

pub(super) struct Uplink {
    pub(super) conn: ConnId,
    last_heard: Millis,
    /// Replayed history frames still to come after `welcome`.
    replay_left: u32,
}

pub(super) struct Electing {
    since: Millis,
    /// Members found dead on the way, the lost coordinator first.
    dead: BTreeSet<u64>,
    /// A peer to try first: (member id or 0, address). The lost coordinator
    /// itself when the loss was only a closed connection (it may have cut
    /// just us off), or a coordinator named by a redirect or announcement.
    direct: Option<(u64, String)>,
    /// The coordinator we lost, to go back to if a successor says it lives.
    lost: Option<MemberInfo>,
    /// `coordinator_alive` answers so far: the first few are retried at
    /// once (the successor is usually a moment from noticing the loss),
    /// later ones wait a tick so a live coordinator cannot cause a spin.
    alive_replies: u32,
    /// The successor being dialled: (member id or 0 for `direct`, connection).
    target: Option<(u64, ConnId)>,
    retry_at: Option<Millis>,
}

impl Electing {
    pub(super) fn conn(&self) -> Option<ConnId> {
        self.target.map(|(_, c)| c)
    }
}

impl Core {
    /// Starts a new chat with ourselves as coordinator of epoch 1.
    pub(super) fn create(&mut self) {
        self.me.id = 1;
        self.my_ids.push(1);
        self.epoch = 1;
        self.coordinator = 1;
        self.members = vec![self.me.clone()];
        self.state = State::Coordinator(super::Coord::new(2, self.now));
        let set = self.cfg.plugins.clone();
        self.apply_plugins(set);
        self.emit(Event::Ready {
            id: 1,
            epoch: 1,
            coordinator: self.me.name.clone(),
            members: 1,
            created: true,
        });
    }

    pub(super) fn start_joining(&mut self) {
        let give_up_at = self.now + self.cfg.heartbeat_ms * JOIN_PATIENCE_HEARTBEATS;
        self.state = State::Joining(Joining {
            candidates: self.cfg.join.clone(),
            next: 0,
            conn: None,
            redirects: 0,
            busy_seen: false,
            retry_at: None,
            give_up_at,
        });
        self.join_next();
    }

    /// Dials the next join candidate, or settles what to do when none is left.
    fn join_next(&mut self) {
        let hello = self.hello(None);
        let State::Joining(j) = &mut self.state else {
            return;
        };
        if let Some(addr) = j.candidates.get(j.next).cloned() {
            j.next += 1;
            let conn = self.next_dial;
            j.conn = Some(conn);
            self.dial(&addr, &hello);
            return;
        }
        j.conn = None;
        if j.busy_seen && self.now < j.give_up_at {
            j.busy_seen = false;
            j.next = 0;
            j.retry_at = Some(self.now + self.cfg.heartbeat_ms);
            return;
        }
        let tried = j.candidates.join(", ");
        if self.cfg.create_if_alone {
            tracing::info!(%tried, "no peer answered; starting a new chat");
            self.create();
        } else {
            self.emit(Event::Error {
                code: None,
                message: format!(
                    "could not join: no peer answered at {tried}; check the addresses, or pass --create-if-alone to start a new chat"
                ),
            });
            self.state = State::Stopped;
            self.out.push(Output::Exit(2));
        }
    }

    pub(super) fn is_uplink(&self, conn: ConnId) -> bool {
        match &self.state {
            State::Joining(j) => j.conn == Some(conn),
            State::Member(u) => u.conn == conn,
            State::Electing(e) => e.conn() == Some(conn),
            _ => false,
        }
    }

    /// A frame from the coordinator, or from the peer we are dialling.
    pub(super) fn on_uplink_frame(&mut self, conn: ConnId, frame: Frame) {
        if let State::Member(u) = &mut self.state {
            u.last_heard = self.now;
        }
        match frame {
            Frame::Welcome {
                member_id,
                epoch,
                coordinator,
                members,
                replay,
                heartbeat_ms,
                plugins,
            } => {
                // The chat runs on its coordinator's heartbeat and plugin set.
                self.cfg.heartbeat_ms = heartbeat_ms.clamp(10, 60_000);
                if plugins != self.plugins {
                    self.apply_plugins(plugins);
                }
                self.on_welcome(conn, member_id, epoch, coordinator, members, replay)
            }
            Frame::Plugins { set } => {
                if set != self.plugins {
                    self.apply_plugins(set);
                }
            }
            Frame::Chat(chat) => {
                let replay = match &mut self.state {
                    State::Member(u) if u.replay_left > 0 => {
                        u.replay_left -= 1;
                        true
                    }
                    State::Member(_) => false,
                    _ => return,
                };
                self.deliver(chat, replay);
                if replay && matches!(&self.state, State::Member(u) if u.replay_left == 0) {
                    self.resend_pending(conn);
                }
            }
            Frame::Joined { member } => {
                if self.member(member.id).is_none() {
                    self.emit(Event::Joined {
                        id: member.id,
                        name: member.name.clone(),
                    });
                    self.members.push(member);
                }
            }
            Frame::Left { id, name, reason } => {
                self.emit(Event::Left {
                    id,
                    name,
                    reason: reason.clone(),
                });
                if id == self.coordinator && matches!(self.state, State::Member(_)) {
                    // The election drops it from the list (it is in `dead`).
                    self.out.push(Output::Close(conn));
                    self.start_election(format!("the coordinator {reason}"), false);
                } else {
                    self.members.retain(|m| m.id != id);
                }
            }
            Frame::Ping { nonce } => self.send(conn, &Frame::Pong { nonce }),
            Frame::SyncRequest { from, to } => {
                let to = to.min(from.saturating_add(100_000));
                let entries: Vec<_> = self.log.range(from, to).cloned().collect();
                for chunk in entries.chunks(limits::MAX_SYNC_ENTRIES) {
                    self.send(
                        conn,
                        &Frame::Sync {
                            entries: chunk.to_vec(),
                        },
                    );
                }
                self.send(conn, &Frame::Sync { entries: Vec::new() });
            }
            Frame::Rejected { client_seq, reason } => {
                self.pending.retain(|(cs, _)| *cs != client_seq);
                self.emit(Event::Rejected { client_seq, reason });
            }
            Frame::Redirect { addr, epoch } => self.on_redirect(conn, addr, epoch),
            Frame::Error { code, message } => self.on_uplink_error(conn, code, message),
            other => {
                tracing::debug!(?other, "ignoring unexpected frame from the coordinator");
            }
        }
    }

    fn on_welcome(
        &mut self,
        conn: ConnId,
        member_id: u64,
        epoch: u64,
        coordinator: u64,
        members: Vec<MemberInfo>,
        replay: u32,
    ) {
        if !members.iter().any(|m| m.id == coordinator) || !members.iter().any(|m| m.id == member_id) {
            tracing::warn!("welcome lists neither us nor its coordinator; dropping it");
            self.out.push(Output::Close(conn));
            return self.uplink_closed(conn, Some("invalid welcome".into()));
        }
        let prev = std::mem::replace(
            &mut self.state,
            State::Member(Uplink {
                conn,
                last_heard: self.now,
                replay_left: replay,
            }),
        );
        let old = std::mem::replace(&mut self.members, members);
        self.me.id = member_id;
        if !self.my_ids.contains(&member_id) {
            self.my_ids.push(member_id);
        }
        let old_epoch = std::mem::replace(&mut self.epoch, epoch);
        self.coordinator = coordinator;
        match prev {
            State::Joining(_) => self.emit(Event::Ready {
                id: member_id,
                epoch,
                coordinator: self.coordinator_name(),
                members: self.members.len(),
                created: false,
            }),
            State::Electing(e) => {
                let gone: Vec<_> = old
                    .iter()
                    .filter(|m| self.member(m.id).is_none() && !self.my_ids.contains(&m.id))
                    .map(|m| Event::Left {
                        id: m.id,
                        name: m.name.clone(),
                        reason: "disconnected".into(),
                    })
                    .collect();
                self.out.extend(gone.into_iter().map(Output::Event));
                let newcomers: Vec<_> = self
                    .members
                    .iter()
                    .filter(|m| m.id != member_id && !old.iter().any(|o| o.id == m.id))
                    .map(|m| Event::Joined {
                        id: m.id,
                        name: m.name.clone(),
                    })
                    .collect();
                self.out.extend(newcomers.into_iter().map(Output::Event));
                let same_reign = e.lost.as_ref().is_some_and(|l| l.id == coordinator) && old_epoch == epoch;
                if !same_reign {
                    self.emit(Event::Role {
                        role: Role::Member,
                        epoch,
                        coordinator: self.coordinator_name(),
                        election_ms: Some(self.now.saturating_sub(e.since)),
                    });
                }
            }
            _ => {}
        }
        if replay == 0 {
            self.resend_pending(conn);
        }
    }

    /// Sends every unacknowledged message of ours, in order. The coordinator
    /// drops the ones it already sequenced (same member, same client_seq).
    fn resend_pending(&mut self, conn: ConnId) {
        let pending = self.pending.clone();
        for (client_seq, text) in pending {
            self.send(conn, &Frame::Say { text, client_seq });
        }
    }

    fn on_redirect(&mut self, conn: ConnId, addr: String, epoch: u64) {
        self.out.push(Output::Close(conn));
        match &mut self.state {
            State::Joining(j) => {
                j.redirects += 1;
                if j.redirects > MAX_REDIRECTS {
                    j.conn = None;
                    j.next = j.candidates.len();
                    tracing::warn!("too many redirects while joining");
                    return self.join_next();
                }
                tracing::debug!(%addr, "redirected to the coordinator");
                let hello = self.hello(None);
                let conn = self.dial(&addr, &hello);
                if let State::Joining(j) = &mut self.state {
                    j.conn = Some(conn);
                }
            }
            State::Member(_) | State::Electing(_) => {
                self.follow(epoch, addr, "redirected to the coordinator");
            }
            _ => {}
        }
    }

    fn on_uplink_error(&mut self, conn: ConnId, code: p2p_proto::ErrorCode, message: String) {
        let fatal = matches!(
            code,
            ErrorCode::NameTaken
                | ErrorCode::BadName
                | ErrorCode::VersionMismatch
                | ErrorCode::TooManyMembers
        );
        self.out.push(Output::Close(conn));
        if fatal {
            self.emit(Event::Error {
                code: Some(code),
                message: format!("refused by the chat: {message}"),
            });
            self.state = State::Stopped;
            self.out.push(Output::Exit(2));
            return;
        }
        let busy = matches!(
            code,
            ErrorCode::Electing | ErrorCode::CoordinatorAlive | ErrorCode::ShuttingDown
        );
        let retry_at = self.now + self.tick_ms();
        match &mut self.state {
            State::Joining(j) => {
                j.busy_seen |= busy;
                j.conn = None;
                self.join_next();
            }
            State::Electing(e) if busy => {
                e.target = None;
                let mut now_again = false;
                if code == ErrorCode::CoordinatorAlive {
                    // The successor still hears the coordinator: go back to it.
                    if let Some(lost) = &e.lost {
                        e.dead.remove(&lost.id);
                        e.direct = Some((lost.id, lost.addr.clone()));
                    }
                    e.alive_replies += 1;
                    now_again = e.alive_replies <= 3;
                }
                if now_again {
                    self.try_successor();
                } else {
                    e.retry_at = Some(retry_at);
                }
            }
            State::Electing(_) => self.uplink_closed(conn, Some(message)),
            State::Member(_) => {
                self.emit(Event::Error {
                    code: Some(code),
                    message: format!("the coordinator dropped us: {message}; rejoining"),
                });
                let addr = self.coordinator_addr();
                self.follow(self.epoch, addr, "dropped by the coordinator");
            }
            _ => {}
        }
    }

    /// Our connection to the coordinator (or to a join/election target) ended.
    pub(super) fn uplink_closed(&mut self, conn: ConnId, reason: Option<String>) {
        match &mut self.state {
            State::Joining(j) => {
                j.conn = None;
                self.join_next();
            }
            State::Member(_) => {
                self.out.push(Output::Close(conn));
                // "disconnected (reset by peer)" reads badly inside
                // "lost the coordinator X (…)": keep only the detail.
                let why = match reason {
                    Some(r) => match r.strip_prefix("disconnected (").and_then(|r| r.strip_suffix(')')) {
                        Some(detail) => format!("connection lost: {detail}"),
                        None => r,
                    },
                    None => "connection closed".into(),
                };
                self.start_election(why, true);
            }
            State::Electing(e) => {
                if let Some((id, _)) = e.target.take() {
                    if id != 0 {
                        e.dead.insert(id);
                    }
                }
                self.try_successor();
            }
            _ => {}
        }
    }

    pub(super) fn member_tick(&mut self) {
        let now = self.now;
        let dead_after = self.heartbeat_dead_after();
        match &mut self.state {
            State::Member(u) if now.saturating_sub(u.last_heard) >= dead_after => {
                let conn = u.conn;
                self.out.push(Output::Close(conn));
                self.start_election("missed 3 heartbeats".into(), false);
            }
            State::Electing(e) if e.retry_at.is_some_and(|t| now >= t) => {
                e.retry_at = None;
                self.try_successor();
            }
            State::Joining(j) if j.retry_at.is_some_and(|t| now >= t) => {
                j.retry_at = None;
                self.join_next();
            }
            _ => {}
        }
    }

    /// The coordinator is gone: find the earliest-joined survivor. With
    /// `probe`, first check the coordinator itself: a closed connection may
    /// mean it dropped only us (a killed process refuses at once).
    pub(super) fn start_election(&mut self, reason: String, probe: bool) {
        let lost_info = self.member(self.coordinator).cloned();
        let lost = self.coordinator_name();
        let direct = lost_info
            .as_ref()
            .filter(|_| probe)
            .map(|m| (m.id, m.addr.clone()));
        self.state = State::Electing(Electing {
            since: self.now,
            dead: BTreeSet::from([self.coordinator]),
            direct,
            lost: lost_info,
            alive_replies: 0,
            target: None,
            retry_at: None,
        });
        self.emit(Event::Electing { lost, reason });
        self.try_successor();
    }

    /// Switches to a coordinator we were told about (redirect, announcement).
    pub(super) fn follow(&mut self, epoch: u64, addr: String, why: &str) {
        tracing::info!(epoch, %addr, why, "following another coordinator");
        if let Some(conn) = match &self.state {
            State::Member(u) => Some(u.conn),
            State::Electing(e) => e.conn(),
            _ => None,
        } {
            self.out.push(Output::Close(conn));
        }
        let lost = self.coordinator_name();
        self.state = State::Electing(Electing {
            since: self.now,
            dead: BTreeSet::new(),
            direct: Some((0, addr)),
            lost: None,
            alive_replies: 0,
            target: None,
            retry_at: None,
        });
        self.emit(Event::Electing {
            lost,
            reason: why.to_string(),
        });
        self.try_successor();
    }

    fn resume(&self, dead: &BTreeSet<u64>) -> Resume {
        Resume {
            member_id: self.me.id,
            epoch: self.epoch,
            last_epoch: self.log.last_epoch(),
            last_seq: self.log.last_seq(),
            dead: dead.iter().copied().collect(),
        }
    }

    /// Dials the first member not known dead, or takes over if that is us.
    pub(super) fn try_successor(&mut self) {
        let State::Electing(e) = &self.state else { return };
        let resume = self.resume(&e.dead);
        let hello = self.hello(Some(resume));
        if let Some((id, addr)) = e.direct.clone() {
            let conn = self.dial(&addr, &hello);
            if let State::Electing(e) = &mut self.state {
                e.direct = None;
                e.target = Some((id, conn));
            }
            return;
        }
        let next = self
            .members
            .iter()
            .find(|m| !e.dead.contains(&m.id))
            .map(|m| (m.id, m.addr.clone()));
        match next {
            Some((id, addr)) if id != self.me.id => {
                let conn = self.dial(&addr, &hello);
                if let State::Electing(e) = &mut self.state {
                    e.target = Some((id, conn));
                }
            }
            _ => {
                let (dead, since) = (e.dead.clone(), e.since);
                self.become_coordinator(self.epoch + 1, dead, Some(since));
            }
        }
    }

    /// A resuming member asks us to take over. We do if we agree the
    /// coordinator is gone (we have not heard from it for a heartbeat) and
    /// no earlier-joined survivor is left.
    pub(super) fn takeover_request(&mut self, conn: ConnId, name: String, addr: String, r: Resume) {
        let now = self.now;
        let hb = self.cfg.heartbeat_ms;
        let mut dead: BTreeSet<u64> = r.dead.iter().copied().collect();
        dead.insert(self.coordinator);
        let (agree, since, old_conn) = match &self.state {
            State::Member(u) => (now.saturating_sub(u.last_heard) > hb, now, Some(u.conn)),
            State::Electing(e) => {
                dead.extend(e.dead.iter().copied());
                (true, e.since, e.conn())
            }
            _ => (false, now, None),
        };
        let first = self.members.iter().find(|m| !dead.contains(&m.id)).map(|m| m.id);
        if !agree {
            let who = self.coordinator_name();
            return self.refuse(
                conn,
                ErrorCode::CoordinatorAlive,
                format!("the coordinator {who} still answers this node; reconnect to it"),
            );
        }
        if first != Some(self.me.id) {
            return self.refuse(
                conn,
                ErrorCode::Electing,
                "an earlier-joined member may still take over; retry",
            );
        }
        if let Some(c) = old_conn {
            self.out.push(Output::Close(c));
        }
        let epoch = self.epoch.max(r.epoch) + 1;
        self.become_coordinator(epoch, dead, Some(since));
        self.coord_admit(conn, name, addr, Some(r));
    }
}
