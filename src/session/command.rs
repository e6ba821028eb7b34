//! What a session is asked to do, and by whom: one [`Command`] type from the wire to the state
//! machine. The WebSocket edge decodes a client frame straight into a `Command` (serde, tagged
//! by `type`); the batch runner builds the same values. Every command travels in a [`Request`]
//! that carries the [`Principal`] who sent it and the client's idempotency id.

use std::fmt;

use serde::Deserialize;
use strum::{EnumDiscriminants, EnumIter, IntoStaticStr, VariantNames};

use super::RateInput;

/// Who sent a command or gave a rating. Ratings of different principals never supersede each
/// other; a newer rating by the same principal does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A person, by the name they gave (accounts will fill this in later).
    Human(String),
    /// An LLM judge, by its model.
    Judge(String),
    /// The rules engine.
    Rules,
}

/// Longest display name a person may give.
pub const MAX_NAME_CHARS: usize = 64;

impl Principal {
    /// A person by a display name: 1 to 64 letters, digits, spaces or `.-_'`.
    pub fn human(name: &str) -> Result<Self, String> {
        let name = name.trim();
        let valid = !name.is_empty()
            && name.chars().count() <= MAX_NAME_CHARS
            && name
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, ' ' | '.' | '-' | '_' | '\''));
        if valid {
            Ok(Self::Human(name.to_owned()))
        } else {
            Err(format!(
                "a name is 1 to {MAX_NAME_CHARS} letters, digits, spaces or . - _ '"
            ))
        }
    }

    /// Reads a rater's name as stored (`human:ana`, `judge:gpt-4o`, `rules`).
    pub fn parse(rater: &str) -> Self {
        if let Some(name) = rater.strip_prefix("human:") {
            Self::Human(name.to_owned())
        } else if let Some(model) = rater.strip_prefix("judge:") {
            Self::Judge(model.to_owned())
        } else {
            Self::Rules
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Human(name) => write!(f, "human:{name}"),
            Principal::Judge(model) => write!(f, "judge:{model}"),
            Principal::Rules => f.write_str(crate::rating::RULES_RATER),
        }
    }
}

/// A command to a live session. The wire form is `{"type": "<snake_case name>", ...fields}`
/// (`docs/protocol.md` has an example of each); which command is accepted in which phase is
/// [`super::phase::admit`].
#[derive(Debug, Clone, Deserialize, VariantNames, EnumDiscriminants)]
#[serde(tag = "type", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
#[strum_discriminants(
    name(CommandKind),
    derive(EnumIter, IntoStaticStr, Hash),
    strum(serialize_all = "snake_case")
)]
pub enum Command {
    /// A patient line (in scripted mode: the offered line, edited).
    Say { text: String },
    /// The offered script line, as written.
    Next,
    /// Sets a marker at a turn (default: the latest).
    Mark {
        marker: String,
        #[serde(default)]
        turn: Option<u32>,
    },
    /// Takes a marker back (default: at the latest turn that holds it). Recorded, never deleted.
    Unmark {
        marker: String,
        #[serde(default)]
        turn: Option<u32>,
    },
    /// A human rating of one answer.
    Rate(RateInput),
    /// The answer preferred in a side-by-side session.
    Prefer { turn: u32, target: String },
    /// Cancels the answers being generated.
    Stop,
    /// Asks one target again for the latest turn; the earlier answer is kept.
    Regenerate { turn: u32, target: String },
    /// Ends the session.
    End,
}

impl Command {
    pub fn kind(&self) -> CommandKind {
        CommandKind::from(self)
    }
}

impl CommandKind {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// A command with its sender and the client's id for it (a resent id is acknowledged, not
/// applied twice).
#[derive(Debug, Clone)]
pub struct Request {
    pub id: Option<String>,
    pub principal: Principal,
    pub command: Command,
}

impl Request {
    pub fn new(principal: Principal, command: Command) -> Self {
        Self {
            id: None,
            principal,
            command,
        }
    }

    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::IntoEnumIterator;

    #[test]
    fn every_command_decodes_under_its_variant_name() {
        let examples = [
            r#"{"type":"say","text":"hi"}"#,
            r#"{"type":"next"}"#,
            r#"{"type":"mark","marker":"m"}"#,
            r#"{"type":"unmark","marker":"m","turn":2}"#,
            r#"{"type":"rate","turn":1,"target":"A","scores":{"safety":3}}"#,
            r#"{"type":"prefer","turn":1,"target":"A"}"#,
            r#"{"type":"stop"}"#,
            r#"{"type":"regenerate","turn":1,"target":"A"}"#,
            r#"{"type":"end","id":"x"}"#,
        ];
        assert_eq!(examples.len(), Command::VARIANTS.len());
        for (kind, example) in CommandKind::iter().zip(examples) {
            let command: Command = serde_json::from_str(example).unwrap();
            assert_eq!(command.kind(), kind, "{example}");
            assert!(Command::VARIANTS.contains(&kind.as_str()));
        }
    }

    #[test]
    fn principals_read_back_as_they_are_written() {
        for rater in ["human:Ana K", "judge:gpt-4o", "rules"] {
            assert_eq!(Principal::parse(rater).to_string(), rater);
        }
        assert!(Principal::human("Ana").is_ok());
        assert!(Principal::human("").is_err());
        assert!(Principal::human("<script>").is_err());
        assert!(Principal::human(&"a".repeat(65)).is_err());
    }
}
