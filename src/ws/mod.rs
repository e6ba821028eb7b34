//! The WebSocket edge (`GET /ws`): frames in, commands to the session; events out, frames to
//! the client. Nothing here decides anything about a session.
//!
//! A connection is a reader loop plus a single writer task. The reader decodes frames and runs
//! them: `start` and `resume` go to the registry, every other message is a session command. The
//! writer alone owns the socket's sink: it forwards the attached session's events straight from
//! the session's broadcast (a delta goes pump -> broadcast -> writer -> socket, with no other
//! task in between), and the frames the reader hands it (acks, errors). A command's `ack` is
//! sent only after the events the command produced (the session says up to which `seq`). A
//! slow client that falls behind the broadcast is resynchronised from the session's log by
//! `seq`.
//!
//! Bad input never closes the connection: each problem is an `error` event with a stable code
//! and the connection stays usable. Only what the WebSocket layer itself cannot read closes it,
//! with the code that says why: a frame over the 64 KiB limit (1009), a text frame that is not
//! UTF-8 (1007).
//!
//! The upgrade is refused (403) unless its `Origin` is one this server allows (its own pages by
//! default); every request's `Host` is checked by `http` before that. The person connecting
//! names themself with `?name=` (until accounts exist); without it the configured default
//! rater is used.

pub mod protocol;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::session::view::MAX_FRAME_BYTES;
use crate::session::{
    Applied, ErrorCode, Principal, Published, Request, ServerEvent, SessionError, SessionHandle,
    Sessions, Viewing,
};
use protocol::{ClientMessage, FrameError, decode};

/// Frames queued for a client before the reader waits.
const OUTGOING_QUEUE: usize = 256;
/// Code 1001 "going away", sent when the server shuts down.
const CLOSE_GOING_AWAY: u16 = 1001;
/// Code 1007: a text frame that is not valid UTF-8.
const CLOSE_INVALID_DATA: u16 = 1007;
/// Code 1009: a frame or message larger than the limit.
const CLOSE_TOO_BIG: u16 = 1009;
/// Longest an `ack` waits for the events it follows.
const ACK_WAIT: Duration = Duration::from_secs(5);

/// What the WebSocket edge needs (taken from the application's state).
#[derive(Clone)]
pub struct WsState {
    pub sessions: Sessions,
    /// Cancelled when the server shuts down; connections close with 1001.
    pub shutdown: CancellationToken,
    /// Every WebSocket connection, so shutdown can wait for them.
    pub connections: TaskTracker,
    /// The page origins allowed to open a connection (exactly; no `Origin`, no connection).
    pub origins: Arc<Vec<String>>,
    pub messages: Arc<MessageLimits>,
}

/// Token buckets for client messages: one per connection, one per person across their
/// connections. A message over either is refused (`too_many_messages`) and not applied; it
/// costs the server a decode and a short error frame, nothing more.
pub struct MessageLimits {
    per_connection: Quota,
    per_person: DefaultKeyedRateLimiter<String>,
    rates: (u32, u32),
}

impl MessageLimits {
    /// `per_connection` and `per_person` messages a second, in bursts of twice as many.
    pub fn new(per_connection: u32, per_person: u32) -> anyhow::Result<Self> {
        let quota = |per_second: u32, what: &str| -> anyhow::Result<Quota> {
            let rate = NonZeroU32::new(per_second)
                .ok_or_else(|| anyhow::anyhow!("{what} must be at least 1"))?;
            let burst = rate.saturating_mul(NonZeroU32::MIN.saturating_add(1));
            Ok(Quota::per_second(rate).allow_burst(burst))
        };
        Ok(Self {
            per_connection: quota(per_connection, "server.messages_per_second")?,
            per_person: RateLimiter::keyed(quota(
                per_person,
                "server.messages_per_second_per_person",
            )?),
            rates: (per_connection, per_person),
        })
    }

    fn connection(&self) -> DefaultDirectRateLimiter {
        RateLimiter::direct(self.per_connection)
    }
}

#[derive(serde::Deserialize)]
pub struct ConnectParams {
    /// The display name of the person connecting.
    name: Option<String>,
    /// The client's own id (a browser tab's, kept across its reconnects): message ids are
    /// matched only within it. Without it, only within this connection.
    client: Option<String>,
}

/// Longest client id.
const MAX_CLIENT_CHARS: usize = 64;

