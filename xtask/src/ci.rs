//! `cargo xtask ci`: the same checks as CI (`bash .ci/run`).

use std::process::Command;

use crate::util::run as run_cmd;

pub fn run() -> anyhow::Result<()> {
    run_cmd(Command::new("bash").arg(".ci/run"))
}
