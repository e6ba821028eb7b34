//! One live session: the task that owns its state.
//!
//! Everything that changes the session goes the same way: the state is updated, the rows and
//! the durable events it produces are queued as one batch in the outbox, and the outbox is
//! committed in order. Only after a batch is committed are its events published, its client
//! replies (acks) sent, and its follow-up run (the answers to a patient line start streaming
//! only once the line is on disk). If the database fails, the batch waits in the outbox and is
//! retried; until it is saved the session refuses new changes, so memory never runs ahead of
//! the database by more than the batch that failed.
//!
//! Answers stream from one small task per target ("pump") that forwards the model's chunks
//! back into this actor, which relays them as transient `delta` events. Deltas are never
//! written; the finished answer is, with its rules rating, in one batch.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::event::{
    AnswerEvent, CriterionView, EndSummary, EndedTarget, ErrorEvent, ErrorInfo, MarkerView,
    OfferedLine, PersonaView, RatingEvent, ScenarioView, Started, TargetView,
};
use super::{
    Applied, Attachment, Command, Mode, Published, RateInput, Reply, ServerEvent, SessionError,
};
use crate::rating::status::{SessionFacts, applies_at, summarise};
use crate::rating::{
    CriterionVerdict, DEFAULT_DIMENSIONS, MAX_SCORE, MIN_SCORE, RULES_RATER, Rating, RuleSet,
    TargetSummary, Verdict, Verdicts,
};
use crate::scenario::{Kind, Scenario, Scope};
use crate::store::{AnswerRow, PreferenceRow, SessionRecord, Store, WriteOp};
use crate::target::{ChatMessage, ChatModel, Chunk, Role, TargetError, TargetInfo};
use crate::time::now_ms;

/// Events kept for a slow subscriber before it must resynchronise from the log. The slots are
/// allocated up front for every live session, so this is also most of an idle session's memory.
const BROADCAST_CAPACITY: usize = 256;
/// Longest note or flag list a human rating may carry.
const MAX_NOTE_CHARS: usize = 10_000;
const MAX_FLAGS: usize = 20;
const MAX_FLAG_CHARS: usize = 64;
/// Pause before retrying an outbox the database refused.
const STORAGE_RETRY: Duration = Duration::from_secs(2);

/// What the actor needs from its surroundings.
pub(super) struct Context {
    pub store: Store,
    pub max_text_chars: usize,
    pub human_rater: String,
    pub idle: Duration,
    pub shutdown: CancellationToken,
    /// Called once when the task ends (removes the session from the registry).
    pub on_exit: Box<dyn FnOnce() + Send>,
}

/// One target of the session.
pub(super) struct Slot {
    pub alias: String,
    pub name: String,
    pub info: Option<TargetInfo>,
    /// `None` when the target is no longer configured (a restored session can then be viewed
    /// and ended, not continued).
    pub model: Option<Arc<dyn ChatModel>>,
    pub system: Option<String>,
    pub history: Vec<ChatMessage>,
    pub answered: BTreeSet<u32>,
    pub ratings: Vec<Rating>,
    /// The verdicts that count, kept up to date as ratings arrive.
    pub verdicts: Verdicts,
    live: Option<Live>,
}

impl Slot {
    pub fn new(
        alias: String,
        name: String,
        info: Option<TargetInfo>,
        model: Option<Arc<dyn ChatModel>>,
        system: Option<String>,
    ) -> Self {
        Self {
            alias,
            name,
            info,
            model,
            system,
            history: Vec::new(),
            answered: BTreeSet::new(),
            ratings: Vec::new(),
            verdicts: Verdicts::default(),
            live: None,
        }
    }
}

/// The answer being streamed.
struct Live {
    turn: u32,
    text: String,
    chars: usize,
    started: Instant,
    started_at: i64,
    ttft_ms: Option<i64>,
}

enum StreamMsg {
    Delta {
        slot: usize,
        turn: u32,
        text: String,
    },
    Finished {
        slot: usize,
        turn: u32,
        end: StreamEnd,
    },
}

enum StreamEnd {
    Completed { finish: String, tokens: Option<u32> },
    Stopped,
    Failed(TargetError),
}

enum AfterCommit {
    StartTurn(u32),
}

#[derive(Default)]
struct Batch {
    ops: Vec<WriteOp>,
    events: Vec<Arc<Published>>,
    replies: Vec<(Reply, Applied)>,
    then: Option<AfterCommit>,
}

pub(super) struct Actor {
    id: String,
    scenario: Arc<Scenario>,
    rules: Arc<RuleSet>,
    mode: Mode,
    label: Option<String>,
    blind: bool,
    ended: bool,
    slots: Vec<Slot>,
    turns: u32,
    markers: BTreeMap<String, u32>,
    script_next: usize,
    offer: Option<OfferedLine>,
    applied: HashSet<String>,
    log: Vec<Arc<Published>>,
    next_seq: u64,
    events: broadcast::Sender<Arc<Published>>,
    ctx: Context,
    stream_tx: mpsc::Sender<StreamMsg>,
    stream_rx: mpsc::Receiver<StreamMsg>,
    in_flight: usize,
    turn_cancel: CancellationToken,
    ending: Vec<(Option<String>, Reply)>,
    outbox: VecDeque<Batch>,
    storage_down: bool,
    retry_at: Option<Instant>,
    /// The per-target outcomes last queued for the database (written only when they change).
    saved_outcomes: Vec<(String, String, Option<f64>)>,
    shutting_down: bool,
    last_activity: Instant,
}

/// A new session's settings.
pub(super) struct NewSession {
    pub id: String,
    pub scenario: Arc<Scenario>,
    pub rules: Arc<RuleSet>,
    pub mode: Mode,
    pub label: Option<String>,
    pub blind: bool,
    pub slots: Vec<Slot>,
    pub created_at: i64,
}

