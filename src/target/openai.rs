//! An OpenAI-compatible chat-completions client (OpenAI, vLLM, Ollama, llama.cpp server,
//! LM Studio, OpenRouter, ...): reqwest plus `eventsource-stream`, about what async-openai
//! would give us, without tying us to its release pace.
//!
//! Failure policy: a refused connection, a 429 or a 5xx is retried (bounded, with backoff,
//! honouring `Retry-After`) only before any answer text has arrived; after that, any failure
//! ends the answer with an error and the text so far is kept by the caller.

use std::sync::Arc;
use std::time::Duration;

use eventsource_stream::{EventStreamError, Eventsource};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::time::{Instant, timeout_at};

use super::{ChatMessage, ChatModel, Chunk, ChunkStream, TargetError, Timeouts};
use crate::config::Secret;

/// Longest wait a `Retry-After` header may ask for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Most bytes of an error body kept for the message.
const MAX_ERROR_BODY: usize = 4096;

pub struct Settings {
    pub client: reqwest::Client,
    pub endpoint: String,
    pub model: String,
    pub key: Option<Secret>,
    pub key_env: Option<String>,
    /// Every key configured on this server, redacted from whatever the model sends back.
    pub secrets: Arc<Vec<Secret>>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    /// Sampling seed, for servers that make answers repeatable with one.
    pub seed: Option<u64>,
    /// The other sampling settings and `extra_body`, merged into every request (last wins).
    pub extra: serde_json::Map<String, serde_json::Value>,
    pub stream: bool,
    pub timeouts: Timeouts,
    pub retries: u32,
}

#[derive(Clone)]
pub struct OpenAi {
    settings: Arc<Settings>,
}

impl std::fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAi")
            .field("endpoint", &self.settings.endpoint)
            .field("model", &self.settings.model)
            .field("key", &self.settings.key)
            .finish_non_exhaustive()
    }
}

impl OpenAi {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings: Arc::new(settings),
        }
    }
}

impl ChatModel for OpenAi {
    fn stream(&self, messages: Vec<ChatMessage>) -> ChunkStream {
        // Polled directly by whoever consumes the answer: no task or channel in between.
        let secrets = Arc::clone(&self.settings.secrets);
        let redact = move |item: Result<Chunk, TargetError>| match item {
            // Nothing an upstream sends is stored, logged or shown with a key in it.
            Ok(Chunk::Text(text)) => Ok(Chunk::Text(crate::config::redact_all(&secrets, text))),
            Err(err) => Err(err.redacted(&secrets)),
            other => other,
        };
        Box::pin(answer(Arc::clone(&self.settings), messages).map(redact))
    }
}

/// Streams one answer. Dropping the stream (the answer was stopped) drops the connection.
fn answer(
    settings: Arc<Settings>,
    messages: Vec<ChatMessage>,
) -> impl futures_util::Stream<Item = Result<Chunk, TargetError>> + Send + 'static {
    async_stream::try_stream! {
        let s = &*settings;
        let started = Instant::now();
        let total_deadline = started + s.timeouts.total;
        let mut body = serde_json::json!({
            "model": s.model,
            "messages": messages,
            "stream": s.stream,
        });
        if let Some(t) = s.temperature {
            body["temperature"] = t.into();
        }
        if let Some(m) = s.max_tokens {
            body["max_tokens"] = m.into();
        }
        if let Some(seed) = s.seed {
            body["seed"] = seed.into();
        }
        for (key, value) in &s.extra {
            body[key.as_str()] = value.clone();
        }
        let response = send_with_retries(s, &body, started, total_deadline).await?;
        if !s.stream {
            let (chunks, end) = whole_answer(s, response, total_deadline).await?;
            for chunk in chunks {
                yield chunk;
            }
            yield end?;
            return;
        }

        let first_token_deadline = (started + s.timeouts.first_token).min(total_deadline);
        let mut events = bounded(response.bytes_stream(), total_deadline).eventsource();
        let mut got_text = false;
        let mut finish: Option<String> = None;
        let mut tokens: Option<u32> = None;
        let mut index = 0usize;
        loop {
            let deadline = if got_text {
                (Instant::now() + s.timeouts.stall).min(total_deadline)
            } else {
                first_token_deadline
            };
            let next = match timeout_at(deadline, events.next()).await {
                Ok(next) => next,
                Err(_) if Instant::now() >= total_deadline => {
                    Err(TargetError::TotalTimeout(millis(s.timeouts.total)))?
                }
                Err(_) if got_text => Err(TargetError::Stalled(millis(s.timeouts.stall)))?,
                Err(_) => Err(TargetError::FirstTokenTimeout(millis(s.timeouts.first_token)))?,
            };
            let event = match next {
                None if finish.is_some() => break,
                None => Err(TargetError::Truncated(
                    "the connection closed without a finish reason or [DONE]".to_owned(),
                ))?,
                Some(Err(EventStreamError::Transport(BodyError::Transport(err)))) => {
                    Err(TargetError::Truncated(without_url(&err)))?
                }
                Some(Err(EventStreamError::Transport(BodyError::LineTooLong))) => {
                    Err(TargetError::Malformed(format!(
                        "a line of the stream is longer than {} MiB",
                        MAX_LINE_BYTES >> 20
                    )))?
                }
                Some(Err(EventStreamError::Transport(BodyError::Deadline))) => {
                    Err(TargetError::TotalTimeout(millis(s.timeouts.total)))?
                }
                Some(Err(err)) => Err(TargetError::Malformed(err.to_string()))?,
                Some(Ok(event)) => event,
            };
            index += 1;
            let data = event.data.trim();
            if data == "[DONE]" {
                break;
            }
            if data.is_empty() {
                continue;
            }
            let chunk: StreamChunk = serde_json::from_str(data).map_err(|err| {
                TargetError::Malformed(format!("event {index} is not a chat-completion chunk ({err})"))
            })?;
            if let Some(error) = chunk.error {
                Err(TargetError::Malformed(format!(
                    "the model reported an error mid-stream: {}",
                    error.message()
                )))?;
            }
            if let Some(usage) = chunk.usage {
                tokens = usage.completion_tokens;
            }
            if let Some(choice) = chunk.choices.into_iter().next() {
                if let Some(text) = choice.delta.and_then(|d| d.content)
                    && !text.is_empty()
                {
                    got_text = true;
                    yield Chunk::Text(text);
                }
                if let Some(reason) = choice.finish_reason {
                    finish = Some(reason);
                }
            }
        }
        // Complete only when the server says why it finished: a server that stops an answer
        // to start another (llama.cpp by default) ends the stream with `[DONE]` and no reason.
        let Some(finish) = finish else {
            Err(TargetError::Truncated(
                "the stream ended with [DONE] but no finish reason".to_owned(),
            ))?
        };
        if !got_text {
            Err(TargetError::Empty(finish.clone()))?;
        }
        yield Chunk::Done { finish, tokens };
    }
}

