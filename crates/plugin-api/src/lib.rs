//! Writing p2pchat bots: implement [`Plugin`], then call [`export_plugin!`]
//! once. The macro builds the C descriptor ([`abi`]) and wraps every call
//! in `catch_unwind`: a panic never crosses into the node, it becomes an
//! error code and the node quarantines the plugin.
//!
//! ```
//! use p2p_plugin_api::{export_plugin, Host, Message, Plugin, Verdict};
//!
//! struct Shout;
//! impl Plugin for Shout {
//!     const NAME: &'static str = "shout";
//!     const VERSION: &'static str = "1.0.0";
//!     fn load(_config: &str, _host: &Host) -> Result<Self, String> { Ok(Shout) }
//!     fn on_message(&mut self, msg: &Message, _host: &Host) -> Verdict {
//!         Verdict::Rewrite { text: msg.text.to_uppercase(), rule: "shout".into() }
//!     }
//! }
//! export_plugin!(Shout);
//! ```
//!
//! docs/PLUGINS.md is the full guide.

pub mod abi;

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

pub use serde;
pub use serde_json as json;

use abi::{HostApi, MessageIn, Str, VerdictIn};

/// A chat message, borrowed for the duration of a call.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub epoch: u64,
    /// In `on_message`: the seq it will get if delivered.
    pub seq: u64,
    pub from_id: u64,
    pub from: &'a str,
    pub text: &'a str,
    /// History replayed after this node took over (already delivered).
    pub replay: bool,
    /// Posted by a bot.
    pub bot: bool,
    /// In `on_delivered`: the last message of a batch delivered at once;
    /// none of the batch reaches the members before this call returns
    /// (the point to write what the batch's calls gathered).
    pub last_in_batch: bool,
}

/// A plugin's decision on a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Deliver,
    /// Not delivered; `reason` is shown to the sender.
    Drop {
        reason: String,
        rule: String,
    },
    /// Delivered with `text` instead.
    Rewrite {
        text: String,
        rule: String,
    },
}

/// A verdict made by another plugin.
#[derive(Debug, Clone, Copy)]
pub struct VerdictSeen<'a> {
    pub plugin: &'a str,
    /// `"drop"` or `"rewrite"`.
    pub action: &'a str,
    pub rule: &'a str,
    pub member_id: u64,
    pub member: &'a str,
}

/// What the node offers: posting bot messages and logging.
pub struct Host {
    api: *const HostApi,
}

impl Host {
    /// A host that drops everything: for unit-testing a plugin's logic
    /// without a node.
    pub fn detached() -> Host {
        Host {
            api: std::ptr::null(),
        }
    }

    fn api(&self) -> Option<&HostApi> {
        // SAFETY: the node keeps the HostApi alive from load to unload, and
        // a non-detached Host only exists within that span.
        unsafe { self.api.as_ref() }
    }

    /// Posts a bot message as this plugin.
    pub fn post(&self, text: &str) {
        let Some(api) = self.api() else { return };
        (api.post)(api.ctx, Str::from_str(text));
    }

    /// Hears only the deliveries whose text starts with `prefix` (call once
    /// per prefix, usually in `load`): a bot that answers commands
    /// (`!echo …`) then costs nothing on other messages. See
    /// [`abi::HostApi::deliver_only`] for the limits, and do not wait for
    /// `last_in_batch` in a bot that filters.
    pub fn deliver_only_prefixed(&self, prefix: &str) {
        let Some(api) = self.api() else { return };
        (api.deliver_only)(api.ctx, Str::from_str(prefix));
    }

    pub fn log_info(&self, message: &str) {
        let Some(api) = self.api() else { return };
        (api.log)(api.ctx, abi::LOG_INFO, Str::from_str(message));
    }

    pub fn log_warn(&self, message: &str) {
        let Some(api) = self.api() else { return };
        (api.log)(api.ctx, abi::LOG_WARN, Str::from_str(message));
    }

