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
/// Most entries a `sync` frame carries; larger ranges are sent in several.
pub const MAX_SYNC_ENTRIES: usize = 32;
/// Most members a `welcome` or `status` lists (the coordinator refuses joins
/// past this, so the snapshot always fits in one frame).
pub const MAX_MEMBERS: usize = 2000;

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
    fn names() {
        assert!(check_name("alice").is_ok());
        assert!(check_name("node-1.a_b").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("has space").is_err());
        assert!(check_name(&"x".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(check_name("émile").is_err());
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
