//! Printing events on stdout, as human lines or one JSON object per line.
//!
//! Printing happens on its own thread behind a bounded queue so a slow
//! terminal never stalls the actor for long; stdout is for the user only
//! (diagnostics go to stderr through `tracing`).

use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use p2p_proto::Role;
use serde_json::json;

use crate::core::Event;

/// How events are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EventFormat {
    /// Readable lines: `bob: hi`, `* carol joined`.
    Human,
    /// One JSON object per line (see docs/PROTOCOL.md, "Events").
    Json,
    /// Nothing (for benchmarks).
    None,
}

/// Where events go.
pub struct Sink {
    format: EventFormat,
    /// How human lines look (colours, own lines).
    style: HumanStyle,
    tx: Option<SyncSender<String>>,
    /// Lines not printed because stdout was not read fast enough. Printing
    /// never blocks the node: a stalled node would miss heartbeats.
    dropped: std::cell::Cell<u64>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    /// Prints to stdout from a dedicated thread.
    pub fn stdout(format: EventFormat) -> Sink {
        let (tx, rx) = sync_channel::<String>(1 << 16);
        let thread = std::thread::spawn(move || print_loop(rx, std::io::stdout()));
        Sink {
            format,
            style: HumanStyle::default(),
            tx: Some(tx),
            dropped: std::cell::Cell::new(0),
            thread: Some(thread),
        }
    }

    /// Sends formatted lines to a channel (for in-process tests).
    pub fn channel(format: EventFormat) -> (Sink, Receiver<String>) {
        let (tx, rx) = sync_channel::<String>(1 << 16);
        (
            Sink {
                format,
                style: HumanStyle::default(),
                tx: Some(tx),
                dropped: std::cell::Cell::new(0),
                thread: None,
            },
            rx,
        )
    }

    fn line(&self, line: String) {
        let Some(tx) = &self.tx else { return };
        let dropped = self.dropped.get();
        if dropped > 0 {
            let note = match self.format {
                EventFormat::Json => json!({"event": "dropped", "count": dropped, "t": now_ms()}).to_string(),
                _ => format!("* {dropped} events not shown: stdout was not read fast enough"),
            };
            if tx.try_send(note).is_err() {
                self.dropped.set(dropped + 1);
                return;
            }
            self.dropped.set(0);
        }
        if tx.try_send(line).is_err() {
            self.dropped.set(self.dropped.get() + 1);
        }
    }

    /// The node is listening (so a human who let it pick a port knows
    /// where others can join).
    pub fn listening(&self, name: &str, addr: &str) {
        match self.format {
            EventFormat::Json => self
                .line(json!({"event": "listening", "name": name, "addr": addr, "t": now_ms()}).to_string()),
            EventFormat::Human => self.line(format!(
                "* {name} listening on {addr} (others join with --join {addr})"
            )),
            EventFormat::None => {}
        }
    }

    /// Which key guards the chat (`None`: `--insecure`), and whether this
    /// node just created its key file.
    pub fn key(&self, key: Option<(&str, &std::path::Path, bool)>) {
        let line = match (self.format, key) {
            (EventFormat::None, _) => return,
            (EventFormat::Json, Some((id, path, created))) => json!({
                "event": "key", "id": id, "path": path.display().to_string(), "created": created, "t": now_ms()
            })
            .to_string(),
            (EventFormat::Json, None) => json!({"event": "key", "id": null, "t": now_ms()}).to_string(),
            (_, Some((id, path, true))) => format!(
                "* created the chat key {} (id {id}); nodes joining this chat need a copy: --key-file",
                path.display()
            ),
            (_, Some((id, path, false))) => format!("* chat key {id} ({}): traffic is encrypted", path.display()),
            (_, None) => "* --insecure: no chat key, anyone who can reach this port can join and read".to_string(),
        };
        self.line(line);
    }

