//! The engine. A live session is an actor ([`actor`]) around a pure state machine
//! ([`state`]): one task owns the state and is driven by [`Request`]s (a [`Command`] and the
//! [`Principal`] who sent it) over a bounded channel through a cheap [`SessionHandle`]; it
//! publishes [`Published`] events on a broadcast channel. The WebSocket edge only decodes frames
//! into commands and encodes events into frames, so a session outlives its connection, and the
//! batch runner drives the same actor without any socket: one code path for people and for CI.
//!
//! - [`command`]: the command type, end to end, and who sends it.
//! - [`phase`]: the phase of a session and the table of which command is accepted when.
//! - [`state`]: the state and its transitions (no store, no tokio).
//! - [`view`]: what is shown of a session (the blind rule, once), for the protocol and the API.
//! - [`replay`]: a session's state rebuilt from its rows (restore and the read API).
//! - `actor`, `pump`: the task that runs a live session, and the streaming of one answer.
//! - [`Sessions`] (`registry`): starts sessions, finds live ones, brings them back from the
//!   database.
//!
//! Not here: the wire format of client frames (`ws`), HTTP (`http`).

mod actor;
pub mod command;
mod error;
pub mod event;
pub mod phase;
mod pump;
mod registry;
pub mod replay;
pub mod state;
pub mod view;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};

pub use command::{Command, CommandKind, Principal, Request};
pub use error::{AnswerFault, ErrorCode, SessionError};
pub use event::{Published, ServerEvent};
pub use registry::{Sessions, SessionsConfig};
pub use state::Applied;

/// How the patient's lines are produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The clinician types every line.
    #[default]
    Free,
    /// The scenario's next line is offered; the clinician sends it as is (`next`) or edited.
    Scripted,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Free => "free",
            Mode::Scripted => "scripted",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "free" => Some(Mode::Free),
            "scripted" => Some(Mode::Scripted),
            _ => None,
        }
    }
}

/// What starting a session needs (the `start` message's fields).
#[derive(Debug, Clone, Deserialize)]
pub struct StartRequest {
    pub scenario: String,
    pub targets: Vec<String>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub label: Option<String>,
    /// The client's id of its `start` message: resending it opens the same session.
    #[serde(skip)]
    pub start_id: Option<String>,
    /// Hide target names until the end; defaults to true with several targets.
    #[serde(default)]
    pub blind: Option<bool>,
    /// Who starts it (set by the edge, not the client): each person may hold only so many
    /// live sessions.
    #[serde(skip)]
    pub owner: Option<Principal>,
}

/// A human rating of one answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RateInput {
    pub turn: u32,
    pub target: String,
    #[serde(default)]
    pub criteria: BTreeMap<String, crate::rating::Verdict>,
    #[serde(default)]
    pub scores: BTreeMap<String, u8>,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub note: Option<String>,
    #[serde(default)]
    pub rewrite: Option<String>,
}

pub(crate) type Reply = oneshot::Sender<Result<Applied, SessionError>>;

/// What a subscriber gets on attaching: the durable events after its `seq`, the text of
/// answers being streamed right now, and the live feed from that instant on.
#[derive(Debug)]
pub struct Attachment {
    /// Events after the subscriber's `seq` up to this one are no longer in memory: read them
    /// from the database (they are stored: nothing is published before its commit) before
    /// `replay`.
    pub stored_through: Option<u64>,
    pub replay: Vec<Arc<Published>>,
    pub catch_up: Vec<Arc<Published>>,
    pub live: broadcast::Receiver<Arc<Published>>,
    pub last_seq: u64,
}

/// Held by whoever follows a session's events, declared after its receiver so that it is
/// dropped after it: the session then hears that a viewer left, and an ended session nobody
/// views leaves memory at once rather than at its next idle check.
#[derive(Debug)]
pub struct Viewing(SessionHandle);

impl Viewing {
    pub fn new(handle: SessionHandle) -> Self {
        Self(handle)
    }
}

impl Drop for Viewing {
    fn drop(&mut self) {
        // A full mailbox means the session is busy, and its idle check comes anyway.
        let _ = self.0.tx.try_send(actor::Message::ViewerLeft);
    }
}

/// A cheap, cloneable handle to a live session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    id: Arc<str>,
    tx: mpsc::Sender<actor::Message>,
}

impl SessionHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Subscribes to the session's events after `after_seq`.
    pub async fn attach(&self, after_seq: u64) -> Result<Attachment, SessionError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(actor::Message::Attach { after_seq, reply })
            .await
            .map_err(|_| SessionError::SessionGone)?;
        answer.await.map_err(|_| SessionError::SessionGone)
    }

    /// Applies a command; answers once its effects are saved (or why it was refused).
    pub async fn apply(&self, request: Request) -> Result<Applied, SessionError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(actor::Message::Apply { request, reply })
            .await
            .map_err(|_| SessionError::SessionGone)?;
        answer.await.map_err(|_| SessionError::SessionGone)?
    }
}
