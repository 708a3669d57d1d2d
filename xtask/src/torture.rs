//! `cargo xtask torture [--seed N] [FLAGS]`: release-build the node and
//! `p2pbench`, then run `p2pbench torture` (seeded SIGKILL, SIGSTOP/SIGCONT,
//! restarts, network partitions and CPU hogs against real processes, with a history checker).
//! Flags pass through; `p2pbench torture --help` lists them.

use std::process::Command;

use crate::util::{cargo, release_bin, run as run_cmd};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    eprintln!("building release binaries (p2pnode, p2pbench)…");
    run_cmd(cargo().args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "p2p-node",
        "-p",
        "p2p-bench",
    ]))?;
    let bench = release_bin("p2pbench")?;
    run_cmd(Command::new(bench).arg("torture").args(args))
}
