//! The C ABI itself: plain `#[repr(C)]` types and function pointers.
//!
//! Ownership rules (every buffer):
//! - Strings the host passes in (`Str` fields and arguments) are borrowed:
//!   valid only until the call returns. Copy what you keep.
//! - Strings a plugin hands out (verdict text, bot posts, error messages,
//!   log lines) go through the host's callbacks in [`HostApi`]; the host
//!   copies them before the callback returns, so the plugin keeps ownership
//!   and may free or reuse its buffer at once.
//! - The [`Descriptor`] and the strings in it (name, version) are static:
//!   they must live as long as the library is loaded.
//! - The instance pointer returned by `load` belongs to the plugin; the host
//!   only passes it back, and calls `unload` exactly once.

use std::ffi::c_void;

/// Version of this ABI. A host refuses a descriptor with a version it does
/// not speak; this host speaks [`OLDEST_ABI_VERSION`] to this one.
pub const ABI_VERSION: u32 = 4;

/// The oldest version a host of this version still loads: version 4 only
/// appended [`HostApi::deliver_only`], which a version 3 plugin never reads.
pub const OLDEST_ABI_VERSION: u32 = 3;

/// Most prefixes one plugin may declare with [`HostApi::deliver_only`].
pub const MAX_DELIVER_PREFIXES: usize = 16;
/// Longest prefix, in bytes.
pub const MAX_PREFIX_LEN: usize = 64;

/// The symbol every plugin exports: `extern "C" fn() -> *const Descriptor`.
pub const ENTRY_SYMBOL: &str = "p2pchat_plugin_entry";

/// Return codes of every plugin function.
pub const RC_OK: i32 = 0;
/// The plugin failed; it reported a message through `HostApi::error`.
pub const RC_ERROR: i32 = 1;
/// The plugin panicked (caught at the boundary).
pub const RC_PANIC: i32 = 2;
/// The plugin does nothing for this hook: the host may skip it from now on
/// (returned by the safe layer when a trait method keeps its default).
pub const RC_UNIMPLEMENTED: i32 = 3;

/// Verdict actions.
pub const ACTION_DELIVER: u32 = 0;
pub const ACTION_DROP: u32 = 1;
pub const ACTION_REWRITE: u32 = 2;

/// `MessageIn::flags` bit: history replayed to plugins when their node takes
/// over as coordinator (already delivered; verdicts are ignored).
pub const FLAG_REPLAY: u32 = 1;
/// `MessageIn::flags` bit: the message was posted by a bot.
pub const FLAG_BOT: u32 = 2;
/// `MessageIn::flags` bit (in `on_delivered`): the last message of a batch
/// the coordinator delivers at once. Nothing of the batch reaches the
/// members before this call returns, so a plugin that persists deliveries
/// can write (flush) once here instead of once per message. Hosts before
/// this bit never set it: such a plugin must then flush per message.
pub const FLAG_LAST_IN_BATCH: u32 = 4;

/// Log levels for `HostApi::log`.
pub const LOG_ERROR: u32 = 1;
pub const LOG_WARN: u32 = 2;
pub const LOG_INFO: u32 = 3;
pub const LOG_DEBUG: u32 = 4;

/// A borrowed UTF-8 string: pointer and length in bytes (not NUL-terminated).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Str {
    pub ptr: *const u8,
    pub len: usize,
}

impl Str {
    pub const EMPTY: Str = Str {
        ptr: std::ptr::null(),
        len: 0,
    };

    /// Borrows a Rust string (valid while `s` is).
    pub const fn from_str(s: &str) -> Str {
        Str {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// Reads the string back.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes for the lifetime `'a`.
    /// Invalid UTF-8 is replaced, never trusted.
    pub unsafe fn to_str_lossy<'a>(self) -> std::borrow::Cow<'a, str> {
        if self.ptr.is_null() || self.len == 0 {
            return std::borrow::Cow::Borrowed("");
        }
        // SAFETY: guaranteed by the caller.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        // Valid UTF-8 is the rule (fast check); repair only if broken.
        // Chat text is mostly ASCII, which is checked a word at a time,
        // several times cheaper than the general check on short strings.
        if bytes.is_ascii() {
            // SAFETY: ASCII is valid UTF-8 (just checked).
            return std::borrow::Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(bytes) });
        }
        match std::str::from_utf8(bytes) {
            Ok(s) => std::borrow::Cow::Borrowed(s),
            Err(_) => String::from_utf8_lossy(bytes),
        }
    }
}