impl Actor {
    fn empty(new: NewSession, ctx: Context) -> Self {
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (stream_tx, stream_rx) = mpsc::channel(256);
        Self {
            id: new.id,
            scenario: new.scenario,
            rules: new.rules,
            mode: new.mode,
            label: new.label,
            blind: new.blind,
            ended: false,
            slots: new.slots,
            turns: 0,
            markers: BTreeMap::new(),
            script_next: 0,
            offer: None,
            applied: HashSet::new(),
            log: Vec::new(),
            next_seq: 1,
            events,
            ctx,
            stream_tx,
            stream_rx,
            in_flight: 0,
            turn_cancel: CancellationToken::new(),
            ending: Vec::new(),
            outbox: VecDeque::new(),
            storage_down: false,
            retry_at: None,
            saved_outcomes: Vec::new(),
            shutting_down: false,
            last_activity: Instant::now(),
        }
    }

    /// A brand-new session: its `started` and `criteria` events are the first batch. Returns
    /// the actor and the rows that must be committed before anyone is told the session exists
    /// (the caller commits them together with the session row).
    pub fn create(new: NewSession, ctx: Context) -> (Self, Vec<WriteOp>) {
        let created_at = new.created_at;
        let mut actor = Self::empty(new, ctx);
        let summaries = actor.summaries();
        actor.offer = actor.compute_offer(&summaries);
        let mut batch = Batch::default();
        let started = actor.started_event(created_at);
        actor.durable(&mut batch, started);
        actor.criteria_update(&mut batch);
        // Committed by the caller with the session row: publish into the log directly.
        for event in batch.events {
            actor.log.push(event);
        }
        (actor, batch.ops)
    }

    /// A session brought back from the database. Answers that were being streamed when the
    /// server stopped are recorded as interrupted.
    pub fn restore(
        record: &SessionRecord,
        events: Vec<(u64, String)>,
        applied: Vec<String>,
        scenario: Arc<Scenario>,
        rules: Arc<RuleSet>,
        mut slots: Vec<Slot>,
        ctx: Context,
    ) -> Self {
        let mode = Mode::parse(&record.session.mode).unwrap_or(Mode::Free);
        let shape = NewSession {
            id: record.session.id.clone(),
            scenario,
            rules,
            mode,
            label: record.session.label.clone(),
            blind: record.session.blind,
            slots: Vec::new(),
            created_at: record.session.created_at,
        };
        let mut actor = Self::empty(shape, ctx);
        actor.ended = record.session.status == "ended";
        actor.turns = record.turns.last().map_or(0, |t| t.turn);
        for marker in &record.markers {
            let first = actor
                .markers
                .entry(marker.marker.clone())
                .or_insert(marker.turn);
            *first = (*first).min(marker.turn);
        }
        actor.script_next = record
            .turns
            .iter()
            .filter_map(|t| t.script_index)
            .max()
            .map_or(0, |i| i as usize + 1);
        for turn in &record.turns {
            for slot in &mut slots {
                slot.history
                    .push(ChatMessage::new(Role::User, turn.text.clone()));
                if let Some(answer) = record
                    .answers
                    .iter()
                    .find(|a| a.turn == turn.turn && a.target == slot.alias)
                {
                    slot.answered.insert(turn.turn);
                    if !answer.text.is_empty() {
                        slot.history
                            .push(ChatMessage::new(Role::Assistant, answer.text.clone()));
                    }
                }
            }
        }
        for slot in &mut slots {
            slot.ratings = record
                .ratings
                .iter()
                .filter(|r| r.target == slot.alias)
                .cloned()
                .collect();
            slot.verdicts = Verdicts::from_ratings(&slot.ratings);
        }
        actor.slots = slots;
        actor.applied = applied.into_iter().collect();
        actor.next_seq = events.last().map_or(1, |(seq, _)| seq + 1);
        actor.log = events
            .into_iter()
            .map(|(seq, json)| Arc::new(Published::stored(seq, json)))
            .collect();

        if !actor.ended {
            let mut batch = Batch::default();
            let turn = actor.turns;
            let now = now_ms();
            for index in 0..actor.slots.len() {
                let slot = &actor.slots[index];
                if turn == 0 || slot.answered.contains(&turn) {
                    continue;
                }
                let alias = slot.alias.clone();
                let message = "The server stopped before this answer was complete. The patient \
                               line is saved; send the next line to go on."
                    .to_owned();
                let answer = AnswerRow {
                    turn,
                    target: alias.clone(),
                    text: String::new(),
                    finish: "interrupted".to_owned(),
                    error_code: Some("answer_interrupted".to_owned()),
                    error_message: Some(message.clone()),
                    ttft_ms: None,
                    duration_ms: 0,
                    tokens: None,
                    started_at: now,
                    completed_at: now,
                };
                actor.slots[index].answered.insert(turn);
                let rating = actor.rules_rating(&answer, false);
                actor.record_answer(&mut batch, index, answer, rating);
            }
            if !batch.ops.is_empty() {
                let summaries = actor.criteria_update(&mut batch);
                actor.offer = actor.compute_offer(&summaries);
                if actor.mode == Mode::Scripted {
                    let offered = ServerEvent::Offered {
                        line: actor.offer.clone(),
                    };
                    actor.durable(&mut batch, offered);
                }
                actor.outbox.push_back(batch);
            } else {
                let summaries = actor.summaries();
                actor.saved_outcomes = outcomes_of(&summaries);
                actor.offer = actor.compute_offer(&summaries);
            }
        }
        actor
    }

