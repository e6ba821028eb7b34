//! The WebSocket edge (`GET /ws`): frames in, commands to the session; events out, frames to
//! the client. Nothing here decides anything about a session.
//!
//! A connection is a reader loop plus a single writer task that alone owns the socket's sink
//! and drains a bounded channel. The reader attaches to at most one session at a time, keeps
//! forwarding that session's events while it waits for a command's reply, and sends the
//! command's `ack` only after the events the command produced. A slow client that falls behind
//! the session's broadcast is resynchronised from the session's log by `seq`.
//!
//! Bad input never closes the connection: each problem is an `error` event with a stable code
//! and the connection stays usable. Only frames larger than [`MAX_FRAME_BYTES`] are refused by
//! the WebSocket layer itself (close code 1009).

pub mod protocol;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{broadcast, mpsc};

use crate::http::AppState;
use crate::session::{
    Applied, Mode, Published, ServerEvent, SessionError, SessionHandle, Sessions, StartRequest,
};
use protocol::{ClientMessage, decode};

/// Largest frame accepted. Patient lines have their own, smaller limit
/// (`session.max_text_chars`), answered with a `text_too_long` error.
pub const MAX_FRAME_BYTES: usize = 256 * 1024;
/// Frames queued for a client before the connection stops reading its session's events.
const OUTGOING_QUEUE: usize = 256;
/// Code 1001 "going away", sent when the server shuts down.
const CLOSE_GOING_AWAY: u16 = 1001;

/// `GET /ws`.
pub async fn upgrade(ws: WebSocketUpgrade, State(state): State<AppState>) -> Response {
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        // Small buffers: an idle connection should cost little memory.
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            let connections = state.connections.clone();
            connections.spawn(serve(socket, state)).await.ok();
        })
}

async fn serve(socket: WebSocket, state: AppState) {
    let (sink, mut frames) = socket.split();
    let (out, outgoing) = mpsc::channel(OUTGOING_QUEUE);
    let writer = tokio::spawn(write_frames(sink, outgoing));
    let mut connection = Connection {
        sessions: state.sessions.clone(),
        out,
        attached: None,
    };
    let shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            frame = frames.next() => match frame {
                Some(Ok(Message::Text(text))) => connection.on_text(&text).await,
                Some(Ok(Message::Binary(_))) => {
                    connection
                        .send(Arc::new(Published::error(
                            "invalid_message",
                            "binary frames are not part of the protocol; send JSON text",
                            None,
                        )))
                        .await;
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {} // ping and pong are answered by the library
                Some(Err(err)) => {
                    tracing::debug!(error = %err, "websocket read failed");
                    break;
                }
            },
            event = connection.next_event() => {
                if let Some(event) = event {
                    connection.send(event).await;
                }
            }
            _ = shutdown.cancelled() => {
                let close = Message::Close(Some(CloseFrame {
                    code: CLOSE_GOING_AWAY,
                    reason: Utf8Bytes::from_static("the server is shutting down; resume shortly"),
                }));
                let _ = connection.out.send(close).await;
                break;
            }
        }
    }
    drop(connection);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

async fn write_frames(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut outgoing: mpsc::Receiver<Message>,
) {
    while let Some(message) = outgoing.recv().await {
        let closing = matches!(message, Message::Close(_));
        if sink.send(message).await.is_err() || closing {
            break;
        }
    }
    let _ = sink.close().await;
}

struct Attached {
    handle: SessionHandle,
    live: broadcast::Receiver<Arc<Published>>,
    last_seq: u64,
}

struct Connection {
    sessions: Sessions,
    out: mpsc::Sender<Message>,
    attached: Option<Attached>,
}

impl Connection {
    async fn send(&mut self, event: Arc<Published>) {
        if let (Some(seq), Some(attached)) = (event.seq, self.attached.as_mut()) {
            attached.last_seq = attached.last_seq.max(seq);
        }
        let _ = self
            .out
            .send(Message::Text(Utf8Bytes::from(event.json.as_str())))
            .await;
    }

    async fn send_error(&mut self, error: &SessionError, id: Option<String>) {
        self.send(Arc::new(Published::error(
            error.code,
            error.message.clone(),
            id,
        )))
        .await;
    }

    async fn ack(&mut self, id: Option<String>) {
        if let Some(id) = id {
            self.send(Arc::new(Published::new(None, ServerEvent::Ack { id })))
                .await;
        }
    }

