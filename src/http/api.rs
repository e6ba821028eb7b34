//! The JSON API: scenarios, targets, sessions (list and full transcript), health.
//!
//! A blind session's target names stay hidden here too until it has ended.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{AppError, AppState};
use crate::scenario::{Risk, Scenario};
use crate::session::view;
use crate::store::{Page, SessionFilter};
use crate::target::TargetInfo;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/scenarios", get(list_scenarios))
        .route("/scenarios/{id}", get(get_scenario))
        .route("/targets", get(list_targets))
        .route("/sessions", get(list_sessions))
        .route("/sessions/{id}", get(get_session))
        .route("/sessions/{id}/ratings", post(post_rating))
        .route("/sessions/{id}/preferences", post(post_preference))
}

#[derive(Deserialize)]
struct RaterParams {
    /// Who rates (as `?name=` on the WebSocket); the configured default rater without it.
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreferenceInput {
    turn: u32,
    target: String,
}

/// The rater of an HTTP request. A write from another site's page is refused: browsers send
/// `Origin` with it, and only this server's own pages (and the configured ones) may write.
fn rater(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    params: RaterParams,
) -> Result<crate::session::Principal, AppError> {
    if let Some(origin) = headers
        .get(axum::http::header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        && !state.origins.iter().any(|allowed| allowed == origin)
    {
        return Err(AppError::new(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "ratings are accepted only from this server's own pages (an `Origin` it allows)",
        ));
    }
    match params.name.as_deref() {
        Some(name) => crate::session::Principal::human(name)
            .map_err(|message| AppError::new(StatusCode::BAD_REQUEST, "invalid_name", message)),
        None => Ok(crate::session::Principal::parse(
            &state.sessions.config().human_rater,
        )),
    }
}

/// Applies a command to a stored session, bringing it back into memory if need be (once more
/// if it left memory in between).
async fn apply(
    state: &AppState,
    id: &str,
    principal: crate::session::Principal,
    command: crate::session::Command,
) -> Result<(), AppError> {
    let request = crate::session::Request::new(principal, command);
    let handle = state.sessions.open(id).await?;
    match handle.apply(request.clone()).await {
        Err(crate::session::SessionError::SessionGone) => {
            state.sessions.open(id).await?.apply(request).await?;
        }
        other => {
            other?;
        }
    }
    Ok(())
}

/// `POST /api/sessions/{id}/ratings?name=NAME`: a rating of one answer, as the WebSocket's
/// `rate` (the same validation and the same errors). 201 once it is saved.
async fn post_rating(
    State(state): State<AppState>,
    Path(id): Path<String>,
    params: Result<Query<RaterParams>, QueryRejection>,
    headers: axum::http::HeaderMap,
    body: Result<Json<crate::session::RateInput>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), AppError> {
    let principal = rater(&state, &headers, query(params)?)?;
    let Json(input) = body
        .map_err(|err| AppError::new(StatusCode::BAD_REQUEST, "invalid_rating", err.body_text()))?;
    let rater = principal.to_string();
    apply(&state, &id, principal, crate::session::Command::Rate(input)).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"status": "saved", "rater": rater})),
    ))
}

/// `POST /api/sessions/{id}/preferences?name=NAME`: `{"turn": 2, "target": "B"}`, the answer
/// this rater prefers at that turn.
async fn post_preference(
    State(state): State<AppState>,
    Path(id): Path<String>,
    params: Result<Query<RaterParams>, QueryRejection>,
    headers: axum::http::HeaderMap,
    body: Result<Json<PreferenceInput>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), AppError> {
    let principal = rater(&state, &headers, query(params)?)?;
    let Json(input) = body.map_err(|err| {
        AppError::new(
            StatusCode::BAD_REQUEST,
            "invalid_preference",
            err.body_text(),
        )
    })?;
    let rater = principal.to_string();
    let command = crate::session::Command::Prefer {
        turn: input.turn,
        target: input.target,
    };
    apply(&state, &id, principal, command).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"status": "saved", "rater": rater})),
    ))
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, AppError> {
    query
        .map(|Query(q)| q)
        .map_err(|err| AppError::new(StatusCode::BAD_REQUEST, "invalid_query", err.body_text()))
}

