//! The one integration-test binary: drives the real `p2pnode` (and later
//! `p2pctl`) processes over real sockets on 127.0.0.1.

mod ctl;
mod dashboard;
mod hostile;
mod liveness;
mod node;
mod node_input;
mod plugins;
mod util;
