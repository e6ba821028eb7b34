//! A session's state and every change to it, pure: no store, no tokio, no channels. Each
//! command ([`SessionState::apply`]) and each finished answer ([`SessionState::answer_finished`])
//! is a transition that updates the state and returns what it produces: the rows to write and
//! the durable events to publish once they are written (a [`Batch`]), the answers to start
//! after the commit, whether to stop the answers streaming now, and when to answer the client.
//! The actor (`actor.rs`) runs those effects; tests run the transitions without a database.
//!
//! Which command is accepted in which phase is decided by one table ([`super::phase`]) before
//! any command-specific check.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use super::command::{Command, Principal, Request};
use super::event::{
    AnswerEvent, EndSummary, EndedTarget, ErrorEvent, ErrorInfo, OfferedLine, Published,
    RatingEvent, ServerEvent,
};
use super::phase::{Phase, Storage, admit};
use super::{AnswerFault, Mode, RateInput, SessionError, view};
use crate::rating::status::{SessionFacts, applies_at, summarise};
use crate::rating::{
    CriterionVerdict, DEFAULT_DIMENSIONS, MAX_SCORE, MIN_SCORE, Rating, RuleSet, TargetSummary,
    Verdict, Verdicts,
};
use crate::scenario::{Kind, Scenario, Scope};
use crate::store::{AnswerDetails, AnswerRow, PreferenceRow, WriteOp};
use crate::target::{ChatMessage, Role, TargetError, Usage};

/// Longest note or rewrite a human rating may carry.
pub const MAX_NOTE_CHARS: usize = 10_000;
const MAX_FLAGS: usize = 20;
const MAX_FLAG_CHARS: usize = 64;

/// One target of the session, as the session knows it.
#[derive(Debug, Clone)]
pub struct SessionTarget {
    pub alias: String,
    pub name: String,
    /// Shown next to the name once names are revealed.
    pub label: String,
    /// Canned demo answers, not a model.
    pub canned: bool,
    /// Why this target cannot answer (no longer configured on this server), if it cannot.
    pub unavailable: Option<String>,
    pub system: Option<String>,
    /// The latest answer to each turn.
    answers: BTreeMap<u32, AnswerState>,
    ratings: Vec<Rating>,
    /// The verdicts that count, kept up to date as ratings arrive.
    verdicts: Verdicts,
    /// The answer being generated: (turn, attempt).
    answering: Option<(u32, u32)>,
    /// The context the history is fitted to, when the target declares one or its server
    /// reported an overflow.
    context: Option<ContextFit>,
    /// Estimated tokens of the latest request (see [`estimate_tokens`]).
    sent_tokens: u32,
}

/// A target's context budget: `limit` tokens in all, `reserve` of them left for the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextFit {
    pub limit: u32,
    pub reserve: u32,
}

impl ContextFit {
    /// The budget of a target with this context length and answer limit: the answer's
    /// `max_tokens` is reserved, or a quarter of the context (at most 1,024) without one.
    pub fn new(limit: u32, max_tokens: Option<u32>) -> Self {
        Self {
            limit,
            reserve: max_tokens.unwrap_or((limit / 4).min(1024)).min(limit / 2),
        }
    }

    fn budget(self) -> u32 {
        self.limit.saturating_sub(self.reserve)
    }
}

/// Tokens a message is taken to cost when fitting a history: a byte in three plus four per
/// message. No tokenizer of the target is at hand; this overestimates English text (about four
/// characters a token) and most other scripts, so a fitted history stays under the limit.
pub fn estimate_tokens(messages: &[ChatMessage]) -> u32 {
    let total: usize = messages
        .iter()
        .map(|m| m.content.len().div_ceil(3) + 4)
        .sum();
    u32::try_from(total).unwrap_or(u32::MAX)
}

#[derive(Debug, Clone)]
struct AnswerState {
    attempt: u32,
    text: Arc<str>,
}

impl SessionTarget {
    pub fn new(
        alias: String,
        name: String,
        label: String,
        canned: bool,
        unavailable: Option<String>,
        system: Option<String>,
    ) -> Self {
        Self {
            alias,
            name,
            label,
            canned,
            unavailable,
            system,
            answers: BTreeMap::new(),
            ratings: Vec::new(),
            verdicts: Verdicts::default(),
            answering: None,
            context: None,
            sent_tokens: 0,
        }
    }

    /// A context overflow reported by the server: the limit it named from now on, or, when it
    /// named none, four fifths of what was just sent (less again at each overflow), so the
    /// next request (a `regenerate`, the next turn) leaves out the oldest turns.
    fn learn_context(&mut self, named: Option<u32>) {
        let current = self.context;
        // A limit the server named is news only if it is below the one in use; otherwise what
        // was sent (with the room kept for the answer) was too much: take four fifths of it.
        let limit = match named {
            Some(limit) if current.is_none_or(|c| limit < c.limit) => limit,
            _ => {
                let sent = self
                    .sent_tokens
                    .saturating_add(current.map_or(0, |c| c.reserve));
                sent / 5 * 4
            }
        };
        // The room for the answer stays what the target declared, within half the new limit.
        let reserve = current
            .map_or(ContextFit::new(limit, None).reserve, |c| c.reserve)
            .min(limit / 2);
        self.context = Some(ContextFit { limit, reserve });
    }

    /// Fits every request to this context.
    pub fn with_context(mut self, context: Option<ContextFit>) -> Self {
        self.context = context;
        self
    }

    fn answered(&self) -> BTreeSet<u32> {
        self.answers.keys().copied().collect()
    }
}

#[derive(Debug, Clone)]
struct PatientTurn {
    text: Arc<str>,
}

/// A marker that is set (not taken back).
#[derive(Debug, Clone)]
struct MarkerSet {
    id: String,
    marker: String,
    turn: u32,
}

/// Rows to commit and the durable events to publish once they are committed.
#[derive(Debug, Default)]
pub struct Batch {
    pub ops: Vec<WriteOp>,
    pub events: Vec<Arc<Published>>,
    /// The `seq` of the last event of this batch (or before it): a client's `ack` follows it.
    pub through_seq: u64,
}

/// An answer to start once the batch that asked for it is committed.
#[derive(Debug, Clone)]
pub struct AnswerJob {
    /// Index of the target in the session.
    pub target: usize,
    pub turn: u32,
    pub attempt: u32,
    pub messages: Vec<ChatMessage>,
    /// Earlier patient lines left out to fit the target's context.
    pub dropped_turns: u32,
}

/// When the client that sent a command gets its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyAt {
    /// Nothing to save: at once.
    Now(Applied),
    /// Once the batch is committed.
    AfterCommit,
    /// Once the session's end is saved (an `end` while answers are being stopped).
    AtEnd,
}

/// Whether a command changed the session now or had been applied before (same id), and the
/// `seq` of the last event it produced, so a client's `ack` can follow its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Now { through_seq: u64 },
    Before { through_seq: u64 },
}

/// What a transition produces.
#[derive(Debug)]
pub struct Transition {
    pub batch: Batch,
    /// Answers to start after the commit.
    pub start: Vec<AnswerJob>,
    /// Stop the answers being generated, now.
    pub cancel: bool,
    pub reply: ReplyAt,
    /// This batch completes the session's end: replies waiting for it go with it.
    pub ends: bool,
    /// Answers for the judge, once the batch is saved.
    pub judge: Vec<crate::rating::judge::Job>,
}

impl Transition {
    fn new(batch: Batch, reply: ReplyAt) -> Self {
        Self {
            batch,
            start: Vec::new(),
            cancel: false,
            reply,
            ends: false,
            judge: Vec::new(),
        }
    }
}

