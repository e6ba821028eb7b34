//! A fake OpenAI-compatible model: a real HTTP server on loopback streaming real server-sent
//! events, whose every reply a test scripts (per model name), including the failures.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// Opened by a test to let a gated reply go on.
#[derive(Default)]
pub struct Gate {
    open: AtomicBool,
    notify: Notify,
}

impl Gate {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.open.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// One scripted reply.
#[derive(Clone)]
pub enum Reply {
    /// The text, streamed in word-sized chunks, then `stop` and `[DONE]`.
    Text(String),
    /// An HTTP error status with this body.
    Status(u16, String),
    /// Headers, then nothing at all.
    NoFirstToken,
    /// These chunks, then silence until the client goes away.
    StallAfter(Vec<String>),
    /// These chunks, then an event that is not JSON.
    Malformed(Vec<String>),
    /// These chunks, then the connection ends without a finish reason or `[DONE]`.
    CutAfter(Vec<String>),
    /// These chunks, then `[DONE]` with no finish reason (llama.cpp's server when a second
    /// request interrupts the first).
    NoFinish(Vec<String>),
    /// A finish reason `stop` and `[DONE]` without a word.
    EmptyStop,
    /// These bytes as they are, piece by piece (after the role chunk): line endings, comments
    /// and splits as a server or a proxy may produce them.
    Raw(Vec<Vec<u8>>),
    /// Without streaming: the whole answer after this long (a model generating), with or
    /// without a finish reason.
    Slow(std::time::Duration, String, bool),
    /// These chunks, then a line that never ends (64 KiB pieces without a newline) until the
    /// client goes away.
    EndlessLine(Vec<String>),
    /// These chunks, then wait for the gate, then the rest and `[DONE]`.
    Gated(Vec<String>, Arc<Gate>, Vec<String>),
    /// An HTTP error whose body repeats the request's `Authorization` header, as some proxies
    /// do; and, streamed, an answer that repeats it too.
    EchoAuth(u16),
    /// These bytes piece by piece (after the role chunk), each after this pause: a model that
    /// takes its time (thinking, say).
    Paced(std::time::Duration, Vec<Vec<u8>>),
    /// HTTP 200 and an empty body (llama-cpp-python, streaming, when the prompt is longer
    /// than its context).
    EmptyBody,
}

/// A request as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub model: String,
    /// The sampling seed sent, if any.
    pub seed: Option<u64>,
    /// The whole request body.
    pub body: Value,
    pub messages: Vec<(String, String)>,
    pub stream: bool,
    /// Every header, names in lower case.
    pub headers: Vec<(String, String)>,
    pub query: Option<String>,
    /// Anthropic's `system` field.
    pub system: Option<String>,
    pub arrived: std::time::Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Shared {
    replies: Mutex<HashMap<String, VecDeque<Reply>>>,
    requests: Mutex<Vec<Recorded>>,
}

#[derive(Clone)]
pub struct FakeUpstream {
    /// Base URL, up to and including `/v1`.
    pub url: String,
    shared: Arc<Shared>,
}

impl FakeUpstream {
    pub async fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            .route("/v1/messages", post(messages))
            .route(
                "/v1/models",
                axum::routing::get(|| async {
                    axum::Json(json!({"object": "list", "data": [{"id": "fake"}, {"id": "fake-b"}, {"id": "claude"}]}))
                }),
            )
            .route("/azure/deployments/d/chat/completions", post(completions))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, shared }
    }

    /// Queues a reply for the next request to `model`.
    pub fn push(&self, model: &str, reply: Reply) {
        self.shared
            .replies
            .lock()
            .unwrap()
            .entry(model.to_owned())
            .or_default()
            .push_back(reply);
    }

    pub fn requests(&self, model: &str) -> Vec<Recorded> {
        self.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.model == model)
            .cloned()
            .collect()
    }
}

fn chunk(content: &str) -> String {
    let body = json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}],
    });
    format!("data: {body}\n\n")
}