/// `GET /ws[?name=...]`.
pub async fn upgrade(
    ws: WebSocketUpgrade,
    Query(params): Query<ConnectParams>,
    State(state): State<WsState>,
    headers: axum::http::HeaderMap,
) -> Response {
    // Any web page can open a WebSocket to loopback; only our own pages (and those the
    // configuration names) may. Checked before anything else.
    let origin = headers
        .get(axum::http::header::ORIGIN)
        .and_then(|o| o.to_str().ok());
    if !origin.is_some_and(|o| state.origins.iter().any(|allowed| allowed == o)) {
        let body = serde_json::json!({
            "code": "forbidden_origin",
            "message": "WebSocket connections are accepted only from this server's own pages (an `Origin` it allows)",
        });
        return (StatusCode::FORBIDDEN, Json(body)).into_response();
    }
    let principal = match params.name.as_deref() {
        Some(name) => match Principal::human(name) {
            Ok(principal) => principal,
            Err(message) => {
                let body = serde_json::json!({"code": "invalid_name", "message": message});
                return (StatusCode::BAD_REQUEST, Json(body)).into_response();
            }
        },
        None => Principal::parse(&state.sessions.config().human_rater),
    };
    let client = match params.client {
        Some(client)
            if !client.is_empty()
                && client.len() <= MAX_CLIENT_CHARS
                && client
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            client
        }
        Some(_) => {
            let body = serde_json::json!({
                "code": "invalid_client",
                "message": format!("`client` is 1 to {MAX_CLIENT_CHARS} letters, digits, - or _"),
            });
            return (StatusCode::BAD_REQUEST, Json(body)).into_response();
        }
        None => format!("connection-{}", uuid::Uuid::new_v4().simple()),
    };
    // Message ids are the client's: a resent id is matched only for the same person and client,
    // so nobody can attach to someone else's session by guessing their ids.
    let scope = format!("{principal}\u{1f}{client}");
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        // Small buffers: an idle connection should cost little memory.
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            let connections = state.connections.clone();
            connections
                .spawn(serve(socket, state, principal, scope))
                .await
                .ok();
        })
}

/// What the reader hands the writer.
enum Outgoing {
    /// A frame for this client only (an error, an immediate ack).
    Frame(Arc<Published>),
    /// Follow this session from now on: send its replay after `after_seq` (`None`: after what
    /// this client already has) and catch-up, then (when asked) the `resumed` marker, then the
    /// ack of the message that attached.
    Attach {
        handle: SessionHandle,
        after_seq: Option<u64>,
        announce: bool,
        ack: Option<String>,
    },
    /// Acknowledge `id` once every event up to `seq` has been sent.
    AckAfter {
        id: String,
        seq: u64,
    },
    Close(CloseFrame),
}

async fn serve(socket: WebSocket, state: WsState, principal: Principal, scope: String) {
    let (sink, mut frames) = socket.split();
    let (out, outgoing) = mpsc::channel(OUTGOING_QUEUE);
    let writer_gone = CancellationToken::new();
    let writer = tokio::spawn({
        let gone = writer_gone.clone();
        let writer = Writer {
            sink,
            sessions: state.sessions.clone(),
            shutdown: state.shutdown.clone(),
            attached: None,
        };
        async move {
            writer.run(outgoing).await;
            gone.cancel();
        }
    });
    let mut reader = Reader {
        sessions: state.sessions.clone(),
        limiter: state.messages.connection(),
        limits: Arc::clone(&state.messages),
        person: principal.to_string(),
        principal,
        scope,
        out,
        attached: None,
    };
    let shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            // The client is gone (the writer could not send): what it sent before going is
            // dropped, not applied.
            _ = writer_gone.cancelled() => break,
            frame = frames.next() => match frame {
                Some(Ok(Message::Text(text))) if !reader.admit() => {
                    reader.refuse_flood(&text).await;
                }
                Some(Ok(Message::Text(text))) => reader.on_text(&text).await,
                Some(Ok(Message::Binary(_))) => {
                    reader.refuse(FrameError::InvalidMessage.code(), "binary frames are not part of the protocol; send JSON text", None).await;
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {} // ping and pong are answered by the library
                Some(Err(err)) => {
                    tracing::debug!(error = %err, "websocket read failed");
                    // Say why, with the code the protocol gives for it, where there is one.
                    if let Some(close) = close_for(err) {
                        let _ = reader.out.send(Outgoing::Close(close)).await;
                    }
                    break;
                }
            },
            _ = shutdown.cancelled() => {
                let close = CloseFrame {
                    code: CLOSE_GOING_AWAY,
                    reason: Utf8Bytes::from_static("the server is shutting down; resume shortly"),
                };
                let _ = reader.out.send(Outgoing::Close(close)).await;
                break;
            }
        }
    }
    drop(reader);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

