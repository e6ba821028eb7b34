//! One live session: the task that owns its state.
//!
//! The actor only routes: a command goes to the pure state machine ([`SessionState`]), whose
//! transition says what to write, what to publish after the write, when to answer the client
//! and which answers to start; the actor queues that in its outbox and commits the outbox in
//! order, one write at a time, in the background, so it keeps taking finished answers and
//! commands while a commit is in flight. Only after a batch is committed are its events
//! published, its replies sent and its answers started ("nothing shown before it is stored").
//! If the database fails, the batches wait and are retried; meanwhile the state refuses new
//! changes.
//!
//! Answers stream from one pump per target (`pump.rs`), which publishes deltas itself; the
//! actor sees only the finished answer.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::event::Published;
use super::phase::{Phase, Storage};
use super::pump::{LiveAnswers, PumpContext, pump};
use super::state::{AnswerJob, Applied, Batch, FinishedAnswer, ReplyAt, SessionState, StreamEnd};
use super::{Attachment, Reply, SessionError};
use crate::store::{Store, StoreError};
use crate::target::ChatModel;
use crate::time::now_ms;

/// Durable events a live session keeps in memory for subscribers that attach or fall behind;
/// older ones are read back from the database. A session flooded with ratings stays bounded.
const LOG_IN_MEMORY: usize = 512;

/// Events kept for a slow subscriber before it must resynchronise from the log. The slots are
/// allocated up front for every live session, so this is also most of an idle session's memory.
const BROADCAST_CAPACITY: usize = 256;
/// Pause before retrying an outbox the database refused.
const STORAGE_RETRY: Duration = Duration::from_secs(2);

/// What the mailbox of a session carries.
pub(crate) enum Message {
    Attach {
        after_seq: u64,
        reply: oneshot::Sender<Attachment>,
    },
    Apply {
        request: super::Request,
        reply: Reply,
    },
    /// A viewer stopped following the session: it may leave memory now.
    ViewerLeft,
}

/// What the actor needs from its surroundings.
pub(super) struct Context {
    pub store: Store,
    /// A session nobody watches leaves memory after this long.
    pub idle: Duration,
    /// The same for an ended session.
    pub ended_idle: Duration,
    pub shutdown: CancellationToken,
    /// Called once when the task ends (removes the session from the registry).
    pub on_exit: Box<dyn FnOnce() + Send>,
    pub judge: Option<Arc<crate::rating::judge::Judge>>,
}

/// A batch waiting to be committed, with what follows its commit.
struct Pending {
    batch: Batch,
    replies: Vec<(Reply, Applied)>,
    start: Vec<AnswerJob>,
    /// Answers for the judge once they are saved.
    judge: Vec<crate::rating::judge::Job>,
}

type Commit = BoxFuture<'static, Result<(), StoreError>>;

pub(super) struct Actor {
    state: SessionState,
    /// Per target: the model that answers and its longest answer (`None` when no longer
    /// configured).
    models: Vec<Option<(Arc<dyn ChatModel>, usize)>>,
    /// Every durable event so far, for clients that resume.
    /// The latest durable events (at most [`LOG_IN_MEMORY`]), for subscribers to catch up
    /// from; older ones are read back from the database.
    log: VecDeque<Arc<Published>>,
    /// The highest `seq` no longer in `log` (0: none dropped).
    dropped_through: u64,
    events: broadcast::Sender<Arc<Published>>,
    live: Arc<LiveAnswers>,
    outbox: VecDeque<Pending>,
    /// The batches of the commit in flight.
    committing: Vec<Pending>,
    /// Replies to `end` waiting for the end to be saved.
    end_waiters: Vec<Reply>,
    /// Viewers attaching while a commit is in flight: served once it is done, so their replay
    /// holds what that commit saves.
    attach_waiters: Vec<(u64, oneshot::Sender<Attachment>)>,
    answers_cancel: CancellationToken,
    finished_tx: mpsc::Sender<FinishedAnswer>,
    judged_tx: mpsc::Sender<crate::rating::judge::Outcome>,
    /// Answers with the judge now: the session stays in memory until they are back.
    judging: usize,
    retry_at: Option<Instant>,
    ctx: Context,
    shutting_down: bool,
    last_activity: Instant,
}

