//! The logger bot: one JSON line per delivered message (chat, epoch, seq,
//! from, text, time) and one per verdict of another bot (rule, action,
//! member; never the dropped text), appended to a file. After a failover
//! the new coordinator's logger reads where the transcript stands (the last
//! message line of this chat in the file) and continues it from the
//! replayed history: no gap, no duplicate. A new chat (another chat id,
//! e.g. after `p2pctl down` and `up`) starts a new section of the same
//! file from its first message. A line it cannot write quarantines the
//! logger with the reason (`p2pctl plugins` shows it): the transcript never
//! silently skips a message.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use p2p_plugin_api::serde::{Deserialize, Serialize};
use p2p_plugin_api::{export_plugin, json, Host, Message, Plugin, VerdictSeen};

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(crate = "p2p_plugin_api::serde", rename_all = "lowercase")]
enum Flush {
    /// Flush every line before the members see it (the default; survives
    /// a crash): once per batch the coordinator delivers at once, and
    /// after every verdict.
    #[default]
    Every,
    /// Flush at most every `flush_interval_ms`, on the next event.
    Interval,
}

#[derive(Deserialize, Debug)]
#[serde(crate = "p2p_plugin_api::serde", deny_unknown_fields)]
struct Config {
    /// The transcript file, relative to the node's data directory (it
    /// never writes anywhere else).
    path: String,
    #[serde(default)]
    flush: Flush,
    #[serde(default = "default_interval")]
    flush_interval_ms: u64,
    /// fsync after each flush.
    #[serde(default)]
    fsync: bool,
}

fn default_interval() -> u64 {
    1000
}

struct Logger {
    cfg: Config,
    /// The transcript inside the data directory.
    path: PathBuf,
    file: File,
    /// Lines not yet written to `file` (encoded here in place: no line is
    /// copied before the write).
    out: Vec<u8>,
    /// This chat's identity (every line carries it).
    chat: String,
    /// Last seq of this chat in the transcript, once known (0: none yet).
    last_seq: Option<u64>,
    /// Inside a run of replayed history (after a takeover).
    replaying: bool,
    last_flush: Instant,
    /// `{"type":"message","chat":"…"`: how every message line starts.
    head: Vec<u8>,
    /// The time stamped on this batch's lines (read once per batch: a
    /// batch is delivered at once), and lines left before it is read again
    /// anyway (0: read it for the next line).
    batch_time: u64,
    time_left: u8,
}

/// Room for a whole batch in the file buffer, so `flush: every` writes a
/// batch with one system call (a batch is a few hundred lines at most).
/// Past it the buffer is written out whatever the flush setting.
const BUFFER: usize = 256 * 1024;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The seq of the last message line in the file's tail if it belongs to
/// `chat`; 0 if the file ends with another chat's lines or holds none.
fn last_seq_in(path: &PathBuf, chat: &str) -> std::io::Result<u64> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(256 * 1024);
    f.seek(SeekFrom::Start(start))?;
    let mut tail = String::new();
    f.read_to_string(&mut tail)?;
    let last = tail.lines().rev().find_map(|l| {
        let v: json::Value = json::from_str(l).ok()?;
        (v["type"] == "message").then_some(v)
    });
    Ok(match last {
        Some(v) if v["chat"] == chat => v["seq"].as_u64().unwrap_or(0),
        _ => 0,
    })
}

/// One transcript line for a message. The logger writes it by hand (a head
/// kept encoded per chat, then [`MessageLine::encode_tail`]); the derived
/// `Serialize` is the reference its test compares those bytes with.
#[derive(Serialize)]
#[serde(crate = "p2p_plugin_api::serde")]
struct MessageLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    chat: &'a str,
    epoch: u64,
    seq: u64,
    from: &'a str,
    from_id: u64,
    text: &'a str,
    time: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    bot: bool,
}