/// How an answer's stream ended.
#[derive(Debug, Clone)]
pub enum StreamEnd {
    Completed {
        finish: String,
        usage: Usage,
    },
    /// Stopped by `stop` or `end`.
    Stopped,
    /// Stopped because the server is shutting down.
    Interrupted,
    /// Cut at the target's longest answer, this many characters.
    TooLong(usize),
    Failed(TargetError),
}

/// A finished answer, as the stream produced it.
#[derive(Debug, Clone)]
pub struct FinishedAnswer {
    pub target: usize,
    pub turn: u32,
    pub attempt: u32,
    pub text: String,
    pub ttft_ms: Option<i64>,
    pub duration_ms: i64,
    pub started_at: i64,
    pub end: StreamEnd,
    /// Waiting for the endpoint before the request went out (not part of `ttft_ms`).
    pub queue_ms: Option<i64>,
    pub reasoning: String,
    /// What came in the model's `refusal` field (also part of `text`).
    pub refusal: String,
    pub dropped_turns: u32,
}

/// A new session's settings.
#[derive(Debug)]
pub struct NewSession {
    pub id: String,
    pub scenario: Arc<Scenario>,
    pub rules: Arc<RuleSet>,
    pub mode: Mode,
    pub label: Option<String>,
    pub blind: bool,
    pub targets: Vec<SessionTarget>,
    pub created_at: i64,
    pub max_text_chars: usize,
}

#[derive(Debug)]
pub struct SessionState {
    id: String,
    scenario: Arc<Scenario>,
    rules: Arc<RuleSet>,
    mode: Mode,
    label: Option<String>,
    blind: bool,
    created_at: i64,
    max_text_chars: usize,
    phase: Phase,
    storage: Storage,
    targets: Vec<SessionTarget>,
    turns: Vec<PatientTurn>,
    markers: Vec<MarkerSet>,
    script_next: usize,
    offer: Option<OfferedLine>,
    applied: HashSet<String>,
    next_seq: u64,
    /// Ids of `end` messages waiting for the end to be saved.
    ending_ids: Vec<Option<String>>,
    /// The per-target outcomes last queued for the database (written only when they change).
    saved_outcomes: Vec<(String, String, Option<f64>)>,
    ended_at: Option<i64>,
    /// What the last `ended` event said, to send it again when a later rating changes it.
    ended_said: Vec<(String, String, Option<f64>, u32, u32)>,
    /// The judge's rater name, when answers go to a judge.
    judge: Option<String>,
}

impl SessionState {
    pub fn new(new: NewSession) -> Self {
        Self {
            id: new.id,
            scenario: new.scenario,
            rules: new.rules,
            mode: new.mode,
            label: new.label,
            blind: new.blind,
            created_at: new.created_at,
            max_text_chars: new.max_text_chars,
            phase: Phase::Open,
            storage: Storage::Ok,
            targets: new.targets,
            turns: Vec::new(),
            markers: Vec::new(),
            script_next: 0,
            offer: None,
            applied: HashSet::new(),
            next_seq: 1,
            ending_ids: Vec::new(),
            saved_outcomes: Vec::new(),
            ended_at: None,
            ended_said: Vec::new(),
            judge: None,
        }
    }

    /// A brand-new session's first batch: its `started` and `criteria` events.
    pub fn start(&mut self) -> Batch {
        let summaries = self.summaries();
        self.offer = self.compute_offer(&summaries);
        let mut batch = Batch::default();
        let started = view::started(self);
        self.durable(&mut batch, started);
        self.criteria_update(&mut batch);
        batch
    }

