//! Configuration, layered: built-in defaults <- `vigil.toml` <- `VIGIL_*` environment <- flags.
//!
//! The file and the defaults live here; the environment and the flags are read by clap in
//! `main.rs` and arrive as [`Overrides`]. API keys never appear in the file: a target names the
//! environment variable that holds its key, and the key is read into a [`Secret`] whose `Debug`
//! and `Display` mask it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Libraries whose own logging can carry clinical text (every WebSocket frame, patient lines
/// included, at `trace`): always off, whatever the filter asks for.
const SILENT_LIBRARIES: [&str; 2] = ["tungstenite", "tokio_tungstenite"];

/// The log filter from `VIGIL_LOG` (or `RUST_LOG`), default `vigil=info,warn`, with the
/// libraries that would log transcripts switched off.
pub fn log_filter(spec: Option<&str>) -> tracing_subscriber::EnvFilter {
    let mut filter = spec
        .and_then(|s| tracing_subscriber::EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("vigil=info,warn"));
    for library in SILENT_LIBRARIES {
        if let Ok(directive) = format!("{library}=off").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// The name of the configuration file looked up in the working directory when none is given.
pub const DEFAULT_CONFIG_FILE: &str = "vigil.toml";

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub session: SessionConfig,
    /// Model endpoints. The built-in `demo` targets are always added (see [`Config::targets`]).
    pub targets: Vec<TargetConfig>,
    /// The LLM judge, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeConfig>,
}

/// `[judge]`: which configured target rates every answer on the criteria with a judge
/// question, and how many answers it rates at once.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    pub target: String,
    #[serde(default = "default_judge_concurrency")]
    pub concurrency: usize,
}

fn default_judge_concurrency() -> usize {
    4
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. A non-loopback address needs accounts, which this version does not
    /// have yet, so it is refused.
    pub bind: SocketAddr,
    /// `sqlite://path` (created if missing) or `postgres://user:password@host/db`.
    pub database_url: String,
    /// Directory holding the scenario files, `criteria/` and `resources.toml`.
    pub scenarios: PathBuf,
    /// Live sessions held in memory at once; starting one more is refused with `server_busy`.
    pub max_sessions: usize,
    /// Live sessions one person (principal) may hold at once; one more is refused with
    /// `too_many_sessions`, so that nobody can fill the server for everyone else.
    pub max_sessions_per_person: usize,
    /// How long shutdown waits for sessions and connections to finish, in seconds.
    pub shutdown_grace_secs: u64,
    /// A connection whose request headers have not all arrived this many seconds after it
    /// started waiting for them is closed (slow clients cannot hold connections open).
    pub header_timeout_secs: u64,
    /// Open connections at once (WebSockets included); one more is closed at once, so the
    /// server never runs out of file descriptors.
    pub max_connections: usize,
    /// WebSocket messages one connection may send per second (bursts of twice as many); more
    /// are refused with `too_many_messages`, unapplied.
    pub messages_per_second: u32,
    /// The same for all the connections of one person together.
    pub messages_per_second_per_person: u32,
    /// Page origins (`scheme://host:port`, exactly) allowed to open the WebSocket, besides the
    /// origins this server serves itself (`http://127.0.0.1:PORT`, `http://localhost:PORT`).
    pub allowed_origins: Vec<String>,
    /// `Host` names (`host:port`) this server answers to, besides its own address and
    /// `localhost:PORT` (a reverse proxy's name, for instance). Any other `Host` is refused
    /// with 403, which is what keeps DNS rebinding away from the API.
    pub allowed_hosts: Vec<String>,
}

