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
    if text.chars().any(|c| c.is_control() && c != '\t') {
        return Err("message contains control characters (newlines are not allowed)".into());
    }
    Ok(())
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
    }
}
