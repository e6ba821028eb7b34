//! Targets: the models that answer the patient.
//!
//! Every target implements [`ChatModel`]: given the conversation so far, it streams the answer
//! as [`Chunk`]s. `openai` speaks any OpenAI-compatible `/v1/chat/completions` API,
//! `anthropic` speaks Anthropic's Messages API; both go through [`stream`], which owns the
//! HTTP side (queueing, retries, the timeouts, the limits on what a server may send). `demo`
//! is built in and answers from canned text, so a fresh install works with no key and no
//! network. API keys are read from the environment variable a target names, kept in a
//! [`Secret`], and never logged.
//!
//! Not here: what to do with an answer (`session`), or how to rate it (`rating`).

mod anthropic;
pub mod check;
mod demo;
mod http;
mod openai;
mod stream;
mod think;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::BoxStream;
use serde::Serialize;

use crate::config::{AuthHeader, Secret, TargetConfig, TargetKind};

pub use anthropic::Anthropic;
pub use demo::Demo;
pub use openai::OpenAi;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One message of a conversation. The text is shared (`Arc`), so handing a model the whole
/// history each turn copies pointers, not transcripts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: Arc<str>,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<Arc<str>>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// What a target streams: `Sent` once the request has gone out, pieces of the answer (and of
/// its reasoning), then one `Done`.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// The request was sent after waiting this long for the endpoint's concurrency limit.
    /// Time to first token counts from here.
    Sent {
        queued_ms: u64,
    },
    Text(String),
    /// What a reasoning model thinks before it answers (`reasoning_content`, `reasoning`,
    /// inline `<think>`, Anthropic's thinking blocks): kept, never rated as the answer.
    Reasoning(String),
    /// The model's `refusal` field: shown and rated as its answer, and recorded as a refusal.
    Refusal(String),
    Done {
        /// As the model reported it (`stop`, `length`, ...); Anthropic's reasons are mapped to
        /// these (`end_turn` and `stop_sequence` to `stop`, `max_tokens` to `length`).
        finish: String,
        usage: Usage,
    },
}

/// Tokens the server counted, when it said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: Option<u32>,
    pub completion: Option<u32>,
}

pub type ChunkStream = BoxStream<'static, Result<Chunk, TargetError>>;

/// A chat model that streams its answers. Dropping the stream cancels the answer.
pub trait ChatModel: Send + Sync + std::fmt::Debug {
    fn stream(&self, messages: Vec<ChatMessage>) -> ChunkStream;

    /// The same, asking the server to reply with JSON matching `schema` where its API has a
    /// way to (OpenAI-compatible `response_format`); others are asked only by the prompt.
    fn stream_json(&self, messages: Vec<ChatMessage>, schema: &serde_json::Value) -> ChunkStream {
        let _ = schema;
        self.stream(messages)
    }
}

/// Why a target gave no (complete) answer. Each has a stable `code` for the protocol.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq, strum::EnumDiscriminants)]
#[strum_discriminants(name(TargetErrorCode), derive(strum::EnumIter))]
pub enum TargetError {
    #[error("could not connect to the model: {0}")]
    Connect(String),
    #[error("the model sent no response within {0} ms")]
    ConnectTimeout(u64),
    #[error("the model did not start answering within {0} ms")]
    FirstTokenTimeout(u64),
    #[error("the answer stalled: nothing arrived for {0} ms")]
    Stalled(u64),
    #[error("the answer took longer than the {0} ms allowed")]
    TotalTimeout(u64),
    #[error("the model refused the request (HTTP {status}): {message}")]
    Auth { status: u16, message: String },
    #[error("the model is rate-limiting requests (HTTP 429): {0}")]
    RateLimited(String),
    #[error("the model answered HTTP {status}: {message}")]
    Http { status: u16, message: String },
    #[error("the model sent a malformed stream: {0}")]
    Malformed(String),
    #[error("the answer was cut off before the model finished it: {0}")]
    Truncated(String),
    #[error("the model finished without answering anything (finish reason `{0}`)")]
    Empty(String),
    #[error("the conversation is longer than the model's context{}: {message}", limit.map(|l| format!(" of {l} tokens")).unwrap_or_default())]
    ContextExceeded {
        /// The context length, when the server or the target's `context_tokens` says it.
        limit: Option<u32>,
        message: String,
    },
    #[error("waited {0} ms for the model's server to take the request (max_concurrent_requests)")]
    QueueTimeout(u64),
    #[error("the API key variable ${0} is not set")]
    MissingKey(String),
}

