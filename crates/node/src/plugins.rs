//! The plugin host: loads bot plugins (cdylibs) by name from this node's
//! plugin directory, checks their descriptor, and runs the chain for the
//! core through [`Hooks`]. Every call is made from the actor task, one at a
//! time, so a plugin never sees concurrent calls and there is never a call
//! in flight when the set changes.
//!
//! Libraries are never unmapped: a Rust cdylib registers thread-local
//! destructors and may have started threads, and unmapping code that a
//! thread or destructor still points into crashes the process. A detached
//! plugin is unloaded (its `unload` runs, its instance is freed) but its
//! code stays mapped, inactive; attaching it again maps the same library.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use p2p_plugin_api::abi::{self, Descriptor, HostApi, MessageIn, Str, VerdictIn};
use p2p_proto::{limits, PluginRef, PluginState, PluginStatus};

use crate::core::check_plugin_name;
use crate::core::hooks::{
    Decision, HookMessage, HookReport, Hooks, Outcome, PluginEvent, VerdictAction, VerdictRecord,
};

/// The hooks, as bits of `Loaded::skip`.
#[derive(Clone, Copy)]
enum Hook {
    Message = 1,
    Delivered = 2,
    Verdict = 4,
    Join = 8,
    Leave = 16,
}

/// One call in this many is timed for `time_us` (a clock read can cost more
/// than a plugin call: at one in 8 the reads still showed in a profile of a
/// coordinator with the three bots).
const TIME_SAMPLE: u64 = 64;

/// What a plugin handed over during one call.
#[derive(Default)]
struct CallState {
    posts: Vec<String>,
    verdict: Option<(u32, String, String)>,
    error: Option<String>,
    /// Prefixes declared with `HostApi::deliver_only` during the call.
    only: Vec<String>,
}

/// Host-side context a plugin's callbacks reach through `HostApi::ctx`.
struct Ctx {
    name: String,
    call: Mutex<CallState>,
    /// Set (after the state is written) by every callback that hands
    /// something over: most calls hand nothing, and are then not locked.
    handed: AtomicBool,
    /// The data directory as handed to the plugin (`HostApi::data_dir`
    /// points into it).
    data_dir: String,
    /// The chat's id as handed to the plugin (`HostApi::chat_id`).
    chat_id: String,
}

fn ctx<'a>(p: *mut c_void) -> &'a Ctx {
    // SAFETY: `p` is the Box<Ctx> pointer we put in HostApi::ctx; it lives
    // as long as the plugin instance (and longer: it is never freed before
    // the library's instance is).
    unsafe { &*(p as *const Ctx) }
}

/// Copies a plugin string, bounded so a plugin cannot make us allocate
/// without limit.
fn take(s: Str) -> String {
    let capped = Str {
        ptr: s.ptr,
        len: s.len.min(64 * 1024),
    };
    // SAFETY: the plugin passes a string valid for the callback (ABI rule).
    unsafe { capped.to_str_lossy() }.into_owned()
}

/// Changes the call state of plugin context `c`, then marks it handed.
fn hand(c: *mut c_void, f: impl FnOnce(&mut CallState)) {
    let ctx = ctx(c);
    if let Ok(mut call) = ctx.call.lock() {
        f(&mut call);
    }
    ctx.handed.store(true, Ordering::Release);
}

extern "C" fn cb_post(c: *mut c_void, text: Str) {
    hand(c, |call| {
        if call.posts.len() < 16 {
            call.posts.push(take(text));
        }
    });
}

extern "C" fn cb_verdict(c: *mut c_void, action: u32, text: Str, rule: Str) {
    hand(c, |call| call.verdict = Some((action, take(text), take(rule))));
}

extern "C" fn cb_error(c: *mut c_void, message: Str) {
    hand(c, |call| call.error = Some(take(message)));
}

extern "C" fn cb_deliver_only(c: *mut c_void, prefix: Str) {
    let prefix = take(prefix);
    if prefix.is_empty() || prefix.len() > abi::MAX_PREFIX_LEN {
        tracing::warn!(
            plugin = %ctx(c).name,
            len = prefix.len(),
            "deliver_only prefix refused: it must be 1 to {} bytes",
            abi::MAX_PREFIX_LEN
        );
        return;
    }
    hand(c, |call| call.only.push(prefix));
}

