//! The single writer: group commit of every pending write.
//!
//! Requests queue on a channel; the writer takes the first, then everything else already
//! waiting (up to a bound), runs all of it in one transaction and answers every request after
//! the commit. If a grouped commit fails, each request is retried on its own, so one bad write
//! never fails its neighbours. Transient errors (busy, locked, a dropped connection) are
//! retried with backoff before anyone is told. The writer's connection is its own and is
//! replaced after any failure ([`Connection`]).
//!
//! Nothing here logs row contents: transcripts are clinical records.

use std::time::Duration;

use sqlx::any::AnyConnectOptions;
use sqlx::{Any, AnyConnection, Connection as _, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::reads::{AnswerRow, PreferenceRow};
use super::{Backend, StoreError, is_transient};
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

/// What the writer task is asked to do.
pub(super) enum Message {
    Write(WriteRequest),
    /// Finish what is queued, close the connection, then answer.
    Close(oneshot::Sender<()>),
    /// Tests: a `PRAGMA` for the writer's connection now and every one it opens after (a
    /// page cap stands in for a full disk).
    #[cfg(test)]
    Pragma(String, oneshot::Sender<()>),
}

pub(super) fn spawn(options: AnyConnectOptions, backend: Backend) -> mpsc::Sender<Message> {
    let (tx, rx) = mpsc::channel(1024);
    let connection = Connection {
        options,
        backend,
        conn: None,
        #[cfg(test)]
        pragmas: Vec::new(),
    };
    tokio::spawn(run(connection, rx));
    tx
}

/// The writer's own connection, outside the pool. After any failed write it is closed (which
/// rolls back whatever the failure left open) and the next write opens a new one: a driver's
/// idea of the transaction state can be wrong after SQLite rolled a transaction back by itself
/// (a full disk does that), and a commit on such a connection can "succeed" into a transaction
/// that never ends.
struct Connection {
    options: AnyConnectOptions,
    backend: Backend,
    conn: Option<AnyConnection>,
    #[cfg(test)]
    pragmas: Vec<String>,
}

impl Connection {
    async fn get(&mut self) -> Result<&mut AnyConnection, sqlx::Error> {
        if self.conn.is_none() {
            let mut conn = AnyConnection::connect_with(&self.options).await?;
            super::prepare(&mut conn, self.backend).await?;
            #[cfg(test)]
            for pragma in &self.pragmas {
                sqlx::query(sqlx::AssertSqlSafe(pragma.clone()))
                    .execute(&mut conn)
                    .await?;
            }
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    async fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }
}

async fn run(mut connection: Connection, mut rx: mpsc::Receiver<Message>) {
    let mut batch: Vec<WriteRequest> = Vec::new();
    let mut after: Option<Message> = None;
    while let Some(first) = rx.recv().await {
        match first {
            Message::Write(request) => batch.push(request),
            other => after = Some(other),
        }
        while batch.len() < MAX_BATCH && after.is_none() {
            match rx.try_recv() {
                Ok(Message::Write(request)) => batch.push(request),
                Ok(other) => after = Some(other),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            write_batch(&mut connection, &mut batch).await;
        }
        match after.take() {
            None | Some(Message::Write(_)) => {}
            Some(Message::Close(done)) => {
                connection.close().await;
                let _ = done.send(());
            }
            #[cfg(test)]
            Some(Message::Pragma(pragma, done)) => {
                if let Some(conn) = connection.conn.as_mut() {
                    sqlx::query(sqlx::AssertSqlSafe(pragma.clone()))
                        .execute(conn)
                        .await
                        .expect("pragma");
                }
                connection.pragmas.push(pragma);
                let _ = done.send(());
            }
        }
    }
    connection.close().await;
}

async fn write_batch(connection: &mut Connection, batch: &mut Vec<WriteRequest>) {
    let all: Vec<&WriteOp> = batch.iter().flat_map(|r| r.ops.iter()).collect();
    let result = commit_with_retries(connection, &all).await;
    if result.is_err() && batch.len() > 1 {
        tracing::warn!(
            requests = batch.len(),
            "grouped commit failed; committing one by one"
        );
        for request in batch.drain(..) {
            let ops: Vec<&WriteOp> = request.ops.iter().collect();
            let result = commit_with_retries(connection, &ops).await;
            let _ = request.done.send(result);
        }
    } else {
        for request in batch.drain(..) {
            let _ = request.done.send(result.clone());
        }
    }
}

async fn commit_with_retries(
    connection: &mut Connection,
    ops: &[&WriteOp],
) -> Result<(), StoreError> {
    let mut delay = Duration::from_millis(20);
    let mut attempt = 1;
    loop {
        match commit(connection, ops).await {
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

/// One transaction on the writer's connection; on any failure the connection is replaced.
async fn commit(connection: &mut Connection, ops: &[&WriteOp]) -> Result<(), sqlx::Error> {
    let result = async {
        let mut tx = connection.get().await?.begin().await?;
        for op in ops {
            execute(&mut tx, op).await?;
        }
        tx.commit().await
    }
    .await;
    if result.is_err() {
        connection.close().await;
    }
    result
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
                 error_code, error_message, ttft_ms, duration_ms, tokens, started_at, completed_at, \
                 prompt_tokens, queue_ms, dropped_turns, reasoning, refusal) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
                 $17, $18)",
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
            .bind(opt_i64(a.details.prompt_tokens))
            .bind(a.details.queue_ms)
            .bind(opt_i64(a.details.dropped_turns))
            .bind(&a.details.reasoning)
            .bind(&a.details.refusal)
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
                // A missing score is written as a literal NULL, never bound: sqlx's `Any`
                // driver binds a NULL float as PostgreSQL's `real`, and the statement prepared
                // with it then refuses every later `double precision` score on that connection
                // ("incorrect binary data format in bind parameter 2").
                let query = match score {
                    Some(score) => sqlx::query(
                        "UPDATE session_targets SET outcome = $1, score = $2 \
                         WHERE session_id = $3 AND alias = $4",
                    )
                    .bind(outcome)
                    .bind(*score),
                    None => sqlx::query(
                        "UPDATE session_targets SET outcome = $1, score = NULL \
                         WHERE session_id = $2 AND alias = $3",
                    )
                    .bind(outcome),
                };
                query
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

#[cfg(test)]
mod tests {
    use sqlx::Row;

    use super::*;
    use crate::store::Store;

    fn turn(n: u32, text: String) -> WriteOp {
        WriteOp::Turn {
            session_id: "s".into(),
            turn: n,
            text,
            source: "human".into(),
            script_index: None,
            created_at: i64::from(n),
        }
    }

    async fn pragma(store: &Store, pragma: String) {
        let (done, applied) = oneshot::channel();
        store
            .writer
            .send(Message::Pragma(pragma, done))
            .await
            .unwrap();
        applied.await.unwrap();
    }

    /// A full disk (SQLite's page cap stands in for it) rolls the transaction back inside
    /// SQLite, behind the driver's back; a commit that fails after that left the connection
    /// inside a transaction that never ended, and every later write "committed" into it: told
    /// saved, holding the write lock, lost at the next restart. Every write reported as saved
    /// must be on disk after a restart.
    #[tokio::test]
    async fn nothing_reported_saved_after_write_failures_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("full.db").display());
        let store = Store::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        let session = crate::store::NewSession {
            id: "s".into(),
            scenario_id: "x".into(),
            scenario_sha256: "sha".into(),
            mode: "free".into(),
            label: None,
            blind: false,
            names_revealed: true,
            start_id: None,
            created_at: 1,
            targets: Vec::new(),
        };
        let version = WriteOp::ScenarioVersion {
            sha256: "sha".into(),
            scenario_id: "x".into(),
            version: 1,
            title: "x".into(),
            bundle: "{}".into(),
            created_at: 1,
        };
        store
            .write(vec![
                version,
                WriteOp::CreateSession(session),
                turn(1, "first".into()),
            ])
            .await
            .unwrap();
        let pages: i64 = sqlx::query("PRAGMA page_count")
            .fetch_one(store.pool())
            .await
            .unwrap()
            .get(0);
        // Constraint failures found at commit time, as a full disk's are.
        pragma(&store, "PRAGMA defer_foreign_keys = ON".into()).await;
        pragma(&store, format!("PRAGMA max_page_count = {pages}")).await;

        let long = |n: u32| format!("line {n} {}", "x".repeat(50_000));
        let full = store.write(vec![turn(2, long(2))]).await.unwrap_err();
        assert!(full.to_string().contains("full"), "{full}");
        // A write that fails at its commit (a turn of a session that does not exist).
        let mut ghost = turn(1, "ghost".into());
        if let WriteOp::Turn { session_id, .. } = &mut ghost {
            *session_id = "ghost".into();
        }
        let refused = store.write(vec![ghost]).await.unwrap_err();
        assert!(refused.to_string().contains("FOREIGN KEY"), "{refused}");

        // Room again: what is reported saved is saved.
        pragma(&store, "PRAGMA max_page_count = 4294967294".into()).await;
        for n in 2..=4 {
            store.write(vec![turn(n, long(n))]).await.unwrap();
        }
        store.close().await;

        let reopened = Store::connect(&url).await.unwrap();
        let stored: Vec<u32> = reopened
            .load_session("s")
            .await
            .unwrap()
            .turns
            .iter()
            .map(|t| t.turn)
            .collect();
        assert_eq!(stored, [1, 2, 3, 4]);
        // Nothing holds the write lock: another connection writes at once.
        reopened.write(vec![turn(5, "after".into())]).await.unwrap();
    }
}