impl Actor {
    /// A session whose state is built; `log` holds the events already stored (restored
    /// sessions) and `first` a batch to commit before anything else (a new session's first
    /// events are committed by the registry with its row, so they arrive in `log`).
    pub fn new(
        state: SessionState,
        models: Vec<Option<(Arc<dyn ChatModel>, usize)>>,
        log: Vec<Arc<Published>>,
        first: Option<Batch>,
        ctx: Context,
    ) -> (
        Self,
        mpsc::Receiver<FinishedAnswer>,
        mpsc::Receiver<crate::rating::judge::Outcome>,
    ) {
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (finished_tx, finished_rx) = mpsc::channel(64);
        let (judged_tx, judged_rx) = mpsc::channel(64);
        let live = Arc::new(LiveAnswers::new(models.len()));
        let mut actor = Self {
            state,
            models,
            log: VecDeque::new(),
            dropped_through: 0,
            events,
            live,
            outbox: VecDeque::new(),
            committing: Vec::new(),
            end_waiters: Vec::new(),
            attach_waiters: Vec::new(),
            answers_cancel: CancellationToken::new(),
            finished_tx,
            judged_tx,
            judging: 0,
            retry_at: None,
            ctx,
            shutting_down: false,
            last_activity: Instant::now(),
        };
        for event in log {
            actor.remember(event);
        }
        if let Some(batch) = first {
            actor.outbox.push_back(Pending {
                batch,
                replies: Vec::new(),
                start: Vec::new(),
                judge: Vec::new(),
            });
        }
        (actor, finished_rx, judged_rx)
    }

