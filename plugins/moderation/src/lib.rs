//! The moderation bot: banned words (case-insensitive, whole words) masked
//! or dropped, a per-member rate limit (token bucket), and a maximum
//! length. Every verdict carries a rule id: `banned-word`, `rate-limit`,
//! `max-length`.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use p2p_plugin_api::serde::Deserialize;
use p2p_plugin_api::{export_plugin, json, Host, Message, Plugin, Verdict};

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(crate = "p2p_plugin_api::serde", rename_all = "lowercase")]
enum Action {
    /// Replace each banned word with `***` and deliver.
    #[default]
    Mask,
    /// Do not deliver; the sender is told why.
    Drop,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(crate = "p2p_plugin_api::serde", deny_unknown_fields)]
struct Rate {
    /// Messages allowed per `per_ms` on average.
    messages: u32,
    per_ms: u64,
    /// Messages allowed in a burst (bucket size); defaults to `messages`.
    burst: Option<u32>,
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(crate = "p2p_plugin_api::serde", deny_unknown_fields)]
struct Config {
    #[serde(default)]
    banned: Vec<String>,
    #[serde(default)]
    action: Action,
    rate: Option<Rate>,
    /// In characters.
    max_length: Option<usize>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Moderation {
    /// Lowercase banned words.
    banned: HashSet<String>,
    /// Shortest and longest banned word in bytes, to skip most words fast.
    lens: (usize, usize),
    /// Substring searches for the ASCII banned words, when there are few:
    /// an ASCII text that holds none of them anywhere (lowercased) holds
    /// no banned word, and most texts are cleared this way without the
    /// word scan.
    prefilter: Option<Vec<memchr::memmem::Finder<'static>>>,
    action: Action,
    rate: Option<(f64, f64, u32, u64, u32)>, // (per ms, burst, messages, per_ms, burst as given)
    max_length: Option<usize>,
    buckets: HashMap<u64, Bucket>,
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '\'' || c == '_'
}

/// [`is_word_char`] for ASCII bytes, as a table.
static WORD_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'\'' || c == b'_';
        b += 1;
    }
    t
};

impl Moderation {
    /// Whether one word is banned, without allocating for ASCII words.
    fn is_banned(&self, word: &str) -> bool {
        if self.banned.is_empty() {
            return false;
        }
        if word.is_ascii() {
            if word.len() < self.lens.0 || word.len() > self.lens.1 {
                return false;
            }
            let mut buf = [0u8; 64];
            if word.len() > buf.len() {
                return self.banned.contains(&word.to_ascii_lowercase());
            }
            for (d, c) in buf.iter_mut().zip(word.bytes()) {
                *d = c.to_ascii_lowercase();
            }
            return std::str::from_utf8(&buf[..word.len()]).is_ok_and(|w| self.banned.contains(w));
        }
        self.banned.contains(&word.to_lowercase())
    }

    /// True if any word of `text` is banned (no allocation for ASCII text).
    fn has_banned(&self, text: &str) -> bool {
        if text.is_ascii() && !self.may_hold_banned(text) {
            return false;
        }
        if text.is_ascii() {
            // Bytes are characters here: no decoding, a table says which
            // bytes make words, and words outside the banned lengths are
            // skipped before anything else (this runs on every message).
            let (shortest, longest) = self.lens;
            let b = text.as_bytes();
            let mut i = 0;
            while i < b.len() {
                while i < b.len() && !WORD_BYTE[usize::from(b[i])] {
                    i += 1;
                }
                let start = i;
                while i < b.len() && WORD_BYTE[usize::from(b[i])] {
                    i += 1;
                }
                let n = i - start;
                if n >= shortest.max(1) && n <= longest && self.is_banned(&text[start..i]) {
                    return true;
                }
            }
            return false;
        }
        self.has_banned_words(text)
    }

