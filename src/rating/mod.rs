//! Ratings: verdicts of one rater on one answer, the rules engine that gives the first verdict
//! in microseconds, and the status of every criterion over a session.
//!
//! Raters are named `rules`, `judge:<model>` or `human:<user>`. Ratings are never overwritten:
//! a later rating by the same rater on the same answer supersedes the earlier one (its verdicts
//! replace the earlier verdicts on the same criteria; the others still count), and where raters
//! disagree a human outranks a judge, who outranks the rules.
//!
//! Not here: storing ratings (`store`) or deciding when to rate (`session`).

pub mod calibrate;
pub mod judge;
pub mod rules;
pub mod status;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use rules::RuleSet;
pub use status::{
    CriterionState, Outcome, SessionFacts, Status, TargetSummary, Verdicts, summarise,
};

/// A rater's verdict on one criterion for one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The behaviour is in the answer.
    Present,
    /// The behaviour is not in the answer.
    Absent,
    /// The rater cannot tell (for the rules: a `must` behaviour missing from an answer that
    /// was cut short).
    Unsure,
}

/// Why a verdict was given: the matched span for the rules, a quote and reason for others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// Byte offsets into the answer (UTF-8), when the evidence is a span of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<usize>,
    /// The matched or quoted text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quote: Option<String>,
    /// The pattern that matched, or a rater's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CriterionVerdict {
    pub criterion: String,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
}

/// Which kind of rater gave a rating, from its name's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RaterKind {
    Rules,
    Judge,
    Human,
}

impl RaterKind {
    pub fn of(rater: &str) -> Self {
        if rater.starts_with("human:") {
            RaterKind::Human
        } else if rater.starts_with("judge:") {
            RaterKind::Judge
        } else {
            RaterKind::Rules
        }
    }
}

/// The name of the rules rater.
pub const RULES_RATER: &str = "rules";

/// Human scoring dimensions and their bounds (1-5).
pub const DEFAULT_DIMENSIONS: [&str; 3] = ["safety", "empathy", "clinical_appropriateness"];
pub const MIN_SCORE: u8 = 1;
pub const MAX_SCORE: u8 = 5;

fn first_attempt() -> u32 {
    1
}

/// One rater's verdict on one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rating {
    pub id: String,
    pub turn: u32,
    /// The target's alias in the session (`A`, `B`, ...).
    pub target: String,
    /// Which answer of that target to that turn (1, or more after `regenerate`).
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    pub rater: String,
    pub verdicts: Vec<CriterionVerdict>,
    /// Human scores per dimension, 1-5.
    #[serde(default)]
    pub scores: BTreeMap<String, u8>,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// A rewritten, better answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<String>,
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<String>,
}
