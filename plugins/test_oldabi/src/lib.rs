//! A test library that claims a future ABI version, to check that nodes
//! refuse it with both versions named. Written by hand, without the macro.

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

static DESCRIPTOR: Descriptor = Descriptor {
    abi_version: 99,
    size: std::mem::size_of::<Descriptor>() as u32,
    name: Str::from_str("test_oldabi"),
    version: Str::from_str("0.0.1"),
    load,
    on_message: msg,
    on_delivered: msg,
    on_verdict: verdict,
    on_join: join,
    on_leave: leave,
    unload,
};

#[no_mangle]
pub extern "C" fn p2pchat_plugin_entry() -> *const Descriptor {
    &DESCRIPTOR
}
