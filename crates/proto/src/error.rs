//! Protocol errors and the codes carried by `error` frames.

use serde::{Deserialize, Serialize};

/// Machine-readable reason in an `error` frame. Clients branch on this; the
/// accompanying `message` is for humans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The length prefix announced a body over the frame limit.
    FrameTooLarge,
    /// The body is not valid UTF-8.
    BadUtf8,
    /// The body is not a JSON object with a string `type`.
    BadJson,
    /// The `type` is not one this version knows.
    UnknownType,
    /// A known type with missing or wrongly typed fields.
    BadField,
    /// The frame is valid but not allowed in this state (e.g. `say` before `hello`).
    UnexpectedFrame,
    /// The `hello` carried another protocol version.
    VersionMismatch,
    /// The name is already used by a live member.
    NameTaken,
    /// The name breaks the naming rules.
    BadName,
    /// No `hello` arrived within the handshake timeout.
    HandshakeTimeout,
    /// The member did not read fast enough; its queue overflowed.
    SlowConsumer,
    /// An election is under way; retry shortly.
    Electing,
    /// The node was asked to take over but still hears from the coordinator.
    CoordinatorAlive,
    /// The frame belongs to an older epoch.
    StaleEpoch,
    /// The chat is full.
    TooManyMembers,
    /// The node is shutting down.
    ShuttingDown,
    /// A plugin could not be attached (missing, wrong ABI, bad config…).
    PluginRefused,
    /// The connection did not prove it holds the chat key, or a resume did
    /// not prove it is the member it names.
    Unauthenticated,
    /// A `resume` for another chat reached a node of this one (the process
    /// the resumer knew at this address is gone).
    AnotherChat,
    /// A code from a newer peer that this version does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::BadUtf8 => "bad_utf8",
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadField => "bad_field",
            ErrorCode::UnexpectedFrame => "unexpected_frame",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::BadName => "bad_name",
            ErrorCode::HandshakeTimeout => "handshake_timeout",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::Electing => "electing",
            ErrorCode::CoordinatorAlive => "coordinator_alive",
            ErrorCode::StaleEpoch => "stale_epoch",
            ErrorCode::TooManyMembers => "too_many_members",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::PluginRefused => "plugin_refused",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::AnotherChat => "another_chat",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why bytes could not be turned into a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// The length prefix is larger than the limit; nothing was allocated.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    /// The body is not UTF-8.
    #[error("frame body is not valid UTF-8")]
    BadUtf8,
    /// The body is not a JSON object with a string `type` field.
    #[error("frame body is not a JSON object with a \"type\" field: {0}")]
    BadJson(String),
    /// The `type` field names no known frame.
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    /// A known frame type whose fields are missing or invalid.
    #[error("invalid {kind} frame: {detail}")]
    BadField { kind: String, detail: String },
}

impl ProtoError {
    /// The code to put in the `error` frame answering this.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtoError::BadUtf8 => ErrorCode::BadUtf8,
            ProtoError::BadJson(_) => ErrorCode::BadJson,
            ProtoError::UnknownType(_) => ErrorCode::UnknownType,
            ProtoError::BadField { .. } => ErrorCode::BadField,
        }
    }
}