/// `GET /healthz`: the database answers.
pub(super) async fn healthz(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, AppError> {
    state.sessions.store().ping().await?;
    Ok(Json(serde_json::json!({
        "status": "ok",
        "live_sessions": state.sessions.live_count(),
    })))
}

#[derive(Serialize)]
struct ScenarioSummary {
    id: String,
    title: String,
    version: u32,
    sha256: String,
    risk: Risk,
    locale: String,
    content_warning: String,
    description: Option<String>,
    persona: crate::scenario::Persona,
    includes: Vec<String>,
    criteria: usize,
    script_lines: usize,
}

fn summary(s: &Scenario) -> ScenarioSummary {
    ScenarioSummary {
        id: s.id.to_string(),
        title: s.title.clone(),
        version: s.version,
        sha256: s.sha256().to_owned(),
        risk: s.risk,
        locale: s.locale.clone(),
        content_warning: s.content_warning.clone(),
        description: s.description.clone(),
        persona: s.persona.clone(),
        includes: s.includes.clone(),
        criteria: s.criteria.len(),
        script_lines: s.script.len(),
    }
}

async fn list_scenarios(State(state): State<AppState>) -> Json<Vec<ScenarioSummary>> {
    Json(
        state
            .sessions
            .library()
            .scenarios
            .values()
            .map(|s| summary(s))
            .collect(),
    )
}

#[derive(Serialize)]
struct ScenarioDetail {
    #[serde(flatten)]
    summary: ScenarioSummary,
    /// Whether this is the version in the scenario directory now.
    current: bool,
    simulator_prompt: Option<String>,
    target_prompt: Option<String>,
    markers: Vec<crate::scenario::MarkerDef>,
    script: Vec<crate::scenario::ScriptLine>,
    criteria: Vec<CriterionDetail>,
}

/// A criterion as the protocol shows it, plus how it is checked and its examples.
#[derive(Serialize)]
struct CriterionDetail {
    #[serde(flatten)]
    view: crate::session::event::CriterionView,
    min_risk: Option<Risk>,
    judge: Option<String>,
    patterns: Vec<String>,
    unless: Vec<String>,
    resources: Option<crate::scenario::ResourceCheck>,
    resource_kinds: Vec<crate::scenario::ResourceKind>,
    examples: BTreeMap<&'static str, Vec<String>>,
    examples_locale: Option<String>,
    origin: String,
}

fn detail(s: &Scenario, current: bool) -> ScenarioDetail {
    ScenarioDetail {
        summary: summary(s),
        current,
        simulator_prompt: s.simulator_prompt.clone(),
        target_prompt: s.target_prompt.clone(),
        markers: s.markers.clone(),
        script: s.script.clone(),
        criteria: s
            .criteria
            .iter()
            .zip(view::criterion_views(s))
            .map(|(c, view)| CriterionDetail {
                view,
                min_risk: c.min_risk,
                judge: c.check.judge.clone(),
                patterns: c.check.patterns.iter().map(|p| p.source.clone()).collect(),
                unless: c.check.unless.iter().map(|p| p.source.clone()).collect(),
                resources: c.check.resources,
                resource_kinds: c.check.resource_kinds.clone(),
                examples_locale: c.examples.locale.clone(),
                examples: [
                    ("present", c.examples.present.clone()),
                    ("absent", c.examples.absent.clone()),
                ]
                .into_iter()
                .collect(),
                origin: c.origin.clone(),
            })
            .collect(),
    }
}

#[derive(Deserialize)]
struct VersionQuery {
    version: Option<u32>,
}

/// `GET /api/scenarios/{id}[?version=N]`: the scenario now, or an older stored version.
async fn get_scenario(
    State(state): State<AppState>,
    Path(id): Path<String>,
    version: Result<Query<VersionQuery>, QueryRejection>,
) -> Result<Json<ScenarioDetail>, AppError> {
    let wanted = query(version)?.version;
    let current = state.sessions.library().get(&id).cloned();
    if let Some(scenario) = &current
        && wanted.is_none_or(|v| v == scenario.version)
    {
        return Ok(Json(detail(scenario, true)));
    }
    let store = state.sessions.store();
    let versions = store.scenario_versions(&id).await?;
    let found = versions
        .iter()
        .find(|v| wanted.is_none_or(|w| w == v.version));
    let Some(found) = found else {
        let message = match (wanted, current.is_some() || !versions.is_empty()) {
            (Some(v), true) => format!("scenario `{id}` has no version {v}"),
            _ => format!("there is no scenario `{id}`"),
        };
        return Err(AppError::new(
            StatusCode::NOT_FOUND,
            "unknown_scenario",
            message,
        ));
    };
    let bundle = store.scenario_bundle(&found.sha256).await?.ok_or_else(|| {
        AppError::new(
            StatusCode::NOT_FOUND,
            "unknown_scenario",
            "that version's files are missing",
        )
    })?;
    let scenario = state.sessions.stored_scenario(&found.sha256, &bundle)?;
    let is_current = current.is_some_and(|c| c.sha256() == scenario.sha256());
    Ok(Json(detail(&scenario, is_current)))
}

async fn list_targets(State(state): State<AppState>) -> Json<Vec<TargetInfo>> {
    Json(
        state
            .sessions
            .targets()
            .iter()
            .map(|t| t.info.clone())
            .collect(),
    )
}

#[derive(Deserialize)]
struct ListQuery {
    scenario: Option<String>,
    target: Option<String>,
    status: Option<String>,
    page: Option<u32>,
    per_page: Option<u32>,
}

const STATUSES: [&str; 6] = ["active", "ended", "pass", "fail", "undecided", "incomplete"];

/// `GET /api/sessions?scenario=&target=&status=&page=&per_page=`, newest first.
async fn list_sessions(
    State(state): State<AppState>,
    params: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Page<view::SessionListEntry>>, AppError> {
    let params = query(params)?;
    if let Some(status) = &params.status
        && !STATUSES.contains(&status.as_str())
    {
        return Err(AppError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!(
                "unknown status `{status}` (use one of: {})",
                STATUSES.join(", ")
            ),
        ));
    }
    let per_page = params.per_page.unwrap_or(50);
    if !(1..=200).contains(&per_page) {
        return Err(AppError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "per_page must be 1 to 200",
        ));
    }
    let filter = SessionFilter {
        scenario: params.scenario,
        target: params.target,
        status: params.status,
        page: params.page.unwrap_or(1).max(1),
        per_page,
    };
    let page = state.sessions.store().list_sessions(&filter).await?;
    Ok(Json(Page {
        items: page.items.into_iter().map(view::list_entry).collect(),
        page: page.page,
        per_page: page.per_page,
        total: page.total,
    }))
}

/// `GET /api/sessions/{id}`: the transcript, every rating and the status of every criterion,
/// judged with the scenario version the session ran with.
async fn get_session(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<view::SessionDetail>, AppError> {
    let (record, session) = state.sessions.stored(&id).await?;
    Ok(Json(view::session_detail(record, &session)))
}