    fn verdict(&self, v: &Verdict) {
        let Some(api) = self.api() else { return };
        match v {
            Verdict::Deliver => {}
            Verdict::Drop { reason, rule } => (api.verdict)(
                api.ctx,
                abi::ACTION_DROP,
                Str::from_str(reason),
                Str::from_str(rule),
            ),
            Verdict::Rewrite { text, rule } => (api.verdict)(
                api.ctx,
                abi::ACTION_REWRITE,
                Str::from_str(text),
                Str::from_str(rule),
            ),
        }
    }

    /// Reports that this plugin can no longer do its job (a full disk, a
    /// lost file): the node quarantines it with `reason`, shows that in
    /// `p2pctl plugins` and its events, and stops calling it. The chat goes
    /// on. Effective when called from a hook (`on_message`,
    /// `on_delivered`, …).
    pub fn fail(&self, reason: &str) {
        self.error(reason);
        FAILED.with(|d| d.set(true));
    }

    fn error(&self, message: &str) {
        let Some(api) = self.api() else { return };
        (api.error)(api.ctx, Str::from_str(message));
    }

    /// The node's data directory: the only place a plugin writes.
    pub fn data_dir(&self) -> Option<std::path::PathBuf> {
        let api = self.api()?;
        if api.data_dir.len == 0 {
            return None;
        }
        // SAFETY: the host keeps the string valid as long as the HostApi.
        let dir = unsafe { api.data_dir.to_str_lossy() }.into_owned();
        Some(dir.into())
    }

    /// The identity of the chat this plugin serves (fixed when the chat
    /// started; a new chat after `p2pctl down` and `up` has a new one).
    pub fn chat_id(&self) -> String {
        match self.api() {
            // SAFETY: the host keeps the string valid as long as the HostApi.
            Some(api) => unsafe { api.chat_id.to_str_lossy() }.into_owned(),
            None => String::new(),
        }
    }

    /// Where a file named in a plugin's configuration may be written:
    /// `relative` inside the data directory, and only there. Absolute
    /// paths, `..`, and symbolic links that lead out are refused, with a
    /// sentence saying why.
    ///
    /// # Errors
    /// When the path would leave the data directory, or there is none.
    pub fn confined_path(&self, relative: &str) -> Result<std::path::PathBuf, String> {
        let dir = self
            .data_dir()
            .ok_or("this node gives plugins no data directory to write in")?;
        confine(&dir, relative)
    }
}

/// [`Host::confined_path`] against a given directory.
///
/// # Errors
/// As [`Host::confined_path`].
pub fn confine(dir: &std::path::Path, relative: &str) -> Result<std::path::PathBuf, String> {
    use std::path::Component;
    let rel = std::path::Path::new(relative);
    if relative.is_empty() || relative.len() > 255 {
        return Err(format!("path {relative:?} must be 1 to 255 bytes"));
    }
    for c in rel.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "path {relative:?} must not contain '..': files stay in the node's data directory"
                ))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "path {relative:?} must be relative to the node's data directory ({}), not absolute",
                    dir.display()
                ))
            }
        }
    }
    let root = dir
        .canonicalize()
        .map_err(|e| format!("the data directory {} cannot be used: {e}", dir.display()))?;
    let full = root.join(rel);
    let parent = full.parent().unwrap_or(&root);
    let real_parent = parent.canonicalize().map_err(|e| {
        format!(
            "path {relative:?}: the directory {} does not exist: {e}",
            parent.display()
        )
    })?;
    if !real_parent.starts_with(&root) {
        return Err(format!(
            "path {relative:?} leads out of the data directory {} through a symbolic link",
            root.display()
        ));
    }
    if let Ok(meta) = std::fs::symlink_metadata(&full) {
        if meta.file_type().is_symlink() {
            return Err(format!(
                "path {relative:?} is a symbolic link; plugins write only to plain files"
            ));
        }
        if !meta.is_file() {
            return Err(format!("path {relative:?} is not a plain file"));
        }
    }
    Ok(full)
}

