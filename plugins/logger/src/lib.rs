//! The logger bot: one JSON line per delivered message (epoch, seq, from,
//! text, time) and one per verdict of another bot (rule, action, member;
//! never the dropped text), appended to a file. After a failover the new
//! coordinator's logger reads where the transcript stands (the last seq in
//! the file) and continues it from the replayed history: no gap, no
//! duplicate.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use p2p_plugin_api::serde::{Deserialize, Serialize};
use p2p_plugin_api::{export_plugin, json, Host, Message, Plugin, VerdictSeen};

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(crate = "p2p_plugin_api::serde", rename_all = "lowercase")]
enum Flush {
    /// Flush after every line (the default; survives a crash).
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
    out: BufWriter<File>,
    /// Last seq in the transcript, once known.
    last_seq: Option<u64>,
    /// Inside a run of replayed history (after a takeover).
    replaying: bool,
    last_flush: Instant,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The seq of the last message line in the file's tail.
fn last_seq_in(path: &PathBuf) -> std::io::Result<Option<u64>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(256 * 1024);
    f.seek(SeekFrom::Start(start))?;
    let mut tail = String::new();
    f.read_to_string(&mut tail)?;
    Ok(tail.lines().rev().find_map(|l| {
        let v: json::Value = json::from_str(l).ok()?;
        (v["type"] == "message").then(|| v["seq"].as_u64()).flatten()
    }))
}

/// One transcript line for a message, serialized without building a map.
#[derive(Serialize)]
#[serde(crate = "p2p_plugin_api::serde")]
struct MessageLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    epoch: u64,
    seq: u64,
    from: &'a str,
    from_id: u64,
    text: &'a str,
    time: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    bot: bool,
}

impl Logger {
    fn write(&mut self, line: &impl Serialize) {
        let _ = json::to_writer(&mut self.out, line);
        let _ = self.out.write_all(b"\n");
        let due = match self.cfg.flush {
            Flush::Every => true,
            Flush::Interval => self.last_flush.elapsed() >= Duration::from_millis(self.cfg.flush_interval_ms),
        };
        if due {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let _ = self.out.flush();
        if self.cfg.fsync {
            let _ = self.out.get_ref().sync_data();
        }
        self.last_flush = Instant::now();
    }

    /// Learns where the transcript stands from the file itself (another
    /// node may have written since we last did).
    fn resync(&mut self, host: &Host) {
        self.flush();
        match last_seq_in(&self.path) {
            Ok(seq) => self.last_seq = seq,
            Err(e) => host.log_warn(&format!("cannot read {}: {e}", self.path.display())),
        }
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
        Ok(Logger {
            cfg,
            path,
            out: BufWriter::new(file),
            last_seq: None,
            replaying: false,
            last_flush: Instant::now(),
        })
    }

    fn on_delivered(&mut self, msg: &Message, host: &Host) {
        if msg.replay && !self.replaying {
            self.replaying = true;
            self.resync(host);
        } else if !msg.replay {
            self.replaying = false;
        }
        if self.last_seq.is_none() {
            self.resync(host);
        }
        if self.last_seq.is_some_and(|s| msg.seq <= s) {
            return;
        }
        self.write(&MessageLine {
            kind: "message",
            epoch: msg.epoch,
            seq: msg.seq,
            from: msg.from,
            from_id: msg.from_id,
            text: msg.text,
            time: now_ms(),
            bot: msg.bot,
        });
        self.last_seq = Some(msg.seq);
    }

    fn on_verdict(&mut self, v: &VerdictSeen, _host: &Host) {
        self.write(&json::json!({
            "type": "verdict", "plugin": v.plugin, "rule": v.rule, "action": v.action,
            "member": v.member, "member_id": v.member_id, "time": now_ms(),
        }));
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        self.flush();
    }
}

export_plugin!(Logger);