    /// False only if no ASCII banned word occurs anywhere in the ASCII
    /// `text` (compared in lowercase), so it holds no banned word.
    fn may_hold_banned(&self, text: &str) -> bool {
        let Some(finders) = &self.prefilter else {
            return true;
        };
        let mut lower = [0u8; 512];
        let Some(lower) = lower.get_mut(..text.len()) else {
            return true; // long texts: the scan decides
        };
        for (d, c) in lower.iter_mut().zip(text.bytes()) {
            *d = c.to_ascii_lowercase();
        }
        finders.iter().any(|f| f.find(lower).is_some())
    }

    /// [`Moderation::has_banned`] for any text, word by word.
    fn has_banned_words(&self, text: &str) -> bool {
        text.split(|c: char| !is_word_char(c))
            .any(|w| !w.is_empty() && self.is_banned(w))
    }

    /// Masks banned words; returns the new text if any was found.
    fn mask(&self, text: &str) -> Option<String> {
        if !self.has_banned(text) {
            return None;
        }
        let mut out = String::with_capacity(text.len());
        let mut found = false;
        let mut word_start: Option<usize> = None;
        let flush = |out: &mut String, word: &str, found: &mut bool| {
            if self.is_banned(word) {
                out.push_str("***");
                *found = true;
            } else {
                out.push_str(word);
            }
        };
        for (i, c) in text.char_indices() {
            match (is_word_char(c), word_start) {
                (true, None) => word_start = Some(i),
                (false, Some(s)) => {
                    flush(&mut out, &text[s..i], &mut found);
                    word_start = None;
                    out.push(c);
                }
                (false, None) => out.push(c),
                (true, Some(_)) => {}
            }
        }
        if let Some(s) = word_start {
            flush(&mut out, &text[s..], &mut found);
        }
        found.then_some(out)
    }

    fn allow(&mut self, member: u64) -> bool {
        let Some((per_ms, burst, ..)) = self.rate else {
            return true;
        };
        let now = Instant::now();
        let b = self.buckets.entry(member).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.duration_since(b.at).as_secs_f64() * 1000.0;
        b.tokens = (b.tokens + elapsed * per_ms).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Plugin for Moderation {
    const NAME: &'static str = "moderation";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn load(config: &str, _host: &Host) -> Result<Self, String> {
        let cfg: Config = if config.trim().is_empty() || config.trim() == "null" {
            Config::default()
        } else {
            json::from_str(config).map_err(|e| format!("invalid moderation config: {e}"))?
        };
        let mut banned = HashSet::new();
        for w in &cfg.banned {
            if w.is_empty() || !w.chars().all(is_word_char) {
                return Err(format!(
                    "invalid moderation config: banned word {w:?} must be one word (letters, digits, ' or _)"
                ));
            }
            banned.insert(w.to_lowercase());
        }
        let rate =
            match cfg.rate {
                None => None,
                Some(r) if r.messages == 0 || r.per_ms == 0 || r.burst == Some(0) => return Err(
                    "invalid moderation config: rate.messages, rate.per_ms and rate.burst must be positive"
                        .into(),
                ),
                Some(r) => {
                    let burst = r.burst.unwrap_or(r.messages);
                    Some((
                        f64::from(r.messages) / r.per_ms as f64,
                        f64::from(burst),
                        r.messages,
                        r.per_ms,
                        burst,
                    ))
                }
            };
        if cfg.max_length == Some(0) {
            return Err("invalid moderation config: max_length must be positive".into());
        }
        let lens = (
            banned.iter().map(String::len).min().unwrap_or(0),
            banned.iter().map(String::len).max().unwrap_or(0),
        );
        // A handful of searches beat the word scan; past that, scan.
        let prefilter = (banned.len() <= 8).then(|| {
            banned
                .iter()
                .filter(|w| w.is_ascii())
                .map(|w| memchr::memmem::Finder::new(w.as_bytes()).into_owned())
                .collect()
        });
        Ok(Moderation {
            banned,
            lens,
            prefilter,
            action: cfg.action,
            rate,
            max_length: cfg.max_length,
            buckets: HashMap::new(),
        })
    }

    fn on_message(&mut self, msg: &Message, _host: &Host) -> Verdict {
        if msg.replay {
            return Verdict::Deliver;
        }
        if let Some(max) = self.max_length {
            let n = msg.text.chars().count();
            if n > max {
                return Verdict::Drop {
                    reason: format!("message is {n} characters, the limit here is {max}"),
                    rule: "max-length".into(),
                };
            }
        }
        if !msg.bot && !self.allow(msg.from_id) {
            let (_, _, messages, per_ms, _) = self.rate.unwrap_or_default();
            return Verdict::Drop {
                reason: format!(
                    "slow down: at most {messages} messages per {:.1} s",
                    per_ms as f64 / 1000.0
                ),
                rule: "rate-limit".into(),
            };
        }
        if self.banned.is_empty() {
            return Verdict::Deliver;
        }
        match (self.mask(msg.text), self.action) {
            (None, _) => Verdict::Deliver,
            (Some(text), Action::Mask) => Verdict::Rewrite {
                text,
                rule: "banned-word".into(),
            },
            (Some(_), Action::Drop) => Verdict::Drop {
                reason: "your message contains a banned word".into(),
                rule: "banned-word".into(),
            },
        }
    }

    fn on_leave(&mut self, member_id: u64, _name: &str, _reason: &str, _host: &Host) {
        self.buckets.remove(&member_id);
    }
}

export_plugin!(Moderation);

#[cfg(test)]
mod tests {
    use super::*;