/// A bot. Every method but `load` has a default that does nothing.
pub trait Plugin: Sized + Send + 'static {
    /// `[a-z0-9_-]`; must match the name the node loads it by.
    const NAME: &'static str;
    const VERSION: &'static str;

    /// Builds the bot from its JSON configuration (`{}` when none).
    ///
    /// # Errors
    /// A sentence saying what is wrong with the configuration; the node
    /// refuses the plugin with it.
    fn load(config: &str, host: &Host) -> Result<Self, String>;

    /// Decides on a message before it is sequenced.
    fn on_message(&mut self, _msg: &Message, _host: &Host) -> Verdict {
        defaulted();
        Verdict::Deliver
    }

    /// Sees every delivered message (bot messages included, except this
    /// plugin's own), after sequencing.
    fn on_delivered(&mut self, _msg: &Message, _host: &Host) {
        defaulted();
    }

    /// Sees drops and rewrites made by other plugins.
    fn on_verdict(&mut self, _verdict: &VerdictSeen, _host: &Host) {
        defaulted();
    }

    fn on_join(&mut self, _member_id: u64, _name: &str, _host: &Host) {
        defaulted();
    }

    fn on_leave(&mut self, _member_id: u64, _name: &str, _reason: &str, _host: &Host) {
        defaulted();
    }
}

thread_local! {
    /// Set by a default trait method: the plugin does nothing for that hook,
    /// so the shim tells the host it may stop calling it.
    static DEFAULTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

thread_local! {
    /// Set by [`Host::fail`] during a hook: the shim returns `RC_ERROR`.
    static FAILED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn defaulted() {
    DEFAULTED.with(|d| d.set(true));
}

/// Runs a hook; `RC_UNIMPLEMENTED` if it was a default method, `RC_ERROR`
/// if it called [`Host::fail`].
fn hook(f: impl FnOnce()) -> i32 {
    DEFAULTED.with(|d| d.set(false));
    FAILED.with(|d| d.set(false));
    f();
    if FAILED.with(|d| d.replace(false)) {
        abi::RC_ERROR
    } else if DEFAULTED.with(|d| d.get()) {
        abi::RC_UNIMPLEMENTED
    } else {
        abi::RC_OK
    }
}

/// The instance behind the C pointer.
#[doc(hidden)]
pub struct Instance<P> {
    plugin: P,
    host: Host,
}

/// Runs `f`, turning a panic into `RC_PANIC` (reported through the host
/// when possible).
fn guard(host: Option<&Host>, f: impl FnOnce() -> i32) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(rc) => rc,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            if let Some(h) = host {
                let _ = catch_unwind(AssertUnwindSafe(|| h.error(&format!("panicked: {what}"))));
            }
            abi::RC_PANIC
        }
    }
}

/// # Safety
/// `msg` must be a valid MessageIn for the call.
unsafe fn message<'a>(msg: *const MessageIn) -> Message<'a> {
    // SAFETY: per the ABI the host passes a valid pointer for the call.
    let m = unsafe { &*msg };
    // SAFETY: strings are valid for the call (ABI rule).
    let (from, text) = unsafe { (m.from.to_str_lossy(), m.text.to_str_lossy()) };
    Message {
        epoch: m.epoch,
        seq: m.seq,
        from_id: m.from_id,
        from: leak_cow(from),
        text: leak_cow(text),
        replay: m.flags & abi::FLAG_REPLAY != 0,
        bot: m.flags & abi::FLAG_BOT != 0,
        last_in_batch: m.flags & abi::FLAG_LAST_IN_BATCH != 0,
    }
}

/// Keeps a borrowed Cow borrowed; an owned one (invalid UTF-8 replaced)
/// lives for the call through a thread-local arena cleared at each call.
fn leak_cow<'a>(c: std::borrow::Cow<'a, str>) -> &'a str {
    match c {
        std::borrow::Cow::Borrowed(s) => s,
        std::borrow::Cow::Owned(s) => ARENA.with(|a| {
            let mut a = a.borrow_mut();
            a.push(s);
            let last: &str = a.last().map(String::as_str).unwrap_or("");
            // SAFETY: the arena keeps the String alive until the next call
            // on this thread clears it; the borrow does not outlive the call.
            unsafe { &*(last as *const str) }
        }),
    }
}

