//! The web page and its assets, from `web/` (embedded in release builds, read from disk in
//! debug builds by rust-embed). Pages are minijinja templates; the live part of the page speaks
//! the WebSocket protocol from `web/assets/app.js`.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use minijinja::{Environment, context};

use super::{AppError, AppState};

#[derive(rust_embed::Embed)]
#[folder = "web/"]
struct Web;

const TEMPLATES: [&str; 1] = ["index.html"];

pub struct Pages {
    env: Environment<'static>,
}

impl Pages {
    pub fn load() -> anyhow::Result<Self> {
        let mut env = Environment::new();
        for name in TEMPLATES {
            let file = Web::get(&format!("templates/{name}"))
                .ok_or_else(|| anyhow::anyhow!("web/templates/{name} is missing"))?;
            let text = String::from_utf8(file.data.into_owned())?;
            env.add_template_owned(name.to_owned(), text)?;
        }
        Ok(Self { env })
    }

    fn render(&self, name: &str, ctx: minijinja::Value) -> Result<Html<String>, AppError> {
        let template = self.env.get_template(name).map_err(AppError::internal)?;
        template.render(ctx).map(Html).map_err(AppError::internal)
    }
}

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/sessions/{id}", get(session_page))
        .route("/assets/{*path}", get(asset))
}

async fn index(State(state): State<AppState>) -> Result<Html<String>, AppError> {
    page(&state, None)
}

/// The same page, opened on a session (to resume or review it).
async fn session_page(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Html<String>, AppError> {
    page(&state, Some(id))
}

fn page(state: &AppState, session: Option<String>) -> Result<Html<String>, AppError> {
    let scenarios: Vec<minijinja::Value> = state
        .sessions
        .library()
        .scenarios
        .values()
        .map(|s| {
            context! {
                id => s.id.as_str(),
                title => &s.title,
                risk => minijinja::Value::from(minijinja::value::Serde(s.risk)),
                locale => &s.locale,
                content_warning => &s.content_warning,
                script_lines => s.script.len(),
            }
        })
        .collect();
    let targets: Vec<minijinja::Value> = state
        .sessions
        .targets()
        .iter()
        .map(|t| minijinja::Value::from(minijinja::value::Serde(&t.info)))
        .collect();
    state.pages.render(
        "index.html",
        context! {
            scenarios => scenarios,
            targets => targets,
            session => session,
            version => env!("CARGO_PKG_VERSION"),
        },
    )
}

async fn asset(Path(path): Path<String>) -> Response {
    let Some(file) = Web::get(&format!("assets/{path}")) else {
        return AppError::new(StatusCode::NOT_FOUND, "not_found", "no such asset").into_response();
    };
    let mime = match path.rsplit('.').next() {
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(mime)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        file.data.into_owned(),
    )
        .into_response()
}
