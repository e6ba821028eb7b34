//! One answer over HTTP, whatever the API: wait for the endpoint, send, then read the
//! server-sent events (or the whole body) through the API's [`Protocol`], under the timeouts.
//!
//! An answer is complete only when the server says why it finished; a stream that ends
//! without a reason is `truncated` (its text kept), and one with no answer text is `empty`.
//! Reasoning counts as the model being at work for the first-token and stall timers, never as
//! the answer. Failure policy: a refused connection, a 429 or a 5xx is retried (bounded, with
//! backoff, honouring `Retry-After`) only before any byte of the answer; after that, any
//! failure ends the answer with an error and the caller keeps the text so far.

use std::sync::Arc;

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use tokio::time::{Instant, timeout_at};

use super::http::{
    BodyError, Endpoint, MAX_LINE_BYTES, bounded, millis, read_body, send_with_retries, without_url,
};
use super::think::Think;
use super::{Chunk, TargetError, Usage};

/// What one API's events and bodies mean.
pub trait Protocol: Send + 'static {
    /// Reads one event of a stream into `answer`.
    fn event(
        &mut self,
        event: &Event,
        index: usize,
        answer: &mut Decoded,
    ) -> Result<(), TargetError>;
    /// Reads a whole (non-streaming) response.
    fn whole(&self, body: &[u8], answer: &mut Decoded) -> Result<(), TargetError>;
    /// Whether a leading `<think>` block in the text is reasoning.
    fn inline_thinking(&self) -> bool {
        false
    }
}

/// What the events read so far carry.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Text, reasoning and refusal pieces not yet handed on.
    pub chunks: Vec<Chunk>,
    pub finish: Option<String>,
    pub usage: Usage,
    /// The API's end of stream (`[DONE]`, `message_stop`).
    pub done: bool,
    /// Whether answer text (or a refusal) has been handed on.
    answered: bool,
}

/// Streams one answer. Dropping the stream (the answer was stopped) drops the connection and
/// frees the endpoint's place.
pub fn answer<P: Protocol>(
    endpoint: Arc<Endpoint>,
    body: serde_json::Value,
    mut protocol: P,
) -> impl Stream<Item = Result<Chunk, TargetError>> + Send + 'static {
    async_stream::try_stream! {
        let s = &*endpoint;
        let (_permit, queued) = super::http::queue(s).await?;
        yield Chunk::Sent { queued_ms: millis(queued) };
        let started = Instant::now();
        let total_deadline = started + s.timeouts.total;
        let response = send_with_retries(s, &body, started, total_deadline).await?;
        let mut think = protocol.inline_thinking().then(Think::default);
        let mut answer = Decoded::default();
        let mut pieces = Vec::new();
        if !s.stream {
            let bytes = read_body(response, total_deadline, s.timeouts.total).await?;
            protocol.whole(&bytes, &mut answer)?;
            answer.hand_on(think.as_mut(), true, &mut pieces);
            for chunk in pieces.drain(..) {
                yield chunk;
            }
            yield end(answer)?;
            return;
        }

        let first_token_deadline = (started + s.timeouts.first_token).min(total_deadline);
        let body = response.bytes_stream().map(|piece| piece.map_err(|e| without_url(&e)));
        let mut events = bounded(body, total_deadline).eventsource();
        let mut at_work = false;
        let mut index = 0usize;
        loop {
            let deadline = if at_work {
                (Instant::now() + s.timeouts.stall).min(total_deadline)
            } else {
                first_token_deadline
            };
            let next = match timeout_at(deadline, events.next()).await {
                Ok(next) => next,
                Err(_) if Instant::now() >= total_deadline => {
                    Err(TargetError::TotalTimeout(millis(s.timeouts.total)))?
                }
                Err(_) if at_work => Err(TargetError::Stalled(millis(s.timeouts.stall)))?,
                Err(_) => Err(TargetError::FirstTokenTimeout(millis(s.timeouts.first_token)))?,
            };
            let event = match next {
                None if answer.finish.is_some() => break,
                // llama-cpp-python's way of saying the prompt is longer than its context.
                None if index == 0 => Err(TargetError::ContextExceeded {
                    limit: s.context_tokens,
                    message: "the server answered with an empty stream, as llama.cpp's server \
                              does when the prompt is longer than its context"
                        .to_owned(),
                })?,
                None => Err(TargetError::Truncated(
                    "the connection closed without a finish reason or end of stream".to_owned(),
                ))?,
                Some(Err(err)) => Err(stream_error(err, s))?,
                Some(Ok(event)) => event,
            };
            index += 1;
            protocol.event(&event, index, &mut answer)?;
            answer.hand_on(think.as_mut(), false, &mut pieces);
            for chunk in pieces.drain(..) {
                at_work = true;
                yield chunk;
            }
            if answer.done {
                break;
            }
        }
        // Whatever the inline-reasoning split still holds back.
        answer.hand_on(think.as_mut(), true, &mut pieces);
        for chunk in pieces.drain(..) {
            yield chunk;
        }
        yield end(answer)?;
    }
}

