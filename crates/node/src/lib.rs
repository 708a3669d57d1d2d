//! The p2pchat peer. [`run`] serves one node on a listener until it leaves;
//! the `p2pnode` binary only parses flags, binds and calls it.
//!
//! Layout: [`core`] is the membership/election/sequencing state machine
//! (no I/O); `server` drives it with tokio; `conn` runs one connection;
//! [`output`] prints events.

mod conn;
pub mod core;
mod cuts;
pub mod output;
pub mod plugins;
mod server;

pub use output::{EventFormat, Sink};
pub use server::{default_plugin_dir, run, NodeConfig};