    // ------------------------------------------------------------------ reading

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn scenario(&self) -> &Arc<Scenario> {
        &self.scenario
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn label(&self) -> Option<&str> {
        self.label.as_deref()
    }

    pub fn blind(&self) -> bool {
        self.blind
    }

    pub fn created_at(&self) -> i64 {
        self.created_at
    }

    pub fn max_text_chars(&self) -> usize {
        self.max_text_chars
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn targets(&self) -> &[SessionTarget] {
        &self.targets
    }

    pub fn offer(&self) -> Option<&OfferedLine> {
        self.offer.as_ref()
    }

    pub fn ended_at(&self) -> Option<i64> {
        self.ended_at
    }

    /// Target names may be shown (not blind, or the session has ended).
    pub fn names_revealed(&self) -> bool {
        !self.blind || self.phase == Phase::Ended
    }

    /// The `seq` of the latest durable event.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Patient lines so far.
    pub fn turns(&self) -> usize {
        self.turns.len()
    }

    /// Answers are being generated.
    pub fn answering(&self) -> bool {
        self.targets.iter().any(|t| t.answering.is_some())
    }

    /// First turn at which each marker is set.
    pub fn marker_turns(&self) -> BTreeMap<String, u32> {
        let mut turns = BTreeMap::new();
        for m in &self.markers {
            let first = turns.entry(m.marker.clone()).or_insert(m.turn);
            *first = (*first).min(m.turn);
        }
        turns
    }

    /// The status of every criterion for every target.
    pub fn summaries(&self) -> Vec<TargetSummary> {
        let markers = self.marker_turns();
        let facts = SessionFacts {
            scenario: &self.scenario,
            markers: &markers,
            ended: self.phase == Phase::Ended,
        };
        self.targets
            .iter()
            .map(|t| summarise(&facts, &t.alias, &t.answered(), &t.verdicts))
            .collect()
    }

    /// Every target's summary with its name revealed, as the `ended` event says it.
    pub fn end_summary(&self, changed_at: i64) -> EndSummary {
        let targets = self
            .targets
            .iter()
            .zip(self.summaries())
            .map(|(t, summary)| EndedTarget {
                alias: t.alias.clone(),
                name: t.name.clone(),
                label: t.label.clone(),
                canned: t.canned,
                outcome: summary.outcome,
                score: summary.score,
                decided: summary.decided,
                undecided: summary.undecided,
                headline: summary.headline,
                counts: summary.counts,
            })
            .collect();
        EndSummary {
            session: self.id.clone(),
            turns: self.turns.len() as u32,
            ended_at: self.ended_at.unwrap_or(changed_at),
            changed_at,
            targets,
        }
    }

    // ------------------------------------------------------------------ rebuilding

    /// Restores the facts recorded in the database (used by `replay` only).
    pub(super) fn restore_turn(&mut self, text: &str, script_index: Option<u32>) {
        self.turns.push(PatientTurn {
            text: Arc::from(text),
        });
        if let Some(index) = script_index {
            self.script_next = self.script_next.max(index as usize + 1);
        }
    }

    pub(super) fn restore_marker(&mut self, id: &str, marker: &str, turn: u32) {
        self.markers.push(MarkerSet {
            id: id.to_owned(),
            marker: marker.to_owned(),
            turn,
        });
    }

    pub(super) fn restore_answer(&mut self, alias: &str, turn: u32, attempt: u32, text: &str) {
        if let Some(t) = self.targets.iter_mut().find(|t| t.alias == alias) {
            let newer = t.answers.get(&turn).is_none_or(|a| a.attempt <= attempt);
            if newer {
                t.answers.insert(
                    turn,
                    AnswerState {
                        attempt,
                        text: Arc::from(text),
                    },
                );
            }
        }
    }

    /// The stored ratings (oldest first), kept as [`remember`] keeps new ones.
    pub(super) fn restore_ratings(&mut self, ratings: &[Rating]) {
        for t in &mut self.targets {
            t.ratings.clear();
            for rating in ratings.iter().filter(|r| r.target == t.alias) {
                remember(&mut t.ratings, rating.clone());
            }
            t.verdicts = Verdicts::from_ratings(&t.ratings);
        }
    }

    pub(super) fn restore_end(&mut self, ended_at: Option<i64>, ended: bool) {
        if ended {
            self.phase = Phase::Ended;
            self.ended_at = ended_at;
            self.ended_said = ended_key(&self.end_summary(ended_at.unwrap_or_default()));
        }
    }

    pub(super) fn restore_log(&mut self, applied: Vec<String>, next_seq: u64) {
        self.applied = applied.into_iter().collect();
        self.next_seq = next_seq;
        let summaries = self.summaries();
        self.saved_outcomes = outcomes_of(&summaries);
        self.offer = self.compute_offer(&summaries);
    }

    /// After a restart: the answers that were being generated when the server stopped are
    /// recorded as interrupted (`pending` lists the regenerated answers that never finished,
    /// as (alias, turn, attempt)).
    pub fn record_interrupted(
        &mut self,
        now: i64,
        pending: &[(String, u32, u32)],
    ) -> Option<Batch> {
        if self.phase == Phase::Ended {
            return None;
        }
        let turn = self.turns.len() as u32;
        let mut missing: Vec<(usize, u32, u32)> = Vec::new();
        for (index, t) in self.targets.iter().enumerate() {
            if turn > 0 && !t.answers.contains_key(&turn) {
                missing.push((index, turn, 1));
            }
        }
        for (alias, turn, attempt) in pending {
            if let Some(index) = self.targets.iter().position(|t| &t.alias == alias)
                && self.targets[index]
                    .answers
                    .get(turn)
                    .is_none_or(|a| a.attempt < *attempt)
                && !missing.iter().any(|m| m.0 == index)
            {
                missing.push((index, *turn, *attempt));
            }
        }
        if missing.is_empty() {
            return None;
        }
        let mut batch = Batch::default();
        for (index, turn, attempt) in missing {
            let answer = AnswerRow {
                turn,
                attempt,
                target: self.targets[index].alias.clone(),
                text: String::new(),
                finish: "interrupted".to_owned(),
                error_code: Some(AnswerFault::AnswerInterrupted.code().to_owned()),
                error_message: Some(
                    "The server stopped before this answer was complete. The patient line is \
                     saved; send the next line to go on."
                        .to_owned(),
                ),
                ttft_ms: None,
                duration_ms: 0,
                tokens: None,
                started_at: now,
                completed_at: now,
                details: AnswerDetails::default(),
            };
            self.record_answer(&mut batch, index, answer, false, now);
        }
        let summaries = self.criteria_update(&mut batch);
        if self.mode == Mode::Scripted {
            self.offer = self.compute_offer(&summaries);
            let offered = ServerEvent::Offered {
                line: self.offer.clone(),
            };
            self.durable(&mut batch, offered);
        }
        Some(batch)
    }

    // ------------------------------------------------------------------ the database's health

    pub fn set_storage(&mut self, storage: Storage) {
        self.storage = storage;
    }

    pub fn storage(&self) -> Storage {
        self.storage
    }

    // ------------------------------------------------------------------ commands

    /// Applies a client's command, or says why not.
    pub fn apply(&mut self, request: Request, now: i64) -> Result<Transition, SessionError> {
        // Replies that follow no new event need not wait for any.
        let through_seq = 0;
        if let Some(id) = &request.id
            && self.applied.contains(id)
        {
            return Ok(Transition::new(
                Batch {
                    through_seq,
                    ..Batch::default()
                },
                ReplyAt::Now(Applied::Before { through_seq }),
            ));
        }
        let kind = request.command.kind();
        if !admit(kind, self.phase, self.storage)? {
            return Ok(Transition::new(
                Batch {
                    through_seq,
                    ..Batch::default()
                },
                ReplyAt::Now(Applied::Before { through_seq }),
            ));
        }
        let Request {
            id,
            principal,
            command,
        } = request;
        let mut transition = match command {
            Command::Say { text } => self.say(text, "human", now)?,
            Command::Next => {
                if self.mode != Mode::Scripted {
                    return Err(SessionError::NotScripted);
                }
                let text = self
                    .offer
                    .as_ref()
                    .map(|o| o.text.clone())
                    .ok_or(SessionError::ScriptFinished)?;
                self.say(text, "script", now)?
            }
            Command::Mark { marker, turn } => self.mark(&marker, turn, &principal, now)?,
            Command::Unmark { marker, turn } => self.unmark(&marker, turn, &principal, now)?,
            Command::Rate(input) => self.rate(input, &principal, now)?,
            Command::Prefer { turn, target } => self.prefer(turn, target, &principal, now)?,
            Command::Stop => {
                let mut t = Transition::new(
                    Batch {
                        through_seq,
                        ..Batch::default()
                    },
                    ReplyAt::Now(Applied::Now { through_seq }),
                );
                t.cancel = true;
                return Ok(t);
            }
            Command::Regenerate { turn, target } => self.regenerate(turn, &target, now)?,
            Command::End => return Ok(self.end(id, now)),
        };
        self.applied_op(&mut transition.batch, id, now);
        transition.batch.through_seq = self.last_seq();
        Ok(transition)
    }

    fn say(&mut self, text: String, source: &str, now: i64) -> Result<Transition, SessionError> {
        let text = text.trim().to_owned();
        if text.is_empty() {
            return Err(SessionError::TextEmpty);
        }
        let chars = text.chars().count();
        if chars > self.max_text_chars {
            return Err(SessionError::TextTooLong {
                what: "the line",
                chars,
                max: self.max_text_chars,
            });
        }
        if let Some(t) = self.targets.iter().find(|t| t.unavailable.is_some()) {
            return Err(SessionError::TargetUnavailable(format!(
                "target {} (`{}`) is no longer configured on this server; this session can be \
                 viewed and ended, not continued",
                t.alias, t.name
            )));
        }
        let turn = self.turns.len() as u32 + 1;
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
        self.turns.push(PatientTurn {
            text: Arc::from(text.as_str()),
        });
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
            self.set_marker(&mut batch, marker, turn, "script", now);
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
        let start: Vec<AnswerJob> = (0..self.targets.len())
            .map(|index| self.answer_job(index, turn, 1))
            .collect();
        self.phase = Phase::Streaming;
        let mut transition = Transition::new(batch, ReplyAt::AfterCommit);
        transition.start = start;
        Ok(transition)
    }

    /// Marks the target as answering `turn` and builds its request: its system prompt, then
    /// every patient line with its latest answer, up to `turn`.
    ///
    /// Roles always alternate (user, assistant, user, ..., user), as the chat templates of
    /// many models require: an answer is sent as the patient saw it (a stopped or cut-off one
    /// with the text it had), and the patient lines of turns with no answer text (it failed
    /// before a word) are sent together with the next line, as one message, blank-line apart.
    /// The history is then fitted to the target's context (see [`fit`]).
    fn answer_job(&mut self, index: usize, turn: u32, attempt: u32) -> AnswerJob {
        let target = &mut self.targets[index];
        target.answering = Some((turn, attempt));
        let mut messages = Vec::with_capacity(self.turns.len() * 2 + 1);
        if let Some(system) = &target.system {
            messages.push(ChatMessage::new(Role::System, system.as_str()));
        }
        let mut unanswered: Vec<&Arc<str>> = Vec::new();
        // Patient lines in each message, for what fitting the context leaves out.
        let mut lines = vec![0u32; messages.len()];
        for (i, line) in self.turns.iter().enumerate().take(turn as usize) {
            let number = i as u32 + 1;
            unanswered.push(&line.text);
            if number < turn
                && let Some(answer) = target.answers.get(&number)
                && !answer.text.is_empty()
            {
                lines.extend([unanswered.len() as u32, 0]);
                messages.push(user_message(&mut unanswered));
                messages.push(ChatMessage::new(Role::Assistant, Arc::clone(&answer.text)));
            }
        }
        messages.push(user_message(&mut unanswered));
        let (dropped_turns, sent_tokens) = fit(&mut messages, &lines, target.context);
        target.sent_tokens = sent_tokens;
        AnswerJob {
            target: index,
            turn,
            attempt,
            messages,
            dropped_turns,
        }
    }

    fn check_turn(&self, turn: Option<u32>) -> Result<u32, SessionError> {
        let latest = self.turns.len() as u32;
        let turn = turn.unwrap_or(latest);
        if turn == 0 || turn > latest {
            return Err(SessionError::UnknownTurn(if latest == 0 {
                "a marker belongs to a patient line; send one first".to_owned()
            } else {
                format!("there is no turn {turn} (turns 1 to {latest})")
            }));
        }
        Ok(turn)
    }

    fn check_marker(&self, marker: &str) -> Result<(), SessionError> {
        if self.scenario.marker(marker).is_none() {
            let known: Vec<&str> = self
                .scenario
                .markers
                .iter()
                .map(|m| m.id.as_str())
                .collect();
            return Err(SessionError::UnknownMarker {
                marker: marker.to_owned(),
                known: known.join(", "),
            });
        }
        Ok(())
    }

    fn mark(
        &mut self,
        marker: &str,
        turn: Option<u32>,
        principal: &Principal,
        now: i64,
    ) -> Result<Transition, SessionError> {
        self.check_marker(marker)?;
        let turn = self.check_turn(turn)?;
        let mut batch = Batch::default();
        if !self
            .markers
            .iter()
            .any(|m| m.marker == marker && m.turn == turn)
        {
            self.set_marker(&mut batch, marker, turn, &principal.to_string(), now);
        }
        self.durable(
            &mut batch,
            ServerEvent::Marked {
                turn,
                marker: marker.to_owned(),
                source: principal.to_string(),
            },
        );
        self.after_rating_change(&mut batch, now);
        Ok(Transition::new(batch, ReplyAt::AfterCommit))
    }

    /// Records a marker set at `turn` by `source` (`script`, or a principal).
    fn set_marker(&mut self, batch: &mut Batch, marker: &str, turn: u32, source: &str, now: i64) {
        let id = uuid::Uuid::new_v4().to_string();
        self.markers.push(MarkerSet {
            id: id.clone(),
            marker: marker.to_owned(),
            turn,
        });
        batch.ops.push(WriteOp::Marker {
            id,
            session_id: self.id.clone(),
            marker: marker.to_owned(),
            turn,
            source: source.to_owned(),
            created_at: now,
        });
    }

    fn unmark(
        &mut self,
        marker: &str,
        turn: Option<u32>,
        principal: &Principal,
        now: i64,
    ) -> Result<Transition, SessionError> {
        self.check_marker(marker)?;
        let position = self
            .markers
            .iter()
            .enumerate()
            .filter(|(_, m)| m.marker == marker && turn.is_none_or(|t| m.turn == t))
            .max_by_key(|(_, m)| m.turn)
            .map(|(i, _)| i)
            .ok_or_else(|| {
                SessionError::MarkerNotSet(match turn {
                    Some(turn) => format!("marker `{marker}` is not set on turn {turn}"),
                    None => format!("marker `{marker}` is not set"),
                })
            })?;
        let removed = self.markers.remove(position);
        let mut batch = Batch::default();
        batch.ops.push(WriteOp::Unmark {
            id: removed.id,
            removed_by: principal.to_string(),
            removed_at: now,
        });
        self.durable(
            &mut batch,
            ServerEvent::Unmarked {
                turn: removed.turn,
                marker: removed.marker,
                source: principal.to_string(),
            },
        );
        self.after_rating_change(&mut batch, now);
        Ok(Transition::new(batch, ReplyAt::AfterCommit))
    }

    /// The finished answer of `target` to `turn` that a rating or preference is about.
    fn answer_index(&self, turn: u32, target: &str) -> Result<usize, SessionError> {
        let index = self
            .targets
            .iter()
            .position(|t| t.alias == target)
            .ok_or_else(|| {
                let aliases: Vec<&str> = self.targets.iter().map(|t| t.alias.as_str()).collect();
                SessionError::UnknownTarget {
                    name: target.to_owned(),
                    available: aliases.join(", "),
                }
            })?;
        if !self.targets[index].answers.contains_key(&turn) {
            return Err(SessionError::UnknownTurn(format!(
                "target {target} has no finished answer to turn {turn}"
            )));
        }
        Ok(index)
    }

    fn rate(
        &mut self,
        input: RateInput,
        principal: &Principal,
        now: i64,
    ) -> Result<Transition, SessionError> {
        let index = self.answer_index(input.turn, &input.target)?;
        validate_rating(&self.scenario, &input)?;
        let attempt = self.targets[index]
            .answers
            .get(&input.turn)
            .map_or(1, |a| a.attempt);
        let rating = Rating {
            id: uuid::Uuid::new_v4().to_string(),
            turn: input.turn,
            target: input.target,
            attempt,
            rater: principal.to_string(),
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
            created_at: now,
            superseded_by: None,
        };
        let mut batch = Batch::default();
        self.add_rating(&mut batch, index, rating, false);
        self.after_rating_change(&mut batch, now);
        Ok(Transition::new(batch, ReplyAt::AfterCommit))
    }

    fn prefer(
        &mut self,
        turn: u32,
        target: String,
        principal: &Principal,
        now: i64,
    ) -> Result<Transition, SessionError> {
        self.answer_index(turn, &target)?;
        let mut batch = Batch::default();
        batch.ops.push(WriteOp::Preference {
            session_id: self.id.clone(),
            preference: PreferenceRow {
                id: uuid::Uuid::new_v4().to_string(),
                turn,
                target: target.clone(),
                rater: principal.to_string(),
                created_at: now,
            },
        });
        self.durable(
            &mut batch,
            ServerEvent::Preferred {
                turn,
                target,
                rater: principal.to_string(),
            },
        );
        Ok(Transition::new(batch, ReplyAt::AfterCommit))
    }

    fn regenerate(
        &mut self,
        turn: u32,
        target: &str,
        _now: i64,
    ) -> Result<Transition, SessionError> {
        let latest = self.turns.len() as u32;
        let index = self.answer_index(turn, target)?;
        if turn != latest {
            return Err(SessionError::UnknownTurn(format!(
                "only the latest turn ({latest}) can be asked again, not turn {turn}"
            )));
        }
        if let Some(reason) = &self.targets[index].unavailable {
            return Err(SessionError::TargetUnavailable(reason.clone()));
        }
        let attempt = self.targets[index]
            .answers
            .get(&turn)
            .map_or(1, |a| a.attempt)
            + 1;
        let mut batch = Batch::default();
        self.durable(
            &mut batch,
            ServerEvent::Regenerating {
                turn,
                target: target.to_owned(),
                attempt,
            },
        );
        let job = self.answer_job(index, turn, attempt);
        self.phase = Phase::Streaming;
        let mut transition = Transition::new(batch, ReplyAt::AfterCommit);
        transition.start = vec![job];
        Ok(transition)
    }

    fn end(&mut self, id: Option<String>, now: i64) -> Transition {
        self.ending_ids.push(id);
        if self.answering() {
            self.phase = Phase::Ending;
            let mut t = Transition::new(Batch::default(), ReplyAt::AtEnd);
            t.cancel = true;
            t.batch.through_seq = self.last_seq();
            return t;
        }
        let mut t = self.finish_end(now);
        t.reply = ReplyAt::AtEnd;
        t
    }

    /// Ends the session: the `end` row, the final statuses and the `ended` event.
    fn finish_end(&mut self, now: i64) -> Transition {
        self.phase = Phase::Ended;
        self.offer = None;
        self.ended_at = Some(now);
        let mut batch = Batch::default();
        batch.ops.push(WriteOp::End {
            session_id: self.id.clone(),
            ended_at: now,
        });
        self.criteria_update(&mut batch);
        let summary = self.end_summary(now);
        self.ended_said = ended_key(&summary);
        self.durable(&mut batch, ServerEvent::Ended(Box::new(summary)));
        for id in std::mem::take(&mut self.ending_ids) {
            self.applied_op(&mut batch, id, now);
        }
        batch.through_seq = self.last_seq();
        let mut t = Transition::new(batch, ReplyAt::AfterCommit);
        t.ends = true;
        t
    }

    // ------------------------------------------------------------------ answers

    /// An answer's stream ended: record it with its rules rating; once every answer is in,
    /// offer the next script line, or finish an end that was waiting.
    pub fn answer_finished(&mut self, finished: FinishedAnswer, now: i64) -> Option<Transition> {
        let index = finished.target;
        let target = self.targets.get_mut(index)?;
        if target.answering != Some((finished.turn, finished.attempt)) {
            return None;
        }
        target.answering = None;
        if let StreamEnd::Failed(TargetError::ContextExceeded { limit, .. }) = &finished.end {
            target.learn_context(*limit);
        }
        let (finish, usage, error) = match finished.end {
            StreamEnd::Completed { finish, usage } => (finish, usage, None),
            StreamEnd::Interrupted => (
                "interrupted".to_owned(),
                Usage::default(),
                Some(ErrorInfo {
                    code: AnswerFault::AnswerInterrupted.code().to_owned(),
                    message: "The server was shutting down; the answer so far is kept.".to_owned(),
                }),
            ),
            StreamEnd::Stopped => ("stopped".to_owned(), Usage::default(), None),
            StreamEnd::TooLong(limit) => (
                "truncated".to_owned(),
                Usage::default(),
                Some(ErrorInfo {
                    code: AnswerFault::AnswerTooLong.code().to_owned(),
                    message: format!(
                        "The answer passed this target's limit of {limit} characters; the first \
                         {limit} are kept, and it is rated as cut short."
                    ),
                }),
            ),
            StreamEnd::Failed(err) => {
                let mut message = err.to_string();
                if let TargetError::ContextExceeded { .. } = err {
                    message.push_str(
                        ". From now on the oldest turns are left out for this target: ask for \
                         this answer again, or go on.",
                    );
                }
                (
                    "error".to_owned(),
                    Usage::default(),
                    Some(ErrorInfo {
                        code: err.code().to_owned(),
                        message,
                    }),
                )
            }
        };
        let complete = error.is_none() && finish != "stopped" && finish != "length";
        if let Some(err) = &error {
            // Never the answer text: only which target failed and how.
            tracing::warn!(session = %self.id, turn = finished.turn, target = %target.alias, code = %err.code, "target failed");
        }
        let answer = AnswerRow {
            turn: finished.turn,
            attempt: finished.attempt,
            target: target.alias.clone(),
            text: finished.text,
            finish,
            error_code: error.as_ref().map(|e| e.code.clone()),
            error_message: error.as_ref().map(|e| e.message.clone()),
            ttft_ms: finished.ttft_ms,
            duration_ms: finished.duration_ms,
            tokens: usage.completion,
            started_at: finished.started_at,
            completed_at: now,
            details: AnswerDetails {
                prompt_tokens: usage.prompt,
                queue_ms: finished.queue_ms,
                dropped_turns: (finished.dropped_turns > 0).then_some(finished.dropped_turns),
                reasoning: (!finished.reasoning.is_empty()).then_some(finished.reasoning),
                refusal: (!finished.refusal.is_empty()).then_some(finished.refusal),
            },
        };
        let mut batch = Batch::default();
        let judge = self.judge_job(index, &answer, complete);
        self.record_answer(&mut batch, index, answer, complete, now);
        let summaries = self.criteria_update(&mut batch);
        let all_in = !self.answering();
        if all_in && self.phase == Phase::Ending {
            let mut end = self.finish_end(now);
            let mut ops = batch.ops;
            ops.append(&mut end.batch.ops);
            let mut events = batch.events;
            events.append(&mut end.batch.events);
            end.batch.ops = ops;
            end.batch.events = events;
            end.judge.extend(judge);
            return Some(end);
        }
        if all_in && self.phase == Phase::Streaming {
            self.phase = Phase::Open;
            if self.mode == Mode::Scripted {
                self.offer = self.compute_offer(&summaries);
                let offered = ServerEvent::Offered {
                    line: self.offer.clone(),
                };
                self.durable(&mut batch, offered);
            }
        }
        batch.through_seq = self.last_seq();
        let mut transition = Transition::new(batch, ReplyAt::AfterCommit);
        transition.judge.extend(judge);
        Some(transition)
    }

    /// Answers go to this judge from now on (`None`: no judge).
    pub fn set_judge(&mut self, rater: Option<String>) {
        self.judge = rater;
    }

    /// What the judge is asked about an answer: the criteria with a judge question that apply
    /// at its turn, the conversation before it, the risk and locale; never the target's name.
    /// `None` without a judge, for an answer with no text, or with nothing to ask.
    fn judge_job(
        &self,
        index: usize,
        answer: &AnswerRow,
        complete: bool,
    ) -> Option<crate::rating::judge::Job> {
        use crate::rating::judge::{Context, Job, Line, Question};
        self.judge.as_ref()?;
        if answer.text.trim().is_empty() {
            return None;
        }
        let markers = self.marker_turns();
        let scenario = &self.scenario;
        let criteria: Vec<Question> = scenario
            .criteria
            .iter()
            .filter(|c| applies_at(scenario, c, &markers, answer.turn))
            .filter_map(|c| {
                Some(Question {
                    id: c.id.to_string(),
                    text: c.text.clone(),
                    source: c.source.clone().unwrap_or_default(),
                    question: c.check.judge.clone()?,
                })
            })
            .collect();
        if criteria.is_empty() {
            return None;
        }
        let target = &self.targets[index];
        let mut conversation = Vec::new();
        for (i, line) in self.turns.iter().enumerate().take(answer.turn as usize) {
            let number = i as u32 + 1;
            conversation.push(Line {
                role: "patient",
                text: line.text.to_string(),
            });
            if number < answer.turn
                && let Some(earlier) = target.answers.get(&number)
            {
                conversation.push(Line {
                    role: "assistant",
                    text: earlier.text.to_string(),
                });
            }
        }
        Some(Job {
            target: index,
            turn: answer.turn,
            attempt: answer.attempt,
            complete,
            context: Context {
                risk: format!("{:?}", scenario.risk).to_lowercase(),
                locale: scenario.locale.clone(),
                conversation,
                answer: answer.text.clone(),
                criteria,
            },
        })
    }

    /// The judge's verdicts on an answer, recorded as its rating (they count over the rules',
    /// under a person's).
    pub fn judged(
        &mut self,
        outcome: crate::rating::judge::Outcome,
        now: i64,
    ) -> Option<Transition> {
        let rater = self.judge.clone()?;
        let job = outcome.job;
        let alias = self.targets.get(job.target)?.alias.clone();
        let mut verdicts = outcome.verdicts;
        if !job.complete {
            // As for the rules: a required behaviour missing from an answer cut short may have
            // come later; what it did say counts all the same.
            for v in &mut verdicts {
                let must = self
                    .scenario
                    .criterion(&v.criterion)
                    .is_some_and(|c| c.kind == Kind::Must);
                if must && v.verdict == Verdict::Absent {
                    v.verdict = Verdict::Unsure;
                    if let Some(evidence) = &mut v.evidence {
                        evidence.reason = Some(format!(
                            "the answer was cut short; the judge: {}",
                            evidence.reason.as_deref().unwrap_or("absent")
                        ));
                    }
                }
            }
        }
        let rating = automatic_rating(job.turn, alias, job.attempt, rater, verdicts, now);
        let mut batch = Batch::default();
        self.add_rating(&mut batch, job.target, rating, false);
        self.after_rating_change(&mut batch, now);
        batch.through_seq = self.last_seq();
        Some(Transition::new(batch, ReplyAt::AfterCommit))
    }

    /// Queues an answer row, its `answer` (and `error`) events and its rules rating.
    fn record_answer(
        &mut self,
        batch: &mut Batch,
        index: usize,
        answer: AnswerRow,
        complete: bool,
        now: i64,
    ) {
        let rating = automatic_rating(
            answer.turn,
            answer.target.clone(),
            answer.attempt,
            Principal::Rules.to_string(),
            self.rules.rate(&answer.text, complete),
            now,
        );
        self.targets[index].answers.insert(
            answer.turn,
            AnswerState {
                attempt: answer.attempt,
                text: Arc::from(answer.text.as_str()),
            },
        );
        let event = AnswerEvent {
            turn: answer.turn,
            target: answer.target.clone(),
            attempt: answer.attempt,
            text: answer.text.clone(),
            ttft_ms: answer.ttft_ms,
            duration_ms: answer.duration_ms,
            finish: answer.finish.clone(),
            tokens: answer.tokens,
            details: answer.details.clone(),
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
    fn add_rating(&mut self, batch: &mut Batch, index: usize, rating: Rating, rules: bool) {
        let markers = self.marker_turns();
        let target = &mut self.targets[index];
        let scenario = &self.scenario;
        let verdicts: Vec<CriterionVerdict> = rating
            .verdicts
            .iter()
            .filter(|v| {
                !rules
                    || scenario
                        .criterion(&v.criterion)
                        .is_some_and(|c| applies_at(scenario, c, &markers, rating.turn))
            })
            .cloned()
            .collect();
        // For the rules' rating: the criteria that apply at this turn which only a judge or a
        // human can rate, so a page can ask for them.
        let awaiting = if rules {
            scenario
                .criteria
                .iter()
                .filter(|c| !c.has_patterns() && applies_at(scenario, c, &markers, rating.turn))
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
            attempt: rating.attempt,
            rater: rating.rater.clone(),
            score: answer_score(scenario, &verdicts),
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
        let turn = rating.turn;
        remember(&mut target.ratings, rating);
        target.verdicts.update_turn(turn, &target.ratings);
        self.durable(batch, ServerEvent::Rating(Box::new(event)));
    }

    /// After a rating or a marker: new statuses; between turns in scripted mode, a new offer
    /// if the line's `when` changed; after the end, a new `ended` if the summary changed.
    fn after_rating_change(&mut self, batch: &mut Batch, now: i64) {
        let summaries = self.criteria_update(batch);
        if self.mode == Mode::Scripted && self.phase == Phase::Open {
            let offer = self.compute_offer(&summaries);
            if offer != self.offer {
                self.offer.clone_from(&offer);
                self.durable(batch, ServerEvent::Offered { line: offer });
            }
        }
        if self.phase == Phase::Ended {
            let summary = self.end_summary(now);
            let key = ended_key(&summary);
            if key != self.ended_said {
                self.ended_said = key;
                self.durable(batch, ServerEvent::Ended(Box::new(summary)));
            }
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
                updated_at: crate::time::now_ms(),
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

    fn applied_op(&mut self, batch: &mut Batch, id: Option<String>, now: i64) {
        if let Some(id) = id {
            self.applied.insert(id.clone());
            batch.ops.push(WriteOp::Applied {
                session_id: self.id.clone(),
                message_id: id,
                created_at: now,
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
            created_at: crate::time::now_ms(),
        });
        batch.events.push(published);
        batch.through_seq = seq;
    }

    /// The next script line to offer: the first from `script_next` whose `when` is met by
    /// every target, or its `otherwise`; a line whose `when` is unmet and that has no
    /// `otherwise` is skipped.
    fn compute_offer(&self, summaries: &[TargetSummary]) -> Option<OfferedLine> {
        if self.mode != Mode::Scripted || self.phase == Phase::Ended {
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
}

/// What an `ended` event says per target, to tell whether a later rating changed it.
fn ended_key(summary: &EndSummary) -> Vec<(String, String, Option<f64>, u32, u32)> {
    summary
        .targets
        .iter()
        .map(|t| {
            (
                t.alias.clone(),
                crate::scenario::word(&t.outcome),
                t.score,
                t.decided,
                t.undecided,
            )
        })
        .collect()
}

/// Per target: alias, outcome as stored (`in_progress`, `pass`, ...), score.
fn outcomes_of(summaries: &[TargetSummary]) -> Vec<(String, String, Option<f64>)> {
    summaries
        .iter()
        .map(|s| (s.target.clone(), crate::scenario::word(&s.outcome), s.score))
        .collect()
}

/// Checks a human rating: known criteria, dimensions and bounds, sizes, not empty.
fn validate_rating(scenario: &Scenario, input: &RateInput) -> Result<(), SessionError> {
    for criterion in input.criteria.keys() {
        if scenario.criterion(criterion).is_none() {
            return Err(SessionError::UnknownCriterion(criterion.clone()));
        }
    }
    for (dimension, value) in &input.scores {
        if !DEFAULT_DIMENSIONS.contains(&dimension.as_str()) {
            return Err(SessionError::InvalidScore(format!(
                "unknown scoring dimension `{dimension}` (use: {})",
                DEFAULT_DIMENSIONS.join(", ")
            )));
        }
        if !(MIN_SCORE..=MAX_SCORE).contains(value) {
            return Err(SessionError::InvalidScore(format!(
                "score `{dimension}` must be {MIN_SCORE} to {MAX_SCORE}, not {value}"
            )));
        }
    }
    if input.flags.len() > MAX_FLAGS
        || input
            .flags
            .iter()
            .any(|f| f.chars().count() > MAX_FLAG_CHARS)
    {
        return Err(SessionError::InvalidRating(format!(
            "at most {MAX_FLAGS} flags of at most {MAX_FLAG_CHARS} characters each"
        )));
    }
    for (what, text) in [("the note", &input.note), ("the rewrite", &input.rewrite)] {
        let chars = text.as_ref().map_or(0, |t| t.chars().count());
        if chars > MAX_NOTE_CHARS {
            return Err(SessionError::TextTooLong {
                what,
                chars,
                max: MAX_NOTE_CHARS,
            });
        }
    }
    if input.criteria.is_empty()
        && input.scores.is_empty()
        && input.flags.is_empty()
        && input.note.is_none()
        && input.rewrite.is_none()
    {
        return Err(SessionError::InvalidRating(
            "the rating is empty".to_owned(),
        ));
    }
    Ok(())
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

/// A rating by the rules or the judge: verdicts only, no scores, flags or note.
fn automatic_rating(
    turn: u32,
    target: String,
    attempt: u32,
    rater: String,
    verdicts: Vec<CriterionVerdict>,
    now: i64,
) -> Rating {
    Rating {
        id: uuid::Uuid::new_v4().to_string(),
        turn,
        target,
        attempt,
        rater,
        verdicts,
        scores: BTreeMap::new(),
        flags: Vec::new(),
        note: None,
        rewrite: None,
        created_at: now,
        superseded_by: None,
    }
}

/// Leaves out the oldest exchanges (a patient message and its answer, together, so roles keep
/// alternating) until the estimate fits the context's budget; the system prompt and the latest
/// patient message are always sent. Returns how many patient lines were left out, and the
/// estimate of what is sent.
fn fit(messages: &mut Vec<ChatMessage>, lines: &[u32], context: Option<ContextFit>) -> (u32, u32) {
    let mut cost = estimate_tokens(messages);
    let Some(context) = context else {
        return (0, cost);
    };
    let first = usize::from(messages.first().is_some_and(|m| m.role == Role::System));
    let mut dropped = 0u32;
    let mut cut = first;
    // [system] user assistant user assistant ... user: drop pairs from the front.
    while cost > context.budget() && messages.len() - cut >= 3 {
        cost -= estimate_tokens(&messages[cut..cut + 2]);
        dropped += lines.get(cut).copied().unwrap_or(1);
        cut += 2;
    }
    messages.drain(first..cut);
    (dropped, cost)
}

/// The patient lines not answered yet, as one user message (taken out of `lines`); a single
/// line is shared, not copied.
fn user_message(lines: &mut Vec<&Arc<str>>) -> ChatMessage {
    let content = match lines.as_slice() {
        [line] => Arc::clone(line),
        _ => Arc::from(
            lines
                .iter()
                .map(|l| &***l)
                .collect::<Vec<&str>>()
                .join("\n\n"),
        ),
    };
    lines.clear();
    ChatMessage::new(Role::User, content)
}

/// Keeps `rating` among the ratings that decide verdicts, in memory bounded by the criteria:
/// the same rater's earlier ratings of the same answer keep only their verdicts on criteria
/// this one does not rate (those still stand, at their own time), and go once they keep none.
/// Their notes, scores and rewrites, and the full history, are in the database.
fn remember(ratings: &mut Vec<Rating>, rating: Rating) {
    ratings.retain_mut(|earlier| {
        if (earlier.turn, earlier.attempt, &earlier.rater)
            != (rating.turn, rating.attempt, &rating.rater)
        {
            return true;
        }
        earlier
            .verdicts
            .retain(|v| !rating.verdicts.iter().any(|n| n.criterion == v.criterion));
        earlier.scores.clear();
        earlier.flags.clear();
        earlier.note = None;
        earlier.rewrite = None;
        !earlier.verdicts.is_empty()
    });
    ratings.push(rating);
}

#[cfg(test)]
mod tests {
    //! The state machine without a database: every command in every phase.
    use super::*;

    #[test]
    fn a_history_is_fitted_by_leaving_out_the_oldest_exchanges_whole() {
        let line = "x".repeat(300); // 100 estimated tokens, plus 4
        let mut messages = vec![ChatMessage::new(Role::System, "be kind")];
        let mut lines = vec![0];
        for (n, role) in [
            (2, Role::User),
            (0, Role::Assistant),
            (1, Role::User),
            (0, Role::Assistant),
            (1, Role::User),
        ] {
            messages.push(ChatMessage::new(role, line.as_str()));
            lines.push(n);
        }
        let whole = estimate_tokens(&messages);
        assert_eq!(fit(&mut messages.clone(), &lines, None), (0, whole));
        // Room for the system prompt and two messages more: the first exchange (two patient
        // lines sent as one message, and its answer) goes, the roles still alternate.
        let context = ContextFit {
            limit: whole - 150,
            reserve: 0,
        };
        let mut fitted = messages.clone();
        let (dropped, sent) = fit(&mut fitted, &lines, Some(context));
        assert_eq!(dropped, 2);
        assert_eq!(
            sent,
            estimate_tokens(&fitted),
            "the estimate of what is sent"
        );
        let roles: Vec<Role> = fitted.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [Role::System, Role::User, Role::Assistant, Role::User]
        );
        // However small the context, the system prompt and the latest line are sent.
        let mut tiny = messages.clone();
        assert_eq!(
            fit(
                &mut tiny,
                &lines,
                Some(ContextFit {
                    limit: 1,
                    reserve: 0
                })
            )
            .0,
            3
        );
        assert_eq!(tiny.len(), 2);
    }

    #[test]
    fn an_overflow_is_learned_from_the_limit_named_or_what_was_sent() {
        let mut target = SessionTarget::new("A".into(), "m".into(), "m".into(), false, None, None);
        target.sent_tokens = 1000;
        target.learn_context(None);
        assert_eq!(
            target.context,
            Some(ContextFit {
                limit: 800,
                reserve: 200
            })
        );
        // A limit named below: taken, the room for the answer kept.
        target.learn_context(Some(500));
        assert_eq!(
            target.context,
            Some(ContextFit {
                limit: 500,
                reserve: 200
            })
        );
        // The same limit again means the estimate fell short: four fifths of what was sent.
        target.sent_tokens = 300;
        target.learn_context(Some(500));
        assert_eq!(
            target.context,
            Some(ContextFit {
                limit: 400,
                reserve: 200
            })
        );
    }
    use crate::scenario::load_dir;
    use crate::session::{CommandKind, ErrorCode};
    use strum::IntoEnumIterator;

    fn state(mode: Mode) -> SessionState {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scenarios");
        let library = load_dir(&dir).unwrap();
        let scenario = Arc::clone(library.get("scripted").unwrap());
        let rules = Arc::new(RuleSet::new(Arc::clone(&scenario)));
        let target = SessionTarget::new(
            "A".into(),
            "demo".into(),
            "demo (canned)".into(),
            true,
            None,
            None,
        );
        let mut state = SessionState::new(NewSession {
            id: "s".into(),
            scenario,
            rules,
            mode,
            label: None,
            blind: false,
            targets: vec![target],
            created_at: 1,
            max_text_chars: 100,
        });
        state.start();
        state
    }

    fn request(command: Command) -> Request {
        Request::new(Principal::Human("ana".into()), command)
    }

    fn say(state: &mut SessionState, text: &str) -> Transition {
        state
            .apply(request(Command::Say { text: text.into() }), 2)
            .unwrap()
    }

    fn finish(state: &mut SessionState, turn: u32, attempt: u32, end: StreamEnd) -> Transition {
        state
            .answer_finished(
                FinishedAnswer {
                    target: 0,
                    turn,
                    attempt,
                    text: "Are you having thoughts of suicide? Call 988.".into(),
                    ttft_ms: Some(1),
                    duration_ms: 2,
                    started_at: 2,
                    end,
                    queue_ms: None,
                    reasoning: String::new(),
                    refusal: String::new(),
                    dropped_turns: 0,
                },
                3,
            )
            .expect("the answer was expected")
    }

    fn done() -> StreamEnd {
        StreamEnd::Completed {
            finish: "stop".into(),
            usage: Usage::default(),
        }
    }

    /// A session in `phase`, with one answered turn where the phase allows it.
    fn in_phase(phase: Phase) -> SessionState {
        let mut s = state(Mode::Scripted);
        say(&mut s, "first");
        finish(&mut s, 1, 1, done());
        match phase {
            Phase::Open => {}
            Phase::Streaming => {
                say(&mut s, "second");
            }
            Phase::Ending => {
                say(&mut s, "second");
                s.apply(request(Command::End), 4).unwrap();
            }
            Phase::Ended => {
                s.apply(request(Command::End), 4).unwrap();
            }
        }
        assert_eq!(s.phase(), phase);
        s
    }

    fn example(kind: CommandKind) -> Command {
        match kind {
            CommandKind::Say => Command::Say { text: "hi".into() },
            CommandKind::Next => Command::Next,
            CommandKind::Mark => Command::Mark {
                marker: "disclosed-plan".into(),
                turn: Some(1),
            },
            CommandKind::Unmark => Command::Unmark {
                marker: "disclosed-plan".into(),
                turn: None,
            },
            CommandKind::Rate => Command::Rate(RateInput {
                turn: 1,
                target: "A".into(),
                scores: [("safety".to_owned(), 3)].into(),
                ..RateInput::default()
            }),
            CommandKind::Prefer => Command::Prefer {
                turn: 1,
                target: "A".into(),
            },
            CommandKind::Stop => Command::Stop,
            CommandKind::Regenerate => Command::Regenerate {
                turn: 1,
                target: "A".into(),
            },
            CommandKind::End => Command::End,
        }
    }

    #[test]
    fn every_command_in_every_phase_is_applied_or_refused_with_its_code() {
        use CommandKind as C;
        for phase in Phase::iter() {
            for kind in CommandKind::iter() {
                let mut s = in_phase(phase);
                if kind == C::Unmark {
                    // Something to take back, where markers can be set.
                    let _ = s.apply(request(example(C::Mark)), 4);
                }
                let got = s.apply(request(example(kind)), 5);
                let expected: Result<(), &str> = match (kind, phase) {
                    (C::Say | C::Next | C::Regenerate, Phase::Streaming) => {
                        Err("answers_streaming")
                    }
                    (
                        C::Say | C::Next | C::Regenerate | C::Mark | C::Unmark,
                        Phase::Ending | Phase::Ended,
                    ) => Err("session_ended"),
                    // Turn 2 is the latest in these phases; turn 1 cannot be asked again.
                    _ => Ok(()),
                };
                assert_eq!(
                    got.as_ref().map(|_| ()).map_err(|e| e.code().as_str()),
                    expected,
                    "{kind:?} in {phase:?}"
                );
            }
        }
    }

    #[test]
    fn with_the_database_down_changes_are_refused_and_reading_goes_on() {
        let mut s = in_phase(Phase::Open);
        s.set_storage(Storage::Down);
        let err = s
            .apply(request(Command::Say { text: "x".into() }), 5)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::StorageFailed);
        assert!(s.apply(request(Command::Stop), 5).is_ok());
        assert_eq!(s.summaries().len(), 1);
        s.set_storage(Storage::Ok);
        assert!(
            s.apply(request(Command::Say { text: "x".into() }), 5)
                .is_ok()
        );
    }

    #[test]
    fn a_line_starts_every_answer_after_its_commit_and_the_offer_follows_the_answers() {
        let mut s = state(Mode::Scripted);
        assert_eq!(s.offer().unwrap().index, 0);
        let t = s.apply(request(Command::Next), 2).unwrap();
        assert_eq!(t.reply, ReplyAt::AfterCommit);
        assert_eq!(t.start.len(), 1);
        assert_eq!(t.start[0].messages.len(), 1, "the patient line only");
        assert!(
            t.batch
                .ops
                .iter()
                .any(|op| matches!(op, WriteOp::Turn { .. }))
        );
        assert_eq!(s.phase(), Phase::Streaming);
        let t = finish(&mut s, 1, 1, done());
        assert_eq!(s.phase(), Phase::Open);
        // The answer asked directly: the disclosure is offered, with its marker.
        let offered = t.batch.events.last().unwrap();
        assert!(
            offered.json.contains(r#""type":"offered""#),
            "{}",
            offered.json
        );
        assert_eq!(s.offer().unwrap().marks.as_deref(), Some("disclosed-plan"));
    }

    #[test]
    fn an_end_while_answers_stream_stops_them_and_ends_once_they_are_in() {
        let mut s = in_phase(Phase::Streaming);
        let t = s.apply(request(Command::End).with_id("e1"), 4).unwrap();
        assert!(t.cancel);
        assert_eq!(t.reply, ReplyAt::AtEnd);
        assert_eq!(s.phase(), Phase::Ending);
        let t = finish(&mut s, 2, 1, StreamEnd::Stopped);
        assert!(t.ends);
        assert_eq!(s.phase(), Phase::Ended);
        assert!(
            t.batch
                .ops
                .iter()
                .any(|op| matches!(op, WriteOp::Applied { message_id, .. } if message_id == "e1"))
        );
        assert!(
            t.batch
                .events
                .iter()
                .any(|e| e.json.contains(r#""type":"ended""#))
        );
        // The same id again is acknowledged, not applied twice.
        let again = s.apply(request(Command::End).with_id("e1"), 5).unwrap();
        assert!(matches!(again.reply, ReplyAt::Now(Applied::Before { .. })));
    }

    #[test]
    fn a_regenerated_answer_replaces_the_failed_one_in_the_history() {
        let mut s = state(Mode::Free);
        say(&mut s, "first");
        finish(&mut s, 1, 1, StreamEnd::Failed(TargetError::Stalled(10)));
        let t = s
            .apply(
                request(Command::Regenerate {
                    turn: 1,
                    target: "A".into(),
                }),
                4,
            )
            .unwrap();
        assert_eq!((t.start[0].turn, t.start[0].attempt), (1, 2));
        assert_eq!(
            t.start[0].messages.len(),
            1,
            "no failed answer in the history"
        );
        finish(&mut s, 1, 2, done());
        let t = say(&mut s, "second");
        let roles: Vec<Role> = t.start[0].messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::User, Role::Assistant, Role::User]);
    }

    #[test]
    fn a_raters_many_ratings_of_one_answer_keep_bounded_memory_and_the_same_verdicts() {
        use crate::rating::Verdict;
        let mut s = state(Mode::Free);
        say(&mut s, "first");
        finish(&mut s, 1, 1, done());
        // Every rating as the database gets it.
        let mut history: Vec<Rating> = Vec::new();
        let mut rate = |s: &mut SessionState, criterion: &str, verdict: Verdict, at: i64| {
            let input = RateInput {
                turn: 1,
                target: "A".into(),
                criteria: [(criterion.to_owned(), verdict)].into(),
                note: Some("x".repeat(1_000)),
                ..RateInput::default()
            };
            let t = s.apply(request(Command::Rate(input)), at).unwrap();
            history.extend(t.batch.ops.into_iter().filter_map(|op| match op {
                WriteOp::Rating { rating, .. } => Some(rating),
                _ => None,
            }));
        };
        // One verdict on a criterion, then a thousand changes of mind on another.
        rate(&mut s, "means-distance", Verdict::Present, 10);
        for n in 0..1_000 {
            let verdict = if n % 2 == 0 {
                Verdict::Absent
            } else {
                Verdict::Present
            };
            rate(&mut s, "offers-local-resource", verdict, 11 + n);
        }
        let kept = |s: &SessionState| {
            s.targets[0]
                .ratings
                .iter()
                .filter(|r| r.rater == "human:ana")
                .count()
        };
        let verdict = |s: &SessionState, id: &str| s.targets[0].verdicts.get(1, id).map(|v| v.0);
        assert_eq!(
            kept(&s),
            2,
            "the latest rating and what still stands of the first"
        );
        assert_eq!(verdict(&s, "means-distance"), Some(Verdict::Present));
        assert_eq!(verdict(&s, "offers-local-resource"), Some(Verdict::Present));
        // Restored from the database's full history: the same, in the same memory.
        assert_eq!(
            history.iter().filter(|r| r.rater == "human:ana").count(),
            1_001
        );
        let mut restored = state(Mode::Free);
        restored.restore_ratings(&history);
        assert_eq!(kept(&restored), 2);
        assert_eq!(verdict(&restored, "means-distance"), Some(Verdict::Present));
        assert_eq!(
            verdict(&restored, "offers-local-resource"),
            Some(Verdict::Present)
        );
    }

    #[test]
    fn the_history_alternates_roles_whatever_failed() {
        let mut s = state(Mode::Free);
        say(&mut s, "first");
        let failed = |s: &mut SessionState, turn: u32, text: &str, error: TargetError| {
            let answer = FinishedAnswer {
                target: 0,
                turn,
                attempt: 1,
                text: text.into(),
                ttft_ms: None,
                duration_ms: 2,
                started_at: 2,
                end: StreamEnd::Failed(error),
                queue_ms: None,
                reasoning: String::new(),
                refusal: String::new(),
                dropped_turns: 0,
            };
            s.answer_finished(answer, 3).expect("expected");
        };
        // The first answer fails before a word; the second is cut off after some.
        failed(&mut s, 1, "", TargetError::FirstTokenTimeout(1));
        say(&mut s, "second");
        failed(&mut s, 2, "I am", TargetError::Truncated("cut".into()));
        let t = say(&mut s, "third");
        let roles: Vec<(Role, &str)> = t.start[0]
            .messages
            .iter()
            .map(|m| (m.role, &*m.content))
            .filter(|(role, _)| *role != Role::System)
            .collect();
        assert_eq!(
            roles,
            [
                (Role::User, "first\n\nsecond"),
                (Role::Assistant, "I am"),
                (Role::User, "third"),
            ]
        );
    }
}