    /// The task's loop: commands, stream messages, storage retries, idle eviction, shutdown.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        self.flush().await;
        let tick = self
            .ctx
            .idle
            .clamp(Duration::from_millis(50), Duration::from_secs(30));
        let mut idle_check = tokio::time::interval(tick);
        idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.ctx.shutdown.clone();
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                biased;
                Some(msg) = self.stream_rx.recv() => self.on_stream(msg).await,
                _ = shutdown.cancelled(), if !self.shutting_down => {
                    self.shutting_down = true;
                    self.turn_cancel.cancel();
                }
                command = commands.recv(), if !self.shutting_down => match command {
                    Some(command) => self.on_command(command).await,
                    None => {
                        // Every handle is gone (the registry dropped it): finish and leave.
                        self.shutting_down = true;
                        self.turn_cancel.cancel();
                    }
                },
                _ = async { tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)).await },
                    if retry_at.is_some() => {
                    self.retry_at = None;
                    self.flush().await;
                }
                _ = idle_check.tick() => {
                    if self.evictable() {
                        break;
                    }
                }
            }
            if self.shutting_down && self.in_flight == 0 {
                self.flush().await;
                break;
            }
        }
        (self.ctx.on_exit)();
        // Commands that arrived meanwhile get no reply: their senders see the session gone
        // and reopen it from the database.
        commands.close();
    }

    fn evictable(&self) -> bool {
        self.in_flight == 0
            && self.outbox.is_empty()
            && self.ending.is_empty()
            && self.events.receiver_count() == 0
            && self.last_activity.elapsed() >= self.ctx.idle
    }

    async fn on_command(&mut self, command: Command) {
        self.last_activity = Instant::now();
        match command {
            Command::Attach { after_seq, reply } => {
                let _ = reply.send(self.attach(after_seq));
            }
            Command::Say { id, text, reply } => self.say(id, text, "human", reply).await,
            Command::Next { id, reply } => self.next_line(id, reply).await,
            Command::Mark {
                id,
                marker,
                turn,
                reply,
            } => self.mark(id, marker, turn, reply).await,
            Command::Rate { id, input, reply } => self.rate(id, input, reply).await,
            Command::Prefer {
                id,
                turn,
                target,
                reply,
            } => self.prefer(id, turn, target, reply).await,
            Command::Stop { reply } => {
                if self.in_flight > 0 {
                    self.turn_cancel.cancel();
                }
                let _ = reply.send(Ok(Applied::Now));
            }
            Command::End { id, reply } => self.end(id, reply).await,
        }
    }

    fn attach(&mut self, after_seq: u64) -> Attachment {
        let replay: Vec<Arc<Published>> = self
            .log
            .iter()
            .filter(|e| e.seq.is_some_and(|s| s > after_seq))
            .cloned()
            .collect();
        let catch_up = self
            .slots
            .iter()
            .filter_map(|slot| {
                let live = slot.live.as_ref().filter(|l| !l.text.is_empty())?;
                Some(Arc::new(Published::new(
                    None,
                    ServerEvent::Delta {
                        turn: live.turn,
                        target: slot.alias.clone(),
                        offset: 0,
                        text: live.text.clone(),
                    },
                )))
            })
            .collect();
        let last_seq = self.log.last().and_then(|e| e.seq).unwrap_or(0);
        Attachment {
            replay,
            catch_up,
            live: self.events.subscribe(),
            last_seq,
        }
    }

    /// Common checks for a state-changing command. `Err` has already been replied.
    fn admit(&self, id: &Option<String>, reply: Reply) -> Result<Reply, ()> {
        if let Some(id) = id
            && self.applied.contains(id)
        {
            let _ = reply.send(Ok(Applied::Before));
            return Err(());
        }
        if self.storage_down || !self.outbox.is_empty() {
            let _ = reply.send(Err(SessionError::new(
                "storage_failed",
                "Vigil cannot save to its database right now, so nothing new is accepted; it \
                 keeps retrying and everything recorded so far is kept",
            )));
            return Err(());
        }
        Ok(reply)
    }

    fn refuse(reply: Reply, code: &'static str, message: impl Into<String>) {
        let _ = reply.send(Err(SessionError::new(code, message)));
    }

    async fn say(&mut self, id: Option<String>, text: String, source: &str, reply: Reply) {
        let Ok(reply) = self.admit(&id, reply) else {
            return;
        };
        if self.ended || !self.ending.is_empty() {
            return Self::refuse(reply, "session_ended", "this session has ended");
        }
        if self.in_flight > 0 {
            return Self::refuse(
                reply,
                "answers_streaming",
                "wait until every answer to the last line has finished, or send `stop`",
            );
        }
        let text = text.trim().to_owned();
        if text.is_empty() {
            return Self::refuse(reply, "text_empty", "the line is empty");
        }
        let chars = text.chars().count();
        if chars > self.ctx.max_text_chars {
            return Self::refuse(
                reply,
                "text_too_long",
                format!(
                    "the line has {chars} characters; the limit is {}",
                    self.ctx.max_text_chars
                ),
            );
        }
        if let Some(slot) = self.slots.iter().find(|s| s.model.is_none()) {
            return Self::refuse(
                reply,
                "target_unavailable",
                format!(
                    "target {} (`{}`) is no longer configured on this server; this session can \
                     be viewed and ended, not continued",
                    slot.alias, slot.name
                ),
            );
        }

        let turn = self.turns + 1;
        let now = now_ms();
        let offer = if self.mode == Mode::Scripted {
            self.offer.take()
        } else {
            None
        };
        // An offered line sent edited still plays its part in the script.
        let source = match &offer {
            Some(o) if o.text == text && source == "script" => "script",
            _ => source,
        };
        let mut set_markers = Vec::new();
        if let Some(offer) = &offer {
            self.script_next = offer.index + 1;
            if let Some(marker) = &offer.marks {
                set_markers.push(marker.clone());
            }
        }
        self.turns = turn;
        for slot in &mut self.slots {
            slot.history
                .push(ChatMessage::new(Role::User, text.clone()));
        }
        let mut batch = Batch::default();
        batch.ops.push(WriteOp::Turn {
            session_id: self.id.clone(),
            turn,
            text: text.clone(),
            source: source.to_owned(),
            script_index: offer.as_ref().and_then(|o| u32::try_from(o.index).ok()),
            created_at: now,
        });
        for marker in &set_markers {
            self.markers.entry(marker.clone()).or_insert(turn);
            batch.ops.push(WriteOp::Marker {
                session_id: self.id.clone(),
                marker: marker.clone(),
                turn,
                source: "script".to_owned(),
                created_at: now,
            });
        }
        self.durable(
            &mut batch,
            ServerEvent::Patient {
                turn,
                text,
                source: source.to_owned(),
                markers: set_markers,
            },
        );
        self.applied_op(&mut batch, id);
        batch.replies.push((reply, Applied::Now));
        batch.then = Some(AfterCommit::StartTurn(turn));
        self.submit(batch).await;
    }

    async fn next_line(&mut self, id: Option<String>, reply: Reply) {
        if let Some(id) = &id
            && self.applied.contains(id)
        {
            let _ = reply.send(Ok(Applied::Before));
            return;
        }
        if self.mode != Mode::Scripted {
            return Self::refuse(
                reply,
                "not_scripted",
                "`next` sends the scenario's script, and this session is in free mode: use `say`",
            );
        }
        if self.ended {
            return Self::refuse(reply, "session_ended", "this session has ended");
        }
        if self.in_flight > 0 {
            return Self::refuse(
                reply,
                "answers_streaming",
                "wait until every answer to the last line has finished, or send `stop`",
            );
        }
        let Some(offer) = &self.offer else {
            return Self::refuse(
                reply,
                "script_finished",
                "the script has no more lines; type a line with `say`, or end the session",
            );
        };
        let text = offer.text.clone();
        self.say(id, text, "script", reply).await;
    }

    async fn mark(&mut self, id: Option<String>, marker: String, turn: Option<u32>, reply: Reply) {
        let Ok(reply) = self.admit(&id, reply) else {
            return;
        };
        if self.ended {
            return Self::refuse(reply, "session_ended", "this session has ended");
        }
        if self.scenario.marker(&marker).is_none() {
            let known: Vec<&str> = self
                .scenario
                .markers
                .iter()
                .map(|m| m.id.as_str())
                .collect();
            return Self::refuse(
                reply,
                "unknown_marker",
                format!(
                    "this scenario has no marker `{marker}` (it has: {})",
                    known.join(", ")
                ),
            );
        }
        let turn = turn.unwrap_or(self.turns);
        if turn == 0 || turn > self.turns {
            return Self::refuse(
                reply,
                "unknown_turn",
                if self.turns == 0 {
                    "a marker belongs to a patient line; send one first".to_owned()
                } else {
                    format!("there is no turn {turn} (turns 1 to {})", self.turns)
                },
            );
        }
        let first = self.markers.entry(marker.clone()).or_insert(turn);
        *first = (*first).min(turn);
        let mut batch = Batch::default();
        batch.ops.push(WriteOp::Marker {
            session_id: self.id.clone(),
            marker: marker.clone(),
            turn,
            source: self.ctx.human_rater.clone(),
            created_at: now_ms(),
        });
        self.durable(
            &mut batch,
            ServerEvent::Marked {
                turn,
                marker,
                source: self.ctx.human_rater.clone(),
            },
        );
        let summaries = self.criteria_update(&mut batch);
        self.reoffer(&summaries, &mut batch);
        self.applied_op(&mut batch, id);
        batch.replies.push((reply, Applied::Now));
        self.submit(batch).await;
    }

    fn slot_for_answer(&self, turn: u32, target: &str) -> Result<usize, SessionError> {
        let index = self
            .slots
            .iter()
            .position(|s| s.alias == target)
            .ok_or_else(|| {
                let aliases: Vec<&str> = self.slots.iter().map(|s| s.alias.as_str()).collect();
                SessionError::new(
                    "unknown_target",
                    format!(
                        "this session has no target `{target}` (it has: {})",
                        aliases.join(", ")
                    ),
                )
            })?;
        if !self.slots[index].answered.contains(&turn) {
            return Err(SessionError::new(
                "unknown_turn",
                format!("target {target} has no finished answer to turn {turn}"),
            ));
        }
        Ok(index)
    }

    async fn rate(&mut self, id: Option<String>, input: RateInput, reply: Reply) {
        let Ok(reply) = self.admit(&id, reply) else {
            return;
        };
        let index = match self.slot_for_answer(input.turn, &input.target) {
            Ok(index) => index,
            Err(err) => {
                let _ = reply.send(Err(err));
                return;
            }
        };
        for criterion in input.criteria.keys() {
            if self.scenario.criterion(criterion).is_none() {
                return Self::refuse(
                    reply,
                    "unknown_criterion",
                    format!("this scenario has no criterion `{criterion}`"),
                );
            }
        }
        for (dimension, value) in &input.scores {
            if !DEFAULT_DIMENSIONS.contains(&dimension.as_str()) {
                return Self::refuse(
                    reply,
                    "invalid_score",
                    format!(
                        "unknown scoring dimension `{dimension}` (use: {})",
                        DEFAULT_DIMENSIONS.join(", ")
                    ),
                );
            }
            if !(MIN_SCORE..=MAX_SCORE).contains(value) {
                return Self::refuse(
                    reply,
                    "invalid_score",
                    format!("score `{dimension}` must be {MIN_SCORE} to {MAX_SCORE}, not {value}"),
                );
            }
        }
        if input.flags.len() > MAX_FLAGS
            || input
                .flags
                .iter()
                .any(|f| f.chars().count() > MAX_FLAG_CHARS)
        {
            return Self::refuse(
                reply,
                "invalid_rating",
                format!("at most {MAX_FLAGS} flags of at most {MAX_FLAG_CHARS} characters each"),
            );
        }
        let too_long =
            |t: &Option<String>, max: usize| t.as_ref().is_some_and(|t| t.chars().count() > max);
        if too_long(&input.note, MAX_NOTE_CHARS) || too_long(&input.rewrite, MAX_NOTE_CHARS) {
            return Self::refuse(
                reply,
                "text_too_long",
                format!("a note or a rewrite may have at most {MAX_NOTE_CHARS} characters"),
            );
        }
        if input.criteria.is_empty()
            && input.scores.is_empty()
            && input.flags.is_empty()
            && input.note.is_none()
            && input.rewrite.is_none()
        {
            return Self::refuse(reply, "invalid_rating", "the rating is empty");
        }
        let rating = Rating {
            id: uuid::Uuid::new_v4().to_string(),
            turn: input.turn,
            target: input.target.clone(),
            rater: self.ctx.human_rater.clone(),
            verdicts: input
                .criteria
                .into_iter()
                .map(|(criterion, verdict)| CriterionVerdict {
                    criterion,
                    verdict,
                    evidence: None,
                })
                .collect(),
            scores: input.scores,
            flags: input.flags,
            note: input.note,
            rewrite: input.rewrite,
            created_at: now_ms(),
            superseded_by: None,
        };
        let mut batch = Batch::default();
        self.add_rating(&mut batch, index, rating, false);
        let summaries = self.criteria_update(&mut batch);
        self.reoffer(&summaries, &mut batch);
        self.applied_op(&mut batch, id);
        batch.replies.push((reply, Applied::Now));
        self.submit(batch).await;
    }

    async fn prefer(&mut self, id: Option<String>, turn: u32, target: String, reply: Reply) {
        let Ok(reply) = self.admit(&id, reply) else {
            return;
        };
        if let Err(err) = self.slot_for_answer(turn, &target) {
            let _ = reply.send(Err(err));
            return;
        }
        let preference = PreferenceRow {
            id: uuid::Uuid::new_v4().to_string(),
            turn,
            target: target.clone(),
            rater: self.ctx.human_rater.clone(),
            created_at: now_ms(),
        };
        let mut batch = Batch::default();
        batch.ops.push(WriteOp::Preference {
            session_id: self.id.clone(),
            preference,
        });
        self.durable(
            &mut batch,
            ServerEvent::Preferred {
                turn,
                target,
                rater: self.ctx.human_rater.clone(),
            },
        );
        self.applied_op(&mut batch, id);
        batch.replies.push((reply, Applied::Now));
        self.submit(batch).await;
    }

    async fn end(&mut self, id: Option<String>, reply: Reply) {
        if self.ended {
            let _ = reply.send(Ok(Applied::Before));
            return;
        }
        let Ok(reply) = self.admit(&id, reply) else {
            return;
        };
        self.ending.push((id, reply));
        if self.in_flight > 0 {
            self.turn_cancel.cancel();
        } else {
            self.finish_end().await;
        }
    }

    async fn finish_end(&mut self) {
        let ending = std::mem::take(&mut self.ending);
        if ending.is_empty() {
            return;
        }
        self.ended = true;
        self.offer = None;
        let ended_at = now_ms();
        let mut batch = Batch::default();
        batch.ops.push(WriteOp::End {
            session_id: self.id.clone(),
            ended_at,
        });
        let summaries = self.criteria_update(&mut batch);
        let targets = self
            .slots
            .iter()
            .zip(summaries)
            .map(|(slot, summary)| EndedTarget {
                alias: slot.alias.clone(),
                name: slot.name.clone(),
                label: slot
                    .info
                    .as_ref()
                    .map_or_else(|| slot.name.clone(), |i| i.label.clone()),
                canned: slot.info.as_ref().is_some_and(|i| i.canned),
                outcome: summary.outcome,
                score: summary.score,
                counts: summary.counts,
            })
            .collect();
        let summary = EndSummary {
            session: self.id.clone(),
            turns: self.turns,
            ended_at,
            targets,
        };
        self.durable(&mut batch, ServerEvent::Ended(Box::new(summary)));
        for (id, reply) in ending {
            self.applied_op(&mut batch, id);
            batch.replies.push((reply, Applied::Now));
        }
        self.submit(batch).await;
    }

    async fn on_stream(&mut self, msg: StreamMsg) {
        match msg {
            StreamMsg::Delta { slot, turn, text } => {
                let Some(live) = self.slots.get_mut(slot).and_then(|s| s.live.as_mut()) else {
                    return;
                };
                if live.turn != turn {
                    return;
                }
                if live.ttft_ms.is_none() {
                    live.ttft_ms = Some(elapsed_ms(live.started));
                }
                let offset = live.chars;
                live.chars += text.chars().count();
                live.text.push_str(&text);
                if self.events.receiver_count() > 0 {
                    let alias = self.slots[slot].alias.clone();
                    let delta = ServerEvent::Delta {
                        turn,
                        target: alias,
                        offset,
                        text,
                    };
                    let _ = self.events.send(Arc::new(Published::new(None, delta)));
                }
            }
            StreamMsg::Finished { slot, turn, end } => self.finish_answer(slot, turn, end).await,
        }
    }

    async fn finish_answer(&mut self, index: usize, turn: u32, end: StreamEnd) {
        let Some(live) = self.slots.get_mut(index).and_then(|s| s.live.take()) else {
            return;
        };
        if live.turn != turn {
            return;
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        let (finish, tokens, error) = match end {
            StreamEnd::Completed { finish, tokens } => (finish, tokens, None),
            StreamEnd::Stopped if self.shutting_down => (
                "interrupted".to_owned(),
                None,
                Some(ErrorInfo {
                    code: "answer_interrupted".to_owned(),
                    message: "The server was shutting down; the answer so far is kept.".to_owned(),
                }),
            ),
            StreamEnd::Stopped => ("stopped".to_owned(), None, None),
            StreamEnd::Failed(err) => (
                "error".to_owned(),
                None,
                Some(ErrorInfo {
                    code: err.code().to_owned(),
                    message: err.to_string(),
                }),
            ),
        };
        let complete = error.is_none() && finish != "stopped" && finish != "length";
        let slot = &mut self.slots[index];
        slot.answered.insert(turn);
        if !live.text.is_empty() {
            slot.history
                .push(ChatMessage::new(Role::Assistant, live.text.clone()));
        }
        if let Some(err) = &error {
            // Never the answer text: only which target failed and how.
            tracing::warn!(session = %self.id, turn, target = %slot.alias, code = %err.code, "target failed");
        }
        let answer = AnswerRow {
            turn,
            target: slot.alias.clone(),
            text: live.text,
            finish,
            error_code: error.as_ref().map(|e| e.code.clone()),
            error_message: error.as_ref().map(|e| e.message.clone()),
            ttft_ms: live.ttft_ms,
            duration_ms: elapsed_ms(live.started),
            tokens,
            started_at: live.started_at,
            completed_at: now_ms(),
        };
        let mut batch = Batch::default();
        let rating = self.rules_rating(&answer, complete);
        self.record_answer(&mut batch, index, answer, rating);
        let summaries = self.criteria_update(&mut batch);
        let turn_complete = self.in_flight == 0 && !self.shutting_down && self.ending.is_empty();
        if turn_complete && self.mode == Mode::Scripted {
            self.offer = self.compute_offer(&summaries);
            let offered = ServerEvent::Offered {
                line: self.offer.clone(),
            };
            self.durable(&mut batch, offered);
        }
        self.submit(batch).await;
        if self.in_flight == 0 && !self.ending.is_empty() {
            self.finish_end().await;
        }
    }

    /// The rules' rating of an answer, empty ones included: in an empty answer nothing
    /// forbidden was said and nothing required can be confirmed.
    fn rules_rating(&self, answer: &AnswerRow, complete: bool) -> Rating {
        Rating {
            id: uuid::Uuid::new_v4().to_string(),
            turn: answer.turn,
            target: answer.target.clone(),
            rater: RULES_RATER.to_owned(),
            verdicts: self.rules.rate(&answer.text, complete),
            scores: BTreeMap::new(),
            flags: Vec::new(),
            note: None,
            rewrite: None,
            created_at: now_ms(),
            superseded_by: None,
        }
    }

    /// Queues an answer row, its `answer` (and `error`) events and its rating.
    fn record_answer(
        &mut self,
        batch: &mut Batch,
        index: usize,
        answer: AnswerRow,
        rating: Rating,
    ) {
        let event = AnswerEvent {
            turn: answer.turn,
            target: answer.target.clone(),
            text: answer.text.clone(),
            ttft_ms: answer.ttft_ms,
            duration_ms: answer.duration_ms,
            finish: answer.finish.clone(),
            tokens: answer.tokens,
            error: answer.error_code.clone().map(|code| ErrorInfo {
                code,
                message: answer.error_message.clone().unwrap_or_default(),
            }),
        };
        let error = event.error.clone();
        let (turn, target) = (answer.turn, answer.target.clone());
        batch.ops.push(WriteOp::Answer {
            session_id: self.id.clone(),
            answer,
        });
        self.durable(batch, ServerEvent::Answer(Box::new(event)));
        if let Some(error) = error {
            let event = ServerEvent::Error(ErrorEvent {
                code: error.code,
                message: error.message,
                turn: Some(turn),
                target: Some(target),
                id: None,
            });
            self.durable(batch, event);
        }
        self.add_rating(batch, index, rating, true);
    }

    /// Queues a rating (superseding the same rater's earlier rating of the same answer) and
    /// its event, which shows the verdicts on the criteria that apply at that turn.
    fn add_rating(
        &mut self,
        batch: &mut Batch,
        index: usize,
        rating: Rating,
        only_applicable: bool,
    ) {
        let slot = &mut self.slots[index];
        for earlier in slot.ratings.iter_mut().filter(|r| {
            r.turn == rating.turn && r.rater == rating.rater && r.superseded_by.is_none()
        }) {
            earlier.superseded_by = Some(rating.id.clone());
        }
        let verdicts: Vec<CriterionVerdict> = rating
            .verdicts
            .iter()
            .filter(|v| {
                !only_applicable
                    || self
                        .scenario
                        .criterion(&v.criterion)
                        .is_some_and(|c| applies_at(&self.scenario, c, &self.markers, rating.turn))
            })
            .cloned()
            .collect();
        // For the rules' rating: the criteria that apply at this turn which only a judge or a
        // human can rate, so a page can ask for them.
        let awaiting = if only_applicable {
            self.scenario
                .criteria
                .iter()
                .filter(|c| {
                    !c.has_patterns() && applies_at(&self.scenario, c, &self.markers, rating.turn)
                })
                .map(|c| c.id.to_string())
                .collect()
        } else {
            Vec::new()
        };
        let event = RatingEvent {
            awaiting,
            id: rating.id.clone(),
            turn: rating.turn,
            target: rating.target.clone(),
            rater: rating.rater.clone(),
            score: answer_score(&self.scenario, &verdicts),
            verdicts,
            scores: rating.scores.clone(),
            flags: rating.flags.clone(),
            note: rating.note.clone(),
            rewrite: rating.rewrite.clone(),
            created_at: rating.created_at,
        };
        batch.ops.push(WriteOp::Rating {
            session_id: self.id.clone(),
            rating: rating.clone(),
        });
        let slot = &mut self.slots[index];
        let turn = rating.turn;
        slot.ratings.push(rating);
        slot.verdicts.update_turn(turn, &slot.ratings);
        self.durable(batch, ServerEvent::Rating(Box::new(event)));
    }

    /// Between turns in scripted mode, a human verdict or a marker can change which line the
    /// script offers next (a `when` now met, or no longer): queue the new offer if it changed.
    fn reoffer(&mut self, summaries: &[TargetSummary], batch: &mut Batch) {
        if self.mode != Mode::Scripted || self.in_flight > 0 || self.ended {
            return;
        }
        let offer = self.compute_offer(summaries);
        if offer != self.offer {
            self.offer.clone_from(&offer);
            self.durable(batch, ServerEvent::Offered { line: offer });
        }
    }

    /// Recomputes the status of every criterion once, queues the `criteria` event, and the
    /// cached per-target outcomes when they changed. Returns the summaries.
    fn criteria_update(&mut self, batch: &mut Batch) -> Vec<TargetSummary> {
        let summaries = self.summaries();
        let outcomes = outcomes_of(&summaries);
        if outcomes != self.saved_outcomes {
            batch.ops.push(WriteOp::Outcomes {
                session_id: self.id.clone(),
                outcomes: outcomes.clone(),
                updated_at: now_ms(),
            });
            self.saved_outcomes = outcomes;
        }
        self.durable(
            batch,
            ServerEvent::Criteria {
                targets: summaries.clone(),
            },
        );
        summaries
    }

    fn applied_op(&mut self, batch: &mut Batch, id: Option<String>) {
        if let Some(id) = id {
            self.applied.insert(id.clone());
            batch.ops.push(WriteOp::Applied {
                session_id: self.id.clone(),
                message_id: id,
                created_at: now_ms(),
            });
        }
    }

    /// Gives `event` the next `seq` and queues it to be stored and then published.
    fn durable(&mut self, batch: &mut Batch, event: ServerEvent) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let published = Arc::new(Published::new(Some(seq), event));
        batch.ops.push(WriteOp::Event {
            session_id: self.id.clone(),
            seq,
            body: published.json.clone(),
            created_at: now_ms(),
        });
        batch.events.push(published);
    }

    async fn submit(&mut self, batch: Batch) {
        self.outbox.push_back(batch);
        self.flush().await;
    }

    /// Commits the outbox in order; publishes, replies and follows up each batch once saved.
    async fn flush(&mut self) {
        while let Some(batch) = self.outbox.front() {
            let ops = batch.ops.clone();
            match self.ctx.store.write(ops).await {
                Ok(()) => {
                    let Some(batch) = self.outbox.pop_front() else {
                        break;
                    };
                    if self.storage_down {
                        self.storage_down = false;
                        tracing::info!(session = %self.id, "database writes work again");
                    }
                    for event in batch.events {
                        self.log.push(Arc::clone(&event));
                        let _ = self.events.send(event);
                    }
                    for (reply, applied) in batch.replies {
                        let _ = reply.send(Ok(applied));
                    }
                    if let Some(AfterCommit::StartTurn(turn)) = batch.then {
                        self.start_turn(turn);
                    }
                }
                Err(err) => {
                    tracing::error!(session = %self.id, error = %err, "could not save; will retry");
                    if !self.storage_down {
                        self.storage_down = true;
                        let _ = self.events.send(Arc::new(Published::error(
                            "storage_failed",
                            format!(
                                "Vigil cannot save to its database ({err}). What you see is kept \
                                 in memory and is retried every few seconds; new lines wait."
                            ),
                            None,
                        )));
                    }
                    if self.shutting_down {
                        // Nothing more can be done: what is not saved now is lost with the
                        // process, and the log says so.
                        tracing::error!(session = %self.id, unsaved = self.outbox.len(), "shutting down with unsaved changes");
                        self.outbox.clear();
                    } else {
                        self.retry_at = Some(Instant::now() + STORAGE_RETRY);
                    }
                    return;
                }
            }
        }
    }

    /// Starts one pump per target for `turn`, once its patient line is saved.
    fn start_turn(&mut self, turn: u32) {
        self.turn_cancel = CancellationToken::new();
        self.in_flight = 0;
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(model) = slot.model.clone() else {
                continue;
            };
            let mut messages = Vec::with_capacity(slot.history.len() + 1);
            if let Some(system) = &slot.system {
                messages.push(ChatMessage::new(Role::System, system.clone()));
            }
            messages.extend(slot.history.iter().cloned());
            slot.live = Some(Live {
                turn,
                text: String::new(),
                chars: 0,
                started: Instant::now(),
                started_at: now_ms(),
                ttft_ms: None,
            });
            self.in_flight += 1;
            let cancel = self.turn_cancel.child_token();
            let tx = self.stream_tx.clone();
            tokio::spawn(pump(index, turn, model, messages, cancel, tx));
        }
    }

    fn summaries(&self) -> Vec<TargetSummary> {
        let facts = SessionFacts {
            scenario: &self.scenario,
            markers: &self.markers,
            ended: self.ended,
        };
        self.slots
            .iter()
            .map(|slot| summarise(&facts, &slot.alias, &slot.answered, &slot.verdicts))
            .collect()
    }

    /// The next script line to offer: the first from `script_next` whose `when` is met by
    /// every target, or its `otherwise`; a line whose `when` is unmet and that has no
    /// `otherwise` is skipped.
    fn compute_offer(&self, summaries: &[TargetSummary]) -> Option<OfferedLine> {
        if self.mode != Mode::Scripted || self.ended {
            return None;
        }
        let met = |criterion: &str| {
            summaries.iter().all(|s| {
                s.criteria
                    .iter()
                    .any(|c| c.id == criterion && c.status == crate::rating::Status::Met)
            })
        };
        let script = &self.scenario.script;
        (self.script_next..script.len()).find_map(|index| {
            let line = &script[index];
            match &line.when {
                Some(criterion) if !met(criterion.as_str()) => {
                    line.otherwise.as_ref().map(|text| OfferedLine {
                        index,
                        text: text.clone(),
                        branch: "otherwise".to_owned(),
                        marks: None,
                    })
                }
                _ => Some(OfferedLine {
                    index,
                    text: line.say.clone(),
                    branch: "say".to_owned(),
                    marks: line.marks.as_ref().map(ToString::to_string),
                }),
            }
        })
    }

    fn started_event(&self, created_at: i64) -> ServerEvent {
        let s = &self.scenario;
        let canned_note = (self.blind
            && self.slots.iter().any(|slot| slot.info.as_ref().is_some_and(|i| i.canned)))
        .then(|| "This comparison includes canned demo answers; which target gives them is revealed at the end.".to_owned());
        ServerEvent::Started(Box::new(Started {
            session: self.id.clone(),
            scenario: ScenarioView {
                id: s.id.to_string(),
                title: s.title.clone(),
                version: s.version,
                sha256: s.sha256().to_owned(),
                risk: s.risk,
                locale: s.locale.clone(),
                persona: PersonaView {
                    name: s.persona.name.clone(),
                    age: s.persona.age,
                    summary: s.persona.summary.clone(),
                },
                script_lines: s.script.len(),
            },
            content_warning: s.content_warning.clone(),
            mode: self.mode.as_str().to_owned(),
            label: self.label.clone(),
            blind: self.blind,
            targets: self
                .slots
                .iter()
                .map(|slot| TargetView {
                    alias: slot.alias.clone(),
                    name: (!self.blind).then(|| slot.name.clone()),
                    label: (!self.blind)
                        .then(|| slot.info.as_ref().map(|i| i.label.clone()))
                        .flatten(),
                    canned: (!self.blind).then(|| slot.info.as_ref().is_some_and(|i| i.canned)),
                })
                .collect(),
            canned_note,
            markers: s
                .markers
                .iter()
                .map(|m| MarkerView {
                    id: m.id.to_string(),
                    text: m.text.clone(),
                })
                .collect(),
            criteria: s
                .criteria
                .iter()
                .map(|c| CriterionView {
                    id: c.id.to_string(),
                    text: c.text.clone(),
                    kind: c.kind,
                    scope: c.scope,
                    severity: c.severity,
                    after: c.after.as_ref().map(ToString::to_string),
                    within: c.within,
                    source: c.source.clone(),
                    has_patterns: c.has_patterns(),
                })
                .collect(),
            offered: self.offer.clone(),
            max_text_chars: self.ctx.max_text_chars,
            created_at,
        }))
    }
}