/// A chat message as a plugin sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MessageIn {
    pub epoch: u64,
    /// For `on_message`: the seq it will get if delivered. For
    /// `on_delivered`: its seq.
    pub seq: u64,
    pub from_id: u64,
    pub from: Str,
    pub text: Str,
    /// `FLAG_REPLAY`, `FLAG_BOT`, `FLAG_LAST_IN_BATCH`.
    pub flags: u32,
}

/// A verdict another plugin made, for `on_verdict`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VerdictIn {
    /// The plugin that made it.
    pub plugin: Str,
    /// `ACTION_DROP` or `ACTION_REWRITE`.
    pub action: u32,
    pub rule: Str,
    pub member_id: u64,
    pub member: Str,
}

/// What the host offers a plugin. Valid from `load` until `unload` returns.
/// Callbacks copy their arguments before returning.
#[repr(C)]
pub struct HostApi {
    /// Opaque; pass it back to every callback.
    pub ctx: *mut c_void,
    /// Posts a bot message (sequenced like any message, not fed back into
    /// the plugin that posted it). Allowed during any call.
    pub post: extern "C" fn(ctx: *mut c_void, text: Str),
    /// Sets the verdict of the current `on_message` call. Not calling it
    /// means deliver. `text` is the reason shown to the sender (drop) or the
    /// new text (rewrite); `rule` identifies the rule that decided.
    pub verdict: extern "C" fn(ctx: *mut c_void, action: u32, text: Str, rule: Str),
    /// Explains an `RC_ERROR` return (and a refused `load`).
    pub error: extern "C" fn(ctx: *mut c_void, message: Str),
    /// Writes to the node's diagnostics.
    pub log: extern "C" fn(ctx: *mut c_void, level: u32, message: Str),
    /// The only directory a plugin may write in: an absolute path that
    /// exists, valid as long as this `HostApi` (version 2).
    pub data_dir: Str,
    /// The chat's identity (32 hex digits, fixed when the chat started),
    /// valid as long as this `HostApi` (version 3). A plugin that keeps
    /// state across runs keeps it per chat.
    pub chat_id: Str,
    /// (Version 4.) From now on, `on_delivered` is called only for messages
    /// whose text starts with one of the prefixes declared this way (call
    /// once per prefix, usually in `load`; 1 to [`MAX_PREFIX_LEN`] bytes,
    /// at most [`MAX_DELIVER_PREFIXES`]; others are refused with a
    /// warning in the node's log). A plugin that never calls it hears
    /// every delivery. One that does never hears the others, so the
    /// batch's last message (`FLAG_LAST_IN_BATCH`) may be one it does not
    /// hear: such a plugin must not wait for that flag.
    pub deliver_only: extern "C" fn(ctx: *mut c_void, prefix: Str),
}

/// The plugin's entry points. Every function returns an `RC_*` code except
/// `unload`. `instance` is what `load` stored.
#[repr(C)]
pub struct Descriptor {
    /// [`OLDEST_ABI_VERSION`] to [`ABI_VERSION`]; checked before anything
    /// else is read.
    pub abi_version: u32,
    /// `size_of::<Descriptor>()` as the plugin was built; checked second.
    pub size: u32,
    /// `[a-z0-9_-]`, the name the host loads it by.
    pub name: Str,
    pub version: Str,
    /// Creates an instance from a JSON configuration (`{}` if none).
    pub load: unsafe extern "C" fn(config: Str, host: *const HostApi, instance: *mut *mut c_void) -> i32,
    /// Decides on a message before it is sequenced (call `HostApi::verdict`).
    pub on_message: unsafe extern "C" fn(instance: *mut c_void, msg: *const MessageIn) -> i32,
    /// Sees a message after it was sequenced and sent.
    pub on_delivered: unsafe extern "C" fn(instance: *mut c_void, msg: *const MessageIn) -> i32,
    /// Sees a drop or rewrite decided by another plugin.
    pub on_verdict: unsafe extern "C" fn(instance: *mut c_void, verdict: *const VerdictIn) -> i32,
    pub on_join: unsafe extern "C" fn(instance: *mut c_void, member_id: u64, name: Str) -> i32,
    pub on_leave: unsafe extern "C" fn(instance: *mut c_void, member_id: u64, name: Str, reason: Str) -> i32,
    /// Frees the instance. Called once; no call follows.
    pub unload: unsafe extern "C" fn(instance: *mut c_void),
}

// SAFETY: a descriptor holds only static strings and function pointers.
unsafe impl Sync for Descriptor {}
// SAFETY: the host serialises every call into one plugin instance.
unsafe impl Send for HostApi {}