    fn m(cfg: &str) -> Moderation {
        Moderation::load(cfg, &Host::detached()).unwrap()
    }

    #[test]
    fn bad_config_is_refused_with_a_reason() {
        let e = Moderation::load(r#"{"banned":["x"],"colour":"red"}"#, &Host::detached())
            .err()
            .unwrap();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = Moderation::load(r#"{"action":"explode"}"#, &Host::detached())
            .err()
            .unwrap();
        assert!(e.contains("explode"), "{e}");
        let e = Moderation::load(r#"{"banned":["two words"]}"#, &Host::detached())
            .err()
            .unwrap();
        assert!(e.contains("one word"), "{e}");
    }

    #[test]
    fn masks_whole_words_case_insensitively() {
        let mo = m(r#"{"banned":["spam"]}"#);
        assert_eq!(
            mo.mask("SPAM and more Spam!").as_deref(),
            Some("*** and more ***!")
        );
        assert_eq!(mo.mask("spammer is fine"), None);
        assert_eq!(mo.mask("no match"), None);
    }

    /// The ASCII scan against the word-by-word one, on texts built from
    /// pieces near word edges.
    #[test]
    fn the_ascii_scan_agrees_with_the_word_by_word_one() {
        // With the substring prefilter (few words, one not ASCII), and
        // without it (many words).
        for config in [
            r#"{"banned":["spam","eggs_and","it's","a","café"]}"#,
            r#"{"banned":["spam","eggs_and","it's","a","w1","w2","w3","w4","w5","w6"]}"#,
        ] {
            let mo = m(config);
            assert_eq!(mo.prefilter.is_some(), mo.banned.len() <= 8);
            let pieces = [
                "spam", "SPAM", "spammer", "xspam", "eggs_and", "eggs", "and", "it's", "its", "a", "A", "ab",
                "cafe", " ", "!", "'", "_", "-", "9", "\t", "",
            ];
            let mut found = 0;
            for a in pieces {
                for b in pieces {
                    for c in pieces {
                        let text = format!("{a}{b}{c}");
                        let (fast, words) = (mo.has_banned(&text), mo.has_banned_words(&text));
                        assert_eq!(fast, words, "{text:?} with {config}");
                        found += usize::from(fast);
                    }
                }
            }
            assert!(found > 1000, "banned words found in {found} texts");
        }
    }

    #[test]
    fn bucket_limits_bursts() {
        let mut mo = m(r#"{"rate":{"messages":2,"per_ms":60000}}"#);
        assert!(mo.allow(1));
        assert!(mo.allow(1));
        assert!(!mo.allow(1));
        assert!(mo.allow(2), "buckets are per member");
    }
}