impl MessageLine<'_> {
    /// The line as `serde_json` writes it (same keys, order and escapes),
    /// written straight into `buf` (what the logger writes, head and tail).
    #[cfg(test)]
    fn encode(&self, buf: &mut Vec<u8>) {
        Self::encode_head(self.kind, self.chat, buf);
        self.encode_tail(buf);
    }

    /// The start of the line, the same for every message of a chat (the
    /// logger keeps it encoded).
    fn encode_head(kind: &str, chat: &str, buf: &mut Vec<u8>) {
        buf.extend_from_slice(b"{\"type\":");
        json_str(buf, kind);
        buf.extend_from_slice(b",\"chat\":");
        json_str(buf, chat);
    }

    /// The rest of the line after [`MessageLine::encode_head`].
    fn encode_tail(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(b",\"epoch\":");
        json_u64(buf, self.epoch);
        buf.extend_from_slice(b",\"seq\":");
        json_u64(buf, self.seq);
        buf.extend_from_slice(b",\"from\":");
        json_str(buf, self.from);
        buf.extend_from_slice(b",\"from_id\":");
        json_u64(buf, self.from_id);
        buf.extend_from_slice(b",\"text\":");
        json_str(buf, self.text);
        buf.extend_from_slice(b",\"time\":");
        json_u64(buf, self.time);
        if self.bot {
            buf.extend_from_slice(b",\"bot\":true");
        }
        buf.push(b'}');
    }
}

/// A JSON string: copied as is unless it holds a byte JSON escapes
/// (controls, `"` and `\\`), which `serde_json` then writes.
fn json_str(buf: &mut Vec<u8>, s: &str) {
    // A fold without early exit, which the compiler vectorises.
    if s.bytes()
        .fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'))
    {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        // Writing into a Vec cannot fail.
        let _ = json::to_writer(&mut *buf, s);
    }
}

