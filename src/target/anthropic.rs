//! Anthropic's Messages API (`POST /v1/messages`): the system prompt as its own field,
//! `max_tokens` always sent, the key in `x-api-key`, and the event stream (`message_start`,
//! `content_block_delta` with text or thinking, `message_delta` with the stop reason and
//! usage, `message_stop`, `ping`, `error`). Stop reasons are mapped to the OpenAI names the
//! rest of Vigil reads: `end_turn` and `stop_sequence` to `stop`, `max_tokens` to `length`;
//! others (`refusal`, `pause_turn`, ...) are kept as they are.

use std::sync::Arc;

use eventsource_stream::Event;
use serde::Deserialize;

use super::http::{Endpoint, ErrorDetail};
use super::stream::{Decoded, Protocol};
use super::{ChatMessage, ChatModel, ChunkStream, Role, TargetError};
use crate::target::Chunk;

/// Sent when a target sets no `max_tokens`: the API requires one.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;
/// The API version Vigil speaks.
pub const VERSION: &str = "2023-06-01";

pub struct Settings {
    pub endpoint: Arc<Endpoint>,
    pub model: String,
    pub max_tokens: u32,
    pub temperature: Option<f64>,
    /// `top_p`, `stop` (as `stop_sequences`) and `extra_body` (for `thinking`, `top_k`, ...).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone)]
pub struct Anthropic {
    settings: Arc<Settings>,
}

impl std::fmt::Debug for Anthropic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Anthropic")
            .field("endpoint", &self.settings.endpoint)
            .field("model", &self.settings.model)
            .finish_non_exhaustive()
    }
}

impl Anthropic {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings: Arc::new(settings),
        }
    }

    fn body(&self, messages: &[ChatMessage]) -> serde_json::Value {
        let s = &*self.settings;
        let system: Vec<&str> = messages
            .iter()
            .filter(|m| m.role == Role::System)
            .map(|m| &*m.content)
            .collect();
        let turns: Vec<&ChatMessage> = messages.iter().filter(|m| m.role != Role::System).collect();
        let mut body = serde_json::json!({
            "model": s.model,
            "max_tokens": s.max_tokens,
            "messages": turns,
            "stream": s.endpoint.stream,
        });
        if !system.is_empty() {
            body["system"] = system.join("\n\n").into();
        }
        if let Some(t) = s.temperature {
            body["temperature"] = t.into();
        }
        for (key, value) in &s.extra {
            let key = if key == "stop" { "stop_sequences" } else { key };
            body[key] = value.clone();
        }
        body
    }
}

impl ChatModel for Anthropic {
    fn stream(&self, messages: Vec<ChatMessage>) -> ChunkStream {
        let body = self.body(&messages);
        let endpoint = Arc::clone(&self.settings.endpoint);
        super::stream::redacted(
            Arc::clone(&endpoint.secrets),
            super::stream::answer(endpoint, body, Messages),
        )
    }
}

/// The Messages API's stream and body.
#[derive(Debug, Default)]
pub struct Messages;

impl Protocol for Messages {
    fn event(
        &mut self,
        event: &Event,
        index: usize,
        answer: &mut Decoded,
    ) -> Result<(), TargetError> {
        let data = event.data.trim();
        if data.is_empty() {
            return Ok(());
        }
        let parsed: StreamEvent = serde_json::from_str(data).map_err(|err| {
            TargetError::Malformed(format!(
                "event {index} (`{}`) is not a Messages API event ({err})",
                event.event
            ))
        })?;
        match parsed {
            StreamEvent::MessageStart { message } => {
                answer.usage.prompt = message.usage.and_then(|u| u.input_tokens);
            }
            StreamEvent::ContentBlockStart { content_block } => {
                content_block.into_chunks(&mut answer.chunks);
            }
            StreamEvent::ContentBlockDelta { delta } => delta.into_chunks(&mut answer.chunks),
            StreamEvent::MessageDelta { delta, usage } => {
                if let Some(reason) = delta.stop_reason {
                    answer.finish = Some(finish(reason));
                }
                if let Some(tokens) = usage.and_then(|u| u.output_tokens) {
                    answer.usage.completion = Some(tokens);
                }
            }
            StreamEvent::MessageStop {} => answer.done = true,
            StreamEvent::Error { error } => {
                let kind = match &error {
                    ErrorDetail::Object {
                        kind: Some(kind), ..
                    } => format!(" ({kind})"),
                    _ => String::new(),
                };
                return Err(TargetError::Malformed(format!(
                    "the model reported an error mid-stream: {}{kind}",
                    error.message()
                )));
            }
            StreamEvent::ContentBlockStop {} | StreamEvent::Ping {} | StreamEvent::Other => {}
        }
        Ok(())
    }

    fn whole(&self, body: &[u8], answer: &mut Decoded) -> Result<(), TargetError> {
        let message: Message = serde_json::from_slice(body).map_err(|err| {
            TargetError::Malformed(format!(
                "the response is not a Messages API message ({err})"
            ))
        })?;
        for block in message.content {
            block.into_chunks(&mut answer.chunks);
        }
        answer.finish = message.stop_reason.map(finish);
        if let Some(usage) = message.usage {
            answer.usage.prompt = usage.input_tokens;
            answer.usage.completion = usage.output_tokens;
        }
        Ok(())
    }
}