extern "C" fn cb_log(c: *mut c_void, level: u32, message: Str) {
    let name = &ctx(c).name;
    let message = take(message);
    match level {
        abi::LOG_ERROR => tracing::error!(plugin = %name, "{message}"),
        abi::LOG_WARN => tracing::warn!(plugin = %name, "{message}"),
        abi::LOG_INFO => tracing::info!(plugin = %name, "{message}"),
        _ => tracing::debug!(plugin = %name, "{message}"),
    }
}

struct Loaded {
    name: String,
    version: String,
    /// The library file's identity (see [`PluginStatus::build`]).
    build: String,
    config: String,
    desc: &'static Descriptor,
    instance: *mut c_void,
    /// Boxed so their addresses stay fixed for the plugin.
    _api: Box<HostApi>,
    ctx: Box<Ctx>,
    quarantined: Option<String>,
    /// Hooks the plugin said it does not implement (`RC_UNIMPLEMENTED`):
    /// bit per `Hook`, never called again.
    skip: u8,
    /// The text prefixes of the deliveries it wants (`deliver_only`).
    only: Only,
    calls: u64,
    drops: u64,
    time: Duration,
}

impl Loaded {
    /// Takes the `deliver_only` prefixes a call declared.
    fn keep_prefixes(&mut self, state: &mut CallState) {
        if !state.only.is_empty() && !self.only.declare(state.only.drain(..)) {
            tracing::warn!(plugin = %self.name, "deliver_only: more than {} prefixes; the rest are ignored", abi::MAX_DELIVER_PREFIXES);
        }
    }

    /// Whether it wants to hear this delivery (see `deliver_only`).
    fn wants(&self, text: &str) -> bool {
        self.only.wants(text)
    }
}

/// The text prefixes of the deliveries a plugin hears (`deliver_only`);
/// none declared: all of them.
#[derive(Default)]
struct Only(Vec<String>);

impl Only {
    /// Adds prefixes (each 1 to `MAX_PREFIX_LEN` bytes, as the callback
    /// checked), at most `MAX_DELIVER_PREFIXES` in all; false if some had
    /// to be left out.
    fn declare(&mut self, prefixes: impl Iterator<Item = String>) -> bool {
        for prefix in prefixes {
            if self.0.contains(&prefix) {
                continue;
            }
            if self.0.len() >= abi::MAX_DELIVER_PREFIXES {
                return false;
            }
            self.0.push(prefix);
        }
        true
    }

    fn wants(&self, text: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|p| text.starts_with(p.as_str()))
    }
}

// SAFETY: a plugin instance is only ever called from the one task that
// owns the host (calls are serialised); moving it between threads is what
// the ABI allows (instances are `Send` in the safe layer).
unsafe impl Send for Loaded {}

/// A plugin that could not be loaded.
struct Refused {
    name: String,
    error: String,
}

/// The host: the loaded plugins in calling order.
pub struct PluginHost {
    dir: PathBuf,
    /// Where plugins may write (created when a plugin is first loaded).
    data_dir: PathBuf,
    /// The chat the loaded plugins serve.
    chat_id: String,
    /// Each library path mapped so far, with the build mapped there. The
    /// dynamic loader hands back the first mapping of a path for as long as
    /// the process lives (we never unmap), so a rebuilt file at the same
    /// path is loaded from a private copy instead.
    mapped: std::cell::RefCell<std::collections::HashMap<PathBuf, String>>,
    loaded: Vec<Loaded>,
    refused: Vec<Refused>,
    reports: Vec<HookReport>,
}

/// The file a plugin name maps to in `dir`.
pub fn plugin_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    ))
}