fn json_u64(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

impl Logger {
    fn new(cfg: Config, path: PathBuf, file: File, chat: String) -> Logger {
        let mut head = Vec::new();
        MessageLine::encode_head("message", &chat, &mut head);
        Logger {
            cfg,
            path,
            file,
            out: Vec::with_capacity(BUFFER + 4096),
            head,
            chat,
            last_seq: None,
            replaying: false,
            last_flush: Instant::now(),
            batch_time: 0,
            time_left: 0,
        }
    }

    /// Appends one line; `batch_ends`: nothing written so far may wait
    /// (with `flush: every`) beyond this call.
    ///
    /// # Errors
    /// What the file system said; the caller quarantines the logger.
    fn write(&mut self, line: &impl Serialize, batch_ends: bool) -> std::io::Result<()> {
        // Serialising into a Vec cannot fail.
        let _ = json::to_writer(&mut self.out, line);
        self.out.push(b'\n');
        self.flush_if_due(batch_ends)
    }

    /// [`Logger::write`] for a message line, the hot one: its start is
    /// kept encoded (`head`), the rest written after it.
    fn write_message(&mut self, line: &MessageLine, batch_ends: bool) -> std::io::Result<()> {
        self.out.extend_from_slice(&self.head);
        line.encode_tail(&mut self.out);
        self.out.push(b'\n');
        self.flush_if_due(batch_ends)
    }

    /// The delivery time for a line of the current batch.
    fn time(&mut self, batch_ends: bool) -> u64 {
        if self.time_left == 0 {
            self.batch_time = now_ms();
            // A batch without an end (a host that never says) still gets
            // a fresh time every 64 lines.
            self.time_left = 64;
        }
        self.time_left = if batch_ends { 0 } else { self.time_left - 1 };
        self.batch_time
    }

    fn flush_if_due(&mut self, batch_ends: bool) -> std::io::Result<()> {
        let due = match self.cfg.flush {
            Flush::Every => batch_ends,
            Flush::Interval => self.last_flush.elapsed() >= Duration::from_millis(self.cfg.flush_interval_ms),
        };
        if due {
            self.flush()?;
        } else if self.out.len() >= BUFFER {
            self.write_out()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.last_flush = Instant::now();
        self.write_out()?;
        if self.cfg.fsync {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Writes the buffered lines to the file. What a failed write left
    /// unwritten stays buffered, and only that is tried again (on drop):
    /// no line is written twice.
    fn write_out(&mut self) -> std::io::Result<()> {
        let mut done = 0;
        let result = loop {
            if done == self.out.len() {
                break Ok(());
            }
            match self.file.write(&self.out[done..]) {
                Ok(0) => break Err(ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.out.drain(..done);
        result
    }

    /// Learns where the transcript stands from the file itself (another
    /// node may have written since we last did).
    fn resync(&mut self) -> std::io::Result<()> {
        self.flush()?;
        self.last_seq = Some(last_seq_in(&self.path, &self.chat)?);
        Ok(())
    }

    fn fail(&self, host: &Host, what: &str, e: &std::io::Error) {
        host.fail(&format!(
            "cannot {what} the transcript {}: {e}",
            self.path.display()
        ));
    }
}

impl Plugin for Logger {
    const NAME: &'static str = "logger";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn load(config: &str, host: &Host) -> Result<Self, String> {
        let cfg: Config = json::from_str(config).map_err(|e| format!("invalid logger config: {e}"))?;
        if cfg.flush_interval_ms == 0 {
            return Err("invalid logger config: flush_interval_ms must be positive".into());
        }
        let path = host
            .confined_path(&cfg.path)
            .map_err(|e| format!("invalid logger config: {e}"))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open the transcript {}: {e}", path.display()))?;
        Ok(Logger::new(cfg, path, file, host.chat_id()))
    }

    fn on_delivered(&mut self, msg: &Message, host: &Host) {
        let fresh_replay = msg.replay && !self.replaying;
        self.replaying = msg.replay;
        if fresh_replay || self.last_seq.is_none() {
            if let Err(e) = self.resync() {
                return self.fail(host, "read", &e);
            }
        }
        if self.last_seq.is_some_and(|s| msg.seq <= s) {
            // Already in the transcript; lines of this batch may still wait.
            if let Err(e) = self.flush_if_due(msg.last_in_batch) {
                self.fail(host, "write", &e);
            }
            return;
        }
        let time = self.time(msg.last_in_batch);
        let written = self.write_message(
            &MessageLine {
                kind: "message",
                chat: "", // `head` holds the kind and the chat id
                epoch: msg.epoch,
                seq: msg.seq,
                from: msg.from,
                from_id: msg.from_id,
                text: msg.text,
                time,
                bot: msg.bot,
            },
            msg.last_in_batch,
        );
        match written {
            Ok(()) => self.last_seq = Some(msg.seq),
            Err(e) => self.fail(host, "write", &e),
        }
    }

    fn on_verdict(&mut self, v: &VerdictSeen, host: &Host) {
        let line = json::json!({
            "type": "verdict", "chat": self.chat, "plugin": v.plugin, "rule": v.rule,
            "action": v.action, "member": v.member, "member_id": v.member_id, "time": now_ms(),
        });
        if let Err(e) = self.write(&line, true) {
            self.fail(host, "write", &e);
        }
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        // Nobody to tell any more; the next logger reads where the file
        // stands and writes what is missing.
        let _ = self.flush();
    }
}

export_plugin!(Logger);

#[cfg(test)]
mod tests {
    use super::*;

    fn logger(out: File, path: PathBuf, chat: &str) -> Logger {
        Logger::new(
            json::from_str(r#"{"path":"t.jsonl"}"#).unwrap(),
            path,
            out,
            chat.into(),
        )
    }

    /// A logger of chat `c` on an empty transcript in a directory of its
    /// own (`tag` tells the tests' directories apart): the directory, the
    /// transcript's path, the logger.
    fn fresh_transcript(tag: &str) -> (PathBuf, PathBuf, Logger) {
        let dir = std::env::temp_dir().join(format!("p2p-logger-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jsonl");
        let file = OpenOptions::new().create(true).append(true).open(&path).unwrap();
        let l = logger(file, path.clone(), "c");
        (dir, path, l)
    }

    /// A delivered message that ends its batch.
    fn message(seq: u64) -> Message<'static> {
        in_batch(seq, true)
    }

    fn in_batch(seq: u64, last_in_batch: bool) -> Message<'static> {
        Message {
            epoch: 1,
            seq,
            from_id: 1,
            from: "alice",
            text: "hi",
            replay: false,
            bot: false,
            last_in_batch,
        }
    }

    #[test]
    fn message_lines_are_what_serde_json_writes() {
        let texts = [
            "hi",
            "",
            "quote \" only",
            "backslash \\ only, and a slash /",
            "tab\tnewline\ncontrol \u{1} del \u{7f}",
            "only a control \u{1f}",
            "unicode: ünïcødé 日本語 🎉 \u{2028}",
        ];
        for (i, text) in texts.into_iter().enumerate() {
            for bot in [false, true] {
                let line = MessageLine {
                    kind: "message",
                    chat: "0f3a\"c",
                    epoch: u64::MAX,
                    seq: i as u64,
                    from: "bob \\ \"b\"",
                    from_id: 1 << 40,
                    text,
                    time: 1_764_000_000_000,
                    bot,
                };
                let mut ours = Vec::new();
                line.encode(&mut ours);
                let theirs = json::to_vec(&line).unwrap();
                assert_eq!(
                    String::from_utf8(ours).unwrap(),
                    String::from_utf8(theirs).unwrap()
                );
            }
        }
    }

    /// /dev/full stands in for a full disk (Linux, where CI runs).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_write_error_is_reported_not_swallowed() {
        let full = OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let mut l = logger(full, PathBuf::from("/dev/full"), "c");
        l.last_seq = Some(0);
        assert!(l
            .write_message(
                &MessageLine {
                    kind: "message",
                    chat: "c",
                    epoch: 1,
                    seq: 1,
                    from: "a",
                    from_id: 1,
                    text: "x",
                    time: 0,
                    bot: false,
                },
                true
            )
            .is_err());
        l.on_delivered(&message(2), &Host::detached());
        assert_eq!(l.last_seq, Some(0), "a line not written is not counted");
    }

    #[test]
    fn the_transcript_position_is_per_chat() {
        let dir = std::env::temp_dir().join(format!("p2p-logger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jsonl");
        std::fs::write(
            &path,
            "{\"type\":\"message\",\"chat\":\"a\",\"seq\":7}\n{\"type\":\"verdict\",\"chat\":\"a\"}\n",
        )
        .unwrap();
        assert_eq!(last_seq_in(&path, "a").unwrap(), 7);
        assert_eq!(last_seq_in(&path, "b").unwrap(), 0, "another chat starts afresh");
        assert_eq!(last_seq_in(&dir.join("none"), "a").unwrap(), 0);
        let file = OpenOptions::new().append(true).open(&path).unwrap();
        let mut l = logger(file, path.clone(), "b");
        l.on_delivered(&message(1), &Host::detached());
        l.flush().unwrap();
        assert_eq!(last_seq_in(&path, "b").unwrap(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_batch_is_written_once_and_before_it_ends() {
        let (dir, path, mut l) = fresh_transcript("batch");
        let host = Host::detached();
        let on_disk = || last_seq_in(&path, "c").unwrap();
        l.on_delivered(&in_batch(1, false), &host);
        l.on_delivered(&in_batch(2, false), &host);
        assert_eq!(on_disk(), 0, "mid-batch lines wait in the buffer");
        l.on_delivered(&in_batch(3, true), &host);
        assert_eq!(on_disk(), 3, "the batch's end writes the whole batch");
        // A batch whose last message is already in the transcript (replayed
        // history) still writes the lines before it.
        l.on_delivered(&in_batch(4, false), &host);
        l.last_seq = Some(5);
        l.on_delivered(&in_batch(5, true), &host);
        assert_eq!(on_disk(), 4);
        // The clock is read once per batch, and again after 64 lines of a
        // batch that does not end.
        l.batch_time = 1;
        l.time_left = 2;
        l.on_delivered(&in_batch(6, false), &host);
        assert_eq!(l.time_left, 1, "within a batch the time stands");
        l.on_delivered(&in_batch(7, true), &host);
        assert_eq!(l.time_left, 0, "the next batch reads the clock");
        for seq in 8..8 + 64 {
            l.on_delivered(&in_batch(seq, false), &host);
        }
        assert_eq!(l.time_left, 0, "64 lines without an end read it again");
        assert!(l.batch_time > 1);
        l.flush().unwrap();
        let lines = std::fs::read_to_string(&path).unwrap();
        let times: Vec<u64> = lines
            .lines()
            .map(|l| {
                json::from_str::<json::Value>(l).unwrap()["time"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            times[times.len() - 66..times.len() - 64],
            [1, 1],
            "seq 6 and 7 share the batch's time"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_batch_longer_than_the_buffer_is_written_as_it_fills_and_once() {
        let (dir, path, mut l) = fresh_transcript("long");
        let host = Host::detached();
        let mut seq = 0;
        while std::fs::metadata(&path).unwrap().len() == 0 {
            seq += 1;
            assert!(
                seq < 100_000,
                "nothing written after {} buffered bytes",
                l.out.len()
            );
            l.on_delivered(&in_batch(seq, false), &host);
            assert!(l.out.len() < BUFFER + 512, "the buffer stays bounded");
        }
        for _ in 0..10 {
            seq += 1;
            l.on_delivered(&in_batch(seq, false), &host);
        }
        drop(l);
        let seqs: Vec<u64> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| json::from_str::<json::Value>(l).unwrap()["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (1..=seq).collect::<Vec<_>>(),
            "every line once, in order, after the drop"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
