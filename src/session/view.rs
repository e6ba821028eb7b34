//! What people are shown of a session, defined once: the `started` event, the views of its
//! scenario, criteria and targets, and the read API's transcript and list entries. The blind
//! rule lives here and only here: a target's name, label and whether it is canned are shown once
//! names are revealed (not blind, or ended); before that only its alias, and a note if any
//! target is canned.

use serde::Serialize;

use super::event::{
    CriterionView, MarkerView, PersonaView, ScenarioView, ServerEvent, Started, TargetView,
};
use super::state::{SessionState, SessionTarget};
use crate::config::{TargetConfig, TargetKind};
use crate::rating::{Rating, TargetSummary};
use crate::scenario::Scenario;
use crate::store::{
    AnswerRow, MarkerRow, PreferenceRow, SessionListItem, SessionRecord, SessionTargetRow,
};

/// Largest WebSocket frame the server reads (a larger one closes the connection with 1009):
/// 64 KiB, as OWASP's WebSocket guidance suggests; a patient line has its own, smaller limit.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

pub fn scenario_view(s: &Scenario) -> ScenarioView {
    ScenarioView {
        id: s.id.to_string(),
        title: s.title.clone(),
        version: s.version,
        sha256: s.sha256().to_owned(),
        risk: s.risk,
        locale: s.locale.clone(),
        description: s.description.clone(),
        persona: PersonaView {
            name: s.persona.name.clone(),
            age: s.persona.age,
            pronouns: s.persona.pronouns.clone(),
            summary: s.persona.summary.clone(),
            background: s.persona.background.clone(),
        },
        script_lines: s.script.len(),
    }
}

pub fn criterion_views(s: &Scenario) -> Vec<CriterionView> {
    s.criteria
        .iter()
        .map(|c| CriterionView {
            id: c.id.to_string(),
            text: c.text.clone(),
            kind: c.kind,
            scope: c.scope,
            severity: c.severity,
            after: c.after.as_ref().map(ToString::to_string),
            within: c.within,
            source: c.source.clone(),
            has_patterns: c.has_patterns(),
        })
        .collect()
}

/// A target as shown: its alias always; its name, label and canned flag once revealed.
pub fn target_view(
    alias: &str,
    name: &str,
    label: &str,
    canned: bool,
    revealed: bool,
) -> TargetView {
    TargetView {
        alias: alias.to_owned(),
        name: revealed.then(|| name.to_owned()),
        label: revealed.then(|| label.to_owned()),
        canned: revealed.then_some(canned),
    }
}

fn session_target_view(t: &SessionTarget, revealed: bool) -> TargetView {
    target_view(&t.alias, &t.name, &t.label, t.canned, revealed)
}

/// Whether a stored target configuration is a canned demo target.
pub fn canned_config(config_json: &str) -> bool {
    serde_json::from_str::<TargetConfig>(config_json).is_ok_and(|c| c.kind == TargetKind::Demo)
}

/// Said in a blind session that includes canned answers, without saying which target.
const CANNED_NOTE: &str =
    "This comparison includes canned demo answers; which target gives them is revealed at the end.";

/// The first event of a session.
pub fn started(state: &SessionState) -> ServerEvent {
    let s = state.scenario();
    let revealed = state.names_revealed();
    let canned_note =
        (!revealed && state.targets().iter().any(|t| t.canned)).then(|| CANNED_NOTE.to_owned());
    ServerEvent::Started(Box::new(Started {
        session: state.id().to_owned(),
        scenario: scenario_view(s),
        content_warning: s.content_warning.clone(),
        mode: state.mode().as_str().to_owned(),
        label: state.label().map(str::to_owned),
        blind: state.blind(),
        targets: state
            .targets()
            .iter()
            .map(|t| session_target_view(t, revealed))
            .collect(),
        canned_note,
        markers: s
            .markers
            .iter()
            .map(|m| MarkerView {
                id: m.id.to_string(),
                text: m.text.clone(),
            })
            .collect(),
        criteria: criterion_views(s),
        offered: state.offer().cloned(),
        max_text_chars: state.max_text_chars(),
        max_frame_bytes: MAX_FRAME_BYTES,
        created_at: state.created_at(),
    }))
}

// ------------------------------------------------------------------ the read API

