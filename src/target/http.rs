//! The HTTP side every model API shares: where a request goes and with which headers, the
//! per-endpoint concurrency limit, retries before the first byte, error bodies (a context
//! overflow told apart from other refusals), and the limits on what a server may send back.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout_at};

use super::{TargetError, Timeouts};
use crate::config::Secret;

/// Longest wait a `Retry-After` header may ask for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Most bytes of an error body kept for the message.
const MAX_ERROR_BODY: usize = 4096;
/// Longest line of a server-sent event stream: far more than any chunk of an answer needs,
/// far less than what would hold the decoder (a line is buffered whole until its newline).
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Longest non-streaming response body.
const MAX_BODY_BYTES: usize = 16 << 20;

/// Where one target's requests go, and how.
pub struct Endpoint {
    pub client: reqwest::Client,
    pub url: reqwest::Url,
    /// `extra_headers`, the API's own (`anthropic-version`) and the key, marked sensitive.
    pub headers: HeaderMap,
    /// The variable the key should have come from, when it is not set.
    pub missing_key: Option<String>,
    /// Every key configured on this server, redacted from whatever the model sends back.
    pub secrets: Arc<Vec<Secret>>,
    pub stream: bool,
    pub timeouts: Timeouts,
    pub retries: u32,
    /// Shared by every target of the same `base_url` that sets `max_concurrent_requests`.
    pub gate: Option<Arc<Semaphore>>,
    /// The target's `context_tokens`, named in a context overflow the server does not explain.
    pub context_tokens: Option<u32>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No headers, and no query (it may carry a key).
        f.debug_struct("Endpoint")
            .field("url", &without_query(&self.url))
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

/// The URL as it may be shown or logged: without its query, which may carry a key.
pub fn without_query(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}

/// `base` with `path` appended to its path, its query string kept: `https://x/openai?api-version=1`
/// and `chat/completions` give `https://x/openai/chat/completions?api-version=1`.
pub fn join(base: &str, path: &str) -> Result<reqwest::Url, String> {
    let mut url =
        reqwest::Url::parse(base).map_err(|e| format!("base_url `{base}` is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("base_url must be http or https".to_owned());
    }
    let joined = format!("{}/{path}", url.path().trim_end_matches('/'));
    url.set_path(&joined);
    Ok(url)
}

/// The headers of every request: `extra_headers` first, then the API's own and the key (which
/// `extra_headers` may not set).
pub fn headers(
    extra: Option<&std::collections::BTreeMap<String, String>>,
    own: &[(&'static str, String)],
    key: Option<(&'static str, String)>,
) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (name, value) in extra.into_iter().flatten() {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("extra_headers: `{name}` is not a header name"))?;
        let reserved = [
            "authorization",
            "api-key",
            "x-api-key",
            "content-type",
            "accept",
        ];
        if reserved.contains(&header.as_str()) {
            return Err(format!(
                "extra_headers: `{name}` is set by Vigil itself (keys go through api_key_env)"
            ));
        }
        let value = HeaderValue::from_str(value)
            .map_err(|_| format!("extra_headers: the value of `{name}` is not a header value"))?;
        map.insert(header, value);
    }
    for (name, value) in own {
        let value = HeaderValue::from_str(value)
            .map_err(|_| format!("the header `{name}` cannot carry `{value}`"))?;
        map.insert(*name, value);
    }
    if let Some((name, key)) = key {
        let mut value = HeaderValue::from_str(&key)
            .map_err(|_| "the API key holds characters a header cannot carry".to_owned())?;
        value.set_sensitive(true);
        map.insert(name, value);
    }
    Ok(map)
}

/// Waits for the endpoint to take one more request, within the total time. The permit is
/// held until the answer ends (it is dropped with the stream).
pub async fn queue(
    endpoint: &Endpoint,
) -> Result<(Option<tokio::sync::OwnedSemaphorePermit>, Duration), TargetError> {
    let Some(gate) = &endpoint.gate else {
        return Ok((None, Duration::ZERO));
    };
    let since = Instant::now();
    let permit = tokio::time::timeout(endpoint.timeouts.total, Arc::clone(gate).acquire_owned())
        .await
        .map_err(|_| TargetError::QueueTimeout(millis(endpoint.timeouts.total)))?
        .map_err(|_| TargetError::QueueTimeout(millis(since.elapsed())))?;
    Ok((Some(permit), since.elapsed()))
}

/// Sends the request, retrying refused connections, 429s and 5xx answers (529 "overloaded"
/// included) with backoff and `Retry-After`, all before any byte of an answer.
pub async fn send_with_retries(
    s: &Endpoint,
    body: &serde_json::Value,
    started: Instant,
    total_deadline: Instant,
) -> Result<reqwest::Response, TargetError> {
    if let Some(var) = &s.missing_key {
        return Err(TargetError::MissingKey(var.clone()));
    }
    let mut attempt = 0u32;
    loop {
        let mut request = s
            .client
            .post(s.url.clone())
            .headers(s.headers.clone())
            .json(body);
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
                let error = http_error(status, response, s.context_tokens).await;
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
            endpoint = ?s,
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

async fn http_error(
    status: reqwest::StatusCode,
    response: reqwest::Response,
    context_tokens: Option<u32>,
) -> TargetError {
    let body = response.bytes().await.unwrap_or_default();
    let body = &body[..body.len().min(MAX_ERROR_BODY)];
    let detail = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let message = detail
        .as_ref()
        .map(ErrorDetail::message)
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("no details").to_owned()
            } else {
                text.chars().take(200).collect()
            }
        });
    if matches!(status.as_u16(), 400 | 413 | 422)
        && let Some(limit) = context_overflow(detail.as_ref(), &message)
    {
        return TargetError::ContextExceeded {
            limit: limit.or(context_tokens),
            message,
        };
    }
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

/// Whether an error says the prompt is longer than the model's context, and the limit when it
/// names one. As OpenAI, vLLM and llama-cpp-python put it ("This model's maximum context
/// length is 2048 tokens..."), llama.cpp's server (`exceed_context_size_error`, `n_ctx`) and
/// Anthropic ("prompt is too long: 210000 tokens > 200000 maximum").
fn context_overflow(detail: Option<&ErrorDetail>, message: &str) -> Option<Option<u32>> {
    static WORDING: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(
            r"(?i)maximum context length|context length exceeded|context_length_exceeded|exceeds? the (available )?context|prompt is too long|context window|too many tokens",
        )
        .unwrap_or_else(|e| panic!("a fixed pattern: {e}"))
    });
    static LIMIT: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(
            r"(?i)maximum context length is (\d+)|context (?:length|size|window) of (\d+)|> ?(\d+) maximum",
        )
        .unwrap_or_else(|e| panic!("a fixed pattern: {e}"))
    });
    let (code, n_ctx) = match detail {
        Some(ErrorDetail::Object {
            code, kind, n_ctx, ..
        }) => {
            let code = [code.as_ref().and_then(|c| c.as_str()), kind.as_deref()]
                .into_iter()
                .flatten()
                .any(|c| c.contains("context_length") || c.contains("exceed_context"));
            (code, *n_ctx)
        }
        _ => (false, None),
    };
    if !(code || WORDING.is_match(message)) {
        return None;
    }
    let named = LIMIT.captures(message).and_then(|c| {
        c.iter()
            .skip(1)
            .flatten()
            .next()
            .and_then(|m| m.as_str().parse().ok())
    });
    Some(n_ctx.or(named))
}

