//! The single writer: group commit of every pending write.
//!
//! Requests queue on a channel; the writer takes the first, then everything else already
//! waiting (up to a bound), runs all of it in one transaction and answers every request after
//! the commit. If a grouped commit fails, each request is retried on its own, so one bad write
//! never fails its neighbours. Transient errors (busy, locked, a dropped connection) are
//! retried with backoff before anyone is told.
//!
//! Nothing here logs row contents: transcripts are clinical records.

use std::time::Duration;

use sqlx::{Any, AnyPool, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::reads::{AnswerRow, PreferenceRow};
use super::{StoreError, is_transient};
use crate::rating::Rating;

/// Most requests grouped into one transaction.
const MAX_BATCH: usize = 256;
/// Attempts for a transient failure before the error is reported.
const MAX_ATTEMPTS: u32 = 7;

pub(super) struct WriteRequest {
    pub ops: Vec<WriteOp>,
    pub done: oneshot::Sender<Result<(), StoreError>>,
}

/// A new session and its targets.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub id: String,
    pub scenario_id: String,
    pub scenario_sha256: String,
    pub mode: String,
    pub label: Option<String>,
    pub blind: bool,
    /// Whether target names may be shown (decided by the engine).
    pub names_revealed: bool,
    pub start_id: Option<String>,
    pub created_at: i64,
    pub targets: Vec<NewSessionTarget>,
}

#[derive(Debug, Clone)]
pub struct NewSessionTarget {
    pub alias: String,
    pub position: u32,
    pub target_name: String,
    pub target_config: String,
}

/// One write. Each becomes one statement (two for a rating, which also supersedes the same
/// rater's previous rating of the same answer; ending a session also reveals its names).
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Inserted once per hash; later inserts of the same hash do nothing.
    ScenarioVersion {
        sha256: String,
        scenario_id: String,
        version: u32,
        title: String,
        bundle: String,
        created_at: i64,
    },
    CreateSession(NewSession),
    Turn {
        session_id: String,
        turn: u32,
        text: String,
        source: String,
        script_index: Option<u32>,
        created_at: i64,
    },
    Marker {
        id: String,
        session_id: String,
        marker: String,
        turn: u32,
        source: String,
        created_at: i64,
    },
    /// A marker taken back: its row stays, with who took it back and when.
    Unmark {
        id: String,
        removed_by: String,
        removed_at: i64,
    },
    Answer {
        session_id: String,
        answer: AnswerRow,
    },
    Rating {
        session_id: String,
        rating: Rating,
    },
    Preference {
        session_id: String,
        preference: PreferenceRow,
    },
    Event {
        session_id: String,
        seq: u64,
        body: String,
        created_at: i64,
    },
    Applied {
        session_id: String,
        message_id: String,
        created_at: i64,
    },
    /// Cached per-target outcome and score, for listing and filtering sessions.
    Outcomes {
        session_id: String,
        outcomes: Vec<(String, String, Option<f64>)>,
        updated_at: i64,
    },
    End {
        session_id: String,
        ended_at: i64,
    },
}

pub(super) fn spawn(pool: AnyPool) -> mpsc::Sender<WriteRequest> {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(run(pool, rx));
    tx
}

async fn run(pool: AnyPool, mut rx: mpsc::Receiver<WriteRequest>) {
    let mut batch: Vec<WriteRequest> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let all: Vec<&WriteOp> = batch.iter().flat_map(|r| r.ops.iter()).collect();
        let result = commit_with_retries(&pool, &all).await;
        if result.is_err() && batch.len() > 1 {
            tracing::warn!(
                requests = batch.len(),
                "grouped commit failed; committing one by one"
            );
            for request in batch.drain(..) {
                let ops: Vec<&WriteOp> = request.ops.iter().collect();
                let result = commit_with_retries(&pool, &ops).await;
                let _ = request.done.send(result);
            }
        } else {
            for request in batch.drain(..) {
                let _ = request.done.send(result.clone());
            }
        }
    }
}

