//! A real WebSocket client (tokio-tungstenite) speaking Vigil's protocol, with typed helpers.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for the next event before it fails (a guard, not a sleep).
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct WsClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Every event received, in order.
    pub seen: Vec<Value>,
    next_id: u32,
    prefix: String,
}

impl WsClient {
    pub async fn connect(address: SocketAddr) -> Self {
        Self::connect_to(address, "").await
    }

    /// Connects as a named person (`human:<name>`).
    pub async fn connect_as(address: SocketAddr, name: &str) -> Self {
        Self::connect_to(address, &format!("?name={name}")).await
    }

    /// Connects as the client `client` (a browser tab that reconnects keeps its id).
    pub async fn connect_client(address: SocketAddr, client: &str) -> Self {
        Self::connect_to(address, &format!("?client={client}")).await
    }

    async fn connect_to(address: SocketAddr, query: &str) -> Self {
        let request = upgrade_request(address, query, Some(&format!("http://{address}")));
        let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let prefix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        Self {
            socket,
            seen: Vec::new(),
            next_id: 0,
            prefix,
        }
    }

    /// A fresh client message id.
    pub fn id(&mut self) -> String {
        self.next_id += 1;
        format!("{}-{}", self.prefix, self.next_id)
    }

    pub async fn send(&mut self, message: Value) {
        self.send_raw(&message.to_string()).await;
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.socket.send(Message::text(text)).await.unwrap();
    }

    /// Sends a raw frame (for frames no well-behaved client would send).
    pub async fn send_frame(
        &mut self,
        frame: tokio_tungstenite::tungstenite::protocol::frame::Frame,
    ) {
        // A failure here means the server already closed, which the caller then reads.
        let _ = self.socket.send(Message::Frame(frame)).await;
    }

    /// Reads until the server closes; returns the close code it sent, if any.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            let frame = tokio::time::timeout(EVENT_TIMEOUT, self.socket.next())
                .await
                .expect("the server closes in time");
            match frame {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.socket.send(Message::binary(bytes)).await.unwrap();
    }