/// The reader's side of a connection: runs each client message.
struct Reader {
    sessions: Sessions,
    limiter: DefaultDirectRateLimiter,
    limits: Arc<MessageLimits>,
    /// The person's key in the per-person limiter (their principal, written once).
    person: String,
    principal: Principal,
    /// Who chose the message ids of this connection (person and client).
    scope: String,
    out: mpsc::Sender<Outgoing>,
    attached: Option<SessionHandle>,
}

impl Reader {
    /// Whether one more message is within this connection's and this person's rate.
    fn admit(&self) -> bool {
        self.limiter.check().is_ok() && self.limits.per_person.check_key(&self.person).is_ok()
    }

    /// Refuses a message over the rate, with its id when it has one (read cheaply).
    async fn refuse_flood(&self, text: &str) {
        #[derive(serde::Deserialize)]
        struct Id {
            id: Option<String>,
        }
        let id = serde_json::from_str::<Id>(text).ok().and_then(|m| m.id);
        let (connection, person) = self.limits.rates;
        self.refuse(
            FrameError::TooManyMessages.code(),
            format!(
                "too many messages: at most {connection} a second per connection and {person} \
                 per person (bursts of twice as many); this one was not applied, send it again \
                 in a moment"
            ),
            id,
        )
        .await;
    }

    async fn refuse(&self, code: &str, message: impl Into<String>, id: Option<String>) {
        let frame = Arc::new(Published::error(code, message, id));
        let _ = self.out.send(Outgoing::Frame(frame)).await;
    }

    async fn refuse_session(&self, error: &SessionError, id: Option<String>) {
        self.refuse(error.code().as_str(), error.to_string(), id)
            .await;
    }

    async fn attach(
        &mut self,
        handle: SessionHandle,
        after_seq: u64,
        announce: bool,
        ack: Option<String>,
    ) {
        self.attached = Some(handle.clone());
        let _ = self
            .out
            .send(Outgoing::Attach {
                handle,
                after_seq: Some(after_seq),
                announce,
                ack,
            })
            .await;
    }

    async fn on_text(&mut self, text: &str) {
        let frame = match decode(text) {
            Ok(frame) => frame,
            Err(err) => return self.refuse(err.code.code(), err.message, err.id).await,
        };
        let id = frame.id;
        // The id as the engine keeps it: within this person's and client's scope.
        let scoped = id.as_ref().map(|id| format!("{}\u{1f}{id}", self.scope));
        match frame.message {
            ClientMessage::Start(mut request) => {
                request.start_id.clone_from(&scoped);
                request.owner = Some(self.principal.clone());
                match self.sessions.start(request).await {
                    Ok(handle) => self.attach(handle, 0, false, id).await,
                    Err(err) => self.refuse_session(&err, id).await,
                }
            }
            ClientMessage::Resume { session, after_seq } => {
                match self.sessions.open(&session).await {
                    Ok(handle) => self.attach(handle, after_seq, true, id).await,
                    Err(err) => self.refuse_session(&err, id).await,
                }
            }
            ClientMessage::Session(command) => {
                let Some(handle) = self.attached.clone() else {
                    return self
                        .refuse(
                            FrameError::NoSession.code(),
                            "start a session (`start`) or resume one (`resume`) first",
                            id,
                        )
                        .await;
                };
                let request = Request {
                    id: scoped,
                    principal: self.principal.clone(),
                    command,
                };
                let mut result = handle.apply(request.clone()).await;
                if matches!(&result, Err(e) if e.code() == ErrorCode::SessionGone) {
                    // The session left memory: bring it back and try once more.
                    match self.sessions.open(handle.id()).await {
                        Ok(handle) => {
                            self.attached = Some(handle.clone());
                            let _ = self
                                .out
                                .send(Outgoing::Attach {
                                    handle: handle.clone(),
                                    after_seq: None,
                                    announce: false,
                                    ack: None,
                                })
                                .await;
                            result = handle.apply(request).await;
                        }
                        Err(err) => result = Err(err),
                    }
                }
                match (result, id) {
                    (Ok(applied), Some(id)) => {
                        let seq = match applied {
                            Applied::Now { through_seq } | Applied::Before { through_seq } => {
                                through_seq
                            }
                        };
                        let _ = self.out.send(Outgoing::AckAfter { id, seq }).await;
                    }
                    (Ok(_), None) => {}
                    (Err(err), id) => self.refuse_session(&err, id).await,
                }
            }
        }
    }
}