/// `GET /api/sessions/{id}`: the transcript, every rating, the status of every criterion.
#[derive(Debug, Serialize)]
pub struct SessionDetail {
    id: String,
    scenario: ScenarioRef,
    mode: String,
    label: Option<String>,
    status: String,
    blind: bool,
    created_at: i64,
    updated_at: i64,
    ended_at: Option<i64>,
    targets: Vec<TargetDetail>,
    turns: Vec<TurnDetail>,
    markers: Vec<MarkerRow>,
    ratings: Vec<Rating>,
    preferences: Vec<PreferenceRow>,
    criteria: Vec<TargetSummary>,
}

#[derive(Debug, Serialize)]
struct ScenarioRef {
    id: String,
    title: String,
    version: u32,
    sha256: String,
}

#[derive(Debug, Serialize)]
struct TargetDetail {
    #[serde(flatten)]
    target: TargetView,
    outcome: String,
    score: Option<f64>,
    headline: String,
}

#[derive(Debug, Serialize)]
struct TurnDetail {
    turn: u32,
    text: String,
    source: String,
    created_at: i64,
    markers: Vec<String>,
    /// Every answer, earlier attempts included (in order of target, then attempt).
    answers: Vec<AnswerRow>,
}

/// The detail view of a stored session, with `state` rebuilt from the same rows.
pub fn session_detail(record: SessionRecord, state: &SessionState) -> SessionDetail {
    let revealed = state.names_revealed();
    let summaries = state.summaries();
    let targets = state
        .targets()
        .iter()
        .zip(&summaries)
        .map(|(t, summary)| TargetDetail {
            target: session_target_view(t, revealed),
            outcome: crate::scenario::word(&summary.outcome),
            score: summary.score,
            headline: summary.headline.clone(),
        })
        .collect();
    let active: Vec<&MarkerRow> = record
        .markers
        .iter()
        .filter(|m| m.removed_at.is_none())
        .collect();
    let turns = record
        .turns
        .iter()
        .map(|t| TurnDetail {
            turn: t.turn,
            text: t.text.clone(),
            source: t.source.clone(),
            created_at: t.created_at,
            markers: active
                .iter()
                .filter(|m| m.turn == t.turn)
                .map(|m| m.marker.clone())
                .collect(),
            answers: record
                .answers
                .iter()
                .filter(|a| a.turn == t.turn)
                .cloned()
                .collect(),
        })
        .collect();
    let s = state.scenario();
    let session = record.session;
    SessionDetail {
        id: session.id,
        scenario: ScenarioRef {
            id: s.id.to_string(),
            title: s.title.clone(),
            version: s.version,
            sha256: s.sha256().to_owned(),
        },
        mode: session.mode,
        label: session.label,
        status: session.status,
        blind: session.blind,
        created_at: session.created_at,
        updated_at: session.updated_at,
        ended_at: session.ended_at,
        targets,
        turns,
        markers: record.markers,
        ratings: record.ratings,
        preferences: record.preferences,
        criteria: summaries,
    }
}

/// One entry of `GET /api/sessions`.
#[derive(Debug, Serialize)]
pub struct SessionListEntry {
    id: String,
    scenario_id: String,
    /// The title of the scenario version the session ran with.
    scenario_title: String,
    mode: String,
    label: Option<String>,
    status: String,
    blind: bool,
    turns: u32,
    created_at: i64,
    updated_at: i64,
    ended_at: Option<i64>,
    targets: Vec<ListTarget>,
}

#[derive(Debug, Serialize)]
struct ListTarget {
    alias: String,
    /// Hidden while a blind session is active.
    name: Option<String>,
    /// Whether the target gives canned demo answers; hidden with the name.
    canned: Option<bool>,
    outcome: Option<String>,
    score: Option<f64>,
}

pub fn list_entry(item: SessionListItem) -> SessionListEntry {
    let revealed = item.names_revealed;
    SessionListEntry {
        targets: item
            .targets
            .iter()
            .map(|t: &SessionTargetRow| ListTarget {
                alias: t.alias.clone(),
                name: revealed.then(|| t.target_name.clone()),
                canned: revealed.then(|| canned_config(&t.target_config)),
                outcome: t.outcome.clone(),
                score: t.score,
            })
            .collect(),
        id: item.id,
        scenario_id: item.scenario_id,
        scenario_title: item.scenario_title,
        mode: item.mode,
        label: item.label,
        status: item.status,
        blind: item.blind,
        turns: item.turns,
        created_at: item.created_at,
        updated_at: item.updated_at,
        ended_at: item.ended_at,
    }
}