impl Decoded {
    /// Hands on the pieces decoded so far, the inline reasoning taken out of the text (`last`:
    /// with whatever the split still holds back).
    fn hand_on(&mut self, think: Option<&mut Think>, last: bool, out: &mut Vec<Chunk>) {
        match think {
            None => out.append(&mut self.chunks),
            Some(think) => {
                for chunk in self.chunks.drain(..) {
                    match chunk {
                        Chunk::Text(text) => think.split(&text, out),
                        other => out.push(other),
                    }
                }
                if last {
                    think.finish(out);
                }
            }
        }
        self.answered |= out
            .iter()
            .any(|c| matches!(c, Chunk::Text(_) | Chunk::Refusal(_)));
    }
}

/// The `Done` of a finished stream, or why it is not complete.
fn end(answer: Decoded) -> Result<Chunk, TargetError> {
    // Complete only when the server says why it finished: a server that stops an answer to
    // start another (llama.cpp by default) ends the stream with `[DONE]` and no reason.
    let Some(finish) = answer.finish else {
        return Err(TargetError::Truncated(
            "the stream ended without a finish reason (llama.cpp's server ends an answer this \
             way when another request interrupts it; max_concurrent_requests = 1 queues them)"
                .to_owned(),
        ));
    };
    if !answer.answered {
        return Err(TargetError::Empty(finish));
    }
    Ok(Chunk::Done {
        finish,
        usage: answer.usage,
    })
}

fn stream_error(err: EventStreamError<BodyError>, s: &Endpoint) -> TargetError {
    match err {
        EventStreamError::Transport(BodyError::Transport(err)) => TargetError::Truncated(err),
        EventStreamError::Transport(BodyError::LineTooLong) => TargetError::Malformed(format!(
            "a line of the stream is longer than {} MiB",
            MAX_LINE_BYTES >> 20
        )),
        EventStreamError::Transport(BodyError::Deadline) => {
            TargetError::TotalTimeout(millis(s.timeouts.total))
        }
        other => TargetError::Malformed(other.to_string()),
    }
}

/// The stream with every configured key taken out of what the upstream sent: nothing it sends
/// is stored, logged or shown with a key in it.
pub fn redacted(
    secrets: Arc<Vec<crate::config::Secret>>,
    answer: impl Stream<Item = Result<Chunk, TargetError>> + Send + 'static,
) -> super::ChunkStream {
    Box::pin(answer.map(move |item| {
        let r = |text: String| crate::config::redact_all(&secrets, text);
        match item {
            Ok(Chunk::Text(text)) => Ok(Chunk::Text(r(text))),
            Ok(Chunk::Reasoning(text)) => Ok(Chunk::Reasoning(r(text))),
            Ok(Chunk::Refusal(text)) => Ok(Chunk::Refusal(r(text))),
            Err(err) => Err(err.redacted(&secrets)),
            other => other,
        }
    }))
}

/// Decodes these bytes, read in pieces cut at `cuts` (ascending offsets), as a stream would
/// be: the pipeline of [`answer`] without the network and the timers (for tests of any split
/// of a stream).
#[cfg(test)]
pub fn decode_pieces<P: Protocol>(
    bytes: &[u8],
    cuts: impl IntoIterator<Item = usize>,
    protocol: P,
) -> Vec<Result<Chunk, String>> {
    let mut pieces = Vec::new();
    let mut from = 0;
    for cut in cuts {
        pieces.push(bytes::Bytes::copy_from_slice(&bytes[from..cut]));
        from = cut;
    }
    pieces.push(bytes::Bytes::copy_from_slice(&bytes[from..]));
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a test runtime")
        .block_on(decode(pieces, protocol))
}

#[cfg(test)]
async fn decode<P: Protocol>(
    pieces: Vec<bytes::Bytes>,
    mut protocol: P,
) -> Vec<Result<Chunk, String>> {
    let far = Instant::now() + std::time::Duration::from_secs(3600);
    let body = futures_util::stream::iter(pieces.into_iter().map(Ok));
    let mut events = bounded(body, far).eventsource();
    let mut think = protocol.inline_thinking().then(Think::default);
    let mut answer = Decoded::default();
    let mut out = Vec::new();
    let mut pieces = Vec::new();
    let mut index = 0;
    while let Some(event) = events.next().await {
        index += 1;
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                out.push(Err(err.to_string()));
                return out;
            }
        };
        if let Err(err) = protocol.event(&event, index, &mut answer) {
            out.push(Err(err.to_string()));
            return out;
        }
        answer.hand_on(think.as_mut(), false, &mut pieces);
        out.extend(pieces.drain(..).map(Ok));
        if answer.done {
            break;
        }
    }
    answer.hand_on(think.as_mut(), true, &mut pieces);
    out.extend(pieces.drain(..).map(Ok));
    out.push(end(answer).map_err(|e| e.to_string()));
    out
}