/// Why a plugin was not loaded. Its `Display` is the detail shown to the
/// user: the plugin, the file, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Ref(#[from] crate::core::PluginRefError),
    #[error("plugin {name}: no file at {} (plugins load from the node's --plugin-dir)", .path.display())]
    Missing { name: String, path: PathBuf },
    #[error("plugin {name}: cannot read {}: {source}", .path.display())]
    Unreadable {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin {name}: cannot stage the rebuilt {}: {source}", .path.display())]
    Staging {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin {name}: {} is not a loadable shared library: {why}", .path.display())]
    NotALibrary {
        name: String,
        path: PathBuf,
        why: String,
    },
    #[error("plugin {name}: {} has no `{}` symbol; it is not a p2pchat plugin (use p2p_plugin_api::export_plugin!)", .path.display(), abi::ENTRY_SYMBOL)]
    NoEntry { name: String, path: PathBuf },
    #[error("plugin {name}: {} returned no descriptor", .path.display())]
    NoDescriptor { name: String, path: PathBuf },
    #[error("plugin {name}: {} was built for plugin ABI version {found}, this node speaks versions {} to {}; rebuild it against this p2p-plugin-api", .path.display(), abi::OLDEST_ABI_VERSION, abi::ABI_VERSION)]
    AbiVersion { name: String, path: PathBuf, found: u32 },
    #[error("plugin {name}: {} has a descriptor of {found} bytes, expected {expected} for ABI version {}; rebuild it", .path.display(), abi::ABI_VERSION)]
    AbiSize {
        name: String,
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("plugin {name}: {} calls itself {calls_itself:?}; the file name and the plugin name must agree", .path.display())]
    NameMismatch {
        name: String,
        path: PathBuf,
        calls_itself: String,
    },
    #[error("plugin {name}: cannot prepare the data directory {}: {source}", .dir.display())]
    DataDir {
        name: String,
        dir: PathBuf,
        source: std::io::Error,
    },
    /// The plugin's own `load` refused (its configuration, usually).
    #[error("plugin {name}: load refused: {why}")]
    Refused { name: String, why: String },
}

/// Maps the library at `load_from` (the file `path`, or a private copy of
/// it) and checks its descriptor: entry symbol, ABI version and size, and
/// the name it gives itself.
fn open_descriptor(name: &str, path: &Path, load_from: &Path) -> Result<&'static Descriptor, LoadError> {
    let at = || (name.to_string(), path.to_path_buf());
    // SAFETY: loading a library runs its initialisers; the file lives in
    // the directory the operator chose for plugins (or is our private copy
    // of it), and its name comes from a validated plugin name, never from a
    // path sent by a peer.
    let lib = unsafe { libloading::Library::new(load_from) }.map_err(|e| {
        let (name, path) = at();
        LoadError::NotALibrary {
            name,
            path,
            why: e.to_string(),
        }
    })?;
    // Never unmapped (see the module docs).
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    // SAFETY: the symbol's type is fixed by the ABI.
    let entry: libloading::Symbol<'static, extern "C" fn() -> *const Descriptor> =
        unsafe { lib.get(abi::ENTRY_SYMBOL.as_bytes()) }.map_err(|_| {
            let (name, path) = at();
            LoadError::NoEntry { name, path }
        })?;
    let desc_ptr = entry();
    if desc_ptr.is_null() {
        let (name, path) = at();
        return Err(LoadError::NoDescriptor { name, path });
    }
    // SAFETY: read the two leading u32s first; every ABI version keeps them
    // at the start, so this is valid whatever the rest holds.
    let (found, size) = unsafe {
        let head = desc_ptr as *const u32;
        (head.read(), head.add(1).read())
    };
    if !(abi::OLDEST_ABI_VERSION..=abi::ABI_VERSION).contains(&found) {
        let (name, path) = at();
        return Err(LoadError::AbiVersion { name, path, found });
    }
    let expected = std::mem::size_of::<Descriptor>() as u32;
    if size != expected {
        let (name, path) = at();
        return Err(LoadError::AbiSize {
            name,
            path,
            found: size,
            expected,
        });
    }
    // SAFETY: version and size match: the descriptor has our layout and is
    // static in the (never unmapped) library.
    let desc: &'static Descriptor = unsafe { &*desc_ptr };
    // SAFETY: a static string of the descriptor.
    let calls_itself = unsafe { desc.name.to_str_lossy().into_owned() };
    if calls_itself != name {
        let (name, path) = at();
        return Err(LoadError::NameMismatch {
            name,
            path,
            calls_itself,
        });
    }
    Ok(desc)
}

