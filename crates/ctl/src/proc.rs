//! Spawning one `p2pnode` process: its own process group, killed by the
//! kernel if the supervisor dies (even by SIGKILL), stdout events forwarded
//! to the supervisor and everything it prints kept in its log file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use p2p_proto::net::read_text_line;
use tokio::io::BufReader;
use tokio::process::Command;
use tokio::sync::mpsc;

/// How a process ended.
#[derive(Debug, Clone, Copy)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitInfo {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exited with code {c}"),
            (None, Some(s)) => {
                let name = nix::sys::signal::Signal::try_from(s)
                    .map(|s| s.as_str())
                    .unwrap_or("an unknown signal");
                format!("killed by {name}")
            }
            _ => "ended".into(),
        }
    }
}

/// Starts a node and the tasks that watch it. Returns its pid.
///
/// # Errors
/// If the process cannot be started (binary missing, no permission).
pub fn spawn(
    bin: &Path,
    args: &[String],
    cwd: &Path,
    log: PathBuf,
    idx: usize,
    gen: u64,
    tx: mpsc::Sender<impl From<ProcMsg> + Send + 'static>,
) -> std::io::Result<u32> {
    let mut cmd = Command::new(bin);
    // Nodes run in the cluster's state directory (plugins write only in
    // its data/ directory, given with --data-dir).
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit)
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                // The supervisor may have died before the prctl took effect.
                if nix::unistd::getppid().as_raw() as u32 != parent {
                    nix::libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let log_file = std::sync::Arc::new(std::sync::Mutex::new(LogFile::open(log)?));
    let log_err = log_file.clone();
    let tx_out = tx.clone();
    let out_task = tokio::spawn(async move {
        let Some(stdout) = stdout else { return };
        let (mut out, mut buf) = (BufReader::new(stdout), Vec::new());
        while let Ok(Some(line)) = read_text_line(&mut out, &mut buf, MAX_LINE).await {
            if let Ok(mut log) = log_file.lock() {
                log.write_line(&line);
            }
            if tx_out
                .send(ProcMsg::Line { idx, gen, line }.into())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let err_task = tokio::spawn(async move {
        let Some(stderr) = stderr else { return };
        let (mut err, mut buf) = (BufReader::new(stderr), Vec::new());
        while let Ok(Some(line)) = read_text_line(&mut err, &mut buf, MAX_LINE).await {
            if let Ok(mut log) = log_err.lock() {
                log.write_line(&format!("stderr: {}", strip_ansi(&line)));
            }
        }
    });
    tokio::spawn(async move {
        let status = child.wait().await;
        // Deliver every line before the exit.
        let _ = out_task.await;
        let _ = err_task.await;
        let info = match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                ExitInfo {
                    code: s.code(),
                    signal: s.signal(),
                }
            }
            Err(_) => ExitInfo {
                code: None,
                signal: None,
            },
        };
        let _ = tx.send(ProcMsg::Exited { idx, gen, info }.into()).await;
    });
    Ok(pid)
}

/// Longest line kept whole from a node's stdout or stderr (4 times the
/// frame limit; the node's own events are far shorter). A longer one is
/// read in pieces of this size, and bytes that are not UTF-8 are replaced
/// ([`p2p_proto::net::read_text_line`]): whatever a node or a plugin
/// inside it prints, every line reaches the supervisor and the log.
pub const MAX_LINE: usize = 1 << 20;

/// What a spawned node's watchers report, for slot `idx`, generation `gen`.
pub enum ProcMsg {
    /// A line the node printed on stdout.
    Line { idx: usize, gen: u64, line: String },
    /// The node exited (sent after every line it printed).
    Exited { idx: usize, gen: u64, info: ExitInfo },
}

/// Bytes a node log may reach before it is rotated (`NAME.log` becomes
/// `NAME.log.1`, replacing the previous one): at most twice this per node.
pub const LOG_CAP: u64 = 16 << 20;

/// A node's log file, rotated at [`LOG_CAP`].
struct LogFile {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
}

impl LogFile {
    fn open(path: PathBuf) -> std::io::Result<LogFile> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(LogFile { path, file, size })
    }

    /// Appends a line; a full disk loses log lines, never the node.
    fn write_line(&mut self, line: &str) {
        if self.size + line.len() as u64 + 1 > LOG_CAP {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            let reopened = std::fs::rename(&self.path, &old).and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .open(&self.path)
            });
            if let Ok(f) = reopened {
                self.file = f;
                self.size = 0;
            }
        }
        if writeln!(self.file, "{line}").is_ok() {
            self.size += line.len() as u64 + 1;
        }
    }
}

/// `line` without terminal escape sequences (colours a node may print on
/// stderr), so log files read cleanly.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters, then one final byte in @..~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_stripped_from_log_lines() {
        assert_eq!(
            strip_ansi("\x1b[2m2026\x1b[0m \x1b[33m WARN\x1b[0m dropping"),
            "2026  WARN dropping"
        );
        assert_eq!(strip_ansi("plain ünïcode"), "plain ünïcode");
    }

    /// A process that prints bytes that are not UTF-8, then more than a
    /// pipe holds, on both streams: every line reaches the supervisor and
    /// the log, the ones after the bad bytes included.
    #[tokio::test]
    async fn a_process_printing_binary_is_read_to_its_end() {
        let dir = std::env::temp_dir().join(format!("p2pctl-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("n.log");
        let script = "printf 'a\\377b\\n'; printf 'c\\376d\\n' >&2; \
                      head -c 300000 /dev/zero | tr '\\0' y >&2; echo >&2; \
                      head -c 300000 /dev/zero | tr '\\0' z; echo; echo done";
        let (tx, mut rx) = mpsc::channel::<ProcMsg>(1024);
        spawn(
            Path::new("/bin/sh"),
            &["-c".to_string(), script.to_string()],
            &dir,
            log.clone(),
            0,
            1,
            tx,
        )
        .unwrap();
        let mut lines = Vec::new();
        let info = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                match rx.recv().await {
                    Some(ProcMsg::Line { line, .. }) => lines.push(line),
                    Some(ProcMsg::Exited { info, .. }) => return info,
                    None => panic!("the watchers stopped before the exit"),
                }
            }
        })
        .await
        .expect("the process did not end");
        assert!(info.success(), "{}", info.describe());
        assert_eq!(lines.first().map(String::as_str), Some("a\u{fffd}b"));
        assert_eq!(lines.last().map(String::as_str), Some("done"));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("stderr: c\u{fffd}d\n"),
            "{}",
            text.chars().take(200).collect::<String>()
        );
        assert!(text.contains(&"y".repeat(300_000)) && text.contains(&"z".repeat(300_000)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_log_is_rotated_once() {
        let dir = std::env::temp_dir().join(format!("p2pctl-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("n.log");
        let mut log = LogFile::open(path.clone()).unwrap();
        let line = "x".repeat(1 << 20);
        for _ in 0..(LOG_CAP >> 20) + 3 {
            log.write_line(&line);
        }
        let now = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(dir.join("n.log.1")).unwrap().len();
        assert!(now <= LOG_CAP && old <= LOG_CAP && now > 0, "{now} {old}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
