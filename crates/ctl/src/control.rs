//! The control socket: requests from `p2pctl` commands to the running
//! supervisor, one JSON line each way (a stream of lines for `events`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A command for the supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Ps,
    Kill {
        node: Option<String>,
        #[serde(default)]
        coordinator: bool,
        signal: String,
    },
    Start {
        node: String,
    },
    Stop {
        node: String,
    },
    Restart {
        node: String,
    },
    Say {
        node: String,
        text: String,
    },
    Check,
    /// Attach (or reconfigure) a plugin; `config` is JSON text.
    Attach {
        name: String,
        config: String,
    },
    Detach {
        name: String,
    },
    /// Plugin status as the coordinator reports it.
    Plugins,
    Down,
    /// Stream every supervisor event until the client hangs up.
    Events,
}

/// The supervisor's answer: `{"ok":true,"data":…}` or `{"ok":false,"error":…}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Response {
        Response {
            ok: true,
            data: Some(data),
            error: None,
        }
    }

    pub fn err(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            data: None,
            error: Some(msg.into()),
        }
    }
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ctl.sock")
}

/// A failed attempt to reach the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no cluster {name:?} is running (no control socket at {}); start it with p2pctl up", path.display())]
    NotRunning { name: String, path: PathBuf },
    #[error("the supervisor of cluster {name:?} did not answer: {detail}")]
    Broken { name: String, detail: String },
}

/// Connects to a running supervisor.
///
/// # Errors
/// [`ClientError::NotRunning`] when no supervisor listens.
pub async fn connect(state_dir: &Path, name: &str) -> Result<UnixStream, ClientError> {
    let path = socket_path(state_dir);
    UnixStream::connect(&path)
        .await
        .map_err(|_| ClientError::NotRunning {
            name: name.to_string(),
            path,
        })
}

/// Subscribes to the supervisor's event stream: one JSON [`CtlEvent`] per
/// line, until the supervisor stops.
///
/// [`CtlEvent`]: crate::supervisor::CtlEvent
///
/// # Errors
/// When no supervisor runs.
pub async fn subscribe(
    state_dir: &Path,
    name: &str,
) -> Result<tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>, ClientError> {
    let stream = connect(state_dir, name).await?;
    let (read, mut write) = stream.into_split();
    let line = format!(
        "{}\n",
        serde_json::to_string(&Request::Events).unwrap_or_default()
    );
    write
        .write_all(line.as_bytes())
        .await
        .map_err(|e| ClientError::Broken {
            name: name.to_string(),
            detail: e.to_string(),
        })?;
    // The write half may go: the supervisor streams until we hang up.
    Ok(BufReader::new(read).lines())
}

/// Sends one request and reads the answer.
///
/// # Errors
/// When no supervisor runs, or it hangs up without answering.
pub async fn call(state_dir: &Path, name: &str, req: &Request) -> Result<Response, ClientError> {
    // A supervisor that is stopped (SIGSTOP) or wedged still accepts
    // connections (the kernel does): without a limit we would wait forever.
    let limit = match req {
        // These wait for nodes or for a failover on purpose.
        Request::Check
        | Request::Down
        | Request::Say { .. }
        | Request::Attach { .. }
        | Request::Detach { .. } => Duration::from_secs(60),
        _ => Duration::from_secs(10),
    };
    let pid_file = state_dir.join("supervisor.pid");
    let pid = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok());
    // A stopped supervisor is named at once, not after the time limit.
    let stopped = async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Some(pid) = pid.filter(|&p| process_stopped(p)) {
                return pid;
            }
        }
    };
    tokio::select! {
        r = tokio::time::timeout(limit, call_unlimited(state_dir, name, req)) => match r {
            Ok(r) => r,
            Err(_) => Err(ClientError::Broken {
                name: name.to_string(),
                detail: format!(
                    "no answer within {} s; is the supervisor overloaded? Its pid is in {}",
                    limit.as_secs(),
                    pid_file.display()
                ),
            }),
        },
        pid = stopped => Err(ClientError::Broken {
            name: name.to_string(),
            detail: format!(
                "the supervisor (pid {pid}) is stopped (SIGSTOP or Ctrl-Z) and answers nothing until it runs again: `kill -CONT {pid}` (it may then still carry out this request)"
            ),
        }),
    }
}

/// Whether process `pid` is stopped by a signal (state `T`) or a tracer
/// (`t`), from `/proc/<pid>/stat`.
fn process_stopped(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may
    // hold anything, so look after the last `)`.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "T" || state == "t")
}

async fn call_unlimited(state_dir: &Path, name: &str, req: &Request) -> Result<Response, ClientError> {
    let stream = connect(state_dir, name).await?;
    let (read, mut write) = stream.into_split();
    let broken = |detail: String| ClientError::Broken {
        name: name.to_string(),
        detail,
    };
    let line = format!(
        "{}\n",
        serde_json::to_string(req).map_err(|e| broken(e.to_string()))?
    );
    write
        .write_all(line.as_bytes())
        .await
        .map_err(|e| broken(e.to_string()))?;
    let mut lines = BufReader::new(read).lines();
    let answer = lines
        .next_line()
        .await
        .map_err(|e| broken(e.to_string()))?
        .ok_or_else(|| broken("connection closed".into()))?;
    serde_json::from_str(&answer).map_err(|e| broken(e.to_string()))
}
