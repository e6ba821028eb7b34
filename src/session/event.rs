//! What a session publishes. These types are the server half of the WebSocket protocol
//! (`docs/protocol.md` shows every one); the batch runner reads the same events untranslated.
//!
//! Durable events carry a per-session `seq` and are written to the database before anyone sees
//! them, so a client can resume from the last `seq` it saw, even after a restart. `delta`,
//! `ack` and errors about a client's own message are transient: no `seq`, not stored. A
//! `delta` carries the character `offset` where its text starts, so a client that resumes
//! mid-answer can place the catch-up text exactly.

use serde::Serialize;

use crate::rating::status::Counts;
use crate::rating::{CriterionVerdict, TargetSummary};
use crate::scenario::{Kind, Risk, Scope, Severity};

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    Started(Box<Started>),
    Patient {
        turn: u32,
        text: String,
        /// `human`, `script` or `simulator`.
        source: String,
        /// Markers this line set.
        markers: Vec<String>,
    },
    Marked {
        turn: u32,
        marker: String,
        source: String,
    },
    /// A marker taken back (the record of it stays).
    Unmarked {
        turn: u32,
        marker: String,
        source: String,
    },
    /// A target is asked again for the latest turn; `attempt` is the new answer's number.
    Regenerating {
        turn: u32,
        target: String,
        attempt: u32,
    },
    Delta {
        turn: u32,
        target: String,
        attempt: u32,
        /// Offset in characters (Unicode scalar values) of `text` within the answer.
        offset: usize,
        text: String,
    },
    Answer(Box<AnswerEvent>),
    Rating(Box<RatingEvent>),
    Criteria {
        targets: Vec<TargetSummary>,
    },
    Offered {
        line: Option<OfferedLine>,
    },
    Preferred {
        turn: u32,
        target: String,
        rater: String,
    },
    Error(ErrorEvent),
    Ended(Box<EndSummary>),
    /// The client message with this id is applied (now or before).
    Ack {
        id: String,
    },
    /// The replay after `resume` is complete; live events follow.
    Resumed {
        session: String,
        last_seq: u64,
        replayed: usize,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Started {
    pub session: String,
    pub scenario: ScenarioView,
    pub content_warning: String,
    pub mode: String,
    pub label: Option<String>,
    /// Target names are hidden until the end.
    pub blind: bool,
    pub targets: Vec<TargetView>,
    /// Set when a blind comparison includes canned demo answers (without saying which).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canned_note: Option<String>,
    pub markers: Vec<MarkerView>,
    pub criteria: Vec<CriterionView>,
    pub offered: Option<OfferedLine>,
    /// Longest patient line accepted, in characters.
    pub max_text_chars: usize,
    /// Largest frame the server reads; a larger one closes the connection (1009).
    pub max_frame_bytes: usize,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioView {
    pub id: String,
    pub title: String,
    pub version: u32,
    pub sha256: String,
    pub risk: Risk,
    pub locale: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub persona: PersonaView,
    pub script_lines: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PersonaView {
    pub name: String,
    pub age: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pronouns: Option<String>,
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub background: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetView {
    pub alias: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canned: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MarkerView {
    pub id: String,
    pub text: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CriterionView {
    pub id: String,
    pub text: String,
    pub kind: Kind,
    pub scope: Scope,
    pub severity: Severity,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub within: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Whether the rules can rate it; otherwise it awaits a judge or a human.
    pub has_patterns: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OfferedLine {
    /// 0-based index of the script line.
    pub index: usize,
    pub text: String,
    /// `say` (the line as written) or `otherwise` (its `when` is not met).
    pub branch: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub marks: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AnswerEvent {
    pub turn: u32,
    pub target: String,
    /// 1, or more for an answer asked again with `regenerate` (the earlier ones are kept).
    pub attempt: u32,
    pub text: String,
    pub ttft_ms: Option<i64>,
    pub duration_ms: i64,
    /// `stop`, `length`, ... as the model said; or `stopped`, `error`, `interrupted`.
    pub finish: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u32>,
    #[serde(flatten)]
    pub details: crate::store::AnswerDetails,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RatingEvent {
    pub id: String,
    pub turn: u32,
    pub target: String,
    /// Which answer of the target to the turn this rates.
    pub attempt: u32,
    pub rater: String,
    /// Verdicts on the criteria that apply at this turn.
    pub verdicts: Vec<CriterionVerdict>,
    /// Rules ratings only: criteria that apply at this turn and await a judge or a human.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub awaiting: Vec<String>,
    /// Weighted share of the behaviours seen in this answer that are good, 0-1 (see
    /// `answer_score`); `None` when the answer shows none either way.
    pub score: Option<f64>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub scores: std::collections::BTreeMap<String, u8>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorEvent {
    /// Stable, for programs: `answers_streaming`, `target_timeout`, ...
    pub code: String,
    /// A sentence for people.
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turn: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The client message this error answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndSummary {
    pub session: String,
    pub turns: u32,
    pub ended_at: i64,
    /// When the outcome, score or counts last changed: `ended_at`, or the time of a later
    /// rating that changed them (`ended` is then sent again).
    pub changed_at: i64,
    /// Every target, names revealed.
    pub targets: Vec<EndedTarget>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndedTarget {
    pub alias: String,
    pub name: String,
    pub label: String,
    pub canned: bool,
    pub outcome: crate::rating::Outcome,
    pub score: Option<f64>,
    pub decided: u32,
    pub undecided: u32,
    pub headline: String,
    pub counts: Counts,
}

/// An event as published: its `seq` (durable events only), and its JSON frame, serialized
/// once for every subscriber (and all a session's log keeps of it).
#[derive(Debug, Clone)]
pub struct Published {
    pub seq: Option<u64>,
    pub json: String,
}

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(flatten)]
    event: &'a ServerEvent,
}

impl Published {
    pub fn new(seq: Option<u64>, event: ServerEvent) -> Self {
        let json = serde_json::to_string(&Envelope { seq, event: &event })
            .unwrap_or_else(|e| format!(r#"{{"type":"error","code":"internal","message":"{e}"}}"#));
        Self { seq, json }
    }

    pub fn stored(seq: u64, json: String) -> Self {
        Self {
            seq: Some(seq),
            json,
        }
    }

    /// A transient error for one client.
    pub fn error(code: &str, message: impl Into<String>, id: Option<String>) -> Self {
        Self::new(
            None,
            ServerEvent::Error(ErrorEvent {
                code: code.to_owned(),
                message: message.into(),
                turn: None,
                target: None,
                id,
            }),
        )
    }
}