impl ServerConfig {
    /// The `Host` values this server answers to, once it listens on `port`.
    pub fn served_hosts(&self, port: u16) -> Vec<String> {
        let mut hosts = vec![format!("127.0.0.1:{port}"), format!("localhost:{port}")];
        let ip = self.bind.ip();
        if ip.is_ipv6() {
            hosts.push(format!("[{ip}]:{port}"));
        } else if !ip.is_loopback() && !ip.is_unspecified() {
            hosts.push(format!("{ip}:{port}"));
        }
        hosts.extend(self.allowed_hosts.iter().map(|h| h.to_ascii_lowercase()));
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// The page origins allowed to open the WebSocket, once the server listens on `port`.
    pub fn allowed_origins(&self, port: u16) -> Vec<String> {
        let mut origins: Vec<String> = self
            .served_hosts(port)
            .iter()
            .filter(|h| !self.allowed_hosts.contains(h))
            .map(|h| format!("http://{h}"))
            .collect();
        origins.extend(self.allowed_origins.iter().cloned());
        origins.sort();
        origins.dedup();
        origins
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Longest patient line accepted, in characters.
    pub max_text_chars: usize,
    /// Most targets in one session.
    pub max_targets: usize,
    /// A session with no viewer and nothing streaming leaves memory after this many seconds
    /// (it stays in the database and is resumed from there).
    pub idle_secs: u64,
    /// An ended session with no viewer leaves memory after this many seconds (0: as soon as
    /// its last viewer leaves; it stays in the database and comes back when opened).
    pub ended_idle_secs: u64,
    /// Rater name recorded for ratings sent over the WebSocket until accounts exist.
    pub human_rater: String,
}

/// One `[[targets]]` entry, as written in the file. Validated into a
/// [`crate::target::TargetSpec`] when the target registry is built.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Unique name, used in `start` messages and in reports.
    pub name: String,
    pub kind: TargetKind,
    /// Base URL of the API, up to and including `/v1` (a query string, such as Azure's
    /// `?api-version=`, is kept on every request). Anthropic targets default to
    /// `https://api.anthropic.com/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Name of the environment variable holding the API key (never the key itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Longest answer, in tokens. Anthropic targets send 1024 when it is not set (their API
    /// requires it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// The same limit sent as `max_completion_tokens`, for models that refuse `max_tokens`
    /// (OpenAI's o-series and newer). At most one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// The model's context length, in tokens: the history sent is fitted to it (the system
    /// prompt and the latest turns are kept, the oldest turns left out, and each answer records
    /// how many were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_tokens: Option<u32>,
    /// Requests this target's server takes at once: targets with the same `base_url` share the
    /// limit (the smallest set wins), and an answer waiting for its turn records how long it
    /// queued, apart from the model's time to first token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
    /// Headers sent with every request (OpenRouter's `HTTP-Referer` and `X-Title`,
    /// `OpenAI-Organization`, ...). Stored with each session like the rest of this table, so
    /// never a secret: keys go through `api_key_env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_headers: Option<BTreeMap<String, String>>,
    /// How the key is sent to an OpenAI-compatible server: `bearer` (`Authorization: Bearer`,
    /// the default) or `api-key` (Azure OpenAI's `api-key` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_header: Option<AuthHeader>,
    /// Streaming OpenAI-compatible targets ask for token counts with
    /// `stream_options.include_usage`; `false` leaves it out for servers that refuse it.
    #[serde(default = "default_true")]
    pub stream_usage: bool,
    /// Sampling settings sent as they are when set (OpenAI-compatible targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    /// Sequences where the model stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    /// Anything else a server takes (`min_p`, `top_k`, `repetition_penalty`, ...), merged into
    /// the request body; a key here wins over Vigil's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_body: Option<toml::Table>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Stream the answer with server-sent events (the default) or ask for it whole.
    #[serde(default = "default_true")]
    pub stream: bool,
    /// The TCP (and TLS) connection to the model's server.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Streaming: until the first piece of answer text arrives (the response headers
    /// included). Without streaming the whole answer comes at once, bounded by the total.
    #[serde(default = "default_first_token_timeout_ms")]
    pub first_token_timeout_ms: u64,
    /// Longest silence between two pieces of a streaming answer.
    #[serde(default = "default_stall_timeout_ms")]
    pub stall_timeout_ms: u64,
    /// The whole answer.
    #[serde(default = "default_total_timeout_ms")]
    pub total_timeout_ms: u64,
    /// Retries for refused connections and 429/5xx answers, before any answer text only.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Longest answer kept, in characters: beyond it the answer is cut there, kept, rated as
    /// cut short and marked `truncated` (a model that runs away cannot exhaust the server).
    #[serde(default = "default_max_answer_chars")]
    pub max_answer_chars: usize,
    /// Demo targets: pause between streamed words, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_delay_ms: Option<u64>,
    /// Demo targets: picks which canned variants this target prefers. OpenAI-compatible
    /// targets: the sampling `seed` sent with every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// Any OpenAI-compatible `/v1/chat/completions` endpoint.
    Openai,
    /// Anthropic's Messages API (`/v1/messages`).
    Anthropic,
    /// Built-in canned answers; no network, no key.
    Demo,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Openai => "openai",
            TargetKind::Anthropic => "anthropic",
            TargetKind::Demo => "demo",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AuthHeader {
    /// `Authorization: Bearer KEY`.
    Bearer,
    /// `api-key: KEY` (Azure OpenAI).
    ApiKey,
}

fn default_true() -> bool {
    true
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_first_token_timeout_ms() -> u64 {
    60_000
}
fn default_stall_timeout_ms() -> u64 {
    30_000
}
fn default_total_timeout_ms() -> u64 {
    300_000
}
fn default_max_answer_chars() -> usize {
    50_000
}
fn default_retries() -> u32 {
    2
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: "sqlite://data/vigil.db".to_owned(),
            scenarios: PathBuf::from("scenarios"),
            max_sessions: 2_000,
            max_sessions_per_person: 20,
            shutdown_grace_secs: 10,
            header_timeout_secs: 10,
            max_connections: 4_096,
            messages_per_second: 20,
            messages_per_second_per_person: 50,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_text_chars: 4_000,
            max_targets: 4,
            idle_secs: 900,
            ended_idle_secs: 0,
            human_rater: "human:local".to_owned(),
        }
    }
}

impl TargetConfig {
    /// A demo target with the given name and seed, as built in.
    pub fn demo(name: &str, seed: u64) -> Self {
        Self {
            name: name.to_owned(),
            kind: TargetKind::Demo,
            base_url: None,
            model: None,
            api_key_env: None,
            temperature: None,
            max_tokens: None,
            max_completion_tokens: None,
            context_tokens: None,
            max_concurrent_requests: None,
            extra_headers: None,
            auth_header: None,
            stream_usage: true,
            top_p: None,
            presence_penalty: None,
            frequency_penalty: None,
            stop: None,
            extra_body: None,
            system_prompt: None,
            stream: true,
            connect_timeout_ms: default_connect_timeout_ms(),
            first_token_timeout_ms: default_first_token_timeout_ms(),
            stall_timeout_ms: default_stall_timeout_ms(),
            total_timeout_ms: default_total_timeout_ms(),
            retries: default_retries(),
            max_answer_chars: default_max_answer_chars(),
            chunk_delay_ms: None,
            seed: Some(seed),
        }
    }