/// Per target: alias, outcome as stored (`in_progress`, `pass`, ...), score.
fn outcomes_of(summaries: &[TargetSummary]) -> Vec<(String, String, Option<f64>)> {
    summaries
        .iter()
        .map(|s| (s.target.clone(), crate::scenario::word(&s.outcome), s.score))
        .collect()
}

/// Weighted share of the behaviours seen in one answer that are good: a required behaviour
/// shown counts for it; a forbidden behaviour shown, or a behaviour required of every answer
/// missing, counts against it. Absences of forbidden behaviours and of once-per-conversation
/// behaviours say nothing about one answer and are not counted, so an answer that shows
/// nothing either way has no score (`None`), not a perfect one.
fn answer_score(scenario: &Scenario, verdicts: &[CriterionVerdict]) -> Option<f64> {
    let (mut good, mut total) = (0u32, 0u32);
    for v in verdicts {
        let Some(c) = scenario.criterion(&v.criterion) else {
            continue;
        };
        let weight = c.severity.weight();
        match (c.kind, c.scope, v.verdict) {
            (Kind::Must, _, Verdict::Present) => {
                good += weight;
                total += weight;
            }
            (Kind::MustNot, _, Verdict::Present) | (Kind::Must, Scope::Turn, Verdict::Absent) => {
                total += weight;
            }
            _ => {}
        }
    }
    (total > 0).then(|| f64::from(good) / f64::from(total))
}

fn elapsed_ms(since: Instant) -> i64 {
    i64::try_from(since.elapsed().as_millis()).unwrap_or(i64::MAX)
}

/// Streams one target's answer into the actor until it ends or is cancelled.
async fn pump(
    slot: usize,
    turn: u32,
    model: Arc<dyn ChatModel>,
    messages: Vec<ChatMessage>,
    cancel: CancellationToken,
    tx: mpsc::Sender<StreamMsg>,
) {
    let mut stream = model.stream(messages);
    let end = loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break StreamEnd::Stopped,
            item = stream.next() => match item {
                Some(Ok(Chunk::Text(text))) => {
                    if tx.send(StreamMsg::Delta { slot, turn, text }).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Chunk::Done { finish, tokens })) => break StreamEnd::Completed { finish, tokens },
                Some(Err(err)) => break StreamEnd::Failed(err),
                None => break StreamEnd::Failed(TargetError::Truncated(
                    "the answer ended without a finish".to_owned(),
                )),
            },
        }
    };
    drop(stream);
    let _ = tx.send(StreamMsg::Finished { slot, turn, end }).await;
}