async fn commit_with_retries(pool: &AnyPool, ops: &[&WriteOp]) -> Result<(), StoreError> {
    let mut delay = Duration::from_millis(20);
    let mut attempt = 1;
    loop {
        match commit(pool, ops).await {
            Ok(()) => return Ok(()),
            Err(err) if is_transient(&err) && attempt < MAX_ATTEMPTS => {
                tracing::warn!(attempt, error = %err, "database busy or unreachable; retrying the write");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
            Err(err) => {
                tracing::error!(error = %err, ops = ops.len(), "write failed");
                return Err(err.into());
            }
        }
    }
}

async fn commit(pool: &AnyPool, ops: &[&WriteOp]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for op in ops {
        execute(&mut tx, op).await?;
    }
    tx.commit().await
}

fn opt_i64(value: Option<u32>) -> Option<i64> {
    value.map(i64::from)
}

async fn execute(tx: &mut Transaction<'_, Any>, op: &WriteOp) -> Result<(), sqlx::Error> {
    match op {
        WriteOp::ScenarioVersion {
            sha256,
            scenario_id,
            version,
            title,
            bundle,
            created_at,
        } => {
            sqlx::query(
                "INSERT INTO scenario_versions (sha256, scenario_id, version, title, bundle, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (sha256) DO NOTHING",
            )
            .bind(sha256)
            .bind(scenario_id)
            .bind(i64::from(*version))
            .bind(title)
            .bind(bundle)
            .bind(created_at)
            .execute(&mut **tx)
            .await?;
        }
        WriteOp::CreateSession(s) => {
            sqlx::query(
                "INSERT INTO sessions (id, scenario_id, scenario_sha256, mode, label, blind, status, \
                 start_id, created_at, updated_at, names_revealed) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $8, $8, $9)",
            )
            .bind(&s.id)
            .bind(&s.scenario_id)
            .bind(&s.scenario_sha256)
            .bind(&s.mode)
            .bind(&s.label)
            .bind(i64::from(s.blind))
            .bind(&s.start_id)
            .bind(s.created_at)
            .bind(i64::from(s.names_revealed))
            .execute(&mut **tx)
            .await?;
            for t in &s.targets {
                sqlx::query(
                    "INSERT INTO session_targets (session_id, alias, position, target_name, target_config) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&s.id)
                .bind(&t.alias)
                .bind(i64::from(t.position))
                .bind(&t.target_name)
                .bind(&t.target_config)
                .execute(&mut **tx)
                .await?;
            }
        }
        WriteOp::Turn {
            session_id,
            turn,
            text,
            source,
            script_index,
            created_at,
        } => {
            sqlx::query(
                "INSERT INTO turns (session_id, turn, text, source, script_index, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(session_id)
            .bind(i64::from(*turn))
            .bind(text)
            .bind(source)
            .bind(opt_i64(*script_index))
            .bind(created_at)
            .execute(&mut **tx)
            .await?;
            touch(tx, session_id, *created_at).await?;
        }
        WriteOp::Marker {
            id,
            session_id,
            marker,
            turn,
            source,
            created_at,
        } => {
            sqlx::query(
                "INSERT INTO markers (id, session_id, marker, turn, source, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(session_id)
            .bind(marker)
            .bind(i64::from(*turn))
            .bind(source)
            .bind(created_at)
            .execute(&mut **tx)
            .await?;
        }
        WriteOp::Unmark {
            id,
            removed_by,
            removed_at,
        } => {
            sqlx::query("UPDATE markers SET removed_at = $1, removed_by = $2 WHERE id = $3")
                .bind(removed_at)
                .bind(removed_by)
                .bind(id)
                .execute(&mut **tx)
                .await?;
        }
        WriteOp::Answer {
            session_id,
            answer: a,
        } => {
            sqlx::query(
                "INSERT INTO answers (session_id, turn, target_alias, attempt, text, finish, \
                 error_code, error_message, ttft_ms, duration_ms, tokens, started_at, completed_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            )
            .bind(session_id)
            .bind(i64::from(a.turn))
            .bind(&a.target)
            .bind(i64::from(a.attempt))
            .bind(&a.text)
            .bind(&a.finish)
            .bind(&a.error_code)
            .bind(&a.error_message)
            .bind(a.ttft_ms)
            .bind(a.duration_ms)
            .bind(opt_i64(a.tokens))
            .bind(a.started_at)
            .bind(a.completed_at)
            .execute(&mut **tx)
            .await?;
            touch(tx, session_id, a.completed_at).await?;
        }
        WriteOp::Rating {
            session_id,
            rating: r,
        } => {
            sqlx::query(
                "UPDATE ratings SET superseded_by = $1 WHERE session_id = $2 AND turn = $3 \
                 AND target_alias = $4 AND attempt = $5 AND rater = $6 AND superseded_by IS NULL \
                 AND id <> $1",
            )
            .bind(&r.id)
            .bind(session_id)
            .bind(i64::from(r.turn))
            .bind(&r.target)
            .bind(i64::from(r.attempt))
            .bind(&r.rater)
            .execute(&mut **tx)
            .await?;
            sqlx::query(
                "INSERT INTO ratings (id, session_id, turn, target_alias, attempt, rater, verdicts, \
                 scores, flags, note, rewrite, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(&r.id)
            .bind(session_id)
            .bind(i64::from(r.turn))
            .bind(&r.target)
            .bind(i64::from(r.attempt))
            .bind(&r.rater)
            .bind(json(&r.verdicts))
            .bind(json(&r.scores))
            .bind(json(&r.flags))
            .bind(&r.note)
            .bind(&r.rewrite)
            .bind(r.created_at)
            .execute(&mut **tx)
            .await?;
        }
        WriteOp::Preference {
            session_id,
            preference: p,
        } => {
            sqlx::query(
                "INSERT INTO preferences (id, session_id, turn, target_alias, rater, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&p.id)
            .bind(session_id)
            .bind(i64::from(p.turn))
            .bind(&p.target)
            .bind(&p.rater)
            .bind(p.created_at)
            .execute(&mut **tx)
            .await?;
        }
        WriteOp::Event {
            session_id,
            seq,
            body,
            created_at,
        } => {
            sqlx::query(
                "INSERT INTO session_events (session_id, seq, body, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(session_id)
            .bind(i64::try_from(*seq).unwrap_or(i64::MAX))
            .bind(body)
            .bind(created_at)
            .execute(&mut **tx)
            .await?;
        }
        WriteOp::Applied {
            session_id,
            message_id,
            created_at,
        } => {
            sqlx::query(
                "INSERT INTO applied_messages (session_id, message_id, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (session_id, message_id) DO NOTHING",
            )
            .bind(session_id)
            .bind(message_id)
            .bind(created_at)
            .execute(&mut **tx)
            .await?;
        }
        WriteOp::Outcomes {
            session_id,
            outcomes,
            updated_at,
        } => {
            for (alias, outcome, score) in outcomes {
                sqlx::query(
                    "UPDATE session_targets SET outcome = $1, score = $2 WHERE session_id = $3 AND alias = $4",
                )
                .bind(outcome)
                .bind(*score)
                .bind(session_id)
                .bind(alias)
                .execute(&mut **tx)
                .await?;
            }
            touch(tx, session_id, *updated_at).await?;
        }
        WriteOp::End {
            session_id,
            ended_at,
        } => {
            sqlx::query(
                "UPDATE sessions SET status = 'ended', ended_at = $1, updated_at = $1, \
                 names_revealed = 1 WHERE id = $2",
            )
            .bind(ended_at)
            .bind(session_id)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

async fn touch(
    tx: &mut Transaction<'_, Any>,
    session_id: &str,
    at: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE sessions SET updated_at = $1 WHERE id = $2")
        .bind(at)
        .bind(session_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}
