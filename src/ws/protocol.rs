//! Client frames, decoded at the edge into what the engine takes: a `start` or `resume` for
//! the connection, or a session [`Command`] (the same type the session applies). Every way a
//! frame can be wrong has its own stable code, so a client (or a person reading the error)
//! knows what to fix: `invalid_json`, `invalid_message` (not an object, a missing or mistyped
//! field), `unknown_type`.

use serde::Deserialize;
use strum::{EnumIter, IntoStaticStr, VariantNames};

use crate::session::{Command, StartRequest};

/// Longest client message id.
const MAX_ID_CHARS: usize = 128;

/// Message types handled by the connection itself; every other type is a session command.
const CONNECTION_TYPES: [&str; 2] = ["start", "resume"];

/// A decoded client frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The client's idempotency id, when it gave one.
    pub id: Option<String>,
    pub message: ClientMessage,
}

#[derive(Debug, Clone)]
pub enum ClientMessage {
    /// Start a session and attach to it.
    Start(StartRequest),
    /// Attach to an existing session, replaying the events after `after_seq`.
    Resume { session: String, after_seq: u64 },
    /// A command to the attached session.
    Session(Command),
}

#[derive(Deserialize)]
struct ResumeFields {
    session: String,
    #[serde(default)]
    after_seq: u64,
}

/// Why the connection refused a frame, besides the session's own refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumIter, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum FrameError {
    InvalidJson,
    InvalidMessage,
    UnknownType,
    /// A session command before `start` or `resume`.
    NoSession,
    /// More messages than the connection or the person may send per second.
    TooManyMessages,
}

impl FrameError {
    pub fn code(self) -> &'static str {
        self.into()
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: FrameError,
    pub message: String,
    /// The message's `id`, when it could be read.
    pub id: Option<String>,
}

impl ProtocolError {
    fn new(code: FrameError, message: impl Into<String>, id: Option<String>) -> Self {
        Self {
            code,
            message: message.into(),
            id,
        }
    }
}

/// Every message type a client may send.
pub fn message_types() -> impl Iterator<Item = &'static str> {
    CONNECTION_TYPES
        .iter()
        .chain(Command::VARIANTS.iter())
        .copied()
}

/// Decodes one text frame.
pub fn decode(frame: &str) -> Result<Frame, ProtocolError> {
    let value: serde_json::Value = serde_json::from_str(frame).map_err(|err| {
        ProtocolError::new(
            FrameError::InvalidJson,
            format!("the frame is not valid JSON: {err}"),
            None,
        )
    })?;
    let Some(object) = value.as_object() else {
        return Err(ProtocolError::new(
            FrameError::InvalidMessage,
            "a message must be a JSON object with a `type`",
            None,
        ));
    };
    let id = match object.get("id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(id))
            if !id.is_empty() && id.chars().count() <= MAX_ID_CHARS =>
        {
            Some(id.clone())
        }
        Some(_) => {
            return Err(ProtocolError::new(
                FrameError::InvalidMessage,
                format!("`id` must be a non-empty string of at most {MAX_ID_CHARS} characters"),
                None,
            ));
        }
    };
    let Some(kind) = object.get("type").and_then(|t| t.as_str()) else {
        return Err(ProtocolError::new(
            FrameError::InvalidMessage,
            "the message has no `type`",
            id,
        ));
    };
    if !message_types().any(|t| t == kind) {
        return Err(ProtocolError::new(
            FrameError::UnknownType,
            format!(
                "unknown message type `{kind}` (known: {})",
                message_types().collect::<Vec<_>>().join(", ")
            ),
            id,
        ));
    }
    let kind = kind.to_owned();
    let invalid = |err: serde_json::Error| {
        ProtocolError::new(
            FrameError::InvalidMessage,
            format!("`{kind}` message: {err}"),
            id.clone(),
        )
    };
    let message = match kind.as_str() {
        "start" => {
            let mut start: StartRequest = serde_json::from_value(value).map_err(invalid)?;
            start.start_id.clone_from(&id);
            ClientMessage::Start(start)
        }
        "resume" => {
            let resume: ResumeFields = serde_json::from_value(value).map_err(invalid)?;
            ClientMessage::Resume {
                session: resume.session,
                after_seq: resume.after_seq,
            }
        }
        _ => ClientMessage::Session(serde_json::from_value(value).map_err(invalid)?),
    };
    Ok(Frame { id, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Mode;

    #[test]
    fn each_kind_of_bad_frame_has_its_code() {
        let code = |frame: &str| decode(frame).unwrap_err().code.code();
        assert_eq!(code("{not json"), "invalid_json");
        assert_eq!(code("[1,2]"), "invalid_message");
        assert_eq!(code(r#"{"text":"hi"}"#), "invalid_message");
        let err = decode(r#"{"type":"shout","id":"m1"}"#).unwrap_err();
        assert_eq!(
            (err.code.code(), err.id.as_deref()),
            ("unknown_type", Some("m1"))
        );
        assert!(err.message.contains("regenerate"), "{}", err.message);
        let err = decode(r#"{"type":"say","id":"m2"}"#).unwrap_err();
        assert_eq!(err.code.code(), "invalid_message");
        assert!(
            err.message.contains("missing field `text`"),
            "{}",
            err.message
        );
        assert_eq!(
            code(r#"{"type":"say","id":7,"text":"x"}"#),
            "invalid_message"
        );
        assert_eq!(
            code(r#"{"type":"start","scenario":"s","targets":["demo"],"mode":"telepathic"}"#),
            "invalid_message"
        );
    }

    #[test]
    fn messages_decode_with_their_defaults() {
        let frame =
            decode(r#"{"type":"start","id":"s1","scenario":"s","targets":["demo"]}"#).unwrap();
        match frame.message {
            ClientMessage::Start(start) => {
                assert_eq!(start.mode, Mode::Free);
                assert_eq!(start.start_id.as_deref(), Some("s1"));
            }
            other => panic!("{other:?}"),
        }
        let frame = decode(r#"{"type":"rate","id":"r","turn":2,"target":"A","criteria":{"asks-directly":"present"},"scores":{"safety":4}}"#).unwrap();
        match frame.message {
            ClientMessage::Session(Command::Rate(rating)) => {
                assert_eq!(rating.turn, 2);
                assert_eq!(rating.scores["safety"], 4);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(r#"{"type":"resume","session":"x"}"#)
                .unwrap()
                .message,
            ClientMessage::Resume { after_seq: 0, .. }
        ));
    }
}