/// Longest line of a server-sent event stream: far more than any chunk of an answer needs,
/// far less than what would hold the decoder (a line is buffered whole until its newline).
const MAX_LINE_BYTES: usize = 1 << 20;

/// Longest non-streaming response body.
const MAX_BODY_BYTES: usize = 16 << 20;

/// Why the raw stream was cut before the event decoder saw more of it.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error(transparent)]
    Transport(reqwest::Error),
    #[error("a line is longer than the limit")]
    LineTooLong,
    #[error("the total time is up")]
    Deadline,
}

/// The response body, cut with an error once a line grows past [`MAX_LINE_BYTES`] or the
/// total deadline passes: checked on every piece, so neither holds however the decoder
/// downstream spends its time.
fn bounded(
    body: impl futures_util::Stream<Item = Result<bytes::Bytes, reqwest::Error>>,
    deadline: Instant,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, BodyError>> {
    let mut line = 0usize;
    body.map(move |piece| {
        let piece = piece.map_err(BodyError::Transport)?;
        if Instant::now() >= deadline {
            return Err(BodyError::Deadline);
        }
        line = match piece.iter().rposition(|&b| b == b'\n' || b == b'\r') {
            Some(end) => piece.len() - end - 1,
            None => line + piece.len(),
        };
        if line > MAX_LINE_BYTES {
            return Err(BodyError::LineTooLong);
        }
        Ok(piece)
    })
}

/// A non-streaming answer, as the chunks a stream would have carried.
async fn whole_answer(
    s: &Settings,
    response: reqwest::Response,
    total_deadline: Instant,
) -> Result<(Vec<Chunk>, Result<Chunk, TargetError>), TargetError> {
    // Read piece by piece: a body past the limit is refused, not buffered whole.
    let read = async {
        let mut bytes = Vec::new();
        let mut body = response.bytes_stream();
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|err| TargetError::Truncated(without_url(&err)))?;
            if bytes.len() + piece.len() > MAX_BODY_BYTES {
                return Err(TargetError::Malformed(format!(
                    "the response is longer than {} MiB",
                    MAX_BODY_BYTES >> 20
                )));
            }
            bytes.extend_from_slice(&piece);
        }
        Ok(bytes)
    };
    let bytes = timeout_at(total_deadline, read)
        .await
        .map_err(|_| TargetError::TotalTimeout(millis(s.timeouts.total)))??;
    let completion: Completion = serde_json::from_slice(&bytes).map_err(|err| {
        TargetError::Malformed(format!("the response is not a chat completion ({err})"))
    })?;
    let choice = completion
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| TargetError::Malformed("the response has no choices".to_owned()))?;
    let text = choice.message.and_then(|m| m.content).unwrap_or_default();
    let tokens = completion.usage.and_then(|u| u.completion_tokens);
    let mut chunks = Vec::new();
    let empty = text.is_empty();
    if !empty {
        chunks.push(Chunk::Text(text));
    }
    // As for a stream: complete only with a finish reason, and never empty.
    let end = match choice.finish_reason {
        None => Err(TargetError::Truncated(
            "the response has no finish reason".to_owned(),
        )),
        Some(finish) if empty => Err(TargetError::Empty(finish)),
        Some(finish) => Ok(Chunk::Done { finish, tokens }),
    };
    Ok((chunks, end))
}