thread_local! {
    static ARENA: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn clear_arena() {
    ARENA.with(|a| a.borrow_mut().clear());
}

/// # Safety
/// `instance` must come from `shim_load::<P>`.
unsafe fn inst<'a, P>(instance: *mut c_void) -> &'a mut Instance<P> {
    // SAFETY: guaranteed by the caller.
    unsafe { &mut *(instance as *mut Instance<P>) }
}

#[doc(hidden)]
pub unsafe extern "C" fn shim_load<P: Plugin>(
    config: Str,
    host: *const HostApi,
    out: *mut *mut c_void,
) -> i32 {
    if host.is_null() || out.is_null() {
        return abi::RC_ERROR;
    }
    let h = Host { api: host };
    guard(Some(&h), || {
        // SAFETY: valid for the call per the ABI.
        let config = unsafe { config.to_str_lossy() }.into_owned();
        match P::load(&config, &h) {
            Ok(plugin) => {
                let boxed = Box::new(Instance {
                    plugin,
                    host: Host { api: host },
                });
                // SAFETY: `out` is non-null and writable per the ABI.
                unsafe { *out = Box::into_raw(boxed) as *mut c_void };
                abi::RC_OK
            }
            Err(e) => {
                h.error(&e);
                abi::RC_ERROR
            }
        }
    })
}

#[doc(hidden)]
pub unsafe extern "C" fn shim_on_message<P: Plugin>(instance: *mut c_void, msg: *const MessageIn) -> i32 {
    // SAFETY: the host passes back the pointer from load.
    let i = unsafe { inst::<P>(instance) };
    let host = Host { api: i.host.api };
    guard(Some(&host), || {
        clear_arena();
        // SAFETY: valid for the call.
        let m = unsafe { message(msg) };
        let mut v = Verdict::Deliver;
        let rc = hook(|| v = i.plugin.on_message(&m, &i.host));
        i.host.verdict(&v);
        rc
    })
}

#[doc(hidden)]
pub unsafe extern "C" fn shim_on_delivered<P: Plugin>(instance: *mut c_void, msg: *const MessageIn) -> i32 {
    // SAFETY: the host passes back the pointer from load.
    let i = unsafe { inst::<P>(instance) };
    let host = Host { api: i.host.api };
    guard(Some(&host), || {
        clear_arena();
        // SAFETY: valid for the call.
        let m = unsafe { message(msg) };
        hook(|| i.plugin.on_delivered(&m, &i.host))
    })
}

#[doc(hidden)]
pub unsafe extern "C" fn shim_on_verdict<P: Plugin>(instance: *mut c_void, v: *const VerdictIn) -> i32 {
    // SAFETY: the host passes back the pointer from load.
    let i = unsafe { inst::<P>(instance) };
    let host = Host { api: i.host.api };
    guard(Some(&host), || {
        clear_arena();
        // SAFETY: valid for the call.
        let v = unsafe { &*v };
        // SAFETY: strings valid for the call.
        let (plugin, rule, member) = unsafe {
            (
                v.plugin.to_str_lossy(),
                v.rule.to_str_lossy(),
                v.member.to_str_lossy(),
            )
        };
        let seen = VerdictSeen {
            plugin: leak_cow(plugin),
            action: if v.action == abi::ACTION_DROP {
                "drop"
            } else {
                "rewrite"
            },
            rule: leak_cow(rule),
            member_id: v.member_id,
            member: leak_cow(member),
        };
        hook(|| i.plugin.on_verdict(&seen, &i.host))
    })
}

#[doc(hidden)]
pub unsafe extern "C" fn shim_on_join<P: Plugin>(instance: *mut c_void, id: u64, name: Str) -> i32 {
    // SAFETY: the host passes back the pointer from load.
    let i = unsafe { inst::<P>(instance) };
    let host = Host { api: i.host.api };
    guard(Some(&host), || {
        // SAFETY: valid for the call.
        let name = unsafe { name.to_str_lossy() };
        hook(|| i.plugin.on_join(id, &name, &i.host))
    })
}

#[doc(hidden)]
pub unsafe extern "C" fn shim_on_leave<P: Plugin>(
    instance: *mut c_void,
    id: u64,
    name: Str,
    reason: Str,
) -> i32 {
    // SAFETY: the host passes back the pointer from load.
    let i = unsafe { inst::<P>(instance) };
    let host = Host { api: i.host.api };
    guard(Some(&host), || {
        // SAFETY: valid for the call.
        let (name, reason) = unsafe { (name.to_str_lossy(), reason.to_str_lossy()) };
        hook(|| i.plugin.on_leave(id, &name, &reason, &i.host))
    })
}

#[doc(hidden)]
pub unsafe extern "C" fn shim_unload<P: Plugin>(instance: *mut c_void) {
    if instance.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the pointer came from Box::into_raw in shim_load and the
        // host calls unload once.
        drop(unsafe { Box::from_raw(instance as *mut Instance<P>) });
    }));
}