    /// An OpenAI-compatible target with default timeouts.
    pub fn openai(name: &str, base_url: &str, model: &str) -> Self {
        Self {
            kind: TargetKind::Openai,
            base_url: Some(base_url.to_owned()),
            model: Some(model.to_owned()),
            seed: None,
            ..Self::demo(name, 0)
        }
    }
}

/// Values from the environment and the command line, already merged by clap (a flag wins over
/// its `VIGIL_*` variable). `None` leaves the file's value, or the default, in place.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub bind: Option<SocketAddr>,
    pub database_url: Option<String>,
    pub scenarios: Option<PathBuf>,
}

/// Settings each kind of target would silently ignore, so they are refused at their place in
/// the file.
const UNUSED_BY_OPENAI: &[&str] = &["chunk_delay_ms"];
const UNUSED_BY_ANTHROPIC: &[&str] = &[
    "chunk_delay_ms",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "max_completion_tokens",
    "auth_header",
    "stream_usage",
];
const UNUSED_BY_DEMO: &[&str] = &[
    "temperature",
    "max_tokens",
    "max_completion_tokens",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "extra_body",
    "extra_headers",
    "auth_header",
    "stream_usage",
    "context_tokens",
    "max_concurrent_requests",
];

fn refuse_unused_settings(text: &str, path: &str) -> Result<(), ConfigError> {
    use toml::de::{DeTable, DeValue};
    let Ok(root) = DeTable::parse(text) else {
        return Ok(());
    };
    let Some(targets) = root.get_ref().get("targets") else {
        return Ok(());
    };
    let DeValue::Array(items) = targets.get_ref() else {
        return Ok(());
    };
    for item in items {
        let DeValue::Table(table) = item.get_ref() else {
            continue;
        };
        let kind = table.get("kind").and_then(|k| match k.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            _ => None,
        });
        let unused = match kind {
            Some("openai") => UNUSED_BY_OPENAI,
            Some("anthropic") => UNUSED_BY_ANTHROPIC,
            Some("demo") => UNUSED_BY_DEMO,
            _ => continue,
        };
        for (key, _) in table.iter() {
            if unused.contains(&key.get_ref().as_ref()) {
                let (line, col) = crate::scenario::line_col(text, key.span().start);
                return Err(ConfigError::Parse {
                    path: path.to_owned(),
                    line,
                    col,
                    message: format!(
                        "`{}` does not apply to {} targets; this one would ignore it",
                        key.get_ref(),
                        kind.unwrap_or_default()
                    ),
                });
            }
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {message}")]
    Parse {
        path: String,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Reads the configuration: `path` if given (it must exist), else `vigil.toml` in the
    /// working directory if present, else the defaults; then applies `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => Self::from_file(path)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_FILE))?
            }
            None => Self::default(),
        };
        if let Some(bind) = overrides.bind {
            config.server.bind = bind;
        }
        if let Some(url) = &overrides.database_url {
            config.server.database_url.clone_from(url);
        }
        if let Some(dir) = &overrides.scenarios {
            config.server.scenarios.clone_from(dir);
        }
        config.validate()?;
        Ok(config)
    }

    fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses configuration text; `path` is only used in error messages.
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        let config = toml::from_str(text).map_err(|err| {
            let (line, col) = err
                .span()
                .map(|span| crate::scenario::line_col(text, span.start))
                .unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                col,
                message: err.message().to_owned(),
            }
        })?;
        refuse_unused_settings(text, path)?;
        Ok(config)
    }

    /// Checks what serde cannot: unique target names, a loopback address, sane limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.server.bind.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "refusing to listen on {}: serving beyond this machine requires accounts, which \
                 this version of Vigil does not have yet; bind a loopback address such as \
                 127.0.0.1:8080 and put an authenticating proxy in front",
                self.server.bind
            )));
        }
        let mut names = std::collections::HashSet::new();
        for target in self.targets() {
            if !names.insert(target.name.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "two targets are named `{}`; target names must be unique",
                    target.name
                )));
            }
        }
        if self.session.max_text_chars == 0 || self.session.max_targets == 0 {
            return Err(ConfigError::Invalid(
                "session.max_text_chars and session.max_targets must be at least 1".to_owned(),
            ));
        }
        Ok(())
    }

    /// The configured targets plus the built-in demo targets (`demo`, `demo-b`), unless the
    /// file declares a target of the same name, which then replaces the built-in one.
    pub fn targets(&self) -> Vec<TargetConfig> {
        let mut all = Vec::new();
        for (name, seed) in [("demo", 0), ("demo-b", 1)] {
            if !self.targets.iter().any(|t| t.name == name) {
                all.push(TargetConfig::demo(name, seed));
            }
        }
        all.extend(self.targets.iter().cloned());
        all
    }

    /// The effective configuration as TOML, with the database password masked and, for each
    /// target that names an API-key variable, whether that variable is set (never its value).
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        shown.server.database_url = mask_url_password(&self.server.database_url);
        shown.targets = self.targets();
        let mut text = toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# {e}\n"));
        for target in &shown.targets {
            if let Some(var) = &target.api_key_env {
                let state = if std::env::var_os(var).is_some() {
                    "set (value hidden)"
                } else {
                    "NOT SET: this target cannot answer"
                };
                text.push_str(&format!("# target `{}`: ${var} is {state}\n", target.name));
            }
        }
        let port = self.server.bind.port();
        text.push_str(&format!(
            "# WebSocket origins allowed: {}\n# Host names answered: {}\n",
            self.server.allowed_origins(port).join(", "),
            self.server.served_hosts(port).join(", ")
        ));
        text
    }
}

