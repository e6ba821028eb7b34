//! Reading back: a whole session (for the read API and for resuming a session after a
//! restart), session lists with filters, stored scenario versions.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use super::{Store, StoreError};
use crate::rating::Rating;

#[derive(Debug, Clone, Serialize)]
pub struct SessionRow {
    pub id: String,
    pub scenario_id: String,
    pub scenario_sha256: String,
    pub mode: String,
    pub label: Option<String>,
    pub blind: bool,
    /// `active` or `ended`.
    pub status: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub ended_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionTargetRow {
    pub alias: String,
    pub position: u32,
    pub target_name: String,
    /// JSON of the target's configuration when the session started.
    pub target_config: String,
    pub outcome: Option<String>,
    pub score: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TurnRow {
    pub turn: u32,
    pub text: String,
    /// `human`, `script` or `simulator`.
    pub source: String,
    pub script_index: Option<u32>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MarkerRow {
    pub id: String,
    pub marker: String,
    pub turn: u32,
    /// `script` or the rater that set it.
    pub source: String,
    pub created_at: i64,
    /// Set when the marker was taken back (`unmark`): when, and by whom.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed_by: Option<String>,
}

/// One target's answer to one turn.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnswerRow {
    pub turn: u32,
    /// The target's alias in the session.
    pub target: String,
    /// 1, then 2, 3... for answers asked again with `regenerate` (every attempt is kept).
    pub attempt: u32,
    pub text: String,
    /// As the model reported it (`stop`, `length`, ...), or `stopped` (by the clinician),
    /// `error` (the target failed; `error_code` says how), `interrupted` (the server stopped).
    pub finish: String,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub ttft_ms: Option<i64>,
    pub duration_ms: i64,
    pub tokens: Option<u32>,
    pub started_at: i64,
    pub completed_at: i64,
    #[serde(flatten)]
    pub details: AnswerDetails,
}

/// What an answer may carry besides its text: each only when there is something to say.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AnswerDetails {
    /// Prompt tokens, as the server counted them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u32>,
    /// Waiting for the endpoint's `max_concurrent_requests` before the request went out; not
    /// part of `ttft_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<i64>,
    /// Earlier patient lines left out of the request to fit the target's context.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_turns: Option<u32>,
    /// What a reasoning model thought before answering: kept for reviewers, never rated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// The part of `text` that came in the model's `refusal` field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PreferenceRow {
    pub id: String,
    pub turn: u32,
    pub target: String,
    pub rater: String,
    pub created_at: i64,
}

/// Everything stored about one session.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub session: SessionRow,
    pub targets: Vec<SessionTargetRow>,
    pub turns: Vec<TurnRow>,
    pub markers: Vec<MarkerRow>,
    pub answers: Vec<AnswerRow>,
    pub ratings: Vec<Rating>,
    pub preferences: Vec<PreferenceRow>,
    /// JSON of the scenario's source bundle for the version the session ran with.
    pub bundle: String,
}