    /// The next event; fails the test if none arrives in time.
    pub async fn next(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(EVENT_TIMEOUT, self.socket.next()).await;
            let frame = match frame {
                Ok(Some(Ok(frame))) => frame,
                Ok(other) => panic!(
                    "connection ended ({other:?}); seen so far:\n{}",
                    self.history()
                ),
                Err(_) => panic!(
                    "no event within {EVENT_TIMEOUT:?}; seen so far:\n{}",
                    self.history()
                ),
            };
            match frame {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(&text).unwrap();
                    self.seen.push(value.clone());
                    return value;
                }
                Message::Close(frame) => panic!("closed by the server: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// Skips events until one satisfies `wanted`.
    pub async fn until(&mut self, wanted: impl Fn(&Value) -> bool) -> Value {
        loop {
            let event = self.next().await;
            if wanted(&event) {
                return event;
            }
        }
    }

    pub async fn next_of(&mut self, kind: &str) -> Value {
        self.until(|e| e["type"] == kind).await
    }

    /// Waits for the `error` event answering message `id` (or with `code` if `id` is None).
    pub async fn error_for(&mut self, id: Option<&str>, code: &str) -> Value {
        let event = self
            .until(|e| e["type"] == "error" && id.is_none_or(|id| e["id"] == id))
            .await;
        assert_eq!(event["code"], code, "unexpected error: {event}");
        assert!(
            event["message"].as_str().is_some_and(|m| m.len() > 10),
            "error without a sentence: {event}"
        );
        event
    }

    pub async fn ack(&mut self, id: &str) -> Value {
        let event = self
            .until(|e| (e["type"] == "ack" || e["type"] == "error") && e["id"] == id)
            .await;
        assert_eq!(event["type"], "ack", "expected an ack for {id}: {event}");
        event
    }

    /// Starts a session and returns its `started` event.
    pub async fn start(&mut self, scenario: &str, targets: &[&str], mode: &str) -> Value {
        let id = self.id();
        self.send(json!({"type": "start", "id": id, "scenario": scenario, "targets": targets, "mode": mode}))
            .await;
        let started = self
            .until(|e| e["type"] == "started" || (e["type"] == "error" && e["id"] == id.as_str()))
            .await;
        assert_eq!(started["type"], "started", "start failed: {started}");
        self.ack(&id).await;
        started
    }

    /// Sends a command with a fresh id and waits for its ack (failing on an error).
    pub async fn apply(&mut self, mut message: Value) {
        let id = self.id();
        message["id"] = json!(id);
        self.send(message).await;
        self.ack(&id).await;
    }

    /// Sends a command with a fresh id and returns the error it gets, checking its code.
    pub async fn refused(&mut self, mut message: Value, code: &str) -> Value {
        let id = self.id();
        message["id"] = json!(id);
        self.send(message).await;
        self.error_for(Some(&id), code).await
    }

    /// Ends the session and returns the `ended` event.
    pub async fn end(&mut self) -> Value {
        self.apply(json!({"type": "end"})).await;
        self.last("ended")
            .cloned()
            .expect("an `ended` event before the ack")
    }

    /// Sends a patient line and waits for its ack; returns the `patient` event.
    pub async fn say(&mut self, text: &str) -> Value {
        self.patient_message(json!({"type": "say", "text": text}))
            .await
    }

    /// Sends the offered script line and waits for its ack; returns the `patient` event.
    pub async fn next_line(&mut self) -> Value {
        self.patient_message(json!({"type": "next"})).await
    }

    async fn patient_message(&mut self, mut message: Value) -> Value {
        let id = self.id();
        message["id"] = json!(id);
        self.send(message).await;
        self.ack(&id).await;
        self.seen
            .iter()
            .rev()
            .find(|e| e["type"] == "patient")
            .cloned()
            .unwrap()
    }

    /// Waits until every one of `targets` has answered `turn` (each answer's rating and the
    /// criteria after it included) and returns the answers by target.
    pub async fn answers(&mut self, turn: u64, targets: &[&str]) -> Vec<Value> {
        // Targets answer in any order; collect them as they come, return them in `targets` order.
        let mut answers: Vec<Option<Value>> = vec![None; targets.len()];
        while answers.iter().any(Option::is_none) {
            let answer = self
                .until(|e| e["type"] == "answer" && e["turn"] == turn)
                .await;
            let target = answer["target"].as_str().unwrap_or_default();
            if let Some(slot) = targets.iter().position(|t| *t == target) {
                answers[slot] = Some(answer);
            }
        }
        let answers: Vec<Value> = answers.into_iter().flatten().collect();
        // The criteria event that follows the last answer of the turn.
        self.next_of("criteria").await;
        answers
    }

    /// The latest event of a kind seen so far.
    pub fn last(&self, kind: &str) -> Option<&Value> {
        self.seen.iter().rev().find(|e| e["type"] == kind)
    }

    /// The rating event of the rules for `turn` and `target`.
    pub fn rules_rating(&self, turn: u64, target: &str) -> &Value {
        self.seen
            .iter()
            .find(|e| {
                e["type"] == "rating"
                    && e["turn"] == turn
                    && e["target"] == target
                    && e["rater"] == "rules"
            })
            .unwrap_or_else(|| {
                panic!(
                    "no rules rating for turn {turn} target {target}:\n{}",
                    self.history()
                )
            })
    }

    /// The highest `seq` seen.
    pub fn last_seq(&self) -> u64 {
        self.seen
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .max()
            .unwrap_or(0)
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }

    fn history(&self) -> String {
        self.seen
            .iter()
            .map(|e| format!("  {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The upgrade request of `/ws{query}` on `address`, with this `Origin` (as a page would send it).
pub fn upgrade_request(
    address: SocketAddr,
    query: &str,
    origin: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{address}/ws{query}")
        .into_client_request()
        .unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    request
}

/// The state of `criterion` for `target` in a `criteria` event.
pub fn criterion_of<'a>(criteria: &'a Value, target: &str, criterion: &str) -> &'a Value {
    let summary = criteria["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == target)
        .unwrap_or_else(|| panic!("no target {target} in {criteria}"));
    summary["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == criterion)
        .unwrap_or_else(|| panic!("no criterion {criterion} in {summary}"))
}

/// The status of `criterion` for `target` in a `criteria` event.
pub fn status_of(criteria: &Value, target: &str, criterion: &str) -> String {
    criterion_of(criteria, target, criterion)["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The verdict of `criterion` in a rating event, if it is there.
pub fn verdict_of(rating: &Value, criterion: &str) -> Option<String> {
    rating["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["criterion"] == criterion)
        .map(|v| v["verdict"].as_str().unwrap().to_owned())
}
