//! A test fixture: a valid shared library that is not a p2pchat plugin
//! (no `p2pchat_plugin_entry` symbol), so nodes must refuse it by name.

/// Something to export, so the library is not empty.
#[no_mangle]
pub extern "C" fn p2pchat_fixture_unrelated() -> i32 {
    7
}