impl PluginHost {
    pub fn new(dir: PathBuf, data_dir: PathBuf) -> PluginHost {
        PluginHost {
            dir,
            data_dir,
            chat_id: String::new(),
            mapped: Default::default(),
            loaded: Vec::new(),
            refused: Vec::new(),
            reports: Vec::new(),
        }
    }

    /// The build of the library at `path`, and where to load it from: the
    /// path itself, unless an older build of it is already mapped there
    /// (then a private copy named after the build).
    fn current_build(&self, name: &str, path: &Path) -> Result<(String, PathBuf), LoadError> {
        use sha2::Digest;
        let bytes = std::fs::read(path).map_err(|source| LoadError::Unreadable {
            name: name.to_string(),
            path: path.to_path_buf(),
            source,
        })?;
        let build = p2p_proto::secure::to_hex(&sha2::Sha256::digest(&bytes)[..6]);
        let mut mapped = self.mapped.borrow_mut();
        let first = mapped.entry(path.to_path_buf()).or_insert_with(|| build.clone());
        if *first == build {
            return Ok((build, path.to_path_buf()));
        }
        let dir = std::env::temp_dir().join(format!("p2pnode-{}-plugins", std::process::id()));
        let file = path
            .file_name()
            .map_or_else(|| name.into(), |f| f.to_string_lossy().into_owned());
        let copy = dir.join(format!("{build}-{file}"));
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&copy, &bytes))
            .map_err(|source| LoadError::Staging {
                name: name.to_string(),
                path: path.to_path_buf(),
                source,
            })?;
        tracing::info!(plugin = name, %build, "loading a rebuilt library from a private copy");
        Ok((build, copy))
    }

    /// Loads one plugin: checks the name, the file, the symbol, the ABI
    /// version and size, the name in the descriptor, then calls `load`.
    fn load(&self, p: &PluginRef) -> Result<Loaded, LoadError> {
        check_plugin_name(&p.name)?;
        let path = plugin_path(&self.dir, &p.name);
        if !path.exists() {
            return Err(LoadError::Missing {
                name: p.name.clone(),
                path,
            });
        }
        let (build, load_from) = self.current_build(&p.name, &path)?;
        let desc = open_descriptor(&p.name, &path, &load_from)?;
        // SAFETY: static strings of a descriptor whose layout was checked.
        let version = unsafe { desc.version.to_str_lossy().into_owned() };
        let (instance, api, ctx) = self.instantiate(p, desc)?;
        let mut loaded = Loaded {
            name: p.name.clone(),
            version,
            build,
            config: p.config.clone(),
            desc,
            instance,
            _api: api,
            ctx,
            quarantined: None,
            skip: 0,
            only: Only::default(),
            calls: 0,
            drops: 0,
            time: Duration::ZERO,
        };
        // What `load` declared (posts and verdicts mean nothing there).
        let mut declared = match loaded.ctx.call.lock() {
            Ok(mut c) => std::mem::take(&mut *c),
            Err(_) => CallState::default(),
        };
        loaded.ctx.handed.store(false, Ordering::Release);
        loaded.keep_prefixes(&mut declared);
        Ok(loaded)
    }

    /// Calls the plugin's `load` with its configuration and a host API
    /// bound to a fresh context; returns the instance, API and context
    /// (which must live as long as the instance).
    fn instantiate(
        &self,
        p: &PluginRef,
        desc: &'static Descriptor,
    ) -> Result<(*mut c_void, Box<HostApi>, Box<Ctx>), LoadError> {
        let data_dir = std::fs::create_dir_all(&self.data_dir)
            .and_then(|()| self.data_dir.canonicalize())
            .map_err(|source| LoadError::DataDir {
                name: p.name.clone(),
                dir: self.data_dir.clone(),
                source,
            })?;
        let ctx = Box::new(Ctx {
            name: p.name.clone(),
            call: Mutex::new(CallState::default()),
            handed: AtomicBool::new(false),
            data_dir: data_dir.to_string_lossy().into_owned(),
            chat_id: self.chat_id.clone(),
        });
        let api = Box::new(HostApi {
            ctx: &*ctx as *const Ctx as *mut c_void,
            post: cb_post,
            verdict: cb_verdict,
            error: cb_error,
            log: cb_log,
            data_dir: Str::from_str(&ctx.data_dir),
            chat_id: Str::from_str(&ctx.chat_id),
            deliver_only: cb_deliver_only,
        });
        let config = if p.config.trim().is_empty() {
            "{}"
        } else {
            &p.config
        };
        let mut instance: *mut c_void = std::ptr::null_mut();
        // SAFETY: arguments follow the ABI: a string valid for the call, a
        // HostApi that outlives the instance, a writable out-pointer.
        let rc = unsafe { (desc.load)(Str::from_str(config), &*api, &mut instance) };
        if rc != abi::RC_OK {
            let why = ctx.call.lock().ok().and_then(|mut c| c.error.take());
            return Err(LoadError::Refused {
                name: p.name.clone(),
                why: why.unwrap_or_else(|| {
                    if rc == abi::RC_PANIC {
                        "it panicked".into()
                    } else {
                        "no reason given".into()
                    }
                }),
            });
        }
        Ok((instance, api, ctx))
    }

    /// Whether plugin `i` is still called for `hook` (not quarantined, and
    /// it has not said it does nothing there).
    fn hears(&self, i: usize, hook: Hook) -> bool {
        let p = &self.loaded[i];
        p.quarantined.is_none() && p.skip & hook as u8 == 0
    }

    /// Calls hook `hook` of plugin `i`; quarantines it on an error or panic.
    fn call(&mut self, i: usize, hook: Hook, f: impl FnOnce(&Loaded) -> i32) -> Option<CallState> {
        if !self.hears(i, hook) {
            return None;
        }
        let p = &mut self.loaded[i];
        // No reset before the call: the state is taken (emptied) after every
        // call, so it starts empty (one lock per call, not two).
        // Time one call in TIME_SAMPLE (the clock costs more than most
        // plugin calls); the total is scaled up in `status`.
        let timed = p.calls.is_multiple_of(TIME_SAMPLE);
        let start = timed.then(Instant::now);
        let rc = f(p);
        if let Some(start) = start {
            p.time += start.elapsed();
        }
        p.calls += 1;
        // A load first: most calls hand nothing, and a swap costs a locked
        // instruction every time.
        let mut state = if p.ctx.handed.load(Ordering::Relaxed) && p.ctx.handed.swap(false, Ordering::Acquire)
        {
            p.ctx
                .call
                .lock()
                .map(|mut c| std::mem::take(&mut *c))
                .unwrap_or_default()
        } else {
            CallState::default()
        };
        p.keep_prefixes(&mut state);
        if rc == abi::RC_UNIMPLEMENTED {
            // The plugin does nothing here: never call this hook again.
            p.skip |= hook as u8;
            return Some(state);
        }
        if rc != abi::RC_OK {
            let why = state.error.clone().unwrap_or_else(|| match rc {
                abi::RC_PANIC => "it panicked".into(),
                _ => format!("it returned error code {rc}"),
            });
            tracing::error!(plugin = %p.name, %why, "plugin quarantined");
            p.quarantined = Some(why.clone());
            self.reports.push(HookReport {
                plugin: p.name.clone(),
                state: PluginEvent::Quarantined,
                detail: format!("{why}; it is no longer called and the chat goes on"),
            });
            return None;
        }
        Some(state)
    }

    fn posts_of(&self, i: usize, state: &mut CallState, out: &mut Vec<(String, String)>) {
        for text in state.posts.drain(..) {
            out.push((self.loaded[i].name.clone(), text));
        }
    }

    fn notify_verdict(&mut self, from: usize, action: u32, rule: &str, member_id: u64, member: &str) {
        let plugin = self.loaded[from].name.clone();
        for j in 0..self.loaded.len() {
            if j == from {
                continue;
            }
            let v = VerdictIn {
                plugin: Str::from_str(&plugin),
                action,
                rule: Str::from_str(rule),
                member_id,
                member: Str::from_str(member),
            };
            // SAFETY: instance from load; `v` and its strings outlive the call.
            let _ = self.call(j, Hook::Verdict, |p| unsafe {
                (p.desc.on_verdict)(p.instance, &v)
            });
        }
    }

    fn unload(p: Loaded) {
        if p.quarantined.is_none() {
            // SAFETY: the instance came from this plugin's load and is
            // unloaded once (the Loaded is consumed here).
            unsafe { (p.desc.unload)(p.instance) };
        }
        // A quarantined instance may be in any state: it is leaked, not
        // unloaded. Its Ctx and HostApi stay alive with it.
        if p.quarantined.is_some() {
            std::mem::forget(p);
        }
    }
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        for p in self.loaded.drain(..) {
            PluginHost::unload(p);
        }
    }
}

