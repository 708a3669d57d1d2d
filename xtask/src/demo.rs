//! `cargo xtask demo [-f FILE] [DEMO FLAGS]`: release-build the peer and
//! the supervisor, then run `p2pctl demo` on the example cluster. Flags
//! other than `-f FILE` go to `p2pctl demo` (e.g. `--pace-ms 0`).

use std::process::Command;

use crate::util::{cargo, release_bin, run as run_cmd};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    eprintln!(
        "building release binaries (p2pnode, p2pctl, the bot plugins; about two minutes the first time)…"
    );
    run_cmd(cargo().args([
        "build",
        "--release",
        "-p",
        "p2p-node",
        "-p",
        "p2p-ctl",
        "-p",
        "p2p-plugin-echo",
        "-p",
        "p2p-plugin-moderation",
        "-p",
        "p2p-plugin-logger",
    ]))?;
    let ctl = release_bin("p2pctl")?;
    let (file, rest) = split_file(args);
    let mut cmd = Command::new(ctl);
    cmd.args(["-f", file.as_deref().unwrap_or("cluster.example.yaml")]);
    cmd.arg("demo").args(rest);
    run_cmd(&mut cmd)
}

/// Takes `-f FILE` / `--file FILE` out of the arguments.
fn split_file(args: &[String]) -> (Option<String>, Vec<String>) {
    let mut file = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-f" | "--file" => file = it.next().cloned(),
            other => match other.strip_prefix("--file=") {
                Some(f) => file = Some(f.to_string()),
                None => rest.push(other.to_string()),
            },
        }
    }
    (file, rest)
}

#[cfg(test)]
mod tests {
    use super::split_file;

    #[test]
    fn the_cluster_file_is_taken_out_and_demo_flags_pass_through() {
        let args: Vec<String> = ["--pace-ms", "0", "-f", "my.yaml"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (file, rest) = split_file(&args);
        assert_eq!(file.as_deref(), Some("my.yaml"));
        assert_eq!(rest, vec!["--pace-ms", "0"]);
        let (file, rest) = split_file(&["--file=x.yaml".to_string()]);
        assert_eq!((file.as_deref(), rest.len()), (Some("x.yaml"), 0));
    }
}
