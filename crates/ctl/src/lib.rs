//! `p2pctl`, the supervisor of a local p2pchat cluster: reads a YAML cluster
//! file, spawns and watches `p2pnode` processes, restarts them per policy,
//! and serves a control socket that the other commands talk to. The binary
//! only parses flags; everything lives here so tests can drive it.

pub mod check;
pub mod config;
pub mod control;
pub mod demo;
pub mod display;
pub mod logs;
pub mod proc;
pub mod run;
pub mod supervisor;
pub mod watch;
