//! Everything persistent, behind one interface, on SQLite (embedded default) or PostgreSQL.
//!
//! One implementation on sqlx's `Any` driver with portable SQL (`$1` placeholders, only text,
//! integer and float columns) and one migrations folder, embedded in the binary. SQLite's
//! settings (WAL, foreign keys, busy timeout, `synchronous = FULL`: a write a client is told
//! about is on disk) are applied to every connection and read back at start.
//!
//! All writes go through one writer task ([`writer`]) that commits whatever is pending in one
//! transaction (group commit): durability costs one sync per batch, not per row, and SQLite's
//! single writer never contends. [`Store::write`] returns only after the commit. The writer has
//! a connection of its own, outside the pool, and replaces it after any failed write, so a
//! success always comes from a connection known to be clean.
//!
//! Not here: what the rows mean (`session`, `rating`).

mod reads;
mod writer;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Executor, Row};
use tokio::sync::{mpsc, oneshot};

pub use reads::{
    AnswerDetails, AnswerRow, MarkerRow, Page, PreferenceRow, SessionFilter, SessionListItem,
    SessionRecord, SessionRow, SessionTargetRow, TurnRow, VersionRow,
};
pub use writer::{NewSession, NewSessionTarget, WriteOp};

/// The migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflicting write: {0}")]
    Conflict(String),
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(db.message().to_owned())
            }
            _ if is_transient(&err) => StoreError::Unavailable(err.to_string()),
            _ => StoreError::Other(err.to_string()),
        }
    }
}

/// The settings every connection gets before its first use (the pool's and the writer's).
async fn prepare(conn: &mut sqlx::AnyConnection, backend: Backend) -> Result<(), sqlx::Error> {
    if backend == Backend::Sqlite {
        conn.execute("PRAGMA journal_mode = WAL").await?;
        conn.execute("PRAGMA synchronous = FULL").await?;
        conn.execute("PRAGMA foreign_keys = ON").await?;
        conn.execute("PRAGMA busy_timeout = 5000").await?;
        // The operating system caches the file already; SQLite's own cache of 2 MB per
        // connection would hold the same pages nine times over.
        conn.execute("PRAGMA cache_size = -512").await?;
    }
    Ok(())
}

/// Errors worth retrying: a busy or locked SQLite, a pool without free connections, a broken
/// connection.
pub(crate) fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // SQLite: 5 BUSY, 6 LOCKED (and their extended codes); PostgreSQL: 40001
            // serialization failure, 40P01 deadlock, 57014 statement timeout, 57P01 admin
            // shutdown, 57P02/57P03 crash or start-up in progress, 08xxx connection.
            matches!(
                code.as_ref(),
                "5" | "6"
                    | "261"
                    | "262"
                    | "517"
                    | "40001"
                    | "40P01"
                    | "57014"
                    | "57P01"
                    | "57P02"
                    | "57P03"
            ) || code.starts_with("08")
                || db.message().contains("database is locked")
        }
        _ => false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The database, shared by every part of the server (cheap to clone).
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    writer: mpsc::Sender<writer::Message>,
}

impl Store {
    /// Connects (creating a SQLite file and its folder if missing) and starts the writer task.
    /// Does not migrate: call [`Store::migrate`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        crate::tls::install_provider();
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::Other(format!(
                "unsupported database URL `{}`: use sqlite://path or postgres://...",
                crate::config::mask_url_password(url)
            )));
        };
        let url = match backend {
            Backend::Sqlite => prepare_sqlite_url(url)?,
            Backend::Postgres => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url)
            .map_err(|e| StoreError::Other(format!("invalid database URL: {e}")))?
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 8,
                Backend::Postgres => 10,
            })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| Box::pin(prepare(conn, backend)))
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot connect: {e}")))?;
        let writer = writer::spawn(options, backend);
        Ok(Self {
            pool,
            backend,
            writer,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies the embedded migrations that have not run yet.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Other(format!("migration failed: {e}")))
    }

    /// SQLite's effective settings, read back from a connection, e.g.
    /// `journal_mode=wal synchronous=full foreign_keys=on busy_timeout=5000`.
    pub async fn sqlite_settings(&self) -> Result<Option<String>, StoreError> {
        if self.backend != Backend::Sqlite {
            return Ok(None);
        }
        let mut conn = self.pool.acquire().await?;
        let journal: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        let sync: i64 = sqlx::query("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        let fk: i64 = sqlx::query("PRAGMA foreign_keys")
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        let busy: i64 = sqlx::query("PRAGMA busy_timeout")
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        let sync = match sync {
            0 => "off",
            1 => "normal",
            2 => "full",
            3 => "extra",
            _ => "unknown",
        };
        let fk = if fk == 1 { "on" } else { "off" };
        Ok(Some(format!(
            "journal_mode={journal} synchronous={sync} foreign_keys={fk} busy_timeout={busy}"
        )))
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").fetch_one(&self.pool).await?;
        Ok(())
    }

    /// Writes `ops` in one transaction, grouped with whatever else is pending, and returns
    /// once they are committed.
    pub async fn write(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        self.writer
            .send(writer::Message::Write(writer::WriteRequest { ops, done }))
            .await
            .map_err(|_| StoreError::Unavailable("the writer has stopped".to_owned()))?;
        committed
            .await
            .map_err(|_| StoreError::Unavailable("the writer has stopped".to_owned()))?
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Lets the writer finish what is queued and close its connection, then closes the pool.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.writer.send(writer::Message::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
        self.pool.close().await;
    }
}

/// The file and the query of a `sqlite:` URL (`sqlite://data/vigil.db?mode=rwc` ->
/// `("data/vigil.db", "mode=rwc")`); `None` for other databases.
pub fn sqlite_path(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("sqlite:")?.trim_start_matches("//");
    Some(rest.split_once('?').unwrap_or((rest, "")))
}

/// `sqlite://data/vigil.db` -> creates `data/` and asks SQLite to create the file.
fn prepare_sqlite_url(url: &str) -> Result<String, StoreError> {
    let (path, query) = sqlite_path(url).unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Err(StoreError::Other(
            "an in-memory SQLite database would lose every transcript at exit; give a file path"
                .to_owned(),
        ));
    }
    if let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|e| {
            StoreError::Other(format!(
                "cannot create the folder {}: {e}",
                parent.display()
            ))
        })?;
    }
    let query = if query.contains("mode=") {
        query.to_owned()
    } else if query.is_empty() {
        "mode=rwc".to_owned()
    } else {
        format!("{query}&mode=rwc")
    };
    Ok(format!("sqlite://{path}?{query}"))
}