fn message_in(m: &HookMessage, flags: u32) -> MessageIn {
    let mut f = flags;
    if m.bot.is_some() {
        f |= abi::FLAG_BOT;
    }
    MessageIn {
        epoch: m.epoch,
        seq: m.seq,
        from_id: m.from_id,
        from: Str::from_str(m.from),
        text: Str::from_str(m.text),
        flags: f,
    }
}

impl Hooks for PluginHost {
    fn set_plugins(&mut self, chat_id: &str, set: &[PluginRef]) -> Vec<HookReport> {
        let mut reports = Vec::new();
        // Unload what left the set or changed configuration (everything,
        // for another chat).
        let same_chat = self.chat_id == chat_id;
        self.chat_id = chat_id.to_string();
        let mut keep = Vec::new();
        for p in self.loaded.drain(..) {
            if same_chat && set.iter().any(|s| s.name == p.name && s.config == p.config) {
                keep.push(p);
            } else {
                reports.push(HookReport {
                    plugin: p.name.clone(),
                    state: PluginEvent::Detached,
                    detail: String::new(),
                });
                PluginHost::unload(p);
            }
        }
        self.refused.clear();
        let mut ordered = Vec::new();
        for want in set {
            if let Some(pos) = keep.iter().position(|p| p.name == want.name) {
                ordered.push(keep.remove(pos));
                continue;
            }
            match self.load(want) {
                Ok(p) => {
                    reports.push(HookReport {
                        plugin: p.name.clone(),
                        state: PluginEvent::Loaded,
                        detail: format!("version {} (build {})", p.version, p.build),
                    });
                    ordered.push(p);
                }
                Err(error) => {
                    let error = error.to_string();
                    tracing::error!(%error, "plugin refused");
                    reports.push(HookReport {
                        plugin: want.name.clone(),
                        state: PluginEvent::Refused,
                        detail: error.clone(),
                    });
                    self.refused.push(Refused {
                        name: want.name.clone(),
                        error,
                    });
                }
            }
        }
        self.loaded = ordered;
        reports
    }

