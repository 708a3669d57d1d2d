//! The p2pchat wire format: frame types, their encoding and the limits that
//! bound every input. No sockets and no tasks live here; docs/PROTOCOL.md is
//! the normative description of what this crate implements.

mod codec;
mod error;
mod frame;
pub mod limits;
#[cfg(feature = "net")]
pub mod net;
pub mod secure;

pub use codec::{
    batch_bodies, decode_body, encode, encode_chat, encode_chat_in, encode_entry, read_frame_sync,
    split_frame, BatchBodies, FrameArena,
};
pub use error::{ErrorCode, ProtoError};
pub use frame::{
    Chat, DigestRow, Entry, Frame, MemberInfo, PluginRef, PluginState, PluginStatus, Resume, Role, Seal, Seen,
};

/// Protocol version carried in every `hello`; a node refuses any other.
pub const PROTOCOL_VERSION: u32 = 3;

/// A random 64-bit value for process sessions and chat ids: from the
/// operating system's generator (`/dev/urandom`), or, where that cannot
/// be read, from the clock and process id mixed by std's hasher.
pub fn random_u64() -> u64 {
    use std::io::Read;
    let mut buf = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok()
    {
        return u64::from_le_bytes(buf) | 1;
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish() | 1
}
