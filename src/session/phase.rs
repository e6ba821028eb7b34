//! The phase of a session, and the one table that says which command is accepted in which
//! phase ([`admit`]). `docs/protocol.md` shows the same table; a test keeps the two equal.

use serde::Serialize;
use strum::{EnumIter, IntoStaticStr};

use super::SessionError;
use super::command::CommandKind;

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, EnumIter, IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Phase {
    /// Waiting for the next patient line.
    Open,
    /// Answers to the latest line (or a regenerated answer) are being generated.
    Streaming,
    /// `end` was asked while answers streamed: they are being stopped, then the session ends.
    Ending,
    /// Ended: read-only, except for ratings and preferences (reviewers rate afterwards).
    Ended,
}

/// Whether the database takes writes. While a write is failing nothing new is accepted, so
/// memory never runs ahead of the database by more than what is being retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    Ok,
    Down,
}

/// What the table says about a command in a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Accept,
    /// Accepted, and changes nothing (ending an ended session, stopping when nothing streams).
    AlreadyDone,
    AnswersStreaming,
    SessionEnded,
}

/// The table: which command is accepted in which phase.
pub fn rule(kind: CommandKind, phase: Phase) -> Rule {
    use CommandKind as C;
    use Phase::{Ended, Ending, Open, Streaming};
    use Rule::{Accept, AlreadyDone, AnswersStreaming, SessionEnded};
    match (kind, phase) {
        (C::Say | C::Next | C::Regenerate, Open) => Accept,
        (C::Say | C::Next | C::Regenerate, Streaming) => AnswersStreaming,
        (C::Say | C::Next | C::Regenerate, Ending | Ended) => SessionEnded,
        (C::Mark | C::Unmark, Open | Streaming) => Accept,
        (C::Mark | C::Unmark, Ending | Ended) => SessionEnded,
        (C::Rate | C::Prefer, Open | Streaming | Ending | Ended) => Accept,
        (C::Stop, Streaming | Ending) => Accept,
        (C::Stop, Open | Ended) => AlreadyDone,
        (C::End, Open | Streaming | Ending) => Accept,
        (C::End, Ended) => AlreadyDone,
    }
}

/// Checks a command against the table and the database's health. `Ok(true)`: apply it;
/// `Ok(false)`: acknowledge it without change.
pub fn admit(kind: CommandKind, phase: Phase, storage: Storage) -> Result<bool, SessionError> {
    let rule = rule(kind, phase);
    if storage == Storage::Down && rule == Rule::Accept && kind != CommandKind::Stop {
        return Err(SessionError::storage_down());
    }
    match rule {
        Rule::Accept => Ok(true),
        Rule::AlreadyDone => Ok(false),
        Rule::AnswersStreaming => Err(SessionError::AnswersStreaming),
        Rule::SessionEnded => Err(SessionError::SessionEnded),
    }
}

/// The table as Markdown, as `docs/protocol.md` shows it.
pub fn table_markdown() -> String {
    use strum::IntoEnumIterator;
    let phases: Vec<Phase> = Phase::iter().collect();
    let mut out = String::from("| command |");
    for phase in &phases {
        let name: &str = phase.into();
        out.push_str(&format!(" {name} |"));
    }
    out.push_str(" database down |\n|---|");
    out.push_str(&"---|".repeat(phases.len() + 1));
    out.push('\n');
    for kind in CommandKind::iter() {
        out.push_str(&format!("| `{}` |", kind.as_str()));
        for &phase in &phases {
            let cell = match rule(kind, phase) {
                Rule::Accept => "yes",
                Rule::AlreadyDone => "no-op",
                Rule::AnswersStreaming => "`answers_streaming`",
                Rule::SessionEnded => "`session_ended`",
            };
            out.push_str(&format!(" {cell} |"));
        }
        let down = if kind == CommandKind::Stop {
            "yes"
        } else {
            "`storage_failed`"
        };
        out.push_str(&format!(" {down} |\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::ErrorCode;
    use strum::IntoEnumIterator;

    #[test]
    fn every_command_in_every_phase_is_accepted_or_refused_with_its_code() {
        use CommandKind as C;
        use Phase::*;
        // (command, phase) -> expected: "ok", "no-op" or an error code.
        let expected = |kind: CommandKind, phase: Phase| -> &'static str {
            match (kind, phase) {
                (C::Say | C::Next | C::Regenerate, Open) => "ok",
                (C::Say | C::Next | C::Regenerate, Streaming) => "answers_streaming",
                (C::Say | C::Next | C::Regenerate | C::Mark | C::Unmark, Ending | Ended) => {
                    "session_ended"
                }
                (C::Mark | C::Unmark, _) => "ok",
                (C::Rate | C::Prefer, _) => "ok",
                (C::Stop, Streaming | Ending) => "ok",
                (C::Stop, _) => "no-op",
                (C::End, Ended) => "no-op",
                (C::End, _) => "ok",
            }
        };
        for kind in CommandKind::iter() {
            for phase in Phase::iter() {
                let got = match admit(kind, phase, Storage::Ok) {
                    Ok(true) => "ok",
                    Ok(false) => "no-op",
                    Err(err) => err.code().as_str(),
                };
                assert_eq!(got, expected(kind, phase), "{kind:?} in {phase:?}");
                // With the database down, only what changes nothing (and stop) goes through.
                match admit(kind, phase, Storage::Down) {
                    Err(err) if got == "ok" => {
                        assert_eq!(
                            err.code(),
                            ErrorCode::StorageFailed,
                            "{kind:?} in {phase:?}"
                        );
                        assert_ne!(kind, C::Stop);
                    }
                    Ok(true) => assert_eq!((kind, got), (C::Stop, "ok")),
                    other => assert_eq!(
                        other.map_err(|e| e.code().as_str()),
                        match got {
                            "no-op" => Ok(false),
                            code => Err(code),
                        },
                        "{kind:?} in {phase:?}"
                    ),
                }
            }
        }
    }

    #[test]
    fn the_protocol_document_shows_this_table() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
            .unwrap();
        assert!(
            doc.contains(&table_markdown()),
            "docs/protocol.md must contain the phase table exactly:\n{}",
            table_markdown()
        );
    }
}
