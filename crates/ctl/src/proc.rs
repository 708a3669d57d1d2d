//! Spawning one `p2pnode` process: its own process group, killed by the
//! kernel if the supervisor dies (even by SIGKILL), stdout events forwarded
//! to the supervisor and everything it prints kept in its log file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::supervisor::SupMsg;

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
    tx: mpsc::Sender<SupMsg>,
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
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
    let log_err = log_file.try_clone()?;
    let tx_out = tx.clone();
    let out_task = tokio::spawn(async move {
        let Some(stdout) = stdout else { return };
        let mut log = log_file;
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = writeln!(log, "{line}");
            if tx_out.send(SupMsg::Line { idx, gen, line }).await.is_err() {
                return;
            }
        }
    });
    let err_task = tokio::spawn(async move {
        let Some(stderr) = stderr else { return };
        let mut log = log_err;
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = writeln!(log, "stderr: {line}");
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
        let _ = tx.send(SupMsg::Exited { idx, gen, info }).await;
    });
    Ok(pid)
}