    pub fn emit(&self, event: &Event, me: &str) {
        let line = match self.format {
            EventFormat::None => return,
            // A human reads errors on stderr, like the argument errors.
            EventFormat::Human if matches!(event, Event::Error { .. }) => {
                if let Some(line) = human(event, me, self.style) {
                    to_stderr(&line);
                }
                return;
            }
            EventFormat::Human => human(event, me, self.style).map(|l| {
                if self.style.times {
                    format!("{} {l}", local_hh_mm())
                } else {
                    l
                }
            }),
            EventFormat::Json => json_line(event),
        };
        if let Some(line) = line {
            self.line(line);
        }
    }

    /// Flushes everything printed so far and stops the printer thread.
    pub fn close(mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes a line to stderr, whether or not anyone reads it: `eprintln!`
/// panics when stderr is a closed pipe, which took the whole node down.
pub fn to_stderr(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn print_loop(rx: Receiver<String>, out: std::io::Stdout) {
    let mut out = std::io::BufWriter::new(out.lock());
    while let Ok(line) = rx.recv() {
        let _ = writeln!(out, "{line}");
        while let Ok(more) = rx.try_recv() {
            let _ = writeln!(out, "{more}");
        }
        if out.flush().is_err() {
            // stdout is gone (closed pipe): keep draining so senders never block.
            while rx.recv().is_ok() {}
            return;
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn role_str(role: Role) -> &'static str {
    match role {
        Role::Joining => "joining",
        Role::Member => "member",
        Role::Electing => "electing",
        Role::Candidate => "candidate",
        Role::Coordinator => "coordinator",
    }
}

/// How human output is shown.
#[derive(Debug, Clone, Copy, Default)]
pub struct HumanStyle {
    /// Colour member names (ANSI; for a terminal without NO_COLOR).
    pub colour: bool,
    /// The user's own lines are already on the screen (they typed them on
    /// this terminal): do not print them again when delivered.
    pub typed_here: bool,
    /// Prefix each line with the local time (`14:03`), for a person
    /// reading a terminal.
    pub times: bool,
}

/// The local wall-clock time as `HH:MM`.
fn local_hh_mm() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which we own; it reads
    // the time zone the C library loaded, as any C program does.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = !unsafe { libc::localtime_r(&now, &mut tm) }.is_null();
    if ok {
        format!("{:02}:{:02}", tm.tm_hour, tm.tm_min)
    } else {
        String::new()
    }
}

impl Sink {
    /// Sets how human lines look.
    pub fn set_style(&mut self, style: HumanStyle) {
        self.style = style;
    }
}

/// A member name, coloured by a hash of it when colours are on.
fn name(name: &str, style: HumanStyle) -> String {
    if !style.colour {
        return name.to_string();
    }
    let hue = name
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        % 6
        + 1;
    format!("\x1b[1;3{hue}m{name}\x1b[0m")
}

fn human(event: &Event, me: &str, style: HumanStyle) -> Option<String> {
    Some(match event {
        Event::Ready {
            epoch,
            coordinator,
            members,
            created: true,
            ..
        } => format!("* started a new chat as {coordinator} (coordinator, epoch {epoch}, {members} member)"),
        Event::Ready {
            epoch,
            coordinator,
            members,
            ..
        } => format!("* joined as {me}; coordinator is {coordinator} (epoch {epoch}), {members} members"),
        Event::Message { chat, replay } => {
            if !replay && style.typed_here && chat.bot.is_none() && &*chat.from == me {
                return None;
            }
            let history = if *replay { "(history) " } else { "" };
            match &chat.bot {
                Some(_) => format!("{history}[bot] {}: {}", name(&chat.from, style), chat.text),
                None => format!("{history}{}: {}", name(&chat.from, style), chat.text),
            }
        }
        Event::Joined { name, .. } => format!("* {name} joined"),
        Event::Left { name, reason, .. } => format!("* {name} {reason}"),
        Event::Role {
            epoch,
            coordinator,
            election_ms,
            ..
        } => match election_ms {
            Some(ms) => format!("* coordinator is now {coordinator} (epoch {epoch}, elected in {ms} ms)"),
            None => format!("* coordinator is now {coordinator} (epoch {epoch})"),
        },
        Event::Electing { lost, reason } => {
            format!("* lost the coordinator {lost} ({reason}); electing the next")
        }
        Event::Following { addr, reason } => format!("* following the coordinator at {addr} ({reason})"),
        Event::Who { members, coordinator } => {
            let names: Vec<String> = members
                .iter()
                .map(|m| {
                    let mut s = m.name.clone();
                    if m.id == *coordinator {
                        s.push_str(" (coordinator)");
                    }
                    if m.name == me {
                        s.push_str(" (you)");
                    }
                    s
                })
                .collect();
            format!("* members: {}", names.join(", "))
        }
        Event::Rejected { reason, .. } => format!("* not delivered: {reason}"),
        Event::Error { message, .. } => format!("* error: {message}"),
        Event::Info { message } => format!("* {message}"),
        Event::Verdict {
            plugin,
            rule,
            action,
            member,
        } => format!(
            "* {plugin}: {} of {member}'s message (rule {rule})",
            action.as_str()
        ),
        Event::Plugin { name, state, detail } if detail.is_empty() => {
            format!("* plugin {name} {}", state.as_str())
        }
        Event::Plugin { name, state, detail } => {
            // Details often repeat "plugin NAME: " themselves.
            let own = format!("plugin {name}: ");
            let detail = detail.strip_prefix(&own).unwrap_or(detail);
            format!("* plugin {name} {}: {detail}", state.as_str())
        }
        Event::Waiting { reason } | Event::Resumed { reason } => format!("* {reason}"),
        Event::Config { .. } => return None,
        Event::Unreachable { name, reason, .. } => format!(
            "* {name} is not answering ({reason}); it stays a voter until it returns or is proven gone"
        ),
    })
}

fn json_line(event: &Event) -> Option<String> {
    let t = now_ms();
    let v = match event {
        Event::Ready {
            id,
            epoch,
            coordinator,
            members,
            created,
        } => json!({"event": "ready", "id": id, "epoch": epoch, "coordinator": coordinator,
                    "members": members, "created": created, "t": t}),
        Event::Message { chat, replay } => json!({"event": "message", "epoch": chat.epoch, "seq": chat.seq,
            "from": chat.from, "from_id": chat.from_id, "client_seq": chat.client_seq, "text": chat.text,
            "bot": chat.bot, "replay": replay, "t": t}),
        Event::Joined { id, name, seq } => {
            json!({"event": "joined", "id": id, "name": name, "seq": seq, "t": t})
        }
        Event::Left {
            id,
            name,
            reason,
            seq,
        } => {
            json!({"event": "left", "id": id, "name": name, "reason": reason, "seq": seq, "t": t})
        }
        Event::Waiting { reason } => json!({"event": "waiting", "reason": reason, "t": t}),
        Event::Resumed { reason } => json!({"event": "resumed", "reason": reason, "t": t}),
        Event::Config { seq, voters, plugins } => {
            let mut v = json!({"event": "config", "seq": seq, "t": t});
            if let Some(ids) = voters {
                v["voters"] = json!(ids);
            }
            if let Some(names) = plugins {
                v["plugins"] = json!(names);
            }
            v
        }
        Event::Unreachable { id, name, reason } => {
            json!({"event": "unreachable", "id": id, "name": name, "reason": reason, "t": t})
        }
        Event::Role {
            role,
            epoch,
            coordinator,
            election_ms,
        } => json!({"event": "role", "role": role_str(*role), "epoch": epoch, "coordinator": coordinator,
                    "election_ms": election_ms, "t": t}),
        Event::Electing { lost, reason } => {
            json!({"event": "electing", "lost": lost, "reason": reason, "t": t})
        }
        Event::Following { addr, reason } => {
            json!({"event": "following", "addr": addr, "reason": reason, "t": t})
        }
        Event::Who { members, coordinator } => {
            json!({"event": "who", "members": members, "coordinator": coordinator})
        }
        Event::Rejected { client_seq, reason } => {
            json!({"event": "rejected", "client_seq": client_seq, "reason": reason, "t": t})
        }
        Event::Error { code, message } => json!({"event": "error", "code": code, "message": message, "t": t}),
        Event::Info { message } => json!({"event": "info", "message": message, "t": t}),
        Event::Verdict {
            plugin,
            rule,
            action,
            member,
        } => {
            json!({"event": "verdict", "plugin": plugin, "rule": rule, "action": action.as_str(), "member": member, "t": t})
        }
        Event::Plugin { name, state, detail } => {
            json!({"event": "plugin", "name": name, "state": state.as_str(), "detail": detail, "t": t})
        }
    };
    Some(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(from: &str, replay: bool) -> Event {
        Event::Message {
            chat: p2p_proto::Chat {
                epoch: 1,
                seq: 3,
                from: from.into(),
                from_id: 1,
                client_seq: 1,
                text: "hi".into(),
                bot: None,
            },
            replay,
        }
    }

    #[test]
    fn lines_nobody_reads_are_counted_and_reported_once_there_is_room() {
        let (sink, rx) = Sink::channel(EventFormat::Json);
        let info = |n: usize| Event::Info {
            message: format!("line {n}"),
        };
        // The queue holds 65,536 lines; nobody reads.
        for n in 0..(1 << 16) + 10 {
            sink.emit(&info(n), "me");
        }
        let first: Vec<String> = rx.try_iter().collect();
        assert_eq!(first.len(), 1 << 16);
        sink.emit(&info(99_999), "me");
        let after: Vec<serde_json::Value> =
            rx.try_iter().map(|l| serde_json::from_str(&l).unwrap()).collect();
        assert_eq!(after[0]["event"], "dropped");
        assert_eq!(after[0]["count"], 10);
        assert_eq!(after[1]["message"], "line 99999", "then printing goes on");
    }

    #[test]
    fn a_terminal_sees_the_local_time_before_each_line() {
        let (mut sink, rx) = Sink::channel(EventFormat::Human);
        sink.set_style(HumanStyle {
            times: true,
            ..HumanStyle::default()
        });
        sink.emit(&message("bob", false), "alice");
        let line = rx.try_recv().unwrap();
        let (time, rest) = line.split_once(' ').unwrap();
        assert_eq!(rest, "bob: hi");
        assert!(
            time.len() == 5 && time.as_bytes()[2] == b':' && time.replace(':', "").parse::<u32>().is_ok(),
            "{line:?}"
        );
    }

    #[test]
    fn human_lines_mark_history_colour_names_and_skip_what_the_user_typed() {
        let plain = HumanStyle::default();
        assert_eq!(human(&message("bob", false), "alice", plain).unwrap(), "bob: hi");
        assert_eq!(
            human(&message("bob", true), "alice", plain).unwrap(),
            "(history) bob: hi"
        );
        let typed = HumanStyle {
            typed_here: true,
            ..plain
        };
        assert_eq!(
            human(&message("alice", false), "alice", typed),
            None,
            "already on the screen"
        );
        assert!(
            human(&message("alice", true), "alice", typed).is_some(),
            "history is shown"
        );
        assert!(
            human(&message("alice", false), "alice", plain).is_some(),
            "not typed here: shown"
        );
        let colour = HumanStyle {
            colour: true,
            ..plain
        };
        let line = human(&message("bob", false), "alice", colour).unwrap();
        assert!(
            line.starts_with("\x1b[1;3") && line.ends_with("\x1b[0m: hi"),
            "{line:?}"
        );
        assert_eq!(
            line,
            human(&message("bob", false), "carol", colour).unwrap(),
            "one colour per name"
        );
    }
}