    fn on_message(&mut self, msg: &HookMessage) -> Outcome {
        // Copied only if a plugin rewrites it.
        let mut text: Option<String> = None;
        let mut verdicts = Vec::new();
        let mut posts = Vec::new();
        for i in 0..self.loaded.len() {
            if !self.hears(i, Hook::Message) || msg.bot == Some(self.loaded[i].name.as_str()) {
                continue;
            }
            let current = HookMessage {
                text: text.as_deref().unwrap_or(msg.text),
                ..*msg
            };
            let m = message_in(&current, 0);
            // SAFETY: instance from load; `m` borrows strings that outlive the call.
            let Some(mut state) = self.call(i, Hook::Message, |p| unsafe {
                (p.desc.on_message)(p.instance, &m)
            }) else {
                continue;
            };
            self.posts_of(i, &mut state, &mut posts);
            match state.verdict {
                Some((abi::ACTION_DROP, reason, rule)) => {
                    self.loaded[i].drops += 1;
                    verdicts.push(VerdictRecord {
                        plugin: self.loaded[i].name.clone(),
                        rule: rule.clone(),
                        action: VerdictAction::Drop,
                    });
                    self.notify_verdict(i, abi::ACTION_DROP, &rule, msg.from_id, msg.from);
                    let reason = if reason.is_empty() {
                        format!("dropped by {}", self.loaded[i].name)
                    } else {
                        reason
                    };
                    return Outcome {
                        decision: Decision::Drop { reason },
                        verdicts,
                        posts,
                    };
                }
                Some((abi::ACTION_REWRITE, new_text, rule)) => match limits::check_text(&new_text) {
                    Ok(()) => {
                        text = Some(new_text);
                        verdicts.push(VerdictRecord {
                            plugin: self.loaded[i].name.clone(),
                            rule: rule.clone(),
                            action: VerdictAction::Rewrite,
                        });
                        self.notify_verdict(i, abi::ACTION_REWRITE, &rule, msg.from_id, msg.from);
                    }
                    Err(e) => {
                        let plugin = self.loaded[i].name.clone();
                        tracing::warn!(%plugin, error = %e, "ignoring an invalid rewrite");
                        self.reports.push(HookReport {
                            detail: format!(
                                "rewrote {}'s message (rule {rule}) to an invalid text ({e}); the rewrite was ignored",
                                msg.from
                            ),
                            plugin,
                            state: PluginEvent::Ignored,
                        });
                    }
                },
                _ => {}
            }
        }
        Outcome {
            decision: Decision::Deliver(text),
            verdicts,
            posts,
        }
    }

