//! The engine. A live session is an actor ([`actor`]): one task owns its state and is driven
//! by [`Command`]s over a bounded channel through a cheap [`SessionHandle`]; it publishes
//! [`Published`] events on a broadcast channel. The WebSocket edge only translates frames to
//! commands and events to frames, so a session outlives its connection, and the batch runner
//! drives the same actor without any socket: one code path for people and for CI.
//!
//! [`Sessions`] is the registry: it starts sessions, finds live ones, and brings a session back
//! from the database when it is not in memory (after an idle eviction or a restart).
//!
//! Not here: the wire format of client messages (`ws`), HTTP (`http`).

mod actor;
pub mod event;
mod registry;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};

pub use event::{Published, ServerEvent};
pub use registry::{Sessions, SessionsConfig};

use std::sync::Arc;

/// How the patient's lines are produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The clinician types every line.
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

/// Why a command was refused. `code` is stable (it is the protocol's error code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SessionError {
    pub code: &'static str,
    pub message: String,
}

impl SessionError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The session's task has stopped (evicted while idle); the caller should reopen it.
    pub fn gone() -> Self {
        Self::new(
            "session_gone",
            "the session is no longer in memory; resume it",
        )
    }

    pub fn storage(err: &crate::store::StoreError) -> Self {
        Self::new(
            "storage_failed",
            format!("this could not be saved, so it was not applied ({err}); try again"),
        )
    }
}

/// What starting a session needs.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub scenario: String,
    pub targets: Vec<String>,
    pub mode: Mode,
    pub label: Option<String>,
    /// The client's id of its `start` message: resending it opens the same session.
    pub start_id: Option<String>,
    /// Hide target names until the end; defaults to true with several targets.
    pub blind: Option<bool>,
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

/// Whether a command changed the session now or had been applied before (same id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Now,
    Before,
}

pub(crate) type Reply = oneshot::Sender<Result<Applied, SessionError>>;

/// What a subscriber gets on attaching: the durable events after its `seq`, the text of
/// answers being streamed right now, and the live feed from that instant on.
#[derive(Debug)]
pub struct Attachment {
    pub replay: Vec<Arc<Published>>,
    pub catch_up: Vec<Arc<Published>>,
    pub live: broadcast::Receiver<Arc<Published>>,
    pub last_seq: u64,
}

pub(crate) enum Command {
    Attach {
        after_seq: u64,
        reply: oneshot::Sender<Attachment>,
    },
    Say {
        id: Option<String>,
        text: String,
        reply: Reply,
    },
    Next {
        id: Option<String>,
        reply: Reply,
    },
    Mark {
        id: Option<String>,
        marker: String,
        turn: Option<u32>,
        reply: Reply,
    },
    Rate {
        id: Option<String>,
        input: RateInput,
        reply: Reply,
    },
    Prefer {
        id: Option<String>,
        turn: u32,
        target: String,
        reply: Reply,
    },
    Stop {
        reply: Reply,
    },
    End {
        id: Option<String>,
        reply: Reply,
    },
}

/// A cheap, cloneable handle to a live session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    id: Arc<str>,
    tx: mpsc::Sender<Command>,
}

impl SessionHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    async fn call(&self, make: impl FnOnce(Reply) -> Command) -> Result<Applied, SessionError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| SessionError::gone())?;
        answer.await.map_err(|_| SessionError::gone())?
    }

    /// Subscribes to the session's events after `after_seq`.
    pub async fn attach(&self, after_seq: u64) -> Result<Attachment, SessionError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Attach { after_seq, reply })
            .await
            .map_err(|_| SessionError::gone())?;
        answer.await.map_err(|_| SessionError::gone())
    }

    /// Sends a patient line (in scripted mode: the offered line, edited).
    pub async fn say(&self, id: Option<String>, text: String) -> Result<Applied, SessionError> {
        self.call(|reply| Command::Say { id, text, reply }).await
    }

    /// Sends the offered script line as written.
    pub async fn next(&self, id: Option<String>) -> Result<Applied, SessionError> {
        self.call(|reply| Command::Next { id, reply }).await
    }

    /// Sets a marker at `turn` (default: the latest turn).
    pub async fn mark(
        &self,
        id: Option<String>,
        marker: String,
        turn: Option<u32>,
    ) -> Result<Applied, SessionError> {
        self.call(|reply| Command::Mark {
            id,
            marker,
            turn,
            reply,
        })
        .await
    }

    pub async fn rate(
        &self,
        id: Option<String>,
        input: RateInput,
    ) -> Result<Applied, SessionError> {
        self.call(|reply| Command::Rate { id, input, reply }).await
    }

    pub async fn prefer(
        &self,
        id: Option<String>,
        turn: u32,
        target: String,
    ) -> Result<Applied, SessionError> {
        self.call(|reply| Command::Prefer {
            id,
            turn,
            target,
            reply,
        })
        .await
    }

    /// Cancels the answers being generated; their partial text is kept, marked `stopped`.
    pub async fn stop(&self) -> Result<Applied, SessionError> {
        self.call(|reply| Command::Stop { reply }).await
    }

    /// Ends the session (after stopping any answer in progress).
    pub async fn end(&self, id: Option<String>) -> Result<Applied, SessionError> {
        self.call(|reply| Command::End { id, reply }).await
    }
}
