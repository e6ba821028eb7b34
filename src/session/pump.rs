//! One answer being generated: a small task per target that reads the model's stream, keeps
//! the text so far where a newly attached viewer can find it, publishes each piece as a
//! transient `delta` straight onto the session's broadcast (the actor is not on this path), and
//! hands the finished answer to the actor, which records and rates it.

use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::event::{Published, ServerEvent};
use super::state::{AnswerJob, FinishedAnswer, StreamEnd};
use crate::target::{ChatModel, Chunk, TargetError};
use crate::time::now_ms;

/// The text of every answer being generated, by target index. A viewer attaching takes its
/// catch-up text and subscribes under the same lock, so no delta falls between the two.
#[derive(Debug, Default)]
pub struct LiveAnswers {
    answers: Mutex<Vec<Option<LiveText>>>,
}

#[derive(Debug)]
struct LiveText {
    turn: u32,
    attempt: u32,
    alias: Arc<str>,
    text: String,
    chars: usize,
}

impl LiveAnswers {
    pub fn new(targets: usize) -> Self {
        Self {
            answers: Mutex::new((0..targets).map(|_| None).collect()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<LiveText>>> {
        // A panic while holding this lock leaves plain text behind, still consistent.
        self.answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Subscribes to `events` and returns, taken at the same instant, one catch-up `delta`
    /// (offset 0, the whole text so far) per answer being generated.
    pub fn subscribe(
        &self,
        events: &broadcast::Sender<Arc<Published>>,
    ) -> (broadcast::Receiver<Arc<Published>>, Vec<Arc<Published>>) {
        let answers = self.lock();
        let live = events.subscribe();
        let catch_up = answers
            .iter()
            .flatten()
            .filter(|a| !a.text.is_empty())
            .map(|a| {
                Arc::new(Published::new(
                    None,
                    ServerEvent::Delta {
                        turn: a.turn,
                        target: a.alias.to_string(),
                        attempt: a.attempt,
                        offset: 0,
                        text: a.text.clone(),
                    },
                ))
            })
            .collect();
        (live, catch_up)
    }

    fn begin(&self, index: usize, turn: u32, attempt: u32, alias: Arc<str>) {
        if let Some(slot) = self.lock().get_mut(index) {
            *slot = Some(LiveText {
                turn,
                attempt,
                alias,
                text: String::new(),
                chars: 0,
            });
        }
    }

    /// Appends a piece (at most up to `max_chars` in all) and publishes it, under the lock
    /// (see [`LiveAnswers::subscribe`]). `false` once the answer has reached `max_chars`.
    fn push(
        &self,
        index: usize,
        piece: &str,
        max_chars: usize,
        events: &broadcast::Sender<Arc<Published>>,
    ) -> bool {
        let mut answers = self.lock();
        let Some(Some(live)) = answers.get_mut(index) else {
            return true;
        };
        let room = max_chars.saturating_sub(live.chars);
        let (piece, fits) = match piece.char_indices().nth(room) {
            Some((cut, _)) => (&piece[..cut], false),
            None => (piece, true),
        };
        let offset = live.chars;
        live.chars += piece.chars().count();
        live.text.push_str(piece);
        // Nobody watching (the batch runner, or a clinician who closed the tab): no frame.
        if events.receiver_count() > 0 {
            let delta = ServerEvent::Delta {
                turn: live.turn,
                target: live.alias.to_string(),
                attempt: live.attempt,
                offset,
                text: piece.to_owned(),
            };
            let _ = events.send(Arc::new(Published::new(None, delta)));
        }
        fits
    }

    fn take(&self, index: usize) -> String {
        self.lock()
            .get_mut(index)
            .and_then(Option::take)
            .map(|live| live.text)
            .unwrap_or_default()
    }
}

/// What a pump needs besides its job.
pub struct PumpContext {
    pub alias: Arc<str>,
    pub model: Arc<dyn ChatModel>,
    /// The target's longest answer, in characters.
    pub max_chars: usize,
    pub live: Arc<LiveAnswers>,
    pub events: broadcast::Sender<Arc<Published>>,
    pub cancel: CancellationToken,
    pub done: mpsc::Sender<FinishedAnswer>,
}

/// Streams one target's answer until it ends or is cancelled. Time to first token and the
/// duration count from when the request went out (`Chunk::Sent`); waiting for the endpoint
/// before that is recorded apart.
pub async fn pump(job: AnswerJob, ctx: PumpContext) {
    let mut started = Instant::now();
    let started_at = now_ms();
    let mut ttft_ms = None;
    let mut queue_ms = None;
    let mut reasoning = Bounded::new(ctx.max_chars);
    let mut refusal = Bounded::new(ctx.max_chars);
    ctx.live
        .begin(job.target, job.turn, job.attempt, Arc::clone(&ctx.alias));
    let mut stream = ctx.model.stream(job.messages);
    let end = loop {
        tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => break StreamEnd::Stopped,
            item = stream.next() => match item {
                Some(Ok(Chunk::Sent { queued_ms })) => {
                    queue_ms = (queued_ms > 0).then(|| i64::try_from(queued_ms).unwrap_or(i64::MAX));
                    started = Instant::now();
                }
                Some(Ok(Chunk::Reasoning(text))) => reasoning.push(&text),
                Some(Ok(Chunk::Text(text))) => {
                    if ttft_ms.is_none() {
                        ttft_ms = Some(elapsed_ms(started));
                    }
                    if !ctx.live.push(job.target, &text, ctx.max_chars, &ctx.events) {
                        break StreamEnd::TooLong(ctx.max_chars);
                    }
                }
                // Shown and rated as the answer (it is what the model's users would read),
                // and recorded as a refusal.
                Some(Ok(Chunk::Refusal(text))) => {
                    if ttft_ms.is_none() {
                        ttft_ms = Some(elapsed_ms(started));
                    }
                    refusal.push(&text);
                    if !ctx.live.push(job.target, &text, ctx.max_chars, &ctx.events) {
                        break StreamEnd::TooLong(ctx.max_chars);
                    }
                }
                Some(Ok(Chunk::Done { finish, usage })) => break StreamEnd::Completed { finish, usage },
                Some(Err(err)) => break StreamEnd::Failed(err),
                None => break StreamEnd::Failed(TargetError::Truncated(
                    "the answer ended without a finish".to_owned(),
                )),
            },
        }
    };
    drop(stream);
    let finished = FinishedAnswer {
        target: job.target,
        turn: job.turn,
        attempt: job.attempt,
        text: ctx.live.take(job.target),
        ttft_ms,
        duration_ms: elapsed_ms(started),
        started_at,
        end,
        queue_ms,
        reasoning: reasoning.text,
        refusal: refusal.text,
        dropped_turns: job.dropped_turns,
    };
    let _ = ctx.done.send(finished).await;
}

/// Text kept up to a number of characters; the rest is let go.
struct Bounded {
    text: String,
    room: usize,
}

impl Bounded {
    fn new(max_chars: usize) -> Self {
        Self {
            text: String::new(),
            room: max_chars,
        }
    }

    fn push(&mut self, piece: &str) {
        let cut = piece
            .char_indices()
            .nth(self.room)
            .map_or(piece.len(), |(i, _)| i);
        let kept = &piece[..cut];
        self.room -= kept.chars().count();
        self.text.push_str(kept);
    }
}

fn elapsed_ms(since: Instant) -> i64 {
    i64::try_from(since.elapsed().as_millis()).unwrap_or(i64::MAX)
}
