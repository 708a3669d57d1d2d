//! The echo bot: `!echo some text` makes it post `some text`. Nothing else.

use p2p_plugin_api::{export_plugin, Host, Message, Plugin};

struct Echo;

const PREFIX: &str = "!echo ";

impl Plugin for Echo {
    const NAME: &'static str = "echo";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn load(config: &str, host: &Host) -> Result<Self, String> {
        match p2p_plugin_api::json::from_str::<p2p_plugin_api::json::Value>(config) {
            Ok(v) if v.is_null() || v.as_object().is_some_and(|o| o.is_empty()) => {
                // Other messages never cross into the bot.
                host.deliver_only_prefixed(PREFIX);
                Ok(Echo)
            }
            Ok(v) => Err(format!("echo takes no configuration, got {v}")),
            Err(e) => Err(format!("configuration is not JSON: {e}")),
        }
    }

    fn on_delivered(&mut self, msg: &Message, host: &Host) {
        if msg.replay {
            return;
        }
        if let Some(rest) = msg.text.strip_prefix(PREFIX) {
            let rest = rest.trim();
            if !rest.is_empty() {
                host.post(rest);
            }
        }
    }
}

export_plugin!(Echo);