    /// The task's loop: commands, finished answers, commits, retries, idle eviction, shutdown.
    pub async fn run(
        mut self,
        mut mailbox: mpsc::Receiver<Message>,
        mut finished: mpsc::Receiver<FinishedAnswer>,
        mut judged: mpsc::Receiver<crate::rating::judge::Outcome>,
    ) {
        // An ended session leaves when its last viewer does (`ViewerLeft`); the tick catches
        // the rest (a grace of 0 checks every second, not continually).
        let ended = if self.ctx.ended_idle.is_zero() {
            Duration::from_secs(1)
        } else {
            self.ctx.ended_idle
        };
        let tick = self
            .ctx
            .idle
            .min(ended)
            .clamp(Duration::from_millis(50), Duration::from_secs(30));
        let mut idle_check = tokio::time::interval(tick);
        idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.ctx.shutdown.clone();
        let mut commit: Option<Commit> = None;
        loop {
            if commit.is_none() && self.retry_at.is_none() {
                commit = self.begin_commit();
            }
            let retry_at = self.retry_at;
            tokio::select! {
                biased;
                Some(answer) = finished.recv() => self.on_finished(answer),
                Some(outcome) = judged.recv() => {
                    self.judging = self.judging.saturating_sub(1);
                    if let Some(transition) = self.state.judged(outcome, now_ms()) {
                        self.run_transition(transition, None);
                    }
                }
                result = async { commit.as_mut().expect("guarded").await }, if commit.is_some() => {
                    commit = None;
                    self.on_committed(result);
                }
                _ = shutdown.cancelled(), if !self.shutting_down => {
                    self.shutting_down = true;
                    self.answers_cancel.cancel();
                }
                message = mailbox.recv(), if !self.shutting_down => match message {
                    // The last viewer of an ended session gone: no need to wait for the tick.
                    Some(Message::ViewerLeft) => {
                        if commit.is_none() && self.evictable() {
                            break;
                        }
                    }
                    Some(message) => self.on_message(message),
                    None => {
                        // Every handle is gone (the registry dropped it): finish and leave.
                        self.shutting_down = true;
                        self.answers_cancel.cancel();
                    }
                },
                _ = async { tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)).await },
                    if retry_at.is_some() => {
                    self.retry_at = None;
                }
                _ = idle_check.tick() => {
                    if commit.is_none() && self.evictable() {
                        break;
                    }
                }
            }
            if self.shutting_down
                && !self.state.answering()
                && commit.is_none()
                && (self.outbox.is_empty() || self.retry_at.is_some())
            {
                if !self.outbox.is_empty() {
                    // Nothing more can be done: what is not saved now is lost with the
                    // process, and the log says so.
                    tracing::error!(session = %self.state.id(), unsaved = self.outbox.len(), "shutting down with unsaved changes");
                }
                break;
            }
        }
        (self.ctx.on_exit)();
        // Commands that arrived meanwhile get no reply: their senders see the session gone
        // and reopen it from the database.
        mailbox.close();
    }

    fn evictable(&self) -> bool {
        // Never used (no patient line) and nobody watching: nothing to keep it for (a second's
        // grace covers the moment between its start and its first viewer attaching).
        let idle = if self.state.phase() == Phase::Ended {
            self.ctx.ended_idle
        } else if self.state.turns() == 0 {
            Duration::from_secs(1)
        } else {
            self.ctx.idle
        };
        !self.state.answering()
            && self.judging == 0
            && self.outbox.is_empty()
            && self.end_waiters.is_empty()
            && self.events.receiver_count() == 0
            && self.last_activity.elapsed() >= idle
    }

    fn on_message(&mut self, message: Message) {
        self.last_activity = Instant::now();
        match message {
            Message::Attach { after_seq, reply } if !self.committing.is_empty() => {
                self.attach_waiters.push((after_seq, reply));
            }
            Message::Attach { after_seq, reply } => {
                let _ = reply.send(self.attach(after_seq));
            }
            Message::Apply { request, reply } => match self.state.apply(request, now_ms()) {
                Ok(transition) => self.run_transition(transition, Some(reply)),
                Err(err) => {
                    let _ = reply.send(Err(err));
                }
            },
            Message::ViewerLeft => {}
        }
    }

    fn attach(&mut self, after_seq: u64) -> Attachment {
        let (live, catch_up) = self.live.subscribe(&self.events);
        let replay: Vec<Arc<Published>> = self
            .log
            .iter()
            .filter(|e| e.seq.is_some_and(|s| s > after_seq))
            .cloned()
            .collect();
        let last_seq = self
            .log
            .back()
            .and_then(|e| e.seq)
            .unwrap_or(self.dropped_through);
        Attachment {
            stored_through: (after_seq < self.dropped_through).then_some(self.dropped_through),
            replay,
            catch_up,
            live,
            last_seq,
        }
    }

    /// Keeps a durable event in the log, dropping the oldest beyond [`LOG_IN_MEMORY`].
    fn remember(&mut self, event: Arc<Published>) {
        self.log.push_back(event);
        while self.log.len() > LOG_IN_MEMORY {
            if let Some(seq) = self.log.pop_front().and_then(|e| e.seq) {
                self.dropped_through = seq;
            }
        }
    }

    fn on_finished(&mut self, mut answer: FinishedAnswer) {
        self.last_activity = Instant::now();
        if self.shutting_down && matches!(answer.end, StreamEnd::Stopped) {
            answer.end = StreamEnd::Interrupted;
        }
        if let Some(transition) = self.state.answer_finished(answer, now_ms()) {
            self.run_transition(transition, None);
        }
    }

    /// Carries out a transition: stops answers now if asked; queues its batch with the reply
    /// and the answers to start once it is committed.
    fn run_transition(&mut self, t: super::state::Transition, reply: Option<Reply>) {
        if t.cancel {
            self.answers_cancel.cancel();
        }
        let mut replies = Vec::new();
        let applied = Applied::Now {
            through_seq: t.batch.through_seq,
        };
        match (t.reply, reply) {
            (ReplyAt::Now(applied), Some(reply)) => {
                let _ = reply.send(Ok(applied));
            }
            (ReplyAt::AfterCommit, Some(reply)) => replies.push((reply, applied)),
            (ReplyAt::AtEnd, Some(reply)) => self.end_waiters.push(reply),
            (_, None) => {}
        }
        if t.ends {
            replies.extend(self.end_waiters.drain(..).map(|reply| (reply, applied)));
        }
        if t.batch.ops.is_empty()
            && t.batch.events.is_empty()
            && t.start.is_empty()
            && t.judge.is_empty()
        {
            // Nothing to save and no event to wait for.
            for (reply, _) in replies {
                let _ = reply.send(Ok(Applied::Now { through_seq: 0 }));
            }
            return;
        }
        self.outbox.push_back(Pending {
            batch: t.batch,
            replies,
            start: t.start,
            judge: t.judge,
        });
    }

    /// Starts committing everything in the outbox as one write, if there is anything.
    fn begin_commit(&mut self) -> Option<Commit> {
        if self.outbox.is_empty() {
            return None;
        }
        self.committing = self.outbox.drain(..).collect();
        let ops: Vec<_> = self
            .committing
            .iter()
            .flat_map(|p| p.batch.ops.iter().cloned())
            .collect();
        let store = self.ctx.store.clone();
        Some(Box::pin(async move { store.write(ops).await }))
    }

    /// A commit ended: on success publish, reply and start answers, batch by batch in order;
    /// on failure put the batches back and retry later.
    fn on_committed(&mut self, result: Result<(), StoreError>) {
        let committed = std::mem::take(&mut self.committing);
        match result {
            Ok(()) => {
                if self.storage_was_down() {
                    tracing::info!(session = %self.state.id(), "database writes work again");
                }
                self.state.set_storage(Storage::Ok);
                for pending in committed {
                    for event in pending.batch.events {
                        self.remember(Arc::clone(&event));
                        let _ = self.events.send(event);
                    }
                    for (reply, applied) in pending.replies {
                        let _ = reply.send(Ok(applied));
                    }
                    self.start_answers(pending.start);
                    self.start_judging(pending.judge);
                }
            }
            Err(err) => {
                tracing::error!(session = %self.state.id(), error = %err, "could not save; will retry");
                if !self.storage_was_down() {
                    let _ = self.events.send(Arc::new(Published::error(
                        SessionError::storage(&err).code().as_str(),
                        format!(
                            "Vigil cannot save to its database ({err}). What you see is kept in \
                             memory and is retried every few seconds; new lines wait."
                        ),
                        None,
                    )));
                }
                self.state.set_storage(Storage::Down);
                for pending in committed.into_iter().rev() {
                    self.outbox.push_front(pending);
                }
                self.retry_at = Some(Instant::now() + STORAGE_RETRY);
            }
        }
        for (after_seq, reply) in std::mem::take(&mut self.attach_waiters) {
            let _ = reply.send(self.attach(after_seq));
        }
    }

    fn storage_was_down(&self) -> bool {
        self.state.storage() == Storage::Down
    }

    /// Sends saved answers to the judge, each in a task of its own: the session goes on (the
    /// next line is not held up), and the verdicts come back as a rating.
    fn start_judging(&mut self, jobs: Vec<crate::rating::judge::Job>) {
        let Some(judge) = &self.ctx.judge else {
            return;
        };
        for job in jobs {
            let judge = Arc::clone(judge);
            let back = self.judged_tx.clone();
            self.judging += 1;
            tokio::spawn(async move {
                let verdicts = judge.rate(&job).await;
                let _ = back
                    .send(crate::rating::judge::Outcome { job, verdicts })
                    .await;
            });
        }
    }

    /// Starts one pump per job, once the batch that asked for it is on disk.
    fn start_answers(&mut self, jobs: Vec<AnswerJob>) {
        if jobs.is_empty() {
            return;
        }
        if self.answers_cancel.is_cancelled() {
            self.answers_cancel = CancellationToken::new();
        }
        for job in jobs {
            let Some((model, max_chars)) = self.models.get(job.target).cloned().flatten() else {
                // Cannot happen for a target the state let answer; never leave it hanging.
                let failed = FinishedAnswer {
                    target: job.target,
                    turn: job.turn,
                    attempt: job.attempt,
                    text: String::new(),
                    ttft_ms: None,
                    duration_ms: 0,
                    started_at: now_ms(),
                    end: StreamEnd::Failed(crate::target::TargetError::Connect(
                        "this target is not configured on this server".to_owned(),
                    )),
                    queue_ms: None,
                    reasoning: String::new(),
                    refusal: String::new(),
                    dropped_turns: job.dropped_turns,
                };
                self.on_finished(failed);
                continue;
            };
            let alias: Arc<str> = Arc::from(self.state.targets()[job.target].alias.as_str());
            let ctx = PumpContext {
                alias,
                model,
                max_chars,
                live: Arc::clone(&self.live),
                events: self.events.clone(),
                cancel: self.answers_cancel.child_token(),
                done: self.finished_tx.clone(),
            };
            tokio::spawn(pump(job, ctx));
        }
    }
}