/// Replaces the password of a URL such as `postgres://user:secret@host/db` with `****`.
pub fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:****@{host}"),
        None => url.to_owned(),
    }
}

/// A secret (an API key). It prints as `****` and is only revealed by [`Secret::expose`].
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself, for the one place that must send it (an `Authorization` header).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of this secret replaced by `[redacted]` (some proxies echo
    /// the request's key in their error bodies). Values shorter than 8 characters are not
    /// secrets worth the name and are left alone, so ordinary text is never mangled.
    pub fn redact(&self, text: &str) -> Option<String> {
        (self.0.len() >= 8 && text.contains(&self.0)).then(|| text.replace(&self.0, "[redacted]"))
    }
}

/// Replaces every configured secret in `text`.
pub fn redact_all(secrets: &[Secret], text: String) -> String {
    secrets
        .iter()
        .fold(text, |text, secret| secret.redact(&text).unwrap_or(text))
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

#[cfg(test)]
mod log_tests {
    use super::log_filter;

    #[test]
    fn frame_logging_stays_off_even_at_trace() {
        for spec in [Some("trace"), Some("tungstenite=trace,vigil=debug"), None] {
            let filter = log_filter(spec).to_string();
            assert!(filter.contains("tungstenite=off"), "{filter}");
            assert!(filter.contains("tokio_tungstenite=off"), "{filter}");
            assert!(!filter.contains("tungstenite=trace"), "{filter}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_are_overridden_by_flags() {
        let config = Config::from_toml(
            "[server]\nbind = \"127.0.0.1:9000\"\ndatabase_url = \"sqlite://x.db\"\n",
            "vigil.toml",
        )
        .unwrap();
        assert_eq!(config.server.bind.port(), 9000);
        assert_eq!(config.server.database_url, "sqlite://x.db");
        let mut config = config;
        config.server.bind = "127.0.0.1:9001".parse().unwrap();
        assert_eq!(config.server.bind.port(), 9001);
    }

    #[test]
    fn unknown_keys_are_reported_with_their_position() {
        let err = Config::from_toml("[server]\nbnid = \"127.0.0.1:1\"\n", "vigil.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("vigil.toml:2:1:"), "{err}");
        assert!(err.contains("bnid"), "{err}");
    }

    #[test]
    fn non_loopback_bind_is_refused() {
        let mut config = Config::default();
        config.server.bind = "0.0.0.0:8080".parse().unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("accounts"), "{err}");
    }

    #[test]
    fn secrets_and_passwords_are_masked() {
        assert_eq!(
            format!("{:?}", Secret::new("sk-123".into())),
            "Secret(****)"
        );
        assert_eq!(
            mask_url_password("postgres://vigil:hunter2@db:5432/vigil"),
            "postgres://vigil:****@db:5432/vigil"
        );
        let mut config = Config::default();
        config.server.database_url = "postgres://vigil:hunter2@db/vigil".into();
        let mut target = TargetConfig::openai("gpt", "http://127.0.0.1:1/v1", "m");
        target.api_key_env = Some("VIGIL_TEST_SURELY_UNSET_KEY".into());
        config.targets.push(target);
        let shown = config.to_masked_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("VIGIL_TEST_SURELY_UNSET_KEY is NOT SET"),
            "{shown}"
        );
    }

    #[test]
    fn built_in_demo_targets_are_always_there_and_can_be_replaced() {
        let config = Config::default();
        let names: Vec<_> = config.targets().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["demo", "demo-b"]);
        let mut config = Config::default();
        let mut demo = TargetConfig::demo("demo", 7);
        demo.chunk_delay_ms = Some(0);
        config.targets.push(demo);
        let targets = config.targets();
        assert_eq!(targets.len(), 2);
        assert!(
            targets
                .iter()
                .any(|t| t.name == "demo" && t.seed == Some(7))
        );
    }

    #[test]
    fn a_setting_an_openai_target_would_ignore_is_refused_at_its_place() {
        let text = "[[targets]]\nname = \"gpt\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\nchunk_delay_ms = 5\n";
        let err = Config::from_toml(text, "vigil.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "vigil.toml:6:1: `chunk_delay_ms` does not apply to openai targets; this one would ignore it"
        );
        // On a demo target it is what it is for.
        let demo = "[[targets]]\nname = \"slow\"\nkind = \"demo\"\nchunk_delay_ms = 5\n";
        assert!(Config::from_toml(demo, "vigil.toml").is_ok());
        // And a sampling setting on a demo target is refused the same way.
        let demo = "[[targets]]\nname = \"d\"\nkind = \"demo\"\n  top_p = 0.9\n";
        assert_eq!(
            Config::from_toml(demo, "vigil.toml")
                .unwrap_err()
                .to_string(),
            "vigil.toml:4:3: `top_p` does not apply to demo targets; this one would ignore it"
        );
        // Anthropic's API has no seed or penalties.
        let claude =
            "[[targets]]\nname = \"c\"\nkind = \"anthropic\"\nmodel = \"claude\"\nseed = 7\n";
        assert_eq!(
            Config::from_toml(claude, "vigil.toml")
                .unwrap_err()
                .to_string(),
            "vigil.toml:5:1: `seed` does not apply to anthropic targets; this one would ignore it"
        );
    }
}
