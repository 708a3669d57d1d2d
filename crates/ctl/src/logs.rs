//! `p2pctl logs`: each node's log lives in the state directory as the JSON
//! events it printed (and its stderr); shown in human form, merged by time
//! when no node is named, followed with `-f`.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use crate::config::Cluster;
use crate::display::{log_line, Display};

/// Prints a line; false once stdout is gone (`p2pctl logs | head`), which
/// ends the command quietly (`println!` panicked there).
fn print(line: &str) -> bool {
    use std::io::Write;
    writeln!(std::io::stdout(), "{line}").is_ok()
}

/// True once nobody can read stdout any more (a pipe whose reader left),
/// so following ends without waiting for a line to fail to print.
fn stdout_gone() -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let out = std::io::stdout();
    let mut fds = [PollFd::new(out.as_fd(), PollFlags::empty())];
    poll(&mut fds, PollTimeout::ZERO).is_ok()
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP))
}

fn time_of(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line).ok()?["t"].as_u64()
}

/// Prints the logs; with `follow`, keeps printing new lines until Ctrl-C.
///
/// # Errors
/// When the node is unknown or no log exists yet.
pub async fn logs(
    cluster: &Cluster,
    node: Option<&str>,
    follow: bool,
    tail: Option<usize>,
) -> anyhow::Result<i32> {
    let names: Vec<String> = match node {
        Some(n) if cluster.nodes.iter().any(|x| x.name == n) => vec![n.to_string()],
        Some(n) => {
            let all: Vec<&str> = cluster.nodes.iter().map(|x| x.name.as_str()).collect();
            bail!(
                "no node named {n:?} in {}; nodes are {}",
                cluster.file.display(),
                all.join(", ")
            )
        }
        None => cluster.nodes.iter().map(|x| x.name.clone()).collect(),
    };
    let dir = cluster.state_dir.join("logs");
    let paths: Vec<(String, PathBuf)> = names
        .iter()
        .map(|n| (n.clone(), dir.join(format!("{n}.log"))))
        .collect();
    if !paths.iter().any(|(_, p)| p.exists()) {
        bail!(
            "no logs yet in {}; start the cluster with p2pctl up",
            dir.display()
        );
    }
    let display = Display::new(&names);
    // Merge by event time; lines without one (stderr) keep their place.
    let mut merged: Vec<(u64, usize, String, String)> = Vec::new();
    let mut offsets = Vec::new();
    for (name, path) in &paths {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        offsets.push(text.len() as u64);
        let mut last_t = 0;
        for line in text.lines() {
            last_t = time_of(line).unwrap_or(last_t);
            merged.push((last_t, merged.len(), name.clone(), line.to_string()));
        }
    }
    merged.sort();
    let shown: Vec<String> = merged
        .into_iter()
        .filter_map(|(_, _, name, line)| log_line(&line).map(|l| display.prefixed(&name, &l)))
        .collect();
    let skip = tail.map_or(0, |n| shown.len().saturating_sub(n));
    for l in &shown[skip..] {
        if !print(l) {
            return Ok(0);
        }
    }
    if !follow {
        return Ok(0);
    }
    let mut pending = vec![String::new(); paths.len()];
    loop {
        tokio::select! {
            _ = crate::run::signals() => return Ok(0),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if stdout_gone() {
            return Ok(0); // `p2pctl logs -f | head`: head has what it wanted
        }
        for (i, (name, path)) in paths.iter().enumerate() {
            let Ok(mut f) = std::fs::File::open(path) else {
                continue;
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < offsets[i] {
                offsets[i] = 0; // a new run truncated it
            }
            if len == offsets[i] || f.seek(SeekFrom::Start(offsets[i])).is_err() {
                continue;
            }
            let mut buf = String::new();
            let _ = f.read_to_string(&mut buf);
            offsets[i] += buf.len() as u64;
            pending[i].push_str(&buf);
            while let Some(pos) = pending[i].find('\n') {
                let line: String = pending[i].drain(..=pos).collect();
                if let Some(l) = log_line(line.trim_end()) {
                    if !print(&display.prefixed(name, &l)) {
                        return Ok(0);
                    }
                }
            }
        }
    }
}