/// The session a writer follows.
struct Following {
    handle: SessionHandle,
    live: broadcast::Receiver<Arc<Published>>,
    /// The highest `seq` sent to this client.
    last_seq: u64,
    /// Last: dropped after `live`, it tells the session this viewer left.
    _viewing: Viewing,
}

/// The writer's side of a connection: owns the sink.
struct Writer {
    sink: SplitSink<WebSocket, Message>,
    sessions: Sessions,
    shutdown: CancellationToken,
    attached: Option<Following>,
}

impl Writer {
    async fn run(mut self, mut outgoing: mpsc::Receiver<Outgoing>) {
        loop {
            let following = self.attached.is_some();
            tokio::select! {
                biased;
                message = outgoing.recv() => match message {
                    Some(message) => if !self.on_outgoing(message).await {
                        break;
                    },
                    None => break,
                },
                event = next_live(&mut self.attached), if following => {
                    if !self.on_live(event).await {
                        break;
                    }
                }
            }
        }
        let _ = self.sink.close().await;
    }

    /// Sends one frame; `false` when the client is gone.
    async fn send(&mut self, event: &Published) -> bool {
        if let (Some(seq), Some(following)) = (event.seq, self.attached.as_mut()) {
            if seq <= following.last_seq {
                return true; // already sent (a replay overlapping the live feed)
            }
            following.last_seq = seq;
        }
        self.sink
            .send(Message::Text(Utf8Bytes::from(event.json.as_str())))
            .await
            .is_ok()
    }

    async fn on_outgoing(&mut self, message: Outgoing) -> bool {
        match message {
            Outgoing::Frame(frame) => self.send(&frame).await,
            Outgoing::Attach {
                handle,
                after_seq,
                announce,
                ack,
            } => {
                let after_seq =
                    after_seq.unwrap_or_else(|| self.attached.as_ref().map_or(0, |f| f.last_seq));
                if !self.follow(handle, after_seq, announce).await {
                    return false;
                }
                match ack {
                    Some(id) => self.send(&ack_frame(id)).await,
                    None => true,
                }
            }
            Outgoing::AckAfter { id, seq } => {
                if !self.catch_up_to(seq).await {
                    return false;
                }
                self.send(&ack_frame(id)).await
            }
            Outgoing::Close(frame) => {
                let _ = self.sink.send(Message::Close(Some(frame))).await;
                false
            }
        }
    }

    /// Subscribes to `handle` after `after_seq` and sends the replay, the catch-up text of the
    /// answers being streamed, and (when asked) a `resumed` marker.
    async fn follow(&mut self, handle: SessionHandle, after_seq: u64, announce: bool) -> bool {
        let attachment = match handle.attach(after_seq).await {
            Ok(attachment) => attachment,
            Err(err) => {
                let frame = Published::error(err.code().as_str(), err.to_string(), None);
                return self.send(&frame).await;
            }
        };
        let stored = match attachment.stored_through {
            Some(through) => match self
                .sessions
                .store()
                .session_events_between(handle.id(), after_seq, through)
                .await
            {
                Ok(rows) => rows,
                Err(err) => {
                    let err = SessionError::storage(&err);
                    let frame = Published::error(err.code().as_str(), err.to_string(), None);
                    return self.send(&frame).await;
                }
            },
            None => Vec::new(),
        };
        self.attached = Some(Following {
            handle: handle.clone(),
            live: attachment.live,
            last_seq: after_seq,
            _viewing: Viewing::new(handle.clone()),
        });
        let replayed = stored.len() + attachment.replay.len();
        for (seq, json) in stored {
            if !self.send(&Published::stored(seq, json)).await {
                return false;
            }
        }
        for event in attachment.replay.iter().chain(&attachment.catch_up) {
            if !self.send(event).await {
                return false;
            }
        }
        if announce {
            let resumed = ServerEvent::Resumed {
                session: handle.id().to_owned(),
                last_seq: attachment.last_seq,
                replayed,
            };
            return self.send(&Published::new(None, resumed)).await;
        }
        true
    }