impl TargetError {
    /// Stable code of the `error` event.
    pub fn code(&self) -> &'static str {
        TargetErrorCode::from(self).as_str()
    }

    /// The same error with every configured secret taken out of its text.
    pub fn redacted(self, secrets: &[Secret]) -> Self {
        let r = |text: String| crate::config::redact_all(secrets, text);
        match self {
            TargetError::Connect(m) => TargetError::Connect(r(m)),
            TargetError::Auth { status, message } => TargetError::Auth {
                status,
                message: r(message),
            },
            TargetError::RateLimited(m) => TargetError::RateLimited(r(m)),
            TargetError::Http { status, message } => TargetError::Http {
                status,
                message: r(message),
            },
            TargetError::Malformed(m) => TargetError::Malformed(r(m)),
            TargetError::Truncated(m) => TargetError::Truncated(r(m)),
            TargetError::Empty(m) => TargetError::Empty(r(m)),
            TargetError::ContextExceeded { limit, message } => TargetError::ContextExceeded {
                limit,
                message: r(message),
            },
            other @ (TargetError::ConnectTimeout(_)
            | TargetError::QueueTimeout(_)
            | TargetError::FirstTokenTimeout(_)
            | TargetError::Stalled(_)
            | TargetError::TotalTimeout(_)
            | TargetError::MissingKey(_)) => other,
        }
    }
}

impl TargetErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetErrorCode::Connect => "target_connect_failed",
            TargetErrorCode::ConnectTimeout => "target_connect_timeout",
            TargetErrorCode::FirstTokenTimeout => "target_first_token_timeout",
            TargetErrorCode::Stalled => "target_stalled",
            TargetErrorCode::TotalTimeout => "target_total_timeout",
            TargetErrorCode::Auth => "target_auth_failed",
            TargetErrorCode::RateLimited => "target_rate_limited",
            TargetErrorCode::Http => "target_http_error",
            TargetErrorCode::Malformed => "target_malformed_stream",
            TargetErrorCode::Truncated => "target_truncated",
            TargetErrorCode::Empty => "target_empty_answer",
            TargetErrorCode::ContextExceeded => "target_context_exceeded",
            TargetErrorCode::QueueTimeout => "target_queue_timeout",
            TargetErrorCode::MissingKey => "target_key_missing",
        }
    }
}

/// Per-target time limits.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_token: Duration,
    pub stall: Duration,
    pub total: Duration,
}

/// What clients are told about a target (no URL secrets, no key).
#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    pub name: String,
    pub kind: TargetKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Canned answers (the demo targets): say so wherever they are shown.
    pub canned: bool,
    /// Shown next to the name.
    pub label: String,
    /// Why the target cannot answer right now (a missing API key), if it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub info: TargetInfo,
    /// The configuration it was built from, stored with each session (keys are never in it).
    pub config: TargetConfig,
    pub model: Arc<dyn ChatModel>,
    /// How to ask its server what it serves (not for the demo).
    pub probe: Option<check::Probe>,
}

/// All configured targets, by name.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    by_name: BTreeMap<String, Target>,
}