fn finish(reason: String) -> String {
    match reason.as_str() {
        "end_turn" | "stop_sequence" => "stop".to_owned(),
        "max_tokens" => "length".to_owned(),
        _ => reason,
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: Message,
    },
    ContentBlockStart {
        content_block: Block,
    },
    ContentBlockDelta {
        delta: Block,
    },
    ContentBlockStop {},
    MessageDelta {
        delta: MessageDelta,
        #[serde(default)]
        usage: Option<Usage>,
    },
    MessageStop {},
    Ping {},
    Error {
        error: ErrorDetail,
    },
    #[serde(other)]
    Other,
}

/// A content block, or a delta of one: the same shapes.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    #[serde(alias = "text_delta")]
    Text {
        #[serde(default)]
        text: String,
    },
    #[serde(alias = "thinking_delta")]
    Thinking {
        #[serde(default)]
        thinking: String,
    },
    /// Signatures, tool input, citations, redacted thinking: nothing to show.
    #[serde(other)]
    Other,
}

impl Block {
    fn into_chunks(self, out: &mut Vec<Chunk>) {
        match self {
            Block::Text { text } if !text.is_empty() => out.push(Chunk::Text(text)),
            Block::Thinking { thinking } if !thinking.is_empty() => {
                out.push(Chunk::Reasoning(thinking));
            }
            _ => {}
        }
    }
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct MessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Usage;
    use crate::target::stream::decode_pieces;

    fn decode(text: &str) -> Vec<Result<Chunk, String>> {
        // Read seven bytes at a time.
        decode_pieces(text.as_bytes(), (7..text.len()).step_by(7), Messages)
    }

    #[test]
    fn the_event_stream_with_thinking_and_pings_reads_as_the_answer() {
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude\",\"stop_reason\":null,\"usage\":{\"input_tokens\":42,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Passive ideation; ask.\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"abc\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: ping\ndata: {\"type\": \"ping\"}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"Are you thinking \"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"of suicide?\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":17}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        assert_eq!(
            decode(stream),
            vec![
                Ok(Chunk::Reasoning("Passive ideation; ask.".into())),
                Ok(Chunk::Text("Are you thinking ".into())),
                Ok(Chunk::Text("of suicide?".into())),
                Ok(Chunk::Done {
                    finish: "stop".into(),
                    usage: Usage {
                        prompt: Some(42),
                        completion: Some(17)
                    }
                }),
            ]
        );
    }

    #[test]
    fn an_error_event_and_a_cut_at_max_tokens_say_so() {
        let overloaded = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"content\":[],\"usage\":{\"input_tokens\":3}}}\n\n",
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
        );
        assert_eq!(
            decode(overloaded),
            vec![Err(TargetError::Malformed(
                "the model reported an error mid-stream: Overloaded (overloaded_error)".into()
            )
            .to_string())]
        );
        let cut = concat!(
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"I hear\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\"}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        assert_eq!(
            decode(cut).last().unwrap(),
            &Ok(Chunk::Done {
                finish: "length".into(),
                usage: Usage::default()
            })
        );
    }

    #[test]
    fn a_whole_message_reads_as_the_same_answer() {
        let body = br#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"thinking","thinking":"Ask.","signature":"x"},{"type":"text","text":"Are you safe?"}],"stop_reason":"max_tokens","usage":{"input_tokens":9,"output_tokens":4}}"#;
        let mut answer = Decoded::default();
        Messages.whole(body, &mut answer).unwrap();
        assert_eq!(
            answer.chunks,
            vec![
                Chunk::Reasoning("Ask.".into()),
                Chunk::Text("Are you safe?".into())
            ]
        );
        assert_eq!(answer.finish.as_deref(), Some("length"));
        assert_eq!(
            answer.usage,
            Usage {
                prompt: Some(9),
                completion: Some(4)
            }
        );
    }

    #[test]
    fn the_request_carries_the_system_prompt_apart_and_always_max_tokens() {
        crate::tls::install_provider();
        let endpoint = Arc::new(Endpoint {
            client: reqwest::Client::new(),
            url: reqwest::Url::parse("http://127.0.0.1:9/v1/messages").unwrap(),
            headers: Default::default(),
            missing_key: None,
            secrets: Arc::default(),
            stream: true,
            timeouts: crate::target::Timeouts {
                connect: std::time::Duration::from_secs(1),
                first_token: std::time::Duration::from_secs(1),
                stall: std::time::Duration::from_secs(1),
                total: std::time::Duration::from_secs(1),
            },
            retries: 0,
            gate: None,
            context_tokens: None,
        });
        let mut extra = serde_json::Map::new();
        extra.insert("stop".into(), serde_json::json!(["\n\nPatient:"]));
        let model = Anthropic::new(Settings {
            endpoint,
            model: "claude-x".into(),
            max_tokens: DEFAULT_MAX_TOKENS,
            temperature: None,
            extra,
        });
        let body = model.body(&[
            ChatMessage::new(Role::System, "Be kind."),
            ChatMessage::new(Role::User, "I can't go on."),
        ]);
        assert_eq!(body["system"], "Be kind.");
        assert_eq!(body["max_tokens"], 1024);
        assert_eq!(
            body["messages"],
            serde_json::json!([{"role": "user", "content": "I can't go on."}])
        );
        assert_eq!(body["stop_sequences"], serde_json::json!(["\n\nPatient:"]));
        assert!(body.get("temperature").is_none());
    }
}