    /// Sends the attached session's events until `seq` has been sent (they were published
    /// before the command's reply, so they are already waiting), at most for a few seconds.
    async fn catch_up_to(&mut self, seq: u64) -> bool {
        let deadline = tokio::time::Instant::now() + ACK_WAIT;
        while self.attached.as_ref().is_some_and(|f| f.last_seq < seq) {
            match tokio::time::timeout_at(deadline, next_live(&mut self.attached)).await {
                Ok(event) => {
                    if !self.on_live(event).await {
                        return false;
                    }
                }
                Err(_) => break,
            }
        }
        true
    }

    /// One item of the live feed.
    async fn on_live(
        &mut self,
        event: Result<Arc<Published>, broadcast::error::RecvError>,
    ) -> bool {
        match event {
            Ok(event) => self.send(&event).await,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "client fell behind; resynchronising from the log");
                let Some(following) = self.attached.take() else {
                    return true;
                };
                self.follow(following.handle, following.last_seq, false)
                    .await
            }
            Err(broadcast::error::RecvError::Closed) => {
                // The session's task ended (eviction, or shutdown): follow it again once it is
                // reopened.
                let Some(following) = self.attached.take() else {
                    return true;
                };
                if self.shutdown.is_cancelled() {
                    return true;
                }
                match self.sessions.open(following.handle.id()).await {
                    Ok(handle) => self.follow(handle, following.last_seq, false).await,
                    Err(_) => true,
                }
            }
        }
    }
}

/// The close frame for a read error the client caused: too big (1009) or not UTF-8 (1007).
fn close_for(err: axum::Error) -> Option<CloseFrame> {
    let inner = err.into_inner();
    let (code, reason) = match inner.downcast_ref::<tungstenite::Error>()? {
        tungstenite::Error::Capacity(_) => (
            CLOSE_TOO_BIG,
            "the frame is larger than the server accepts (64 KiB)",
        ),
        tungstenite::Error::Utf8(_) => (CLOSE_INVALID_DATA, "a text frame must be valid UTF-8"),
        _ => return None,
    };
    Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    })
}

async fn next_live(
    attached: &mut Option<Following>,
) -> Result<Arc<Published>, broadcast::error::RecvError> {
    match attached {
        Some(following) => following.live.recv().await,
        None => std::future::pending().await,
    }
}

fn ack_frame(id: String) -> Published {
    Published::new(None, ServerEvent::Ack { id })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use strum::IntoEnumIterator;

    use crate::session::{AnswerFault, ErrorCode};
    use crate::target::TargetErrorCode;

    use super::protocol::FrameError;

    /// Every code a client can receive, from the enums that define them.
    fn codes() -> BTreeSet<&'static str> {
        let mut codes = BTreeSet::new();
        codes.extend(ErrorCode::iter().map(ErrorCode::as_str));
        codes.extend(FrameError::iter().map(FrameError::code));
        codes.extend(TargetErrorCode::iter().map(TargetErrorCode::as_str));
        codes.extend(AnswerFault::iter().map(AnswerFault::code));
        codes
    }

    #[test]
    fn every_error_code_is_in_the_protocol_table_and_every_table_entry_exists() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
            .unwrap();
        let table = doc
            .split("## Error codes")
            .nth(1)
            .expect("docs/protocol.md has an `## Error codes` section");
        let mut documented = BTreeSet::new();
        for line in table.lines().filter(|l| l.starts_with("| `")) {
            let first = line.split('|').nth(1).unwrap_or_default();
            for code in first.split('`').skip(1).step_by(2) {
                documented.insert(code.to_owned());
            }
        }
        let codes: BTreeSet<String> = codes().into_iter().map(str::to_owned).collect();
        let missing: Vec<_> = codes.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&codes).collect();
        assert!(
            missing.is_empty(),
            "codes missing from docs/protocol.md: {missing:?}"
        );
        assert!(
            unknown.is_empty(),
            "docs/protocol.md lists codes the server never sends: {unknown:?}"
        );
    }
}