async fn send_with_retries(
    s: &Settings,
    body: &serde_json::Value,
    started: Instant,
    total_deadline: Instant,
) -> Result<reqwest::Response, TargetError> {
    if s.key.is_none()
        && let Some(var) = &s.key_env
    {
        return Err(TargetError::MissingKey(var.clone()));
    }
    let mut attempt = 0u32;
    loop {
        let mut request = s.client.post(&s.endpoint).json(body);
        if let Some(key) = &s.key {
            request = request.bearer_auth(key.expose());
        }
        if s.stream {
            request = request.header(reqwest::header::ACCEPT, "text/event-stream");
        }
        // The connection itself is bounded by the client's connect timeout. The response's
        // headers come before the first token when streaming; without streaming they come
        // with the whole answer, which only the total time bounds.
        let headers_deadline = if s.stream {
            (started + s.timeouts.first_token).min(total_deadline)
        } else {
            total_deadline
        };
        let (error, retry_after) = match timeout_at(headers_deadline, request.send()).await {
            Err(_) if Instant::now() >= total_deadline => {
                return Err(TargetError::TotalTimeout(millis(s.timeouts.total)));
            }
            Err(_) => {
                return Err(TargetError::FirstTokenTimeout(millis(
                    s.timeouts.first_token,
                )));
            }
            Ok(Err(err)) if err.is_connect() && err.is_timeout() => {
                return Err(TargetError::ConnectTimeout(millis(s.timeouts.connect)));
            }
            Ok(Err(err)) if err.is_connect() => (TargetError::Connect(without_url(&err)), None),
            Ok(Err(err)) => return Err(TargetError::Connect(without_url(&err))),
            Ok(Ok(response)) if response.status().is_success() => return Ok(response),
            Ok(Ok(response)) => {
                let status = response.status();
                let retry_after = retry_after(&response);
                let error = http_error(status, response).await;
                if !(status.as_u16() == 429 || status.is_server_error()) {
                    return Err(error);
                }
                (error, retry_after)
            }
        };
        if attempt >= s.retries {
            return Err(error);
        }
        let backoff = retry_after
            .unwrap_or_else(|| Duration::from_millis(250 * 2u64.pow(attempt)))
            .min(MAX_RETRY_AFTER);
        if Instant::now() + backoff >= total_deadline {
            return Err(error);
        }
        tracing::debug!(
            endpoint = %s.endpoint,
            attempt = attempt + 1,
            backoff_ms = millis(backoff),
            error = %error,
            since_start_ms = millis(started.elapsed()),
            "retrying model request"
        );
        tokio::time::sleep(backoff).await;
        attempt += 1;
    }
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    parse_retry_after(value, std::time::SystemTime::now())
}

/// `Retry-After` as seconds (`120`) or as an HTTP date (`Wed, 21 Oct 2026 07:28:00 GMT`), as
/// RFC 9110 allows both; a date already past means now.
fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

async fn http_error(status: reqwest::StatusCode, response: reqwest::Response) -> TargetError {
    let body = response.bytes().await.unwrap_or_default();
    let body = &body[..body.len().min(MAX_ERROR_BODY)];
    let message = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|b| b.error.message())
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("no details").to_owned()
            } else {
                text.chars().take(200).collect()
            }
        });
    match status.as_u16() {
        401 | 403 => TargetError::Auth {
            status: status.as_u16(),
            message,
        },
        429 => TargetError::RateLimited(message),
        code => TargetError::Http {
            status: code,
            message,
        },
    }
}

/// The error and its causes ("error sending request: tcp connect error: Connection refused"),
/// without the URL reqwest adds: a URL may carry a key in its query.
fn without_url(err: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&dyn std::error::Error> = Some(err);
    while let Some(error) = current {
        let text = error.to_string();
        let text = match text.find(" for url (") {
            Some(i) => text[..i].to_owned(),
            None => text,
        };
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = error.source();
    }
    parts.join(": ")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Deserialize)]
struct StreamChunk {
    #[serde(default)]
    choices: Vec<StreamChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<ErrorDetail>,
}

#[derive(Deserialize)]
struct StreamChoice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    choices: Vec<CompletionChoice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct CompletionChoice {
    #[serde(default)]
    message: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    completion_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

/// `{"error": {"message": ...}}` or `{"error": "..."}`: servers differ.
#[derive(Deserialize)]
#[serde(untagged)]
enum ErrorDetail {
    Object {
        #[serde(default)]
        message: Option<String>,
    },
    Text(String),
}

impl ErrorDetail {
    fn message(&self) -> String {
        match self {
            ErrorDetail::Object { message } => {
                message.clone().unwrap_or_else(|| "no message".to_owned())
            }
            ErrorDetail::Text(text) => text.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_as_seconds_or_as_an_http_date() {
        let now = httpdate::parse_http_date("Tue, 01 Dec 2026 10:00:00 GMT").unwrap();
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Tue, 01 Dec 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Tue, 01 Dec 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
