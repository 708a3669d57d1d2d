//! A test bot that panics on any message containing "boom", and reports a
//! failure through the host (`Host::fail`) on one containing "fail" (to
//! check that the node quarantines it either way and the chat goes on), and
//! rewrites one containing "empty" to nothing (an invalid rewrite). Like
//! echo, it posts what follows `!relay ` in a delivered message, so that
//! two bots can answer each other (the depth limit's test).
//! Not for real use.

use p2p_plugin_api::{export_plugin, Host, Message, Plugin, Verdict};

struct Panicky;

impl Plugin for Panicky {
    const NAME: &'static str = "test_panic";
    const VERSION: &'static str = "0.0.1";

    fn load(_config: &str, _host: &Host) -> Result<Self, String> {
        Ok(Panicky)
    }

    fn on_message(&mut self, msg: &Message, host: &Host) -> Verdict {
        if msg.text.contains("boom") {
            panic!("the test plugin was asked to blow up");
        }
        if msg.text.contains("fail") {
            host.fail("the test plugin was asked to fail");
        }
        if msg.text.contains("empty") {
            return Verdict::Rewrite {
                text: String::new(),
                rule: "empty".into(),
            };
        }
        Verdict::Deliver
    }

    fn on_delivered(&mut self, msg: &Message, host: &Host) {
        if let Some(rest) = msg.text.strip_prefix("!relay ") {
            if !msg.replay {
                host.post(rest);
            }
        }
    }
}

export_plugin!(Panicky);