/// Exports a [`Plugin`] type as a p2pchat bot: defines the entry symbol
/// returning its descriptor. Use once per library.
#[macro_export]
macro_rules! export_plugin {
    ($ty:ty) => {
        #[no_mangle]
        pub extern "C" fn p2pchat_plugin_entry() -> *const $crate::abi::Descriptor {
            static DESCRIPTOR: $crate::abi::Descriptor = $crate::abi::Descriptor {
                abi_version: $crate::abi::ABI_VERSION,
                size: ::std::mem::size_of::<$crate::abi::Descriptor>() as u32,
                name: $crate::abi::Str::from_str(<$ty as $crate::Plugin>::NAME),
                version: $crate::abi::Str::from_str(<$ty as $crate::Plugin>::VERSION),
                load: $crate::shim_load::<$ty>,
                on_message: $crate::shim_on_message::<$ty>,
                on_delivered: $crate::shim_on_delivered::<$ty>,
                on_verdict: $crate::shim_on_verdict::<$ty>,
                on_join: $crate::shim_on_join::<$ty>,
                on_leave: $crate::shim_on_leave::<$ty>,
                unload: $crate::shim_unload::<$ty>,
            };
            &DESCRIPTOR
        }
    };
}

#[cfg(test)]
mod tests {
    use super::confine;
    use crate::abi::Str;

    /// Strings from the host: ASCII and other valid UTF-8 borrowed as they
    /// are, anything else repaired, never trusted.
    #[test]
    fn host_strings_are_checked_and_borrowed_when_valid() {
        let read = |b: &[u8]| {
            let s = Str {
                ptr: b.as_ptr(),
                len: b.len(),
            };
            // SAFETY: `b` outlives the call.
            let c = unsafe { s.to_str_lossy() };
            (matches!(c, std::borrow::Cow::Borrowed(_)), c.into_owned())
        };
        assert_eq!(read(b"plain ascii ~\x7f"), (true, "plain ascii ~\x7f".into()));
        assert_eq!(
            read("zo\u{eb} \u{1f389}".as_bytes()),
            (true, "zo\u{eb} \u{1f389}".into())
        );
        assert_eq!(read(b"bad \xff end"), (false, "bad \u{fffd} end".into()));
        assert_eq!(read(b"cut \xc3"), (false, "cut \u{fffd}".into()));
        assert_eq!(read(b""), (true, String::new()));
    }

    #[test]
    fn plugin_files_stay_in_the_data_directory() {
        let root = std::env::temp_dir().join(format!("p2p-confine-{}", std::process::id()));
        let data = root.join("data");
        std::fs::create_dir_all(data.join("sub")).unwrap();
        let real = data.canonicalize().unwrap();
        assert_eq!(confine(&data, "t.jsonl").unwrap(), real.join("t.jsonl"));
        assert_eq!(confine(&data, "sub/t.jsonl").unwrap(), real.join("sub/t.jsonl"));
        for (bad, why) in [
            ("/etc/passwd", "not absolute"),
            ("../escape", "'..'"),
            ("sub/../../escape", "'..'"),
            ("", "1 to 255"),
            ("nodir/t.jsonl", "does not exist"),
        ] {
            let e = confine(&data, bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // Symbolic links that lead out are refused, as a file or a directory.
        std::os::unix::fs::symlink("/tmp", data.join("out")).unwrap();
        std::os::unix::fs::symlink(root.join("victim"), data.join("link.jsonl")).unwrap();
        let e = confine(&data, "out/t.jsonl").unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        let e = confine(&data, "link.jsonl").unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
