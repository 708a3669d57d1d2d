//! Size and shape limits shared by every node and client.
//!
//! Every one of these is checked before the thing it bounds is allocated or
//! trusted, so a peer cannot make a node allocate more than it allows.

/// Largest frame body in bytes (the 4-byte length prefix not included).
pub const MAX_FRAME_LEN: usize = 256 * 1024;
/// Largest chat text in bytes of UTF-8.
pub const MAX_TEXT_LEN: usize = 4096;
/// Longest member name in bytes.
pub const MAX_NAME_LEN: usize = 32;
/// Most bytes of encoded entries packed into one `sync` frame; a node
/// splits larger ranges (every entry alone fits well under the frame limit).
pub const MAX_SYNC_BYTES: usize = 160 * 1024;
/// Most members in a chat.
pub const MAX_MEMBERS: usize = 2000;
/// Longest member address (`host:port`) in bytes.
pub const MAX_ADDR_LEN: usize = 255;
/// Most members listed in a `status` answer (fewer when their names and
/// addresses are long: the answer always fits [`MAX_FRAME_LEN`]).
pub const STATUS_MEMBERS: usize = 300;
/// Most digest rows in a `status` answer with `log: true` (the newest; fewer
/// when the frame limit requires).
pub const STATUS_LOG_ROWS: usize = 4000;
/// Most plugins attached to one chat.
pub const MAX_PLUGINS: usize = 8;
/// Longest plugin configuration (JSON text) in bytes.
pub const MAX_PLUGIN_CONFIG: usize = 8 * 1024;

/// Checks a member name: 1 to [`MAX_NAME_LEN`] bytes of `A-Z a-z 0-9 _ - .`.
///
/// # Errors
/// Returns a sentence saying what is wrong with the name.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name must be 1 to {MAX_NAME_LEN} bytes long, got {} bytes",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "name {name:?} has the character {c:?}; use only letters, digits, '_', '-' and '.'"
        ));
    }
    Ok(())
}

/// Checks a chat id as a `resume` names it: 32 hex digits (nodes draw
/// them at random when a chat starts).
///
/// # Errors
/// Returns a sentence saying what is wrong with the id.
pub fn check_chat_id(id: &str) -> Result<(), String> {
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(format!(
            "resume.chat must be a chat id of 32 hex digits, got {} bytes",
            id.len()
        ))
    }
}

/// Checks a member's listening address: `host:port`, at most
/// [`MAX_ADDR_LEN`] bytes, the host made of letters, digits, `.`, `-`, `_`
/// or a bracketed IPv6 literal, the port a number from 1 to 65535.
///
/// # Errors
/// Returns a sentence saying what is wrong with the address.
pub fn check_addr(addr: &str) -> Result<(), String> {
    if addr.is_empty() || addr.len() > MAX_ADDR_LEN {
        return Err(format!(
            "address must be 1 to {MAX_ADDR_LEN} bytes of host:port, got {} bytes",
            addr.len()
        ));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("address {addr:?} is not host:port"));
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        !inner.is_empty()
            && inner
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
    } else {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    if !host_ok {
        return Err(format!("address {addr:?} has an invalid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("address {addr:?} has an invalid port")),
    }
}

/// A plugin name: 1 to 64 bytes of `a-z 0-9 _ -` (names travel the network
/// and become file names, so never a path).
pub fn valid_plugin_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

/// Checks a chat text: non-empty, at most [`MAX_TEXT_LEN`] bytes, and no
/// control characters (so every delivered message prints as one line).
///
/// # Errors
/// Returns a sentence saying what is wrong with the text.
pub fn check_text(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("message is empty".into());
    }
    if text.len() > MAX_TEXT_LEN {
        return Err(format!(
            "message is {} bytes, the limit is {MAX_TEXT_LEN}",
            text.len()
        ));
    }
    if has_control(text) {
        return Err("message contains control characters (newlines are not allowed)".into());
    }
    Ok(())
}

/// True if `text` holds a control character other than tab: C0 (U+0000 to
/// U+001F), DEL, or C1 (U+0080 to U+009F, encoded as 0xC2 0x80..=0x9F).
/// A byte scan: this runs on every message.
fn has_control(text: &str) -> bool {
    let b = text.as_bytes();
    // Fast path, branch-free so it vectorises: no byte below 0x20 but tab,
    // no DEL, no 0xC2 (the lead byte of every C1 character).
    let suspect = b.iter().fold(false, |any, &c| {
        any | ((c < 0x20) & (c != b'\t')) | (c == 0x7f) | (c == 0xc2)
    });
    if !suspect {
        return false;
    }
    b.iter().enumerate().any(|(i, &c)| {
        (c < 0x20 && c != b'\t')
            || c == 0x7f
            || (c == 0xc2 && b.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_ids_are_32_hex_digits() {
        assert!(check_chat_id("0123456789abcdef0123456789ABCDEF").is_ok());
        for bad in ["", "abc", &"a".repeat(33), &"g".repeat(32), &"x".repeat(100_000)] {
            let e = check_chat_id(bad).unwrap_err();
            assert!(e.contains(&format!("got {} bytes", bad.len())), "{e}");
        }
    }

    #[test]
    fn names() {
        assert!(check_name("alice").is_ok());
        assert!(check_name("node-1.a_b").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("has space").is_err());
        assert!(check_name(&"x".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(check_name("émile").is_err());
    }

    #[test]
    fn addrs() {
        assert!(check_addr("127.0.0.1:7101").is_ok());
        assert!(check_addr("node-1.example:80").is_ok());
        assert!(check_addr("[::1]:9").is_ok());
        assert!(check_addr("").is_err());
        assert!(check_addr("127.0.0.1").is_err());
        assert!(check_addr("127.0.0.1:0").is_err());
        assert!(check_addr("127.0.0.1:99999").is_err());
        assert!(check_addr("a\"b:1").is_err());
        assert!(check_addr(&format!("{}:1", "a".repeat(MAX_ADDR_LEN))).is_err());
    }

    #[test]
    fn texts() {
        assert!(check_text("hello world").is_ok());
        assert!(check_text("").is_err());
        assert!(check_text("two\nlines").is_err());
        assert!(check_text(&"x".repeat(MAX_TEXT_LEN)).is_ok());
        assert!(check_text(&"x".repeat(MAX_TEXT_LEN + 1)).is_err());
        assert!(check_text("tab\tok").is_ok());
        assert!(check_text("bell\u{7}").is_err());
        assert!(check_text("del\u{7f}").is_err());
        assert!(check_text("c1\u{85}").is_err());
        assert!(check_text("é ü ñ 漢字 🎉 \u{a0}").is_ok());
    }

    #[test]
    fn control_scan_matches_char_classification() {
        for cp in (0u32..0x3000).chain(0x1f000..0x1f100) {
            let Some(c) = char::from_u32(cp) else { continue };
            let s = format!("a{c}b");
            assert_eq!(has_control(&s), c.is_control() && c != '\t', "U+{cp:04X}");
        }
    }
}