    /// The next event of the attached session; pending forever when detached.
    async fn next_event(&mut self) -> Option<Arc<Published>> {
        let Some(attached) = self.attached.as_mut() else {
            return std::future::pending().await;
        };
        match attached.live.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "client fell behind; resynchronising from the log");
                let (handle, after) = (attached.handle.clone(), attached.last_seq);
                self.attach(handle, after, false).await;
                None
            }
            Err(broadcast::error::RecvError::Closed) => {
                // The session's task ended (shutdown, or eviction): reattach on next command.
                let id = attached.handle.id().to_owned();
                let after = attached.last_seq;
                self.attached = None;
                if let Ok(handle) = self.sessions.open(&id).await {
                    self.attach(handle, after, false).await;
                }
                None
            }
        }
    }

    /// Forwards events that are already waiting, without blocking.
    async fn drain_ready(&mut self) {
        loop {
            let Some(attached) = self.attached.as_mut() else {
                return;
            };
            match attached.live.try_recv() {
                Ok(event) => self.send(event).await,
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    let (handle, after) = (attached.handle.clone(), attached.last_seq);
                    self.attach(handle, after, false).await;
                }
                Err(_) => return,
            }
        }
    }

    /// Subscribes to `handle` after `after_seq`: sends the replay, the catch-up text of answers
    /// being streamed, and (when asked) a `resumed` marker.
    async fn attach(&mut self, handle: SessionHandle, after_seq: u64, announce: bool) -> bool {
        let attachment = match handle.attach(after_seq).await {
            Ok(attachment) => attachment,
            Err(err) => {
                self.send_error(&err, None).await;
                return false;
            }
        };
        self.attached = Some(Attached {
            handle: handle.clone(),
            live: attachment.live,
            last_seq: after_seq,
        });
        let replayed = attachment.replay.len();
        for event in attachment.replay.into_iter().chain(attachment.catch_up) {
            self.send(event).await;
        }
        if announce {
            let resumed = ServerEvent::Resumed {
                session: handle.id().to_owned(),
                last_seq: attachment.last_seq,
                replayed,
            };
            self.send(Arc::new(Published::new(None, resumed))).await;
        }
        true
    }

    async fn on_text(&mut self, text: &str) {
        let message = match decode(text) {
            Ok(message) => message,
            Err(err) => {
                self.send(Arc::new(Published::error(err.code, err.message, err.id)))
                    .await;
                return;
            }
        };
        match message {
            ClientMessage::Start {
                id,
                scenario,
                targets,
                mode,
                label,
                blind,
            } => {
                let Some(mode) = Mode::parse(&mode) else {
                    let err = SessionError::new(
                        "invalid_message",
                        format!("unknown mode `{mode}`: use `free` or `scripted`"),
                    );
                    return self.send_error(&err, id).await;
                };
                let request = StartRequest {
                    scenario,
                    targets,
                    mode,
                    label,
                    start_id: id.clone(),
                    blind,
                };
                let sessions = self.sessions.clone();
                match self.while_forwarding(sessions.start(request)).await {
                    Ok(handle) => {
                        if self.attach(handle, 0, false).await {
                            self.ack(id).await;
                        }
                    }
                    Err(err) => self.send_error(&err, id).await,
                }
            }
            ClientMessage::Resume {
                id,
                session,
                after_seq,
            } => {
                let sessions = self.sessions.clone();
                match self.while_forwarding(sessions.open(&session)).await {
                    Ok(handle) => {
                        if self.attach(handle, after_seq, true).await {
                            self.ack(id).await;
                        }
                    }
                    Err(err) => self.send_error(&err, id).await,
                }
            }
            ClientMessage::Say { id, text } => {
                self.command(id.clone(), Call::Say { id, text }).await
            }
            ClientMessage::Next { id } => self.command(id.clone(), Call::Next { id }).await,
            ClientMessage::Mark { id, marker, turn } => {
                self.command(id.clone(), Call::Mark { id, marker, turn })
                    .await;
            }
            ClientMessage::Rate { id, rating } => {
                self.command(id.clone(), Call::Rate { id, rating }).await
            }
            ClientMessage::Prefer { id, turn, target } => {
                self.command(id.clone(), Call::Prefer { id, turn, target })
                    .await;
            }
            ClientMessage::Stop { id } => self.command(id, Call::Stop).await,
            ClientMessage::End { id } => self.command(id.clone(), Call::End { id }).await,
        }
    }

    /// Runs a command against the attached session, forwarding its events meanwhile; reopens
    /// the session once if its task had ended; acks after the command's own events.
    async fn command(&mut self, id: Option<String>, call: Call) {
        let Some(handle) = self.attached.as_ref().map(|a| a.handle.clone()) else {
            let err = SessionError::new(
                "no_session",
                "start a session (`start`) or resume one (`resume`) first",
            );
            return self.send_error(&err, id).await;
        };
        let mut result = self
            .while_forwarding(call.clone().run(handle.clone()))
            .await;
        if matches!(&result, Err(e) if e.code == "session_gone") {
            let after = self.attached.as_ref().map_or(0, |a| a.last_seq);
            let sessions = self.sessions.clone();
            match self.while_forwarding(sessions.open(handle.id())).await {
                Ok(handle) if self.attach(handle.clone(), after, false).await => {
                    result = self.while_forwarding(call.run(handle)).await;
                }
                Ok(_) => return,
                Err(err) => result = Err(err),
            }
        }
        match result {
            Ok(_) => {
                self.drain_ready().await;
                self.ack(id).await;
            }
            Err(err) => {
                self.drain_ready().await;
                self.send_error(&err, id).await;
            }
        }
    }

    /// Awaits `work` while still forwarding the attached session's events.
    async fn while_forwarding<T>(&mut self, work: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                result = &mut work => return result,
                event = self.next_event() => {
                    if let Some(event) = event {
                        self.send(event).await;
                    }
                }
            }
        }
    }
}

/// A state-changing client message, ready to run against a session (again, if the session
/// had to be reopened).
#[derive(Clone)]
enum Call {
    Say {
        id: Option<String>,
        text: String,
    },
    Next {
        id: Option<String>,
    },
    Mark {
        id: Option<String>,
        marker: String,
        turn: Option<u32>,
    },
    Rate {
        id: Option<String>,
        rating: crate::session::RateInput,
    },
    Prefer {
        id: Option<String>,
        turn: u32,
        target: String,
    },
    Stop,
    End {
        id: Option<String>,
    },
}

impl Call {
    async fn run(self, handle: SessionHandle) -> Result<Applied, SessionError> {
        match self {
            Call::Say { id, text } => handle.say(id, text).await,
            Call::Next { id } => handle.next(id).await,
            Call::Mark { id, marker, turn } => handle.mark(id, marker, turn).await,
            Call::Rate { id, rating } => handle.rate(id, rating).await,
            Call::Prefer { id, turn, target } => handle.prefer(id, turn, target).await,
            Call::Stop => handle.stop().await,
            Call::End { id } => handle.end(id).await,
        }
    }
}
