//! Rebuilding a session's state from its rows: one function, used both to bring a session back
//! into memory (after an idle eviction or a restart) and by the read API, so the two can never
//! disagree about a transcript's statuses. Also: a session's targets, from the configured
//! registry or from the configuration snapshot stored with the session.

use std::sync::Arc;

use super::state::{ContextFit, NewSession, SessionState, SessionTarget};
use super::{Mode, view};
use crate::config::TargetConfig;
use crate::rating::RuleSet;
use crate::scenario::Scenario;
use crate::store::{SessionRecord, SessionTargetRow};
use crate::target::{Target, Targets};

/// The system prompt a target sees: the target's own prompt (as its product would send it),
/// then the scenario's `[target]` context.
pub fn system_prompt(scenario: &Scenario, target_prompt: Option<&str>) -> Option<String> {
    match (target_prompt, scenario.target_prompt.as_deref()) {
        (Some(own), Some(context)) => Some(format!("{own}\n\n{context}")),
        (Some(own), None) => Some(own.to_owned()),
        (None, Some(context)) => Some(context.to_owned()),
        (None, None) => None,
    }
}

/// A configured target, as a new session's target.
pub fn new_target(alias: String, target: &Target, scenario: &Scenario) -> SessionTarget {
    SessionTarget::new(
        alias,
        target.info.name.clone(),
        target.info.label.clone(),
        target.info.canned,
        target.info.unavailable.clone(),
        system_prompt(scenario, target.config.system_prompt.as_deref()),
    )
    .with_context(target.config.context_tokens.map(|limit| {
        let answer = target
            .config
            .max_tokens
            .or(target.config.max_completion_tokens);
        ContextFit::new(limit, answer)
    }))
}

/// A stored session's target: as configured now if it still is, else from its stored
/// configuration (it can then be viewed and ended, not continued).
pub fn stored_target(
    row: &SessionTargetRow,
    scenario: &Scenario,
    targets: &Targets,
) -> SessionTarget {
    if let Some(target) = targets.get(&row.target_name) {
        return new_target(row.alias.clone(), target, scenario);
    }
    let config: Option<TargetConfig> = serde_json::from_str(&row.target_config).ok();
    SessionTarget::new(
        row.alias.clone(),
        row.target_name.clone(),
        row.target_name.clone(),
        view::canned_config(&row.target_config),
        Some(format!(
            "target `{}` is no longer configured on this server",
            row.target_name
        )),
        system_prompt(
            scenario,
            config.as_ref().and_then(|c| c.system_prompt.as_deref()),
        ),
    )
}

/// The state of a stored session, exactly as its rows say, judged with the scenario version it
/// ran with. `applied` and `next_seq` come from its message and event log when it is brought
/// back to life; the read API passes none.
pub fn rebuild(
    record: &SessionRecord,
    scenario: Arc<Scenario>,
    rules: Arc<RuleSet>,
    targets: &Targets,
    max_text_chars: usize,
    applied: Vec<String>,
    next_seq: u64,
) -> SessionState {
    let session_targets = record
        .targets
        .iter()
        .map(|row| stored_target(row, &scenario, targets))
        .collect();
    let mut state = SessionState::new(NewSession {
        id: record.session.id.clone(),
        scenario,
        rules,
        mode: Mode::parse(&record.session.mode).unwrap_or(Mode::Free),
        label: record.session.label.clone(),
        blind: record.session.blind,
        targets: session_targets,
        created_at: record.session.created_at,
        max_text_chars,
    });
    for turn in &record.turns {
        state.restore_turn(&turn.text, turn.script_index);
    }
    for marker in record.markers.iter().filter(|m| m.removed_at.is_none()) {
        state.restore_marker(&marker.id, &marker.marker, marker.turn);
    }
    for answer in &record.answers {
        state.restore_answer(&answer.target, answer.turn, answer.attempt, &answer.text);
    }
    state.restore_ratings(&record.ratings);
    state.restore_end(record.session.ended_at, record.session.status == "ended");
    state.restore_log(applied, next_seq);
    state
}

/// Answers asked again (`regenerating` events) that have no answer row: the server stopped
/// while they were being generated. As (alias, turn, attempt).
pub fn unfinished_regenerations(
    record: &SessionRecord,
    events: &[(u64, String)],
) -> Vec<(String, u32, u32)> {
    #[derive(serde::Deserialize)]
    struct Regenerating {
        turn: u32,
        target: String,
        attempt: u32,
    }
    events
        .iter()
        .filter(|(_, json)| json.contains(r#""type":"regenerating""#))
        .filter_map(|(_, json)| serde_json::from_str::<Regenerating>(json).ok())
        .filter(|r| {
            !record
                .answers
                .iter()
                .any(|a| a.turn == r.turn && a.target == r.target && a.attempt == r.attempt)
        })
        .map(|r| (r.target, r.turn, r.attempt))
        .collect()
}
