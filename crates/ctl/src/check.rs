//! Talking to nodes directly as an observer: posting a message as a node,
//! and checking that every live node delivered the same sequence.

use std::time::{Duration, Instant};

use p2p_proto::net::{Client, ConnectError};
use p2p_proto::secure::ChatKey;
use p2p_proto::{DigestRow, Frame};
use serde_json::json;

use crate::control::Response;

const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// The chat key a tool proves when it talks to the nodes (None: the
/// cluster runs `--insecure`).
pub type Key = Option<std::sync::Arc<ChatKey>>;

async fn connect(addr: &str, key: &Key) -> std::io::Result<Client> {
    Client::connect(addr, key.as_deref(), IO_TIMEOUT)
        .await
        .map_err(|e| match e {
            ConnectError::Io { error, .. } => error,
            other => std::io::Error::other(other.to_string()),
        })
}

/// Asks the node at `addr` to post `text` as its own user. Returns the
/// `client_seq` the node queued it under (none from a node that answers
/// with its status, as nodes before the `posted` answer did).
///
/// # Errors
/// If the node cannot be reached in time, or refuses the text.
pub async fn post(addr: &str, text: &str, key: &Key) -> std::io::Result<Option<u64>> {
    p2p_proto::limits::check_text(text)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let attempt = async {
        let mut c = connect(addr, key).await?;
        c.send(&Frame::Post {
            text: text.to_string(),
        })
        .await?;
        // The node answers once the message is queued, so says sent one
        // after another keep their order.
        match c.recv().await? {
            Frame::Error { message, .. } => Err(std::io::Error::other(message)),
            Frame::Posted { client_seq } => Ok(Some(client_seq)),
            _ => Ok(None),
        }
    };
    tokio::time::timeout(IO_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out")))
}

/// Sends an observer request (attach/detach/status) to `addr`, following
/// one redirect to the coordinator; returns the node's `status` answer.
///
/// # Errors
/// The node's refusal (e.g. a plugin that cannot load) or an I/O failure.
pub async fn coordinator_request(addr: &str, frame: &Frame, key: &Key) -> Result<Frame, String> {
    let mut target = addr.to_string();
    for _ in 0..2 {
        let attempt = async {
            let mut c = connect(&target, key).await?;
            c.send(frame).await?;
            c.recv().await
        };
        let reply = tokio::time::timeout(IO_TIMEOUT, attempt)
            .await
            .map_err(|_| format!("node at {target} did not answer in time"))?
            .map_err(|e| format!("node at {target}: {e}"))?;
        match reply {
            Frame::Redirect { addr, .. } => target = addr,
            Frame::Error { message, .. } => return Err(message),
            other => return Ok(other),
        }
    }
    Err("the coordinator keeps moving; try again".into())
}

/// A node's status as an observer sees it.
pub struct NodeStatus {
    pub name: String,
    pub last_seq: u64,
    pub gaps: u64,
    /// `[seq, epoch, hash, type]` of the delivered entries it holds.
    pub log: Vec<DigestRow>,
}

/// Fetches a node's status with its log digest.
///
/// # Errors
/// If the node cannot be reached or answers nonsense.
pub async fn status(addr: &str, key: &Key) -> std::io::Result<NodeStatus> {
    let attempt = async {
        let mut c = connect(addr, key).await?;
        c.send(&Frame::StatusRequest { log: true }).await?;
        loop {
            match c.recv().await? {
                Frame::Status {
                    name,
                    last_seq,
                    gaps,
                    log,
                    ..
                } => {
                    return Ok(NodeStatus {
                        name,
                        last_seq,
                        gaps,
                        log: log.unwrap_or_default(),
                    })
                }
                _ => continue,
            }
        }
    };
    tokio::time::timeout(IO_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out")))
}

/// Waits until every node at `addrs` reports the same voter set, in force,
/// holding every node (up to the 7 voters a chat has), or until `limit`.
/// A node whose address refuses connections is gone (killed meanwhile) and
/// no longer waited for: `up` said "is up" only at `limit` then.
/// Returns whether it settled.
pub async fn wait_settled(addrs: &[String], limit: Duration, key: &Key) -> bool {
    let end = Instant::now() + limit;
    let mut gone = std::collections::HashSet::new();
    while Instant::now() < end {
        let mut sets = Vec::new();
        for a in addrs {
            if gone.contains(a) {
                continue;
            }
            let reply = coordinator_request(a, &Frame::StatusRequest { log: false }, key).await;
            match reply {
                Ok(Frame::Status {
                    voters, stable: true, ..
                }) => sets.push(voters),
                Err(_) if refuses(a).await => {
                    gone.insert(a.clone());
                }
                _ => {}
            }
        }
        let live = addrs.len() - gone.len();
        let want = live.min(7);
        if live > 0 && sets.len() == live && sets.windows(2).all(|w| w[0] == w[1]) && sets[0].len() >= want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// Whether `addr` refuses connections: nobody listens there.
async fn refuses(addr: &str) -> bool {
    let dial = tokio::time::timeout(IO_TIMEOUT, tokio::net::TcpStream::connect(addr)).await;
    matches!(dial, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// How long `check` waits for messages in flight to reach every node.
const SETTLE: Duration = Duration::from_secs(5);

/// Checks that the given nodes agree: the same entries in the same order,
/// no gaps, no duplicates. Waits up to [`SETTLE`] for entries in flight.
/// A node that does not answer (stopped, hung) is reported by name: it is
/// never silently left out.
pub async fn check(nodes: Vec<(String, String)>, key: &Key) -> Response {
    if nodes.is_empty() {
        return Response::err("no running node to check");
    }
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut statuses = Vec::new();
        let mut unreachable = Vec::new();
        for (name, addr) in &nodes {
            match status(addr, key).await {
                Ok(s) => statuses.push(s),
                Err(e) => unreachable.push(format!("{name} at {addr} ({e})")),
            }
        }
        let settled = statuses.windows(2).all(|w| w[0].last_seq == w[1].last_seq);
        if (settled && unreachable.is_empty()) || Instant::now() > deadline {
            if !unreachable.is_empty() {
                let mut r = compare(&statuses);
                if let Some(d) = &mut r.data {
                    d["agree"] = serde_json::Value::Bool(false);
                    d["unreachable"] = json!(unreachable);
                    d["difference"] = json!(format!(
                        "cannot check {}: not answering (stopped or hung?); the others {}",
                        unreachable.join(", "),
                        if d["difference"].is_null() {
                            "agree".to_string()
                        } else {
                            format!("differ: {}", d["difference"].as_str().unwrap_or(""))
                        }
                    ));
                }
                return r;
            }
            return compare(&statuses);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Compares digests over the seqs the nodes hold in common.
pub fn compare(statuses: &[NodeStatus]) -> Response {
    let summary: Vec<_> = statuses
        .iter()
        .map(|s| json!({"name": s.name, "last_seq": s.last_seq, "held": s.log.len(), "gaps": s.gaps}))
        .collect();
    let fail = |what: String| Response::ok(json!({"agree": false, "nodes": summary, "difference": what}));
    let Some(first) = statuses.first() else {
        return fail("no node answered".into());
    };
    for s in statuses {
        if s.gaps > 0 {
            return fail(format!("{} saw {} gap(s) in its sequence", s.name, s.gaps));
        }
        for w in s.log.windows(2) {
            if w[1].0 != w[0].0 + 1 {
                return fail(format!(
                    "{} holds seq {} followed by seq {}",
                    s.name, w[0].0, w[1].0
                ));
            }
        }
    }
    // Every seq held by anyone, with who holds it first.
    let mut merged: std::collections::BTreeMap<u64, (&DigestRow, &str)> = Default::default();
    for s in statuses {
        for row in &s.log {
            match merged.get(&row.0) {
                Some((theirs, who)) if *theirs != row => {
                    return fail(format!(
                        "first difference at seq {}: {} has epoch {} hash {}, {} has epoch {} hash {}",
                        row.0, s.name, row.1, row.2, who, theirs.1, theirs.2
                    ));
                }
                Some(_) => {}
                None => {
                    merged.insert(row.0, (row, &s.name));
                }
            }
        }
    }
    for s in statuses {
        if s.last_seq != first.last_seq {
            return fail(format!(
                "{} delivered up to seq {} but {} up to seq {} (still catching up?)",
                first.name, first.last_seq, s.name, s.last_seq
            ));
        }
    }
    let messages: Vec<u64> = merged
        .values()
        .filter(|(row, _)| row.3 == "chat")
        .map(|(row, _)| row.0)
        .collect();
    Response::ok(json!({
        "agree": true,
        "nodes": summary,
        "last_seq": first.last_seq,
        "entries": merged.len(),
        "messages": messages.len(),
        "message_seqs": messages,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(name: &str, log: &[(u64, u64, &str)]) -> NodeStatus {
        NodeStatus {
            name: name.into(),
            last_seq: log.last().map(|l| l.0).unwrap_or(0),
            gaps: 0,
            log: log
                .iter()
                .map(|(a, b, c)| (*a, *b, c.to_string(), "chat".to_string()))
                .collect(),
        }
    }

    fn agree(r: Response) -> (bool, String) {
        let d = r.data.unwrap();
        (
            d["agree"].as_bool().unwrap(),
            d["difference"].as_str().unwrap_or("").to_string(),
        )
    }

    #[test]
    fn overlapping_windows_agree() {
        let a = st("a", &[(1, 1, "x"), (2, 1, "y"), (3, 2, "z")]);
        let b = st("b", &[(2, 1, "y"), (3, 2, "z")]);
        assert!(agree(compare(&[a, b])).0);
    }

    #[test]
    fn differences_are_located() {
        let a = st("a", &[(1, 1, "x"), (2, 1, "y")]);
        let b = st("b", &[(1, 1, "x"), (2, 2, "q")]);
        let (ok, why) = agree(compare(&[a, b]));
        assert!(!ok);
        assert!(why.contains("seq 2"), "{why}");
        let c = st("c", &[(1, 1, "x"), (3, 1, "y")]);
        let (ok, why) = agree(compare(&[c]));
        assert!(!ok && why.contains("followed by seq 3"), "{why}");
        let d = st("d", &[(1, 1, "x")]);
        let e = st("e", &[(1, 1, "x"), (2, 1, "y")]);
        assert!(!agree(compare(&[d, e])).0);
        assert!(!agree(compare(&[])).0, "an empty check is not agreement");
    }

    #[test]
    fn counts_messages_apart_from_other_entries() {
        let mut a = st("a", &[(1, 1, "x"), (2, 1, "y"), (3, 1, "z")]);
        a.log[1].3 = "joined".into();
        let r = compare(&[a]).data.unwrap();
        assert_eq!(r["entries"], 3);
        assert_eq!(r["messages"], 2);
        assert_eq!(r["message_seqs"], serde_json::json!([1, 3]));
    }
}
