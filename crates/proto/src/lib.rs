//! The p2pchat wire format: frame types, their encoding and the limits that
//! bound every input. No sockets and no tasks live here; docs/PROTOCOL.md is
//! the normative description of what this crate implements.

mod codec;
mod error;
mod frame;
pub mod limits;

pub use codec::{decode_body, encode, encode_chat, encode_entry, read_frame_sync, split_frame};
pub use error::{ErrorCode, ProtoError};
pub use frame::{Chat, Entry, Frame, MemberInfo, PluginRef, PluginState, PluginStatus, Resume, Role, Seen};

/// Protocol version carried in every `hello`; a node refuses any other.
pub const PROTOCOL_VERSION: u32 = 2;