#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    pub scenario: Option<String>,
    /// Matches sessions with this target whose names may be shown (`names_revealed`).
    pub target: Option<String>,
    /// `active`, `ended`, or an outcome of any target: `pass`, `fail`, `undecided`.
    pub status: Option<String>,
    /// 1-based.
    pub page: u32,
    pub per_page: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionListItem {
    pub id: String,
    /// Whether target names may be shown (set by the engine).
    pub names_revealed: bool,
    pub scenario_id: String,
    /// The title of the scenario version the session ran with.
    pub scenario_title: String,
    pub mode: String,
    pub label: Option<String>,
    pub status: String,
    pub blind: bool,
    pub turns: u32,
    pub created_at: i64,
    pub updated_at: i64,
    pub ended_at: Option<i64>,
    pub targets: Vec<SessionTargetRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VersionRow {
    pub sha256: String,
    pub scenario_id: String,
    pub version: u32,
    pub title: String,
    pub created_at: i64,
    /// Sessions that ran with this version.
    pub sessions: u64,
}

fn get_u32(row: &AnyRow, column: &str) -> Result<u32, sqlx::Error> {
    let value: i64 = row.try_get(column)?;
    u32::try_from(value).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn get_opt_u32(row: &AnyRow, column: &str) -> Result<Option<u32>, sqlx::Error> {
    let value: Option<i64> = row.try_get(column)?;
    value
        .map(|v| u32::try_from(v).map_err(|e| sqlx::Error::Decode(Box::new(e))))
        .transpose()
}

fn get_json<T: serde::de::DeserializeOwned>(row: &AnyRow, column: &str) -> Result<T, sqlx::Error> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn session_row(row: &AnyRow) -> Result<SessionRow, sqlx::Error> {
    Ok(SessionRow {
        id: row.try_get("id")?,
        scenario_id: row.try_get("scenario_id")?,
        scenario_sha256: row.try_get("scenario_sha256")?,
        mode: row.try_get("mode")?,
        label: row.try_get("label")?,
        blind: row.try_get::<i64, _>("blind")? != 0,
        status: row.try_get("status")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        ended_at: row.try_get("ended_at")?,
    })
}

fn target_row(r: &AnyRow) -> Result<SessionTargetRow, sqlx::Error> {
    Ok(SessionTargetRow {
        alias: r.try_get("alias")?,
        position: get_u32(r, "position")?,
        target_name: r.try_get("target_name")?,
        target_config: r.try_get("target_config")?,
        outcome: r.try_get("outcome")?,
        score: r.try_get("score")?,
    })
}

fn answer_row(row: &AnyRow) -> Result<AnswerRow, sqlx::Error> {
    Ok(AnswerRow {
        turn: get_u32(row, "turn")?,
        target: row.try_get("target_alias")?,
        attempt: get_u32(row, "attempt")?,
        text: row.try_get("text")?,
        finish: row.try_get("finish")?,
        error_code: row.try_get("error_code")?,
        error_message: row.try_get("error_message")?,
        ttft_ms: row.try_get("ttft_ms")?,
        duration_ms: row.try_get("duration_ms")?,
        tokens: get_opt_u32(row, "tokens")?,
        started_at: row.try_get("started_at")?,
        completed_at: row.try_get("completed_at")?,
        details: AnswerDetails {
            prompt_tokens: get_opt_u32(row, "prompt_tokens")?,
            queue_ms: row.try_get("queue_ms")?,
            dropped_turns: get_opt_u32(row, "dropped_turns")?,
            reasoning: row.try_get("reasoning")?,
            refusal: row.try_get("refusal")?,
        },
    })
}

fn rating_row(row: &AnyRow) -> Result<Rating, sqlx::Error> {
    Ok(Rating {
        id: row.try_get("id")?,
        turn: get_u32(row, "turn")?,
        target: row.try_get("target_alias")?,
        attempt: get_u32(row, "attempt")?,
        rater: row.try_get("rater")?,
        verdicts: get_json(row, "verdicts")?,
        scores: get_json(row, "scores")?,
        flags: get_json(row, "flags")?,
        note: row.try_get("note")?,
        rewrite: row.try_get("rewrite")?,
        created_at: row.try_get("created_at")?,
        superseded_by: row.try_get("superseded_by")?,
    })
}

const SESSION_COLUMNS: &str = "id, scenario_id, scenario_sha256, mode, label, blind, status, \
                               created_at, updated_at, ended_at";

impl Store {
    /// Everything stored about a session, in order.
    pub async fn load_session(&self, id: &str) -> Result<SessionRecord, StoreError> {
        let pool = self.pool();
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or(StoreError::NotFound)?;
        let session = session_row(&row)?;

        let targets = sqlx::query(
            "SELECT alias, position, target_name, target_config, outcome, score \
             FROM session_targets WHERE session_id = $1 ORDER BY position",
        )
        .bind(id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(target_row)
        .collect::<Result<Vec<_>, sqlx::Error>>()?;

        let turns = sqlx::query(
            "SELECT turn, text, source, script_index, created_at FROM turns \
             WHERE session_id = $1 ORDER BY turn",
        )
        .bind(id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| {
            Ok(TurnRow {
                turn: get_u32(r, "turn")?,
                text: r.try_get("text")?,
                source: r.try_get("source")?,
                script_index: get_opt_u32(r, "script_index")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;

        let markers = sqlx::query(
            "SELECT id, marker, turn, source, created_at, removed_at, removed_by FROM markers \
             WHERE session_id = $1 ORDER BY turn, created_at, id",
        )
        .bind(id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| {
            Ok(MarkerRow {
                id: r.try_get("id")?,
                marker: r.try_get("marker")?,
                turn: get_u32(r, "turn")?,
                source: r.try_get("source")?,
                created_at: r.try_get("created_at")?,
                removed_at: r.try_get("removed_at")?,
                removed_by: r.try_get("removed_by")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;

        let answers = sqlx::query(
            "SELECT turn, target_alias, attempt, text, finish, error_code, error_message, ttft_ms, \
             duration_ms, tokens, started_at, completed_at, prompt_tokens, queue_ms, dropped_turns, \
             reasoning, refusal FROM answers WHERE session_id = $1 \
             ORDER BY turn, target_alias, attempt",
        )
        .bind(id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(answer_row)
        .collect::<Result<Vec<_>, sqlx::Error>>()?;

        let ratings = sqlx::query(
            "SELECT id, turn, target_alias, attempt, rater, verdicts, scores, flags, note, \
             rewrite, created_at, superseded_by FROM ratings WHERE session_id = $1 \
             ORDER BY turn, target_alias, attempt, created_at, id",
        )
        .bind(id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(rating_row)
        .collect::<Result<Vec<_>, sqlx::Error>>()?;

        let preferences = sqlx::query(
            "SELECT id, turn, target_alias, rater, created_at FROM preferences \
             WHERE session_id = $1 ORDER BY turn, created_at",
        )
        .bind(id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| {
            Ok(PreferenceRow {
                id: r.try_get("id")?,
                turn: get_u32(r, "turn")?,
                target: r.try_get("target_alias")?,
                rater: r.try_get("rater")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;

        let bundle = self
            .scenario_bundle(&session.scenario_sha256)
            .await?
            .ok_or_else(|| {
                StoreError::Other("the session's scenario version is missing".to_owned())
            })?;

        Ok(SessionRecord {
            session,
            targets,
            turns,
            markers,
            answers,
            ratings,
            preferences,
            bundle,
        })
    }

    /// The session's durable events in order: `(seq, JSON body)`.
    pub async fn session_events(&self, id: &str) -> Result<Vec<(u64, String)>, StoreError> {
        self.session_events_between(id, 0, u64::MAX).await
    }

    /// The session's durable events with `after < seq <= through`, in order.
    pub async fn session_events_between(
        &self,
        id: &str,
        after: u64,
        through: u64,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let bound = |seq: u64| i64::try_from(seq).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT seq, body FROM session_events WHERE session_id = $1 AND seq > $2 AND seq <= $3 \
             ORDER BY seq",
        )
        .bind(id)
        .bind(bound(after))
        .bind(bound(through))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.try_get("seq")?;
                Ok((u64::try_from(seq).unwrap_or(0), r.try_get("body")?))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Client message ids already applied to a session.
    pub async fn applied_messages(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT message_id FROM applied_messages WHERE session_id = $1")
            .bind(id)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| r.try_get("message_id"))
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// The session started by the client message `start_id`, if any.
    pub async fn session_by_start_id(&self, start_id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT id FROM sessions WHERE start_id = $1")
            .bind(start_id)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.try_get("id")).transpose()?)
    }

    /// The stored source bundle (JSON) of a scenario version.
    pub async fn scenario_bundle(&self, sha256: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT bundle FROM scenario_versions WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.try_get("bundle")).transpose()?)
    }

    /// Every stored version of a scenario, newest first.
    pub async fn scenario_versions(
        &self,
        scenario_id: &str,
    ) -> Result<Vec<VersionRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT v.sha256, v.scenario_id, v.version, v.title, v.created_at, \
             (SELECT COUNT(*) FROM sessions s WHERE s.scenario_sha256 = v.sha256) AS sessions \
             FROM scenario_versions v WHERE v.scenario_id = $1 ORDER BY v.version DESC, v.created_at DESC",
        )
        .bind(scenario_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(VersionRow {
                    sha256: r.try_get("sha256")?,
                    scenario_id: r.try_get("scenario_id")?,
                    version: get_u32(r, "version")?,
                    title: r.try_get("title")?,
                    created_at: r.try_get("created_at")?,
                    sessions: u64::try_from(r.try_get::<i64, _>("sessions")?).unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// A page of sessions, newest first.
    pub async fn list_sessions(
        &self,
        filter: &SessionFilter,
    ) -> Result<Page<SessionListItem>, StoreError> {
        let mut conditions = Vec::new();
        let mut args: Vec<&str> = Vec::new();
        if let Some(scenario) = &filter.scenario {
            args.push(scenario);
            let n = args.len();
            conditions.push(format!("s.scenario_id = ${n}"));
        }
        if let Some(target) = &filter.target {
            args.push(target);
            let n = args.len();
            conditions.push(format!(
                "EXISTS (SELECT 1 FROM session_targets st WHERE st.session_id = s.id \
                 AND st.target_name = ${n}) AND s.names_revealed = 1"
            ));
        }
        if let Some(status) = &filter.status {
            args.push(status);
            let n = args.len();
            match status.as_str() {
                "active" | "ended" => conditions.push(format!("s.status = ${n}")),
                _ => conditions.push(format!(
                    "EXISTS (SELECT 1 FROM session_targets st WHERE st.session_id = s.id \
                     AND st.outcome = ${n})"
                )),
            }
        }
        let where_clause = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        let per_page = filter.per_page.clamp(1, 200);
        let page = filter.page.max(1);
        let offset = u64::from(page - 1) * u64::from(per_page);

        // The SQL is assembled from fixed fragments and numbers; every value is bound.
        let mut count = sqlx::query(AssertSqlSafe(format!(
            "SELECT COUNT(*) AS n FROM sessions s{where_clause}"
        )));
        for arg in &args {
            count = count.bind(*arg);
        }
        let total: i64 = count.fetch_one(self.pool()).await?.try_get("n")?;

        let mut query = sqlx::query(AssertSqlSafe(format!(
            "SELECT s.id, s.scenario_id, s.mode, s.label, s.status, s.blind, s.names_revealed, s.created_at, \
             s.updated_at, s.ended_at, (SELECT COUNT(*) FROM turns t WHERE t.session_id = s.id) AS turns, \
             (SELECT v.title FROM scenario_versions v WHERE v.sha256 = s.scenario_sha256) AS scenario_title \
             FROM sessions s{where_clause} ORDER BY s.created_at DESC, s.id LIMIT {per_page} OFFSET {offset}"
        )));
        for arg in &args {
            query = query.bind(*arg);
        }
        let rows = query.fetch_all(self.pool()).await?;
        let mut items = rows
            .iter()
            .map(|r| {
                Ok(SessionListItem {
                    id: r.try_get("id")?,
                    scenario_id: r.try_get("scenario_id")?,
                    scenario_title: r.try_get("scenario_title")?,
                    mode: r.try_get("mode")?,
                    label: r.try_get("label")?,
                    status: r.try_get("status")?,
                    blind: r.try_get::<i64, _>("blind")? != 0,
                    names_revealed: r.try_get::<i64, _>("names_revealed")? != 0,
                    turns: get_u32(r, "turns")?,
                    created_at: r.try_get("created_at")?,
                    updated_at: r.try_get("updated_at")?,
                    ended_at: r.try_get("ended_at")?,
                    targets: Vec::new(),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;

        if !items.is_empty() {
            let placeholders: Vec<String> = (1..=items.len()).map(|i| format!("${i}")).collect();
            let mut query = sqlx::query(AssertSqlSafe(format!(
                "SELECT session_id, alias, position, target_name, target_config, outcome, score \
                 FROM session_targets WHERE session_id IN ({}) ORDER BY position",
                placeholders.join(", ")
            )));
            for item in &items {
                query = query.bind(item.id.clone());
            }
            for row in query.fetch_all(self.pool()).await? {
                let session_id: String = row.try_get("session_id")?;
                if let Some(item) = items.iter_mut().find(|i| i.id == session_id) {
                    item.targets.push(target_row(&row)?);
                }
            }
        }
        Ok(Page {
            items,
            page,
            per_page,
            total: u64::try_from(total).unwrap_or(0),
        })
    }
}
