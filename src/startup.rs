//! Building the application from a configuration. [`Application::build`] loads and checks the
//! scenarios, builds the targets, connects and migrates the database and binds the listener,
//! so tests start the very same application on port 0 and ask it for its port.
//!
//! Connections are served by [`crate::serve`] (header timeout, connection cap).
//!
//! Shutdown is ours: on the signal the listener stops, HTTP connections finish their request,
//! every WebSocket is closed with 1001, every session stops its answers and saves them as
//! interrupted, and all of it is awaited with a deadline before the database is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{AppState, router};
use crate::scenario::load_dir;
use crate::session::{Sessions, SessionsConfig};
use crate::store::Store;
use crate::target::Targets;

pub struct Application {
    listener: TcpListener,
    address: SocketAddr,
    state: AppState,
    store: Store,
    grace: Duration,
}

/// A listener with a long accept queue: a burst of connections (many tabs reconnecting after
/// a restart, or a flood) waits there rather than being dropped by the kernel, which makes a
/// client retry only after a second or more.
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(4_096)
}

/// The judge of `[judge]`: its target, and its prompt from `prompts/judge.toml` in the
/// scenario directory. A judge that is the same model as a target (or from the same server)
/// is allowed, and warned about: a model grading itself overrates itself.
fn build_judge(
    config: &Config,
    targets: &Targets,
) -> anyhow::Result<Option<Arc<crate::rating::judge::Judge>>> {
    let Some(judge) = &config.judge else {
        return Ok(None);
    };
    let target = targets.get(&judge.target).ok_or_else(|| {
        let known: Vec<&str> = targets.names().collect();
        anyhow::anyhow!(
            "[judge] target `{}` is not a configured target (configured: {})",
            judge.target,
            known.join(", ")
        )
    })?;
    let path = config.server.scenarios.join("prompts").join("judge.toml");
    let prompt = crate::rating::judge::Prompt::load(&path).map_err(anyhow::Error::msg)?;
    for other in targets.iter().filter(|t| t.info.name != target.info.name) {
        let same_model = other.info.model.is_some() && other.info.model == target.info.model;
        let same_server =
            other.config.base_url.is_some() && other.config.base_url == target.config.base_url;
        if same_model || same_server {
            tracing::warn!(
                judge = %target.info.name,
                target = %other.info.name,
                "the judge is {} as a target it rates: a model grading itself overrates itself",
                if same_model { "the same model" } else { "on the same server" }
            );
        }
    }
    tracing::info!(judge = %target.info.name, prompt_version = prompt.version, "answers are rated by a judge");
    Ok(Some(Arc::new(crate::rating::judge::Judge::new(
        &target.info.name,
        Arc::clone(&target.model),
        prompt,
        judge.concurrency,
    ))))
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let library = load_dir(&config.server.scenarios).map_err(|report| {
            anyhow::anyhow!(
                "the scenarios in {} have problems; nothing was started:\n{report}",
                config.server.scenarios.display()
            )
        })?;
        for warning in &library.report.diagnostics {
            tracing::warn!("{warning}");
        }
        let targets = Targets::from_config(&config.targets()).map_err(anyhow::Error::msg)?;
        for target in targets.iter() {
            if let Some(reason) = &target.info.unavailable {
                tracing::warn!(target = %target.info.name, "target cannot answer: {reason}");
            }
        }
        let judge = build_judge(&config, &targets)?;
        let store = Store::connect(&config.server.database_url)
            .await
            .with_context(|| {
                format!(
                    "database {}",
                    crate::config::mask_url_password(&config.server.database_url)
                )
            })?;
        store.migrate().await?;
        for warning in crate::lint::version_warnings(&library, &store).await? {
            tracing::warn!("{warning}");
        }
        if let Some(settings) = store.sqlite_settings().await? {
            tracing::info!("sqlite: {settings}");
            if !settings.contains("journal_mode=wal") || !settings.contains("synchronous=full") {
                tracing::warn!(
                    "SQLite did not take WAL with synchronous=FULL; durability is weaker than intended"
                );
            }
        }

        // Loading parsed and compiled every file: hand the scratch memory back.
        crate::memory::trim();

        let shutdown = CancellationToken::new();
        let sessions = Sessions::new(
            store.clone(),
            Arc::new(library),
            Arc::new(targets),
            SessionsConfig {
                max_sessions: config.server.max_sessions,
                max_sessions_per_person: config.server.max_sessions_per_person,
                max_targets: config.session.max_targets,
                max_text_chars: config.session.max_text_chars,
                idle: Duration::from_secs(config.session.idle_secs),
                ended_idle: Duration::from_secs(config.session.ended_idle_secs),
                human_rater: config.session.human_rater.clone(),
                judge,
            },
            shutdown.child_token(),
        );
        let listener = listen(config.server.bind)
            .with_context(|| format!("cannot listen on {}", config.server.bind))?;
        let address = listener.local_addr()?;
        let grace = Duration::from_secs(config.server.shutdown_grace_secs);
        let state = AppState::new(Arc::new(config), sessions, shutdown, address.port())?;
        Ok(Self {
            listener,
            address,
            state,
            store,
            grace,
        })
    }

    /// The address actually bound (port 0 becomes a real port).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Cancel it to shut the server down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    pub fn sessions(&self) -> &Sessions {
        &self.state.sessions
    }

    /// Serves until the shutdown token is cancelled, then closes connections and sessions.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self {
            listener,
            state,
            store,
            grace,
            ..
        } = self;
        let shutdown = state.shutdown.clone();
        let app = router(state.clone());
        let http = crate::serve::serve(
            listener,
            app,
            crate::serve::Limits {
                header_timeout: Duration::from_secs(state.config.server.header_timeout_secs),
                max_connections: state.config.server.max_connections,
            },
            shutdown.clone(),
        )
        .await;
        state.connections.close();
        if tokio::time::timeout(grace, state.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("some WebSocket connections did not close in time");
        }
        if tokio::time::timeout(grace, http.wait()).await.is_err() {
            tracing::warn!("some HTTP connections did not close in time");
        }
        if !state.sessions.shutdown(grace).await {
            tracing::warn!("some sessions did not finish saving in time");
        }
        store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}