impl Targets {
    /// Builds every target of the configuration (the built-in demos included).
    pub fn from_config(configs: &[TargetConfig]) -> Result<Self, String> {
        crate::tls::install_provider();

        // Every key configured here, so that none of them is ever passed on from an upstream.
        let secrets: Arc<Vec<Secret>> = Arc::new(
            configs
                .iter()
                .filter_map(|c| c.api_key_env.as_ref())
                .filter_map(|var| std::env::var(var).ok())
                .filter(|value| !value.is_empty())
                .map(Secret::new)
                .collect(),
        );
        // One place in line per server that takes a limited number of requests at once.
        let mut limits: BTreeMap<String, u32> = BTreeMap::new();
        for config in configs {
            if let (Some(base), Some(limit)) = (&config.base_url, config.max_concurrent_requests) {
                if limit == 0 {
                    return Err(format!(
                        "target `{}`: max_concurrent_requests must be at least 1",
                        config.name
                    ));
                }
                let slot = limits
                    .entry(base.trim_end_matches('/').to_owned())
                    .or_insert(limit);
                *slot = (*slot).min(limit);
            }
        }
        let gates: BTreeMap<String, Arc<tokio::sync::Semaphore>> = limits
            .into_iter()
            .map(|(base, limit)| (base, Arc::new(tokio::sync::Semaphore::new(limit as usize))))
            .collect();
        let mut by_name = BTreeMap::new();
        for config in configs {
            // A client per target: the connect timeout is the client's (it bounds the TCP and
            // TLS connection only, whatever the model then takes to answer).
            let client = reqwest::Client::builder()
                .user_agent(concat!("vigil/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
                .build()
                .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
            let gate = config
                .base_url
                .as_deref()
                .and_then(|base| gates.get(base.trim_end_matches('/')))
                .cloned();
            let target = build_target(config, &client, &secrets, gate)?;
            by_name.insert(config.name.clone(), target);
        }
        Ok(Self { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Target> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.by_name.values()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// What a target's configuration adds to every request body: the sampling settings that are
/// set, then `extra_body` (which wins over them).
fn request_settings(
    config: &TargetConfig,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let mut extra = serde_json::Map::new();
    let numbers = [
        ("top_p", config.top_p),
        ("presence_penalty", config.presence_penalty),
        ("frequency_penalty", config.frequency_penalty),
    ];
    for (key, value) in numbers {
        if let Some(value) = value {
            extra.insert(key.to_owned(), value.into());
        }
    }
    if let Some(stop) = &config.stop {
        extra.insert("stop".to_owned(), stop.clone().into());
    }
    if let Some(table) = &config.extra_body {
        let value = serde_json::to_value(table).map_err(|e| {
            format!(
                "target `{}`: extra_body cannot be sent as JSON: {e}",
                config.name
            )
        })?;
        if let serde_json::Value::Object(map) = value {
            if let Some(key) = ["model", "messages", "stream"]
                .iter()
                .find(|k| map.contains_key(**k))
            {
                return Err(format!(
                    "target `{}`: extra_body cannot set `{key}`, which Vigil sends itself",
                    config.name
                ));
            }
            extra.extend(map);
        }
    }
    Ok(extra)
}

fn build_target(
    config: &TargetConfig,
    client: &reqwest::Client,
    secrets: &Arc<Vec<Secret>>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
) -> Result<Target, String> {
    let name = &config.name;
    if name.trim().is_empty() {
        return Err("a target has an empty `name`".to_owned());
    }
    let timeouts = Timeouts {
        connect: Duration::from_millis(config.connect_timeout_ms),
        first_token: Duration::from_millis(config.first_token_timeout_ms),
        stall: Duration::from_millis(config.stall_timeout_ms),
        total: Duration::from_millis(config.total_timeout_ms),
    };
    let kind = config.kind;
    if kind == TargetKind::Demo {
        if config.base_url.is_some() || config.api_key_env.is_some() || config.model.is_some() {
            return Err(format!(
                "target `{name}`: demo targets take no base_url, model or api_key_env"
            ));
        }
        let delay = Duration::from_millis(config.chunk_delay_ms.unwrap_or(30));
        let demo = Demo::new(config.seed.unwrap_or(0), delay);
        return Ok(Target {
            info: TargetInfo {
                name: name.clone(),
                kind,
                model: None,
                canned: true,
                label: format!("{name} (canned answers, not a model)"),
                unavailable: None,
            },
            config: config.clone(),
            model: Arc::new(demo),
            probe: None,
        });
    }
    let fail = |message: String| format!("target `{name}`: {message}");
    let base_url = match (&config.base_url, kind) {
        (Some(url), _) => url.as_str(),
        (None, TargetKind::Anthropic) => "https://api.anthropic.com/v1",
        (None, _) => return Err(fail("openai targets need `base_url`".to_owned())),
    };
    let model = config
        .model
        .clone()
        .ok_or_else(|| fail(format!("{} targets need `model`", kind.as_str())))?;
    if config.max_tokens.is_some() && config.max_completion_tokens.is_some() {
        return Err(fail(
            "set max_tokens or max_completion_tokens, not both".to_owned(),
        ));
    }
    let (key, unavailable) = match &config.api_key_env {
        Some(var) => match std::env::var(var) {
            Ok(value) if !value.is_empty() => (Some(Secret::new(value)), None),
            _ => (None, Some(TargetError::MissingKey(var.clone()).to_string())),
        },
        None => (None, None),
    };
    let missing_key = unavailable
        .is_some()
        .then(|| config.api_key_env.clone())
        .flatten();
    let (path, own, key_header): (_, Vec<(&'static str, String)>, _) = match kind {
        TargetKind::Anthropic => (
            "messages",
            vec![("anthropic-version", anthropic::VERSION.to_owned())],
            key.as_ref().map(|k| ("x-api-key", k.expose().to_owned())),
        ),
        _ => (
            "chat/completions",
            Vec::new(),
            key.as_ref().map(|k| match config.auth_header {
                Some(AuthHeader::ApiKey) => ("api-key", k.expose().to_owned()),
                _ => ("authorization", format!("Bearer {}", k.expose())),
            }),
        ),
    };
    let endpoint = Arc::new(http::Endpoint {
        client: client.clone(),
        url: http::join(base_url, path).map_err(fail)?,
        headers: http::headers(config.extra_headers.as_ref(), &own, key_header).map_err(fail)?,
        missing_key,
        secrets: Arc::clone(secrets),
        stream: config.stream,
        timeouts,
        retries: config.retries,
        gate,
        context_tokens: config.context_tokens,
    });
    let probe = check::Probe {
        endpoint: Arc::clone(&endpoint),
        models: http::join(base_url, "models").map_err(fail)?,
    };
    let extra = request_settings(config)?;
    let chat: Arc<dyn ChatModel> = match kind {
        TargetKind::Anthropic => Arc::new(Anthropic::new(anthropic::Settings {
            endpoint,
            model: model.clone(),
            max_tokens: config.max_tokens.unwrap_or(anthropic::DEFAULT_MAX_TOKENS),
            temperature: config.temperature,
            extra,
        })),
        _ => Arc::new(OpenAi::new(openai::Settings {
            endpoint,
            model: model.clone(),
            temperature: config.temperature,
            max_tokens: config.max_tokens.or(config.max_completion_tokens),
            completion_field: config.max_completion_tokens.is_some(),
            seed: config.seed,
            stream_usage: config.stream_usage,
            extra,
        })),
    };
    Ok(Target {
        info: TargetInfo {
            name: name.clone(),
            kind,
            label: format!("{name} ({model})"),
            model: Some(model),
            canned: false,
            unavailable,
        },
        config: config.clone(),
        model: chat,
        probe: Some(probe),
    })
}