    fn on_delivered(&mut self, msg: &HookMessage, replay: bool, last: bool) -> Vec<(String, String)> {
        let mut flags = if replay { abi::FLAG_REPLAY } else { 0 };
        if last {
            flags |= abi::FLAG_LAST_IN_BATCH;
        }
        let m = message_in(msg, flags);
        let mut posts = Vec::new();
        for i in 0..self.loaded.len() {
            if !self.hears(i, Hook::Delivered)
                || msg.bot == Some(self.loaded[i].name.as_str())
                || !self.loaded[i].wants(msg.text)
            {
                continue;
            }
            // SAFETY: instance from load; `m` borrows strings that outlive the call.
            if let Some(mut state) = self.call(i, Hook::Delivered, |p| unsafe {
                (p.desc.on_delivered)(p.instance, &m)
            }) {
                if !replay {
                    self.posts_of(i, &mut state, &mut posts);
                }
            }
        }
        posts
    }

    fn on_join(&mut self, id: u64, name: &str) -> Vec<(String, String)> {
        let mut posts = Vec::new();
        for i in 0..self.loaded.len() {
            // SAFETY: instance from load; `name` outlives the call.
            if let Some(mut state) = self.call(i, Hook::Join, |p| unsafe {
                (p.desc.on_join)(p.instance, id, Str::from_str(name))
            }) {
                self.posts_of(i, &mut state, &mut posts);
            }
        }
        posts
    }

    fn on_leave(&mut self, id: u64, name: &str, reason: &str) -> Vec<(String, String)> {
        let mut posts = Vec::new();
        for i in 0..self.loaded.len() {
            // SAFETY: instance from load; the strings outlive the call.
            let r = self.call(i, Hook::Leave, |p| unsafe {
                (p.desc.on_leave)(p.instance, id, Str::from_str(name), Str::from_str(reason))
            });
            if let Some(mut state) = r {
                self.posts_of(i, &mut state, &mut posts);
            }
        }
        posts
    }

    fn reports(&mut self) -> Vec<HookReport> {
        std::mem::take(&mut self.reports)
    }