fn words(text: &str) -> Vec<String> {
    text.split_inclusive(' ').map(str::to_owned).collect()
}

const ROLE_CHUNK: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"},\"finish_reason\":null}]}\n\n";
const FINISH: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"completion_tokens\":7}}\n\ndata: [DONE]\n\n";

/// The request's messages as (role, content).
fn messages_of(request: &Value) -> Vec<(String, String)> {
    request["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Roles alternate, starting and ending with the user (after an optional system prompt), as
/// the chat templates of Mistral, Gemma or Llama 2 require.
fn alternates(messages: &[(String, String)]) -> bool {
    messages
        .iter()
        .skip_while(|(role, _)| role == "system")
        .enumerate()
        .all(|(i, (role, _))| role == if i % 2 == 0 { "user" } else { "assistant" })
        && messages.last().is_some_and(|(role, _)| role == "user")
}

fn record(
    shared: &Shared,
    request: &Value,
    uri: &axum::http::Uri,
    headers: &axum::http::HeaderMap,
    messages: Vec<(String, String)>,
) -> (String, Reply) {
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    let turn = messages.iter().filter(|(role, _)| role == "user").count();
    shared.requests.lock().unwrap().push(Recorded {
        model: model.clone(),
        seed: request["seed"].as_u64(),
        body: request.clone(),
        messages,
        stream: request["stream"].as_bool().unwrap_or(false),
        headers: headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect(),
        query: uri.query().map(str::to_owned),
        system: request["system"].as_str().map(str::to_owned),
        arrived: std::time::Instant::now(),
    });
    let reply = shared
        .replies
        .lock()
        .unwrap()
        .get_mut(&model)
        .and_then(VecDeque::pop_front)
        .unwrap_or_else(|| {
            Reply::Text(format!(
                "I hear you. This is {model} answering turn {turn}."
            ))
        });
    (model, reply)
}

fn event_stream(rx: mpsc::Receiver<Result<Bytes, Infallible>>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(ReceiverStream::new(rx)),
    )
        .into_response()
}

/// Anthropic's Messages API: text answers as its event stream (with a `ping`), statuses,
/// raw bytes.
async fn messages(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap();
    let messages = messages_of(&request);
    if messages.iter().any(|(role, _)| role == "system") || !alternates(&messages) {
        let body = json!({"type": "error", "error": {"type": "invalid_request_error", "message": "messages: roles must alternate between \"user\" and \"assistant\""}});
        return (StatusCode::BAD_REQUEST, body.to_string()).into_response();
    }
    if request["max_tokens"].as_u64().is_none() || headers.get("anthropic-version").is_none() {
        let body = json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}});
        return (StatusCode::BAD_REQUEST, body.to_string()).into_response();
    }
    let (_, reply) = record(&shared, &request, &uri, &headers, messages);
    let text = match reply {
        Reply::Status(status, body) => {
            return (StatusCode::from_u16(status).unwrap(), body).into_response();
        }
        Reply::Text(text) => text,
        Reply::Raw(pieces) => {
            let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
            tokio::spawn(async move {
                for piece in pieces {
                    if tx.send(Ok(Bytes::from(piece))).await.is_err() {
                        return;
                    }
                }
            });
            return event_stream(rx);
        }
        _ => panic!("only Text, Status and Raw replies on the Messages API"),
    };
    if !request["stream"].as_bool().unwrap_or(false) {
        let body = json!({"type": "message", "role": "assistant", "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "usage": {"input_tokens": 12, "output_tokens": 5}});
        return axum::Json(body).into_response();
    }
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant", "content": [], "stop_reason": null, "usage": {"input_tokens": 12, "output_tokens": 1}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    for word in words(&text) {
        events.push(event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}})));
    }
    events.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 5}})));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        for e in events {
            if tx.send(Ok(Bytes::from(e))).await.is_err() {
                return;
            }
        }
    });
    event_stream(rx)
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap();
    let messages = messages_of(&request);
    if !alternates(&messages) {
        let body = json!({"error": {"message": "Conversation roles must alternate user/assistant/user/assistant/..."}});
        return (StatusCode::BAD_REQUEST, body.to_string()).into_response();
    }
    let stream = request["stream"].as_bool().unwrap_or(false);
    let (_, reply) = record(&shared, &request, &uri, &headers, messages);

    if let Reply::Status(status, body) = &reply {
        return (StatusCode::from_u16(*status).unwrap(), body.clone()).into_response();
    }
    if let Reply::EchoAuth(status) = &reply {
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let body = json!({"error": {"message": format!("invalid credentials: {auth}")}});
        return (StatusCode::from_u16(*status).unwrap(), body.to_string()).into_response();
    }
    if matches!(reply, Reply::EmptyBody) {
        return ([(header::CONTENT_TYPE, "text/event-stream")], "").into_response();
    }
    if !stream {
        let (text, finish) = match reply {
            Reply::Text(text) => (text, true),
            Reply::Slow(delay, text, finish) => {
                tokio::time::sleep(delay).await;
                (text, finish)
            }
            _ => panic!("only Text and Slow replies without streaming"),
        };
        let finish = if finish { json!("stop") } else { Value::Null };
        let body = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]});
        return axum::Json(body).into_response();
    }

    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        let send = |text: String| {
            let tx = tx.clone();
            async move { tx.send(Ok(Bytes::from(text))).await.is_ok() }
        };
        if !matches!(reply, Reply::NoFirstToken) && !send(ROLE_CHUNK.to_owned()).await {
            return;
        }
        match reply {
            Reply::Text(text) => {
                for word in words(&text) {
                    if !send(chunk(&word)).await {
                        return;
                    }
                }
                send(FINISH.to_owned()).await;
            }
            Reply::NoFirstToken => tx.closed().await,
            Reply::StallAfter(chunks) => {
                for c in chunks {
                    send(chunk(&c)).await;
                }
                tx.closed().await;
            }
            Reply::Malformed(chunks) => {
                for c in chunks {
                    send(chunk(&c)).await;
                }
                send("data: {this is not json\n\n".to_owned()).await;
                tx.closed().await;
            }
            Reply::CutAfter(chunks) => {
                for c in chunks {
                    send(chunk(&c)).await;
                }
            }
            Reply::NoFinish(chunks) => {
                for c in chunks {
                    send(chunk(&c)).await;
                }
                send("data: [DONE]\n\n".to_owned()).await;
            }
            Reply::EmptyStop => {
                send(FINISH.to_owned()).await;
            }
            Reply::Raw(pieces) => {
                for piece in pieces {
                    if tx.send(Ok(Bytes::from(piece))).await.is_err() {
                        return;
                    }
                }
            }
            Reply::Paced(pause, pieces) => {
                for piece in pieces {
                    tokio::time::sleep(pause).await; // the model's own pace, not a wait on a test
                    if tx.send(Ok(Bytes::from(piece))).await.is_err() {
                        return;
                    }
                }
            }
            Reply::EndlessLine(chunks) => {
                for c in chunks {
                    send(chunk(&c)).await;
                }
                let piece = "a".repeat(64 * 1024);
                let mut line = "data: ".to_owned();
                while send(std::mem::take(&mut line) + &piece).await {}
            }
            Reply::Gated(first, gate, rest) => {
                for c in first {
                    send(chunk(&c)).await;
                }
                gate.wait().await;
                for c in rest {
                    if !send(chunk(&c)).await {
                        return;
                    }
                }
                send(FINISH.to_owned()).await;
            }
            Reply::Status(..) | Reply::EchoAuth(_) | Reply::Slow(..) | Reply::EmptyBody => {
                unreachable!()
            }
        }
    });
    event_stream(rx)
}
