//! `cargo xtask demo`: release-build the peer and the supervisor, then run
//! `p2pctl demo` on the example cluster.

use std::process::Command;

use crate::util::{cargo, project_root, run as run_cmd};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    eprintln!("building release binaries (p2pnode, p2pctl, the bot plugins)…");
    run_cmd(cargo().args([
        "build",
        "--release",
        "--quiet",
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
    let ctl = project_root().join("target/release/p2pctl");
    let mut cmd = Command::new(ctl);
    if args.is_empty() {
        cmd.args(["-f", "cluster.example.yaml"]);
    } else {
        cmd.args(args);
    }
    cmd.arg("demo");
    run_cmd(&mut cmd)
}
