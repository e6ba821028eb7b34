//! The axum router: the JSON API (`api`), the web page and its assets (`pages`), the
//! WebSocket upgrade (`crate::ws`, which takes its own part of the state through `FromRef`)
//! and `/healthz`. Layers (request tracing with the matched path, body limit, timeouts) are
//! applied once, here.

mod api;
mod pages;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::FromRef;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::session::{ErrorCode, SessionError, Sessions};
use crate::ws::WsState;

/// What every handler can reach (cheap to clone).
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub sessions: Sessions,
    /// Cancelled when the server shuts down; connections close with 1001.
    pub shutdown: CancellationToken,
    /// Every WebSocket connection, so shutdown can wait for them.
    pub connections: TaskTracker,
    pub pages: Arc<pages::Pages>,
    /// The `Host` values this server answers to; any other is refused (DNS rebinding).
    pub hosts: Arc<Vec<String>>,
    /// The page origins allowed to open the WebSocket.
    pub origins: Arc<Vec<String>>,
    /// How many WebSocket messages a connection and a person may send.
    pub messages: Arc<crate::ws::MessageLimits>,
}

impl AppState {
    /// The state of a server listening on `port`.
    pub fn new(
        config: Arc<Config>,
        sessions: Sessions,
        shutdown: CancellationToken,
        port: u16,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            hosts: Arc::new(config.server.served_hosts(port)),
            origins: Arc::new(config.server.allowed_origins(port)),
            messages: Arc::new(crate::ws::MessageLimits::new(
                config.server.messages_per_second,
                config.server.messages_per_second_per_person,
            )?),
            config,
            sessions,
            shutdown,
            connections: TaskTracker::new(),
            pages: Arc::new(pages::Pages::load()?),
        })
    }
}

impl FromRef<AppState> for WsState {
    fn from_ref(state: &AppState) -> Self {
        WsState {
            sessions: state.sessions.clone(),
            shutdown: state.shutdown.clone(),
            connections: state.connections.clone(),
            origins: Arc::clone(&state.origins),
            messages: Arc::clone(&state.messages),
        }
    }
}

/// The whole application's router.
pub fn router(state: AppState) -> Router {
    let api = api::router().layer(TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        Duration::from_secs(30),
    ));
    Router::new()
        .merge(pages::router())
        .nest("/api", api)
        .route("/ws", get(crate::ws::upgrade))
        .route("/healthz", get(api::healthz))
        .fallback(not_found)
        .layer(RequestBodyLimitLayer::new(64 * 1024))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.hosts),
            served_host_only,
        ))
        .layer(
            // Paths only: never query strings or bodies, which could hold clinical text.
            TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<_>| {
                let path = request
                    .extensions()
                    .get::<axum::extract::MatchedPath>()
                    .map_or("unmatched", |p| p.as_str());
                tracing::info_span!("http", method = %request.method(), path)
            }),
        )
        .with_state(state)
}

/// Refuses, before any work, a request whose `Host` this server does not serve: a page on
/// another site that rebinds its name to 127.0.0.1 must not reach the API or the WebSocket.
async fn served_host_only(
    axum::extract::State(hosts): axum::extract::State<Arc<Vec<String>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase)
        .or_else(|| {
            request
                .uri()
                .authority()
                .map(|a| a.as_str().to_ascii_lowercase())
        });
    match host {
        Some(host) if hosts.contains(&host) => next.run(request).await,
        _ => AppError::new(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            "this server does not answer to that host name",
        )
        .into_response(),
    }
}

async fn not_found() -> AppError {
    AppError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "there is nothing at this address",
    )
}

/// An HTTP error: a status and a JSON body `{"code": ..., "message": ...}` that never carries
/// internals (those go to the log).
#[derive(Debug)]
pub struct AppError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl AppError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "something went wrong on the server; it is in the log",
        )
    }
}

impl From<crate::store::StoreError> for AppError {
    fn from(err: crate::store::StoreError) -> Self {
        match err {
            crate::store::StoreError::NotFound => {
                AppError::new(StatusCode::NOT_FOUND, "not_found", "not found")
            }
            crate::store::StoreError::Unavailable(_) => {
                tracing::error!(error = %err, "database unavailable");
                AppError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database is unavailable; try again shortly",
                )
            }
            other => AppError::internal(other),
        }
    }
}

/// The HTTP status of a request the engine refused for this reason.
fn session_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::UnknownScenario
        | ErrorCode::UnknownSession
        | ErrorCode::UnknownTarget
        | ErrorCode::UnknownMarker
        | ErrorCode::UnknownTurn
        | ErrorCode::UnknownCriterion => StatusCode::NOT_FOUND,
        ErrorCode::TooManySessions => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::StorageFailed | ErrorCode::ServerBusy | ErrorCode::SessionGone => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::ScenarioUnreadable => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::AnswersStreaming | ErrorCode::SessionEnded | ErrorCode::MarkerNotSet => {
            StatusCode::CONFLICT
        }
        ErrorCode::NoTargets
        | ErrorCode::TooManyTargets
        | ErrorCode::DuplicateTarget
        | ErrorCode::TargetUnavailable
        | ErrorCode::TextEmpty
        | ErrorCode::TextTooLong
        | ErrorCode::NotScripted
        | ErrorCode::ScriptFinished
        | ErrorCode::InvalidScore
        | ErrorCode::InvalidRating => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

impl From<SessionError> for AppError {
    fn from(err: SessionError) -> Self {
        let code = err.code();
        AppError::new(session_status(code), code.as_str(), err.to_string())
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = axum::Json(ErrorBody {
            code: self.code,
            message: &self.message,
        });
        (self.status, body).into_response()
    }
}
