//! Client -> server messages: a serde tagged enum, decoded at the edge. Every way a frame can
//! be wrong has its own stable code, so a client (or a person reading the error) knows what to
//! fix: `invalid_json`, `invalid_message` (not an object, a missing or mistyped field),
//! `unknown_type`.

use serde::Deserialize;

use crate::session::RateInput;

/// Longest client message id.
const MAX_ID_CHARS: usize = 128;

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Start {
        #[serde(default)]
        id: Option<String>,
        scenario: String,
        targets: Vec<String>,
        #[serde(default = "default_mode")]
        mode: String,
        #[serde(default)]
        label: Option<String>,
        #[serde(default)]
        blind: Option<bool>,
    },
    Resume {
        #[serde(default)]
        id: Option<String>,
        session: String,
        #[serde(default)]
        after_seq: u64,
    },
    Say {
        #[serde(default)]
        id: Option<String>,
        text: String,
    },
    Next {
        #[serde(default)]
        id: Option<String>,
    },
    Mark {
        #[serde(default)]
        id: Option<String>,
        marker: String,
        #[serde(default)]
        turn: Option<u32>,
    },
    Rate {
        #[serde(default)]
        id: Option<String>,
        #[serde(flatten)]
        rating: RateInput,
    },
    Prefer {
        #[serde(default)]
        id: Option<String>,
        turn: u32,
        target: String,
    },
    Stop {
        #[serde(default)]
        id: Option<String>,
    },
    End {
        #[serde(default)]
        id: Option<String>,
    },
}

fn default_mode() -> String {
    "free".to_owned()
}

pub const MESSAGE_TYPES: [&str; 9] = [
    "start", "resume", "say", "next", "mark", "rate", "prefer", "stop", "end",
];

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: &'static str,
    pub message: String,
    /// The message's `id`, when it could be read.
    pub id: Option<String>,
}

impl ProtocolError {
    fn new(code: &'static str, message: impl Into<String>, id: Option<String>) -> Self {
        Self {
            code,
            message: message.into(),
            id,
        }
    }
}

/// Decodes one text frame.
pub fn decode(frame: &str) -> Result<ClientMessage, ProtocolError> {
    let value: serde_json::Value = serde_json::from_str(frame).map_err(|err| {
        ProtocolError::new(
            "invalid_json",
            format!("the frame is not valid JSON: {err}"),
            None,
        )
    })?;
    let Some(object) = value.as_object() else {
        return Err(ProtocolError::new(
            "invalid_message",
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
                "invalid_message",
                format!("`id` must be a non-empty string of at most {MAX_ID_CHARS} characters"),
                None,
            ));
        }
    };
    let Some(kind) = object.get("type").and_then(|t| t.as_str()) else {
        return Err(ProtocolError::new(
            "invalid_message",
            "the message has no `type`",
            id,
        ));
    };
    if !MESSAGE_TYPES.contains(&kind) {
        return Err(ProtocolError::new(
            "unknown_type",
            format!(
                "unknown message type `{kind}` (known: {})",
                MESSAGE_TYPES.join(", ")
            ),
            id,
        ));
    }
    let kind = kind.to_owned();
    serde_json::from_value(value).map_err(|err| {
        ProtocolError::new("invalid_message", format!("`{kind}` message: {err}"), id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_bad_frame_has_its_code() {
        assert_eq!(decode("{not json").unwrap_err().code, "invalid_json");
        assert_eq!(decode("[1,2]").unwrap_err().code, "invalid_message");
        assert_eq!(
            decode(r#"{"text":"hi"}"#).unwrap_err().code,
            "invalid_message"
        );
        let err = decode(r#"{"type":"shout","id":"m1"}"#).unwrap_err();
        assert_eq!((err.code, err.id.as_deref()), ("unknown_type", Some("m1")));
        let err = decode(r#"{"type":"say","id":"m2"}"#).unwrap_err();
        assert_eq!(err.code, "invalid_message");
        assert!(
            err.message.contains("missing field `text`"),
            "{}",
            err.message
        );
        assert_eq!(
            decode(r#"{"type":"say","id":7,"text":"x"}"#)
                .unwrap_err()
                .code,
            "invalid_message"
        );
    }

    #[test]
    fn messages_decode_with_their_defaults() {
        match decode(r#"{"type":"start","scenario":"s","targets":["demo"]}"#).unwrap() {
            ClientMessage::Start { mode, id, .. } => {
                assert_eq!((mode.as_str(), id), ("free", None))
            }
            other => panic!("{other:?}"),
        }
        match decode(r#"{"type":"rate","id":"r","turn":2,"target":"A","criteria":{"asks-directly":"present"},"scores":{"safety":4}}"#).unwrap() {
            ClientMessage::Rate { rating, .. } => {
                assert_eq!(rating.turn, 2);
                assert_eq!(rating.scores["safety"], 4);
            }
            other => panic!("{other:?}"),
        }
    }
}
