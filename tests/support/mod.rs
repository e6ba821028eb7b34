//! The test harness: `spawn_app()` starts the real application on port 0 with a fresh
//! database (a SQLite file in a temporary folder, or a new database on the PostgreSQL server the
//! test script started), the fixture scenarios, and targets pointing at a fake upstream.

pub mod binary;
pub mod upstream;
pub mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Once;

use tokio_util::sync::CancellationToken;
use vigil::config::{Config, TargetConfig};
use vigil::startup::Application;

pub use upstream::{FakeUpstream, Gate, Reply};
pub use ws::{WsClient, criterion_of, status_of, upgrade_request, verdict_of};

/// The ratings people gave, in a stored session (`GET /api/sessions/{id}`), in order.
pub fn people_ratings(stored: &serde_json::Value) -> Vec<&serde_json::Value> {
    stored["ratings"]
        .as_array()
        .expect("a stored session's ratings")
        .iter()
        .filter(|r| r["rater"].as_str().is_some_and(|r| r.starts_with("human:")))
        .collect()
}

/// Writes a `vigil.toml` for the real binary in `dir`: SQLite there, the fixture scenarios,
/// and the target `fake` on `upstream_url` (with `extra` lines, e.g. `api_key_env = "X"`).
pub fn binary_config(dir: &std::path::Path, upstream_url: &str, extra: &str) -> PathBuf {
    let config = dir.join("vigil.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\ndatabase_url = \"sqlite://{}\"\nscenarios = \"{}\"\n\n\
             [[targets]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{upstream_url}\"\nmodel = \"fake\"\nretries = 0\n{extra}",
            dir.join("vigil.db").display(),
            fixture_scenarios().display(),
        ),
    )
    .unwrap();
    config
}

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

pub fn fixture_scenarios() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scenarios")
}

pub fn bundled_scenarios() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

static TRACING: Once = Once::new();

/// Logs only when `TEST_LOG` is set.
pub fn init_tracing() {
    TRACING.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(
                    std::env::var("TEST_LOG").unwrap_or_else(|_| "debug".into()),
                ))
                .with_test_writer()
                .init();
        }
    });
}

/// The PostgreSQL server of the test run. Tests that need it fail (not skip) without it.
pub fn postgres_admin_url() -> String {
    std::env::var("VIGIL_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "VIGIL_TEST_POSTGRES_URL is not set. The PostgreSQL tests need a server: run the \
             README's test command (bash scripts/test.sh), which starts one on loopback."
        )
    })
}

/// A fresh, empty database URL on the test PostgreSQL server.
pub async fn fresh_postgres_database() -> String {
    use sqlx::Connection;
    let admin = postgres_admin_url();
    let name = format!("vigil_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL at {admin}: {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base);
    format!("{base}/{name}")
}

/// A fresh database of the given kind; the folder keeps a SQLite file alive.
pub async fn fresh_database(db: Db) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = match db {
        Db::Sqlite => format!("sqlite://{}", dir.path().join("vigil.db").display()),
        Db::Postgres => fresh_postgres_database().await,
    };
    (url, dir)
}

/// A running application.
pub struct TestApp {
    pub address: SocketAddr,
    pub upstream: FakeUpstream,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl TestApp {
    pub async fn ws(&self) -> WsClient {
        WsClient::connect(self.address).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = reqwest::get(self.url(path)).await.unwrap();
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    /// Waits until the server holds `live` sessions in memory, failing after `within`.
    pub async fn wait_for_live_sessions(&self, live: u64, within: std::time::Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let (_, health) = self.get("/healthz").await;
            if health["live_sessions"] == live {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sessions in memory after {within:?}: {health}, expected {live}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await; // polling a condition
        }
    }

    /// Posts JSON (with these headers) and returns the status and the JSON body.
    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> (u16, serde_json::Value) {
        let mut request = reqwest::Client::new().post(self.url(path)).json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    /// Shuts the server down gracefully and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.server.await.unwrap();
    }
}

/// Test targets: the demo without delays, and three fake OpenAI-compatible models with short
/// timeouts and no retries.
pub fn test_targets(upstream: &FakeUpstream) -> Vec<TargetConfig> {
    let mut demo = TargetConfig::demo("demo", 0);
    demo.chunk_delay_ms = Some(0);
    let fake = |name: &str| {
        let mut t = TargetConfig::openai(name, &upstream.url, name);
        t.connect_timeout_ms = 3_000;
        t.first_token_timeout_ms = 1_000;
        t.stall_timeout_ms = 1_000;
        t.total_timeout_ms = 20_000;
        t.retries = 0;
        t
    };
    vec![demo, fake("fake"), fake("fake-b"), fake("fake-c")]
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Db::Sqlite, |_| {}).await
}

/// Starts the application on `db`, after `tweak` has adjusted its configuration.
pub async fn spawn_app_with(db: Db, tweak: impl FnOnce(&mut Config)) -> TestApp {
    init_tracing();
    let upstream = FakeUpstream::start().await;
    let (database_url, dir) = fresh_database(db).await;
    let mut config = Config::default();
    config.server.bind = "127.0.0.1:0".parse().unwrap();
    config.server.database_url = database_url;
    config.server.scenarios = fixture_scenarios();
    config.server.shutdown_grace_secs = 5;
    config.targets = test_targets(&upstream);
    tweak(&mut config);
    let app = Application::build(config)
        .await
        .expect("the application starts");
    let address = app.address();
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(async move { app.run_until_stopped().await.unwrap() });
    TestApp {
        address,
        upstream,
        shutdown,
        server,
        _dir: dir,
    }
}
