//! A test library with a descriptor no node may accept: it claims a future
//! ABI version, or, with `P2P_TEST_SHORT_DESCRIPTOR` set in the
//! environment, the current version with a descriptor 8 bytes shorter than
//! the current layout (a library built against a changed layout). Nodes must refuse both and name what they
//! found. With `P2P_TEST_ABI=2` or `3` it claims that version instead:
//! too old, and the oldest still spoken (whose `load` then refuses).
//! Written by hand, without the macro.

use p2p_plugin_api::abi::{Descriptor, HostApi, MessageIn, Str, VerdictIn, RC_ERROR};
use std::ffi::c_void;

extern "C" fn load(_c: Str, _h: *const HostApi, _o: *mut *mut c_void) -> i32 {
    RC_ERROR
}
extern "C" fn msg(_i: *mut c_void, _m: *const MessageIn) -> i32 {
    RC_ERROR
}
extern "C" fn verdict(_i: *mut c_void, _v: *const VerdictIn) -> i32 {
    RC_ERROR
}
extern "C" fn join(_i: *mut c_void, _id: u64, _n: Str) -> i32 {
    RC_ERROR
}
extern "C" fn leave(_i: *mut c_void, _id: u64, _n: Str, _r: Str) -> i32 {
    RC_ERROR
}
extern "C" fn unload(_i: *mut c_void) {}

const fn descriptor(abi_version: u32, size: u32) -> Descriptor {
    Descriptor {
        abi_version,
        size,
        name: Str::from_str("test_oldabi"),
        version: Str::from_str("0.0.1"),
        load,
        on_message: msg,
        on_delivered: msg,
        on_verdict: verdict,
        on_join: join,
        on_leave: leave,
        unload,
    }
}

const SIZE: u32 = std::mem::size_of::<Descriptor>() as u32;
static FUTURE: Descriptor = descriptor(99, SIZE);
static SHORT: Descriptor = descriptor(p2p_plugin_api::abi::ABI_VERSION, SIZE - 8);
static V2: Descriptor = descriptor(2, SIZE);
static V3: Descriptor = descriptor(3, SIZE);

#[no_mangle]
pub extern "C" fn p2pchat_plugin_entry() -> *const Descriptor {
    if std::env::var_os("P2P_TEST_SHORT_DESCRIPTOR").is_some() {
        return &SHORT;
    }
    match std::env::var("P2P_TEST_ABI").as_deref() {
        Ok("2") => &V2,
        Ok("3") => &V3,
        _ => &FUTURE,
    }
}
