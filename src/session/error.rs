//! Why the engine refused a command: one variant per reason, each with a stable protocol
//! [`ErrorCode`] (the `code` of the `error` event; `docs/protocol.md` lists them all, and `http`
//! maps each to its status). The `Display` text is the human sentence.

use strum::{EnumDiscriminants, EnumIter, IntoStaticStr};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, EnumDiscriminants)]
#[strum_discriminants(
    name(ErrorCode),
    derive(EnumIter, IntoStaticStr, Hash),
    strum(serialize_all = "snake_case")
)]
pub enum SessionError {
    #[error("there is no scenario `{id}` (available: {available})")]
    UnknownScenario { id: String, available: String },
    #[error("the scenario version this session ran with cannot be rebuilt: {detail}")]
    ScenarioUnreadable { detail: String },
    #[error("choose at least one target")]
    NoTargets,
    #[error("at most {max} targets per session")]
    TooManyTargets { max: usize },
    #[error("target `{name}` is listed twice")]
    DuplicateTarget { name: String },
    #[error("there is no target `{name}` (available: {available})")]
    UnknownTarget { name: String, available: String },
    #[error("{0}")]
    TargetUnavailable(String),
    #[error("this server already holds {max} live sessions, its limit; try again shortly")]
    ServerBusy { max: usize },
    #[error(
        "you already have {max} sessions open, the most one person may; end or leave one first"
    )]
    TooManySessions { max: usize },
    #[error("there is no session `{id}`")]
    UnknownSession { id: String },
    #[error("the session is no longer in memory; resume it")]
    SessionGone,
    #[error("{0}")]
    StorageFailed(String),
    #[error("the line is empty")]
    TextEmpty,
    #[error("{what} has {chars} characters; the limit is {max}")]
    TextTooLong {
        what: &'static str,
        chars: usize,
        max: usize,
    },
    #[error("wait until every answer to the last line has finished, or send `stop`")]
    AnswersStreaming,
    #[error("this session has ended")]
    SessionEnded,
    #[error("`next` sends the scenario's script, and this session is in free mode: use `say`")]
    NotScripted,
    #[error("the script has no more lines; type a line with `say`, or end the session")]
    ScriptFinished,
    #[error("this scenario has no marker `{marker}` (it has: {known})")]
    UnknownMarker { marker: String, known: String },
    #[error("{0}")]
    MarkerNotSet(String),
    #[error("{0}")]
    UnknownTurn(String),
    #[error("this scenario has no criterion `{0}`")]
    UnknownCriterion(String),
    #[error("{0}")]
    InvalidScore(String),
    #[error("{0}")]
    InvalidRating(String),
}

impl SessionError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::from(self)
    }

    /// The database refused a write, so the change was not applied.
    pub fn storage(err: &crate::store::StoreError) -> Self {
        Self::StorageFailed(format!(
            "this could not be saved, so it was not applied ({err}); try again"
        ))
    }

    /// A write failed earlier and is still being retried: nothing new is accepted meanwhile.
    pub fn storage_down() -> Self {
        Self::StorageFailed(
            "Vigil cannot save to its database right now, so nothing new is accepted; it keeps \
             retrying and everything recorded so far is kept"
                .to_owned(),
        )
    }
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an answer ended without the model finishing it, besides the target's own errors
/// ([`crate::target::TargetError`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumIter, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum AnswerFault {
    /// The server stopped (shut down, or crashed and found the answer unfinished at restart).
    AnswerInterrupted,
    /// The answer passed the target's `max_answer_chars`: it is kept up to there.
    AnswerTooLong,
}

impl AnswerFault {
    pub fn code(self) -> &'static str {
        self.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::IntoEnumIterator;

    #[test]
    fn codes_are_snake_case_words() {
        assert_eq!(ErrorCode::UnknownScenario.as_str(), "unknown_scenario");
        assert_eq!(
            SessionError::TextTooLong {
                what: "the line",
                chars: 5,
                max: 4
            }
            .code()
            .as_str(),
            "text_too_long"
        );
        assert_eq!(AnswerFault::AnswerInterrupted.code(), "answer_interrupted");
        for code in ErrorCode::iter() {
            assert!(
                code.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            );
        }
    }
}