    fn status(&self) -> Vec<PluginStatus> {
        let mut out: Vec<PluginStatus> = self
            .loaded
            .iter()
            .map(|p| PluginStatus {
                name: p.name.clone(),
                version: clip(&p.version, MAX_REPORTED_VERSION),
                build: p.build.clone(),
                state: if p.quarantined.is_some() {
                    PluginState::Quarantined
                } else {
                    PluginState::Active
                },
                calls: p.calls,
                drops: p.drops,
                time_us: (p.time.as_micros() as u64).saturating_mul(TIME_SAMPLE),
                error: p.quarantined.as_deref().map(|e| clip(e, MAX_REPORTED_ERROR)),
                hears: p.only.0.clone(),
            })
            .collect();
        out.extend(self.refused.iter().map(|r| PluginStatus {
            name: r.name.clone(),
            version: String::new(),
            build: String::new(),
            state: PluginState::Refused,
            calls: 0,
            drops: 0,
            time_us: 0,
            error: Some(clip(&r.error, MAX_REPORTED_ERROR)),
            hears: Vec::new(),
        }));
        out
    }

    fn active(&self) -> bool {
        self.loaded.iter().any(|p| p.quarantined.is_none())
    }
}

/// Longest plugin version a `status` answer repeats (a plugin's own string).
const MAX_REPORTED_VERSION: usize = 64;
/// Longest plugin error a `status` answer repeats (a plugin's own words).
const MAX_REPORTED_ERROR: usize = 512;

/// `text` cut to at most `max` bytes on a character boundary, marked with
/// an ellipsis when cut.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_prefixes_choose_the_deliveries_up_to_the_limit() {
        let mut only = Only::default();
        assert!(only.wants("anything"), "nothing declared: everything");
        assert!(only.declare(["!echo ".to_string(), "!e".to_string(), "!echo ".to_string()].into_iter()));
        assert!(only.wants("!echo hi") && only.wants("!e") && !only.wants("echo !e") && !only.wants(""));
        let more = (0..20).map(|i| format!("#{i}#"));
        assert!(!only.declare(more), "past the limit some are left out");
        assert_eq!(only.0.len(), abi::MAX_DELIVER_PREFIXES);
        assert!(only.wants("#13# x") && !only.wants("#14# x"));
    }

    fn host(dir: &Path) -> PluginHost {
        PluginHost::new(dir.to_path_buf(), dir.join("data"))
    }

    fn plugin(name: &str) -> PluginRef {
        PluginRef {
            name: name.into(),
            config: "{}".into(),
        }
    }

    #[test]
    fn refusals_before_the_library_runs_name_what_was_wrong() {
        let dir = std::env::temp_dir().join(format!("p2p-plugins-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let h = host(&dir);
        assert!(matches!(
            h.load(&plugin("../evil")),
            Err(LoadError::Ref(crate::core::PluginRefError::Name(n))) if n == "../evil"
        ));
        match h.load(&plugin("absent")) {
            Err(LoadError::Missing { name, path }) => {
                assert_eq!(name, "absent");
                assert_eq!(path, plugin_path(&dir, "absent"));
            }
            other => panic!("expected Missing, got {:?}", other.err()),
        }
        std::fs::write(plugin_path(&dir, "text"), "not a library").unwrap();
        let e = h.load(&plugin("text")).err();
        assert!(
            matches!(&e, Some(LoadError::NotALibrary { name, .. }) if name == "text"),
            "{e:?}"
        );
        assert!(e.is_some_and(|e| e.to_string().contains("is not a loadable shared library")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn plugin_references_are_checked_by_kind() {
        use crate::core::{check_plugin_config, PluginRefError};
        assert_eq!(check_plugin_config("echo", "{}"), Ok(()));
        assert!(matches!(
            check_plugin_config("echo", "null"),
            Err(PluginRefError::ConfigNotObject { found: "null", .. })
        ));
        assert!(matches!(
            check_plugin_config("echo", "[1]"),
            Err(PluginRefError::ConfigNotObject {
                found: "an array",
                ..
            })
        ));
        assert!(matches!(
            check_plugin_config("echo", "{"),
            Err(PluginRefError::ConfigNotJson { .. })
        ));
        let big = format!("{{\"x\":\"{}\"}}", "a".repeat(limits::MAX_PLUGIN_CONFIG));
        assert!(matches!(
            check_plugin_config("echo", &big),
            Err(PluginRefError::ConfigTooLarge { len, .. }) if len == big.len()
        ));
    }
}