/// Why the raw stream was cut before the event decoder saw more of it.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{0}")]
    Transport(String),
    #[error("a line is longer than the limit")]
    LineTooLong,
    #[error("the total time is up")]
    Deadline,
}

/// The response body, cut with an error once a line grows past [`MAX_LINE_BYTES`] or the
/// total deadline passes: checked on every piece, so neither holds however the decoder
/// downstream spends its time.
pub fn bounded(
    body: impl futures_util::Stream<Item = Result<bytes::Bytes, String>>,
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

/// A whole (non-streaming) response body, read piece by piece: a body past the limit is
/// refused, not buffered whole.
pub async fn read_body(
    response: reqwest::Response,
    total_deadline: Instant,
    total: Duration,
) -> Result<Vec<u8>, TargetError> {
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
    timeout_at(total_deadline, read)
        .await
        .map_err(|_| TargetError::TotalTimeout(millis(total)))?
}

/// The error and its causes ("error sending request: tcp connect error: Connection refused"),
/// without the URL reqwest adds: a URL may carry a key in its query.
pub fn without_url(err: &reqwest::Error) -> String {
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

pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

/// `{"error": {"message": ...}}` or `{"error": "..."}`: servers differ.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ErrorDetail {
    Object {
        #[serde(default)]
        message: Option<String>,
        /// A string (`context_length_exceeded`) or, from llama.cpp, the HTTP status.
        #[serde(default)]
        code: Option<serde_json::Value>,
        #[serde(default, rename = "type")]
        kind: Option<String>,
        /// llama.cpp's server names its context length here.
        #[serde(default)]
        n_ctx: Option<u32>,
    },
    Text(String),
}

impl ErrorDetail {
    pub fn message(&self) -> String {
        match self {
            ErrorDetail::Object { message, .. } => {
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

    #[test]
    fn a_query_string_stays_on_the_joined_url() {
        let url = join(
            "https://x.openai.azure.com/openai/deployments/d/?api-version=2024-10-21",
            "chat/completions",
        )
        .unwrap();
        assert_eq!(
            url.as_str(),
            "https://x.openai.azure.com/openai/deployments/d/chat/completions?api-version=2024-10-21"
        );
        let url = join("http://127.0.0.1:8080/v1", "chat/completions").unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:8080/v1/chat/completions");
        assert!(join("ftp://x/v1", "messages").is_err());
    }

    #[test]
    fn context_overflows_are_told_apart_and_their_limit_read() {
        let read = |json: &str| {
            let detail = serde_json::from_str::<ErrorBody>(json).unwrap().error;
            context_overflow(Some(&detail), &detail.message())
        };
        assert_eq!(
            read(
                r#"{"error":{"message":"This model's maximum context length is 2048 tokens. However, you requested 2300 tokens","type":"invalid_request_error"}}"#
            ),
            Some(Some(2048))
        );
        assert_eq!(
            read(
                r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error","n_prompt_tokens":4200,"n_ctx":4096}}"#
            ),
            Some(Some(4096))
        );
        assert_eq!(
            read(
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}"#
            ),
            Some(Some(200000))
        );
        assert_eq!(
            read(r#"{"error":{"message":"Conversation roles must alternate"}}"#),
            None
        );
    }
}
